"""How sure a score is, and whether two scores differ: intervals and paired tests over a cell's samples.

Why here and not in lm-eval: lm-eval's standard error needs ``bootstrap_iters > 0``, which for some aggregations
starts a process pool per task (unwelcome in a sweep worker), and it is a number, not an interval or a test. A
record keeps each sample's outcome instead (:class:`kvpolicies.experiments.results.Outcomes`), and a page computes
from them what it shows:

- an interval on a score: Wilson's for an accuracy (every outcome 0 or 1: exact matches, passkeys), which stays
  inside [0, 1] and is honest at 10 samples and at 0 or 100%; else a percentile bootstrap over samples (RULER's
  partial credit, perplexities). For a mean of accuracies over tasks, the tasks' Wilson intervals combined by
  MOVER (Zou & Donner 2008): a bootstrap there collapses to a point where each task's few samples agree (3 of 3
  right, 0 of 3 right), which says nothing about how sure the mean is;
- a test on a difference between two cells over the samples they share (same task, same docs): exact McNemar for
  accuracies (only the samples where the two disagree count), else a paired swap test (:func:`swap_p_value`)
  with a paired bootstrap interval on the difference; a mean over tasks is tested the same way, its pairs swapped
  within their task.

Everything is deterministic (a fixed seed per call), so a page regenerated from the same files is the same page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kvpolicies.experiments.outcomes import Statistic, score_of

if TYPE_CHECKING:
    from kvpolicies.experiments.results import Outcomes

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
SIGNIFICANT = 0.05
"""The p-value below which a page calls a difference real."""
EXACT_SWAPS_UP_TO = 16
"""Pairs up to which a swap test enumerates every way of swapping them (65,536 at 16)."""
SWAPS = 10_000
"""Ways of swapping drawn at random beyond that."""


@dataclass(frozen=True)
class Interval:
    """A score with its ``LEVEL`` interval, over ``n`` samples, and how it was computed."""

    score: float
    low: float
    high: float
    n: int
    method: Literal["wilson", "mover-wilson", "bootstrap"]

    def text(self, digits: int = 3) -> str:
        return f"{self.score:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def is_binary(values: Sequence[float]) -> bool:
    return all(value in (0.0, 1.0) for value in values)


def interval_of(outcomes: Outcomes | None) -> Interval | None:
    """:func:`interval` of a record's kept outcomes (None where the record kept none)."""
    return None if outcomes is None else interval(outcomes.statistic, outcomes.values, outcomes.weights)


def interval(statistic: Statistic, values: Sequence[float], weights: Sequence[float] | None = None,
             level: float = LEVEL) -> Interval | None:
    """The score of the samples and its interval (None without samples)."""
    n = len(values)
    if not n:
        return None
    score = score_of(statistic, values, weights)
    if statistic == "mean" and is_binary(values):
        low, high = wilson(sum(values), n, level)  # contains the score, up to rounding at 0 and 1
        return Interval(score, min(low, score), max(high, score), n, "wilson")
    draws = _scores(statistic, [_array(values)], [_array(weights)], _picks([n]))
    low, high = _percentiles(draws, level)
    return Interval(score, min(low, score), max(high, score), n, "bootstrap")


