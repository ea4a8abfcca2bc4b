"""The lm-eval adapter: both request types through lm-eval itself, memory in the results, the drop-in command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

import kvpolicies
from kvpolicies import Budget, BudgetError, Policy, PolicyConfig, PolicyConfigError
from kvpolicies.errors import UsageError
from kvpolicies.cli import main
from kvpolicies.errors import UnknownCodecError
from kvpolicies.integrations.lm_eval import KVPoliciesLM
from kvpolicies.integrations.models import converted_gguf, embedded_gguf
from tests.helpers import TASKS, evaluate

PASSKEY = {"lengths": [200], "depths": [0.5], "per_cell": 2}
PPL = {"lengths": [300], "per_length": 1}


def test_the_window_rule_is_a_model_arg(tiny_pretrained):
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", budget=0.5, budget_windows="keep")
    assert lm.kv_budget == Budget(value=0.5, windows="keep")
    with pytest.raises(BudgetError, match="windows=share or windows=keep"):
        KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", budget=0.5, budget_windows="all")



def test_kvpress_compression_ratio_is_a_model_arg_recorded_beside_the_budget(tiny_pretrained):
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", compression_ratio="0.75", slack_tokens=0)
    assert lm.kv_budget == Budget(value=0.25, slack_tokens=0)
    info = lm.get_model_info()["kvpolicies"]
    assert info["budget"]["value"] == 0.25 and info["compression_ratio"] == 0.75
    assert KVPoliciesLM(pretrained=tiny_pretrained, policy="full").kv_budget == Budget(value=1.0)  # neither given
    with pytest.raises(UsageError, match="budget=0.5 and compression_ratio=0.75 both say how much to keep"):
        KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", budget=0.5, compression_ratio=0.75)


def test_the_codec_is_a_model_arg_and_recorded_with_the_results(tiny_pretrained):
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", budget=0.5, codec="int4")
    assert lm.new_cache().codec.name == "int4" and lm.get_model_info()["kvpolicies"]["codec"] == "int4"
    with pytest.raises(UnknownCodecError, match="int4"):
        KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", budget=0.5, codec="int3")


def test_generate_until_runs_through_lm_eval_and_reports_memory(tiny_pretrained):
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="l2norm", budget=0.5, uncompressed_layers="[]")
    results = evaluate(lm, ["kvp_passkey"], PASSKEY)
    assert "exact_match,first_key" in results["results"]["kvp_passkey"]
    info = results["config"]["kvpolicies"]
    assert info["policy"] == "l2norm" and info["config"]["uncompressed_layers"] == []
    assert info["budget"]["value"] == 0.5 and len(info["config_hash"]) == 16
    assert info["budget"]["windows"] == "share"  # the results say how sliding windows took part
    memory = info["kv_memory"]
    assert memory["sequences"] == 2
    # Half the prompt, plus up to 11 generated tokens in the slack: between 50% and 60% of the full cache.
    assert 0.5 <= memory["resident_fraction_mean"] < 0.6
    assert memory["resident_bytes_peak"] < memory["full_bytes_peak"]


def test_memory_is_counted_per_sequence_and_padding_apart_whatever_the_batch_size(tiny_pretrained):
    """A padded batch used to count as one request whose figures were batch means, padding included (1.5x)."""
    metadata = {"lengths": [120, 240], "depths": [0.5], "per_cell": 1}
    memory = {}
    for batch_size in (1, 2):
        lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="full", batch_size=batch_size)
        memory[batch_size] = evaluate(lm, ["kvp_passkey"], metadata)["config"]["kvpolicies"]["kv_memory"]
    assert memory[1]["sequences"] == memory[2]["sequences"] == 2
    for figures in memory.values():
        assert figures["resident_fraction_mean"] == 1.0  # the full cache holds every real entry, nothing else
    assert memory[1]["padding_bytes_peak"] == 0 and memory[2]["padding_bytes_peak"] > 0
    assert memory[2]["full_bytes_peak"] == memory[1]["full_bytes_peak"]


def test_rolling_perplexity_with_full_cache_equals_lm_eval_hf_model(tiny_pretrained):
    ours = evaluate(KVPoliciesLM(pretrained=tiny_pretrained, policy="full", stream_chunk=64), ["kvp_ppl"], PPL)
    theirs = evaluate(HFLM(pretrained=tiny_pretrained, device="cpu", dtype="float32"), ["kvp_ppl"], PPL)
    ours_ppl = ours["results"]["kvp_ppl"]["word_perplexity,none"]
    assert ours_ppl == pytest.approx(theirs["results"]["kvp_ppl"]["word_perplexity,none"], rel=1e-4)

    squeezed = evaluate(
        KVPoliciesLM(pretrained=tiny_pretrained, policy="streaming", budget="32 tokens", stream_chunk=64),
        ["kvp_ppl"], PPL,
    )
    squeezed_ppl = squeezed["results"]["kvp_ppl"]["word_perplexity,none"]
    assert math.isfinite(squeezed_ppl) and squeezed_ppl != pytest.approx(ours_ppl, rel=1e-4)  # NaN is no difference
    memory = squeezed["config"]["kvpolicies"]["kv_memory"]
    # The budget binds while the document streams: at most 32 tokens per head (+ one 64-token chunk) held.
    assert memory["resident_bytes_peak"] <= (32 + 64) * 4 * 2 * 2 * 16 * 4


def loglikelihood_requests() -> list[Instance]:
    pairs = [("The capital of France is", " Paris, a city on the Seine."), ("Two plus two is", " four")]
    return [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)
    ]


def test_loglikelihood_with_full_cache_equals_lm_eval_hf_model(tiny_pretrained):
    ours = KVPoliciesLM(pretrained=tiny_pretrained, policy="full").loglikelihood(loglikelihood_requests())
    theirs = HFLM(pretrained=tiny_pretrained, device="cpu", dtype="float32").loglikelihood(loglikelihood_requests())
    for (ours_lp, ours_greedy), (their_lp, their_greedy) in zip(ours, theirs):
        assert ours_lp == pytest.approx(their_lp, abs=1e-4)
        assert ours_greedy == their_greedy


def test_loglikelihood_scores_the_continuation_on_the_compressed_context(tiny_pretrained):
    full = KVPoliciesLM(pretrained=tiny_pretrained, policy="full").loglikelihood(loglikelihood_requests())
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="streaming", budget="2 tokens", sink_tokens=1)
    squeezed = lm.loglikelihood(loglikelihood_requests())
    assert math.isfinite(squeezed[0][0]) and squeezed[0][0] != pytest.approx(full[0][0], abs=1e-4)  # affected
    assert squeezed[1][0] == pytest.approx(full[1][0], abs=1e-4)  # one-token continuation: its context's last token
    # predicts it, and the whole context was in view when that position was computed
    assert lm.kv_memory()["sequences"] == 2


@pytest.mark.parametrize("policy", ["full", "snapkv", "headkv", "h2o"])
def test_batched_loglikelihood_equals_one_request_at_a_time(tiny_pretrained, policy):
    """Contexts of different lengths left-padded together, continuations of different lengths right-padded, and a
    last batch of one request with a one-token continuation (no continuation pass at all)."""
    pairs = [("The capital of France is", " Paris, a city on the Seine."), ("Two plus two is", " four"),
             ("A long context about the weather in the mountains of the north, where it snows", " in May"),
             ("Red", " and green"), ("One", " two")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    budget = {"budget": 0.5} if policy != "full" else {}
    alone = KVPoliciesLM(pretrained=tiny_pretrained, policy=policy, batch_size=1, **budget)
    together = KVPoliciesLM(pretrained=tiny_pretrained, policy=policy, batch_size=4, **budget)
    forwards = []
    together.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    one_by_one, batched = alone.loglikelihood(requests), together.loglikelihood(requests)
    assert len(forwards) <= 4  # two batches, each a prefill and a continuation pass (five requests alone: up to 10)
    for (lp_alone, greedy_alone), (lp_batched, greedy_batched) in zip(one_by_one, batched):
        assert math.isfinite(lp_batched) and lp_batched == pytest.approx(lp_alone, abs=1e-4)
        assert greedy_batched == greedy_alone
    assert together.kv_memory()["sequences"] == 5
    assert together.kv_memory()["resident_bytes_mean"] == pytest.approx(alone.kv_memory()["resident_bytes_mean"])


def test_a_continuation_pass_of_one_real_token_next_to_none_is_padded_to_two(tiny_pretrained):
    """A one-token forward reads no padding mask, so a batch whose continuations leave one token to feed next to
    none feeds two, the second padding; the result equals each request alone."""
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", budget=0.5, batch_size=4)
    pairs = [(context, continuation) for context in ("The river runs north", "Snow fell")
             for continuation in (" and", " and then")]
    lengths = {len(lm.tok_encode(continuation)) for _, continuation in pairs}
    assert lengths == {1, 2}  # one token, and two (one of them fed to the continuation pass)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    fed = []
    lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append((args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True)
    batched = lm.loglikelihood(requests)
    assert fed[1:] == [2]  # the contexts' pass, then one continuation pass of two
    alone = KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", budget=0.5, batch_size=1).loglikelihood(requests)
    for (lp_batched, _), (lp_alone, _) in zip(batched, alone):
        assert math.isfinite(lp_batched) and lp_batched == pytest.approx(lp_alone, abs=1e-4)


def test_unknown_model_args_are_rejected_with_the_valid_options(tiny_pretrained):
    with pytest.raises(PolicyConfigError, match="no option 'colour'.*valid options: sink_tokens.*HFLM's are:"):
        KVPoliciesLM(pretrained=tiny_pretrained, policy="l2norm", colour="red")


def test_drop_in_command_passes_arguments_to_lm_eval_unchanged(tiny_pretrained, tmp_path, monkeypatch, capsys):
    import lm_eval.utils

    make_table = lm_eval.utils.make_table
    monkeypatch.chdir(tmp_path)  # relative paths resolve like lm_eval's own
    main([
        "lm-eval", "--model", "kvpolicies",
        "--model_args", f"pretrained={tiny_pretrained},policy=random,budget=0.5,device=cpu,batch_size=1",
        "--tasks", "kvp_passkey", "--include_path", TASKS, "--limit", "1",
        "--metadata", json.dumps(PASSKEY), "--output_path", "out", "--log_samples",
    ])
    written = list(Path("out").rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    assert results["config"]["kvpolicies"]["policy"] == "random"
    assert results["config"]["kvpolicies"]["kv_memory"]["sequences"] == 1
    assert list(Path("out").rglob("samples_kvp_passkey_*.jsonl"))
    # Under lm-eval's table of scores, the KV cache they were measured with, as the results file has it.
    out = capsys.readouterr().out
    memory = results["config"]["kvpolicies"]["kv_memory"]
    header = next(line for line in out.splitlines() if line.startswith("| kvpolicies"))
    row = out.splitlines()[out.splitlines().index(header) + 2]
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert out.index("exact_match") < out.index("| kvpolicies")
    assert cells["kvpolicies"] == "random" and cells["budget"] == "0.5" and cells["compression ratio"] == "0.5"
    assert cells["kept (mean)"] == f"{memory['resident_fraction_mean']:.1%}"
    assert cells["KV MiB (peak)"] == f"{memory['resident_bytes_peak'] / 2**20:.2f}" and cells["sequences"] == "1"
    assert lm_eval.utils.make_table is make_table  # lm-eval's own again once the command is done


@pytest.mark.slow
def test_full_cache_passkey_scores_equal_lm_eval_hf_on_the_embedded_model():
    """Same task, same data, same answers: the adapter adds nothing when it keeps everything."""
    metadata = {"lengths": [1024], "depths": [0.1, 0.5, 0.9], "per_cell": 2}
    folder = str(converted_gguf(embedded_gguf()))
    ours = evaluate(KVPoliciesLM(policy="full"), ["kvp_passkey"], metadata, log_samples=True)
    theirs = evaluate(HFLM(pretrained=folder, device="cpu", dtype="float32"), ["kvp_passkey"], metadata, log_samples=True)
    assert ours["results"]["kvp_passkey"]["exact_match,first_key"] == theirs["results"]["kvp_passkey"]["exact_match,first_key"]
    assert [s["resps"] for s in ours["samples"]["kvp_passkey"]] == [s["resps"] for s in theirs["samples"]["kvp_passkey"]]
    assert ours["results"]["kvp_passkey"]["exact_match,first_key"] >= 0.8  # the embedded model does retrieve at 1k


def test_accelerate_launch_runs_the_adapter(tiny_pretrained, tmp_path):
    """lm-eval's own data-parallel route: `accelerate launch -m kvpolicies lm-eval` (one process on CPU)."""
    import subprocess
    import sys

    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "kvpolicies", "lm-eval", "--model", "kvpolicies",
        "--model_args", f"pretrained={tiny_pretrained},policy=snapkv,budget=0.5",
        "--tasks", "kvp_passkey", "--include_path", TASKS, "--limit", "2",
        "--metadata", json.dumps(PASSKEY), "--output_path", str(tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["config"]["kvpolicies"]["policy"] == "snapkv"


def test_prefill_chunk_model_arg_prefills_in_chunks_with_identical_full_cache_answers(tiny_pretrained):
    runs = []
    for chunk in (None, "64"):
        lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="full", prefill_chunk=chunk)
        widths = []
        lm.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
        result = evaluate(lm, ["kvp_passkey"], PASSKEY, log_samples=True)
        runs.append(([s["resps"] for s in result["samples"]["kvp_passkey"]], max(widths)))
    (plain, plain_width), (chunked, chunked_width) = runs
    assert plain_width > 150 and chunked_width == 64  # the ~200-token prompts went in 64 tokens at a time
    assert chunked == plain


