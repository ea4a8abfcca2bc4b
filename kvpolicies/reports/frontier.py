"""The eviction-versus-precision frontier: each cell's score against the bytes its cache really held.

One budget in bytes buys fewer entries at full precision (eviction), every entry at lower precision (quantization),
or some of each; "more tokens, lower precision" (EMNLP 2025 Findings) says the last two win at equal memory. This
page lets a results folder (the frontier preset's) answer that for its model, per task and protocol:

- **where a point sits**: the resident bytes its cache held, as a share of the full cache's
  (``kv_memory.resident_fraction_mean``), never its nominal budget: a codec whose entries do not fill a budget holds
  less than it, and the question's and answer's entries, kept whole, add to every cell;
- **its shape**, from its codec and what it held (:func:`shape_of`): the full cache; eviction only (full
  precision); quantization only (a lossy codec that kept every entry); eviction × quantization (a lossy codec that
  let entries go). A record says what share of the entries its cache kept (``kv_memory.kept_fraction_mean``);
  records written before it said so are read from the cells of the same codec: one that held fewer bytes than
  another of its codec let entries go; one that held the most did not if another budget held as much (the budget no
  longer mattered) or it fell clearly short of its own budget (nothing more to keep). Any codec but ``full`` counts
  as lower precision (ThinK's pruned key channels too);
- **the Pareto front**: a point is dominated when another holds at most its bytes with a strictly better score, or
  the same score in strictly fewer bytes; every point nothing dominates is on the front, so equal points (same bytes,
  same score) are on it or off it together. The front is drawn through point estimates: a point off it may not be
  told apart from one on it, which is what the paired tests are for;
- **per budget**, the best point of each shape (best score, then fewer bytes, then name) and one paired test over
  the samples both ran (exact McNemar for an accuracy, a paired swap test otherwise): the best quantized point
  (either quantized shape) against the best eviction-only one. Both spent one budget; a quantization-only point may
  have spent less of it, and its bytes are shown beside it. One test per budget and no correction for the several:
  a p-value near 0.05 among many is weak evidence.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvpolicies.experiments.results import Outcomes, ResultRecord
from kvpolicies.integrations.protocol import Protocol
from kvpolicies.reports.figures import plots_folder, pyplot, save
from kvpolicies.reports.leaderboard import escaped, failed_cells, provenance_parts, ranks, section
from kvpolicies.reports.points import shown
from kvpolicies.reports.statistics import Comparison, Interval, compare, interval_of, p_text
from kvpolicies.reports.suite import Table, short

REFERENCE = "full cache"
EVICTION = "eviction only"
QUANTIZATION = "quantization only"
BOTH = "eviction × quantization"
SHAPES = (EVICTION, QUANTIZATION, BOTH, REFERENCE)
QUANTIZED = (QUANTIZATION, BOTH)
FULL_PRECISION = "full"
"""The codec that stores entries as computed; any other stores them at lower precision."""
FILLED = 0.98
"""A cell of a lossy codec that held less than this share of its budget had nothing more to keep: allocation
rounds a budget down by a few entries at most, while a codec whose entries fit keeps all of them."""
EVERY_ENTRY = 0.999
"""A kept share of the entries at or above which nothing was evicted (the share counts entries, so it is 1.0)."""
SAME_BYTES = 0.01
"""Relative difference under which two cells of one codec held the same bytes (answers of other lengths move the
bytes a little; a cell that let entries go holds visibly less)."""
PROTOCOLS = (Protocol.QUERY_AGNOSTIC, Protocol.QUERY_AWARE)



@dataclass(frozen=True)
class Point:
    """One finished cell placed on the frontier (``budget`` None: the full cache)."""

    model: str
    task: str
    protocol: Protocol
    policy: str
    """As the leaderboard names it, codec included: ``keydiff + int4``."""
    codec: str
    budget: float | None
    kept: float
    """Resident bytes as a share of the full cache's, measured."""
    score: float
    higher_is_better: bool
    metric: str
    samples: int
    outcomes: Outcomes | None = None
    shape: str = ""
    entries: float | None = None
    """Entries kept as a share of the full cache's, where the record says (``kv_memory.kept_fraction_mean``)."""

    @property
    def interval(self) -> Interval | None:
        return interval_of(self.outcomes)

    def score_text(self) -> str:
        """The score with its 95% interval, or saying why there is none."""
        found = self.interval
        return f"{self.score:.3f} (samples not kept: no interval)" if found is None else found.text()


