"""Generated documentation pages: the policy catalogue (docs/policies.md) from saved sweep and benchmark results.

Nothing here computes a result: pages are rendered from result files, so a page always says what was measured,
with which versions, and how to measure it again.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from tabulate import tabulate

from kvpolicies.engine.budget import Budget
from kvpolicies.engine.policy import Policy, Role, Signal
from kvpolicies.experiments.results import ResultRecord, budget_key, load_results
from kvpolicies.registry import PolicyInfo, get_policy, list_policies, policy_with_role
from kvpolicies.reports.points import shown

Latest = dict[tuple[str, str, float | str], ResultRecord]
"""Finished records by (task, policy title, budget as :func:`~kvpolicies.experiments.results.budget_key`), task and
title named apart where two points share them (:func:`latest_records`)."""

CATALOGUE_TASKS = ("kvp_passkey", "kvp_niah")
CATALOGUE_BUDGETS = (0.5, 0.25)
CATALOGUE_COMMAND = "kvpolicies report policies --output docs/policies.md"


def decode_behaviour(policy: Policy) -> str:
    """What the policy does while generating, derived from what it reads (so it cannot drift from the code)."""
    if not policy.compresses:
        return "never evicts"
    needs, window = policy.needs, policy.query_window
    if policy.tracks:
        what = (f"updates its tracks ({', '.join(track.name for track in policy.tracks)}) with every new query's "
                "attention (one q·Kᵀ per layer per token)")
    elif Signal.CUMULATIVE_ATTENTION in needs:
        what = "adds every new query's attention to each entry's running total (one q·Kᵀ per layer per token)"
    elif Signal.ATTENTION in needs:
        what = (f"re-scores with the attention of the last {window} queries (prompt and generated)" if window
                else "re-scores with the attention of the queries that triggered the eviction")
    elif Signal.QUERIES in needs:
        what = (f"re-estimates from the last {window} queries" if window
                else "re-estimates from the queries that triggered the eviction")
    elif needs & {Signal.KEYS, Signal.VALUES}:
        what = f"re-scores the held {' and '.join(sorted(s.value for s in needs & {Signal.KEYS, Signal.VALUES}))}"
    else:
        what = "re-ranks by position or chance, reading no tensor"
    return f"{what}; evicts when a head exceeds its allocation by the slack"


def latest_records(records: Sequence[ResultRecord]) -> Latest:
    """Finished records of one model by (task, policy title, budget), each point once, as last measured, and named
    apart as the leaderboard names it (:func:`~kvpolicies.reports.points.shown`).

    Why points and not titles: two policies given one label, two budgets differing only in slack, or two runs of a
    task on other data are different results, and the newest of them must not stand in for the others; a variant
    that collides is looked up by its longer name (``snapkv (slack 0)``), so the plain name is never the wrong
    cell. Budgets match as values, so a cell swept at ``"50%"`` is the one at 0.5. A model is no part of a name
    (pages show models apart), so the records must be one model's.
    """
    models = sorted({record.identity.model for record in records})
    if len(models) > 1:
        raise ValueError(f"latest_records takes one model's records, got {', '.join(models)}")
    finished = [record for record in records if record.status == "ok"]
    return {(point.task, point.title, budget_key(point.record.cell.budget)): point.record for point in shown(finished)}


def run_missing(configs: list, results_dir: Path, progress: Callable[[str], None] = print) -> None:
    """Run every cell of ``configs`` not yet finished in ``results_dir``; a failed cell is reported, not raised."""
    from kvpolicies.experiments.sweep import run_sweep

    for config in configs:
        for record in run_sweep(config, results_dir):
            if record.status != "ok":
                progress(f"cell failed: {record.error}")


def chosen_records(results_dir: Path, model: str | None, titles: set[str],
                   task: str | None = None) -> tuple[Latest, list[ResultRecord]]:
    """A page's cells: the newest finished record per point of ``model`` (:func:`latest_records`) for the given
    policy titles (and task), and the list of those records for the provenance."""
    from kvpolicies.integrations.models import EMBEDDED_MODEL

    records = [r for r in load_results(results_dir) if r.identity.model == (model or EMBEDDED_MODEL)
               ] if results_dir.is_dir() else []
    latest = {key: record for key, record in latest_records(records).items()
              if key[1] in titles and (task is None or key[0] == task)}
    used = [r for r in records if any(r is record for record in latest.values())]
    return latest, used


def benchmark_by_policy(path: Path | None) -> tuple[str, dict[str, dict[str, Any]]]:
    """Header and the measurement per policy at the fraction budget closest to 0.25, from ``kvpolicies bench
    --json``; a file that is no such output is skipped with a warning, as a page must render without it."""
    if path is None or not path.exists():
        return "", {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        header, results = data.get("header", ""), list(data["results"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        print(f"kvpolicies: warning: skipped {path}: not a `kvpolicies bench --json` output "
              f"({type(error).__name__}: {error})", file=sys.stderr)
        return "", {}
    chosen: dict[str, tuple[float, dict[str, Any]]] = {}
    for result in results:
        if not isinstance(result, dict) or "policy" not in result:
            continue
        distance = _distance_from_quarter(result.get("budget"))
        if distance is not None and (result["policy"] not in chosen or distance < chosen[result["policy"]][0]):
            chosen[result["policy"]] = (distance, result)
    return header, {name: result for name, (_, result) in chosen.items()}


def _distance_from_quarter(spec: Any) -> float | None:
    """How far a measured budget is from keeping 0.25 of the cache; None for tokens or bytes, which are no fraction
    (so no distance), and for a budget that cannot be read."""
    try:
        budget = Budget.parse(spec)
    except ValueError:
        return None
    return abs(budget.value - 0.25) if budget.unit == "fraction" else None


def catalogue_sweep():
    """The cells the catalogue shows: every policy at 0.5 and 0.25 on the default passkey and needle tasks (the same
    cells as the default sweep's, so a results folder shared with it is reused)."""
    from kvpolicies.experiments.grid import SweepConfig, default_tasks

    tasks = [task for task in default_tasks() if task.name in CATALOGUE_TASKS]
    return SweepConfig(budgets=list(CATALOGUE_BUDGETS), tasks=tasks)


def _catalogue_model() -> str:
    """The model the catalogue's cells run on: a shared results folder may hold other models' cells too, which
    are other results, not newer measurements of these."""
    from kvpolicies.integrations.models import EMBEDDED_MODEL

    [model] = catalogue_sweep().models
    return model or EMBEDDED_MODEL


def above_chance(mine: ResultRecord, floor: ResultRecord) -> str:
    """`` ▲`` where ``mine`` beats the chance baseline's cell by a paired test, `` △`` where it scores higher but
    the records kept no per-sample outcomes to test it with, else nothing."""
    from kvpolicies.reports.statistics import compare

    if mine.outcomes is None or floor.outcomes is None or mine.outcomes.statistic != floor.outcomes.statistic:
        return " △" if mine.score > floor.score else ""
    found = compare(mine.outcomes.statistic, mine.outcomes.by_doc(), floor.outcomes.by_doc())
    better = found is not None and (found.difference > 0) == mine.higher_is_better and found.difference != 0
    return " ▲" if better and found.significant else ""


def policies_page(results_dir: Path, bench_json: Path | None = None, today: date | None = None) -> str:
    """Markdown of every registered policy: paper, signals, cost, decode behaviour, scores next to chance."""
    from kvpolicies.reports.leaderboard import provenance

    model = _catalogue_model()
    records = [r for r in load_results(results_dir) if r.identity.model == model] if results_dir.is_dir() else []
    latest = latest_records(records)
    header, bench = benchmark_by_policy(bench_json)
    reference, chance = policy_with_role(Role.REFERENCE), policy_with_role(Role.CHANCE)
    baselines = [name for name in (reference, chance) if name]
    full_bench = bench.get(reference)

    on_page: dict[int, ResultRecord] = {}  # the records the table shows, for the provenance

    def cell(task: str, policy: str | None, budget: float) -> ResultRecord | None:
        record = latest.get((task, policy, 1.0 if policy == reference else budget))
        if record is not None:
            on_page[id(record)] = record
        return record

    def score(task: str, policy: str | None, budget: float) -> float | None:
        record = cell(task, policy, budget)
        return None if record is None else record.score

    infos: list[PolicyInfo] = list_policies()
    order = baselines + sorted(i.name for i in infos if i.name not in baselines)
    by_name = {info.name: info for info in infos}
    rows = []
    for name in order:
        if name not in by_name:
            continue
        info, policy = by_name[name], get_policy(name)
        cells = []
        for task in CATALOGUE_TASKS:
            for budget in CATALOGUE_BUDGETS:
                mine, floor = cell(task, name, budget), cell(task, chance, budget)
                mark = "" if mine is None or floor is None or name in baselines else above_chance(mine, floor)
                cells.append("" if mine is None else f"{mine.score:.2f}{mark}")
        measured = bench.get(name)
        cost = decode = ""
        if measured and measured["prefill_s"]:
            cost = f"{measured['policy_prefill_s'] / measured['prefill_s']:.1%}"
            if full_bench:
                decode = f"{measured['decode_tokens_per_s'] / full_bench['decode_tokens_per_s']:.2f}×"
        rows.append([
            f"`{name}`", info.paper, ", ".join(info.reads) or "nothing",
            "yes" if info.attention_free else "no", cost, decode, decode_behaviour(policy), *cells,
        ])
    headers = ["policy", "paper", "reads", "attention-free", "policy time / prefill", "decode speed vs full",
               "during decoding", *(f"{t.removeprefix('kvp_')} @{b}" for t in CATALOGUE_TASKS for b in CATALOGUE_BUDGETS)]

    used = list(on_page.values())
    samples = defaultdict(set)
    for record in used:
        samples[record.cell.task.name].add(record.samples)
    lines = [
        "# Policies",
        "",
        f"Generated on {(today or date.today()).isoformat()} by `{CATALOGUE_COMMAND}` from saved results; do not "
        "edit by hand.",
        "",
        "Every policy is a plugin registered through the `kvpolicies` entry-point group and runs under the same budget "
        "mechanics: the framework turns its scores into a kept set, stores it and counts it, so two policies at one "
        "budget hold the same number of KV entries.",
        "",
        "- **reads**: the signals `score()` receives (`kvpolicies list` shows the same). *Attention-free* policies "
        "read no attention weights, so they need no extra q·Kᵀ next to SDPA/FlashAttention.",
        "- **policy time / prefill**: time spent in the policy (signals, scoring, selection, packing) as a share of "
        "prefill; **decode speed vs full**: decoded tokens/s relative to the full cache. Both from `kvpolicies bench` "
        "at the budget nearest 0.25 (see below).",
        "- **passkey / niah @budget**: exact-match accuracy on the offline tasks at ~2k tokens (`kvp_passkey`: passkey "
        "in repeated filler; `kvp_niah`: a magic number in natural documentation text), fraction of the cache kept. "
        f"Samples per cell: {', '.join(f'{t} {sorted(n)}' for t, n in sorted(samples.items())) or 'none yet'}. "
        f"▲ marks a score above `{chance}` (the chance baseline) at the same task and budget by a paired test over "
        "the same samples (exact McNemar, p < 0.05); △ a higher score from a record that kept no per-sample "
        "outcomes, so untested. With 10 samples one case is 0.1, and a gap of 0.3 can still be chance.",
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
        "## Provenance",
        "",
        "```",
        *provenance(used),
        *([f"benchmark: {header}"] if header else ["benchmark: none (run `kvpolicies bench --json FILE`)"]),
        "```",
    ]
    missing = [(t, n, b) for n in order if n in by_name and n != reference for t in CATALOGUE_TASKS
               for b in CATALOGUE_BUDGETS if score(t, n, b) is None]
    if missing:
        lines += ["", f"Missing cells ({len(missing)}): " + ", ".join(f"{n} {t} @{b}" for t, n, b in missing)]
    return "\n".join(lines) + "\n"