def test_both_protocols_run_through_lm_eval_and_report_the_context_apart(tiny_pretrained):
    runs = {}
    for protocol in ("query_aware", "query_agnostic"):
        lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", budget=0.5, protocol=protocol)
        runs[protocol] = evaluate(lm, ["kvp_passkey"], PASSKEY, log_samples=True)
    for protocol, results in runs.items():
        info = results["config"]["kvpolicies"]
        assert info["protocol"] == protocol
        memory = info["kv_memory"]
        # The question and the generated tokens are kept on top of the context's half.
        assert memory["context_bytes_peak"] < memory["resident_bytes_peak"] < memory["full_bytes_peak"]
        assert 0.4 < memory["context_bytes_mean"] / memory["full_bytes_mean"] < 0.5  # half the context, of all
        assert memory["auxiliary_bytes_mean"] > 0  # snapkv's window of recent queries, reported next to the KV


@pytest.mark.slow
def test_snapkv_finds_more_needles_when_the_question_is_in_view_on_the_embedded_model():
    """The needle is named by the question: SnapKV's votes come from the question's queries only when it sees it.
    (At budget 0.1 both protocols find none, so answers that merely differ would prove nothing; at 0.5 the
    query-aware run found 2 of these 4 needles on the CPU, the query-agnostic run 1.)"""
    metadata = {"lengths": [2048], "depths": [0.5], "per_cell": 4}
    found = {}
    for protocol in ("query_aware", "query_agnostic"):
        lm = KVPoliciesLM(policy="snapkv", budget=0.5, protocol=protocol)
        results = evaluate(lm, ["kvp_niah"], metadata, log_samples=True)
        found[protocol] = results["results"]["kvp_niah"]["exact_match,first_number"]
    assert found["query_aware"] > found["query_agnostic"], found


