"""`kvpolicies selfcheck`: every check passes on a sound cache, and fails (or warns) when fed a broken one."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import DynamicCache

import kvpolicies
from kvpolicies import Allocation, Budget, CompressedCache, Policy, Signal
from kvpolicies.cli import main
from kvpolicies.experiments import selfcheck
from kvpolicies.experiments.bench import prompt_ids
from kvpolicies.experiments.selfcheck import CheckResult, Verdict
from kvpolicies.integrations import models
from tests.helpers import tiny_llama

TINY_SHAPE = {
    "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 4, "num_attention_heads": 6,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 1024,
}


class Stingy(Policy):
    """Keeps half of what the budget allows: a policy that evicts even at budget 1.0."""

    name = "stingy"
    needs = frozenset({Signal.KEYS})

    def score(self, inputs):
        return -inputs.keys.norm(dim=-1)

    def allocate(self, allocation: Allocation) -> Allocation:
        return Allocation(tokens=(allocation.tokens // 2).clamp(min=1), seq_len=allocation.seq_len,
                          total=allocation.total, fixed=allocation.fixed)


class BatchMixing(Policy):
    """Scores an entry with the norms of the other sequences' entries at the same position: a prompt keeps other
    entries in a batch than alone (alone, the score is twice its own norm, so the ranking is its own)."""

    name = "batch-mixing"
    needs = frozenset({Signal.KEYS})

    def score(self, inputs):
        norms = inputs.keys.norm(dim=-1)
        return norms + norms.flip(0)


class TestPlugin:
    @kvpolicies.hookimpl
    def register_policies(self, register):
        register(Stingy)
        register(BatchMixing)


@pytest.fixture
def broken_policies(fresh_registry):
    kvpolicies.registry.registry().register_plugin(TestPlugin(), name="selfcheck-test-plugin")


@pytest.fixture
def tiny_shape(monkeypatch):
    """``--random-model tiny``: a 4-layer random Llama, for running the whole command in seconds."""
    monkeypatch.setitem(models.RANDOM_SHAPES, "tiny", TINY_SHAPE)


def prompt(tokens: int = 96) -> torch.Tensor:
    return prompt_ids(None, tokens, torch.device("cpu"), 128)[0]


def rows(out: str) -> dict[str, list[str]]:
    """The report's table as ``{check: [measured, expected, verdict]}``."""
    table = [line for line in out.splitlines() if line.startswith("| ")][1:]  # without the header
    return {cells[0]: cells[1:] for cells in ([cell.strip() for cell in line.strip("|").split("|")] for line in table)}


# -- the command ------------------------------------------------------------------------------------------------