def wilson(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval for ``successes`` out of ``n``."""
    z = _z(level)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Comparison:
    """Cell A against cell B over the samples both ran: the difference of their scores (A − B), its interval, the
    p-value of no difference, and the test that gave it."""

    difference: float
    low: float
    high: float
    p_value: float
    n: int
    method: Literal["mcnemar", "paired swap test"]
    a_only: int = 0
    """McNemar: samples A got right and B wrong."""
    b_only: int = 0

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANT

    def text(self, digits: int = 3) -> str:
        verdict = "significant" if self.significant else "not significant"
        return (f"{self.difference:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}], p = "
                f"{p_text(self.p_value)} ({self.method}, n = {self.n}): {verdict}")


def compare(statistic: Statistic, a: dict[int, tuple[float, float | None]], b: dict[int, tuple[float, float | None]],
            level: float = LEVEL) -> Comparison | None:
    """Paired comparison of two cells' outcomes by sample id (``{doc_id: (value, weight or None)}``), over the ids
    both have; None if they share none."""
    common = sorted(a.keys() & b.keys())
    if not common:
        return None
    values_a, values_b = [a[i][0] for i in common], [b[i][0] for i in common]
    n = len(common)
    if statistic == "mean" and is_binary(values_a) and is_binary(values_b):
        pairs = list(zip(values_a, values_b))
        table = tuple(sum(1 for pair in pairs if pair == cell) for cell in ((1, 1), (1, 0), (0, 1), (0, 0)))
        a_only, b_only = table[1], table[2]
        low, high = newcombe(table, level)
        return Comparison((a_only - b_only) / n, low, high, mcnemar(a_only, b_only), n, "mcnemar", a_only, b_only)
    weights_a = [a[i][1] for i in common] if statistic != "mean" else None
    weights_b = [b[i][1] for i in common] if statistic != "mean" else None
    difference = score_of(statistic, values_a, weights_a) - score_of(statistic, values_b, weights_b)
    return _paired_comparison(statistic, [(values_a, weights_a, values_b, weights_b)], difference, n, level)


def pooled(statistic: Statistic, groups: Sequence[tuple[Sequence[float], Sequence[float] | None]],
           level: float = LEVEL) -> Interval | None:
    """The mean over groups (a suite's tasks) of each group's score, and its interval, every task with its weight
    of one: for accuracies, the groups' Wilson intervals combined (:func:`mover_wilson`); else a bootstrap that
    resamples each group's samples apart (stratified)."""
    if not groups or not all(len(values) for values, _ in groups):
        return None
    score = math.fsum(score_of(statistic, values, weights) for values, weights in groups) / len(groups)
    samples = sum(len(values) for values, _ in groups)
    if statistic == "mean" and all(is_binary(values) for values, _ in groups):
        low, high = mover_wilson([(sum(values), len(values)) for values, _ in groups], level)
        return Interval(score, min(low, score), max(high, score), samples, "mover-wilson")
    picks = _picks([len(values) for values, _ in groups])
    draws = _scores(statistic, [_array(v) for v, _ in groups], [_array(w) for _, w in groups], picks)
    low, high = _percentiles(draws, level)
    return Interval(score, min(low, score), max(high, score), samples, "bootstrap")


def mover_wilson(groups: Sequence[tuple[float, int]], level: float = LEVEL) -> tuple[float, float]:
    """An interval on the mean of independent proportions (``(successes, n)`` per group): each group's Wilson
    interval, its distances from the group's proportion combined in quadrature (MOVER, Zou & Donner 2008). Never
    a point: a group of 3 right out of 3 still spans [0.44, 1]."""
    k = len(groups)
    shares = [successes / n for successes, n in groups]
    bounds = [wilson(successes, n, level) for successes, n in groups]
    mean = math.fsum(shares) / k
    below = math.sqrt(math.fsum((p - low) ** 2 for p, (low, _) in zip(shares, bounds))) / k
    above = math.sqrt(math.fsum((high - p) ** 2 for p, (_, high) in zip(shares, bounds))) / k
    return max(0.0, mean - below), min(1.0, mean + above)


def compare_pooled(statistic: Statistic, pairs: Sequence[tuple[dict, dict]], level: float = LEVEL
                   ) -> Comparison | None:
    """Paired comparison of two mean-over-groups scores (:func:`pooled`), group by group over the sample ids both
    sides have (``{doc_id: (value, weight or None)}`` per side and group): a paired swap test and bootstrap, both
    stratified by group. None if a group has no sample in common."""
    groups = []
    for a, b in pairs:
        common = sorted(a.keys() & b.keys())
        if not common:
            return None
        weighted = statistic != "mean"
        groups.append(([a[i][0] for i in common], [a[i][1] for i in common] if weighted else None,
                       [b[i][0] for i in common], [b[i][1] for i in common] if weighted else None))
    if not groups:
        return None
    difference = math.fsum(score_of(statistic, va, wa) - score_of(statistic, vb, wb)
                           for va, wa, vb, wb in groups) / len(groups)
    return _paired_comparison(statistic, groups, difference, sum(len(g[0]) for g in groups), level)


def _paired_comparison(statistic: Statistic, groups, difference: float, n: int, level: float) -> Comparison:
    """The difference of the mean over ``groups`` of A's score minus B's: its interval from a paired bootstrap
    (each group's samples resampled apart, the same picks for both sides), its p-value from a paired swap test
    (:func:`swap_p_value`)."""
    picks = _picks([len(group[0]) for group in groups])
    draws = (_scores(statistic, [_array(g[0]) for g in groups], [_array(g[1]) for g in groups], picks)
             - _scores(statistic, [_array(g[2]) for g in groups], [_array(g[3]) for g in groups], picks))
    low, high = _percentiles(draws, level)
    p_value = 1.0 if difference == 0 else swap_p_value(statistic, groups)
    return Comparison(difference, min(low, difference), max(high, difference), p_value, n, "paired swap test")


def swap_p_value(statistic: Statistic, groups) -> float:
    """Two-sided p-value of a paired swap (randomisation) test of the mean over ``groups`` of A's score minus B's
    (each group ``(values_a, weights_a, values_b, weights_b)``, paired by position).

    Under "no difference", which of a pair's two outcomes came from A is a coin flip: the observed difference is
    set among the differences of every way of swapping pairs (all ``2**n`` up to ``EXACT_SWAPS_UP_TO`` pairs,
    else ``SWAPS`` drawn at random, seeded, the observed one counted once), each group's pairs swapped within it.
    Why not the bootstrap's own tail: over a handful of samples a bootstrap has almost no resamples (2 documents
    that agree resample to a difference that never changes sign, p = 0), while a pair that scores the same on both
    sides swaps to itself, so only the ``n`` pairs that differ count here (and only they are swapped): 2 documents
    give p ≥ 0.5, and with 5 pairs or fewer that differ nothing passes at 0.05, however large the gap. The observed
    difference is computed as the swapped ones are, so rounding never ranks it below its own mirror image."""
    import numpy as np

    arrays = []
    for values_a, weights_a, values_b, weights_b in groups:
        va, vb = _array(values_a), _array(values_b)
        wa = _array(weights_a) if weights_a is not None else np.zeros_like(va)
        wb = _array(weights_b) if weights_b is not None else np.zeros_like(vb)
        differs = (va != vb) | (wa != wb)
        arrays.append((va, vb, wa, wb, differs))
    n = sum(int(differs.sum()) for *_, differs in arrays)
    if n == 0:
        return 1.0
    if n <= EXACT_SWAPS_UP_TO:  # row 0 swaps nothing: the observed difference
        swapped = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.int8)
    else:
        drawn = np.random.default_rng(SEED).integers(0, 2, size=(SWAPS, n), dtype=np.int8)
        swapped = np.vstack([np.zeros((1, n), dtype=np.int8), drawn])
    total = 0.0
    start = 0
    for va, vb, wa, wb, differs in arrays:
        stop = start + int(differs.sum())
        flips = swapped[:, start:stop].astype(np.float64)
        start = stop
        moved = flips @ (vb - va)[differs]  # what swapping moves from B's side to A's, per way of swapping
        if statistic == "mean":
            total = total + (2 * moved + va.sum() - vb.sum()) / len(va)
            continue
        weight_moved = flips @ (wb - wa)[differs]
        rate_a = (va.sum() + moved) / (wa.sum() + weight_moved)
        rate_b = (vb.sum() - moved) / (wb.sum() - weight_moved)
        if statistic == "weighted_perplexity":
            total = total + np.exp(-rate_a) - np.exp(-rate_b)
        else:
            total = total + (rate_b - rate_a) / math.log(2)
    found = np.abs(total / len(groups))
    return float((found >= found[0] * (1 - 1e-9)).mean())


def mcnemar(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value: the discordant samples split as a fair coin would split them."""
    discordant = a_only + b_only
    if not discordant:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(a_only, b_only) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def newcombe(table: tuple[int, int, int, int], level: float = LEVEL) -> tuple[float, float]:
    """Newcombe's interval for the difference of two paired proportions, from the 2×2 table ``(both right, only A
    right, only B right, both wrong)``: Wilson intervals of the two proportions, combined with the correlation of
    the pairs, continuity-adjusted where it is positive (the φ* Newcombe gives with his method 10; with the plain φ,
    a table with no discordant sample has φ = 1 and an interval of zero width). It stays within [-1, 1] and keeps a width at 0
    discordant samples, where a bootstrap would collapse to a point."""
    both, a_only, b_only, neither = table
    n = sum(table)
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    low1, high1 = wilson(both + a_only, n, level)
    low2, high2 = wilson(both + b_only, n, level)
    spread = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    agreement = both * neither - a_only * b_only
    if agreement > 0:
        agreement = max(agreement - n / 2, 0.0)
    phi = agreement / math.sqrt(spread) if spread else 0.0
    difference = p1 - p2
    low = difference - math.sqrt(max(0.0, (p1 - low1) ** 2 - 2 * phi * (p1 - low1) * (high2 - p2) + (high2 - p2) ** 2))
    high = difference + math.sqrt(max(0.0, (high1 - p1) ** 2 - 2 * phi * (high1 - p1) * (p2 - low2) + (p2 - low2) ** 2))
    return max(-1.0, low), min(1.0, high)


def _array(values: Sequence[float] | None):
    import numpy as np

    return None if values is None else np.asarray(values, dtype=np.float64)


def _picks(sizes: list[int]):
    """``RESAMPLES`` draws with replacement of each group's sample indices: ``[resamples, size]`` per group, from
    one seeded generator (a page regenerated from the same files draws the same)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    return [rng.integers(0, size, size=(RESAMPLES, size)) for size in sizes]


def _scores(statistic: Statistic, values: list, weights: list, picks: list):
    """Each resample's mean over groups of the group's score, ``[resamples]``."""
    total = 0.0
    for group_values, group_weights, chosen in zip(values, weights, picks):
        if statistic == "mean":
            total = total + group_values[chosen].mean(axis=1)
            continue
        import numpy as np

        rate = group_values[chosen].sum(axis=1) / group_weights[chosen].sum(axis=1)
        total = total + (np.exp(-rate) if statistic == "weighted_perplexity" else -rate / math.log(2))
    return total / len(values)


def _percentiles(draws, level: float) -> tuple[float, float]:
    import numpy as np

    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def _z(level: float) -> float:
    """The standard normal quantile for a two-sided ``level`` (1.96 at 95%)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def p_text(value: float) -> str:
    """A p-value as pages print it."""
    return "< 0.001" if value < 0.001 else f"{value:.3f}"
