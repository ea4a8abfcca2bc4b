"""Turning scores into a kept set: top-k per head with protected tokens and deterministic ties."""

from __future__ import annotations

import torch


def age_order(valid: torch.Tensor) -> torch.Tensor:
    """Rank of each valid entry among the valid entries of its head, 0 = oldest; -1 on padding.

    ``valid``: ``[batch, kv_heads, seq]`` bool, entries in age order along ``seq``.
    """
    return torch.where(valid, valid.long().cumsum(-1) - 1, -1)


def select(
    scores: torch.Tensor,
    valid: torch.Tensor,
    keep: torch.Tensor,
    sink_tokens: int | torch.Tensor = 0,
    window_tokens: int = 0,
) -> torch.Tensor:
    """Choose which entries to keep in every head.

    Args:
        scores: ``[batch, kv_heads, seq]``, higher = keep.
        valid: ``[batch, kv_heads, seq]`` bool; padding is never kept.
        keep: ``[batch, kv_heads]`` entries to keep per head (clamped to the valid count).
        sink_tokens / window_tokens: the oldest / newest valid entries kept before any scored one; they count
            inside ``keep``; if ``keep`` cannot hold them all, sinks (oldest first) win, then the newest. Sinks may
            differ per sequence (a ``[batch, 1, 1]`` tensor).

    Returns:
        ``[batch, kv_heads, seq]`` bool mask, exactly ``min(keep, valid count)`` True per head.

    Scores must be numbers at valid entries (the cache checks a policy's scores before calling this); padded
    positions may hold anything, NaN included. Ties are broken towards the older entry (a stable sort), so equal scores — frequent with bf16 key norms —
    always give the same kept set.
    """
    order = age_order(valid)
    count = valid.sum(-1, keepdim=True)
    ranked = scores.float().masked_fill(~valid, float("-inf"))
    # Stable descending sort: among equal scores the lower index (older entry) ranks first.
    position = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    if isinstance(sink_tokens, torch.Tensor) or sink_tokens or window_tokens:
        # Protected entries go first: sinks (oldest first), then the window (newest first), then by score.
        window = valid & (order >= count - window_tokens)
        sinks = valid & (order < sink_tokens)
        priority = sinks.long() * 2 + (window & ~sinks).long()
        within = torch.where(sinks, -order, torch.where(window, order, 0)).gather(-1, position)
        position = position.gather(-1, torch.sort(within, dim=-1, descending=True, stable=True).indices)
        priority = priority.gather(-1, position)
        position = position.gather(-1, torch.sort(priority, dim=-1, descending=True, stable=True).indices)
    rank = torch.empty_like(position)
    rank.scatter_(-1, position, torch.arange(scores.shape[-1], device=scores.device).expand_as(position))
    limit = torch.minimum(keep.to(count.device).unsqueeze(-1), count)
    return valid & (rank < limit)
