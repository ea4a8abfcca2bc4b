"""Pieces of packed runs: each run's rows from one point on, and two sets of runs merged run by run.

Why a module of its own: a packed layer holds each (sequence, KV head) pair's entries as one run after another,
with the run lengths as Python ints and, in step with them, as a device tensor (see
:mod:`kvpolicies.engine.storage`). Storage that splits each run in two (a grouped codec's encoded entries and its
full-precision newest ones, :mod:`kvpolicies.engine.residual`) cuts and joins runs at every forward pass. Counts
here travel the same way (:class:`Counts`): the host decides sizes and whether every run has one shape (then the
cut is views and one copy), and ragged runs are indexed on the device from the device counts, so nothing is read
back and nothing is uploaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Counts:
    """One count per run, as the host knows it (``host``) and as the device holds it (``device``, ``[runs]``
    long), computed alike on both sides so neither is ever copied to the other. ``device`` may be None while
    every run has the same count: it is then made on the device when first needed."""

    host: tuple[int, ...]
    device: torch.Tensor | None = None

    @classmethod
    def same(cls, count: int, runs: int) -> Counts:
        """``count`` for each of ``runs`` runs (its device tensor made only if a ragged neighbour needs it)."""
        return cls((count,) * runs)

    @property
    def uniform(self) -> bool:
        """Every run has the same count: cuts and joins are views."""
        return len(set(self.host)) <= 1

    def on(self, device: torch.device) -> torch.Tensor:
        """The counts on ``device``: the tensor held, or one filled with the common count (a launch, no upload)."""
        if self.device is not None:
            return self.device
        if not self.uniform:
            raise ValueError("ragged counts must come with their device tensor (building one would upload it)")
        count = self.host[0] if self.host else 0
        return torch.full((len(self.host),), count, dtype=torch.long, device=device)

    def minus(self, other: Counts) -> Counts:
        """Run by run, this count less ``other``'s."""
        return self._combined(other, lambda a, b: a - b)

    def plus(self, other: Counts) -> Counts:
        """Run by run, this count and ``other``'s."""
        return self._combined(other, lambda a, b: a + b)

    def whole_groups(self, group: int, leave: int) -> Counts:
        """Of each run's count, the whole groups of ``group`` once ``leave`` are left out."""
        host = tuple(max(n - leave, 0) // group * group for n in self.host)
        device = None if self.device is None else (self.device - leave).clamp(min=0) // group * group
        return Counts(host, device)

    def minimum(self, other: Counts) -> Counts:
        """Run by run, the smaller of this count and ``other``'s."""
        return self._combined(other, lambda a, b: torch.minimum(a, b) if isinstance(a, torch.Tensor) else min(a, b))

    def times(self, factor: int) -> Counts:
        """Each count times ``factor`` (groups to entries)."""
        return Counts(tuple(n * factor for n in self.host), None if self.device is None else self.device * factor)

    def over(self, group: int) -> Counts:
        """Each count divided by ``group`` (whole groups to groups)."""
        return Counts(tuple(n // group for n in self.host), None if self.device is None else self.device // group)

    def _combined(self, other: Counts, op: Callable) -> Counts:
        host = tuple(op(a, b) for a, b in zip(self.host, other.host))
        if self.device is None and other.device is None:
            return Counts(host)
        device = self.device if self.device is not None else other.device
        return Counts(host, op(self.on(device.device), other.on(device.device)))


def spans(lengths: Counts, starts: Counts, counts: Counts, device: torch.device) -> torch.Tensor:
    """Row indices, in a tensor holding runs of ``lengths`` one after another, of ``counts[r]`` rows of run ``r``
    from its row ``starts[r]``, run after run; computed on the device, in a size the host knows."""
    total = sum(counts.host)
    sizes, runs = counts.on(device), lengths.on(device)
    shift = runs.cumsum(0) - runs + starts.on(device) - (sizes.cumsum(0) - sizes)
    run_of = torch.arange(len(counts.host), device=device).repeat_interleave(sizes, output_size=total)
    return shift.index_select(0, run_of) + torch.arange(total, device=device)


def take(rows: torch.Tensor, lengths: Counts, starts: Counts, counts: Counts) -> torch.Tensor:
    """``rows`` (``[sum(lengths), ...]``, runs of ``lengths``) cut to ``counts[r]`` rows of each run ``r`` from its row
    ``starts[r]``, run after run: a new tensor, never a view that would keep ``rows`` alive."""
    if lengths.uniform and starts.uniform and counts.uniform and lengths.host:
        first, count = starts.host[0], counts.host[0]
        runs = rows.view(len(lengths.host), lengths.host[0], *rows.shape[1:])
        return runs[:, first : first + count].clone().view(-1, *rows.shape[1:])  # one copy, contiguous
    return rows.index_select(0, spans(lengths, starts, counts, rows.device))


def merge(first: torch.Tensor, first_counts: Counts, then: torch.Tensor, then_counts: Counts) -> torch.Tensor:
    """Runs of ``first`` (``first_counts[r]`` rows each) each followed by the same run of ``then``: run ``r`` of the
    result is ``first``'s run ``r`` and then ``then``'s run ``r``."""
    rest = first.shape[1:]
    runs = len(first_counts.host)
    if first_counts.uniform and then_counts.uniform and runs:
        return torch.cat([first.reshape(runs, first_counts.host[0], *rest),
                          then.reshape(runs, then_counts.host[0], *rest)], dim=1).view(-1, *rest)
    lengths = first_counts.plus(then_counts)
    merged = first.new_empty(sum(lengths.host), *rest)
    none = Counts.same(0, runs)
    merged.index_copy_(0, spans(lengths, none, first_counts, first.device), first)
    return merged.index_copy_(0, spans(lengths, first_counts, then_counts, first.device), then)