def test_query_agnostic_needs_a_task_that_names_its_question(tiny_pretrained):
    from kvpolicies.errors import UsageError

    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", budget=0.5, protocol="query_agnostic")
    with pytest.raises(UsageError, match="query_agnostic needs to know where the question starts"):
        evaluate(lm, ["kvp_ppl"], PPL)
    with pytest.raises(UsageError, match="unknown protocol"):
        KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", protocol="aware")


class Revisioned(Policy):
    """A test policy whose options are named like model args of HFLM (revision) and of the adapter (dtype)."""

    name = "revisioned"

    class Config(PolicyConfig):
        revision: str = "first"
        dtype: str = "keys"

    def score(self, inputs):
        return inputs.order.float()


def register_revisioned() -> None:
    class Plugin:
        @kvpolicies.hookimpl
        def register_policies(self, register):
            register(Revisioned)

    kvpolicies.registry.registry().register_plugin(Plugin(), name="revisioned-plugin")


def test_a_policy_option_named_like_a_model_arg_is_an_error_not_a_guess(tiny_pretrained, fresh_registry):
    """`revision=` used to go to HFLM alone, silently leaving the policy's option at its default."""
    register_revisioned()
    with pytest.raises(PolicyConfigError, match=r"revision='second' is ambiguous: it is HFLM's argument 'revision' "
                                                r"and also an option of policy 'revisioned'; write policy.revision="):
        KVPoliciesLM(pretrained=tiny_pretrained, policy="revisioned", revision="second")
    with pytest.raises(PolicyConfigError, match="dtype='float32' is ambiguous.*write policy.dtype=VALUE"):
        KVPoliciesLM(pretrained=tiny_pretrained, policy="revisioned", dtype="float32")
    with pytest.raises(PolicyConfigError, match="'seed' is given twice, as seed= and policy.seed="):
        KVPoliciesLM(pretrained=tiny_pretrained, policy="random", seed=1, **{"policy.seed": 2})


