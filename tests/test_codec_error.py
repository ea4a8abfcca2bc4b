"""`kvpolicies bench --codec-error`: each codec's decoded keys, values and attention output against the model's own,
next to transformers' QuantizedCache (quanto backend)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kvpolicies.experiments.codec_error import _row, attention, codec_errors, quanto_available

CODECS = ["int8", "int4", "kivi4", "kivi2", "think"]


def llama_of_64_channels(vocab_size: int = 128) -> LlamaForCausalLM:
    """A random Llama whose heads have the embedded model's 64 channels (4 query heads over 2 KV heads)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def rows():
    model = llama_of_64_channels()
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    return {row.codec: row for row in codec_errors(model, ids, CODECS)}


def test_fewer_bits_lose_more_and_store_less(rows):
    int8, int4, kivi4, kivi2 = rows["int8"], rows["int4"], rows["kivi4"], rows["kivi2"]
    assert int8.key_error < int4.key_error and int8.value_error < int4.value_error
    assert int8.output_error < int4.output_error
    assert int8.stored_share > int4.stored_share
    # kivi keeps each head's newest 128 to 159 entries of 200 at full precision: less error and more bytes than
    # int4 there, and 2 bits lose more than 4 in the groups it does encode
    assert 0 < kivi4.key_error < kivi2.key_error and kivi2.stored_share < kivi4.stored_share
    assert kivi4.stored_share > int4.stored_share
    assert {row.context_tokens for row in rows.values()} == {200}


def test_think_prunes_key_channels_and_keeps_values_whole(rows):
    think = rows["think"]
    assert think.value_error == 0 < think.key_error and 0 < think.output_error


def test_bytes_are_the_tensors_each_codec_stores(rows):
    from kvpolicies.registry import get_codec

    for name in ("int8", "int4"):  # per-entry codecs: the price of an entry, scales included, over float32's
        assert rows[name].stored_share == pytest.approx(get_codec(name).entry_bytes(64, torch.float32) / (2 * 64 * 4))


def test_the_attention_is_the_models_own_for_the_last_query():
    """The recorded last query, its logit scale and the GQA mapping give the model's own attention output."""
    from transformers import DynamicCache

    from kvpolicies.engine.attention import recording_queries

    model = llama_of_64_channels()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    inputs = {}
    layer = model.model.layers[1].self_attn
    hook = layer.o_proj.register_forward_pre_hook(lambda module, args: inputs.update(out=args[0][:, -1]))
    cache, scales = DynamicCache(), {}
    with torch.no_grad(), recording_queries(model, lambda q: q[:, :, -1:].clone(), scales) as queries:
        model(ids, cache=cache)
    hook.remove()
    ours = attention(queries[1], cache.layers[1].keys, cache.layers[1].values, scales[1])
    assert torch.allclose(ours.transpose(1, 2).flatten(2)[0, 0], inputs["out"][0], atol=1e-5)


def test_identical_tensors_have_no_error():
    torch.manual_seed(3)
    computed = [(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)) for _ in range(3)]
    last = [(torch.randn(1, 4, 1, 8), None) for _ in range(3)]
    row = _row("copy", 5, 1.0, computed, [(k.clone(), v.clone()) for k, v in computed], last)
    assert row.key_error == row.value_error == row.output_error == 0.0
    noisy = _row("noisy", 5, 1.0, computed, [(k + 0.1 * torch.randn_like(k), v) for k, v in computed], last)
    assert noisy.key_error > 0.01 and noisy.value_error == 0 and noisy.output_error > 1e-4
    assert noisy.key_error <= noisy.key_error_worst


@pytest.mark.skipif(not quanto_available(), reason="optimum-quanto is not installed (the quanto extra)")
def test_transformers_quantized_cache_is_the_reference_and_our_int4_is_as_close(rows):
    quanto4, quanto2 = rows["QuantizedCache quanto int4"], rows["QuantizedCache quanto int2"]
    # Both are asymmetric min-max 4-bit codes with a scale and offset per group; ours groups 32 channels of an
    # entry with float16 scales, quanto 64 with float32 ones: at 64 channels and float32 they store the same bytes
    assert quanto4.stored_share == pytest.approx(rows["int4"].stored_share)
    assert rows["int4"].key_error <= quanto4.key_error and rows["int4"].value_error <= quanto4.value_error
    assert rows["int4"].key_error > 0.8 * quanto4.key_error  # the same kind of code, not a different one
    assert quanto4.key_error < quanto2.key_error and quanto4.stored_share > quanto2.stored_share
    assert not math.isnan(quanto4.output_error)