@dataclass(frozen=True)
class Panel:
    """The points of one model, task and protocol, fewest bytes first, the full cache among them."""

    model: str
    task: str
    protocol: Protocol
    points: list[Point]
    front: list[bool]
    """Per point, whether it is on the Pareto front."""

    @property
    def budgets(self) -> list[float]:
        return sorted({p.budget for p in self.points if p.budget is not None}, reverse=True)

    @property
    def reference(self) -> Point | None:
        return next((p for p in self.points if p.shape == REFERENCE), None)


@dataclass(frozen=True)
class Duel:
    """One budget of a panel: the best point of each shape, and the test of the best quantized one against the best
    eviction-only one."""

    budget: float
    best: dict[str, Point]
    quantized: Point | None
    test: Comparison | None


def kept_fraction(record: ResultRecord) -> float | None:
    """The share of the full cache's bytes the record's cache held (None where it counted neither)."""
    memory = record.kv_memory
    if memory is None:
        return None
    if memory.resident_fraction_mean is not None:
        return memory.resident_fraction_mean
    if memory.resident_bytes_mean is not None and memory.full_bytes_mean:
        return memory.resident_bytes_mean / memory.full_bytes_mean
    return None


def collect(records: Sequence[ResultRecord]) -> tuple[list[Point], list[str]]:
    """The finished cells of ``records`` as points, each as last measured and named as the leaderboard names it, with
    their shapes; and a note for each cell that cannot be placed (a budget that is no fraction of the cache, no
    measured bytes)."""
    found, notes = [], []
    for item in shown(records):
        record = item.record
        if record.status != "ok":
            continue
        budget = record.identity.budget
        if budget is not None and budget.unit != "fraction":
            notes.append(f"{item.task} / {item.title}: budget {budget} is no fraction of the cache; left out")
            continue
        kept = kept_fraction(record)
        if kept is None:
            notes.append(f"{item.task} / {item.title}: its record counts no resident bytes; left out")
            continue
        found.append(Point(
            model=record.identity.model, task=item.task, protocol=record.cell.protocol, policy=item.policy,
            codec=record.cell.policy.codec, budget=None if budget is None else budget.value, kept=kept,
            score=record.score, higher_is_better=bool(record.higher_is_better), metric=record.primary_metric,
            samples=record.samples, outcomes=record.outcomes, entries=record.kv_memory.kept_fraction_mean,
        ))
    return classified(found), notes


def classified(found: list[Point]) -> list[Point]:
    """``found`` with each point's shape, judged among the points of its model, task, protocol and codec."""
    peers: dict[tuple, list[Point]] = defaultdict(list)
    for p in found:
        peers[_codec_group(p)].append(p)
    return [replace(p, shape=shape_of(p, peers[_codec_group(p)])) for p in found]


def _codec_group(p: Point) -> tuple:
    return p.model, p.task, p.protocol, p.codec, p.budget is None


def shape_of(point: Point, peers: Sequence[Point]) -> str:
    """The shape of ``point``, given the points of its model, task, protocol and codec (itself included).

    A lossy codec's point is quantization alone where its record says it kept every entry. Records written before
    they said so are judged by their bytes: it kept every entry if no peer held more bytes, and either a peer at
    another budget held as many (the budget did not bind) or it held clearly less than its own budget
    (:data:`FILLED`)."""
    if point.budget is None:
        return REFERENCE
    if point.codec == FULL_PRECISION:
        return EVICTION
    if point.entries is not None:
        return QUANTIZATION if point.entries >= EVERY_ENTRY else BOTH
    most = max(peer.kept for peer in peers)
    if not _same_bytes(point.kept, most, SAME_BYTES):
        return BOTH
    saturated = any(peer.budget != point.budget and _same_bytes(peer.kept, point.kept, SAME_BYTES) for peer in peers)
    return QUANTIZATION if saturated or point.kept < FILLED * point.budget else BOTH


