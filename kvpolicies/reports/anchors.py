"""Our policies next to kvpress's on the same kind of task: a sanity check of the attention and scoring paths.

The team measured kvpress 0.5.5's presses on the embedded model (passkey in ~2.1k tokens of natural documentation
text, 24 cases, greedy, the whole prompt compressed at prefill; table in the team notes, copied into ``KVPRESS``).
``kvpolicies report anchors`` runs the matching policies on ``kvp_passkey_text`` (same needle, same length, same
number of cases, our own haystack and depths) and writes both side by side. The anchors check faithfulness, they
are not targets: a gap beyond sampling noise needs an explanation, never a tuned default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from kvpolicies.engine.policy import Role
from kvpolicies.experiments.grid import PolicySpec, SweepConfig, TaskSpec
from kvpolicies.registry import policy_with_role

if TYPE_CHECKING:
    from kvpolicies.experiments.results import ResultRecord
    from kvpolicies.reports.catalogue import Latest

BUDGETS = (0.5, 0.25, 0.1)
CASES = 24
TASK = TaskSpec(
    name="kvp_passkey_text",
    metadata={"lengths": [2100], "depths": [round((i + 0.5) / 12, 3) for i in range(12)], "per_cell": CASES // 12},
)
"""24 passkeys in ~2.1k tokens of prose, at 12 depths evenly spread over the prompt."""
KVPRESS_FULL = 0.958
COMMAND = "kvpolicies report anchors --output docs/kvpress-anchors.md"


@dataclass(frozen=True)
class Anchor:
    press: str
    """kvpress's name for the method, as measured."""
    policy: PolicySpec
    """Our closest configuration."""
    scores: dict[float, float]
    """kvpress's accuracy by fraction of the cache kept."""
    note: str = ""
    budgets: tuple[float, ...] = field(default=BUDGETS)


def _spec(name: str, label: str | None = None, **options: Any) -> PolicySpec:
    return PolicySpec(name=name, options=options, label=label)


KVPRESS = (
    Anchor("CriticalKV(TOVA)", _spec("criticalkv"), {0.5: 0.958, 0.25: 0.792, 0.1: 0.250},
           "our criticalkv wraps tova by default"),
    Anchor("LagKV", _spec("lagkv"), {0.5: 0.958, 0.25: 0.667, 0.1: 0.125}),
    Anchor("TOVA", _spec("tova"), {0.5: 0.875, 0.25: 0.542, 0.1: 0.250},
           "ours (the issue's definition) pools the last query's attention per KV head"),
    Anchor("TOVA", _spec("tova", "tova, pooling=layer", pooling="layer"), {0.5: 0.875, 0.25: 0.542, 0.1: 0.250},
           "kvpress averages over every head of the layer and keeps the same tokens in all KV heads"),
    Anchor("KeyDiff", _spec("keydiff"), {0.5: 0.833, 0.25: 0.583, 0.1: 0.125}),
    Anchor("StreamingLLM", _spec("streaming"), {0.5: 0.500}, budgets=(0.5,)),
    Anchor("Random", _spec("random"), {0.5: 0.458, 0.25: 0.0, 0.1: 0.0}, "seeds differ: only the level compares"),
    Anchor("SnapKV", _spec("snapkv"), {0.5: 0.333, 0.1: 0.0}, budgets=(0.5, 0.1)),
    Anchor("KnormPress", _spec("l2norm", "l2norm, all layers", uncompressed_layers=[]),
           {0.5: 0.250, 0.25: 0.0, 0.1: 0.0}, "every layer compressed, no sinks, as KnormPress"),
    Anchor("KnormPress, first two layers skipped", _spec("l2norm"), {0.5: 0.125}, "our default l2norm",
           budgets=(0.5,)),
    Anchor("ExpectedAttention", _spec("expected_attention"), {0.5: 0.167}, budgets=(0.5,)),
)


def sweeps(model: str | None = None) -> list[SweepConfig]:
    """The full cache, then one grid per budget, largest first: an interrupted run has the most telling cells."""
    reference = policy_with_role(Role.REFERENCE)
    configs = [SweepConfig(models=[model], policies=[reference], budgets=[0.5], tasks=[TASK])] if reference else []
    for budget in BUDGETS:
        policies = [anchor.policy for anchor in KVPRESS if budget in anchor.budgets]
        configs.append(SweepConfig(models=[model], policies=policies, budgets=[budget], tasks=[TASK]))
    return configs