@pytest.fixture(scope="module")
def folder_of_64_channels(tmp_path_factory, tiny_pretrained) -> str:
    """:func:`llama_of_64_channels` with the embedded model's tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("llama-64")
    tokenizer = AutoTokenizer.from_pretrained(tiny_pretrained)
    llama_of_64_channels(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_command_prints_the_table_and_writes_json(folder_of_64_channels, tmp_path, capsys):
    from kvpolicies.cli import main

    saved = tmp_path / "out" / "errors.json"
    assert main(["bench", "--codec-error", "--model", folder_of_64_channels, "--contexts", "48,96", "--codec",
                 "int4", "--device", "cpu", "--json", str(saved)]) == 0
    out = capsys.readouterr().out
    data = json.loads(saved.read_text())
    assert data["header"] in out and "| int4" in out and "last query's output err %" in out
    names = [(row["codec"], row["context_tokens"]) for row in data["codec_errors"]]
    assert [name for name in names if name[0] == "int4"] == [("int4", 48), ("int4", 96)]
    assert ("QuantizedCache quanto int4", 96) in names or not quanto_available()
    assert main(["bench", "--from-json", str(saved)]) == 2  # not a timing file: said so, no traceback
    assert "written by --codec-error" in capsys.readouterr().err


def test_a_model_whose_heads_quanto_would_group_across_entries_gets_no_reference(tiny_pretrained, capsys):
    from kvpolicies.cli import main

    assert main(["bench", "--codec-error", "--model", tiny_pretrained, "--contexts", "33", "--codec", "int8",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "QuantizedCache" not in captured.out and "| int8" in captured.out
    assert "not compared" in captured.err


def test_an_unknown_codec_is_named_before_any_model_loads(capsys):
    from kvpolicies.cli import main

    assert main(["bench", "--codec-error", "--model", "/nonexistent", "--codec", "int3"]) == 2
    err = capsys.readouterr().err
    assert "kvpolicies: error:" in err and "int3" in err and "int4" in err


def test_modes_of_bench_exclude_each_other(capsys):
    from kvpolicies.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--codec-error", "--step-costs"])
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize(("mode", "flags", "named"), [
    (["--codec-error"], ["--batch", "4"], "--batch"),
    (["--codec-error"], ["--policies", "snapkv", "--decode", "8"], "--policies, --decode"),
    (["--step-costs"], ["--repeats", "5"], "--repeats"),
    (["--profile"], ["--batch", "2"], "--batch"),
    (["--from-json", "saved.json"], ["--budgets", "0.5"], "--budgets"),
    (["--profile"], ["--json", "out.json"], "--json"),
])
def test_a_timing_flag_a_mode_does_not_read_is_refused_before_any_model_loads(mode, flags, named, capsys):
    from kvpolicies.cli import main

    assert main(["bench", *mode, "--model", "/nonexistent", *flags]) == 2
    err = capsys.readouterr().err
    assert f"kvpolicies: error: {mode[0]} does not read {named}," in err and "Traceback" not in err


def test_a_mode_takes_the_timing_flags_it_reads_and_the_defaults_written_out():
    from kvpolicies.cli import build_parser
    from kvpolicies.cli.reports import _refuse_unread

    parse = build_parser().parse_args
    _refuse_unread(parse(["bench", "--step-costs", "--policies", "snapkv", "--budgets", "0.25"]))
    _refuse_unread(parse(["bench", "--codec-error", "--batch", "1", "--decode", "32"]))  # the defaults, written out
    _refuse_unread(parse(["bench", "--batch", "4", "--repeats", "5"]))  # the timing run reads every one
