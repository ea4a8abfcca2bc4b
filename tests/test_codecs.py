"""Storage codecs: how kept entries are stored, composed with every policy under one budget in bytes.

The codec most tests use is the one the hook docs print (``register_codecs``), executed from the docs themselves:
uint8 codes with a float32 minimum and step per entry, 48 bytes per entry on the tiny Llama (16-channel heads,
float32) against 128 at full precision.
"""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from transformers import DynamicCache

import kvpolicies
from kvpolicies import Budget, Codec, CompressedCache
from kvpolicies.engine.codecs import FullPrecision
from kvpolicies.engine.storage import held_bytes
from kvpolicies.errors import PluginError, PluginWarning, UnknownCodecError, UsageError
from kvpolicies.experiments.device_work import DeviceWork
from tests.architectures import ARCHITECTURES, WHOLE, build
from tests.architectures import prompt as arch_prompt
from tests.helpers import tiny_llama

FULL_ENTRY, INT8_ENTRY = 2 * 16 * 4, 2 * (16 + 2 * 4)


def documented_example(model=None, ids=None) -> dict:
    """Run the codec example of ``register_codecs``'s docs and return its namespace."""
    doc = kvpolicies.hookspecs.register_codecs.__doc__
    block = doc.split("runnable as is")[1].split("::\n", 1)[1].split("\n\n    On a float32")[0]
    namespace = {"model": model if model is not None else tiny_llama(),
                 "ids": ids if ids is not None else prompt(1, 40)}
    exec(textwrap.dedent(block), namespace)  # noqa: S102 - the documentation's own example
    return namespace


@pytest.fixture(scope="module")
def int8() -> type[Codec]:
    return documented_example()["Int8PerEntry"]


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def physical_bytes(cache: CompressedCache) -> int:
    return cache.stats().kept_entries * cache.shape.kept_entry_bytes


@torch.no_grad()
def greedy(model, cache, ids, steps: int, mask=None) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and each step's last logits, decoding ``steps`` tokens after the prefill of ``ids``."""
    mask = torch.ones_like(ids) if mask is None else mask
    logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1]
    tokens, seen = [], [logits]
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token[:, 0].tolist())
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        logits = model(token, attention_mask=mask, cache=cache).logits[:, -1]
        seen.append(logits)
    return tokens, seen


def test_full_precision_is_the_default_and_a_registered_codec():
    assert [info.name for info in kvpolicies.list_codecs()] == ["full", "int4", "int8", "kivi2", "kivi4", "think"]
    model = tiny_llama()
    cache = CompressedCache(model, "snapkv", 0.5)
    assert isinstance(cache.codec, FullPrecision) and cache.shape.kept_entry_bytes == cache.shape.entry_bytes
    named = CompressedCache(model, "snapkv", 0.5, codec="full")
    ids = prompt(1, 40)
    _, default_logits = greedy(model, cache, ids, 3)
    _, named_logits = greedy(model, named, ids, 3)
    assert all(torch.equal(a, b) for a, b in zip(default_logits, named_logits))
    assert all(layer.codes is None for layer in named.layers)  # full precision stores keys and values themselves


def test_the_codec_example_in_the_hook_docs_runs_as_written():
    namespace = documented_example()
    cache = namespace["cache"]
    stats = cache.stats()
    context = stats.kept_entries - stats.appended_entries
    assert cache.shape.kept_entry_bytes == INT8_ENTRY
    # A quarter of the full cache's bytes, spent at 48 bytes an entry: 2/3 of the entries, not a quarter (the
    # sequence evicts while decoding too, so it may sit up to the slack above its allocation).
    seen = cache.layers[0].seen[0]
    allowed = seen * 16 * FULL_ENTRY // 4 // INT8_ENTRY
    assert allowed - 16 <= context <= allowed + cache.budget.slack_tokens * 16
    assert stats.resident_bytes == physical_bytes(cache)
    doc = kvpolicies.hookspecs.register_codecs.__doc__
    full, int8 = 64 * 2 * 4, 2 * (64 + 8)
    assert f"{full} bytes and this one {int8}" in doc and f"keeps {int(100 * full / int8 / 4)}% of the" in doc