def _same_bytes(a: float, b: float, tolerance: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=tolerance)


def _same_score(a: Point, b: Point) -> bool:
    return math.isclose(a.score, b.score, rel_tol=1e-9, abs_tol=1e-12)


def _better(a: Point, b: Point) -> bool:
    """Whether ``a`` scores strictly better than ``b`` (higher, or lower for a perplexity)."""
    if _same_score(a, b):
        return False
    return a.score > b.score if a.higher_is_better else a.score < b.score


def dominates(a: Point, b: Point) -> bool:
    """Whether ``a`` beats ``b`` on the frontier: at most its bytes with a strictly better score, or the same score in
    strictly fewer bytes."""
    if _better(a, b):
        return a.kept < b.kept or _same_bytes(a.kept, b.kept)
    return _same_score(a, b) and a.kept < b.kept and not _same_bytes(a.kept, b.kept)


def on_front(found: Sequence[Point]) -> list[bool]:
    """Per point, whether no other point of ``found`` dominates it."""
    return [not any(dominates(other, p) for other in found if other is not p) for p in found]


def _order(p: Point) -> tuple:
    """Fewest bytes first; among equal bytes, the best score first, then by name and budget (the full cache last)."""
    return p.kept, -p.score if p.higher_is_better else p.score, p.policy, 2.0 if p.budget is None else p.budget


def panels(records: Sequence[ResultRecord]) -> tuple[list[Panel], list[str]]:
    """One panel per model, task and protocol that has compressed points, the task's full cache in each; and the
    notes of :func:`collect`."""
    found, notes = collect(records)
    references: dict[tuple[str, str], list[Point]] = defaultdict(list)
    compressed: dict[tuple[str, str, Protocol], list[Point]] = defaultdict(list)
    for p in found:
        if p.shape == REFERENCE:
            references[(p.model, p.task)].append(p)
        else:
            compressed[(p.model, p.task, p.protocol)].append(p)
    made = []
    for (model, task, protocol), members in sorted(compressed.items(),
                                                   key=lambda item: (*item[0][:2], PROTOCOLS.index(item[0][2]))):
        candidates = references.get((model, task), [])
        reference = next((p for p in candidates if p.protocol is protocol), candidates[0] if candidates else None)
        placed = sorted(members + ([reference] if reference else []), key=_order)
        made.append(Panel(model, task, protocol, placed, on_front(placed)))
    return made, notes


def best(found: Sequence[Point], shapes: Sequence[str]) -> Point | None:
    """The best-scoring point of ``shapes`` in ``found``; among equal scores the one that held fewer bytes, then by
    name."""
    candidates = [p for p in found if p.shape in shapes]
    if not candidates:
        return None
    return min(candidates, key=lambda p: (-p.score if p.higher_is_better else p.score, p.kept, p.policy))


def paired(a: Point, b: Point) -> Comparison | None:
    """``a`` against ``b`` over the samples both ran, where both kept their samples' outcomes of one statistic."""
    if a.outcomes is None or b.outcomes is None or a.outcomes.statistic != b.outcomes.statistic:
        return None
    return compare(a.outcomes.statistic, a.outcomes.by_doc(), b.outcomes.by_doc())


def duels(panel: Panel) -> list[Duel]:
    """Per budget of ``panel``, largest first: the best of each shape and the test of quantized against eviction."""
    made = []
    for budget in panel.budgets:
        here = [p for p in panel.points if p.budget == budget]
        chosen = {shape: p for shape in (EVICTION, QUANTIZATION, BOTH) if (p := best(here, [shape])) is not None}
        quantized = best(here, QUANTIZED)
        test = paired(quantized, chosen[EVICTION]) if quantized is not None and EVICTION in chosen else None
        made.append(Duel(budget, chosen, quantized, test))
    return made


