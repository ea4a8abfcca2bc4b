"""Grouped codecs (KIVI, ThinK): entries encoded in groups along the sequence or with parameters fitted per head,
each head's newest ones at full precision.

Most tests use KIVI's own quantizer with groups of 4 and a residual of 4, so that a 40- to 60-token prompt on the
tiny Llama (16-channel float32 heads) has whole groups, a full-precision part and evictions at once.
"""

from __future__ import annotations

import pytest
import torch

import kvpolicies
from kvpolicies import Budget, CompressedCache, GroupedCodec
from kvpolicies.engine.runs import Counts, merge, take
from kvpolicies.engine.storage import CompressedLayer
from kvpolicies.errors import PluginError, UsageError
from kvpolicies_plugins.kivi import Kivi2, Kivi4
from kvpolicies_plugins.think import ThinK
from tests.architectures import ARCHITECTURES, build
from tests.helpers import tiny_llama

FULL_ENTRY = 2 * 16 * 4  # the tiny Llama's entry at full precision


class SmallKivi(Kivi4):
    """KIVI's 4-bit quantizer with groups and a residual of 4 entries, for short prompts."""

    name = "kivi4-small-test"
    group = 4
    residual = 4


class SmallKivi2(SmallKivi):
    name = "kivi2-small-test"
    bits = 2


class SmallKivi8(SmallKivi):
    """8 bits: where a batch and a prompt alone differ in the last float bit, a code that flips moves the logits by
    a 255th of a group's range, not a 15th, so the comparison stays tight."""

    name = "kivi8-small-test"
    bits = 8


class Counting(SmallKivi):
    """Counts the groups it encodes (reset it before use)."""

    name = "kivi4-counting-test"
    encoded_groups = 0

    def encode(self, keys, values, fitted):
        Counting.encoded_groups += keys.shape[0]
        return super().encode(keys, values, fitted)


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_batch_equals_each_prompt_alone(model, build, steps: int = 4) -> CompressedCache:
    """Decode two 40-token prompts as a batch, the second left-padded by 9, and each alone in a cache from
    ``build()``; every step's logits must agree row by row. Returns the batch's cache."""
    ids = prompt(2, 40, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    batch = build()
    logits = [model(ids, attention_mask=mask, cache=batch).logits[:, -1]]
    for step in range(steps):
        mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
        logits.append(model(torch.full((2, 1), 5 + step), attention_mask=mask, cache=batch).logits[:, -1])
    for row, start in ((0, 0), (1, 9)):
        alone = build()
        own = [model(ids[row : row + 1, start:], cache=alone).logits[:, -1]]
        for step in range(steps):
            own.append(model(torch.full((1, 1), 5 + step), cache=alone).logits[:, -1])
        torch.testing.assert_close(torch.stack([step[row] for step in logits]), torch.cat(own), atol=1e-4, rtol=1e-4)
    return batch


def test_runs_are_cut_and_joined_run_by_run_ragged_or_not():
    def counts(*n):
        return Counts(n, torch.tensor(n))

    rows = torch.arange(20.0).view(10, 2)
    assert take(rows, counts(3, 7), counts(1, 2), counts(2, 4))[:, 0].tolist() == [2, 4, 10, 12, 14, 16]
    one_shape = take(rows, Counts.same(5, 2), Counts.same(3, 2), Counts.same(2, 2))  # views and one copy
    assert one_shape[:, 0].tolist() == [6, 8, 16, 18]
    assert one_shape.untyped_storage().data_ptr() != rows.untyped_storage().data_ptr()
    first, then = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[7.0], [8.0], [9.0], [10.0]])
    assert merge(first, counts(1, 2, 0), then, counts(1, 0, 3))[:, 0].tolist() == [1, 7, 2, 3, 8, 9, 10]
    assert merge(first[:2], Counts.same(1, 2), then[:2], Counts.same(1, 2))[:, 0].tolist() == [1, 7, 2, 8]
    with pytest.raises(ValueError, match="would upload"):
        take(rows, Counts((3, 7)), Counts.same(0, 2), Counts((1, 1)))


def test_kivi_prices_an_entry_with_its_share_of_the_groups_key_scales():
    four, two = kvpolicies.get_codec("kivi4"), kvpolicies.get_codec("kivi2")
    assert isinstance(four, GroupedCodec) and (four.group, four.residual) == (32, 128)  # the paper's G and R
    # codes of the key and the value, 4 bytes per key channel over 32 tokens, a value scale and minimum per 32
    assert four.entry_bytes(64, torch.bfloat16) == 32 + 32 + 8 + 8 == 80
    assert two.entry_bytes(64, torch.bfloat16) == 16 + 16 + 8 + 8 == 48
    assert four.entry_bytes(128, torch.float32) == 64 + 64 + 16 + 16
    assert four.entry_bytes(80, torch.float32) == 40 + 40 + 10 + 16  # values in 4 groups of 20 channels
    with pytest.raises(UsageError, match="not a whole number of bytes per token; use int8 or int4"):
        four.entry_bytes(12, torch.float32)
    with pytest.raises(UsageError, match="packs 4 channels a byte"):
        two.entry_bytes(18, torch.float32)


