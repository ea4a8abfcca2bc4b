"""How a layer holds its entries under a grouped codec: whole groups encoded, each run's newest entries in full.

Why its own form: a :class:`~kvpolicies.engine.codecs.GroupedCodec` encodes ``group`` consecutive entries of one
head together, so its stored tensors are per group, not per entry, and cannot be selected, packed and appended
row by row as a per-entry codec's are. Each run (one sequence's entries in one KV head, as the layer orders them)
is held in two parts:

- its oldest entries, a whole number of groups, encoded: the codec's tensors ``[groups, ...]`` of every run, one
  run after another (so group ``g`` holds the run's entries ``g·G`` to ``g·G + G - 1``);
- its newest entries at full precision, ``[tail entries, head_dim]`` for keys and for values, run after run:
  between ``residual`` and ``residual + group - 1`` of them (all of a shorter run).

When. Like a per-entry codec's layer, the layer decodes what it holds into a working copy for each forward pass
and drops it when the pass is done (:meth:`~kvpolicies.engine.storage.CompressedLayer.settle`). Then:

- if the pass only appended (decoding, a chunk of a prompt), the groups stay as they are: the new entries join
  the full-precision part, and the whole groups that part now holds beyond its ``residual`` newest are encoded
  and put after their run's groups (:meth:`Residual.extended`). An entry is encoded exactly once;
- if the pass re-laid the layer (an eviction, dropped padding or window entries), every run is encoded afresh
  from the working copy (:meth:`Residual.encoded`): entries already encoded are encoded again in their new groups,
  as transformers' ``QuantizedCache`` re-quantizes its whole cache whenever its residual fills. Compression at
  prefill, the common case, evicts before anything is encoded, so the kept entries are encoded once, from full
  precision.

A :class:`Residual` is never changed in place: every change builds a new one, so a state saved by an after-prefill
probe stays valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvpolicies.engine.codecs import GroupedCodec
from kvpolicies.engine.runs import Counts, merge, take


@dataclass(frozen=True)
class Residual:
    """One layer's entries under a grouped codec: per run, ``encoded[r]`` entries in the codec's groups and the
    ``tails[r]`` newest at full precision."""

    codec: GroupedCodec
    encoded: Counts
    """Entries encoded per run (the oldest; a multiple of the codec's group)."""
    tails: Counts
    """Entries held at full precision per run (the newest)."""
    groups: dict[str, torch.Tensor]
    """The codec's tensors, ``[groups, ...]``, every run's groups in run order."""
    tail_keys: torch.Tensor
    """``[sum(tails), head_dim]`` in the model's dtype."""
    tail_values: torch.Tensor

    @classmethod
    def empty(cls, codec: GroupedCodec, runs: int, like: torch.Tensor) -> Residual:
        """No entries yet, in ``runs`` runs, for keys like ``like`` (``[..., head_dim]``)."""
        none = like.new_zeros(0, codec.group, like.shape[-1])
        nothing = Counts.same(0, runs)
        return cls(codec, nothing, nothing, codec.encode(none, none), none[:, 0], none[:, 0])

    @classmethod
    def encoded_from(cls, codec: GroupedCodec, keys: torch.Tensor, values: torch.Tensor,
                     lengths: Counts) -> Residual:
        """Every run of ``keys`` and ``values`` (``[sum(lengths), head_dim]``, runs of ``lengths``) encoded afresh."""
        encoded = lengths.whole_groups(codec.group, codec.residual)
        tails = lengths.minus(encoded)
        none = Counts.same(0, len(lengths.host))
        groups = _encode(codec, take(keys, lengths, none, encoded), take(values, lengths, none, encoded))
        return cls(codec, encoded, tails, groups, take(keys, lengths, encoded, tails),
                   take(values, lengths, encoded, tails))

    def extended(self, keys: torch.Tensor, values: torch.Tensor, lengths: Counts) -> Residual:
        """This store once its runs grew at their ends to ``lengths``: ``keys`` and ``values`` are the working copy
        (``[sum(lengths), head_dim]``), whose first ``encoded[r]`` entries of each run are the ones already encoded
        here. Only whole groups the full-precision part now holds beyond the residual are encoded."""
        held = lengths.minus(self.encoded)  # each run's entries not yet encoded
        fresh = held.whole_groups(self.codec.group, self.codec.residual)
        if not any(fresh.host):
            return dataclasses.replace(self, tails=held, tail_keys=take(keys, lengths, self.encoded, held),
                                       tail_values=take(values, lengths, self.encoded, held))
        after, tails = self.encoded.plus(fresh), held.minus(fresh)
        new_groups = _encode(self.codec, take(keys, lengths, self.encoded, fresh),
                             take(values, lengths, self.encoded, fresh))
        old_counts, new_counts = self.encoded.over(self.codec.group), fresh.over(self.codec.group)
        groups = {name: merge(t, old_counts, new_groups[name], new_counts) for name, t in self.groups.items()}
        return Residual(self.codec, after, tails, groups, take(keys, lengths, after, tails),
                        take(values, lengths, after, tails))

    def decoded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[entries, head_dim]`` in run order, each run's encoded entries decoded and then its
        full-precision ones."""
        keys, values = self.codec.decode(self.groups, dtype)
        head_dim = self.tail_keys.shape[-1]
        return (merge(keys.reshape(-1, head_dim), self.encoded, self.tail_keys.to(dtype), self.tails),
                merge(values.reshape(-1, head_dim), self.encoded, self.tail_values.to(dtype), self.tails))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held: what the layer's resident bytes are read from."""
        return [*self.groups.values(), self.tail_keys, self.tail_values]


def _encode(codec: GroupedCodec, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The codec's groups of ``keys`` and ``values`` (``[entries, head_dim]``, whole groups of one run each)."""
    shape = (-1, codec.group, keys.shape[-1])
    return codec.encode(keys.view(shape), values.view(shape))