def winner(test: Comparison, higher_is_better: bool) -> str | None:
    """Which side a test of best quantized minus best eviction-only found better: ``quantized``, ``eviction only``,
    or None where it could not tell them apart."""
    if not test.significant:
        return None
    quantized_better = test.difference > 0 if higher_is_better else test.difference < 0
    return "quantized" if quantized_better else "eviction only"


def verdict(test: Comparison | None, higher_is_better: bool) -> str:
    """What a test of best quantized minus best eviction-only says, in words."""
    if test is None:
        return "no test (a side is missing, or its samples were not kept)"
    found = winner(test, higher_is_better)
    return "not significant: not told apart at this n" if found is None else f"significant: {found} better"


def _bytes(kept: float) -> str:
    return f"{kept:.2%}"


def _budget(budget: float | None) -> str:
    return "-" if budget is None else f"{budget:g}"


def _counts(values: Sequence[int]) -> str:
    found = sorted(set(values))
    return "" if not found else str(found[0]) if len(found) == 1 else f"{found[0]}-{found[-1]}"


def _direction(panel: Panel) -> str:
    return "higher" if panel.points[0].higher_is_better else "lower"


def _metric(panel: Panel) -> str:
    return panel.points[0].metric


def point_table(panel: Panel) -> Table:
    """Every point of a panel, fewest bytes first, with its shape, score, n, rank by score and front mark."""
    by_score = sorted(panel.points, key=lambda p: -p.score if p.higher_is_better else p.score)
    rank_of = {id(p): rank for p, rank in zip(by_score, ranks([p.score for p in by_score]))}
    body = [[_bytes(p.kept), p.shape, p.policy, _budget(p.budget), p.score_text(), p.samples, rank_of[id(p)],
             "front" if front else ""] for p, front in zip(panel.points, panel.front)]
    title = (f"{panel.task} — {panel.protocol.value} — {_metric(panel)} ({_direction(panel)} is better) — score "
             f"against bytes kept, fewest first — {panel.model}")
    return title, ["bytes kept", "shape", "policy", "budget", "score [95% CI]", "n", "rank", "Pareto"], body


def duel_table(panel: Panel) -> Table:
    """Per budget, the best of each shape, and the best quantized point against the best eviction-only one."""
    body = []
    for duel in duels(panel):
        for shape, p in duel.best.items():
            tested = p is duel.quantized and duel.test is not None
            test = duel.test
            body.append([
                _budget(duel.budget), shape, p.policy, _bytes(p.kept), p.score_text(), p.samples,
                f"{test.difference:+.3f} [{test.low:+.3f}, {test.high:+.3f}]" if tested else "",
                f"{p_text(test.p_value)} ({test.method}, n = {test.n})" if tested else "",
                verdict(duel.test, p.higher_is_better) if p is duel.quantized or (
                    shape == EVICTION and duel.quantized is None) else "",
            ])
    reference = panel.reference
    full = "" if reference is None else f"; full cache {reference.score_text()}, n = {reference.samples}"
    title = (f"{panel.task} — {panel.protocol.value} — best of each shape per budget, and the best quantized point "
             f"against the best eviction-only one ({_metric(panel)}, {_direction(panel)} is better{full}) — "
             f"{panel.model}")
    headers = ["budget", "shape", "best point", "bytes kept", "score [95% CI]", "n",
               "quantized − eviction only [95% CI]", "p (test, n)", "verdict"]
    return title, headers, body