def test_a_budget_in_bytes_buys_more_entries_from_a_codec_that_stores_them_for_less(int8):
    model = tiny_llama()
    ids = prompt(1, 64)
    for budget in ("0.25", f"{64 * 16 * FULL_ENTRY // 4}B"):  # a fraction of the full cache's bytes, or bytes
        full, quantized = (CompressedCache(model, "snapkv", budget, codec=codec) for codec in (None, int8()))
        greedy(model, full, ids, 0)
        greedy(model, quantized, ids, 0)
        kept_full, kept_int8 = full.stats().kept_entries, quantized.stats().kept_entries
        assert kept_full == 64 * 16 // 4
        assert kept_int8 == 64 * 16 * FULL_ENTRY // 4 // INT8_ENTRY  # 2.67x the entries...
        bytes_full, bytes_int8 = full.stats().resident_bytes, quantized.stats().resident_bytes
        assert bytes_int8 <= bytes_full == 64 * 16 * FULL_ENTRY // 4  # ...in no more bytes
        assert bytes_int8 > bytes_full - INT8_ENTRY * 16  # within one entry per head of the budget
        assert bytes_int8 == physical_bytes(quantized)


def test_between_forward_passes_only_the_codes_are_resident(int8):
    model = tiny_llama()
    cache = CompressedCache(model, "snapkv", 0.5, codec=int8())
    greedy(model, cache, prompt(2, 48), 4)
    for layer in cache.layers:
        assert layer.keys is None and layer.values is None  # the working copy was dropped
        assert {t.dtype for name, t in layer.codes.items() if not name.endswith(".range")} == {torch.uint8}
        assert layer.resident_bytes() == held_bytes(*layer.codes.values())
    assert cache.resident_bytes() == physical_bytes(cache)
    assert cache.resident_bytes() == cache.stats().kept_entries * INT8_ENTRY


def test_an_int8_cache_that_keeps_everything_stays_close_to_the_models_own_logits(int8):
    model = tiny_llama()
    ids = prompt(1, 48)
    _, own = greedy(model, DynamicCache(), ids, 6)
    cache = CompressedCache(model, "full", 1.0, codec=int8())
    _, quantized = greedy(model, cache, ids, 6)
    assert torch.equal(quantized[0], own[0])  # the prompt attends to its own tokens as computed
    later = torch.stack(quantized[1:]) - torch.stack(own[1:])
    assert 0 < later.abs().max() < 2e-3 * torch.stack(own).abs().max()  # read back from 8 bits: close, not equal
    assert cache.stats().kept_entries == 54 * 16 and cache.resident_bytes() == 54 * 16 * INT8_ENTRY


def test_a_left_padded_batch_with_a_codec_equals_each_prompt_alone(int8):
    model = tiny_llama()
    ids = prompt(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    batch = CompressedCache(model, "snapkv", 0.5, codec=int8())
    tokens, logits = greedy(model, batch, ids, 5, mask)
    for row, start in ((0, 0), (1, 9)):
        alone = CompressedCache(model, "snapkv", 0.5, codec=int8())
        row_tokens, row_logits = greedy(model, alone, ids[row : row + 1, start:], 5)
        assert [step[row] for step in tokens] == [step[0] for step in row_tokens]
        torch.testing.assert_close(torch.stack([step[row] for step in logits]),
                                   torch.stack([step[0] for step in row_logits]), atol=1e-4, rtol=1e-4)
    assert batch.resident_bytes() == physical_bytes(batch)


def test_a_chunked_prefill_with_a_codec_keeps_the_byte_budget_after_every_chunk(int8):
    model = tiny_llama()
    ids = prompt(1, 60)
    cache = CompressedCache(model, "snapkv", 0.25, codec=int8())
    with torch.no_grad():
        for end in (20, 40, 60):  # later chunks attend to the decoded survivors of earlier ones
            model(ids[:, end - 20 : end], cache=cache)
            assert cache.stats().kept_entries == end * 16 * FULL_ENTRY // 4 // INT8_ENTRY
            assert cache.resident_bytes() == physical_bytes(cache) <= end * 16 * FULL_ENTRY // 4


@pytest.mark.parametrize("policy", ["headkv", "h2o", "streaming", "expected_attention"])
def test_every_shape_of_layer_stores_codes_and_counts_them(int8, policy):
    """Ragged runs (headkv), a per-entry attention track (h2o), query buffers (expected_attention)."""
    model = tiny_llama()
    cache = CompressedCache(model, policy, Budget(value=0.25, slack_tokens=2), codec=int8())
    greedy(model, cache, prompt(2, 64), 6, torch.ones(2, 64, dtype=torch.long))
    assert all(layer.codes is not None and layer.keys is None for layer in cache.layers)
    assert cache.resident_bytes() == physical_bytes(cache)
    for sequence in cache.sequence_stats():
        context = sequence.kept_entries - sequence.appended_entries
        assert context * INT8_ENTRY <= 0.25 * sequence.full_bytes + 2 * 16 * INT8_ENTRY  # slack: 2 per head


@pytest.mark.parametrize("name", ["gemma3", "gemma2", "llama-head-dim-24"])
def test_windowed_and_other_layers_hold_codes_under_the_same_byte_budget(int8, name):
    model = build(ARCHITECTURES[name])
    cache = CompressedCache(model, kvpolicies.get_policy("l2norm", **WHOLE["l2norm"]), 0.2, codec=int8())
    ids = arch_prompt(40)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=4, do_sample=False)
    head_dim = cache.shape.head_dim
    assert cache.shape.kept_entry_bytes == 2 * (head_dim + 8)
    assert cache.resident_bytes() == physical_bytes(cache)
    for layer in cache.layers:  # windows share the budget: packed like any layer, codes of what is kept only
        assert layer.packed and layer.codes[next(iter(layer.codes))].shape[0] == sum(layer.lengths)
        if layer.window is not None:
            assert max(layer.lengths) <= layer.window - 1 + cache.budget.slack_tokens


