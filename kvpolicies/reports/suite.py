"""A benchmark suite's leaderboard in kvpress's shape: one average over the suite's tasks per policy and keep ratio.

kvpress publishes RULER as the mean of the 13 task scores (x100) per press and compression ratio, query-agnostic,
with a separate query-aware run for the presses that read the question. This page puts a results folder in that
shape so that numbers can be read side by side, protocol for protocol: the full cache's own score per task first
(a small model scores nothing on some tasks, and a task the full cache fails carries no signal about eviction),
then per protocol the average over the tasks the policies ran on, the per-task scores behind it, and what the
question being in view changes for each policy that ran under both protocols.

Every task of the folder counts, so a folder should hold one suite (the RULER preset's). Scores are lm-eval's
primary metric of each task, shown x100 as kvpress does; keep ratios are budget fractions (kvpress's compression
ratio is 1 - keep).
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpolicies.experiments.results import Outcomes, ResultRecord
from kvpolicies.integrations.protocol import Protocol
from kvpolicies.reports.figures import plots_folder, pyplot, save
from kvpolicies.reports.leaderboard import escaped, failed_cells, provenance_parts, section
from kvpolicies.reports.points import shown
from kvpolicies.reports.statistics import Comparison, Interval, compare_pooled, interval, p_text, pooled

SCALE = 100.0
"""kvpress reports RULER scores in percent."""

Table = tuple[str, list[str], list[list[Any]]]


@dataclass(frozen=True)
class Point:
    """One finished cell: a policy at a keep ratio under a protocol on one task (keep None: the full cache)."""

    model: str
    task: str
    policy: str
    protocol: Protocol
    keep: float | None
    score: float
    samples: int
    outcomes: Outcomes | None = None
    """Each sample's outcome (None in records written before they were kept)."""


def points(records: Sequence[ResultRecord]) -> list[Point]:
    """The finished cells of ``records``, each as last measured and named apart from the others
    (:func:`~kvpolicies.reports.points.shown`); budgets that are not fractions are left out, since a ratio is what
    kvpress's columns are."""
    found = []
    for point in shown(records):
        record = point.record
        if record.status != "ok":
            continue
        budget = record.identity.budget
        if budget is not None and budget.unit != "fraction":
            continue
        found.append(Point(
            model=record.identity.model, task=point.task, policy=point.policy,
            protocol=record.cell.protocol, keep=None if budget is None else budget.value,
            score=record.score * SCALE, samples=record.samples, outcomes=record.outcomes,
        ))
    return found


def short(task: str) -> str:
    """Column names: ``kvp_ruler_niah_single_1`` reads ``niah_single_1``."""
    return task.removeprefix("kvp_ruler_").removeprefix("kvp_")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _keep_header(keep: float) -> str:
    return f"keep {keep:g} (ratio {1 - keep:g})"


