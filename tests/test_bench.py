"""The benchmark: memory at the physical limit, policy time measured, tables per context."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvpolicies.experiments.bench import run_benchmark, tables
from kvpolicies.integrations.models import random_config


def test_benchmark_measures_memory_against_the_physical_limit_and_policy_time(tiny_model):
    results = run_benchmark(tiny_model, None, [96], ["snapkv", "h2o", "random"], [0.5], decode_tokens=3, repeats=1)
    by_policy = {r.policy: r for r in results}
    assert list(by_policy) == ["full", "snapkv", "h2o", "random"]
    for result in results:
        assert result.resident_bytes == result.physical_bytes  # packed storage: no padding, no over-allocation
        assert result.ttft_s >= result.prefill_s > 0 and result.decode_ms_per_token > 0
    assert by_policy["snapkv"].resident_bytes < 0.6 * by_policy["full"].resident_bytes
    assert by_policy["snapkv"].policy_prefill_s > 0 and by_policy["snapkv"].auxiliary_bytes > 0  # query buffer
    assert by_policy["h2o"].policy_decode_ms_per_token > 0  # cumulative attention at every step
    assert by_policy["full"].dense_kept_decode_ms_per_token is None  # its own reference
    for name in ("snapkv", "h2o", "random"):  # half of 96 tokens in every head: timed against a dense 48
        assert by_policy[name].kept_per_head == 48 and by_policy[name].dense_kept_decode_ms_per_token > 0
    text = tables(results)
    row = next(line for line in text.splitlines() if line.startswith("| snapkv"))
    ratio = by_policy["snapkv"].dense_kept_decode_ms_per_token / by_policy["snapkv"].decode_ms_per_token
    assert "vs dense of kept size" in text and f"| {ratio:.2f}x" in row
    assert "context: 96 tokens" in text and "| snapkv" in text and "1.000" in text


def test_repeats_give_medians_with_the_range_they_came_from(tiny_model):
    """A median of three runs is shown with the fastest and slowest: on a machine whose speed drifts, the range says
    how far two rows may be compared. One run shows none."""
    from kvpolicies.experiments.bench import median_measurement

    (one,) = run_benchmark(tiny_model, None, [64], [], [0.5], decode_tokens=2, repeats=1)
    runs = [replace(one, prefill_s=s, decode_ms_per_token=ms) for s, ms in ((0.3, 50.0), (0.1, 100.0), (0.2, 40.0))]
    median = median_measurement(runs)
    assert median.prefill_s == 0.2 and median.prefill_s_range == (0.1, 0.3)
    assert median.decode_ms_per_token == 50.0 and median.decode_ms_per_token_range == (40.0, 100.0)
    row = next(line for line in tables([median]).splitlines() if line.startswith("| full"))
    cells = [cell.strip() for cell in row.split("|")]
    assert "0.20 (0.10–0.30)" in cells and "20.0 (10.0–25.0)" in cells  # steps/s: 1000 / 100 to 1000 / 40
    assert one.prefill_s_range is None and "–" not in tables([one])


def test_chunked_prefill_in_the_benchmark_keeps_the_same_budget(tiny_model):
    whole, chunked = (run_benchmark(tiny_model, None, [96], ["snapkv"], [0.25], 2, 1, prefill_chunk=chunk)[1]
                      for chunk in (None, 32))
    assert chunked.resident_bytes == whole.resident_bytes


def test_a_codec_in_the_benchmark_stores_the_policies_entries_and_leaves_the_reference_at_full_precision(tiny_model):
    full, plain = run_benchmark(tiny_model, None, [96], ["snapkv"], [0.1], decode_tokens=2, repeats=1)
    reference, coded = run_benchmark(tiny_model, None, [96], ["snapkv"], [0.1], decode_tokens=2, repeats=1,
                                      codec="int8")
    assert reference.resident_bytes == full.resident_bytes  # the full cache is the reference, as computed
    assert coded.policy == "snapkv + int8" and coded.resident_bytes == coded.physical_bytes <= plain.resident_bytes
    assert coded.kept_per_head > 3 * plain.kept_per_head  # 40 bytes an entry instead of 128: 3.2 times as many


def test_a_padded_batch_in_the_benchmark_stores_no_padding_and_is_timed_against_a_dense_batch(tiny_model):
    full, snapkv = run_benchmark(tiny_model, None, [96], ["snapkv"], [0.5], decode_tokens=2, repeats=1, batch=3)
    assert full.batch == snapkv.batch == 3
    # Rows hold 96, 88 and 80 real tokens (left-padded by 0, 8, 16): half of each is kept, padding never.
    assert snapkv.kept_per_head == (48 + 44 + 40) / 3
    assert snapkv.resident_bytes == snapkv.physical_bytes and snapkv.dense_kept_decode_ms_per_token > 0
    assert full.resident_bytes > full.physical_bytes  # the full cache stores its rows' padding


def test_random_architectures_have_the_published_shapes():
    config = random_config("llama3-8b:2")
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (2, 8, 128)
    assert random_config("llama3-8b").num_hidden_layers == 32
    with pytest.raises(ValueError, match="known: llama3-8b"):
        random_config("gpt5")


def test_bench_command_prints_tables_and_saves_what_the_pages_read(tiny_pretrained, tmp_path, capsys):
    import json

    from kvpolicies.cli import main

    saved = tmp_path / "bench.json"
    assert main(["bench", "--model", tiny_pretrained, "--contexts", "64", "--policies", "snapkv,keydiff",
                 "--budgets", "0.5", "--decode", "2", "--repeats", "1", "--device", "cpu", "--json", str(saved)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model: {tiny_pretrained}") and "context: 64 tokens" in out and "| keydiff" in out
    data = json.loads(saved.read_text())
    assert [r["policy"] for r in data["results"]] == ["full", "snapkv", "keydiff"] and data["header"] in out


def test_profile_splits_prefill_and_decode_and_names_the_operators(tiny_model):
    from kvpolicies.engine.budget import Budget
    from kvpolicies.experiments.bench import profile

    text = profile(tiny_model, torch.randint(3, 100, (1, 64)), "h2o", Budget.parse(0.5), decode_tokens=2, rows=5)
    prefill, decode = text.split("h2o @ 0.5, 64 tokens: 2 decoding steps")
    assert prefill.startswith("h2o @ 0.5, 64 tokens: prefill")
    for part in (prefill, decode):
        assert "Self CPU time total" in part
        assert 1 <= sum(line.strip().startswith("aten::") for line in part.splitlines()) <= 5  # the top `rows` operators


def test_profile_of_a_codec_runs_the_codec(tiny_model):
    from kvpolicies.engine.budget import Budget
    from kvpolicies.experiments.bench import profile

    ids = torch.randint(3, 100, (1, 64))
    operators = {codec: profile(tiny_model, ids, "keydiff", Budget.parse(0.5), decode_tokens=2, rows=500, codec=codec)
                 for codec in ("full", "int4")}
    assert "keydiff + int4 @ 0.5" in operators["int4"]
    # int4 packs two codes a byte: shifts that nothing at full precision runs
    assert "aten::__lshift__" in operators["int4"]
    assert "aten::__lshift__" not in operators["full"]


def test_bench_command_profiles_instead_of_timing(tiny_pretrained, capsys):
    from kvpolicies.cli import main

    assert main(["bench", "--model", tiny_pretrained, "--contexts", "48", "--policies", "keydiff",
                 "--budgets", "0.5", "--decode", "2", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "full @ 1, 48 tokens: prefill" in out and "keydiff @ 0.5, 48 tokens: 2 decoding steps" in out


def test_bench_profiles_a_codec_the_reference_at_full_precision(tiny_pretrained, capsys):
    """``--profile --codec int4``: the policy's run is named with its codec, the full cache stays the
    full-precision reference."""
    from kvpolicies.cli import main

    assert main(["bench", "--model", tiny_pretrained, "--contexts", "48", "--policies", "keydiff",
                 "--budgets", "0.5", "--decode", "2", "--profile", "--codec", "int4"]) == 0
    out = capsys.readouterr().out
    reference, policy = out.split("keydiff + int4 @ 0.5, 48 tokens: prefill")
    assert "full @ 1, 48 tokens: prefill" in reference and "+ int4" not in reference
    assert "keydiff + int4 @ 0.5, 48 tokens: 2 decoding steps" in policy


def test_saved_runs_of_several_contexts_render_as_one_set_with_a_scaling_summary(tiny_model, tmp_path, capsys):
    import json

    from kvpolicies.cli import main

    paths = []
    for tokens in (48, 96):
        results = run_benchmark(tiny_model, None, [tokens], ["streaming"], [0.25], decode_tokens=2, repeats=1)
        paths.append(tmp_path / f"bench-{tokens}.json")
        paths[-1].write_text(json.dumps({"header": "model: tiny", "results": [r.as_dict() for r in results]}))
    assert main(["bench", "--from-json", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model: tiny\n") and out.count("model: tiny") == 1  # one header, shared by both runs
    assert "context: 48 tokens" in out and "context: 96 tokens" in out
    summary = out.split("decode tokens/s vs the full cache, by context")[1]
    assert "48 tokens" in summary and "96 tokens" in summary
    full_row = next(line for line in summary.splitlines() if line.startswith("| full"))
    assert full_row.count("1.00x") == 2  # the full cache is the reference at every context
