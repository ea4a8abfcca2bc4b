"""Does the L2-norm paper hold on this model? One command measures it and writes docs/paper-replication.md.

The paper (Devoto, Zhao, Scardapane, Minervini 2024, arXiv 2406.11430) claims: (1) a key's low L2 norm predicts
high attention, except in the first layers; (2) keeping the lowest-norm keys compresses the cache by 50% on
language modelling and needle-in-a-haystack and by 90% on passkey retrieval without accuracy loss; (3) it needs no
attention weights, so it runs with SDPA/FlashAttention. Each claim gets a measurement and a verdict computed from
it with a stated tolerance, never a hand-written conclusion.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tabulate import tabulate

from kvpolicies.engine.policy import Role
from kvpolicies.experiments.grid import PolicySpec, SweepConfig, default_tasks
from kvpolicies.registry import policy_with_role
from kvpolicies.reports.statistics import compare

if TYPE_CHECKING:
    from kvpolicies.experiments.results import ResultRecord
    from kvpolicies.reports.catalogue import Latest

BUDGETS = (0.5, 0.25, 0.1)
"""Fractions kept: 50%, 75% and 90% compression."""
COMPARED = ("l2norm", "streaming", "h2o", "snapkv")
"""The paper's policy and the published ones it is set against, next to the reference and chance baselines."""
ABLATIONS = (
    PolicySpec(name="l2norm", options={"keep_highest": True}, label="l2norm, keep highest norms"),
    PolicySpec(name="l2norm", options={"uncompressed_layers": []}, label="l2norm, no skipped layers"),
    PolicySpec(name="l2norm", options={"sink_tokens": 4}, label="l2norm, + 4 sink tokens"),
)
ABLATION_BUDGETS = (0.5, 0.25)
ABLATION_TASKS = ("kvp_passkey", "kvp_niah")
ACCURACY_TOLERANCE = 0.1
"""An accuracy within this of the full cache counts as no loss: one case of the default 10-sample tasks."""
PERPLEXITY_TOLERANCE = 0.05
"""A perplexity within 5% of the full cache's counts as no loss."""
COMMAND = "kvpolicies report paper --output docs/paper-replication.md"


def baselines() -> list[str]:
    """The reference (full cache), the L2 policy, the chance baseline and the other published policies, by name."""
    reference, chance = policy_with_role(Role.REFERENCE), policy_with_role(Role.CHANCE)
    return [name for name in (reference, COMPARED[0], chance, *COMPARED[1:]) if name]


def sweeps(model: str | None = None) -> list[SweepConfig]:
    """The baselines on every default task at 50/75/90% compression, then the L2 ablations (cells shared with
    the default sweep when the results folder is)."""
    tasks = default_tasks()
    return [
        SweepConfig(models=[model], policies=baselines(), budgets=list(BUDGETS), tasks=tasks),
        SweepConfig(models=[model], policies=list(ABLATIONS), budgets=list(ABLATION_BUDGETS),
                    tasks=[t for t in tasks if t.name in ABLATION_TASKS]),
    ]


@torch.no_grad()
def kept_masks(model, ids: torch.Tensor, policy: str, budget: float, tokenizer=None) -> list[torch.Tensor]:
    """The ``[batch, kv_heads, seq]`` keep masks of every eviction during one prefill, in layer order. ``tokenizer``:
    the model's, for a policy that writes prompts or calibrates on text (KVzip, Q-Filters), as a sweep's cell has."""
    import kvpolicies.engine.cache as cache_module
    from kvpolicies.engine.cache import CompressedCache

    masks: list[torch.Tensor] = []
    original = cache_module.select

    def recording(*args, **kwargs):
        keep = original(*args, **kwargs)
        masks.append(keep.cpu())
        return keep

    cache_module.select = recording
    try:
        model(ids, cache=CompressedCache(model, policy, budget, tokenizer=tokenizer), logits_to_keep=1)
    finally:
        cache_module.select = original
    return masks