class Suite:
    """The points of one model, arranged the way the page reads them."""

    def __init__(self, model: str, found: list[Point]):
        self.model = model
        self.full = {p.task: p for p in found if p.keep is None}
        self.compressed = [p for p in found if p.keep is not None]
        self.tasks = sorted({p.task for p in self.compressed})
        """The tasks the policies ran on: every average is over these."""
        self.keeps = sorted({p.keep for p in self.compressed}, reverse=True)
        self.protocols = [protocol for protocol in (Protocol.QUERY_AGNOSTIC, Protocol.QUERY_AWARE)
                          if any(p.protocol is protocol for p in self.compressed)]
        self.score = {(p.policy, p.protocol, p.keep, p.task): p for p in self.compressed}

    def policies(self, protocol: Protocol) -> list[str]:
        """The policies run under ``protocol``: those with every keep ratio complete first, by their mean over keep
        ratios (a policy missing cells must not rank on the tasks it happens to have)."""
        names = {p.policy for p in self.compressed if p.protocol is protocol}

        def rank(name: str) -> tuple[int, float, str]:
            complete = [value for keep in self.keeps
                        for value, covered in [self.average(name, protocol, keep)] if covered == len(self.tasks)]
            return -len(complete), -(statistics.fmean(complete) if complete else 0.0), name

        return sorted(names, key=rank)

    def covered(self, policy: str, protocol: Protocol, keep: float) -> list[Point]:
        """The finished cells behind one average, in task order."""
        return [self.score[(policy, protocol, keep, task)] for task in self.tasks
                if (policy, protocol, keep, task) in self.score]

    def average(self, policy: str, protocol: Protocol, keep: float) -> tuple[float | None, int]:
        """The mean score over the suite's tasks and how many tasks it covers (fewer than all: a cell is missing)."""
        values = [p.score for p in self.covered(policy, protocol, keep)]
        return (statistics.fmean(values) if values else None), len(values)

    def full_average(self) -> float | None:
        """The full cache's mean over the policies' tasks, if it ran on all of them."""
        values = [self.full[task].score for task in self.tasks if task in self.full]
        return statistics.fmean(values) if len(values) == len(self.tasks) and values else None

    def full_points(self) -> list[Point]:
        """The full cache's cells on the policies' tasks (all of them, or none: a partial mean is no reference)."""
        found = [self.full[task] for task in self.tasks if task in self.full]
        return found if len(found) == len(self.tasks) else []

    def cell(self, value: float | None, covered: int, behind: list[Point] | None = None) -> str:
        """A mean as the tables print it: with its interval where every cell behind it kept its samples' outcomes,
        and the tasks it covers where it covers fewer than all."""
        if value is None:
            return ""
        found = mean_interval(behind or [])
        text = _number(value) if found is None else f"{_number(value)} [{_number(found.low)}, {_number(found.high)}]"
        return text + ("" if covered == len(self.tasks) else f" ({covered}/{len(self.tasks)} tasks)")

    def samples(self, protocol: Protocol) -> str:
        """Samples per task behind a protocol's cells: one number, or a range where cells of different limits
        share a folder (a short run, then a longer one, before it finished)."""
        found = sorted({p.samples for p in self.compressed if p.protocol is protocol})
        return "" if not found else str(found[0]) if len(found) == 1 else f"{found[0]}-{found[-1]}"


def mean_interval(behind: list[Point]) -> Interval | None:
    """The interval (x100) on the mean over tasks of ``behind``'s scores (see
    :func:`~kvpolicies.reports.statistics.pooled`)."""
    kept = [p.outcomes for p in behind]
    if not kept or any(o is None for o in kept) or len({o.statistic for o in kept}) != 1:
        return None
    found = (interval(kept[0].statistic, kept[0].values, kept[0].weights) if len(kept) == 1 else  # Wilson, where
             pooled(kept[0].statistic, [(o.values, o.weights) for o in kept]))                     # it applies
    return None if found is None else Interval(found.score * SCALE, found.low * SCALE, found.high * SCALE,
                                               found.n, found.method)


def task_cell(point: Point | None) -> str:
    """One task's score x100, with its interval where the record kept its samples' outcomes."""
    if point is None:
        return ""
    found = mean_interval([point])
    return _number(point.score) if found is None else f"{_number(point.score)} [{_number(found.low)}, " \
                                                      f"{_number(found.high)}]"


def full_cache_table(suite: Suite) -> Table:
    """What the model does with everything kept, on every task of the folder: where eviction has anything to lose."""
    tasks = sorted(set(suite.full) | set(suite.tasks))
    body = [[short(task), task_cell(suite.full.get(task)),
             suite.full[task].samples if task in suite.full else "",
             "yes" if task in suite.tasks else "no (full cache only)"] for task in tasks]
    every = [suite.full[task] for task in tasks if task in suite.full]
    if every:
        body.append([f"mean of {len(every)} tasks", suite.cell(statistics.fmean(p.score for p in every), len(
            suite.tasks), every), "", ""])
    return f"full cache per task — score x100 — {suite.model}", ["task", "full cache", "n", "policies run"], body