def summary_table(found: Sequence[Panel]) -> Table:
    """Per panel, the budgets where the best quantized point beat the best eviction-only one by a paired test, where
    it lost, and where the test could not tell them apart: "more tokens, lower precision", budget by budget."""
    body = []
    for panel in found:
        said: dict[str | None, list[str]] = defaultdict(list)
        for duel in duels(panel):
            key = "no test" if duel.test is None else winner(duel.test, panel.points[0].higher_is_better)
            said[key].append(_budget(duel.budget))
        body.append([panel.task, panel.protocol.value, *(", ".join(said[key]) or "none" for key in (
            "quantized", "eviction only", None, "no test")), _counts([p.samples for p in panel.points]), panel.model])
    headers = ["task", "protocol", "quantized better (p < 0.05)", "eviction only better (p < 0.05)",
               "not told apart", "no test", "n", "model"]
    return "more tokens at lower precision? budgets by the paired test's verdict", headers, body


def tables(found: Sequence[Panel]) -> list[Table]:
    """The page's tables in reading order: the summary, then per panel its points and its budgets."""
    made = [summary_table(found)]
    for panel in found:
        made += [point_table(panel), duel_table(panel)]
    return made


HEADER = (
    "Each point is one cell: a policy and codec at a budget (the fraction of the full cache's bytes it may hold) "
    "under a protocol. *bytes kept* is what its cache held, measured, as a share of the full cache's bytes (the "
    "question's and answer's entries, kept whole, included), not its budget. *shape*: eviction only (full "
    "precision); quantization only (a lossy codec that kept every entry: no cell of its codec held more bytes, and "
    "its budget did not bind); eviction × quantization (a lossy codec that let entries go). *Pareto*: no other "
    "point holds at most its bytes with a better score, or the same score in fewer bytes; equal points share the "
    "front, and the front is drawn through point estimates, so a point off it is not necessarily worse by a test. "
    "Brackets hold a 95% interval: Wilson's for an accuracy (every sample right or wrong), else a bootstrap over "
    "samples. *n* is the number of samples; points with equal scores share a rank. Per budget, the best quantized "
    "point (either quantized shape) is tested against the best eviction-only one over the samples both ran (exact "
    "McNemar for an accuracy, a paired swap test otherwise): significant where p < 0.05, one test per budget with "
    "no correction for their number."
)


def nothing_to_place(results_dir: Path, records: Sequence[ResultRecord]) -> str:
    """Why a folder gives no frontier, and what to run instead."""
    finished = any(record.status == "ok" for record in records)
    why = "no cell compressed the cache with its bytes counted" if finished else "no finished results"
    return (f"{why} in {results_dir}: the frontier places policies at budgets beside the full cache; run "
            "`kvpolicies sweep --preset frontier` first")


def render_frontier(results_dir: Path, records: Sequence[ResultRecord], fmt: str = "terminal",
                    with_provenance: bool = False, images: list[str] | None = None) -> str:
    """The frontier page of ``records`` (read from ``results_dir``) in ``fmt``; CSV holds the tables only."""
    found, notes = panels(records)
    failures = [point for point in shown(records) if point.record.status != "ok"]
    empty = nothing_to_place(results_dir, records) if not found else ""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerows([[empty]] if empty else [])
        for title, headers, body in tables(found) if found else []:
            writer.writerows([[title], headers, *body, []])
        return buffer.getvalue()
    if empty:
        parts = [escaped(empty, fmt)]
    else:
        parts = []
        if with_provenance:
            parts += provenance_parts(records, fmt, (
                f"# Eviction versus precision\n\nGenerated from the result files in `{results_dir}` by `kvpolicies "
                "leaderboard --frontier` (`--format markdown --provenance`); evals/presets/frontier.yaml gives the "
                "sweep that wrote them. Scores are what they are: no task, prompt or seed was tuned."
            ))
        parts.append(HEADER)
        if not any(p.shape in QUANTIZED for panel in found for p in panel.points):
            parts.append(escaped("None of these cells stored its entries at lower precision (every codec is full): "
                                 "the page shows eviction alone; `kvpolicies sweep --preset frontier` runs all "
                                 "three shapes.", fmt))
        if images and fmt == "markdown":
            parts.append("\n".join(f"![{Path(i).stem}]({i})" for i in images))
        parts += [section(title, headers, body, fmt, numbers=False) for title, headers, body in tables(found)]
    if notes:
        parts.append(escaped("cells not placed:\n" + "\n".join(f"- {note}" for note in notes), fmt))
    if failures:
        parts.append(failed_cells(failures, fmt))
    return "\n\n".join(parts) + "\n"


