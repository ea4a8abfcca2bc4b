"""ThinK (Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv 2407.21018): each head keeps
only the key channels its queries read, chosen once from the prompt.

Why channels: a key channel that the queries barely weigh adds little to any attention logit, whatever the token,
so dropping it from every cached key costs little attention and saves its bytes in every entry. ThinK ranks a
head's channels by how much its last queries and the prompt's keys (those the policy kept, when it evicts at
prefill, as kvpress orders them) meet in them, ``‖Q[:, c]‖ · ‖K[:, c]‖``
(kvpress ranks by the product of their mean squares, the same order), and keeps the top half. The attention then reads a
pruned key as zero in the dropped channels, which is the query restricted to the kept ones, as ThinK computes it.
Values are kept whole. ThinK shortens entries and any eviction policy shortens the sequence: they compose (ThinK
with SnapKV, as in the paper: ``--policy snapkv --codec think``).

What we depart from, and why:

- The channels are chosen with the last ``WINDOW`` queries of every query head that shares the KV head, in the
  prompt's prefill (its first chunk with a chunked prefill, or the first chunk that holds a token of every
  sequence of a left-padded batch). Keys are the model's as cached, after RoPE, as kvpress prunes them, so the
  ranking depends on where positions start: a left-padded batch chooses as each prompt alone when its positions
  start at each prompt's first token, as ``generate()`` and lm-eval give them.
- The newest ``WINDOW`` entries of each head stay whole (the observation window, as ThinK keeps it), and tokens
  generated later are pruned once they are older than that. ThinK keeps every generated key whole: under a budget
  in bytes, entries that never shrink would make the cache grow past what was paid for.

What an entry costs: the kept key channels and the whole value, in the model's dtype: at ``head_dim`` 64 in
bfloat16, 192 bytes against 256. The kept channels' indices are held per layer, sequence and KV head, beside the
entries (the layer's auxiliary bytes). Decoding a layer expands them to one row per entry (int64 indices, since
``gather`` and ``scatter`` take no other): a transient of 8 bytes a kept channel, 256 bytes an entry at ``head_dim``
64, as large as the decoded keys in float32 and twice them in bfloat16, paid one layer at a time like the working
copy itself.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvpolicies import GroupedCodec, hookimpl
from kvpolicies.errors import UsageError

PRUNED = 0.5
"""Fraction of each head's key channels dropped (the paper's λ; kvpress's ``key_channel_compression_ratio``)."""
WINDOW = 32
"""Last queries that choose the channels, and newest entries of each head kept whole."""


class ThinK(GroupedCodec):
    """Keys pruned to half their channels, chosen per head by the prompt's last 32 queries; values, newest 32 whole."""

    name = "think"
    group = 1
    fits = True
    window: ClassVar[int] = WINDOW
    """Last queries of each query head that choose the channels, and newest entries of each head kept whole."""
    pruned: ClassVar[float] = PRUNED

    @property
    def residual(self) -> int:
        return self.window

    @property
    def fit_queries(self) -> int:
        return self.window

    def kept_channels(self, head_dim: int) -> int:
        return head_dim - int(head_dim * self.pruned)

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> int:
        if self.kept_channels(head_dim) < 1:
            raise UsageError(f"codec {self.name!r} would keep no key channel of this model's {head_dim}-channel heads")
        return (self.kept_channels(head_dim) + head_dim) * torch.empty((), dtype=dtype).element_size()

    def fit(self, keys: torch.Tensor, valid: torch.Tensor, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        window = queries.float()  # the last `window` of the pass; padded positions are zero: they weigh nothing
        met = window.square().sum(dim=(1, 2)).sqrt() * (keys.float().square() * valid[..., None]).sum(1).sqrt()
        kept = met.topk(self.kept_channels(keys.shape[-1]), dim=-1).indices
        return {"channels": kept.sort(dim=-1).values}  # [runs, kept], in channel order

    def encode(self, keys: torch.Tensor, values: torch.Tensor,
               fitted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        channels = fitted["channels"][:, None, :].expand(-1, keys.shape[1], -1)
        return {"keys": keys.gather(-1, channels), "values": values.clone()}

    def decode(self, stored: dict[str, torch.Tensor], dtype: torch.dtype,
               fitted: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        kept, values = stored["keys"], stored["values"]
        channels = fitted["channels"][:, None, :].expand(-1, kept.shape[1], -1)
        keys = kept.new_zeros(values.shape, dtype=dtype).scatter_(-1, channels, kept.to(dtype))
        return keys, values.to(dtype)


@hookimpl
def register_codecs(register):
    register(ThinK)