def test_every_check_passes_on_a_sound_cache_and_the_command_exits_0(capsys, tiny_shape):
    argv = ["selfcheck", "--random-model", "tiny", "--context", "64", "--decode", "2", "--long-context", "256"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("model: random-weight tiny, device: cpu")
    table = rows(out)
    assert len(table) == 10  # checks 1-4 for snapkv and headkv (3 with 2), speed, long context
    speed = [check for check in table if check.startswith("decode time")]
    assert len(speed) == 1 and table[speed[0]][2] in ("pass", "slow")  # a timing on a shared machine
    assert all(verdict == "pass" for check, (_, _, verdict) in table.items() if check not in speed), table
    assert table["resident bytes = physical limit (headkv, the batch above)"][0].split("= ")[1].startswith("1.000;")
    assert table["syncs per decoding step (snapkv @ 0.25)"][0].startswith("1.00 syncs")
    assert "chunked prefill of 256 tokens (snapkv @ 0.25, chunks of 64)" in table
    assert "10 checks: " in out


def test_a_policy_that_mixes_sequences_fails_the_batch_check_and_the_command_exits_1(capsys, tiny_shape,
                                                                                     broken_policies):
    argv = ["selfcheck", "--random-model", "tiny", "--context", "64", "--decode", "2", "--policies", "batch-mixing"]
    assert main(argv) == 1
    table = rows(capsys.readouterr().out)
    assert table["left-padded batch = each prompt alone (batch-mixing @ 0.5)"][2] == "fail"
    assert table["budget 1.0 = model's own logits (batch-mixing)"][2] == "pass"  # nothing is evicted at 1.0
    assert table["resident bytes = physical limit (batch-mixing, the batch above)"][2] == "pass"
    skipped = table["chunked prefill at long context"]
    assert skipped[2] == "skipped" and "not run on cpu by default" in skipped[0]


def test_the_architecture_matrix_runs_checks_1_to_4_on_each_family_named(capsys):
    argv = ["selfcheck", "--architectures", "llama-gqa,gemma2,mistral-sliding-window", "--device", "cpu",
            "--decode", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("models: the architecture matrix (3 tiny random-weight configs")
    assert "dtype: torch.float32" in out and "context: 64 tokens" in out
    table = rows(out)
    assert len(table) == 3 * 8  # per family and policy: budget 1.0, batch, bytes, syncs; no speed or long context
    assert all(verdict == "pass" for _, _, verdict in table.values()), table
    assert {check.split(": ")[0] for check in table} == {"llama-gqa", "gemma2", "mistral-sliding-window"}
    assert table["gemma2: resident bytes = physical limit (headkv, the batch above)"][0].split("= ")[1].startswith(
        "1.000;")


def test_the_architecture_matrix_reports_a_refused_family_and_checks_the_others(capsys):
    argv = ["selfcheck", "--architectures", "cohere-interleaved-rope,llama-gqa", "--device", "cpu", "--decode", "2",
            "--policies", "expected_attention"]
    assert main(argv) == 0
    table = rows(capsys.readouterr().out)
    refused = table["cohere-interleaved-rope: refused (expected_attention)"]
    assert refused[2] == "skipped" and "rotates interleaved dimension pairs" in refused[0]
    assert table["llama-gqa: budget 1.0 = model's own logits (expected_attention)"][2] == "pass"


@pytest.mark.parametrize(("argv", "message"), [
    (["--architectures", "llama,gemma2"], "--architectures llama: not in the matrix"),
    (["--architectures", "--long-context", "1024"], "drop --long-context"),
    (["--architectures", "--context", "300"], "the matrix's models have 256 positions"),
    (["--architectures", "gemma2", "--random-model", "tiny"], "not allowed with"),
])
def test_bad_input_to_the_architecture_matrix_names_the_fix(capsys, argv, message):
    try:
        assert main(["selfcheck", "--device", "cpu", *argv]) == 2
    except SystemExit as exit:  # argparse's own refusal of two sources
        assert exit.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("verdicts", "strict", "status"), [
    (["pass", "slow", "skipped"], False, 0), (["pass", "slow"], True, 1), (["pass", "fail"], False, 1),
    (["pass", "pass"], True, 0),
])
def test_slow_is_a_warning_unless_strict_and_a_failure_always_fails(capsys, monkeypatch, tiny_shape, verdicts,
                                                                    strict, status):
    results = [CheckResult(f"check {i}", "measured", "expected", Verdict(v)) for i, v in enumerate(verdicts)]
    monkeypatch.setattr(selfcheck, "run_selfcheck", lambda *args, **kwargs: results)
    argv = ["selfcheck", "--random-model", "tiny", "--context", "64"] + (["--strict"] if strict else [])
    assert main(argv) == status
    out = capsys.readouterr().out
    assert [row[2] for row in rows(out).values()] == verdicts
    assert ("--strict makes it a failure" in out) == ("slow" in verdicts and not strict)


@pytest.mark.parametrize(("argv", "message"), [
    (["--policies", "full"], "policy 'full' keeps the whole cache"),
    (["--policies", "snapkvv"], "Did you mean 'snapkv'"),
    (["--budget", "1"], "--budget 1 keeps the whole cache"),
    (["--budget", "lots"], "cannot read budget 'lots'"),
    (["--random-model", "tiny", "--long-context", "4096"], "trained for 1024 positions"),
    (["--random-model", "tiny", "--context", "1020"], "the model has 1024 positions"),
])
def test_bad_input_exits_2_with_a_message_that_names_the_fix(capsys, tiny_shape, argv, message):
    assert main(["selfcheck", *argv]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("kvpolicies: error: ") and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_asking_for_cuda_without_it_names_the_fix_before_loading_anything(capsys):
    assert main(["selfcheck", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available here" in err and "use --device cpu" in err and "loading" not in err


def test_a_context_too_short_for_the_batch_check_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["selfcheck", "--context", "10"])
    assert exit_.value.code == 2 and "expected a whole number >= 64, got 10" in capsys.readouterr().err


# -- each check, fed a broken cache or policy --------------------------------------------------------------------


def test_budget_one_fails_for_a_policy_that_evicts_below_its_budget(broken_policies):
    model = tiny_llama(num_layers=4)
    assert selfcheck.check_full_budget(model, prompt(), "snapkv", 3).verdict is Verdict.PASS
    result = selfcheck.check_full_budget(model, prompt(), "stingy", 3)
    difference, allowed = float(result.measured.split()[4]), float(result.expected.split()[1].rstrip(","))
    assert result.verdict is Verdict.FAIL and difference > allowed, result


def test_resident_bytes_fail_when_padding_is_stored():
    """The full cache never evicts, so a left-padded batch keeps its padding: more bytes than its entries need."""
    model = tiny_llama(num_layers=4)
    prompts = selfcheck.batch_prompts(prompt())
    padded = selfcheck.decode(model, prompts, CompressedCache(model, "full", 1.0), 2)
    result = selfcheck.check_resident_bytes(padded.cache, "full")
    assert result.verdict is Verdict.FAIL and not result.measured.split("= ")[1].startswith("1.000"), result
    packed = selfcheck.decode(model, prompts, CompressedCache(model, "snapkv", Budget(value=0.5, slack_tokens=0)), 2)
    assert selfcheck.check_resident_bytes(packed.cache, "snapkv").verdict is Verdict.PASS


def test_resident_bytes_fail_when_a_cache_keeps_more_than_its_budget(monkeypatch):
    model = tiny_llama(num_layers=4)
    monkeypatch.setattr(CompressedCache, "evict", lambda self, *args: None)  # a cache that never evicts
    cache = selfcheck.decode(model, [prompt()], CompressedCache(model, "snapkv", Budget(value=0.5, slack_tokens=0)),
                             2).cache
    result = selfcheck.check_resident_bytes(cache, "snapkv")
    assert result.verdict is Verdict.FAIL and "784 entries kept, budget 392; 1 sequence(s) over" in result.measured, result  # 4 x 2 x 98


def test_a_decoding_step_that_reads_the_device_fails_the_sync_check(monkeypatch):
    model = tiny_llama(num_layers=4)
    budget = Budget.parse(0.25)
    plain = selfcheck.decode_work(model, prompt(), DynamicCache(config=model.config), 3)
    assert plain[1] == 1.0  # the sampled token's read
    assert selfcheck.check_step_syncs(model, prompt(), "snapkv", budget, 3, plain).verdict is Verdict.PASS
    evict = CompressedCache.evict

    def reading_evict(self, layer, query, *args):
        if query.sum().item() > float("inf"):  # a host read of a device tensor in every layer
            raise AssertionError
        return evict(self, layer, query, *args)

    monkeypatch.setattr(CompressedCache, "evict", reading_evict)
    result = selfcheck.check_step_syncs(model, prompt(), "snapkv", budget, 3, plain)
    assert result.verdict is Verdict.FAIL and result.measured.startswith("5.00 syncs"), result  # 1 + 4 layers


def test_a_slow_cache_makes_the_speed_check_warn_and_fail_only_when_strict(monkeypatch):
    model = tiny_llama(num_layers=4)
    evict = CompressedCache.evict

    def slow_evict(self, *args):
        time.sleep(0.05)
        return evict(self, *args)

    monkeypatch.setattr(CompressedCache, "evict", slow_evict)  # 200 ms more per step than the dense cache
    result = selfcheck.check_decode_speed(model, prompt(), "snapkv", Budget.parse(0.25), steps=2, repeats=1)
    assert result.verdict is Verdict.SLOW and "24 of 96 tokens kept per head" in result.measured, result
    assert not result.failed() and result.failed(strict=True)


def test_the_long_context_check_holds_the_budget_after_every_chunk_and_fails_a_cache_that_does_not(monkeypatch):
    model = tiny_llama(num_layers=4)
    result = selfcheck.check_long_context(model, None, 256, "snapkv", Budget.parse(0.25), chunk=64)
    assert result.verdict is Verdict.PASS and "worst chunk 1.000 of budget" in result.measured, result
    monkeypatch.setattr(CompressedCache, "evict", lambda self, *args: None)
    result = selfcheck.check_long_context(model, None, 256, "snapkv", Budget.parse(0.25), chunk=64)
    assert result.verdict is Verdict.FAIL and "worst chunk 4.000 of budget" in result.measured, result


def test_the_long_context_check_is_skipped_when_memory_does_not_allow_it(monkeypatch):
    monkeypatch.setattr(selfcheck, "_free_bytes", lambda device: 2**20)
    result = selfcheck.check_long_context(tiny_llama(num_layers=4), None, 4096, "snapkv", Budget.parse(0.25))
    assert result.verdict is Verdict.SKIPPED and result.measured.endswith("0.0 GiB free"), result


def test_a_check_that_raises_is_a_failed_line_and_the_others_still_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(selfcheck, "check_step_syncs", broken)
    settings = selfcheck.SelfCheckSettings(policies=["snapkv"], context_tokens=64, decode_tokens=2, long_context=0,
                                           repeats=1)
    results = selfcheck.run_selfcheck(tiny_llama(num_layers=2), None, settings)
    failed = [result for result in results if result.verdict is Verdict.FAIL]
    assert [result.measured for result in failed] == ["error: RuntimeError: kernel exploded"]
    assert len(results) == 6 and results[-1].verdict is Verdict.SKIPPED  # long context 0: not asked


# -- the embedded model ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_selfcheck_passes_on_the_embedded_model(capsys, monkeypatch, real_model):
    """The command end to end on the session's embedded model (loaded once; the command's own loading is tested
    above with a random-weight model)."""
    import kvpolicies.experiments.bench as bench

    monkeypatch.setattr(bench, "_load", lambda *args: real_model)
    assert main(["selfcheck", "--context", "128", "--decode", "2"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert out.startswith("model: embedded SmolLM2-135M-Instruct")
    assert len(table) == 10
    for check, (measured, _, verdict) in table.items():
        assert verdict == ("skipped" if check.startswith("chunked") else "slow" if verdict == "slow"
                           and check.startswith("decode time") else "pass"), (check, measured)
    assert table["budget 1.0 = model's own logits (snapkv)"][0].startswith("max abs logit diff 0 ")  # exact in fp32
