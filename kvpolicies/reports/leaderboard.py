"""Leaderboards from saved sweep results: tables (tabulate) and plots (matplotlib), without loading any model.

Per task and budget, policies are ranked by the task's primary metric, with the full cache shown as the reference
row. The overall table puts tasks on one scale by comparing each policy with the full cache on the same task:
``score / full`` for accuracies, ``full / score`` for perplexities (1.0 = as good as keeping everything); it shows
the mean of that ratio over tasks at each budget and the area under the ratio-vs-budget curve (trapezoids over the
swept budgets, divided by their span). Files of the results folder that are not valid records are skipped with a
warning (see :mod:`kvpolicies.experiments.results`), so a stray or damaged file never costs the page.

Each point (a cell but for its code version) is a row of its own, named apart from any other shown under the same
label, budget value or task name (:mod:`kvpolicies.reports.points`); each model gets its own figures. Names come
from result files, which anyone sharing the folder can write: HTML pages escape them, markdown tables their ``|``.
"""

from __future__ import annotations

import csv
import html
import io
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from kvpolicies.errors import UsageError
from kvpolicies.experiments.results import Outcomes, ResultRecord, budget_key, load_results
from kvpolicies.reports.figures import plots_folder, pyplot, save
from kvpolicies.reports.points import Shown, shown
from kvpolicies.reports.statistics import Interval, compare, interval_of, p_text

COLUMNS = (
    "Columns: *KV MiB* is the mean resident KV cache per sequence, counted from the cache's tensors, and *of full* "
    "its share of the full cache's bytes; *prefill/decode tok/s* are measured inside lm-eval's requests, one run "
    "per cell (differences under about 15% are noise on a shared machine), marked † where the load exceeded the "
    "machine's cores; a prefill rate marked (1/N) is that of a prefill the cell shared with N cells of its task, "
    "each charged 1/N of its time (so it reads N times the rate of a prefill of its own), and a decode rate marked "
    "(1/N) that of decoding steps the cell shared with up to N cells' rows in one batch, each charged an equal part "
    "of each step; *peak +MiB* is the largest peak of one request of the cell above what the process held when "
    "the request began (CUDA allocator peak, or the kernel's resident high-water mark on CPU; a cell that shared "
    "its prefill leaves the shared capture out, and one decoded with others the batch's decoding); *load* is the "
    "highest 1-minute load average at the cell's start or end; *n* is the number of samples. "
    "*score [95% CI]*: the interval is Wilson's for an accuracy (every sample right or wrong), else a bootstrap over "
    "the samples; *vs full*: the policy's score minus the full cache's over the samples both ran, with the p-value "
    "of a paired test (exact McNemar for an accuracy, a paired swap test otherwise: every way of swapping each pair's two outcomes), marked * where p < 0.05: a "
    "difference without * is not told apart from no difference at this n. Policies with equal scores share a rank."
)

FORMATS = {"terminal": "simple_grid", "markdown": "github", "html": "html", "csv": "csv"}


@dataclass(frozen=True)
class Row:
    task: str
    policy: str
    budget: float | None  # None for the full cache
    score: float
    metric: str
    higher_is_better: bool
    samples: int
    resident_bytes: float | None
    full_bytes: float | None
    prefill_tps: float | None
    decode_tps: float | None
    peak_memory_bytes: float | None
    """Peak memory the cell needed above what the process held when it started."""
    model: str
    load: float | None = None
    """Highest 1-minute load average seen at the cell's start or end: timings from a busy machine show it."""
    busy: bool = False
    """The load exceeded the machine's cores: the timings are not comparable."""
    shared_by: int = 0
    """Cells that shared each prompt's prefill with this one (0: its own), each charged an equal part of it."""
    decoded_together: int = 0
    """The most cells whose answers were decoded in one batch with this one's (0: on its own), each charged an
    equal part of each step."""
    outcomes: Outcomes | None = None
    """Each sample's outcome, for intervals and paired tests (None in records written before they were kept)."""

    @property
    def interval(self) -> Interval | None:
        return interval_of(self.outcomes)

    def score_text(self) -> str:
        """The score with its interval where the record kept its samples' outcomes."""
        found = self.interval
        return f"{self.score:.3f}" if found is None else found.text()

    def versus(self, other: Row | None) -> str:
        """This row's score minus ``other``'s over the samples both ran, and the paired test's p-value."""
        if other is None or self.outcomes is None or other.outcomes is None:
            return ""
        if self.outcomes.statistic != other.outcomes.statistic:
            return ""
        found = compare(self.outcomes.statistic, self.outcomes.by_doc(), other.outcomes.by_doc())
        if found is None:
            return ""
        return f"{found.difference:+.3f}, p {p_text(found.p_value)}{' *' if found.significant else ''}"