def test_keys_quantized_per_channel_follow_an_outlier_channel_better_than_per_token():
    """KIVI's premise: a key channel much larger than the rest for every token spoils a per-token scale."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(8, 32, 64, generator=generator)
    keys[..., 5] += 40.0  # an outlier channel
    values = torch.randn(8, 32, 64, generator=generator)
    kivi, per_token = kvpolicies.get_codec("kivi4"), kvpolicies.get_codec("int4")
    grouped_keys, grouped_values = kivi.decode(kivi.encode(keys, values, {}), torch.float32, {})
    token_keys, token_values = per_token.decode(per_token.encode(keys, values), torch.float32)
    assert (grouped_keys - keys).abs().mean() < 0.3 * (token_keys - keys).abs().mean()
    torch.testing.assert_close(grouped_values, token_values, atol=0, rtol=0)  # values: per token, as int4
    step = (keys.amax(1, keepdim=True) - keys.amin(1, keepdim=True)) / 15  # per channel, across the group
    assert ((grouped_keys - keys).abs() <= step / 2 * 1.01 + 1e-3).all()


@torch.no_grad()
def test_the_newest_entries_stay_in_full_and_every_older_group_is_encoded_once():
    model = tiny_llama()
    Counting.encoded_groups = 0
    cache = CompressedCache(model, "full", 1.0, codec=Counting())
    ids = prompt(1, 41)
    model(ids, cache=cache)
    layer = cache.layers[3]
    assert Counting.encoded_groups == 8 * 2 * 9 + 2  # 9 groups a head in 8 layers, and the trial encode's 2
    first = layer.residual
    assert first.encoded.host == (36, 36) and first.tails.host == (5, 5)  # 41 = 9 groups of 4, and 5 >= 4 in full
    keys = model(ids, use_cache=True).past_key_values.layers[3].keys  # the model's own keys, as computed
    torch.testing.assert_close(first.tail_keys.view(2, 5, 16), keys[0, :, -5:], atol=0, rtol=0)
    token = torch.tensor([[7]])
    tails = []
    for _ in range(9):
        model(token, cache=cache)
        tails.append(layer.residual.tails.host[0])
        for name, t in first.groups.items():  # the first nine groups of each head, untouched
            assert torch.equal(layer.residual.groups[name].view(2, -1, *t.shape[1:])[:, :9], t.view(2, 9, *t.shape[1:]))
    assert tails == [6, 7, 4, 5, 6, 7, 4, 5, 6]  # a group is encoded once it is older than the 4 newest
    assert Counting.encoded_groups == 8 * 2 * 11 + 2  # decoding encoded each new group, and nothing again
    assert layer.residual.encoded.host == (44, 44) and layer.keys is None


@torch.no_grad()
def test_what_is_stored_reads_back_as_the_working_copy_through_eviction_padding_and_chunks():
    """At the end of every layer's pass, before the working copy is dropped, the stored form read back must be the
    working copy's entries: exact for the full-precision ones, within a step for the encoded ones, through ragged
    packing, eviction, and a padded prefill in chunks."""
    checked = []
    settle = CompressedLayer.settle

    def compare(layer, **options):
        working = (layer.keys, layer.values)
        settle(layer, **options)
        if layer.residual is not None and working[0] is not None:
            stored = layer._keys_values()
            for got, want in zip(stored, working):
                assert got.shape == want.shape
                step = (want.amax() - want.amin()) / 15
                assert bool(((got - want).abs() <= step / 2 + 1e-5).all())
            head_dim = working[0].shape[-1]
            runs = len(layer.residual.tails.host)
            lengths = (Counts(tuple(layer.lengths), layer.run_lengths) if layer.packed else
                       Counts.same(working[0].shape[2], runs))
            tail = take(working[0].reshape(-1, head_dim), lengths, layer.residual.encoded, layer.residual.tails)
            assert torch.equal(tail, layer.residual.tail_keys)
            checked.append(layer.packed and not layer.uniform)

    model = tiny_llama()
    ids = prompt(3, 60)
    mask = torch.ones_like(ids)
    mask[1, :25], mask[2, :7] = 0, 0
    cache = CompressedCache(model, "headkv", Budget(value=0.3, slack_tokens=1), codec=SmallKivi())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CompressedLayer, "settle", compare)
        for end in (20, 40, 60):  # row 1's padding outlasts the first chunk
            model(ids[:, end - 20 : end], attention_mask=mask[:, :end], cache=cache)
        for step in range(6):  # decoding steps, cuts and groups encoded in between
            mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
            model(torch.full((3, 1), 5 + step), attention_mask=mask, cache=cache)
    assert any(checked)  # ragged packed layers were compared
    assert cache.resident_bytes() == cache.stats().physical_bytes


@torch.no_grad()
@pytest.mark.parametrize("policy", ["snapkv", "headkv", "h2o"])
def test_the_budget_sets_the_residuals_aside_and_what_is_resident_never_exceeds_it(policy):
    model = tiny_llama()
    codec = SmallKivi()
    budget = Budget(value=0.3, slack_tokens=2)
    cache = CompressedCache(model, policy, budget, codec=codec)
    price = codec.entry_bytes(16, torch.float32)
    assert cache.shape.kept_entry_bytes == price == 8 + 8 + 4 * 16 // 4 + 4 and cache.shape.full_precision_entries == 7
    ids = prompt(1, 60)
    model(ids, cache=cache)
    per_head = 0.3 * 60 * FULL_ENTRY  # bytes; the first 7 entries of a head may be held at full precision
    kept = cache.stats().kept_entries
    assert kept == int(16 * (7 + (per_head - 7 * FULL_ENTRY) / price))  # what the rest of the bytes buys
    token = torch.tensor([[9]])
    for step in range(8):
        stats = cache.stats()
        assert stats.resident_bytes == stats.physical_bytes  # counted from the tensors, residuals at full price
        limit = 0.3 * (60 + step) * 16 * FULL_ENTRY + 16 * 2 * price  # the budget and its decoding slack
        assert stats.resident_bytes <= limit
        model(token, cache=cache)
    plain = CompressedCache(model, policy, budget)
    model(ids, cache=plain)
    assert kept > 1.5 * plain.stats().kept_entries  # the same bytes keep more entries


@torch.no_grad()
def test_a_prompt_too_short_to_fill_a_residual_is_held_in_full_within_the_same_bytes():
    model = tiny_llama()
    cache = CompressedCache(model, "snapkv", Budget(value=0.3, slack_tokens=0), codec=SmallKivi())
    model(prompt(1, 10), cache=cache)
    stats = cache.stats()
    assert stats.kept_entries == 16 * 3  # 0.3 of 10 entries per head, bought at full precision
    assert all(layer.residual.tails.host == (3, 3) and layer.residual.encoded.host == (0, 0)
               for layer in cache.layers)
    assert stats.resident_bytes == stats.physical_bytes == 16 * 3 * FULL_ENTRY <= 0.3 * stats.full_bytes


class Exact(GroupedCodec):
    """Groups of 4 stored exactly as computed, a residual of 2: whatever it decodes to is the model's own entries,
    so any difference from full precision is where the groups, the hidden entries or the cuts went wrong."""

    name = "exact-grouped-test"
    group = 4
    residual = 2
    encoded_groups = 0

    def entry_bytes(self, head_dim, dtype):
        return 2 * head_dim * torch.empty((), dtype=dtype).element_size()

    def encode(self, keys, values, fitted):
        Exact.encoded_groups += keys.shape[0]
        return {"keys": keys.clone(), "values": values.clone()}

    def decode(self, stored, dtype, fitted):
        return stored["keys"].to(dtype), stored["values"].to(dtype)


WINDOWED = ["mistral-sliding-window", "gemma2", "gemma3"]


def window_prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("architecture", WINDOWED)
def test_a_window_drops_a_group_only_once_all_of_it_slid_out_and_hides_the_rest(architecture):
    """Windows of 8 slide past groups of 4 while decoding: each group is encoded once and dropped whole, what slid
    out of a group still in view is stored but hidden (the model's own sliding mask, from the stored columns), and
    the logits are the model's own."""
    model = build(ARCHITECTURES[architecture])
    ids, following = window_prompt(1, 21), torch.arange(5, 17)
    plain = model(torch.cat([ids, following[None]], 1)).logits[0, -len(following) - 1 :]
    Exact.encoded_groups = 0
    cache = CompressedCache(model, "full", 1.0, codec=Exact())
    logits = [model(ids, cache=cache).logits[0, -1]]
    windows = [layer for layer in cache.layers if layer.window is not None]
    held, hidden = [], []
    for token in following:
        logits.append(model(token.view(1, 1), cache=cache).logits[0, -1])
        held.append({sum(layer.residual.encoded.host + layer.residual.tails.host) // 2 for layer in windows})
        hidden.append({layer.hidden for layer in windows})
        stats = cache.stats()
        assert stats.resident_bytes == stats.physical_bytes
    torch.testing.assert_close(torch.stack(logits), plain, atol=1e-5, rtol=1e-5)
    assert hidden == [{1}, {2}, {3}, {0}] * 3  # 7 in view, and 1 to 3 more until their group is dropped whole
    assert held == [{7 + n} for (n,) in hidden]
    full_layers = len(cache.layers) - len(windows)
    # Windows: 4 groups in all by the last step (1 at prefill, a new one every 4 steps). Full layers: every group of
    # the 33 tokens older than the residual of 2 (7 groups). The trial encode's 2.
    assert Exact.encoded_groups == 2 * (len(windows) * 4 + full_layers * 7) + 2


@torch.no_grad()
def test_windows_held_whole_are_charged_for_their_hidden_entries_and_the_budget_holds():
    """``windows=keep`` holds a window whole, so the budget charges it for what it stores: its ``W - 1`` and its
    oldest group's hidden entries (3 with groups of 4). KIVI's residual of 128 covers a window of 8: no group ever
    forms there, and nothing is charged."""
    model = build(ARCHITECTURES["gemma3"])  # layer 0 windowed to 8, layer 1 full attention
    cache = CompressedCache(model, "snapkv", Budget(value=0.5, windows="keep", slack_tokens=0), codec=Exact())
    assert cache.allocation(40).tokens[0].tolist() == [7 + 3, 7 + 3]
    assert CompressedCache(model, "snapkv", Budget(value=0.5, windows="keep"), codec="kivi4").shape.window_overhang == 0
    model(window_prompt(1, 40), cache=cache)
    held = set()
    for step in range(8):
        model(torch.tensor([[5 + step]]), cache=cache)
        residual = cache.layers[0].residual
        held.add(residual.encoded.host[0] + residual.tails.host[0])  # as stored, head 0
        stats = cache.stats()
        assert stats.resident_bytes == stats.physical_bytes <= 0.5 * stats.full_bytes
    assert held == {7, 8, 9, 10}


def exact_against_full_precision(model, build, prompts: torch.Tensor, mask: torch.Tensor, steps: int = 10):
    """Decode ``prompts`` (left-padded by ``mask``) in a cache from ``build(codec)`` with the exact grouped codec and
    with full precision: the logits of every step must agree. Returns the grouped cache."""
    def decode(codec):
        cache = build(codec)
        attention = mask
        logits = [model(prompts, attention_mask=attention, cache=cache).logits[:, -1]]
        for step in range(steps):
            attention = torch.cat([attention, attention.new_ones(len(prompts), 1)], 1)
            token = torch.full((len(prompts), 1), 5 + step)
            logits.append(model(token, attention_mask=attention, cache=cache).logits[:, -1])
            stats = cache.stats()  # (full precision stores a dense layer's padding; the grouped codec packs it)
            assert stats.resident_bytes == stats.physical_bytes or codec is None
        return torch.stack(logits), cache

    exact, cache = decode(Exact())
    torch.testing.assert_close(exact, decode(None)[0], atol=1e-5, rtol=1e-5)
    return cache


@torch.no_grad()
@pytest.mark.parametrize("windows", ["share", "keep"])
@pytest.mark.parametrize("architecture", ["mistral-sliding-window", "gemma3"])
def test_a_left_padded_batch_with_a_prompt_shorter_than_the_window_packs_and_slides_each_row_as_alone(
        architecture, windows):
    """Nothing is cut (the full policy): the batch packs each row to the entries its window holds (12 tokens, 7 of
    them in view, beside 3), and the windows then slide run by run, from the host's counts."""
    model = build(ARCHITECTURES[architecture])
    ids = window_prompt(2, 12, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    cache = exact_against_full_precision(
        model, lambda codec: CompressedCache(model, "full", Budget(value=1.0, windows=windows), codec=codec), ids, mask)
    window = cache.layers[0]
    assert window.packed and not window.cut and window.window is not None


@torch.no_grad()
def test_windows_cut_and_windows_left_whole_side_by_side_decode_as_full_precision():
    """l2norm cuts the first layer and leaves the second whole: a packed window beside a dense one that holds
    hidden entries, which the attention is handed without (transformers builds one mask for every window). The
    window left whole costs its 3 hidden entries a head too, so the grouped cache gets 1.5 tokens a head more for
    the first layer to keep as much as full precision keeps (3 a head)."""
    model = build(ARCHITECTURES["mistral-sliding-window"])  # both layers windowed
    policy = kvpolicies.get_policy("l2norm", uncompressed_layers=[1])
    ids = window_prompt(1, 21, seed=6)
    cache = exact_against_full_precision(model, lambda codec: CompressedCache(
        model, policy, Budget.parse("5 tokens" if codec is None else "6.5 tokens", slack_tokens=1), codec=codec),
        ids, torch.ones_like(ids))
    assert cache.allocation(21).tokens.tolist() == [[3, 3], [10, 10]]
    assert cache.layers[0].packed and not cache.layers[1].packed
    assert max(cache.layers[1].counts()[0]) > 7  # a window left whole holding hidden entries


@torch.no_grad()
def test_a_window_left_whole_by_a_compressing_policy_is_not_cut_for_its_hidden_entries():
    """At the full budget snapkv keeps every window whole, with no slack: its hidden entries are within what a
    window may hold (the budget of 1 buys them even from a codec at full precision's price), so no cut comes, and
    every group is encoded once, as without a policy."""
    model = build(ARCHITECTURES["mistral-sliding-window"])
    encoded = {}
    for policy in ("full", "snapkv"):
        Exact.encoded_groups = 0
        cache = exact_against_full_precision(
            model, lambda codec: CompressedCache(model, policy, Budget(value=1.0, slack_tokens=0), codec=codec),
            window_prompt(1, 21), torch.ones(1, 21, dtype=torch.long), steps=12)
        encoded[policy] = Exact.encoded_groups
        assert not any(layer.cut for layer in cache.layers)
    assert encoded["snapkv"] == encoded["full"]


@torch.no_grad()
@pytest.mark.parametrize("architecture", WINDOWED)
def test_a_window_under_a_grouped_codec_decodes_as_full_precision_through_cuts_padding_and_a_question(architecture):
    """snapkv cuts windows and full layers at prefill; a left-padded batch packs every layer; the question and the
    decoded tokens are kept whole, so cut windows slide by reading their runs back. Entries stored exactly in groups
    must give the logits and the entries kept of full precision, at every step."""
    model = build(ARCHITECTURES[architecture])
    ids = window_prompt(2, 30, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def decode(codec):
        cache = CompressedCache(model, "snapkv", Budget(value=0.5, slack_tokens=1), codec=codec)
        cache.context_lengths = [27, 22]  # the last 3 tokens of each prompt are its question
        attention = mask
        logits = [model(ids, attention_mask=attention, cache=cache).logits[:, -1]]
        held = []
        for step in range(10):
            attention = torch.cat([attention, attention.new_ones(2, 1)], 1)
            logits.append(model(torch.full((2, 1), 5 + step), attention_mask=attention, cache=cache).logits[:, -1])
            held.append(max(max(layer.lengths) for layer in cache.layers if layer.window is not None))
            stats = cache.stats()
            assert stats.resident_bytes == stats.physical_bytes
        return torch.stack(logits), held, cache

    exact, held, cache = decode(Exact())
    full, _, _ = decode(None)
    torch.testing.assert_close(exact, full, atol=1e-5, rtol=1e-5)
    assert all(layer.packed and layer.cut for layer in cache.layers)
    assert max(held) <= 7 + Exact.group - 1 + 1  # the window, its oldest group's hidden entries, the slack


@torch.no_grad()
def test_more_bits_stay_closer_to_the_models_own_logits_and_a_left_padded_batch_equals_each_prompt_alone():
    model = tiny_llama()
    ids = prompt(1, 40)
    nxt = torch.tensor([[5]])
    plain = model(torch.cat([ids, nxt], 1)).logits[:, -1]
    errors = {}
    for codec in (SmallKivi(), SmallKivi2()):
        cache = CompressedCache(model, "full", 1.0, codec=codec)
        model(ids, cache=cache)
        errors[codec.bits] = float((model(nxt, cache=cache).logits[:, -1] - plain).abs().max())
    assert 0 < errors[4] < errors[2] < float(plain.abs().max())

    assert_batch_equals_each_prompt_alone(model, lambda: CompressedCache(model, "snapkv", 0.4, codec=SmallKivi8()))


@torch.no_grad()
def test_an_after_prefill_stage_and_its_probe_leave_the_stored_groups_as_they_were():
    class Probing(kvpolicies.Policy):
        name = "probing-grouped-test"

        def after_prefill(self, prefilled):
            before = [layer.residual for layer in cache.layers]
            received = prefilled.attention_from(torch.tensor([[4, 5, 6]]))
            assert all(layer.residual is held for layer, held in zip(cache.layers, before))  # restored, as it was
            return received

    model = tiny_llama()
    cache = CompressedCache(model, Probing(), 0.4, codec=SmallKivi())
    model(prompt(1, 40), cache=cache)
    model(torch.tensor([[3]]), cache=cache)
    stats = cache.stats()
    assert stats.kept_entries - stats.appended_entries == int(16 * (7 + (0.4 * 40 - 7) * FULL_ENTRY / 36))
    assert all(layer.keys is None for layer in cache.layers) and stats.resident_bytes == stats.physical_bytes


@pytest.mark.parametrize("policy", ["snapkv", "headkv"])
def test_a_grouped_codec_adds_no_sync_to_a_decoding_step(policy):
    from tests.test_device_work import decode_work

    own = decode_work("full", 4, 5, slack=16)
    assert decode_work(policy, 4, 5, slack=16, codec=SmallKivi(), steps=6) == own * 2  # groups encoded in between
    per_cut = {}
    for codec in (None, SmallKivi()):  # a cut at nearly every step: its reads per cut, and not one more
        cuts: list = []
        syncs = sum(decode_work(policy, 4, 5, slack=0, codec=codec, budget=0.2, evictions=cuts))
        per_cut[codec is None] = (syncs - sum(own)) / cuts[0]
    assert per_cut[False] == per_cut[True] > 0
    launches = {batch: [] for batch in (4, 16)}
    for batch, counted in launches.items():
        decode_work(policy, batch, 5, slack=16, launches=counted, codec=SmallKivi(), steps=6)
    assert launches[4] == launches[16]  # encoding and merging groups is one set of kernels, whatever the batch


@pytest.mark.parametrize("policy", ["full", "snapkv"])
def test_a_window_under_a_grouped_codec_adds_no_sync_to_a_decoding_step(policy):
    """Windows never cut slide from the host's counts; cut ones read their runs back only past the slack."""
    from tests.test_device_work import decode_work

    model = build(ARCHITECTURES["gemma3"])  # a window of 8 beside a full-attention layer
    own = decode_work("full", 4, 5, slack=16, model=model, steps=8)
    assert decode_work(policy, 4, 5, slack=16, codec=Exact(), model=model, steps=8) == own == [1] * 8


class Uneven(SmallKivi):
    name = "uneven-test"

    def encode(self, keys, values, fitted):
        stored = super().encode(keys, values, fitted)
        return {**stored, "extra": keys[:1, 0]}  # one row for all groups


def test_a_grouped_codec_that_breaks_its_contract_is_named_when_the_cache_is_built():
    with pytest.raises(PluginError, match="uneven-test.*one row per group"):
        CompressedCache(tiny_llama(), "snapkv", 0.5, codec=Uneven())


def test_kivi_is_registered_and_listed():
    names = {info.name for info in kvpolicies.list_codecs()}
    assert {"kivi4", "kivi2", "think"} <= names
    assert isinstance(kvpolicies.get_codec("kivi2"), Kivi2) and isinstance(kvpolicies.get_codec("kivi4"), Kivi4)


class SmallThinK(ThinK):
    """ThinK with a window of 8: channels chosen by the last 8 queries, the newest 8 entries kept whole."""

    name = "think-small-test"
    window = 8


def test_think_keeps_the_channels_where_the_last_queries_and_the_keys_meet():
    codec = kvpolicies.get_codec("think")
    assert (codec.group, codec.residual, codec.window, codec.fits) == (1, 32, 32, True)
    assert codec.entry_bytes(64, torch.bfloat16) == (32 + 64) * 2 == 192  # half the key channels, the whole value
    keys = torch.ones(2, 6, 4)
    keys[0, :, 1] = 10.0  # run 0: channel 1 large in the keys, but no query reads it
    queries = torch.ones(2, 3, 5, 4)  # 3 query heads share each KV head
    queries[0, :, :, 1] = 0.0
    queries[0, :, :, 3] = 5.0
    queries[0, :, :, 2] = 0.5
    queries[1, :, :, 0] = 5.0
    queries[1, :, -1, 2] = 50.0  # within the last 32 queries
    valid = torch.ones(2, 6, dtype=torch.bool)
    channels = codec.fit(keys, valid, queries)["channels"]
    assert channels.tolist() == [[0, 3], [0, 2]]
    rows = {"channels": channels.repeat_interleave(6, dim=0)}  # one group (entry) per row, six per run
    entries = torch.randn(12, 1, 4)
    stored = codec.encode(entries, entries * 2, rows)
    assert stored["keys"].shape == (12, 1, 2) and stored["values"].shape == (12, 1, 4)
    decoded_keys, decoded_values = codec.decode(stored, torch.float32, rows)
    torch.testing.assert_close(decoded_values, entries * 2, atol=0, rtol=0)
    kept = torch.zeros(12, 1, 4, dtype=torch.bool)
    kept.scatter_(-1, rows["channels"][:, None], True)
    assert torch.equal(decoded_keys, entries * kept)  # the kept channels as they were, the others zero


@torch.no_grad()
def test_think_prunes_every_entry_older_than_its_window_with_channels_fitted_once():
    model = tiny_llama()
    cache = CompressedCache(model, "full", 1.0, codec=SmallThinK())
    ids = prompt(1, 30)
    model(ids, cache=cache)
    layer = cache.layers[2]
    assert layer.residual.encoded.host == (22, 22) and layer.residual.tails.host == (8, 8)
    channels = layer.residual.fitted["channels"]
    assert channels.shape == (2, 8)  # 8 of 16 channels for each of the 2 KV heads
    own = model(ids, use_cache=True).past_key_values.layers[2].keys[0]  # [kv_heads, seq, head_dim]
    keys, values = layer._keys_values()
    kept = torch.zeros(2, 1, 16, dtype=torch.bool).scatter_(-1, channels[:, None], True)
    torch.testing.assert_close(keys[0, :, :22], own[:, :22] * kept, atol=0, rtol=0)  # pruned: kept channels exact
    torch.testing.assert_close(keys[0, :, 22:], own[:, 22:], atol=0, rtol=0)  # the window, whole
    assert cache.auxiliary_bytes() >= 8 * channels.numel() * channels.element_size()  # the channels, per layer
    for step in range(3):
        model(torch.tensor([[5 + step]]), cache=cache)
        assert torch.equal(layer.residual.fitted["channels"], channels)  # chosen once
    assert layer.residual.encoded.host == (25, 25) and layer.residual.tails.host == (8, 8)
    stats = cache.stats()
    price = SmallThinK().entry_bytes(16, torch.float32)
    assert price == (8 + 16) * 4 and stats.resident_bytes == stats.physical_bytes == 16 * (25 * price + 8 * FULL_ENTRY)


@torch.no_grad()
@pytest.mark.parametrize("policy", ["snapkv", "headkv"])
def test_think_composes_with_eviction_and_keeps_more_entries_in_no_more_bytes(policy):
    model = tiny_llama()
    ids = prompt(2, 60)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    budget = Budget(value=0.4, slack_tokens=2)
    pruned = CompressedCache(model, policy, budget, codec=SmallThinK())
    plain = CompressedCache(model, policy, budget)
    model(ids, attention_mask=mask, cache=pruned)
    model(ids, attention_mask=mask, cache=plain)
    for step in range(4):
        mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
        model(torch.full((2, 1), 5 + step), attention_mask=mask, cache=pruned)
    stats = pruned.stats()
    assert stats.resident_bytes == stats.physical_bytes
    assert stats.kept_entries > plain.stats().kept_entries
    for sequence in pruned.sequence_stats():
        assert sequence.physical_bytes <= 0.4 * sequence.full_bytes + 16 * 2 * FULL_ENTRY  # the budget and slack


def test_think_adds_no_sync_to_a_decoding_step():
    from tests.test_device_work import decode_work

    own = decode_work("full", 4, 5, slack=16)
    assert decode_work("snapkv", 4, 5, slack=16, codec=SmallThinK()) == own


class GlobalNorm(kvpolicies.Policy):
    """An after-prefill stage: the lowest-norm keys across every layer and head."""

    name = "global-norm-grouped-test"

    def after_prefill(self, prefilled):
        return [None if layer is None else -layer.keys.float().norm(dim=-1) for layer in prefilled.layers]


@torch.no_grad()
def test_what_an_after_prefill_stage_keeps_is_encoded_once_from_full_precision():
    """The prompt waits at full precision for the stage: encoded before it, the entries after each cut would be
    read back from their codes and quantized again in shifted groups."""
    model = tiny_llama()
    Counting.encoded_groups = 0
    cache = CompressedCache(model, GlobalNorm(), 0.4, codec=Counting())
    ids = prompt(1, 40)
    model(ids, cache=cache)
    assert Counting.encoded_groups == 2  # the trial's: the prompt waits as computed
    assert all(not any(layer.residual.encoded.host) for layer in cache.layers)
    model(torch.tensor([[3]]), cache=cache)  # the stage runs before this pass, and cuts
    encoded = sum(sum(layer.residual.encoded.host) for layer in cache.layers)
    assert encoded > 0 and Counting.encoded_groups - 2 == encoded // 4  # every group once
    own = model(ids, use_cache=True).past_key_values.layers
    for layer, computed in zip(cache.layers, own):  # each kept group is the codec's reading of the model's keys
        kept = layer.residual
        runs = kept.encoded.host[0]  # entries, a multiple of the group
        if not runs:
            continue
        keys, _ = kept.codec.decode(kept.groups, torch.float32, {})
        first = keys.reshape(-1, 16)[:runs]  # run 0's encoded entries
        rows = [int((computed.keys[0, 0] - row).abs().amax(-1).argmin()) for row in first]
        original = computed.keys[0, 0, rows]
        again, _ = kept.codec.decode(kept.codec.encode(original.view(-1, 4, 16), original.view(-1, 4, 16), {}),
                                     torch.float32, {})
        torch.testing.assert_close(first, again.reshape(-1, 16), atol=0, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("policy", ["full", "stage"])
def test_a_left_padded_batch_groups_each_prompt_from_its_first_token_as_alone(policy):
    """KIVI alone (the full policy never evicts) and a stage that chooses later: the padding must not enter the
    groups, or a padded row's groups would start elsewhere than the prompt's alone."""
    model = tiny_llama()
    batch = assert_batch_equals_each_prompt_alone(model, lambda: CompressedCache(
        model, GlobalNorm() if policy == "stage" else "full", 0.4, codec=SmallKivi8()))
    assert all(layer.packed for layer in batch.layers)  # packed to the real entries before anything was encoded
    assert batch.stats().padding_bytes == 0


@torch.no_grad()
def test_a_batch_whose_shortest_prompt_has_not_begun_holds_its_first_chunk_as_computed():
    model = tiny_llama()
    ids = prompt(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :25] = 0  # row 1 starts in the second chunk
    cache = CompressedCache(model, "full", 1.0, codec=SmallKivi())
    model(ids[:, :20], attention_mask=mask[:, :20], cache=cache)
    assert all(not layer.packed and not any(layer.residual.encoded.host) for layer in cache.layers)
    model(ids[:, 20:], attention_mask=mask, cache=cache)
    layer = cache.layers[0]
    assert layer.packed and layer.lengths == [40, 40, 15, 15]  # the padding gone, each prompt grouped from its start
    assert layer.residual.encoded.host == (36, 36, 8, 8)
    stats = cache.stats()
    assert stats.padding_bytes == 0 and stats.resident_bytes == stats.physical_bytes


def test_a_cut_keeps_the_groups_before_it_as_they_were_and_encodes_the_rest_afresh():
    from kvpolicies.engine.residual import Residual

    codec = Counting()
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(40, 16, generator=generator), torch.randn(40, 16, generator=generator)
    store = Residual.empty(codec, 2, keys).extended(keys, values, Counts((20, 20), torch.tensor([20, 20])), dict)
    assert store.encoded.host == (16, 16) and store.tails.host == (4, 4)
    working, working_values = store.decoded(torch.float32)
    kept = torch.ones(40, dtype=torch.bool)
    kept[9], kept[20 + 2] = False, False  # a cut at entry 9 of run 0 and entry 2 of run 1
    Counting.encoded_groups = 0
    cut = store.relaid(working[kept], working_values[kept], Counts((19, 19), torch.tensor([19, 19])),
                       Counts((9, 2), torch.tensor([9, 2])), dict)
    for name, t in store.groups.items():
        assert torch.equal(cut.groups[name][:2], t[:2])  # run 0's two groups before its cut, untouched
    assert cut.encoded.host == (12, 12) and cut.tails.host == (7, 7)
    assert Counting.encoded_groups == 1 + 3  # run 0's entries 8 to 11, run 1's first twelve
    again, _ = cut.decoded(torch.float32)
    torch.testing.assert_close(again[:8], working[:8], atol=0, rtol=0)


@torch.no_grad()
def test_cuts_that_shift_every_group_at_every_step_let_the_keys_drift_within_bounds():
    """StreamingLLM cuts right after its sinks, so every group shifts at every step and is quantized again from
    values read back: the keys drift, but a value already near a grid point stays near one."""
    model = tiny_llama()
    ids = prompt(1, 60)
    streaming = CompressedCache(model, "streaming", Budget(value=0.2, slack_tokens=0), codec=SmallKivi())
    tokens = [ids, model(ids, cache=streaming).logits[:, -1:].argmax(-1)]
    errors = []
    for _ in range(30):
        tokens.append(model(tokens[-1], cache=streaming).logits[:, -1:].argmax(-1))
        seen = torch.cat(tokens[:-1], 1)
        own = model(seen, use_cache=True).past_key_values.layers[0].keys[0]  # layer 0: the same inputs either way
        layer = streaming.layers[0]
        keys, _ = layer._keys_values()
        error = 0.0
        for head, run in enumerate(keys.split(layer.lengths)):
            kept = list(range(4)) + list(range(seen.shape[1] - run.shape[0] + 4, seen.shape[1]))  # sinks, recent
            error += float((run - own[head, kept]).abs().mean()) / 2
        errors.append(error)
    assert streaming.cuts > 8 + 30  # cut at decoding steps
    assert errors[0] > 0 and max(errors) < 2.5 * errors[0]


def test_a_grouped_codec_that_stores_more_than_full_precision_is_refused():
    class Costly(SmallKivi):
        name = "costly-test"
        bits = 8
        group = 2  # a scale and minimum per key channel for every 2 tokens: 68 bytes an entry against 64

    model = tiny_llama().to(torch.bfloat16)
    with pytest.raises(UsageError, match="68 bytes on this model, more than the 64 of full precision"):
        CompressedCache(model, "snapkv", 0.5, codec=Costly())


@torch.no_grad()
def test_think_fits_each_prompt_as_alone_in_a_padded_batch_with_its_query_heads_grouped_by_kv_head():
    """A row shorter than the window: its padded queries must weigh nothing; the GQA model's query heads 3h to 3h + 2
    read KV head h."""
    seen = []

    class Watched(SmallThinK):
        name = "think-watched-test"

        def fit(self, keys, valid, queries):
            if keys.shape[0]:
                seen.append(queries)
            return super().fit(keys, valid, queries)

    model = tiny_llama()
    ids = prompt(2, 20, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :15] = 0  # 5 real tokens, fewer than the window of 8
    batch = CompressedCache(model, "full", 1.0, codec=Watched())
    query = {}

    def remember(layer, query_states, *args, **kwargs):
        query.setdefault(layer.layer_idx, query_states)
        return after(layer, query_states, *args, **kwargs)

    after = batch.after_attention
    batch.after_attention = remember
    # Positions as generate() gives them, from each row's first real token: ThinK ranks channels of keys and
    # queries after RoPE, which, unlike attention, depends on where the positions start.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = [model(ids, attention_mask=mask, position_ids=positions, cache=batch).logits[:, -1]]
    first_layer = [queries for queries in seen if queries.shape[1] == 3][0]  # not the trial's, when it was built
    grouped = first_layer.view(2, 2, 3, 8, 16)  # [batch, kv_heads, query heads per KV head, last 8, head_dim]
    for head in range(2):
        torch.testing.assert_close(grouped[0, head], query[0][0, 3 * head : 3 * head + 3, -8:], atol=0, rtol=0)
    assert grouped[1, :, :, :3].abs().sum() == 0  # row 1's padded positions among its last 8
    for step in range(10):  # decoding pushes the short row's entries past the window: they are pruned
        mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
        positions = positions[:, -1:] + 1
        logits.append(model(torch.full((2, 1), 5 + step), attention_mask=mask, position_ids=positions,
                            cache=batch).logits[:, -1])
    for row, start in ((0, 0), (1, 15)):
        alone = CompressedCache(model, "full", 1.0, codec=SmallThinK())
        own = [model(ids[row : row + 1, start:], cache=alone).logits[:, -1]]
        for step in range(10):
            own.append(model(torch.full((1, 1), 5 + step), cache=alone).logits[:, -1])
        torch.testing.assert_close(torch.stack([step[row] for step in logits]), torch.cat(own), atol=1e-4, rtol=1e-4)
        fitted = alone.layers[3].residual.fitted["channels"]
        assert torch.equal(batch.layers[3].residual.fitted["channels"][2 * row : 2 * row + 2], fitted)


@torch.no_grad()
def test_think_chooses_its_channels_with_the_prompt_even_when_nothing_is_pruned_yet():
    model = tiny_llama()
    cache = CompressedCache(model, "full", 1.0, codec=SmallThinK())
    model(prompt(1, 6), cache=cache)  # shorter than the window: nothing pruned, the channels chosen all the same
    layer = cache.layers[1]
    chosen = layer.residual.fitted["channels"]
    assert layer.residual.encoded.host == (0, 0) and chosen.shape == (2, 8)
    for step in range(4):
        model(torch.tensor([[7 + step]]), cache=cache)
    assert layer.residual.encoded.host == (2, 2) and torch.equal(layer.residual.fitted["channels"], chosen)


@torch.no_grad()
def test_think_under_an_after_prefill_stage_keeps_the_prompts_channels_and_its_bytes():
    model = tiny_llama()
    cache = CompressedCache(model, GlobalNorm(), 0.4, codec=SmallThinK())
    model(prompt(1, 40), cache=cache)
    chosen = [layer.residual.fitted["channels"] for layer in cache.layers]
    model(torch.tensor([[3]]), cache=cache)  # the stage runs before this pass, and cuts
    assert all(torch.equal(layer.residual.fitted["channels"], before) for layer, before in zip(cache.layers, chosen))
    stats = cache.stats()
    assert stats.resident_bytes == stats.physical_bytes and stats.kept_entries < 41 * 16
    plain = CompressedCache(model, GlobalNorm(), 0.4, codec=SmallKivi())
    model(prompt(1, 40), cache=plain)
    model(torch.tensor([[3]]), cache=plain)
    assert cache.auxiliary_bytes() - plain.auxiliary_bytes() == 8 * 2 * 8 * 8  # the channels: 8 int64 per head


@torch.no_grad()
def test_think_waits_for_every_prompt_to_begin_before_it_chooses_even_when_a_chunk_is_cut():
    """A left-padded batch prefilled in chunks, one prompt starting in the second chunk, under a policy that cuts
    the first chunk already: no channel is chosen from a prompt that has not begun."""
    model = tiny_llama()
    ids = prompt(2, 40, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :24] = 0  # row 1 starts in the second chunk of 20
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = CompressedCache(model, "snapkv", Budget(value=0.6, slack_tokens=0), codec=SmallThinK())
    model(ids[:, :20], attention_mask=mask[:, :20], position_ids=positions[:, :20], cache=cache)
    assert all(layer.packed and not layer.residual.fitted for layer in cache.layers)  # cut, held as computed
    assert all(not any(layer.residual.encoded.host) for layer in cache.layers)
    model(ids[:, 20:], attention_mask=mask, position_ids=positions[:, 20:], cache=cache)
    assert all(layer.residual.fitted for layer in cache.layers)
    stats = cache.stats()
    assert stats.resident_bytes == stats.physical_bytes


@torch.no_grad()
def test_right_padding_after_encoded_groups_packs_the_layer_and_keeps_the_groups():
    """lm-eval's loglikelihood continues a prefilled batch with right-padded tokens: the padding is packed away,
    and the groups already encoded stay as they were."""
    model = tiny_llama()
    cache = CompressedCache(model, "full", 1.0, codec=Counting())
    ids = prompt(2, 40)
    model(ids, cache=cache)
    before = [layer.residual.groups for layer in cache.layers]
    Counting.encoded_groups = 0
    more = torch.full((2, 6), 9)
    mask = torch.cat([torch.ones(2, 40, dtype=torch.long), torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]])], 1)
    model(more, attention_mask=mask, cache=cache)
    layer = cache.layers[0]
    assert layer.packed and layer.lengths == [46, 46, 42, 42]
    assert Counting.encoded_groups == 8 * 2 * 1  # row 0's one new group per head; nothing encoded again
    for layer, groups in zip(cache.layers, before):  # 9 groups a run before; row 0's runs gained one each
        for name, t in groups.items():
            now = layer.residual.groups[name]
            assert torch.equal(now[:9], t[:9]) and torch.equal(now[10:19], t[9:18]) and torch.equal(now[20:], t[18:])
    stats = cache.stats()
    assert stats.padding_bytes == 0 and stats.resident_bytes == stats.physical_bytes


def test_the_step_costs_table_counts_each_policy_with_its_codec_and_the_plain_model_without():
    from kvpolicies.experiments.step_costs import step_costs

    table = step_costs(tiny_llama(), None, 96, ["snapkv"], [Budget.parse(0.25)], batches=(1, 4), steps=2,
                       codec="kivi4")
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    assert [row[:3] for row in rows] == [["full", "-", "-"], ["snapkv + kivi4", "0.25", "16"],
                                         ["snapkv + kivi4", "0.25", "0"]]
    assert all(cell.endswith("/ 1.0") for cell in rows[1][3:])  # no sync beyond the model's own between cuts


@torch.no_grad()
def test_a_question_held_at_full_precision_is_not_counted_as_context():
    """The question's entries are each run's newest, which a grouped codec holds whole: the context's bytes are what
    is resident less the question's at full precision, not a share of the resident bytes by entry count."""
    from kvpolicies.integrations.lm_eval import kv_memory_record

    model = tiny_llama()
    cache = CompressedCache(model, "snapkv", 0.5, codec=SmallKivi())
    cache.context_lengths = [37]  # the last 3 tokens are the question: within the residual of 4 to 7 entries
    model(prompt(1, 40), cache=cache)
    (stats,) = cache.sequence_stats()
    question = stats.appended_entries
    assert question == 3 * cache.shape.cells
    assert stats.context_bytes == stats.physical_bytes - question * FULL_ENTRY
    assert stats.context_bytes < stats.physical_bytes * (stats.kept_entries - question) // stats.kept_entries
    assert kv_memory_record([stats])["context_bytes_peak"] == stats.context_bytes
