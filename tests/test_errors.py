"""Bad input of every kind ends as `kvpolicies: error: ...` naming the problem and the fix, never as a traceback.

Each case here was a traceback (or a silent wrong result) before; none of them loads a real model: the checks run
before any model is loaded, or on a tiny random one.
"""

from __future__ import annotations

import pytest
import torch

import kvpolicies
from kvpolicies import Budget, BudgetError, CompressedCache, PolicyConfigError
from kvpolicies.cli import main
from kvpolicies.errors import ContextLengthWarning, ModelLoadError, PluginError, UsageError
from kvpolicies.integrations.models import resolve_device, resolve_dtype, resolve_source
from tests.helpers import TASKS


def error_of(capsys, argv: list[str]) -> str:
    """The error line of a command that must fail cleanly: an uncaught exception would raise instead of returning
    2. (lm-eval's log handler keeps the first test's stderr, so later tests may print logging noise before it.)"""
    assert main(argv) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("kvpolicies: error: ")
    return last


def argparse_error_of(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("spec", ["1e tokens", "..%", "e%", "1.2.3", "tokens", "%", "", "inf", "nan", "-inf tokens"])
def test_unreadable_budget_text_is_a_budget_error_listing_the_forms(spec):
    with pytest.raises(BudgetError, match=r"finite|cannot read budget|fraction|must be"):
        Budget.parse(spec)


def test_an_infinite_budget_does_not_suggest_an_infinite_token_count():
    with pytest.raises(BudgetError) as error:
        Budget.parse(float("inf"))
    assert "inf tokens" not in str(error.value) and "finite" in str(error.value)


def test_budget_slack_is_validated_when_given_apart():
    assert Budget.parse("50%", slack_tokens=0).slack_tokens == 0
    with pytest.raises(BudgetError, match="slack_tokens"):
        Budget.parse(0.5, slack_tokens=-1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--budget", "1e tokens", "hi"], "cannot read budget '1e tokens'"),
        (["generate", "--budget", "..%", "hi"], "cannot read budget '..%'"),
        (["generate", "--raw", ""], "the prompt is empty"),
        (["generate", "   "], "the prompt is empty"),
        (["generate", "--set", "window_tokens=true", "hi"], "window_tokens takes a number"),
        (["generate", "--set", "uncompressed_layers=[1,", "hi"], "cannot read option value '[1,' as JSON"),
        (["generate", "--set", "=4", "hi"], "--set expects KEY=VALUE"),
        (["generate", "--model", "/no/such/folder", "hi"], "model path /no/such/folder does not exist"),
        (["generate", "--device", "cuda:0", "hi"] if not torch.cuda.is_available() else
         ["generate", "--device", "cuda:99", "hi"], "use --device cpu" if not torch.cuda.is_available() else "GPU(s)"),
        (["generate", "--device", "toaster", "hi"], "unknown device 'toaster'"),
    ],
)
def test_bad_generate_input_fails_before_any_model_is_loaded(capsys, argv, message):
    assert message in error_of(capsys, argv)


