"""Caches decoded as one batch: each row's cache ends where decoding it alone leaves it, with the same tokens."""

from __future__ import annotations

import pytest
import torch

from kvpolicies import CompressedCache
from kvpolicies.engine.replay import capture, replay
from kvpolicies.engine.rows import CacheRows, decode_together
from tests.architectures import ARCHITECTURES, REFUSED, build
from tests.helpers import tiny_llama
from tests.test_grouped_codecs import WINDOWED, Exact, SmallKivi
from tests.test_replay import prompt, state

POLICIES = ["full", "snapkv", "h2o", "streaming", "keydiff", "headkv", "pyramidkv", "tova", "kvzip"]
"""Scores from attention, from keys alone, per-head budgets, per-layer budgets, decode-time tracks and an
after-prefill stage that runs at the first decoding step."""


def assert_alike(first: list[dict], second: list[dict], flips: float = 0.0) -> None:
    """Two caches' layers hold the same entries (lengths, positions seen, logical lengths exactly) with the same
    keys, values and tracks to rounding: a batch's projections may round differently from one row's.

    ``flips``: the share of a quantizing codec's stored numbers that may read back a level apart. A key that
    differs in its last float bit can cross a level's boundary (or move a group's range), so where the rounding of
    batched kernels differs from a row's alone (it does on some CPUs), a few entries land a level away: each by at
    most a level (a 15th of a 4-bit group's range, bounded here by 15% of the layer's largest magnitude), where an
    entry kept in place of another differs by about the values themselves."""
    assert len(first) == len(second)
    for one, other in zip(first, second):
        assert one.keys() == other.keys()
        for name, value in one.items():
            if isinstance(value, torch.Tensor):
                assert value.shape == other[name].shape, name
                apart = ~torch.isclose(value, other[name], atol=1e-4)
                assert apart.float().mean() <= flips, (name, int(apart.sum()))
                if apart.any():
                    level = 0.15 * float(value.abs().max())
                    assert float((value - other[name]).abs().max()) <= level, name
            else:
                assert value == other[name], name


def alone(model, cache: CompressedCache, sequence: torch.Tensor, max_length: int, stops) -> torch.Tensor:
    """Greedy decoding of one cache in a forward of its own, as ``generate`` chooses."""
    with torch.no_grad():
        while sequence.shape[1] < max_length:
            logits = model(sequence[:, -1:], cache=cache).logits[:, -1].to(torch.float32)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
            if stops(sequence):
                break
    return sequence


def replayed(model, prefill, policy, budget: float = 0.4, codec=None) -> CompressedCache:
    cache = CompressedCache(model, policy, budget, codec=codec)
    replay(prefill, cache)
    return cache