def test_an_after_prefill_stage_chooses_among_decoded_entries_and_stores_codes(int8):
    class GlobalNorm(kvpolicies.Policy):
        name = "global-norm-codec-test"

        def after_prefill(self, prefilled):
            return [None if layer is None else -layer.keys.float().norm(dim=-1) for layer in prefilled.layers]

    model = tiny_llama()
    cache = CompressedCache(model, GlobalNorm(), 0.25, codec=int8())
    greedy(model, cache, prompt(1, 40), 3)
    stats = cache.stats()
    assert stats.kept_entries - stats.appended_entries == 40 * 16 * FULL_ENTRY // 4 // INT8_ENTRY
    assert all(layer.keys is None for layer in cache.layers)  # the stage left no decoded copy behind
    assert cache.resident_bytes() == physical_bytes(cache)


@pytest.mark.parametrize("policy", ["snapkv", "headkv"])
def test_a_codec_adds_no_sync_to_a_decoding_step_and_launches_that_do_not_grow_with_the_batch(int8, policy):
    from tests.test_device_work import decode_work

    own = decode_work("full", 4, 5, slack=16)  # transformers reads the padding mask once per forward
    assert decode_work(policy, 4, 5, slack=16, codec=int8()) == own
    launches = {batch: [] for batch in (4, 16)}
    for batch, counted in launches.items():
        decode_work(policy, batch, 5 if batch == 4 else 9, slack=16, launches=counted, codec=int8())
    assert launches[4] == launches[16]  # decoding a layer's codes is one set of kernels, whatever the batch


class Lying(Codec):
    """Declares fewer bytes than it stores."""

    name = "lying-test"

    def entry_bytes(self, head_dim, dtype):
        return head_dim

    def encode(self, keys, values):
        return {"keys": keys, "values": values}

    def decode(self, stored, dtype):
        return stored["keys"], stored["values"]


class Flat(Lying):
    """Stores one row for all entries."""

    name = "flat-test"

    def entry_bytes(self, head_dim, dtype):
        return 2 * head_dim * 4

    def encode(self, keys, values):
        return {"keys": keys.flatten(0, 2), "values": values.flatten(0, 2)}


class Broken(Lying):
    name = "broken-test"

    def encode(self, keys, values):
        raise ZeroDivisionError("bad group size")


class DenseOnly(Lying):
    """Reads back only what a dense layer holds (four dimensions): fails once a layer is packed."""

    name = "dense-only-test"

    def entry_bytes(self, head_dim, dtype):
        return 2 * head_dim * 4

    def decode(self, stored, dtype):
        return stored["keys"][:, :, :, :], stored["values"][:, :, :, :]


class HalfBack(Flat):
    """Reads entries back in another dtype."""

    name = "half-back-test"

    def encode(self, keys, values):
        return {"keys": keys, "values": values}

    def decode(self, stored, dtype):
        return stored["keys"].half(), stored["values"].half()


@pytest.mark.parametrize(("codec", "says"), [
    (Lying, "stores 128 bytes per entry in encode\\(\\) but declares 16 in entry_bytes"),
    (Flat, "leading dimensions"),
    (Broken, "raised ZeroDivisionError in a trial encode and decode\\(\\): bad group size"),
    (HalfBack, "from decode\\(\\) for entries of shape \\[1, 1, 2, 16\\]; it must return \\(keys, values\\)"),
    (DenseOnly, "raised IndexError in a trial encode and decode"),
])
def test_a_codec_that_breaks_its_contract_is_named_when_the_cache_is_built(codec, says):
    with pytest.raises(PluginError, match=f"codec '{codec.name}'.*{says}"):
        CompressedCache(tiny_llama(), "snapkv", 0.5, codec=codec())


