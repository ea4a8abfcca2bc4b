"""Tracks: per-entry quantities a policy declares and the cache keeps up to date at every forward pass."""

from __future__ import annotations

import pytest
import torch

import kvpolicies
from kvpolicies import Budget, CompressedCache, Policy
from kvpolicies import Track
from kvpolicies.errors import PluginError
from tests.helpers import attention_received_by_loops, queries_and_keys_since_prefill, tiny_llama


class MaxReceived(Track):
    """The largest attention weight an entry has received from any query head and any query since it arrived."""

    name = "max_received"
    reduce = "max"

    def update(self, held, received):
        return torch.maximum(held, received)


class Loudest(Policy):
    """Keep the entries that were ever attended to the most (a track of maxima, not of sums)."""

    name = "loudest-test"
    tracks = (MaxReceived(),)

    def score(self, inputs):
        return inputs.tracks["max_received"]


def test_a_policys_own_track_follows_every_query_since_each_entry_arrived(tiny_model):
    cache = CompressedCache(tiny_model, Loudest(), 1.0)  # no eviction: compare the raw track
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    steps = [torch.tensor([[5]]), torch.tensor([[9]]), torch.tensor([[17]])]
    all_queries, keys = queries_and_keys_since_prefill(tiny_model, cache, ids, steps)
    want = attention_received_by_loops(all_queries[None], keys[None], 16**-0.5, reduce="max")[0]
    torch.testing.assert_close(cache.layers[1].tracked["max_received"][0, :, :, 0], want, atol=1e-5, rtol=1e-5)
    summed = attention_received_by_loops(all_queries[None], keys[None], 16**-0.5)[0]
    assert not torch.allclose(want, summed, atol=1e-2)  # a maximum, really: not the sum H2O keeps


def test_a_track_is_carried_through_eviction_and_a_padded_batch_equals_each_prompt_alone():
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    budget = Budget(value=0.25, slack_tokens=0)  # slack 0: decoding evicts at every step

    def run(cache, ids, mask):
        tokens = []
        with torch.no_grad():
            token = model(ids, attention_mask=mask, cache=cache).logits[:, -1:].argmax(-1)
            for _ in range(5):
                tokens.append(token[:, 0].tolist())
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                token = model(token, attention_mask=mask, cache=cache).logits[:, -1:].argmax(-1)
        return tokens

    batch = CompressedCache(model, Loudest(), budget)
    together = run(batch, ids, mask)
    for row, start in ((0, 0), (1, 7)):
        alone = CompressedCache(model, Loudest(), budget)
        single = run(alone, ids[row : row + 1, start:], mask[row : row + 1, start:])
        assert [step[row] for step in together] == [step[0] for step in single]
        for mine, theirs in zip(batch.layers, alone.layers):
            (mine, mine_valid), (theirs, their_valid) = mine.dense_view(), theirs.dense_view()
            torch.testing.assert_close(mine["track:max_received"][row][mine_valid[row]],
                                       theirs["track:max_received"][0][their_valid[0]], atol=1e-5, rtol=1e-5)
    assert all(layer.tracked["max_received"].shape[0] == sum(layer.lengths) for layer in batch.layers)


def test_a_wrapper_reads_its_scorers_tracks(fresh_registry):
    class Plugin:
        @kvpolicies.hookimpl
        def register_policies(self, register):
            register(Loudest)

    kvpolicies.registry.registry().register_plugin(Plugin(), name="loudest-plugin")
    info = kvpolicies.registry.registry().get("loudest-test")
    assert info.reads == ["max_received"] and not info.attention_free  # what `kvpolicies list` shows
    pyramid = kvpolicies.get_policy("pyramidkv", scorer="loudest-test")
    assert [track.name for track in pyramid.tracks] == ["max_received"]
    model = tiny_llama()
    cache = CompressedCache(model, pyramid, 0.25)
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 40)), cache=cache)
    assert cache.stats().kept_entries == 40 * 16 // 4


def test_a_policy_that_edits_its_track_in_place_is_named():
    class Scribbler(Loudest):
        name = "scribbler-test"

        def score(self, inputs):
            return inputs.tracks["max_received"].mul_(2)

    model = tiny_llama()
    cache = CompressedCache(model, Scribbler(), 0.25)
    with pytest.raises(PluginError, match="scribbler-test.*edited inputs.tracks.max_received in place"):
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 40)), cache=cache)


def test_tracks_must_be_track_instances_with_distinct_names():
    class Twice(Loudest):
        name = "twice-test"
        tracks = (MaxReceived(), MaxReceived())

    class NotATrack(Loudest):
        name = "not-a-track-test"
        tracks = ("max_received",)

    for policy in (Twice(), NotATrack()):
        with pytest.raises(PluginError, match=f"{policy.name}.*Track instances with distinct, non-empty names"):
            CompressedCache(tiny_llama(), policy, 0.5)


def test_an_after_prefill_stage_reads_the_tracks_gathered_while_prefilling():
    class LoudestOnce(Loudest):
        name = "loudest-once-test"

        def after_prefill(self, prefilled):
            return [None if layer is None else layer.tracks["max_received"] for layer in prefilled.layers]

    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    staged, scored = CompressedCache(model, LoudestOnce(), 1.0), CompressedCache(model, Loudest(), 1.0)
    with torch.no_grad():
        model(ids, cache=staged)
        model(ids, cache=scored)
    seen = []
    original = staged.policy.after_prefill
    staged.policy.after_prefill = lambda prefilled: seen.append(prefilled) or original(prefilled)
    staged.after_prefill(model)
    for inputs, layer in zip(seen[0].layers, scored.layers):
        torch.testing.assert_close(inputs.tracks["max_received"], layer.tracked["max_received"][..., 0])
    assert staged.stats().kept_entries == 40 * 16  # budget 1.0: everything kept


def test_a_track_declared_wrongly_or_updating_to_another_shape_is_named():
    class Mean(MaxReceived):
        name, reduce = "mean_received", "mean"

    class Single(Loudest):
        name = "single-test"
        tracks = MaxReceived()  # not a tuple

    class Averaging(Loudest):
        name = "averaging-test"
        tracks = (Mean(),)

    for policy in (Single(), Averaging()):
        with pytest.raises(PluginError, match=f"{policy.name}.*a tuple of kvpolicies Track instances"):
            CompressedCache(tiny_llama(), policy, 0.5)

    class Squeezed(MaxReceived):
        def update(self, held, received):
            return torch.maximum(held, received).squeeze(-1)  # drops the held values' last dimension

    class Broadcasting(Loudest):
        name = "broadcasting-test"
        tracks = (Squeezed(),)

    model = tiny_llama()
    cache = CompressedCache(model, Broadcasting(), 0.5)
    with pytest.raises(PluginError, match="broadcasting-test.*Track.update.*'max_received' returned .* held as"):
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 20)), cache=cache)