@pytest.mark.filterwarnings("ignore::UserWarning")  # kvzip without a tokenizer repeats its context bare
def test_rows_decoded_together_choose_and_keep_what_each_chooses_and_keeps_alone():
    model = tiny_llama()
    ids = prompt(length=64)
    prefill = capture(model, ids)
    start = torch.cat([ids, prefill.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    builds = [lambda p=policy: replayed(model, prefill, p) for policy in POLICIES]
    builds += [lambda: replayed(model, prefill, "snapkv", codec="int4"),
               lambda: replayed(model, prefill, "snapkv", codec=SmallKivi())]
    limit = start.shape[1] + 24
    singles = [(cache := build(), alone(model, cache, start, limit, lambda s: False)) for build in builds]
    caches = [build() for build in builds]
    steps = []
    together = decode_together(model, caches, [start] * len(caches), limit, lambda row, s: False,
                               lambda rows, seconds, own: steps.append(list(rows)))
    lossy = len(POLICIES)  # the builds from here on quantize
    for index, ((single, expected), cache, found) in enumerate(zip(singles, caches, together)):
        assert torch.equal(found, expected)
        assert_alike(state(cache), state(single), flips=0.01 if index >= lossy else 0.0)  # decode-time eviction,
        # tracks and the stage alike
        assert cache.stats().resident_bytes == single.stats().resident_bytes
    assert steps == [list(range(len(caches)))] * 24  # one forward per step for every row


def test_a_row_that_stops_leaves_the_batch_and_its_cache_ends_where_it_stopped():
    model = tiny_llama()
    ids = prompt(length=48)
    prefill = capture(model, ids)
    start = torch.cat([ids, prefill.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    limit = start.shape[1] + 16
    stop_after = {0: 3, 1: 16, 2: 7}  # new tokens each row decodes before it stops

    def stops(row: int, sequence: torch.Tensor) -> bool:
        return sequence.shape[1] - start.shape[1] >= stop_after[row]

    caches = [replayed(model, prefill, policy) for policy in ("snapkv", "h2o", "tova")]
    steps = []
    found = decode_together(model, caches, [start] * 3, limit, stops,
                           lambda rows, seconds, own: steps.append(rows))
    for row, policy in enumerate(("snapkv", "h2o", "tova")):
        single = replayed(model, prefill, policy)
        expected = alone(model, single, start, limit, lambda s, r=row: stops(r, s))
        assert found[row].shape[1] == start.shape[1] + stop_after[row] and torch.equal(found[row], expected)
        assert_alike(state(caches[row]), state(single))
    assert [len(rows) for rows in steps] == [3] * 3 + [2] * 4 + [1] * 9
    done = decode_together(model, caches, [found[1]] * 3, limit, stops)  # at the length already: nothing runs
    assert all(torch.equal(s, found[1]) for s in done)


def test_a_rows_after_prefill_stage_is_charged_to_that_row_alone():
    """A stage runs before the first step, for its own row: its time is that row's, not the batch's step. The clock
    is a stand-in that only the stage moves (100 s), so the accounting is checked exactly."""
    from kvpolicies import Policy

    now = [0.0]

    class Slow(Policy):  # a stage that takes 100 s of the stand-in clock, then keeps the lowest-norm keys
        name = "slow-stage-test"

        def after_prefill(self, prefilled):
            now[0] += 100.0
            return [None if inputs is None else -inputs.keys.norm(dim=-1) for inputs in prefilled.layers]

    model = tiny_llama()
    ids = prompt(length=48)
    prefill = capture(model, ids)
    start = torch.cat([ids, prefill.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    caches = [replayed(model, prefill, policy) for policy in ("snapkv", Slow(), "h2o")]
    charged = []
    decode_together(model, caches, [start] * 3, start.shape[1] + 3, lambda row, s: False,
                    lambda rows, seconds, own: charged.append((seconds, dict(own))), clock=lambda: now[0])
    assert [own for _, own in charged] == [{1: 100.0}, {}, {}]  # the stage ran once, before the first step
    assert [seconds for seconds, _ in charged] == [0.0, 0.0, 0.0]  # and none of it is in a step's shared time
    assert caches[1].stage_ran


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_rows_decode_together_on_every_architecture(name):
    """Dense and packed layers, sliding windows held whole or shared, soft-capped eager attention, MoE."""
    model = build(ARCHITECTURES[name])
    ids = prompt(length=40) % model.config.vocab_size
    prefill = capture(model, ids)
    start = torch.cat([ids, prefill.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    policies = [p for p in ("full", "snapkv", "keydiff", "headkv") if (name, p) not in REFUSED]
    limit = start.shape[1] + 12
    caches = [replayed(model, prefill, policy, 0.5) for policy in policies]
    together = decode_together(model, caches, [start] * len(caches), limit, lambda row, s: False)
    for policy, cache, found in zip(policies, caches, together):
        single = replayed(model, prefill, policy, 0.5)
        assert torch.equal(found, alone(model, single, start, limit, lambda s: False)), policy
        assert_alike(state(cache), state(single))


@pytest.mark.parametrize("name", WINDOWED)
def test_rows_hand_a_window_under_a_grouped_codec_its_entries_in_view_only(name):
    """A row comes without a mask, so a dense window must not hand its hidden entries (the oldest group's, slid out)
    to the attention: groups stored exactly decode as full precision, and each row as alone."""
    model = build(ARCHITECTURES[name])
    ids = prompt(length=21) % model.config.vocab_size
    prefill = capture(model, ids)
    start = torch.cat([ids, prefill.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    limit = start.shape[1] + 12
    caches = [replayed(model, prefill, policy, 0.5, codec=Exact()) for policy in ("full", "snapkv")]
    together = decode_together(model, caches, [start] * 2, limit, lambda row, s: False)
    assert torch.equal(together[0], alone(model, replayed(model, prefill, "full", 1.0), start, limit, lambda s: False))
    for policy, cache, found in zip(("full", "snapkv"), caches, together):
        single = replayed(model, prefill, policy, 0.5, codec=Exact())
        assert torch.equal(found, alone(model, single, start, limit, lambda s: False)), policy
        assert_alike(state(cache), state(single))


def test_rows_take_one_new_token_each_and_one_cache_per_sequence():
    model = tiny_llama()
    ids = prompt(length=32)
    prefill = capture(model, ids)
    caches = [replayed(model, prefill, "snapkv") for _ in range(2)]
    with pytest.raises(ValueError, match="one new token per forward pass"):
        with torch.no_grad():
            model(torch.cat([ids[:, -2:]] * 2), cache=CacheRows(caches))
    with pytest.raises(ValueError, match="give one cache per sequence"):
        decode_together(model, caches, [ids], 40, lambda row, s: False)
    with pytest.raises(ValueError, match="at least one cache"):
        CacheRows([])