def within_noise(ours: float, theirs: float, cases: int = CASES) -> bool:
    """Whether two accuracies over ``cases`` each differ by at most two standard errors of their difference.

    The pooled binomial variance is used, with at least one case on each side so that 0 vs 0.125 is not called
    significant just because both variances vanish.
    """
    pooled = min(max((ours + theirs) / 2, 1 / cases), 1 - 1 / cases)
    return abs(ours - theirs) <= 2 * math.sqrt(2 * pooled * (1 - pooled) / cases) + 1e-9


def rows(latest: Latest) -> list[list[str]]:
    """One row per anchor: kvpress vs ours at each budget, with a mark where the gap exceeds the noise."""
    table = []
    for anchor in KVPRESS:
        row = [anchor.press, anchor.policy.title]
        for budget in BUDGETS:
            theirs = anchor.scores.get(budget)
            record = latest.get((TASK.name, anchor.policy.title, budget))
            if theirs is None and record is None:
                row.append("")
                continue
            ours = "" if record is None else f"{record.score:.3f}"
            text = f"{ours or '—'} / {'—' if theirs is None else f'{theirs:.3f}'}"
            if record is not None and theirs is not None and not within_noise(record.score, theirs):
                text += " **≠**"
            row.append(text)
        table.append([*row, anchor.note])
    return table


def page(latest: Latest, records: list[ResultRecord], model: str | None, today: date | None = None) -> str:
    from kvpolicies.reports.leaderboard import provenance

    full = latest.get((TASK.name, policy_with_role(Role.REFERENCE), 1.0))
    full_text = "not run" if full is None else f"{full.score:.3f}"
    lines = [
        "# kvpress reference measurements next to ours",
        "",
        f"Generated on {(today or date.today()).isoformat()} by `{COMMAND}` on "
        f"{model or 'the embedded SmolLM2-135M-Instruct'}; do not edit by hand.",
        "",
        "The team measured kvpress 0.5.5 on the embedded model: a 5-digit passkey stated twice (`The pass key is N. "
        "Remember it. N is the pass key.`), hidden in ~2.1k tokens of natural documentation text, 24 cases, greedy, "
        "the whole prompt (question included) compressed at prefill. `kvp_passkey_text` is the same kind of task "
        f"built by this project: same needle and question, {TASK.metadata['lengths'][0]} tokens, {CASES} cases at "
        "12 depths, the Python documentation as haystack; the prompts themselves differ. These numbers check that "
        "our implementations are faithful; they are not targets.",
        "",
        f"Full cache: ours {full_text}, kvpress {KVPRESS_FULL:.3f}.",
        "",
        f"Each cell: **ours / kvpress**, accuracy over {CASES} cases (one case = {1 / CASES:.3f}). **≠** marks a gap "
        "larger than two standard errors of the difference of two binomial proportions (pooled, ~0.29 at "
        "accuracy 0.5): gaps without the mark are sampling noise. — : not measured on that side.",
        "",
        tabulate(rows(latest), headers=["kvpress press", "our policy", *(f"keep {b:.0%}" for b in BUDGETS), "note"],
                 tablefmt="github", disable_numparse=True),
        "",
        "Not matched here: kvpress's AdaKV(TOVA) (0.875 / 0.542 / 0.250, the same as its TOVA: kvpress's TOVA gives "
        "every KV head the same scores, so AdaKV has nothing to move between heads) and its L2 variants with sinks.",
        "",
        "## Provenance",
        "",
        "```",
        *provenance([r for r in records if r.status == "ok"]),
        "```",
        "",
    ]
    return "\n".join(lines)


def compare(results_dir: Path, model: str | None = None, run: bool = True,
            progress: Callable[[str], None] = print) -> str:
    """Run the missing cells and return the page."""
    from kvpolicies.reports.catalogue import chosen_records, run_missing

    if run:
        run_missing(sweeps(model), results_dir, progress)
    titles = {anchor.policy.title for anchor in KVPRESS} | {policy_with_role(Role.REFERENCE)}
    latest, used = chosen_records(results_dir, model, titles, TASK.name)
    return page(latest, used, model)