def average_table(suite: Suite, protocol: Protocol) -> Table:
    """kvpress's headline: the mean over tasks per policy and keep ratio, the full cache's beside it."""
    headers = ["policy", *(_keep_header(keep) for keep in suite.keeps)]
    body = [[name, *(suite.cell(*suite.average(name, protocol, keep), suite.covered(name, protocol, keep))
                     for keep in suite.keeps)]
            for name in suite.policies(protocol)]
    full = suite.cell(suite.full_average(), len(suite.tasks), suite.full_points())
    body.append(["full cache (no eviction)", *[full] * len(suite.keeps)])
    title = (f"{protocol.value} — mean score x100 over {len(suite.tasks)} tasks "
             f"({', '.join(short(t) for t in suite.tasks)}), n = {suite.samples(protocol)} per task — {suite.model}")
    return title, headers, body


def task_table(suite: Suite, protocol: Protocol) -> Table:
    """The per-task scores behind each mean: which tasks a policy loses, not only how much."""
    headers = ["policy", "keep", "mean", *(short(task) for task in suite.tasks)]
    body = []
    for name in suite.policies(protocol):
        for keep in suite.keeps:
            row = [suite.score.get((name, protocol, keep, task)) for task in suite.tasks]
            if any(row):
                body.append([name, f"{keep:g}", suite.cell(*suite.average(name, protocol, keep),
                                                            suite.covered(name, protocol, keep)),
                             *(task_cell(p) for p in row)])
    body.append(["full cache", "1", suite.cell(suite.full_average(), len(suite.tasks), suite.full_points()),
                 *(task_cell(suite.full.get(task)) for task in suite.tasks)])
    return f"{protocol.value} — per task, score x100 — {suite.model}", headers, body


def protocol_gap_table(suite: Suite) -> Table | None:
    """For each policy run under both protocols: query-aware minus query-agnostic mean, per keep ratio, on the same
    tasks (a pair whose cells cover different tasks is left blank)."""
    if len(suite.protocols) < 2:
        return None
    aware, agnostic = Protocol.QUERY_AWARE, Protocol.QUERY_AGNOSTIC
    both = sorted(set(suite.policies(aware)) & set(suite.policies(agnostic)))
    ranked = []
    for name in both:
        gaps = []
        for keep in suite.keeps:
            with_question, without = suite.covered(name, aware, keep), suite.covered(name, agnostic, keep)
            same_tasks = [p.task for p in with_question] == [p.task for p in without] and with_question
            gaps.append((statistics.fmean(p.score for p in with_question) - statistics.fmean(p.score for p in without),
                         paired_gap(with_question, without)) if same_tasks else None)
        present = [gap for gap, _ in filter(None, gaps)]
        mean = statistics.fmean(present) if present else None
        ranked.append((mean is None, -(mean or 0.0), [name, *(gap_cell(g) for g in gaps),
                                                       "" if mean is None else f"{mean:+.1f}"]))
    headers = ["policy", *(_keep_header(keep) for keep in suite.keeps), "mean"]
    return (f"query-aware minus query-agnostic — mean score x100 — {suite.model}", headers,
            [row for *_, row in sorted(ranked, key=lambda item: item[:2])])


def paired_gap(with_question: list[Point], without: list[Point]) -> Comparison | None:
    """The paired test of query-aware against query-agnostic over the tasks and samples both ran, where every
    cell kept its samples' outcomes."""
    kept = [(a.outcomes, b.outcomes) for a, b in zip(with_question, without)]
    if any(a is None or b is None for a, b in kept) or len({o.statistic for pair in kept for o in pair}) != 1:
        return None
    return compare_pooled(kept[0][0].statistic, [(a.by_doc(), b.by_doc()) for a, b in kept])