MARKERS = {EVICTION: "o", QUANTIZATION: "s", BOTH: "^", REFERENCE: "*"}
COLOURS = {EVICTION: "tab:blue", QUANTIZATION: "tab:orange", BOTH: "tab:green", REFERENCE: "black"}
NOTE = ("x: bytes the cache held, as a share of the full cache's (log scale). Markers: the shape. Bars: 95% "
        "intervals (Wilson for an accuracy, a bootstrap over samples otherwise). Ringed points joined by the black "
        "line: the Pareto front through point estimates (no point holds at most their bytes with a better score). "
        "Equal points draw over one another: the page's tables list each.")


def plot_frontier(records: Sequence[ResultRecord], out_dir: Path) -> list[Path]:
    """PNG figures: per model and protocol, one panel per task of score against bytes kept."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    found, _ = panels(records)
    plots_folder(out_dir)
    models = sorted({panel.model for panel in found})
    written = []
    for model in models:
        for protocol in PROTOCOLS:
            mine = [panel for panel in found if panel.model == model and panel.protocol is protocol]
            if not mine:
                continue
            fig, axes = plt.subplots(1, len(mine), figsize=(4.8 * len(mine) + 2, 4.4), squeeze=False)
            for axis, panel in zip(axes[0], mine):
                draw(axis, panel)
                axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                axis.xaxis.set_minor_formatter(NullFormatter())
            axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
            written.append(save(fig, out_dir, f"frontier_{protocol.value}", model, models, note=NOTE))
    return written


def draw(axis: Any, panel: Panel) -> None:
    """One panel: every point by its shape with its interval, the front ringed and joined, log bytes."""
    for shape in SHAPES:
        members = [p for p in panel.points if p.shape == shape]
        if not members:
            continue
        xs, ys = [p.kept for p in members], [p.score for p in members]
        axis.scatter(xs, ys, marker=MARKERS[shape], color=COLOURS[shape], label=shape, zorder=3,
                     s=90 if shape == REFERENCE else 36)
        bars = [p.interval for p in members]
        if any(bar is not None for bar in bars):
            below = [0.0 if bar is None else max(0.0, y - bar.low) for y, bar in zip(ys, bars)]
            above = [0.0 if bar is None else max(0.0, bar.high - y) for y, bar in zip(ys, bars)]
            axis.errorbar(xs, ys, yerr=[below, above], fmt="none", ecolor=COLOURS[shape], alpha=0.45, capsize=2)
    front = [p for p, marked in zip(panel.points, panel.front) if marked]
    axis.plot([p.kept for p in front], [p.score for p in front], color="black", linewidth=1, label="Pareto front",
              zorder=2)
    axis.scatter([p.kept for p in front], [p.score for p in front], s=140, facecolors="none", edgecolors="black",
                 linewidths=1, zorder=4)
    axis.set_xscale("log")
    axis.set_xticks(sorted({*panel.budgets, 1.0}))  # a point reads against the budgets of its grid
    axis.set_xlabel("bytes kept (share of the full cache's, log scale)")
    metric = _metric(panel).split(",")[0]
    if metric.isdigit():  # lm-eval's RULER names its score by the prompts' length
        metric = f"score at {metric} tokens"
    if panel.points[0].higher_is_better:
        axis.set_ylabel(metric)
    else:  # up is better on every panel
        axis.set_ylabel(f"{metric} (lower is better: axis reversed)")
        axis.invert_yaxis()
    axis.grid(alpha=0.3, which="both")
    axis.set_title(f"{short(panel.task)} ({panel.protocol.value})\n{panel.model}, n = "
                   f"{_counts([p.samples for p in panel.points])} per point", fontsize=9)
