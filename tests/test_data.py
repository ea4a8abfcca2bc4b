"""Offline evaluation data: the natural-text passkey task and its check against the kvpress reference numbers."""

from __future__ import annotations

import re

import pytest
from kvpolicies_evals.data import (
    FILLER,
    PASSKEY_QUESTION,
    count_tokens,
    default_tokenizer,
    text_passkey_samples,
)

from kvpolicies.cli import main
from kvpolicies.experiments.grid import cells
from kvpolicies.registry import get_policy
from kvpolicies.reports.anchors import KVPRESS, TASK, rows, sweeps, within_noise
from tests.helpers import evaluate, make_record, write_records


def test_text_passkey_hides_the_twice_stated_key_in_prose_at_the_requested_depth():
    tokenizer = default_tokenizer()
    samples = text_passkey_samples(lengths=[600], depths=[0.2, 0.8], per_cell=2, tokenizer=tokenizer)
    assert samples == text_passkey_samples(lengths=[600], depths=[0.2, 0.8], per_cell=2, tokenizer=tokenizer)
    assert len({s["answer"] for s in samples}) == 4
    for sample in samples:
        prompt, key = sample["prompt"], sample["answer"]
        assert re.fullmatch(r"\d{5}", key)
        assert f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n" in prompt  # its own paragraph
        assert prompt.endswith(PASSKEY_QUESTION) and FILLER.strip() not in prompt
        assert 560 <= sample["tokens"] == count_tokens(tokenizer, prompt) <= 600
        sample["position"] = prompt.index("The pass key is") / len(prompt)
        assert sample["position"] <= sample["depth"] + 0.05  # at the last paragraph break before the depth
    shallow, deep = ([s["position"] for s in samples if s["depth"] == depth] for depth in (0.2, 0.8))
    assert min(deep) > max(shallow) + 0.2


@pytest.mark.slow
def test_text_passkey_is_solved_by_the_embedded_model_with_its_full_cache():
    """The task must be answerable before a policy's score on it means anything."""
    from kvpolicies.integrations.lm_eval import KVPoliciesLM

    metadata = {"lengths": [1024], "depths": [0.25, 0.5, 0.75], "per_cell": 1}
    results = evaluate(KVPoliciesLM(policy="full"), ["kvp_passkey_text"], metadata, log_samples=True)
    assert results["results"]["kvp_passkey_text"]["exact_match,first_key"] >= 2 / 3, results["samples"]


def test_within_noise_uses_two_standard_errors_of_the_difference():
    assert within_noise(0.958, 0.958) and within_noise(0.0, 0.125) and within_noise(0.5, 0.708)
    assert not within_noise(0.25, 0.875) and not within_noise(0.0, 0.458) and not within_noise(0.958, 0.5)


def test_every_anchor_maps_to_a_registered_configuration_and_one_cell_per_budget():
    for anchor in KVPRESS:
        get_policy(anchor.policy.name, **anchor.policy.options)
        assert set(anchor.scores) <= set(anchor.budgets)
    grid = list({cell.key(): cell for config in sweeps() for cell in cells(config)}.values())  # the reference once
    keys = [(c.policy.title, c.budget) for c in grid]
    assert len(keys) == len(set(keys)) == 1 + sum(len(a.budgets) for a in KVPRESS)
    assert all(c.task == TASK for c in grid)


def test_anchor_rows_mark_gaps_beyond_noise_and_show_missing_cells():
    latest = {(TASK.name, "lagkv", 0.5): make_record(TASK.name, "lagkv", 0.5, 0.917),
              (TASK.name, "l2norm, all layers", 0.5): make_record(TASK.name, "l2norm", 0.5, 0.875,
                                                                  label="l2norm, all layers")}
    table = {(row[0], row[1]): row for row in rows(latest)}
    assert table[("LagKV", "lagkv")][2] == "0.917 / 0.958"
    assert table[("LagKV", "lagkv")][3] == "— / 0.667"
    assert table[("KnormPress", "l2norm, all layers")][2] == "0.875 / 0.250 **≠**"
    assert table[("StreamingLLM", "streaming")][3] == ""


def test_report_anchors_renders_saved_cells_without_running(tmp_path, capsys):
    results = write_records(tmp_path / "results", [make_record(TASK.name, "full", 1.0, 0.917),
                                           make_record(TASK.name, "keydiff", 0.25, 0.625)])
    assert main(["report", "anchors", "--no-run", "--results", str(results)]) == 0
    text = capsys.readouterr().out
    assert "Full cache: ours 0.917, kvpress 0.958." in text
    assert "| 0.625 / 0.583 " in text
    assert any(line.startswith("code (core): 0.1.0+abc") for line in text.splitlines())


def test_passkey_text_task_runs_through_lm_eval(tiny_pretrained):
    from kvpolicies.integrations.lm_eval import KVPoliciesLM

    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="keydiff", budget=0.5)
    results = evaluate(lm, ["kvp_passkey_text"], {"lengths": [300], "depths": [0.5], "per_cell": 2})
    assert "exact_match,first_key" in results["results"]["kvp_passkey_text"]
    assert results["config"]["kvpolicies"]["kv_memory"]["sequences"] == 2