def test_asking_for_a_codec_that_does_not_exist_says_which_do(int8):
    with pytest.raises(UnknownCodecError, match="unknown codec 'ful'. Did you mean 'full'"):
        CompressedCache(tiny_llama(), "snapkv", 0.5, codec="ful")
    with pytest.raises(UsageError, match="codec must be a kvpolicies.Codec instance"):
        CompressedCache(tiny_llama(), "snapkv", 0.5, codec=int8)  # the class, not an instance


def test_codec_plugins_register_through_the_entry_points_and_a_broken_one_is_skipped(fresh_registry, int8):
    class Good:
        @kvpolicies.hookimpl
        def register_codecs(self, register):
            register(int8, aliases=("int8-alias",))

    class Failing:
        @kvpolicies.hookimpl
        def register_codecs(self, register):
            raise RuntimeError("boom")

    registry = kvpolicies.registry.registry()
    registry.register_plugin(Good(), name="good-codec")
    registry.register_plugin(Failing(), name="failing-codec")
    with pytest.warns(PluginWarning, match="'failing-codec' failed while registering codecs.*boom"):
        names = [info.name for info in kvpolicies.list_codecs()]
    assert names == ["full", "int4", "int8", "int8-alias", "int8-entry", "kivi2", "kivi4", "think"]
    assert isinstance(kvpolicies.get_codec("int8-alias"), int8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the policies are untouched by a broken codec plugin
        assert "snapkv" in [info.name for info in kvpolicies.list_policies()]


def test_building_a_codec_cache_leaves_the_random_stream_alone(int8):
    """A sampled generation must draw the same numbers whether or not its cache quantizes."""
    model = tiny_llama()
    torch.manual_seed(11)
    CompressedCache(model, "snapkv", 0.5, codec=int8())
    drawn = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), drawn)


@pytest.mark.parametrize("policy", ["headkv", "h2o"])
def test_codes_and_the_working_copy_hold_the_same_entries_through_eviction_and_padding(int8, policy):
    """At the end of every layer's pass, before the working copy is dropped, the codes read back must be the
    working copy's entries to within the 8-bit step: same entries, same order, through ragged packing, eviction
    and a padded prefill in chunks."""
    from kvpolicies.engine.storage import CompressedLayer

    checked = []
    settle = CompressedLayer.settle

    def compare(layer, **options):
        if layer.codes is not None and layer.keys is not None:
            keys, values = layer.codec.decode(layer.codes, layer.dtype)
            for got, want in ((keys, layer.keys), (values, layer.values)):
                step = (want.amax(-1, keepdim=True) - want.amin(-1, keepdim=True)) / 255
                assert got.shape == want.shape and bool(((got - want).abs() <= step / 2 + 1e-6).all())
            checked.append(layer.packed and not layer.uniform)
        settle(layer, **options)

    model = tiny_llama()
    ids = prompt(3, 60)
    mask = torch.ones_like(ids)
    mask[1, :25], mask[2, :7] = 0, 0
    cache = CompressedCache(model, policy, Budget(value=0.25, slack_tokens=1), codec=int8())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CompressedLayer, "settle", compare)
        with torch.no_grad():
            for end in (20, 40, 60):  # row 1's padding outlasts the first chunk
                model(ids[:, end - 20 : end], attention_mask=mask[:, :end], cache=cache)
            for step in range(3):  # decoding steps, one cut each (slack 1)
                mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
                model(torch.full((3, 1), 5 + step), attention_mask=mask, cache=cache)
    assert any(checked)  # ragged packed layers were compared


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_reading_codes_back_in_one_buffer_gives_the_plain_formula_bit_for_bit(bits):
    """``dequantize`` works in place to hold one float32 buffer, not three: the same values as ``codes · scale +
    minimum`` clamped to the dtype, and the stored codes untouched."""
    from kvpolicies_plugins.quantized import _unpacked, dequantize, quantize

    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(3)) * 10
    x[0, 0, :4] = 7e4  # beyond float16's largest value: clamped
    codes, scales = quantize(x, bits, 2)
    stored = codes.clone(), scales.clone()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        grouped = _unpacked(codes, bits).float().unflatten(-1, (2, -1))
        scale, low = scales.float().unflatten(-1, (2, 2)).unbind(-1)
        plain = (grouped * scale[..., None] + low[..., None]).flatten(-2)
        want = plain.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype)
        assert torch.equal(dequantize(codes, scales, bits, dtype), want)
    assert torch.equal(codes, stored[0]) and torch.equal(scales, stored[1])
