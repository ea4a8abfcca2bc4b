"""Attention-based and reallocating policies against slow references (explicit softmax, loops)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import DynamicCache

import kvpolicies
from kvpolicies import Budget, CacheShape, CompressedCache
from kvpolicies.engine.selection import age_order
from tests.helpers import attention_received_by_loops, captured_query, queries_and_keys_since_prefill, score_inputs


def test_snapkv_scores_are_pooled_votes_of_the_last_queries():
    torch.manual_seed(0)
    keys, queries = torch.randn(1, 2, 20, 8), torch.randn(1, 6, 20, 8)
    policy = kvpolicies.get_policy("snapkv", observation_tokens=4, kernel_size=3, pooling="max")
    window = queries[:, :, -4:]
    from kvpolicies.engine.signals import attention_received

    attention = attention_received(window, keys, torch.ones(1, 2, 20, dtype=torch.bool),
                                   age_order(torch.ones(1, 2, 20, dtype=torch.bool)), 8**-0.5)
    scores = policy.score(score_inputs(keys, keep=torch.tensor([[5, 5]]), queries=window, attention=attention))
    votes = attention_received_by_loops(window, keys, 8**-0.5)[0]
    for h in range(2):
        for s in range(20):
            neighbours = [votes[h, t].item() for t in range(s - 1, s + 2) if 0 <= t < 20]
            assert scores[0, h, s].item() == pytest.approx(max(neighbours), rel=1e-5, abs=1e-6)


def test_snapkv_in_a_cache_keeps_window_and_top_votes(tiny_model):
    """End to end: the kept set is the observation window plus the best pooled votes of the last queries."""
    policy = kvpolicies.get_policy("snapkv", observation_tokens=4, window_tokens=4, kernel_size=1)
    cache = CompressedCache(tiny_model, policy, "12 tokens")
    plain = DynamicCache(config=tiny_model.config)
    captured = {}
    attn = tiny_model.model.layers[2].self_attn
    handle = attn.q_proj.register_forward_hook(lambda m, a, o: captured.update(q=o))
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        tiny_model(ids, cache=cache)
        handle.remove()
        tiny_model(ids, cache=plain)
    queries = torch.stack([captured_query(tiny_model, cache, captured["q"][:, p : p + 1], p, 2)[:, 0] for p in range(36, 40)], 1)
    keys = plain.layers[2].keys[0]
    votes = attention_received_by_loops(queries[None], keys[None], 16**-0.5)[0]
    kept = cache.layers[2].keys.split(cache.layers[2].lengths)
    for h in range(2):
        best = torch.sort(votes[h, :36], descending=True, stable=True).indices[:8].sort().values
        expected = torch.cat([keys[h, best], keys[h, 36:]])
        torch.testing.assert_close(kept[h], expected, atol=1e-5, rtol=1e-5)


def test_h2o_accumulates_attention_over_prefill_and_decoding(tiny_model):
    """The cumulative track equals the explicit sum of every query's attention since each entry arrived."""
    policy = kvpolicies.get_policy("h2o")
    cache = CompressedCache(tiny_model, policy, 1.0)  # no eviction: compare the raw accumulation
    ids = torch.randint(3, 128, (1, 12))
    steps = [torch.tensor([[5]]), torch.tensor([[9]]), torch.tensor([[17]])]
    all_queries, keys = queries_and_keys_since_prefill(tiny_model, cache, ids, steps)
    want = attention_received_by_loops(all_queries[None], keys[None], 16**-0.5)[0]
    got = cache.layers[1].tracked["cumulative_attention"][0, :, :, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_h2o_keeps_recent_share_and_heaviest_hitters():
    cumulative = torch.tensor([[[5.0, 0.1, 4.0, 0.2, 0.3, 3.0, 0.1, 0.1, 0.5, 0.4]]])
    keys = torch.zeros(1, 1, 10, 4)
    policy = kvpolicies.get_policy("h2o", recent_fraction=0.5)
    inputs = score_inputs(keys, keep=torch.tensor([[4]]), cumulative_attention=cumulative)
    from kvpolicies.engine.selection import select

    kept = select(policy.score(inputs), inputs.valid, inputs.keep)
    assert kept[0, 0].nonzero().flatten().tolist() == [0, 2, 8, 9]  # 2 heavy hitters + 2 most recent


def test_pyramid_allocation_decreases_and_keeps_the_total():
    shape = CacheShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    policy = kvpolicies.get_policy("pyramidkv")
    uniform = Budget(value=0.25).allocate(2000, shape)
    pyramid = policy.allocate(uniform)
    per_layer = pyramid.tokens.sum(1)
    assert int(pyramid.tokens.sum()) == uniform.total
    assert all(a >= b for a, b in zip(per_layer.tolist(), per_layer[1:].tolist()))
    assert per_layer[0] > 1.9 * per_layer.float().mean() and per_layer[-1] < 0.1 * per_layer.float().mean()
    steep = kvpolicies.get_policy("pyramidkv", beta=2).allocate(uniform).tokens.sum(1)
    assert steep[-1] > per_layer[-1]  # a smaller beta is a flatter pyramid


def test_pyramid_caps_layers_at_the_sequence_and_moves_the_excess_up():
    shape = CacheShape(num_layers=10, num_kv_heads=2, head_dim=16, dtype_bytes=4)
    pyramid = kvpolicies.get_policy("pyramidkv").allocate(Budget(value=0.8).allocate(100, shape))
    assert int(pyramid.tokens.max()) == 100 and int(pyramid.tokens.sum()) == 1600


def test_adaptive_heads_give_entries_to_heads_with_spread_out_scores():
    # Head 0 concentrates its votes on two entries, head 1 spreads them: head 1 should get more of the layer budget.
    scores = torch.tensor([[[9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 2.0, 2.0]]])
    valid = torch.ones(1, 2, 8, dtype=torch.bool)
    policy = kvpolicies.get_policy("headkv", floor_fraction=0.25)
    moved = policy.reallocate_heads(scores, valid, torch.tensor([[4, 4]]))
    assert moved.tolist() == [[2, 6]]  # head 0 floor = ceil(0.25 * 4) = 1, but its 2 big votes win globally
    no_floor = kvpolicies.get_policy("headkv", floor_fraction=1.0).reallocate_heads(scores, valid, torch.tensor([[4, 4]]))
    assert no_floor.tolist() == [[4, 4]]


def test_headkv_adaptive_stores_ragged_heads_and_keeps_the_layer_total(tiny_model):
    cache = CompressedCache(tiny_model, kvpolicies.get_policy("headkv", scorer="l2norm",
                            scorer_options={"uncompressed_layers": []}), Budget(value=0.25, slack_tokens=0))
    with torch.no_grad():
        tiny_model(torch.randint(3, 128, (1, 64)), cache=cache)
    kept = cache.kept_per_head()[:, 0]
    uniform = cache.allocation(64).tokens
    assert torch.equal(kept.sum(1), uniform.sum(1))
    assert (kept >= math.ceil(0.2 * 16)).all()
    assert (kept[:, 0] != kept[:, 1]).any()  # really ragged
    assert cache.resident_bytes() == int(kept.sum()) * cache.shape.entry_bytes


def test_headkv_static_follows_the_head_scores_file(tmp_path, tiny_model):
    scores = torch.ones(8, 2) * 0.01
    scores[3, 1] = 1.0
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"scores": scores.tolist()}))
    policy = kvpolicies.get_policy("headkv", allocation="static", head_scores=str(path), scorer="l2norm",
                                   scorer_options={"uncompressed_layers": []})
    cache = CompressedCache(tiny_model, policy, Budget(value=0.25, slack_tokens=0))
    with torch.no_grad():
        tiny_model(torch.randint(3, 128, (1, 64)), cache=cache)
    kept = cache.kept_per_head()[:, 0]
    assert int(kept.sum()) == cache.allocation(64).total == 256
    assert int(kept[3, 1]) == 64 and int(kept.min()) >= 3  # the retrieval head is whole, the rest at the floor

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"scores": [[1.0, 1.0]] * 30}))
    bad = kvpolicies.get_policy("headkv", allocation="static", head_scores=str(wrong))
    with pytest.raises(kvpolicies.BudgetError, match=r"\(30, 2\).*\(8, 2\).*kvpolicies head-scores"):
        CompressedCache(tiny_model, bad, 0.25).allocation(64)


