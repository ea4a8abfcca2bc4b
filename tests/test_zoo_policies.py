"""TOVA, KeyDiff, ChunkKV and LagKV against slow references written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvpolicies
from kvpolicies import CompressedCache
from kvpolicies.engine.layer_view import LayerView
from tests.helpers import captured_query, score_inputs


def tova_at_layer_4(tiny_model, **options) -> tuple[CompressedCache, torch.Tensor, torch.Tensor]:
    """TOVA keeping 10 tokens of a 30-token prompt: ``(cache, layer 4's q_proj output, its uncompressed keys)``."""
    cache = CompressedCache(tiny_model, kvpolicies.get_policy("tova", **options), "10 tokens")
    plain = DynamicCache(config=tiny_model.config)
    captured = {}
    handle = tiny_model.model.layers[4].self_attn.q_proj.register_forward_hook(lambda m, a, o: captured.update(q=o))
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tiny_model(ids, cache=cache)
        handle.remove()
        tiny_model(ids, cache=plain)
    return cache, captured["q"], plain.layers[4].keys[0]


def test_tova_keeps_what_the_newest_query_attends_to(tiny_model):
    cache, projected, keys = tova_at_layer_4(tiny_model)
    query = captured_query(tiny_model, cache, projected[:, -1:], 29, 4)[:, 0]  # [heads, head_dim]
    for h in range(2):
        weights = sum(torch.softmax(query[h * 3 + g] @ keys[h].T / 4.0, dim=-1) for g in range(3))
        best = torch.sort(weights, descending=True, stable=True).indices[:10].sort().values
        kept = cache.layers[4].keys.split(cache.layers[4].lengths)[h]
        torch.testing.assert_close(kept, keys[h, best], atol=1e-5, rtol=1e-5)


def test_keydiff_keeps_the_keys_least_like_the_mean_direction():
    keys = torch.tensor([[[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.05], [-1.0, 0.2]]]])
    scores = kvpolicies.get_policy("keydiff").score(score_inputs(keys))
    normalised = F.normalize(keys[0, 0], dim=-1)
    mean = F.normalize(normalised.mean(0), dim=-1)
    expected = torch.tensor([-(float(k @ mean)) for k in normalised])
    torch.testing.assert_close(scores[0, 0], expected, atol=1e-6, rtol=1e-6)
    kept = scores[0, 0].topk(2).indices.sort().values.tolist()
    assert kept == [2, 4]  # the orthogonal and the opposite key


def test_keydiff_ignores_padding_in_the_mean():
    keys = torch.tensor([[[[5.0, 5.0], [1.0, 0.0], [0.0, 1.0]]]])
    valid = torch.tensor([[[False, True, True]]])
    scores = kvpolicies.get_policy("keydiff").score(score_inputs(keys, valid=valid))
    assert scores[0, 0, 1].item() == pytest.approx(scores[0, 0, 2].item())  # symmetric once padding is out


def test_chunkkv_sums_scores_per_chunk_so_chunks_are_kept_whole():
    keys = torch.zeros(1, 1, 9, 2)
    keys[0, 0, :, 0] = torch.tensor([5.0, 5.0, 5.0, 1.0, 9.0, 1.0, 0.5, 0.5, 0.5])  # l2norm scores = -norm
    policy = kvpolicies.get_policy("chunkkv", scorer="l2norm", chunk_tokens=3)
    scores = policy.score(score_inputs(keys))
    assert scores[0, 0].tolist() == [-15.0] * 3 + [-11.0] * 3 + [-1.5] * 3
    from kvpolicies.engine.selection import select

    kept = select(scores, torch.ones(1, 1, 9, dtype=torch.bool), torch.tensor([[6]]))
    assert kept[0, 0].nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 8]


def lagkv_reference(keys, values, sinks, lag):
    """Explicit loops over partitions for one head: ``[seq, dim]`` -> ``[seq]`` scores."""
    seq = keys.shape[0]
    scores = [math.inf] * seq
    starts = list(range(sinks, seq, lag))
    for index, start in enumerate(starts):
        chunk = range(start, min(start + lag, seq))
        following = range(start + lag, min(start + 2 * lag, seq))
        if len(chunk) < lag or len(following) < lag:
            continue  # no complete successor yet: kept
        deviation = []
        for t in chunk:
            total = 0.0
            for states in (keys, values):
                low = torch.stack([states[u] for u in following]).min(0).values
                high = torch.stack([states[u] for u in following]).max(0).values
                total += float(((states[t] - low) / (high - low).clamp(min=1e-6)).std())
            deviation.append(total)
        top = max(deviation)
        exp = [math.exp(d - top) for d in deviation]
        for t, e in zip(chunk, exp):
            scores[t] = e / sum(exp)
    for t in range(min(sinks, seq)):
        scores[t] = 0.0  # sinks: protected by the framework, their score is irrelevant
    return torch.tensor(scores)


