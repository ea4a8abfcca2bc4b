"""``--models-table PATH``: write the support table of ``docs/models.md`` from the architecture matrix's results.

The table is never written by hand: every cell is a count of tests that passed in this very run, and an
architecture's features are read from its config and modules, not typed in. Run it as

    python -m pytest tests/test_architectures.py --models-table docs/models.md

A partial run (``-k``) or a failing one still writes what it saw, and says so.
"""

from __future__ import annotations

import datetime
import platform
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import transformers

CHECKS = {
    "test_a_budget_that_keeps_everything_gives_the_models_own_logits": "full budget = model's logits",
    "test_greedy_decoding_at_full_budget_is_the_models_own": "full-budget decoding = model's",
    "test_a_quarter_budget_holds_every_head_to_its_allocation_and_the_bytes_to_the_physical_limit":
        "quarter budget held per head",
    "test_greedy_generation_with_decode_time_eviction_runs": "greedy decoding with eviction",
    "test_a_left_padded_batch_keeps_for_each_prompt_what_it_keeps_alone": "padded batch = alone",
    "test_attention_signals_equal_the_models_own_eager_attention_weights": "signals = eager weights",
    "test_kept_entries_replayed_through_transformers_own_cache_give_the_same_next_token": "replay = DynamicCache",
    "test_resident_bytes_never_exceed_the_models_own_cache": "bytes <= model's cache",
    "test_ties_in_bf16_break_towards_the_older_entry": "bf16 ties: older kept",
    "test_the_layer_view_reads_each_layers_own_output_projection_and_rope": "W_o and RoPE = model's",
    "test_half_precision_keeps_the_models_own_logits_at_full_budget_and_stays_finite_compressed": "half precision",
}
UNSUPPORTED_CHECK = "test_architectures_without_per_token_keys_and_values_are_refused_with_what_is_missing"
REFUSAL_TESTS = {
    "test_a_model_written_without_the_attention_interface_is_refused_before_any_result":
        ("attention not written with AttentionInterface", "a Llama subclass transformers cannot switch to another "
                                                           "attention"),
    "test_learned_attention_sinks_are_refused_before_any_result": ("gpt-oss (learned attention sinks)", "GptOss"),
}
"""Refusal tests that are not parametrized by architecture: test name -> (row name, transformers class)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--models-table", metavar="PATH", default=None,
                     help="write the architecture support table (docs/models.md) from this run's results")


class Collector:
    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str], list[str]] = defaultdict(list)  # (architecture, check) -> outcomes
        self.refusals: dict[str, tuple[str, str]] = {}  # architecture -> (outcome, error text)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        outcome = yield
        report = outcome.get_result()
        name = getattr(item, "originalname", "")
        if report.when == "setup" and report.passed:
            return
        if report.when == "teardown" and report.passed:
            return
        params = getattr(getattr(item, "callspec", None), "params", {})
        architecture = REFUSAL_TESTS[name][0] if name in REFUSAL_TESTS else params.get("architecture")
        if architecture is None:
            return
        result = "skipped" if report.skipped else ("passed" if report.passed else "failed")
        if name == UNSUPPORTED_CHECK or name in REFUSAL_TESTS:
            text = dict(report.user_properties).get("refusal", "")
            self.refusals[architecture] = (result, text)
        elif name in CHECKS:
            check = CHECKS[name]
            if name.startswith("test_half_precision"):
                check = f"{check} ({params['dtype']})".replace("torch.", "")
            self.outcomes[(architecture, check)].append(result)


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--models-table"):
        config._models_table = Collector()
        config.pluginmanager.register(config._models_table, "models-table")


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--models-table")
    collector = getattr(session.config, "_models_table", None)
    if path and collector is not None:
        Path(path).write_text(render(collector))


def features(name: str) -> str:
    """The attention details this architecture exercises, read from its config and its attention module."""
    from kvpolicies import LayerView, ModelLoadError
    from kvpolicies.engine.layout import layer_windows
    from tests.architectures import ARCHITECTURES, build

    model = build(ARCHITECTURES[name])
    config = model.config.get_text_config(decoder=True)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    shape = "MHA" if heads == kv_heads else "MQA" if kv_heads == 1 else "GQA"
    found = [f"{shape} {heads}/{kv_heads} heads"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim != config.hidden_size // heads:
        found.append(f"head_dim {head_dim} ≠ hidden/heads {config.hidden_size // heads}")
    attention = next(module for module in model.modules() if hasattr(module, "layer_idx") and hasattr(module, "config")
                     and any(hasattr(module, p) for p in ("q_proj", "qkv_proj")))
    if hasattr(attention, "qkv_proj"):
        found.append("fused qkv")
    if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
        found.append("QK-norm")
    if getattr(config, "attn_logit_softcapping", None):
        found.append(f"logit soft-cap {config.attn_logit_softcapping:g}")
    if getattr(config, "query_pre_attn_scalar", None):
        found.append(f"scaling 1/√{config.query_pre_attn_scalar}")
    windows = layer_windows(model)
    sliding = sum(window is not None for window in windows)
    if sliding:
        found.append(f"sliding window {max(w for w in windows if w)} on {sliding}/{len(windows)} layers")
    rope = getattr(config, "rope_parameters", None) or {}
    if any(isinstance(value, dict) for value in rope.values()):
        found.append("RoPE per layer type")
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) if isinstance(
        rope, dict) else 1.0
    if factor and factor < 1:
        found.append(f"partial rotary {factor:g}")
    try:
        LayerView(attention).rotary  # the reader policies use: it refuses interleaved pairs
    except ModelLoadError as error:
        if "interleaved" in str(error):
            found.append("interleaved RoPE")
    if any(getattr(config, key, None) for key in ("num_experts", "num_local_experts")):
        found.append("MoE")
    found.append(f"{config._attn_implementation.removeprefix('kvpolicies-')} attention")
    return ", ".join(found)


def _cell(results: list[str]) -> str:
    if not results:
        return "not run"
    failed = results.count("failed")
    passed = results.count("passed")
    return f"{passed}/{len(results)} **{failed} failed**" if failed else f"{passed}/{len(results)}"


def render(collector: Collector) -> str:
    from tests.architectures import ALL_WINDOWED, ARCHITECTURES, REFUSED, UNSUPPORTED

    order = list(CHECKS.values())
    checks = sorted({check for _, check in collector.outcomes},  # by CHECKS, then dtype: the same on every run
                    key=lambda c: (order.index(c.split(" (")[0]) if c.split(" (")[0] in order else 99, c))
    ran = sorted({architecture for architecture, _ in collector.outcomes})
    failed = sum(r.count("failed") for r in collector.outcomes.values())
    passed = sum(r.count("passed") for r in collector.outcomes.values())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [
        "# Supported models",
        "",
        "<!-- Generated by `python -m pytest tests/test_architectures.py --models-table docs/models.md`; do not edit "
        "by hand. -->",
        "",
        f"Generated {now} from the architecture matrix (`tests/test_architectures.py`): {passed} passed, {failed} "
        f"failed, on {platform.machine()} CPU with torch {torch.__version__} and transformers "
        f"{transformers.__version__}. Each architecture is a tiny random-weight model (2 layers, hidden size 64) "
        "built from transformers' own config and model classes, run through every registered policy.",
        "",
        "**CUDA: not run.** The matrix runs on CPU (float32, bfloat16, float16); no GPU was available to the "
        "sessions that built it, so no cell below has run under CUDA.",
        "",
        "## What each check asserts",
        "",
        "- *full budget = model's logits*: a budget of 1.0 gives the logits of a plain forward (float32, atol 1e-5).",
        "- *full-budget decoding = model's*: 12 greedy tokens at budget 1.0 equal `model.generate` with "
        "transformers' own cache (windows slide during decoding).",
        "- *quarter budget held per head*: at 0.25 every layer (and head, unless the policy moves entries between "
        "heads) holds exactly its allocation; sliding layers, which share the budget, never more than their W − 1; "
        "resident bytes = kept × entry bytes.",
        "- *greedy decoding with eviction*: 20 greedy tokens at 0.5 with decode-time eviction (a window holds at most "
        "W − 1 plus the slack: what slid out is hidden until the next eviction drops it).",
        "- *padded batch = alone*: two left-padded prompts keep, each, exactly the entries they keep alone.",
        "- *signals = eager weights*: the ATTENTION and CUMULATIVE_ATTENTION signals equal the model's own eager "
        "attention weights (atol 1e-4; soft-cap, QK-norm, scaling included).",
        "- *replay = DynamicCache*: after a compressed prefill, the kept entries put into transformers' "
        "`DynamicCache` give the same next-token logits (atol 1e-5; windows held whole where full layers sit "
        "beside them, as `DynamicCache` holds them).",
        "- *bytes <= model's cache*: at budgets 0.3, 0.5, 0.75 and 1.0 the resident bytes stay at or below the "
        "model's own cache (sliding layers: W − 1 entries), which is also what the budget is a fraction of.",
        "- *bf16 ties: older kept*: in bfloat16, with scores full of ties, the kept set is the highest scores with "
        "ties going to the older entry, the same on every run.",
        "- *W_o and RoPE = model's*: the output projection and RoPE frequencies policies read (`LayerView`) are "
        "the model's own for every layer (per layer type, partial rotary); interleaved RoPE is refused.",
        "- *half precision (bf16/fp16)*: bit-identical logits at budget 1.0; finite logits at 0.3 through prefill "
        "and 3 decoding steps.",
        "",
        "## Supported architectures",
        "",
        "| architecture | transformers class | attention features | float32 | bfloat16 | float16 | "
        "tests passed | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ran:
        results = {check: collector.outcomes.get((name, check), []) for check in checks}
        every = [r for rs in results.values() for r in rs]
        bad = [check for check, rs in results.items() if "failed" in rs]
        fp32 = [r for check, rs in results.items() if "half precision" not in check and "bf16" not in check
                for r in rs]
        bf16 = [r for check, rs in results.items() if "bfloat16" in check or "bf16" in check for r in rs]
        fp16 = [r for check, rs in results.items() if "float16" in check and "bfloat16" not in check for r in rs]
        notes = []
        if name in ALL_WINDOWED:
            notes.append("every layer windowed: the windows share the budget (the default); with `windows=keep` "
                         "budgets below the model's own cache are refused (BudgetError, tested)")
        notes += [f"`{policy}` refused: {reason} (ModelLoadError, tested)" for (arch, policy), reason in
                  REFUSED.items() if arch == name]
        if bad:
            notes.append("FAILED: " + ", ".join(bad))
        config_class = ARCHITECTURES[name][0]
        lines.append(
            f"| {name} | {config_class.removesuffix('Config')} | {features(name)} | {_ok(fp32)} | {_ok(bf16)} | "
            f"{_ok(fp16)} | {_cell(every)} | {'; '.join(notes)} |"
        )
    lines += ["", "Per check (passed / run, over every registered policy where the check is per policy):", ""]
    lines.append("| architecture | " + " | ".join(checks) + " |")
    lines.append("|---|" + "---|" * len(checks))
    for name in ran:
        lines.append(f"| {name} | " + " | ".join(_cell(collector.outcomes.get((name, c), [])) for c in checks) + " |")
    lines += ["", "## Refused architectures", "",
              "Refused when the `CompressedCache` is built (learned sinks: at the first attention), before any result "
              "is produced.",
              "", "| architecture | transformers class | test | error |", "|---|---|---|---|"]
    classes = {name: spec[0].removesuffix("Config") for name, spec in UNSUPPORTED.items()}
    classes |= dict(REFUSAL_TESTS.values())
    for name in [*sorted(UNSUPPORTED), *(row for row, _ in REFUSAL_TESTS.values())]:
        result, text = collector.refusals.get(name, ("not run", ""))
        lines.append(f"| {name} | {classes[name]} | {result} | {text.replace('|', '/')} |")
    missing = sorted(set(ARCHITECTURES) - set(ran))
    if missing or failed:
        lines += ["", f"**Incomplete run**: {failed} failed; not run: {', '.join(missing) or 'none'}."]
    return "\n".join(lines) + "\n"


def _ok(results: list[str]) -> str:
    if not results:
        return "not run"
    return "FAIL" if "failed" in results else "✓"