def ranks(scores: Sequence[float]) -> list[int]:
    """Competition ranks of scores already sorted best first: equal scores share a rank (1, 1, 3)."""
    found = []
    for index, score in enumerate(scores):
        found.append(found[-1] if index and score == scores[index - 1] else index + 1)
    return found


def load_rows(records: Sequence[ResultRecord]) -> tuple[list[Row], list[Shown]]:
    """Finished cells as rows, and the failed cells (to report, not to rank); each point once, as last measured,
    and named apart from the others (:func:`~kvpolicies.reports.points.shown`)."""
    rows, failures = [], []
    for point in shown(records):
        record = point.record
        if record.status != "ok":
            failures.append(point)
            continue
        peak = record.peak_memory_growth_bytes
        rows.append(Row(
            task=point.task,
            policy=point.title,
            budget=None if record.identity.budget is None else budget_key(record.identity.budget),
            score=record.score,
            metric=record.primary_metric,
            higher_is_better=record.higher_is_better,
            samples=record.samples,
            resident_bytes=record.kv_memory.resident_bytes_mean,
            full_bytes=record.kv_memory.full_bytes_mean,
            prefill_tps=record.speed.prefill_tokens_per_s,
            decode_tps=record.speed.decode_tokens_per_s,
            peak_memory_bytes=record.peak_memory_bytes if peak is None else peak,
            model=record.identity.model,
            load=record.load,
            busy=record.busy,
            shared_by=int((record.speed.model_extra or {}).get("shared_by") or 0),
            decoded_together=int((record.speed.model_extra or {}).get("decoded_together") or 0),
            outcomes=record.outcomes,
        ))
    return rows, failures


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def _rate(value: float | None, busy: bool = False, shared_by: int = 0) -> str:
    """Three significant figures or more: decode speeds of 12.4 and 13.1 tok/s must not both read 12 and 13;
    marked † when the machine was busier than its cores, and, for work shared by ``shared_by`` cells (a prefill, or
    decoding steps of that many rows), with the share the cell was charged."""
    if value is None:
        return ""
    shared = f" (1/{shared_by})" if shared_by > 1 else ""
    return (f"{value:.1f}" if value < 100 else f"{value:.0f}") + shared + (" †" if busy else "")