def test_lagkv_matches_explicit_partition_loops():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 23, 4, generator=generator)
    values = torch.randn(1, 2, 23, 4, generator=generator)
    policy = kvpolicies.get_policy("lagkv", sink_tokens=2, lag_tokens=5)
    scores = policy.score(score_inputs(keys, values))
    for h in range(2):
        expected = lagkv_reference(keys[0, h], values[0, h], sinks=2, lag=5)
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(scores[0, h]), finite)
        torch.testing.assert_close(scores[0, h][finite], expected[finite], atol=1e-5, rtol=1e-5)


def test_lagkv_is_invariant_to_left_padding():
    generator = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 1, 20, 4, generator=generator), torch.randn(1, 1, 20, 4, generator=generator)
    policy = kvpolicies.get_policy("lagkv", sink_tokens=1, lag_tokens=4)
    plain = policy.score(score_inputs(keys, values))
    padded_keys = torch.cat([torch.zeros(1, 1, 3, 4), keys], dim=2)
    padded_values = torch.cat([torch.zeros(1, 1, 3, 4), values], dim=2)
    valid = torch.cat([torch.zeros(1, 1, 3, dtype=torch.bool), torch.ones(1, 1, 20, dtype=torch.bool)], dim=2)
    padded = policy.score(score_inputs(padded_keys, padded_values, valid=valid))
    torch.testing.assert_close(padded[..., 3:], plain)


def test_criticalkv_rescales_scores_by_the_projected_value_norm():
    torch.manual_seed(0)
    values = torch.randn(1, 2, 6, 4)
    module = torch.nn.Module()
    module.o_proj = torch.nn.Linear(6 * 4, 10, bias=False)  # 6 query heads over 2 KV heads, hidden 10
    attention = torch.rand(1, 2, 6)
    policy = kvpolicies.get_policy("criticalkv", epsilon=0.0)
    inputs = score_inputs(torch.zeros(1, 2, 6, 4), values, attention=attention)
    inputs.layer = LayerView(module)
    scores = policy.score(inputs)
    weight = module.o_proj.weight
    for h in range(2):
        for s in range(6):
            norms = [float((weight[:, (h * 3 + g) * 4 : (h * 3 + g + 1) * 4] @ values[0, h, s]).norm()) for g in range(3)]
            expected = float(attention[0, h, s] / attention[0, h].sum()) * sum(norms) / 3
            assert scores[0, h, s].item() == pytest.approx(expected, rel=1e-5)
    assert policy.needs == {kvpolicies.Signal.ATTENTION, kvpolicies.Signal.VALUES}


