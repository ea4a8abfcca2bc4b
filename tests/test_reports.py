"""Generated pages: the policy catalogue and the L2-norm replication, rendered from saved results."""

from __future__ import annotations

import json

import kvpolicies
from kvpolicies.reports.catalogue import decode_behaviour, policies_page
from kvpolicies.reports.replication import (
    ABLATIONS,
    replicate,
    selection_agreement,
    verdicts,
)
from tests.helpers import make_record, write_records


def test_decode_behaviour_follows_what_each_policy_reads():
    assert "running total" in decode_behaviour(kvpolicies.get_policy("h2o"))
    assert "last 1 queries" in decode_behaviour(kvpolicies.get_policy("tova"))
    assert "last 32 queries" in decode_behaviour(kvpolicies.get_policy("pyramidkv"))  # its SnapKV scorer
    assert "held keys" in decode_behaviour(kvpolicies.get_policy("l2norm"))
    assert decode_behaviour(kvpolicies.get_policy("full")) == "never evicts"


def test_policy_catalogue_marks_scores_above_random_and_lists_missing_cells(tmp_path):
    def right(*docs: int) -> dict:
        return {"statistic": "mean", "doc_ids": list(range(20)), "values": [float(i in docs) for i in range(20)]}

    results = write_records(tmp_path / "results", [
        make_record("kvp_passkey", "full", 1.0, 1.0, outcomes=right(*range(20))),
        make_record("kvp_passkey", "random", 0.5, 0.4, outcomes=right(*range(8))),
        make_record("kvp_passkey", "keydiff", 0.5, 0.9, outcomes=right(*range(18))),  # 10 more right: p 0.002
        make_record("kvp_passkey", "l2norm", 0.5, 0.4, outcomes=right(*range(8))),
        make_record("kvp_passkey", "snapkv", 0.5, 0.55, outcomes=right(*range(11))),  # 3 more right: p 0.25
        make_record("kvp_niah", "random", 0.5, 0.1),
        make_record("kvp_niah", "snapkv", 0.5, 0.3),  # no outcomes kept: higher, but untested
    ])
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"header": "test bench", "results": [
        {"policy": "full", "budget": "1.0", "prefill_s": 5.0, "policy_prefill_s": 0.0, "decode_tokens_per_s": 10.0},
        {"policy": "keydiff", "budget": "0.25", "prefill_s": 5.0, "policy_prefill_s": 0.1, "decode_tokens_per_s": 12.0},
    ]}))
    text = policies_page(results, bench)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    assert "0.90 ▲" in rows["`keydiff`"] and "2.0%" in rows["`keydiff`"] and "1.20×" in rows["`keydiff`"]
    assert "0.40 ▲" not in rows["`l2norm`"] and "0.40" in rows["`l2norm`"]  # a tie with chance is not a win
    assert "0.55  " in rows["`snapkv`"] and "0.30 △" in rows["`snapkv`"]  # not significant; untested
    assert "arXiv 2504.15364" in rows["`keydiff`"]
    assert "Missing cells" in text and "keydiff kvp_niah @0.5" in text
    assert "benchmark: test bench" in text


def test_verdicts_apply_the_stated_tolerances():
    latest = {(task, policy, budget): make_record(task, policy, budget, score) for task, policy, budget, score in [
        ("kvp_ppl", "full", 1.0, 20.0), ("kvp_ppl", "l2norm", 0.5, 20.9),
        ("kvp_niah", "full", 1.0, 0.9), ("kvp_niah", "l2norm", 0.5, 0.7), ("kvp_passkey", "full", 1.0, 1.0),
    ]}
    found = verdicts(latest, {"negative": 80, "cells": 90, "mean": -0.3})
    assert [v.holds for v in found] == [True, True, False, None]
    assert "20.90 vs 20.00" in found[1].measured


