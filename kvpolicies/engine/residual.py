"""How a layer holds its entries under a grouped codec: whole groups encoded, each run's newest entries in full.

Why its own form: a :class:`~kvpolicies.engine.codecs.GroupedCodec` encodes ``group`` consecutive entries of one
head together, so its stored tensors are per group, not per entry, and cannot be selected, packed and appended
row by row as a per-entry codec's are. Each run (one sequence's entries in one KV head, as the layer orders them)
is held in two parts:

- its oldest entries, a whole number of groups, encoded: the codec's tensors ``[groups, ...]`` of every run, one
  run after another (so group ``g`` holds the run's entries ``g·G`` to ``g·G + G - 1``);
- its newest entries at full precision, ``[tail entries, head_dim]`` for keys and for values, run after run:
  between ``residual`` and ``residual + group - 1`` of them as entries arrive (all of a shorter run; fewer after
  a cut among them, until new entries come).

When. Like a per-entry codec's layer, the layer decodes what it holds into a working copy for each forward pass
and drops it when the pass is done (:meth:`~kvpolicies.engine.storage.CompressedLayer.settle`). Then:

- if the pass only appended (decoding, a chunk of a prompt), the groups stay as they are: the new entries join
  the full-precision part, and the whole groups that part now holds beyond its ``residual`` newest are encoded
  and put after their run's groups (:meth:`Residual.extended`). An entry is encoded exactly once;
- if the pass slid a window past whole groups (a model's sliding-window layer), those groups are dropped and the
  others stay as they are (:meth:`Residual.without_first`); a group part of which the window still shows is kept
  whole, its older entries hidden by their positions, so no group is split;
- if the pass cut the layer (an eviction), each run keeps the groups that lie wholly before the first entry the
  cut removed, and every entry after them is grouped and encoded afresh from the working copy
  (:meth:`Residual.relaid`): those were read back from their codes, so they are quantized a second time, in
  shifted groups. Compression at prefill, the common case, evicts before anything is encoded, so the kept entries
  are encoded once, from full precision; an after-prefill stage's prompt waits for it unencoded, for the same end.

A codec that ``fits`` (ThinK) chooses its parameters for every run once, in the first pass that holds a real token
of every sequence (the prompt's, or its first chunk's): the layer fits them from its working copy and the pass's
queries (:meth:`Residual.with_fitted`), and the parameters (``fitted``, ``[runs, ...]``) stay with the layer from
then on; each group is encoded and decoded with its run's row of them.

A :class:`Residual` is never changed in place: every change builds a new one, so a state saved by an after-prefill
probe stays valid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

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
    fitted: dict[str, torch.Tensor] = field(default_factory=dict)
    """A fitting codec's parameters, ``[runs, ...]`` (empty until it first encodes, and for other codecs)."""

    @classmethod
    def empty(cls, codec: GroupedCodec, runs: int, like: torch.Tensor) -> Residual:
        """No entries yet, in ``runs`` runs, for keys like ``like`` (``[..., head_dim]``)."""
        none = like.new_zeros(0, codec.group, like.shape[-1])
        nothing = Counts.same(0, runs)
        fitted = codec.fit(none, none[..., 0].bool(), none[:, None]) if codec.fits else {}  # shapes only: no runs
        empty = {name: t[:0] for name, t in fitted.items()}
        return cls(codec, nothing, nothing, codec.encode(none, none, empty), none[:, 0], none[:, 0])

    def relaid(self, keys: torch.Tensor, values: torch.Tensor, lengths: Counts, intact: Counts,
               fit: Callable[[], dict[str, torch.Tensor]]) -> Residual:
        """This store once its runs were re-laid (an eviction): ``keys`` and ``values`` are the working copy
        (``[sum(lengths), head_dim]``, runs of ``lengths``), of whose runs the first ``intact[r]`` entries are this
        store's first ones, untouched. The groups among them are kept as they are; every entry after them is
        grouped afresh, so an eviction encodes again only what its cut shifted."""
        group = self.codec.group
        kept_groups = self.encoded.minimum(intact).over(group)  # whole groups the cut left in place
        kept = kept_groups.times(group)
        rest = lengths.minus(kept)
        fresh = rest.whole_groups(group, self.codec.residual)
        after, tails = kept.plus(fresh), rest.minus(fresh)
        fitted = self._fitted(fresh, fit)
        nothing = Counts.same(0, len(lengths.host))
        old = {name: take(t, self.encoded.over(group), nothing, kept_groups) for name, t in self.groups.items()}
        new = self._encoded(take(keys, lengths, kept, fresh), take(values, lengths, kept, fresh),
                            _rows(fitted, fresh.over(group)))
        groups = {name: merge(t, kept_groups, new[name], fresh.over(group)) for name, t in old.items()}
        return Residual(self.codec, after, tails, groups, take(keys, lengths, after, tails),
                        take(values, lengths, after, tails), fitted)

    def extended(self, keys: torch.Tensor, values: torch.Tensor, lengths: Counts,
                 fit: Callable[[], dict[str, torch.Tensor]]) -> Residual:
        """This store once its runs grew at their ends to ``lengths``: ``keys`` and ``values`` are the working copy
        (``[sum(lengths), head_dim]``), whose first ``encoded[r]`` entries of each run are the ones already encoded
        here. Only whole groups the full-precision part now holds beyond the residual are encoded."""
        held = lengths.minus(self.encoded)  # each run's entries not yet encoded
        fresh = held.whole_groups(self.codec.group, self.codec.residual)
        if not any(fresh.host):
            return dataclasses.replace(self, tails=held, tail_keys=take(keys, lengths, self.encoded, held),
                                       tail_values=take(values, lengths, self.encoded, held))
        fitted = self._fitted(fresh, fit)
        after, tails = self.encoded.plus(fresh), held.minus(fresh)
        old_counts, new_counts = self.encoded.over(self.codec.group), fresh.over(self.codec.group)
        new_groups = self._encoded(take(keys, lengths, self.encoded, fresh), take(values, lengths, self.encoded, fresh),
                                   _rows(fitted, new_counts))
        groups = {name: merge(t, old_counts, new_groups[name], new_counts) for name, t in self.groups.items()}
        return Residual(self.codec, after, tails, groups, take(keys, lengths, after, tails),
                        take(values, lengths, after, tails), fitted)

    def without_first(self, groups: Counts) -> Residual:
        """This store without each run's ``groups[r]`` oldest groups (slid out of a window whole): the groups after
        them stay encoded as they were. The full-precision part is left as it is; the pass that slid the window
        takes it from its working copy when it settles."""
        held = self.encoded.over(self.codec.group)
        left = held.minus(groups)
        kept = {name: take(t, held, groups, left) for name, t in self.groups.items()}
        return dataclasses.replace(self, encoded=left.times(self.codec.group), groups=kept)

    def held(self, keys: torch.Tensor, values: torch.Tensor, lengths: Counts) -> Residual:
        """Every entry of ``keys`` and ``values`` (``[sum(lengths), head_dim]``, runs of ``lengths``) held as
        computed, for a pass that cannot encode yet: a batch whose shortest prompt has not begun (its groups and a
        fitting codec's parameters would not be its own), or a prompt an after-prefill stage has yet to choose from.
        Only before anything was encoded."""
        return dataclasses.replace(self, tails=lengths, tail_keys=keys, tail_values=values)

    def with_fitted(self, fitted: dict[str, torch.Tensor]) -> Residual:
        """This store with a fitting codec's parameters, ``[runs, ...]``."""
        return dataclasses.replace(self, fitted=fitted)

    def _fitted(self, encoding: Counts, fit: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The parameters to encode ``encoding`` entries per run with: this store's, or ``fit()``'s for a fitting
        codec that must encode before a pass fitted it (which ``fit`` refuses, naming the fix)."""
        if self.fitted or not self.codec.fits or not any(encoding.host):
            return self.fitted
        return fit()

    def _encoded(self, keys: torch.Tensor, values: torch.Tensor,
                 fitted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The codec's groups of ``keys`` and ``values`` (``[entries, head_dim]``, whole groups of one run each)."""
        if not keys.shape[0]:  # nothing to encode (a fitting codec may not be fitted yet): no groups, same tensors
            return {name: t.new_empty(0, *t.shape[1:]) for name, t in self.groups.items()}  # a view would hold t
        shape = (-1, self.codec.group, keys.shape[-1])
        return self.codec.encode(keys.view(shape), values.view(shape), fitted)

    def decoded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[entries, head_dim]`` in run order, each run's encoded entries decoded and then its
        full-precision ones."""
        head_dim = self.tail_keys.shape[-1]
        if not any(self.encoded.host):
            return self.tail_keys.to(dtype), self.tail_values.to(dtype)
        keys, values = self.codec.decode(self.groups, dtype, _rows(self.fitted, self.encoded.over(self.codec.group)))
        return (merge(keys.reshape(-1, head_dim), self.encoded, self.tail_keys.to(dtype), self.tails),
                merge(values.reshape(-1, head_dim), self.encoded, self.tail_values.to(dtype), self.tails))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held for the entries: what the layer's resident bytes are read from (the fitted parameters,
        per run, are the layer's auxiliary bytes)."""
        return [*self.groups.values(), self.tail_keys, self.tail_values]


def _rows(fitted: dict[str, torch.Tensor], groups: Counts) -> dict[str, torch.Tensor]:
    """Each group's row of its run's parameters, for ``groups[r]`` groups of each run ``r`` in run order."""
    if not fitted:
        return {}
    if groups.uniform:
        count = groups.host[0] if groups.host else 0
        return {name: t.repeat_interleave(count, dim=0) for name, t in fitted.items()}
    some = next(iter(fitted.values()))
    run_of = torch.arange(len(groups.host), device=some.device).repeat_interleave(
        groups.on(some.device), output_size=sum(groups.host))
    return {name: t.index_select(0, run_of) for name, t in fitted.items()}