def test_prompt_file_that_is_a_folder_or_not_utf8_or_missing(capsys, tmp_path):
    assert "is a folder" in error_of(capsys, ["generate", "--file", str(tmp_path)])
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(b"\xff\xfe\x00 not text \x80")
    assert "is not UTF-8 text" in error_of(capsys, ["generate", "--file", str(binary)])
    assert "does not exist" in error_of(capsys, ["generate", "--file", str(tmp_path / "missing.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert "is empty" in error_of(capsys, ["generate", "--file", str(empty)])
    assert "is a folder" in error_of(capsys, ["inspect", "--file", str(tmp_path)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--max-new-tokens", "0", "hi"], "expected a whole number >= 1, got 0"),
        (["generate", "--prefill-chunk", "0", "hi"], "expected a whole number >= 2, got 0"),
        (["generate", "--prefill-chunk", "-5", "hi"], "expected a whole number >= 2, got -5"),
        (["generate", "--dtype", "foo", "hi"], "invalid choice: 'foo'"),
        (["generate", "--protocol", "agnostic", "hi"], "invalid choice: 'agnostic'"),
        (["inspect", "--tokens", "0"], "expected a whole number >= 1, got 0"),
        (["head-scores", "--output", "x.json", "--samples", "0"], "expected a whole number >= 1, got 0"),
        (["generate", "--budget-slack", "-1", "hi"], "expected a whole number >= 0, got -1"),
        (["bench", "--contexts", "1024,,2048"], "expected comma-separated whole numbers"),
        (["bench", "--contexts", "0"], "expected a whole number >= 1, got 0"),
        (["bench", "--repeats", "0"], "expected a whole number >= 1, got 0"),
        (["analyze", "norms", "--keep", "1.5"], "between 0 and 1"),
        (["eval-data", "--out", "x", "--lengths", "abc"], "expected a whole number >= 1, got 'abc'"),
    ],
)
def test_numbers_and_choices_are_checked_by_the_parser(capsys, argv, message):
    assert message in argparse_error_of(capsys, argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--protocol", "query_agnostic", "hi"],
         "query_agnostic compresses the prompt before its question is seen: give the question with --question"),
        (["generate", "--question", " ", "hi"], "--question is empty"),
    ],
)
def test_a_protocol_without_its_question_is_refused_before_the_model_loads(capsys, argv, message):
    assert message in error_of(capsys, argv)


def test_model_paths_that_are_not_models_say_what_they_are(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(tmp_path / "nothing-here")
    with pytest.raises(ModelLoadError, match="folder without config.json"):
        resolve_source(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="is a file but not a .gguf model"):
        resolve_source(text)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(tmp_path / "weights.gguf")
    assert resolve_source("org/model") == ("org/model", {})  # a hub id is left to transformers


def test_a_hub_id_that_cannot_be_fetched_offline_is_a_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot load model 'kvpolicies-test/not-a-model'.*HF_HUB_OFFLINE"):
        kvpolicies.load_model("kvpolicies-test/not-a-model", device="cpu")


def test_device_and_dtype_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    with pytest.raises(UsageError, match="unknown dtype 'foo'"):
        resolve_dtype("foo", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda")


def test_out_of_range_uncompressed_layers_are_rejected_not_wrapped(tiny_model):
    """[99] used to wrap to layer 99 % 8 = 3 while the result recorded [99]."""
    ids = torch.randint(3, 128, (1, 40))
    for layers in ([99], [-9], [0, 8]):
        cache = CompressedCache(tiny_model, kvpolicies.get_policy("l2norm", uncompressed_layers=layers), 0.5)
        with pytest.raises(PolicyConfigError, match=r"do not exist in a model of 8 layers"):
            tiny_model(ids, cache=cache)
    cache = CompressedCache(tiny_model, kvpolicies.get_policy("l2norm", uncompressed_layers=[-1]), 0.5)
    tiny_model(ids, cache=cache)
    assert cache.kept_per_head()[-1].min().item() == 40  # the last layer kept whole


def test_booleans_are_not_numbers_in_policy_options():
    with pytest.raises(PolicyConfigError, match="window_tokens takes a number"):
        kvpolicies.get_policy("l2norm", window_tokens=True)
    with pytest.raises(PolicyConfigError, match="uncompressed_layers takes a number"):
        kvpolicies.get_policy("l2norm", uncompressed_layers=[True])
    assert kvpolicies.get_policy("l2norm", keep_highest=True).config.keep_highest  # a real bool option still works


class BrokenScores(kvpolicies.Policy):
    """Returns whatever the test asks for, to check that the cache names a policy that breaks score()'s contract."""

    name = "broken-scores"
    result = None

    def score(self, inputs):
        return type(self).result(inputs)


@pytest.mark.parametrize(
    ("result", "shown"),
    [
        (lambda inputs: None, ["NoneType", "[1, 2, 20]"]),
        (lambda inputs: inputs.order.float()[..., :-1], ["[1, 2, 19]", "[1, 2, 20]"]),  # returned, and expected
        (lambda inputs: torch.full(inputs.order.shape, float("nan")), ["NaN"]),
        (lambda inputs: inputs.valid, ["torch.bool"]),
    ],
    ids=["none", "shape", "nan", "bool"],
)
def test_a_policy_whose_score_breaks_the_contract_is_named_as_the_plugins_fault(tiny_model, result, shown):
    BrokenScores.result = staticmethod(result)
    cache = CompressedCache(tiny_model, BrokenScores(), 0.5)
    with pytest.raises(kvpolicies.KVPoliciesError) as error:
        tiny_model(torch.randint(3, 128, (1, 20)), cache=cache)
    assert error.type is PluginError, f"{error.type.__name__}: {error.value}"  # not bad user input
    message = str(error.value)
    for part in ["policy 'broken-scores'", "score()", *shown]:
        assert part in message, f"{part!r} not in: {message}"


def test_nan_scores_at_padded_positions_are_ignored_as_documented(tiny_model):
    def nan_on_padding(inputs):
        return inputs.order.float().masked_fill(~inputs.valid, float("nan"))

    BrokenScores.result = staticmethod(nan_on_padding)
    ids = torch.randint(3, 128, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    cache = CompressedCache(tiny_model, BrokenScores(), 0.5)
    tiny_model(ids, attention_mask=mask, cache=cache)
    assert cache.kept_per_head()[:, 1].max().item() == 7  # half of the 14 real tokens


def test_a_sequence_past_the_model_positions_warns_once(tiny_model):
    tiny_model.config.max_position_embeddings = 30
    cache = CompressedCache(tiny_model, kvpolicies.get_policy("streaming"), "64 tokens")
    with pytest.warns(ContextLengthWarning, match="more than the 30 positions") as caught:
        tiny_model(torch.randint(3, 128, (1, 25)), cache=cache)
        tiny_model(torch.randint(3, 128, (1, 10)), cache=CompressedCache(tiny_model, "streaming", "64 tokens"))
        for _ in range(3):
            tiny_model(torch.randint(3, 128, (1, 10)), cache=cache)
    assert len([w for w in caught if issubclass(w.category, ContextLengthWarning)]) == 1


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("policy=l2norm,budget=1e tokens", "cannot read budget '1e tokens'"),
        ("policy=nope", "unknown policy 'nope'"),
        ("policy=l2norm,slack_tokens=-1", "slack_tokens=-1 must be a whole number >= 0"),
        ("policy=l2norm,stream_chunk=0", "stream_chunk=0 must be a whole number >= 1"),
        ("policy=l2norm,prefill_chunk=abc", "prefill_chunk='abc' must be a whole number"),
        ("policy=l2norm,colour=red", "no option 'colour'"),
        ("policy=l2norm,window_tokens=true", "window_tokens takes a number"),
        ("policy=l2norm,dtype=foo", "unknown dtype 'foo'"),
        ("pretrained=/no/such/model,policy=l2norm", "model path /no/such/model does not exist"),
    ],
)
def test_lm_eval_model_args_errors_are_reported_without_a_traceback(capsys, model_args, message):
    argv = ["lm-eval", "--model", "kvpolicies", "--model_args", model_args, "--tasks", "kvp_passkey",
            "--include_path", TASKS]
    assert message in error_of(capsys, argv)


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_lm_eval_limit_that_runs_nothing_is_refused(capsys, limit):
    argv = ["lm-eval", "--model", "kvpolicies", "--tasks", "kvp_passkey", "--limit", limit]
    assert "would run no sample" in error_of(capsys, argv)


def test_lm_eval_help_starts_with_ours(capsys):
    with pytest.raises(SystemExit):
        main(["lm-eval", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("kvpolicies lm-eval") and "budget=SPEC" in out and "--model_args" in out


@pytest.mark.parametrize(("error", "machine"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("index out of range"), False),
    (ValueError("the plugin's own words: out of memory"), False),
    (BudgetError("budget of 64 tokens runs out of memory budget on this model"), False),
])
def test_out_of_memory_is_the_allocators_failure_and_never_a_message_of_ours(error, machine):
    from kvpolicies.errors import out_of_memory

    assert out_of_memory(error) is machine