def test_criticalkv_refuses_negative_inner_scores():
    policy = kvpolicies.get_policy("criticalkv", scorer="l2norm")
    inputs = score_inputs(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    with pytest.raises(ValueError, match="non-negative"):
        policy.score(inputs)


def newest_query_attention(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """What each entry receives from one query, per query head: ``[6, 1, 16]`` RoPE'd queries of the tiny model, its
    ``[2, seq, 16]`` keys -> ``[6, seq]`` (query head ``h`` reads KV head ``h // 3``), written out head by head."""
    return torch.stack([torch.softmax(query[h, 0] @ keys[h // 3].T / 4.0, dim=-1) for h in range(6)])


def top(weights: torch.Tensor, k: int) -> list[int]:
    """The positions of the ``k`` largest ``weights``, in order of position."""
    return sorted(torch.sort(weights, descending=True, stable=True).indices[:k].tolist())


def test_tova_layer_pooling_keeps_one_set_the_newest_query_attends_to_over_the_whole_layer(tiny_model):
    cache, projected, keys = tova_at_layer_4(tiny_model, pooling="layer")
    newest = newest_query_attention(captured_query(tiny_model, cache, projected[:, -1:], 29, 4), keys)
    shared = top(newest.mean(0), 10)  # every query head of the layer, all KV heads alike
    kept = cache.layers[4].keys.split(cache.layers[4].lengths)
    for h in range(2):
        torch.testing.assert_close(kept[h], keys[h, shared], atol=1e-5, rtol=1e-5)
    # The inputs tell the readings apart: each KV head's own group ranks differently, and so does the query before.
    own = [top(newest[3 * h : 3 * h + 3].sum(0), 10) for h in range(2)]
    before = newest_query_attention(captured_query(tiny_model, cache, projected[:, -2:-1], 28, 4), keys)
    assert own[0] != own[1] and shared not in own and top(before.mean(0), 10) != shared


def test_tova_evicts_while_decoding_the_entry_the_current_query_attends_to_least(tiny_model):
    """The paper's multi-state RNN: at every step the token just generated scores the whole cache, and the entry its
    query heads attend to least (their softmaxes summed over the group) leaves. Layer 0 reads the same embeddings as
    an uncompressed run, so its queries and keys can be taken from one."""
    budget = kvpolicies.Budget(unit="tokens", value=10, slack_tokens=0)  # one entry out per head and step
    cache = CompressedCache(tiny_model, kvpolicies.get_policy("tova"), budget)
    ids = torch.randint(3, 128, (1, 26), generator=torch.Generator().manual_seed(5))
    plain = DynamicCache(config=tiny_model.config)
    captured = {}
    handle = tiny_model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: captured.update(q=o))
    evictions, prompt_choice, one_head_choice = [], [], []
    with torch.no_grad():
        tiny_model(ids, cache=plain)
        tiny_model(ids[:, :20], cache=cache)
        prompt_query = captured_query(tiny_model, cache, captured["q"][:, -1:], 19, 0)
        for position in range(20, 26):
            held = cache.layers[0].keys.split(cache.layers[0].lengths)
            tiny_model(ids[:, position : position + 1], cache=cache)
            query = captured_query(tiny_model, cache, captured["q"], position, 0)
            kept = cache.layers[0].keys.split(cache.layers[0].lengths)
            for h in range(2):
                candidates = torch.cat([held[h], plain.layers[0].keys[0, h, position : position + 1]])
                weights = newest_query_attention(query, candidates[None].expand(2, -1, -1))[3 * h : 3 * h + 3]
                out = int(weights.sum(0).argmin())
                assert kept[h].shape[0] == 10
                torch.testing.assert_close(kept[h], candidates[torch.arange(11) != out], atol=1e-5, rtol=1e-5)
                evictions.append(out)
                prompt_weights = newest_query_attention(prompt_query, candidates[None].expand(2, -1, -1))
                prompt_choice.append(int(prompt_weights[3 * h : 3 * h + 3].sum(0).argmin()))
                one_head_choice.append(int(weights[0].argmin()))
    handle.remove()
    # The inputs tell the readings apart: the prompt's last query, or one query head of the group, evicts otherwise.
    assert evictions != prompt_choice and evictions != one_head_choice


def expected_attention_setup(rope_parameters=None):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 100.0})
    return config, LlamaRotaryEmbedding(config), LayerView(LlamaAttention(config, layer_idx=0))


def rope(rotary, states, positions):
    """transformers' own RoPE of ``[heads, n, dim]`` pre-RoPE states at ``positions``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = rotary(states, torch.tensor([positions]))
    rotated, _ = apply_rotary_pos_emb(states[None], states[None], cos, sin)
    return rotated[0]


def test_expected_attention_matches_gaussian_expectation_over_explicitly_rotated_queries():
    config, rotary, module = expected_attention_setup()
    generator = torch.Generator().manual_seed(0)
    pre_rope = torch.randn(4, 6, 8, generator=generator)  # queries at positions 10..15, before RoPE
    queries = rope(rotary, pre_rope, list(range(10, 16)))[None]
    keys, values = torch.randn(1, 2, 20, 8, generator=generator), torch.randn(1, 2, 20, 8, generator=generator)
    policy = kvpolicies.get_policy("expected_attention", query_tokens=6, future_tokens=5)
    inputs = score_inputs(keys, values)
    inputs.queries, inputs.layer, inputs.seen_tokens, inputs.scaling = queries, module, [16], 8**-0.5
    scores = policy.score(inputs)

    scale = 8**-0.5
    for kv_head in range(2):
        per_query_head = []
        for head in (2 * kv_head, 2 * kv_head + 1):
            future = torch.stack([
                torch.stack([rope(rotary, pre_rope[head : head + 1, i : i + 1], [16 + j])[0, 0] for j in range(5)]).mean(0)
                for i in range(6)
            ])  # each query's average over the next five positions
            mean = future.mean(0)
            covariance = (future - mean).T @ (future - mean) / 6
            logits = torch.tensor([scale * float(k @ mean) + scale**2 / 2 * float(k @ covariance @ k)
                                   for k in keys[0, kv_head]])
            per_query_head.append(torch.softmax(logits, 0))
        expected = torch.stack(per_query_head).mean(0) * values[0, kv_head].norm(dim=-1)
        torch.testing.assert_close(scores[0, kv_head], expected, atol=1e-5, rtol=1e-4)


def test_expected_attention_ignores_buffered_queries_older_than_the_sequence():
    _, _, module = expected_attention_setup()
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(1, 4, 6, 8, generator=generator)
    keys, values = torch.randn(1, 2, 9, 8, generator=generator), torch.randn(1, 2, 9, 8, generator=generator)
    policy = kvpolicies.get_policy("expected_attention", query_tokens=6)
    scores = []
    for padding in (torch.zeros(1, 4, 3, 8), torch.randn(1, 4, 3, 8, generator=generator)):
        inputs = score_inputs(keys, values)
        inputs.queries, inputs.layer, inputs.seen_tokens = torch.cat([padding, queries[:, :, 3:]], 2), module, [3]
        inputs.scaling = 8**-0.5
        scores.append(policy.score(inputs))
    torch.testing.assert_close(scores[0], scores[1])


def test_expected_attention_leaves_the_unrotated_part_of_a_partial_rotary_head_alone():
    from kvpolicies_plugins.expected_attention import mean_future_rotation

    queries = torch.randn(1, 2, 5, 8)
    _, _, view = expected_attention_setup()
    inv_freq = view.rotary.inv_freq[:2]  # a 4-dimensional rotary part
    partial = mean_future_rotation(queries, inv_freq, 4, future_tokens=3)
    assert torch.equal(partial[..., 4:], queries[..., 4:])
    torch.testing.assert_close(partial[..., :4], mean_future_rotation(queries[..., :4], inv_freq, 4, 3))