def test_static_allocation_without_scores_file_is_a_clear_error():
    with pytest.raises(kvpolicies.PolicyConfigError, match="head_scores=FILE"):
        kvpolicies.get_policy("headkv", allocation="static")


def test_a_missing_or_broken_head_scores_file_fails_when_the_policy_is_made(tmp_path):
    """Not at the first eviction: a sweep would record one failed cell per cell."""
    with pytest.raises(kvpolicies.PolicyConfigError, match="does not exist; create it with `kvpolicies head-scores`"):
        kvpolicies.get_policy("headkv", allocation="static", head_scores=str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(kvpolicies.PolicyConfigError, match="is not a `kvpolicies head-scores` file"):
        kvpolicies.get_policy("headkv", allocation="static", head_scores=str(broken))


def test_new_head_scores_at_the_same_path_make_a_new_cell(tmp_path):
    path = tmp_path / "scores.json"
    identities = []
    for top in (1.0, 2.0):
        path.write_text(json.dumps({"scores": [[top, 0.1]] * 8}))
        identities.append(kvpolicies.get_policy("headkv", allocation="static", head_scores=str(path)).config_hash())
    assert identities[0] != identities[1]


def test_wrappers_validate_their_scorer():
    with pytest.raises(kvpolicies.UnknownPolicyError, match="Did you mean 'snapkv'"):
        kvpolicies.get_policy("pyramidkv", scorer="snapk")
    with pytest.raises(kvpolicies.PolicyConfigError, match="keeps everything"):
        kvpolicies.get_policy("headkv", scorer="full")
    assert kvpolicies.get_policy("pyramidkv", scorer="l2norm").needs == {kvpolicies.Signal.KEYS}


def test_reallocated_heads_do_not_trigger_eviction_at_every_decoding_step(tiny_model):
    """A head above its uniform share after AdaKV moved entries is legitimate: only the layer total counts."""
    policy = kvpolicies.get_policy("headkv", scorer="l2norm", scorer_options={"uncompressed_layers": []})
    calls = []
    score = policy.score
    policy.score = lambda inputs: calls.append(inputs.layer_idx) or score(inputs)
    cache = CompressedCache(tiny_model, policy, Budget(value=0.25, slack_tokens=4))
    with torch.no_grad():
        out = tiny_model(torch.randint(3, 128, (1, 64)), cache=cache)
        assert (cache.kept_per_head()[:, 0, 0] != cache.kept_per_head()[:, 0, 1]).any()
        assert len(calls) == 8  # one eviction per layer at prefill
        for _ in range(4):  # the layer totals grow by 2 per step, within 2 heads x 4 slack
            out = tiny_model(out.logits[:, -1:].argmax(-1), cache=cache)
    assert len(calls) == 8