def _load(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def task_tables(rows: list[Row]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """One ``(title, headers, rows)`` per model, task and budget, best policy first, the full cache last."""
    tables = []
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        groups[(row.model, row.task)].append(row)
    for (model, task), members in sorted(groups.items()):
        reference = [r for r in members if r.budget is None]
        budgets = sorted({r.budget for r in members if r.budget is not None}, key=str)
        for budget in budgets:
            ranked = sorted((r for r in members if r.budget == budget), key=lambda r: r.score,
                            reverse=members[0].higher_is_better)
            full = reference[0] if len(reference) == 1 else None
            body = [
                [rank, r.policy, r.score_text(), r.versus(full), _mib(r.resident_bytes),
                 f"{r.resident_bytes / r.full_bytes:.1%}" if r.resident_bytes and r.full_bytes else "",
                 _rate(r.prefill_tps, r.busy, r.shared_by), _rate(r.decode_tps, r.busy, r.decoded_together), _mib(r.peak_memory_bytes), _load(r.load),
                 r.samples]
                for rank, r in zip(ranks([r.score for r in ranked]), ranked)
            ]
            body += [["ref", f"{r.policy} (no eviction)", r.score_text(), "", _mib(r.resident_bytes), "100%",
                      _rate(r.prefill_tps, r.busy, r.shared_by), _rate(r.decode_tps, r.busy, r.decoded_together), _mib(r.peak_memory_bytes),
                      _load(r.load), r.samples]
                     for r in reference]
            better = "higher" if members[0].higher_is_better else "lower"
            title = f"{task} — budget {budget_title(budget)} — {members[0].metric} ({better} is better) — {model}"
            headers = ["#", "policy", "score [95% CI]", "vs full", "KV MiB", "of full", "prefill tok/s",
                       "decode tok/s", "peak +MiB", "load", "n"]
            tables.append((title, headers, body))
    return tables


def _picked(spec: str, rows: list[Row]) -> tuple[str, str | None]:
    """``NAME`` or ``NAME@BUDGET`` as ``--compare`` takes it: a policy as the tables name it (``full`` is the full
    cache), at one budget or at each."""
    name, _, budget = spec.rpartition("@") if "@" in spec else (spec, "", "")
    names = sorted({r.policy for r in rows})
    if name not in names:
        raise UsageError(f"--compare {spec!r}: no policy {name!r} in these results; the tables name "
                         f"{', '.join(names)} (add @BUDGET to pick one budget, e.g. {names[0]}@0.25)")
    if budget and not any(_budget_text(r.budget) == _budget_text(_number_or_text(budget)) for r in rows
                          if r.policy == name):
        found = sorted({_budget_text(r.budget) for r in rows if r.policy == name})
        raise UsageError(f"--compare {spec!r}: {name} ran at budget {', '.join(found)}, not {budget}")
    return name, budget or None


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _budget_text(budget: float | str | None) -> str:
    return "full" if budget is None else f"{budget:g}" if isinstance(budget, float) else str(budget)


def comparison_table(rows: list[Row], a: str, b: str) -> tuple[str, list[str], list[list[Any]]]:
    """``--compare A B``: per task (and budget, where neither names one), A's score minus B's over the samples both
    ran, its interval, and a paired test's p-value; A and B are ``NAME`` or ``NAME@BUDGET``."""
    (name_a, budget_a), (name_b, budget_b) = _picked(a, rows), _picked(b, rows)

    def side(name: str, budget: str | None) -> tuple[list[Row], bool]:
        """The rows of one side, and whether they pair with the other side's at any budget (a budget was named,
        or this is the full cache) rather than at their own."""
        found = [r for r in rows if r.policy == name
                 and (budget is None or _budget_text(r.budget) == _budget_text(_number_or_text(budget)))]
        return found, budget is not None or all(r.budget is None for r in found)

    (left, any_a), (right, any_b) = side(name_a, budget_a), side(name_b, budget_b)
    pairs = sorted(((first, second) for first in left for second in right
                    if (first.model, first.task) == (second.model, second.task)
                    and (any_a or any_b or first.budget == second.budget)),
                   key=lambda pair: (pair[0].model, pair[0].task, _budget_text(pair[0].budget),
                                     _budget_text(pair[1].budget)))
    body = []
    for first, second in pairs:
        found = None
        if first.outcomes and second.outcomes and first.outcomes.statistic == second.outcomes.statistic:
            found = compare(first.outcomes.statistic, first.outcomes.by_doc(), second.outcomes.by_doc())
        model, task = first.model, first.task
        budgets = [_budget_text(r.budget) for r in (first, second)]
        shown_budget = budgets[0] if budgets[0] == budgets[1] else " vs ".join(budgets)
        if found is None:
            body.append([task, shown_budget, first.score_text(), second.score_text(),
                         f"{first.score - second.score:+.3f}", "", "", "", "no samples kept: no test", model])
            continue
        verdict = "significant" if found.significant else "not significant"
        better = found.difference > 0 if first.higher_is_better else found.difference < 0
        if found.significant:
            verdict += f" ({a if better else b} better)"
        body.append([task, shown_budget, first.score_text(), second.score_text(),
                     f"{found.difference:+.3f} [{found.low:+.3f}, {found.high:+.3f}]", p_text(found.p_value),
                     found.method, found.n, verdict, model])
    if not body:
        raise UsageError(f"--compare {a} {b}: they ran on no common task and budget; pick budgets with NAME@BUDGET")
    title = (f"{a} vs {b} — difference A − B over the samples both ran, 95% interval, paired test (p < 0.05 is "
             "significant)")
    return title, ["task", "budget", f"A: {a}", f"B: {b}", "A − B [95% CI]", "p", "test", "n", "verdict", "model"], body


def budget_title(budget: float | str) -> str:
    """A budget as the pages name it: the kept fraction, and kvpress's compression ratio (the fraction removed)
    beside it, so that numbers read side by side with kvpress's; a budget in tokens or bytes as written."""
    return f"{budget:g} (compression ratio {1 - budget:g})" if isinstance(budget, float) else str(budget)


def overall_table(rows: list[Row]) -> tuple[str, list[str], list[list[Any]]]:
    """Mean ratio to the full cache over tasks, per budget, and its area under the budget curve."""
    full = {(r.model, r.task): r.score for r in rows if r.budget is None}
    ratios: dict[tuple[str, str], dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        reference = full.get((r.model, r.task))
        if r.budget is None or reference is None:
            continue
        if r.higher_is_better:
            if reference == 0:
                continue  # the full cache scores nothing on this task: no scale to compare on
            ratio = r.score / reference
        else:
            ratio = reference / r.score
        ratios[(r.model, r.policy)][r.budget].append(ratio)
    budgets = sorted({b for per in ratios.values() for b in per}, key=lambda b: (isinstance(b, str), b))
    body = []
    for (model, policy), per_budget in ratios.items():
        means = {b: statistics.fmean(v) for b, v in per_budget.items()}
        counts = sorted({len(v) for v in per_budget.values()})
        tasks = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        body.append([policy, *(f"{means[b]:.3f}" if b in means else "" for b in budgets), _area(means), tasks, model])
    body.sort(key=lambda row: -float(row[-3]) if row[-3] != "" else 0)
    headers = ["policy", *(f"@{b}" + (f" (cr {1 - b:g})" if isinstance(b, float) else "") for b in budgets), "AUC",
               "n tasks", "model"]
    title = ("overall — mean over tasks of score relative to the full cache (1.0 = no loss), per budget (the kept "
             "fraction; cr: kvpress's compression ratio, the fraction removed)")
    return title, headers, body


def missing_references(rows: list[Row]) -> list[str]:
    """Why a task is absent from the overall table: it has scores but no full-cache row to compare them with."""
    have = {(r.model, r.task) for r in rows if r.budget is None}
    return [
        f"no reference (full cache) result for task {task} on {model}, so the overall table leaves it out: run "
        "`kvpolicies sweep` on this results folder with the same grid (every sweep includes the full cache)"
        for model, task in sorted({(r.model, r.task) for r in rows} - have)
    ]


def _area(means: dict[Any, float]) -> str:
    points = sorted((b, v) for b, v in means.items() if isinstance(b, float))
    if len(points) < 2:
        return ""
    area = sum((b2 - b1) * (v1 + v2) / 2 for (b1, v1), (b2, v2) in zip(points, points[1:]))
    return f"{area / (points[-1][0] - points[0][0]):.3f}"


def provenance(records: Sequence[ResultRecord]) -> list[str]:
    """Where the numbers come from: dates, versions, devices and the grid, read from the result files."""
    finished = sorted(r.finished_at for r in records)
    versions = sorted({json.dumps(r.versions, sort_keys=True) for r in records if r.versions})
    lines = [f"results: {len(records)} cells, finished {finished[0].date()} to {finished[-1].date()}"
             ] if finished else []
    lines += [f"versions: {', '.join(f'{k} {v}' for k, v in json.loads(v).items())}" for v in versions]
    lines.append(f"devices: {', '.join(sorted({r.device or '?' for r in records if r.status == 'ok'}))}")
    code = sorted({r.identity.code_version.split("/")[0] for r in records})
    lines.append(f"code (core): {', '.join(code)}")
    loads = [x for r in records for x in (r.load_average_start, r.load_average_end) if x is not None]
    if loads:
        lines.append(f"1-min load average during cells: {min(loads):.1f} to {max(loads):.1f}")
    lines.append(f"models: {', '.join(sorted({r.identity.model for r in records}))}")
    tasks = {json.dumps(r.cell.task.model_dump(), sort_keys=True, default=str) for r in records}
    lines += [f"task: {t}" for t in sorted(tasks)]
    policies = {json.dumps(r.identity.policy, sort_keys=True) for r in records}
    lines += [f"policy: {p}" for p in sorted(policies)]
    budgets = sorted({str(r.cell.budget) for r in records if not r.is_reference})
    seeds = sorted({str(r.cell.seed) for r in records})
    lines.append(f"budgets: {', '.join(budgets)}; seed: {', '.join(seeds)}")
    return lines


def provenance_parts(records: Sequence[ResultRecord], fmt: str, intro: str) -> list[str]:
    """The provenance lines as a page starts with them: in markdown after ``intro`` (the page's title and what made
    it), as a bullet list."""
    lines = provenance(records)
    if fmt == "markdown":
        return [intro, "\n".join(f"- {line}" for line in lines)]
    return [escaped("\n".join(lines), fmt)]


def escaped(text: str, fmt: str) -> str:
    """``text`` as a page in ``fmt`` shows it: escaped in HTML, where names, notes and errors read from a shared
    results folder must not become markup (or script) of the page."""
    return html.escape(text, quote=False) if fmt == "html" else text


def _markdown_cell(value: Any) -> Any:
    """A table cell of GitHub markdown, where a ``|`` would end the cell (tabulate leaves it as it is)."""
    return value.replace("|", "\\|") if isinstance(value, str) else value


def section(title: str, headers: list[str], body: list[list[Any]], fmt: str, numbers: bool = True) -> str:
    """One titled table in ``fmt`` (not CSV); ``numbers=False`` prints cells verbatim (``+25.0``, ``75.0 (1/2)``).
    Names in it come from result files: escaped where ``fmt`` needs it (tabulate's HTML escapes the cells)."""
    if fmt == "html":
        heading = f"<h3>{escaped(title, fmt)}</h3>"
    elif fmt == "markdown":
        heading = f"### {title}"
        headers = [_markdown_cell(header) for header in headers]
        body = [[_markdown_cell(value) for value in row] for row in body]
    else:
        heading = title
    return f"{heading}\n\n{tabulate(body, headers=headers, tablefmt=FORMATS[fmt], disable_numparse=not numbers)}"


def failed_cells(failures: Sequence[Shown], fmt: str) -> str:
    """The failed cells, named as the tables name their points, with their errors."""
    lines = [f"- {f.task} / {f.title} @ {f.record.cell.budget}: {f.record.error}" for f in failures]
    return escaped("failed cells (re-run the sweep to retry):\n" + "\n".join(lines), fmt)


def render(
    results_dir: Path, fmt: str = "terminal", with_provenance: bool = False, images: list[str] | None = None,
    records: Sequence[ResultRecord] | None = None, compared: tuple[str, str] | None = None,
) -> str:
    """The leaderboard of ``results_dir`` in ``fmt``; ``records``, if given, are its records already loaded (so a
    command that also plots warns about each skipped file once); ``compared``: only the paired comparison of two
    policies (``--compare A B``)."""
    records = load_results(results_dir) if records is None else records
    rows, failures = load_rows(records)
    if not rows:
        return escaped(f"no finished results in {results_dir}", fmt)
    if compared is not None:
        title, headers, body = comparison_table(rows, *compared)
        if fmt == "csv":
            buffer = io.StringIO()
            csv.writer(buffer).writerows([[title], headers, *body])
            return buffer.getvalue()
        return section(title, headers, body, fmt, numbers=False) + "\n"
    tables = [overall_table(rows), *task_tables(rows)]
    notes = missing_references(rows)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for index, (title, headers, body) in enumerate(tables):
            writer.writerow([title])
            writer.writerow(headers)
            writer.writerows(body)
            if index == 0:
                writer.writerows([note] for note in notes)
            writer.writerow([])
        return buffer.getvalue()
    parts = []
    if with_provenance:
        parts += provenance_parts(records, fmt, (
            f"# Leaderboard\n\nGenerated from the result files in `{results_dir}` by `kvpolicies leaderboard` "
            "(`--format markdown --provenance`); the sweep that wrote them is resumable, so re-running it "
            "computes only missing cells. Scores are what they are: no task, prompt or seed was tuned."
        ))
        parts.append(COLUMNS)
    for index, (title, headers, body) in enumerate(tables):
        parts.append(section(title, headers, body, fmt, numbers=False))  # 1.000 stays 1.000, never 1
        if index == 0 and notes:
            parts.append("\n".join(f"<p>{escaped(note, fmt)}</p>" if fmt == "html" else note for note in notes))
    if images and fmt == "markdown":
        parts.insert(2 if with_provenance else 0, "\n".join(f"![{Path(i).stem}]({i})" for i in images))
    if failures:
        parts.append(failed_cells(failures, fmt))
    return "\n\n".join(parts) + "\n"


def plot(results_dir: Path, out_dir: Path, records: Sequence[ResultRecord] | None = None) -> list[Path]:
    """PNG figures: score vs budget per task, resident KV memory vs budget, decode speed vs budget, one set per model
    (``records``: as for :func:`render`)."""
    plt = pyplot()
    rows, _ = load_rows(load_results(results_dir) if records is None else records)
    rows = [r for r in rows if r.budget is None or isinstance(r.budget, float)]
    models = sorted({r.model for r in rows})
    plots_folder(out_dir)
    written: list[Path] = []

    def figure(name: str, ylabel: str, value, mine: list[Row], tasks: list[str], from_zero: bool = False,
               spread=None, note: str = "") -> None:
        """One panel per task; ``spread(row)`` gives a point's error bar ``(low, high)`` (None: none). Equal results
        would draw one line over another, so where bars are drawn each policy is shifted sideways by a sliver of
        the smallest budget gap (at most a third of it), and the figure says so; elsewhere points sit on their
        budgets, and line styles and markers tell equal lines apart."""
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks) + 1.8, 4.4), squeeze=False)
        dodged, barred = spread is not None, False
        for axis, task in zip(axes[0], tasks):
            axis.set_prop_cycle(color=plt.cm.tab20.colors, marker=["o", "s", "^", "D", "v"] * 4,
                                linestyle=["-", "--", ":", "-."] * 5)
            members = [r for r in mine if r.task == task]
            policies = sorted({r.policy for r in members if r.budget is not None})
            budgets = sorted({r.budget for r in members if r.budget is not None})
            gap = min((b - a for a, b in zip(budgets, budgets[1:])), default=0.1)
            for index, policy in enumerate(policies):
                dodge = (index - (len(policies) - 1) / 2) * gap / (3 * max(len(policies), 1)) if dodged else 0.0
                points = sorted((r.budget, r) for r in members if r.policy == policy
                                and r.budget is not None and value(r) is not None)
                if not points:
                    continue
                xs, ys = [b + dodge for b, _ in points], [value(r) for _, r in points]
                line, = axis.plot(xs, ys, label=policy, alpha=0.85)
                bars = [spread(r) if dodged else None for _, r in points]
                if any(bar is not None for bar in bars):
                    barred = True
                    below = [0.0 if bar is None else max(0.0, y - bar[0]) for y, bar in zip(ys, bars)]
                    above = [0.0 if bar is None else max(0.0, bar[1] - y) for y, bar in zip(ys, bars)]
                    axis.errorbar(xs, ys, yerr=[below, above], fmt="none", ecolor=line.get_color(), alpha=0.5,
                                  capsize=2)
            for r in members:
                if r.budget is None and value(r) is not None:
                    axis.axhline(value(r), color="black", linestyle="--", linewidth=1, label=f"{r.policy} (no eviction)")
                    band = spread(r) if dodged else None
                    if band is not None:  # the full cache's own interval, as a band
                        axis.axhspan(*band, color="black", alpha=0.07, linewidth=0)
                        barred = True
            counts = sorted({r.samples for r in members})
            n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
            axis.set_title(f"{task}\n{mine[0].model}, n = {n} per cell", fontsize=9)
            axis.set_xlabel("budget (fraction of the KV cache kept)")
            axis.set_ylabel(ylabel if ylabel != "score" else members[0].metric.split(",")[0])
            axis.grid(alpha=0.3)
            if from_zero:  # a bar of 12 vs 13 tok/s must not look like a doubling
                axis.set_ylim(bottom=0)
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        notes = [note] if note else []
        if barred:
            notes.append("Bars (and the grey band around the full cache): 95% intervals.")
        if dodged:
            notes.append("Policies are shifted sideways by up to a third of the smallest budget gap so that equal "
                         "results stay visible; each point belongs to the budget nearest it.")
        written.append(save(fig, out_dir, name, mine[0].model, models, note=" ".join(notes)))

    for model in models:  # one set per model: a line joining two models' scores would compare nothing
        mine = [r for r in rows if r.model == model]
        tasks = sorted({r.task for r in mine})
        figure("score_vs_budget", "score", lambda r: r.score, mine, tasks,
               spread=lambda r: None if r.interval is None else (r.interval.low, r.interval.high))
        figure("kv_memory_vs_budget", "resident KV MiB per sequence",
               lambda r: None if r.resident_bytes is None else r.resident_bytes / 2**20, mine, tasks, from_zero=True)
        figure("decode_speed_vs_budget", "decode tokens/s",
               lambda r: r.decode_tps, mine, [t for t in tasks if any(r.decode_tps for r in mine if r.task == t)]
               or tasks, from_zero=True, note="One run per cell: speed differences under about 15% are noise."
               + (" Cells decoded together with others (a shared prefill's rows) show their share of each step: "
                  "about N times a decoding of their own (the tables mark them 1/N)."
                  if any(r.decoded_together > 1 for r in mine) else ""))
    return written