def selection_agreement(model_name: str | None, ids: torch.Tensor, policies: list[str], budget: float = 0.5,
                        device: str | None = None) -> dict[str, float | str]:
    """Per policy, the share of entries kept under SDPA that eager attention keeps too (1.0 = identical)."""
    from kvpolicies.engine.budget import BudgetError
    from kvpolicies.integrations.models import load_model

    masks: dict[str, dict[str, list[torch.Tensor]]] = {"sdpa": {}, "eager": {}}
    agreement: dict[str, float | str] = {}
    for implementation in ("sdpa", "eager"):
        model, tokenizer = load_model(model_name, device=device, dtype="float32", attn_implementation=implementation)
        for name in policies:
            try:
                masks[implementation][name] = kept_masks(model, ids.to(model.device), name, budget, tokenizer)
            except BudgetError as error:  # e.g. l2norm's whole first layers on a very shallow model
                agreement[name] = f"not run: {error}"
        del model
    for name in policies:
        if name in agreement:
            continue
        same = sum(int((a & b).sum()) for a, b in zip(masks["sdpa"][name], masks["eager"][name]))
        kept = sum(int(a.sum()) for a in masks["sdpa"][name])
        agreement[name] = same / kept if kept else 1.0
    return agreement


@dataclass
class Verdict:
    claim: str
    measured: str
    holds: bool | None  # None: not measured, or undecided
    undecided: bool = False
    """A loss beyond the tolerance that its paired 95% interval reaches back within, or that its paired test cannot
    tell from none: not decided at this n."""

    def row(self) -> list[str]:
        mark = "undecided at this n" if self.undecided else {True: "holds", False: "does not hold",
                                                              None: "not measured"}[self.holds]
        return [self.claim, self.measured, mark]


def paired_loss(ours: ResultRecord, full: ResultRecord, allowed: float) -> tuple[str, bool | None]:
    """The paired comparison of a policy's cell with the full cache's: its words for the page, and whether the
    loss exceeds ``allowed`` (in the score's units, a positive number) over all of its 95% interval and the paired
    test tells it from none (None: the records kept no per-sample outcomes to compare)."""
    if ours.outcomes is None or full.outcomes is None or ours.outcomes.statistic != full.outcomes.statistic:
        return "", None
    found = compare(ours.outcomes.statistic, ours.outcomes.by_doc(), full.outcomes.by_doc())
    if found is None:
        return "", None
    # A loss is a lower score for an accuracy, a higher one for a perplexity; one the paired test cannot tell from
    # none (a bootstrap interval over 2 documents can exclude anything) decides nothing.
    beyond = (found.high < -allowed if ours.higher_is_better else found.low > allowed) and found.significant
    return f"; paired: {found.text(2)}", beyond


def verdicts(latest: Latest, correlation: dict[str, Any] | None) -> list[Verdict]:
    """The paper's claims against the measurements, with the tolerances stated in this module."""
    reference = policy_with_role(Role.REFERENCE)

    def get(task: str, policy: str | None, budget: float) -> ResultRecord | None:
        return latest.get((task, policy, 1.0 if policy == reference else budget))

    found = []
    if correlation:
        negative, cells = correlation["negative"], correlation["cells"]
        found.append(Verdict(
            "low key norm ↔ high attention (most layers)",
            f"Spearman ρ < 0 in {negative} of {cells} layer × head cells, mean {correlation['mean']:+.2f}",
            negative > cells / 2,
        ))
    else:
        found.append(Verdict("low key norm ↔ high attention (most layers)", "", None))
    for task, budget, label in (("kvp_ppl", 0.5, "language modelling at 50% compression"),
                                ("kvp_niah", 0.5, "needle in a haystack at 50% compression"),
                                ("kvp_passkey", 0.1, "passkey retrieval at 90% compression")):
        mine, reference_cell = get(task, "l2norm", budget), get(task, reference, 1.0)
        if mine is None or reference_cell is None:
            found.append(Verdict(f"no loss: {label}", "", None))
            continue
        ours, full = mine.score, reference_cell.score
        if task == "kvp_ppl":
            measured = f"perplexity {ours:.2f} vs {full:.2f} with the full cache (tolerance +{PERPLEXITY_TOLERANCE:.0%})"
            within = ours <= full * (1 + PERPLEXITY_TOLERANCE)
            allowed = full * PERPLEXITY_TOLERANCE
        else:
            measured = f"accuracy {ours:.2f} vs {full:.2f} with the full cache (tolerance {ACCURACY_TOLERANCE})"
            within = ours >= full - ACCURACY_TOLERANCE
            allowed = ACCURACY_TOLERANCE
        tested, beyond = paired_loss(mine, reference_cell, allowed)
        # A loss beyond the tolerance that its interval or its paired test cannot confirm decides nothing at this n.
        undecided = not within and beyond is False
        found.append(Verdict(f"no loss: {label}", measured + tested, None if undecided else within, undecided))
    return found


