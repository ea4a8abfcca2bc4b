"""The built-in integer codecs (``int8``, ``int4``): their price, their error, and their use wherever a budget is."""

from __future__ import annotations

import pytest
import torch

import kvpolicies
from kvpolicies import Budget, CompressedCache
from kvpolicies.cli import main
from kvpolicies.errors import UnknownCodecError
from tests.helpers import tiny_llama


def prompt(length: int = 48) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(("name", "bits"), [("int8", 8), ("int4", 4)])
def test_an_entry_costs_its_codes_and_a_half_precision_scale_and_minimum_per_group(name, bits):
    codec = kvpolicies.get_codec(name)
    for head_dim, groups in ((64, 2), (128, 4), (16, 1), (80, 4)):  # 80: groups of 20, its largest divisor <= 32
        assert codec.entry_bytes(head_dim, torch.bfloat16) == 2 * (head_dim * bits // 8 + groups * 2 * 2)
    assert codec.entry_bytes(64, torch.float32) == codec.entry_bytes(64, torch.bfloat16)  # codes, whatever came in
    assert {info.name for info in kvpolicies.list_codecs()} >= {"full", "int8", "int4"}


@pytest.mark.parametrize(("name", "bits"), [("int8", 8), ("int4", 4)])
def test_each_value_comes_back_within_half_a_step_of_its_group(name, bits):
    codec = kvpolicies.get_codec(name)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 5, 64, generator=generator) * torch.linspace(0.1, 8, 64)  # channels of every scale
    values = torch.randn(2, 3, 5, 64, generator=generator)
    stored = codec.encode(keys, values)
    assert stored["keys"].dtype == torch.uint8 and stored["keys"].shape[-1] == 64 * bits // 8
    decoded_keys, decoded_values = codec.decode(stored, torch.float32)
    for original, decoded in ((keys, decoded_keys), (values, decoded_values)):
        grouped = original.unflatten(-1, (2, 32))
        step = (grouped.amax(-1, keepdim=True) - grouped.amin(-1, keepdim=True)) / (2**bits - 1)
        error = (decoded - original).abs().unflatten(-1, (2, 32))
        assert (error <= step / 2 * 1.01 + 1e-3).all()  # half a step, and the float16 rounding of the scale
        assert (error > 0).any()  # lossy: a codec that stored everything would not pass as a quantizer
    packed = {name: t[1, 2] for name, t in stored.items()}  # a packed layer's [entries, n] decodes alike
    torch.testing.assert_close(codec.decode(packed, torch.float32)[0], decoded_keys[1, 2], atol=0, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_byte_budget_keeps_more_entries_at_the_codecs_price_and_the_bytes_are_the_codes(name):
    model = tiny_llama()
    ids = prompt()
    full = CompressedCache(model, "snapkv", Budget(value=0.1, slack_tokens=0))
    coded = CompressedCache(model, "snapkv", Budget(value=0.1, slack_tokens=0), codec=name)
    model(ids, cache=full)
    model(ids, cache=coded)
    price = coded.shape.kept_entry_bytes
    assert price == kvpolicies.get_codec(name).entry_bytes(16, torch.float32) < full.shape.entry_bytes
    stats = coded.stats()
    assert stats.resident_bytes == stats.kept_entries * price  # measured from the stored tensors
    assert stats.resident_bytes <= 0.1 * stats.full_bytes + price
    ratio = full.shape.entry_bytes / price  # int4 on 16-channel float32 heads: 5.3
    wanted = min(full.stats().kept_entries * ratio, stats.full_entries)
    assert stats.kept_entries == pytest.approx(wanted, rel=0.05) and stats.kept_entries > full.stats().kept_entries


@torch.no_grad()
def test_more_bits_stay_closer_to_the_models_own_logits():
    model = tiny_llama()
    ids = prompt()
    own = model(ids).logits[:, -1]
    errors = {}
    for name in ("int8", "int4"):
        cache = CompressedCache(model, "full", 1.0, codec=name)
        model(ids, cache=cache)  # the prompt attends to itself at full precision; the next token reads the codes
        got = model(torch.tensor([[5]]), cache=cache).logits[:, -1]
        plain = model(torch.cat([ids, torch.tensor([[5]])], 1)).logits[:, -1]
        errors[name] = float((got - plain).abs().max())
        assert torch.isfinite(got).all()
    assert 0 < errors["int8"] < errors["int4"] < float(own.abs().max())


def test_the_command_line_takes_a_codec_and_says_what_an_entry_costs(capsys, monkeypatch):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "Storage codecs" in listed and "int4  (80 B / 160 B)" in listed and "int8  (144 B / 288 B)" in listed
    assert main(["generate", "--codec", "int5", "hello"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("kvpolicies: error: unknown codec 'int5'") and "int4" in error
    with pytest.raises(UnknownCodecError):
        kvpolicies.get_codec("int5")


def test_a_sweep_cell_with_a_codec_runs_it_and_records_its_bytes(tiny_pretrained, tmp_path, monkeypatch):
    from kvpolicies.experiments.grid import SweepConfig
    from kvpolicies.experiments.sweep import run_sweep
    from kvpolicies.integrations import lm_eval

    built = []

    def recording(model, policy, budget, codec=None, tokenizer=None):
        cache = CompressedCache(model, policy, budget, codec=codec, tokenizer=tokenizer)
        built.append((policy.name, cache.codec.name))
        return cache

    monkeypatch.setattr(lm_eval, "CompressedCache", recording)
    config = SweepConfig(models=[tiny_pretrained], policies=["streaming", {"name": "streaming", "codec": "int4"}],
                         budgets=[0.25], tasks=[{"name": "kvp_passkey",
                                                 "metadata": {"lengths": [200], "depths": [0.5], "per_cell": 1}}])
    records = {record.cell.title: record for record in run_sweep(config, tmp_path, progress=False)}
    assert set(records) == {"full", "streaming", "streaming + int4"} and all(r.status == "ok" for r in records.values())
    assert set(built) == {("full", "full"), ("streaming", "full"), ("streaming", "int4")}
    assert records["streaming + int4"].identity.model_extra["codec"] == "int4"
    plain, coded = records["streaming"].kv_memory, records["streaming + int4"].kv_memory
    # The same bytes (a quarter of the full cache, plus the decoding slack), bought at int4's price.
    assert coded.resident_fraction_mean <= plain.resident_fraction_mean * 1.1


def test_values_past_half_precision_are_clamped_not_turned_into_nan_and_odd_heads_are_refused_for_int4():
    codec = kvpolicies.get_codec("int8")
    keys = torch.tensor([[-1e6, 0.0, 3.0, 7e5] * 8])  # a bfloat16 model's outlier channel, past float16's range
    decoded, _ = codec.decode(codec.encode(keys, keys), torch.float32)
    assert torch.isfinite(decoded).all()
    assert decoded[0, 0] == -65504 and decoded[0, 3] >= 65504 - 520  # clamped to float16's range, then quantized
    assert torch.isfinite(codec.decode(codec.encode(keys, keys), torch.float16)[0]).all()  # no step past the top
    from kvpolicies_plugins.quantized import groups_of

    assert [groups_of(d) for d in (64, 80, 74, 16)] == [2, 4, 1, 1]  # 74 = 2 x 37: one group, not 37 of 2
    from kvpolicies.errors import UsageError

    with pytest.raises(UsageError, match="packs 2 channels a byte.*75 channels; use a codec with more bits"):
        kvpolicies.get_codec("int4").entry_bytes(75, torch.bfloat16)