def gap_cell(gap: tuple[float, Comparison | None] | None) -> str:
    """A protocol gap x100 with its paired test's p-value, marked * where p < 0.05."""
    if gap is None:
        return ""
    value, test = gap
    if test is None:
        return f"{value:+.1f}"
    return f"{value:+.1f} (p {p_text(test.p_value)}){' *' if test.significant else ''}"


def suites(records: Sequence[ResultRecord]) -> list[Suite]:
    """One suite per model of ``records``."""
    by_model: dict[str, list[Point]] = defaultdict(list)
    for point in points(records):
        by_model[point.model].append(point)
    return [Suite(model, found) for model, found in sorted(by_model.items())]


def tables(suite: Suite) -> list[Table]:
    """The page's tables in reading order: the full cache, the means, the protocol gap, the per-task scores."""
    found = [full_cache_table(suite)]
    found += [average_table(suite, protocol) for protocol in suite.protocols]
    gap = protocol_gap_table(suite)
    found += [gap] if gap else []
    found += [task_table(suite, protocol) for protocol in suite.protocols]
    return found


HEADER = (
    "Scores are lm-eval's primary metric of each task x100, as kvpress reports RULER. *keep* is the fraction of the "
    "cache kept (kvpress's compression ratio is 1 - keep). *query_agnostic*: the context is compressed before the "
    "question is seen, then the question is prefilled on the compressed cache (kvpress's protocol); *query_aware*: "
    "the question is in view while the context is compressed (the question's own entries are kept whole under both "
    "protocols). Averages are over the tasks the policies ran on; a cell that covers fewer says so. *n* is the "
    "number of samples per task: one sample moves a task's score by 100/n. Brackets hold a 95% interval: Wilson's "
    "for a task whose every sample is right or wrong, else a bootstrap over samples; for a mean over tasks, the "
    "tasks' Wilson intervals combined (MOVER), or a bootstrap stratified by task where a task gives partial credit. "
    "A protocol gap carries the p-value of a paired swap test over the samples both protocols ran (every way "
    "of swapping each pair's two outcomes, within its task), "
    "marked * where p < 0.05; a gap without * is not told apart from none at this n."
)


def render_suite(results_dir: Path, records: Sequence[ResultRecord], fmt: str = "terminal",
                 with_provenance: bool = False, images: list[str] | None = None) -> str:
    """The suite page of ``records`` (read from ``results_dir``) in ``fmt``; CSV holds the tables only."""
    found = suites(records)
    failures = [point for point in shown(records) if point.record.status != "ok"]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for suite in found:
            for title, headers, body in tables(suite):
                writer.writerows([[title], headers, *body, []])
        return buffer.getvalue()
    parts = [] if found else [escaped(f"no finished results in {results_dir}", fmt)]
    if found and with_provenance:
        parts += provenance_parts(records, fmt, (
            f"# RULER leaderboard\n\nGenerated from the result files in `{results_dir}` by `kvpolicies "
            "leaderboard --suite` (`--format markdown --provenance`); README.md, 'RULER leaderboard', gives the "
            "sweep that wrote them. Scores are what they are: no task, prompt or seed was tuned."
        ))
    if found:
        parts.append(HEADER)
    if images and fmt == "markdown":
        parts.append("\n".join(f"![{Path(i).stem}]({i})" for i in images))
    for suite in found:
        parts += [section(title, headers, body, fmt, numbers=False) for title, headers, body in tables(suite)]
    if failures:
        parts.append(failed_cells(failures, fmt))
    return "\n\n".join(parts) + "\n"