def score_table(latest: Latest, task: str, policies: list[str], budgets: tuple[float, ...]) -> str:
    headers = ["policy", *(f"keep {b:.0%} ({1 - b:.0%} compression)" for b in budgets)]
    reference = policy_with_role(Role.REFERENCE)
    rows = []
    for policy in policies:
        cells = []
        for budget in budgets:
            record = latest.get((task, policy, 1.0 if policy == reference else budget))
            cells.append("" if record is None else f"{record.score:.3f}")
        rows.append([f"{policy} (reference)" if policy == reference else policy, *cells])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def plot_scores(latest: Latest, out_dir: Path, policies: list[str]) -> list[Path]:
    """Score vs fraction kept, one PNG per task, the replication's policies only."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    reference = policy_with_role(Role.REFERENCE)
    paths = []
    for task in sorted({key[0] for key in latest}):
        fig, axis = plt.subplots(figsize=(6, 4))
        metric = ""
        for policy in policies:
            points = sorted((budget, record.score) for (t, p, budget), record in latest.items()
                            if t == task and p == policy and isinstance(budget, float))
            if policy == reference and points:
                axis.axhline(points[0][1], color="black", linestyle="--", label="full cache")
            elif points:
                axis.plot(*zip(*points), marker="o", label=policy)
            metric = metric or next((r.primary_metric for (t, p, _), r in latest.items() if t == task), "")
        axis.set_xlabel("fraction of the KV cache kept")
        axis.set_ylabel(metric.split(",")[0])
        axis.set_title(task)
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
        fig.tight_layout()
        path = out_dir / f"{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def page(latest: Latest, records: list[ResultRecord], correlation: dict[str, Any] | None,
         agreement: dict[str, float | str] | None, bench: dict[str, dict[str, Any]], images: dict[str, str],
         model: str | None, today: date | None = None) -> str:
    """The markdown page; every number comes from the arguments."""
    from kvpolicies.reports.leaderboard import provenance

    ablation_labels = [spec.title for spec in ABLATIONS]
    reference, chance = policy_with_role(Role.REFERENCE), policy_with_role(Role.CHANCE)
    lines = [
        "# Replicating the L2-norm paper on this model",
        "",
        f"Generated on {(today or date.today()).isoformat()} by `{COMMAND}` on "
        f"{model or 'the embedded SmolLM2-135M-Instruct'}; do not edit by hand. The paper: Devoto, Zhao, Scardapane, "
        "Minervini 2024, *A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression* (arXiv 2406.11430), "
        "measured on Llama-2-7B.",
        "",
        "## Verdicts",
        "",
        tabulate([v.row() for v in verdicts(latest, correlation)], headers=["claim", "measured here", "verdict"],
                 tablefmt="github"),
        "",
    ]
    if correlation:
        lines += [
            "## 1. Key norm vs attention received",
            "",
            f"Spearman and Pearson correlation between each key's L2 norm and the attention it receives from the "
            f"last {correlation['window']} queries of a {correlation['tokens']}-token natural-text prompt (the first "
            "`kvp_niah` sample), per layer (mean over KV heads); top-k overlap is the share of the lowest-norm half "
            "that is also in the most-attended half (chance: 0.5). Negative ρ is what the paper predicts.",
            "",
            tabulate(correlation["rows"], headers=["layer", "Spearman ρ (mean)", "min over heads", "Pearson (mean)",
                                                    "top-half overlap"], tablefmt="github"),
            "",
            *[f"![{name}]({path})" for name, path in images.items() if name.startswith("norm")],
            "",
        ]
    lines += ["## 2. Accuracy and perplexity vs budget", ""]
    for task in ("kvp_ppl", "kvp_niah", "kvp_passkey"):
        what = {"kvp_ppl": "word perplexity (lower is better), documents streamed through the cache in chunks, so "
                           "the budget binds while they are read (decode-time eviction)",
                "kvp_niah": "exact match: a magic number hidden in natural documentation text",
                "kvp_passkey": "exact match: a passkey hidden in repeated filler sentences"}[task]
        lines += [f"### {task}: {what}", "", score_table(latest, task, baselines(), BUDGETS), ""]
        if task in images:
            lines += [f"![{task}]({images[task]})", ""]
    lines += [
        "## Ablations",
        "",
        "Same budget mechanics; only the L2 policy's options change (default: skip layers 0 and 1, no sinks).",
        "",
    ]
    for task in ABLATION_TASKS:
        lines += [f"### {task}", "", score_table(latest, task, [reference, "l2norm", *ablation_labels, chance],
                                                  ABLATION_BUDGETS), ""]
    lines += ["## 3. Attention-implementation compatibility and cost", ""]
    if agreement:
        flash = importlib.util.find_spec("flash_attn") is not None
        lines += [
            "Share of the entries kept under SDPA that are also kept under eager attention, one prefill of the "
            "same prompt at budget 0.5 (1.000 = identical selections). Scores never read the attention kernel's "
            "output; differences can only come from last-bit differences in the keys themselves."
            + ("" if flash else " flash-attn is not installed here, so FlashAttention was not run."),
            "",
            tabulate([[name, f"{value:.4f}" if isinstance(value, float) else value] for name, value in agreement.items()],
                     headers=["policy", "same selection (SDPA vs eager)"], tablefmt="github", disable_numparse=True),
            "",
        ]
    if bench:
        full = bench.get(reference)
        rows = [[name, m["budget"], f"{m['policy_prefill_s'] / m['prefill_s']:.1%}", f"{m['prefill_s']:.2f}",
                 f"{m['decode_tokens_per_s'] / full['decode_tokens_per_s']:.2f}×" if full else ""]
                for name, m in bench.items() if name in baselines()]
        lines += [
            "Time spent in each policy (signals, scoring, selection, packing) as a share of prefill, and decode "
            "speed relative to the full cache (`kvpolicies bench`):",
            "",
            tabulate(rows, headers=["policy", "budget", "policy time / prefill", "prefill s", "decode vs full"],
                     tablefmt="github"),
            "",
        ]
    used = [r for r in records if r.status == "ok"]
    lines += ["## Provenance", "", "```", *provenance(used), "```", ""]
    return "\n".join(lines)


def correlation_summary(model_name: str | None, tokens: int = 2048, window: int = 64, device: str | None = None,
                        plots: Path | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Per-layer norm/attention correlation on the first kvp_niah prompt, and its figures."""
    from kvpolicies_evals.data import niah_samples

    from kvpolicies.experiments.analysis import norm_attention, plot_norm_attention
    from kvpolicies.integrations.models import load_model

    model, tokenizer = load_model(model_name, device=device, dtype="float32")
    text = niah_samples(lengths=[tokens], per_cell=1, tokenizer=tokenizer)[0]["prompt"]
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    result = norm_attention(model, ids, window=window)
    rows = [[layer, f"{result.spearman[layer].mean():+.2f}", f"{result.spearman[layer].min():+.2f}",
             f"{result.pearson[layer].mean():+.2f}", f"{result.overlap[layer].mean():.2f}"]
            for layer in range(result.spearman.shape[0])]
    summary = {"rows": rows, "negative": int((result.spearman < 0).sum()), "cells": result.spearman.numel(),
               "mean": float(result.spearman.mean()), "tokens": result.tokens, "window": window, "ids": ids.cpu()}
    images = {}
    if plots is not None:
        last = result.spearman.shape[0] - 1
        try:
            heatmap, scatter = plot_norm_attention(result, plots, [0, 1, last // 2, last])
            images = {"norm heatmap": heatmap, "norm scatter": scatter}
        except ImportError:
            pass
    return summary, images


def replicate(results_dir: Path, plots_dir: Path, output: Path | None, model: str | None = None,
              run: bool = True, bench_json: Path | None = None, device: str | None = None,
              progress: Callable[[str], None] = print) -> str:
    """Run what is missing (sweeps, correlation, compatibility, benchmark) and return the page."""

    from kvpolicies.reports.catalogue import (
        benchmark_by_policy,
        chosen_records,
        run_missing,
    )

    if run:
        run_missing(sweeps(model), results_dir, progress)
    progress("measuring the norm/attention correlation")
    correlation, images = correlation_summary(model, device=device, plots=plots_dir)
    progress("comparing selections under SDPA and eager attention")
    agreement = selection_agreement(model, correlation.pop("ids"), ["l2norm", "snapkv", "h2o"], device=device)
    if run and bench_json is not None and not bench_json.exists():
        from kvpolicies.experiments.bench import benchmark

        progress("benchmarking every policy at 2048 tokens, budget 0.25")
        benchmark(model, device=device, json_path=bench_json)
    latest, used = chosen_records(results_dir, model, set(baselines()) | {spec.title for spec in ABLATIONS})
    base = output.parent if output else Path.cwd()
    task_images = {path.stem: path for path in plot_scores(latest, plots_dir, baselines())}
    relative = {name: os.path.relpath(path, base) for name, path in (images | task_images).items()}
    _, bench = benchmark_by_policy(bench_json)
    return page(latest, used, correlation, agreement, bench, relative, model)