def test_policy_prefix_sets_the_policy_option_and_leaves_the_plain_name_to_hflm(tiny_pretrained, fresh_registry,
                                                                                monkeypatch):
    register_revisioned()
    given = {}
    original = HFLM.__init__

    def spy(self, **kwargs):
        given.update(kwargs)
        original(self, **kwargs)

    monkeypatch.setattr(HFLM, "__init__", spy)
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="revisioned",
                      **{"policy.revision": "second", "policy.dtype": "values", "revision": "main"})
    assert lm.kv_policy.config.revision == "second" and lm.kv_policy.config.dtype == "values"
    assert given["revision"] == "main" and given["dtype"] == "float32"  # HFLM's own, untouched
    assert not any(key.startswith("policy.") for key in given)
    plain = KVPoliciesLM(pretrained=tiny_pretrained, policy="random", seed=5, batch_size=1)
    assert plain.kv_policy.config.seed == 5  # options no one else takes need no prefix


def test_a_sweep_cell_hands_its_policy_options_by_name_so_none_is_taken_for_a_model_arg(tiny_pretrained,
                                                                                       fresh_registry):
    from kvpolicies.experiments.grid import Cell, PolicySpec, TaskSpec
    from kvpolicies.experiments.runner import cell_model

    register_revisioned()
    cell = Cell(model=tiny_pretrained, task=TaskSpec(name="kvp_passkey"), seed=0, budget=0.5,
                policy=PolicySpec(name="revisioned", options={"revision": "second", "dtype": "values"}))
    lm = cell_model(cell)
    assert (lm.kv_policy.config.revision, lm.kv_policy.config.dtype) == ("second", "values")


def test_a_stage_streamed_in_chunks_ends_its_document_at_its_budget(tiny_pretrained):
    """A document streamed in chunks: a stage chooses after every chunk, the last one too, so the record holds what
    the policy keeps, as a scoring policy's does (the last chunk was kept whole before)."""
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="duoattention", budget=0.25, stream_chunk=32,
                      sink_tokens=4, window_tokens=4, observation_tokens=8)
    document = torch.randint(3, 1000, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    assert math.isfinite(lm._streamed_logprob(document[:1], document[1:]))
    assert 0.2 < lm.kv_memory()["resident_fraction_mean"] <= 0.27