def plot_suite(records: Sequence[ResultRecord], out_dir: Path) -> list[Path]:
    """PNG figures: the mean over tasks vs keep ratio, one panel per protocol; and per task, one figure per
    protocol; one set per model."""
    plt = pyplot()
    plots_folder(out_dir)
    written = []

    def style(axis) -> None:
        axis.set_xlabel("keep ratio (fraction of the KV cache kept)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)

    def draw(axis, suite: Suite, name: str, points: list[tuple[float, float, Interval | None]]) -> None:
        """One policy's line, in its colour and marker on every panel, with each point's 95% interval; equal
        scores would draw one line over another, so each policy is shifted by a sliver of the smallest keep gap
        (at most a third of it), which the figure says."""
        names = sorted({p.policy for p in suite.compressed})
        index = names.index(name)
        gap = min((b - a for a, b in zip(suite.keeps[::-1], suite.keeps[::-1][1:])), default=0.1)
        dodge = (index - (len(names) - 1) / 2) * gap / (3 * len(names))
        colour = plt.cm.tab20.colors[index % 20]
        xs, ys = [keep + dodge for keep, _, _ in points], [value for _, value, _ in points]
        axis.plot(xs, ys, label=name, alpha=0.85, color=colour, marker="osD^v<>ph*"[index % 10],
                  linestyle=["-", "--", ":", "-."][index % 4])
        if any(found is not None for _, _, found in points):
            below = [0.0 if f is None else max(0.0, y - f.low) for y, (_, _, f) in zip(ys, points)]
            above = [0.0 if f is None else max(0.0, f.high - y) for y, (_, _, f) in zip(ys, points)]
            axis.errorbar(xs, ys, yerr=[below, above], fmt="none", ecolor=colour, alpha=0.5, capsize=2)

    note = ("Bars: 95% intervals (for a mean over tasks, the tasks' Wilson intervals combined). Policies are shifted "
            "sideways by up to a third of the smallest keep gap so that equal results stay visible; each point "
            "belongs to the keep ratio nearest it.")

    def legend(axis) -> None:
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))

    found = suites(records)
    models = [suite.model for suite in found]
    for suite in found:
        if not suite.protocols:
            continue
        fig, axes = plt.subplots(1, len(suite.protocols), figsize=(7 * len(suite.protocols) + 2, 4.5), squeeze=False)
        for axis, protocol in zip(axes[0], suite.protocols):
            style(axis)
            for name in suite.policies(protocol):
                line = [(keep, suite.average(name, protocol, keep)[0],
                         mean_interval(suite.covered(name, protocol, keep))) for keep in suite.keeps
                        if suite.average(name, protocol, keep)[1] == len(suite.tasks)]  # a partial mean is no point
                if line:
                    draw(axis, suite, name, line)
            if suite.full_average() is not None:
                axis.axhline(suite.full_average(), color="black", linestyle="--", linewidth=1, label="full cache")
            axis.set_title(f"{protocol.value}: mean over {len(suite.tasks)} tasks\n{suite.model}, n = "
                           f"{suite.samples(protocol)} per task", fontsize=9)
            axis.set_ylabel("score x100")
            legend(axis)
        written.append(save(fig, out_dir, "mean_vs_keep", suite.model, models, note=note))
        for protocol in suite.protocols:
            fig, axes = plt.subplots(1, len(suite.tasks), figsize=(4 * len(suite.tasks) + 2, 4), squeeze=False)
            for axis, task in zip(axes[0], suite.tasks):
                style(axis)
                for name in suite.policies(protocol):
                    cells = [(keep, suite.score[(name, protocol, keep, task)]) for keep in suite.keeps
                             if (name, protocol, keep, task) in suite.score]
                    if cells:
                        draw(axis, suite, name, [(keep, p.score, mean_interval([p])) for keep, p in cells])
                if task in suite.full:
                    axis.axhline(suite.full[task].score, color="black", linestyle="--", linewidth=1,
                                 label="full cache")
                axis.set_title(f"{short(task)} ({protocol.value})\n{suite.model}, n = {suite.samples(protocol)}",
                               fontsize=9)
            legend(axes[0][-1])
            written.append(save(fig, out_dir, f"tasks_{protocol.value}", suite.model, models, note=note))
    return written
