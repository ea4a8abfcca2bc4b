"""Does a low key norm predict high attention? Per layer and KV head, on real text (the L2-norm paper's claim 1).

For every (layer, KV head): the attention each key receives from the last ``window`` queries (averaged over those
queries and the query heads sharing the KV head), against the key's L2 norm, over the keys all those queries can
see. Reported: Spearman and Pearson correlation (negative = the paper's claim), and the overlap between the ``k``
lowest-norm keys and the ``k`` most-attended keys (what an L2 policy keeping ``k`` would get right).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicies.errors import UsageError

from kvpolicies.experiments.probe import queries_and_keys


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, ties sharing their average rank (as Spearman's rho needs)."""
    order = values.argsort(dim=-1, stable=True)
    sorted_values = values.gather(-1, order)
    rank = torch.empty_like(values, dtype=torch.float64)
    positions = torch.arange(values.shape[-1], dtype=torch.float64).expand_as(values)
    rank.scatter_(-1, order, positions)
    # Average the ranks of tied values: group runs of equal sorted values.
    new_group = torch.ones_like(sorted_values, dtype=torch.bool)
    new_group[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    group = new_group.long().cumsum(-1) - 1
    sums = torch.zeros_like(positions).scatter_add_(-1, group, positions)
    counts = torch.zeros_like(positions).scatter_add_(-1, group, torch.ones_like(positions))
    averaged = (sums / counts.clamp(min=1)).gather(-1, group)
    return torch.empty_like(rank).scatter_(-1, order, averaged)


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation along the last dimension (0 where either side is constant)."""
    x, y = x.double() - x.double().mean(-1, keepdim=True), y.double() - y.double().mean(-1, keepdim=True)
    denominator = (x.square().sum(-1) * y.square().sum(-1)).sqrt()
    return torch.where(denominator > 0, (x * y).sum(-1) / denominator.clamp(min=1e-300), 0.0)


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return pearson(ranks(x.double()), ranks(y.double()))


def topk_overlap(norms: torch.Tensor, attention: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the ``k`` most-attended keys that are among the ``k`` lowest-norm keys."""
    lowest = torch.zeros_like(norms, dtype=torch.bool).scatter_(-1, norms.topk(k, largest=False).indices, True)
    attended = torch.zeros_like(norms, dtype=torch.bool).scatter_(-1, attention.topk(k).indices, True)
    return (lowest & attended).sum(-1).double() / k


@dataclass
class NormAttention:
    """Per-layer, per-KV-head results of :func:`norm_attention`; tensors are ``[layers, kv_heads]``."""

    spearman: torch.Tensor
    pearson: torch.Tensor
    overlap: torch.Tensor
    norms: list[torch.Tensor]  # per layer: [kv_heads, keys]
    attention: list[torch.Tensor]  # per layer: [kv_heads, keys]
    tokens: int
    window: int
    keep_fraction: float


@torch.no_grad()
def norm_attention(model, ids: torch.Tensor, window: int = 64, keep_fraction: float = 0.5) -> NormAttention:
    """Measure the norm/attention relation on ``ids`` (``[1, seq]``, seq > window)."""
    seq = ids.shape[1]
    if seq <= window:
        raise UsageError(f"the text has {seq} tokens; it needs more than the query window ({window}): give a longer "
                         "text or a smaller --window")
    queries, cache = queries_and_keys(model, ids, rows=window)
    visible = seq - window  # keys that every one of the last `window` queries can see
    results = {"spearman": [], "pearson": [], "overlap": []}
    all_norms, all_attention = [], []
    for layer_idx in sorted(queries):
        keys = cache.layers[layer_idx].keys[0].float()  # [kv_heads, seq, head_dim]
        query = queries[layer_idx][0].float()  # [heads, window, head_dim]
        kv_heads, groups = keys.shape[0], query.shape[0] // keys.shape[0]
        scale = keys.shape[-1] ** -0.5
        logits = torch.einsum("hgqd,hsd->hgqs", query.view(kv_heads, groups, window, -1), keys) * scale
        causal = torch.arange(seq)[None, :] <= (visible + torch.arange(window))[:, None]  # [window, seq]
        weights = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        attention = weights.mean(dim=(1, 2))[:, :visible]  # [kv_heads, visible]
        norms = keys[:, :visible].norm(dim=-1)
        k = max(1, int(keep_fraction * visible))
        results["spearman"].append(spearman(norms, attention))
        results["pearson"].append(pearson(norms, attention))
        results["overlap"].append(topk_overlap(norms, attention, k))
        all_norms.append(norms.cpu())
        all_attention.append(attention.cpu())
    return NormAttention(
        **{name: torch.stack(values).float().cpu() for name, values in results.items()},
        norms=all_norms, attention=all_attention, tokens=seq, window=window, keep_fraction=keep_fraction,
    )


def summary_rows(result: NormAttention) -> list[list[str]]:
    """One row per layer: Spearman per KV head, mean Pearson, mean top-k overlap."""
    rows = []
    for layer in range(result.spearman.shape[0]):
        rows.append([
            layer,
            *(f"{v:+.2f}" for v in result.spearman[layer].tolist()),
            f"{result.pearson[layer].mean():+.2f}",
            f"{result.overlap[layer].mean():.2f}",
        ])
    return rows


def plot_norm_attention(result: NormAttention, out_dir, layers: list[int]) -> list:
    """A layer × head heatmap of Spearman's rho, and attention-vs-norm scatters for ``layers`` (PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axis = plt.subplots(figsize=(2 + result.spearman.shape[1], 8))
    image = axis.imshow(result.spearman.numpy(), cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
    axis.set_xlabel("KV head")
    axis.set_ylabel("layer")
    axis.set_title("Spearman(key norm, attention)")
    fig.colorbar(image)
    fig.tight_layout()
    heatmap = out_dir / "norm_attention_spearman.png"
    fig.savefig(heatmap, dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.6), squeeze=False)
    for axis, layer in zip(axes[0], layers):
        for head in range(result.norms[layer].shape[0]):
            axis.scatter(result.norms[layer][head], result.attention[layer][head], s=4, alpha=0.5, label=f"head {head}")
        axis.set_yscale("log")
        axis.set_xlabel("key L2 norm")
        axis.set_ylabel("attention received (mean of last queries)")
        axis.set_title(f"layer {layer}")
    axes[0][-1].legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    scatter = out_dir / "norm_attention_scatter.png"
    fig.savefig(scatter, dpi=110)
    plt.close(fig)
    return [heatmap, scatter]