def test_selections_agree_between_sdpa_and_eager_on_a_saved_model(tiny_pretrained):
    import torch

    ids = torch.randint(3, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    agreement = selection_agreement(tiny_pretrained, ids, ["snapkv", "keydiff"], budget=0.5, device="cpu")
    assert agreement == {"snapkv": 1.0, "keydiff": 1.0}


def test_replication_page_renders_claims_from_saved_results_without_running_cells(tiny_pretrained, tmp_path):
    model = tiny_pretrained
    results = write_records(tmp_path / "results", [
        make_record("kvp_niah", "full", 1.0, 0.9, model=model),
        make_record("kvp_niah", "l2norm", 0.5, 0.0, model=model),
        make_record("kvp_niah", "l2norm", 0.5, 0.1, label=ABLATIONS[0].title, model=model),
        make_record("kvp_niah", "random", 0.5, 0.3, model=model),
        make_record("kvp_niah", "random", 0.5, 0.8, model="another/model"),  # another model's results are ignored
    ])
    output = tmp_path / "docs" / "replication.md"
    text = replicate(results, tmp_path / "docs" / "figures", output, model=model, run=False, device="cpu",
                     progress=lambda message: None)
    assert "| needle in a haystack" not in text  # claims are phrased by the page, verdicts computed
    assert "accuracy 0.00 vs 0.90 with the full cache" in text and "does not hold" in text
    random_rows = [line for line in text.splitlines() if line.startswith("| random ")]
    assert any("0.300" in row for row in random_rows) and "0.800" not in text
    assert "l2norm, keep highest norms" in text
    assert "![kvp_niah](figures/kvp_niah.png)" in text and (tmp_path / "docs" / "figures" / "kvp_niah.png").exists()
    assert "same selection (SDPA vs eager)" in text
    assert "Spearman ρ (mean)" in text and "Spearman ρ < 0 in" in text


def test_policy_catalogue_counts_cells_swept_at_50_percent_as_half_the_cache(tmp_path):
    results = write_records(tmp_path / "results", [make_record("kvp_passkey", "keydiff", "50%", 0.9),
                                           make_record("kvp_passkey", "random", 0.5, 0.4)])
    rows = {line.split("|")[1].strip(): line for line in policies_page(results).splitlines() if line.startswith("| `")}
    assert "0.90 △" in rows["`keydiff`"]  # higher than random, untested: the records kept no samples


def test_policy_catalogue_reads_benchmark_budgets_as_budgets(tmp_path):
    bench = tmp_path / "bench.json"
    measured = lambda budget, policy_s: {"policy": "keydiff", "budget": budget, "prefill_s": 1.0,  # noqa: E731
                                         "policy_prefill_s": policy_s, "decode_tokens_per_s": 10.0}
    bench.write_text(json.dumps({"header": "h", "results": [
        measured("50%", 0.5), measured("64MiB", 0.64), measured("0.25 tokens", 0.0025), measured("25%", 0.25),
    ]}))
    rows = {line.split("|")[1].strip(): line for line in policies_page(tmp_path / "none", bench).splitlines()
            if line.startswith("| `")}
    assert "25.0%" in rows["`keydiff`"]  # the 25% measurement, not one in bytes or tokens


def test_pages_render_when_the_benchmark_file_is_damaged(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text('{"header": "h", "resu')
    assert "benchmark: none" in policies_page(tmp_path / "none", bench)
    assert f"skipped {bench}" in capsys.readouterr().err


def test_a_no_loss_verdict_beyond_its_tolerance_stands_only_where_its_whole_interval_is_beyond():
    def right(*docs: int, n: int = 10) -> dict:
        return {"statistic": "mean", "doc_ids": list(range(n)), "values": [float(i in docs) for i in range(n)]}

    def verdict_for(ours: dict, full: dict):
        n = len(full["values"])
        latest = {("kvp_niah", "full", 1.0): make_record("kvp_niah", "full", 1.0, sum(full["values"]) / n,
                                                         outcomes=full),
                  ("kvp_niah", "l2norm", 0.5): make_record("kvp_niah", "l2norm", 0.5, sum(ours["values"]) / n,
                                                           outcomes=ours)}
        return verdicts(latest, None)[2]

    # 6 of 20 lost: significant (McNemar p 0.03), yet its interval reaches back within the 0.1 tolerance
    close = verdict_for(right(*range(14), n=20), right(*range(20), n=20))
    assert "p = 0.031" in close.measured and close.undecided and close.holds is None

    lost = verdict_for(right(), right(*range(9)))  # 9 samples lost: p 0.004
    assert lost.holds is False and "paired: -0.90" in lost.measured and "significant" in lost.measured
    unsure = verdict_for(right(*range(5)), right(*range(9)))  # 4 lost, beyond the 0.1 tolerance: p 0.125
    assert unsure.holds is None and unsure.undecided and unsure.row()[2] == "undecided at this n"
    kept = verdict_for(right(*range(9)), right(*range(9)))
    assert kept.holds is True and "not significant" in kept.measured
