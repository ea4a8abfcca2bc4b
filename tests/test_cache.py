"""The compressed cache: exact at full budget, really smaller under a budget, right positions and masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvpolicies
from kvpolicies import Allocation, Budget, CompressedCache, Policy, PolicyConfig, Signal
from tests.helpers import captured_query, tiny_llama


def greedy_logits(model, ids, cache, steps: int) -> list[torch.Tensor]:
    """Prefill ``ids`` then decode ``steps`` greedy tokens; the logits of every step."""
    logits = []
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(token, cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("policy", "budget"), [("l2norm", 1.0), ("full", 0.1), ("random", "4096 tokens")])
def test_budget_at_or_above_sequence_reproduces_uncompressed_logits(attn, policy, budget):
    model = tiny_llama(attn_implementation=attn)
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    reference = greedy_logits(model, ids, DynamicCache(config=model.config), steps=20)
    cache = CompressedCache(model, kvpolicies.get_policy(policy), budget)
    compressed = greedy_logits(model, ids, cache, steps=20)
    for ref, got in zip(reference, compressed):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 48 + 20


def test_half_budget_halves_resident_bytes(tiny_model):
    cache = CompressedCache(tiny_model, kvpolicies.get_policy("random"), 0.5)
    with torch.no_grad():
        tiny_model(torch.randint(3, 128, (1, 100)), cache=cache)
    stats = cache.stats()
    assert stats.kept_entries == stats.full_entries // 2
    assert stats.resident_bytes == pytest.approx(stats.full_bytes / 2, rel=0.01)
    # Resident bytes are counted from the tensors, not from the allocation.
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert stats.resident_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert all(t.shape == (2 * 50, 16) for t in tensors)  # packed [entries, head_dim]: 2 KV heads x 50 tokens


def test_query_window_holds_only_its_window_not_the_prompts_queries(tiny_model):
    """The recent-query buffer once was a view of the whole prefill query, keeping every layer's prompt queries
    alive (2x the full cache's peak RSS at 8k tokens); the auxiliary bytes count the storage behind each tensor."""
    policy = kvpolicies.get_policy("snapkv")
    cache = CompressedCache(tiny_model, policy, 0.25)
    with torch.no_grad():
        tiny_model(torch.randint(3, 128, (1, 200)), cache=cache)
    window = policy.query_window
    config = tiny_model.config
    for layer in cache.layers:
        assert layer.recent_queries.shape[2] == window < 200
    head_dim = config.hidden_size // config.num_attention_heads
    ring = config.num_attention_heads * window * head_dim * 4  # float32 queries of one sequence, per layer
    assert cache.auxiliary_bytes() == config.num_hidden_layers * ring  # packed layers: no padding mask left


@pytest.mark.parametrize("window, steps", [
    (1, (3, 1, 1, 5, 1, 2, 9, 1, 1, 1, 4, 1)), (4, (3, 1, 1, 5, 1, 2, 9, 1, 1, 1, 4, 1)),
    (7, (3, 1, 1, 5, 1, 2, 9, 1, 1, 1, 4, 1)),
    (4, (4, 1, 1, 1, 2, 3, 1, 3)),  # several rows written across the ring's end, twice
    (5, (2, 2, 2, 1, 4, 1, 1, 3, 2)),  # filling from a short prompt, then wrapping
])
def test_query_ring_reads_the_last_queries_in_order(window, steps):
    """The ring written in place reads back as the last ``window`` queries, oldest first, whatever mix of prompt
    lengths, chunks and single decoding steps brought them."""
    from kvpolicies.engine.storage import CompressedLayer

    layer = CompressedLayer(0)
    seen = []
    for q_len in steps:
        query = torch.randn(2, 3, q_len, 8)
        seen.append(query)
        layer.remember_queries(query, window)
        expected = torch.cat(seen, dim=2)[:, :, -window:]
        assert torch.equal(layer.recent_queries, expected)
    read = layer.recent_queries
    layer.remember_queries(torch.randn(2, 3, 1, 8), window)
    assert torch.equal(read, expected)  # what was read is a copy: the next step's write leaves it alone


def test_a_view_counts_the_storage_it_keeps_alive():
    from kvpolicies.engine.storage import held_bytes

    large = torch.zeros(1000)
    assert held_bytes(large[:10]) == 4000 and held_bytes(large, large[:10], None) == 4000


@pytest.mark.parametrize("slack", [0, 5])
def test_decode_keeps_every_head_within_its_allocation_plus_slack(tiny_model, slack):
    budget = Budget(unit="tokens", value=16, slack_tokens=slack)
    cache = CompressedCache(tiny_model, kvpolicies.get_policy("l2norm", uncompressed_layers=[]), budget)
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        out = tiny_model(ids, cache=cache)
        assert (cache.kept_per_head() == 16).all()  # prefill is cut exactly
        for _ in range(20):
            out = tiny_model(out.logits[:, -1:].argmax(-1), cache=cache)
            assert int(cache.kept_per_head().max()) <= 16 + slack
    assert cache.get_seq_length() == 60


def test_layers_holding_different_lengths_attend_like_a_plain_cache_with_the_same_entries(tiny_model):
    """Each layer's kept entries, replayed through transformers' own cache, give the same next-token logits."""
    policy = kvpolicies.get_policy("l2norm", uncompressed_layers=[0, 1])
    cache = CompressedCache(tiny_model, policy, 0.5)
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        tiny_model(ids, cache=cache)
    lengths = [layer.lengths[0] if layer.packed else layer.keys.shape[2] for layer in cache.layers]
    assert lengths[0] == lengths[1] == 40 and max(lengths[2:]) < 40

    plain = DynamicCache(config=tiny_model.config)
    for idx, layer in enumerate(cache.layers):
        keys, values, _ = layer.dense_view(tracks=False)
        plain.layers[idx].update(keys.clone(), values.clone())
    token = torch.tensor([[7]])
    position = torch.tensor([[40]])
    with torch.no_grad():
        got = tiny_model(token, cache=cache).logits  # position from the cache's logical length
        want = tiny_model(token, cache=plain, position_ids=position, attention_mask=None).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


class HeadSkewedConfig(PolicyConfig):
    pass


class HeadSkewed(Policy):
    """Test policy: KV head 0 gets three times the entries of head 1, in every layer (ragged heads)."""

    name = "head-skewed"
    Config = HeadSkewedConfig
    needs = frozenset({Signal.KEYS})

    def score(self, inputs):
        return -inputs.keys.norm(dim=-1)

    def allocate(self, allocation: Allocation) -> Allocation:
        tokens = allocation.tokens.clone()
        pair = tokens.sum(1)
        tokens[:, 0] = (pair * 3) // 4
        tokens[:, 1] = pair - tokens[:, 0]
        return Allocation(tokens=tokens, seq_len=allocation.seq_len, total=allocation.total)


def test_ragged_heads_store_only_their_own_entries_and_decode(tiny_model):
    cache = CompressedCache(tiny_model, HeadSkewed(), 0.5)
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        out = tiny_model(ids, cache=cache)
        kept = cache.kept_per_head()[:, 0]
        assert kept.tolist() == [[30, 10]] * 8
        assert cache.resident_bytes() == 40 * 8 * cache.shape.entry_bytes  # no padding to equalise heads
        for _ in range(5):
            out = tiny_model(out.logits[:, -1:].argmax(-1), cache=cache)
    assert cache.kept_per_head()[:, 0].tolist() == [[35, 15]] * 8
    assert torch.isfinite(out.logits).all()


def test_ragged_decode_matches_explicit_per_head_attention(tiny_model):
    """Per-head runs of different lengths: compare one decode step against a hand-written attention."""
    cache = CompressedCache(tiny_model, HeadSkewed(), 0.5)
    ids = torch.randint(3, 128, (1, 40))
    captured = {}
    attn = tiny_model.model.layers[3].self_attn
    hook = attn.register_forward_hook(lambda module, args, output: captured.update(out=output[0]), with_kwargs=False)
    with torch.no_grad():
        tiny_model(ids, cache=cache)
        layer = cache.layers[3]
        old_k, old_v = layer.keys.clone(), layer.values.clone()
        old_lengths = list(layer.lengths)
        pre = {}
        handle = attn.q_proj.register_forward_hook(lambda m, a, o: pre.update(q=o))
        tiny_model(torch.tensor([[9]]), cache=cache)
        handle.remove()
    hook.remove()
    # Rebuild the reference from the layer's state after the step: old runs + the appended token.
    new_k = torch.stack([layer.keys.split(layer.lengths)[h][-1] for h in range(2)])
    new_v = torch.stack([layer.values.split(layer.lengths)[h][-1] for h in range(2)])
    query = captured_query(tiny_model, cache, pre["q"], position=40, layer_idx=3)
    outputs = []
    for head in range(6):
        kv = head // 3
        k = torch.cat([old_k.split(old_lengths)[kv], new_k[kv][None]])
        v = torch.cat([old_v.split(old_lengths)[kv], new_v[kv][None]])
        weights = torch.softmax((query[head] @ k.T) / 16**0.5, dim=-1)
        outputs.append(weights @ v)
    want = attn.o_proj(torch.cat(outputs, dim=-1))
    torch.testing.assert_close(captured["out"][0, -1], want[0], atol=1e-5, rtol=0)


def test_a_ragged_decoding_step_carries_gradients(tiny_model):
    """Outside ``no_grad`` (a model's weights require gradients by default) a decoding step over ragged runs builds
    the graph like any other forward: the lone-run path writes no ``out=`` that autograd refuses."""
    cache = CompressedCache(tiny_model, HeadSkewed(), 0.5)
    with torch.no_grad():
        tiny_model(torch.randint(3, 128, (1, 40)), cache=cache)
    assert any(layer.packed and not layer.uniform for layer in cache.layers)
    embeds = tiny_model.get_input_embeddings()(torch.tensor([[5]])).detach().requires_grad_()
    tiny_model(inputs_embeds=embeds, cache=cache).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0 and embeds.grad.isfinite().all()


def test_blocks_are_a_sequences_consecutive_heads_of_one_length():
    from kvpolicies.engine.attention import blocks

    # Three KV heads per sequence; runs in storage order. Equal lengths across two sequences stay two blocks.
    lengths = [5, 5, 3, 3, 4, 4, 2, 7, 7]
    assert list(blocks(lengths, 3)) == [
        (0, 0, 2, 5, 0), (0, 2, 1, 3, 10),
        (1, 0, 1, 3, 13), (1, 1, 2, 4, 16),
        (2, 0, 1, 2, 24), (2, 1, 2, 7, 26),
    ]
    assert list(blocks([6] * 6, 3)) == [(0, 0, 3, 6, 0), (1, 0, 3, 6, 18)]


@pytest.mark.parametrize("policy", ["headkv", "h2o", "snapkv"])
def test_ragged_layers_attend_alike_run_by_run_and_in_one_padded_call(tiny_model, policy):
    """A CPU reads ragged runs a block at a time (a uniform policy's padded batch: one block per sequence); a GPU
    (``shaped_for_gpu``) in one call over a padded copy. Both must give the same logits, through a chunked prefill of
    a left-padded batch (new tokens with padding among them) and decoding steps that evict (slack 0)."""
    from kvpolicies.engine.paths import shaped_for_gpu

    ids = torch.randint(3, 128, (3, 48), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :9], mask[2, :30] = 0, 0

    def generate() -> torch.Tensor:
        cache = CompressedCache(tiny_model, policy, Budget(value=0.5, slack_tokens=0))
        with torch.no_grad():
            out = tiny_model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=5, do_sample=False,
                                      prefill_chunk_size=16, output_scores=True, return_dict_in_generate=True,
                                      pad_token_id=0)
        assert any(layer.packed and not layer.uniform for layer in cache.layers)
        return torch.stack(out.scores)

    run_by_run = generate()
    with shaped_for_gpu():
        padded = generate()
    torch.testing.assert_close(padded, run_by_run, atol=1e-5, rtol=0)


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, enable_gqa=False,
                          **unused):
    """torch's ``varlen_attn`` as its documentation states it, one sequence at a time (the kernel is CUDA-only)."""
    import torch.nn.functional as F

    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and enable_gqa and not unused
    assert max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max()) and max_k == int((cu_seq_k[1:] - cu_seq_k[:-1]).max())
    pieces = []
    for i in range(len(cu_seq_q) - 1):
        q, k, v = (t[bounds[i] : bounds[i + 1]].transpose(0, 1)
                   for t, bounds in ((query, cu_seq_q), (key, cu_seq_k), (value, cu_seq_k)))
        pieces.append(F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True).transpose(0, 1))
    return torch.cat(pieces)


def test_ragged_decoding_through_the_varlen_kernel_matches_the_other_paths(tiny_model, monkeypatch):
    """On CUDA in fp16/bf16 a decoding step over ragged runs reads the packed runs in place through torch's varlen
    attention; its arguments (cumulative run lengths, one KV head and ``groups`` query heads per run) are checked
    here against the kernel's documented semantics."""
    import torch.nn.attention.varlen as varlen

    from kvpolicies.engine import attention

    ids = torch.randint(3, 128, (3, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :7], mask[2, :19] = 0, 0  # ragged runs in every layer, and HeadSkewed's per-head lengths on top

    def decode(serves: bool) -> torch.Tensor:
        monkeypatch.setattr(attention, "varlen_serves", lambda rows: serves)
        calls.clear()
        cache = CompressedCache(tiny_model, HeadSkewed(), 0.5)
        with torch.no_grad():
            out = tiny_model(ids, attention_mask=mask, cache=cache)
            steps = []
            for step in range(3):
                step_mask = torch.cat([mask, torch.ones(3, step + 1, dtype=mask.dtype)], 1)
                out = tiny_model(out.logits[:, -1:].argmax(-1), attention_mask=step_mask, cache=cache)
                steps.append(out.logits[:, -1])
        return torch.stack(steps)

    calls: list = []
    monkeypatch.setattr(varlen, "varlen_attn", lambda *a, **k: calls.append(1) or reference_varlen_attn(*a, **k))
    padded = decode(serves=False)
    assert not calls
    through_varlen = decode(serves=True)
    assert len(calls) == 3 * 8  # every decoding step of every layer
    torch.testing.assert_close(through_varlen, padded, atol=1e-5, rtol=0)


def test_padding_is_never_kept_and_batch_rows_match_single_runs(tiny_model):
    generator = torch.Generator().manual_seed(3)
    long_ids = torch.randint(3, 128, (1, 40), generator=generator)
    short_ids = torch.randint(3, 128, (1, 28), generator=generator)
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, 12, dtype=torch.long), short_ids], 1)])
    mask = torch.cat([torch.ones(1, 40), torch.cat([torch.zeros(1, 12), torch.ones(1, 28)], 1)]).long()

    def run(ids, attention_mask):
        cache = CompressedCache(tiny_model, kvpolicies.get_policy("l2norm", uncompressed_layers=[], window_tokens=2), 0.5)
        out = tiny_model.generate(
            input_ids=ids, attention_mask=attention_mask, cache=cache, max_new_tokens=6,
            do_sample=False, pad_token_id=0,
        )
        return cache, out[:, ids.shape[1]:]

    batched, batched_tokens = run(batch, mask)
    alone = [run(long_ids, torch.ones_like(long_ids)), run(short_ids, torch.ones_like(short_ids))]
    kept = batched.kept_per_head()
    assert kept[2:, 0].unique().tolist() == [20 + 5] and kept[2:, 1].unique().tolist() == [14 + 5]
    entries = int(kept.sum())
    assert batched.resident_bytes() == entries * batched.shape.entry_bytes  # nothing stored for padding
    for row, (single, tokens) in enumerate(alone):
        assert torch.equal(batched_tokens[row], tokens[0])
        for layer_b, layer_s in zip(batched.layers, single.layers):
            keys_b = layer_b.keys.split(layer_b.lengths)[row * 2 : row * 2 + 2]
            keys_s = layer_s.keys.split(layer_s.lengths)
            for kb, ks in zip(keys_b, keys_s):
                torch.testing.assert_close(kb, ks, atol=1e-4, rtol=1e-4)


def test_cache_refuses_to_run_without_the_kvpolicies_attention(tiny_model):
    cache = CompressedCache(tiny_model, kvpolicies.get_policy("random"), 0.5)
    tiny_model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="kvpolicies attention"), torch.no_grad():
        tiny_model(torch.randint(3, 128, (1, 10)), cache=cache)
        tiny_model(torch.randint(3, 128, (1, 1)), cache=cache)


def test_kvpolicies_attention_is_transparent_for_other_caches(tiny_model):
    ids = torch.randint(3, 128, (1, 30))
    with torch.no_grad():
        before = tiny_model(ids).logits
        kvpolicies.prepare_model(tiny_model)
        assert tiny_model.config._attn_implementation == "kvpolicies-sdpa"
        after = tiny_model(ids, cache=DynamicCache(config=tiny_model.config)).logits
    assert torch.equal(before, after)


def test_sinks_and_window_survive_eviction(tiny_model):
    policy = kvpolicies.get_policy("l2norm", uncompressed_layers=[], sink_tokens=3, window_tokens=5, keep_highest=True)
    cache = CompressedCache(tiny_model, policy, "12 tokens")
    plain = DynamicCache(config=tiny_model.config)
    ids = torch.randint(3, 128, (1, 60))
    with torch.no_grad():
        tiny_model(ids, cache=cache)
        tiny_model(ids, cache=plain)
    for layer, full in zip(cache.layers, plain.layers):
        for head in range(2):
            kept = layer.keys.split(layer.lengths)[head]
            everything = full.keys[0, head]
            torch.testing.assert_close(kept[:3], everything[:3])
            torch.testing.assert_close(kept[-5:], everything[-5:])
            # The 4 scored slots hold the highest-norm keys among the middle entries; in layer 0 a repeated token
            # has the same norm at every position (RoPE is a rotation), and such ties keep the older entry.
            middle = everything[3:-5]
            top = torch.sort(middle.norm(dim=-1), descending=True, stable=True).indices[:4].sort().values
            torch.testing.assert_close(kept[3:-5], middle[top])


POLICIES = ["l2norm", "random", "streaming"]


@pytest.fixture(scope="module")
def three_layer_model():
    """One model for every example of the property test below, built when the test runs, not at import.
    Module-scoped because hypothesis runs all examples inside one test call and refuses function-scoped fixtures."""
    return tiny_llama(num_layers=3)


@settings(max_examples=30, deadline=None)
@given(
    seq_len=st.integers(2, 70),
    fraction=st.floats(0.02, 1.0),
    policy=st.sampled_from(POLICIES),
    sinks=st.integers(0, 4),
    window=st.integers(0, 8),
)
def test_prefill_keeps_exactly_the_allocation_in_every_head(three_layer_model, seq_len, fraction, policy, sinks,
                                                            window):
    model = three_layer_model
    options = {"sink_tokens": sinks, "window_tokens": window}
    if policy == "l2norm":
        options["uncompressed_layers"] = []
    cache = CompressedCache(model, kvpolicies.get_policy(policy, **options), Budget(value=fraction))
    with torch.no_grad():
        model(torch.randint(3, 128, (1, seq_len)), cache=cache)
    allocation = cache.allocation(seq_len)
    assert torch.equal(cache.kept_per_head()[:, 0], allocation.tokens)
    assert cache.resident_bytes() == int(allocation.tokens.sum()) * cache.shape.entry_bytes
    assert cache.get_seq_length() == seq_len


@pytest.mark.parametrize("policy", ["l2norm", "snapkv", "h2o"])
def test_selections_are_identical_under_sdpa_and_eager_attention(policy):
    """Scoring never depends on the attention kernel: the kept entries match between implementations."""
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(5))
    kept = {}
    for attn in ("sdpa", "eager"):
        model = tiny_llama(attn_implementation=attn)
        cache = CompressedCache(model, kvpolicies.get_policy(policy, **({"uncompressed_layers": []} if policy == "l2norm" else {})), 0.25)
        with torch.no_grad():
            model(ids, cache=cache)
        kept[attn] = [(layer.lengths, layer.keys.clone()) for layer in cache.layers]
    for (lengths_s, keys_s), (lengths_e, keys_e) in zip(kept["sdpa"], kept["eager"]):
        assert lengths_s == lengths_e
        torch.testing.assert_close(keys_s, keys_e, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_evicts_between_chunks_so_memory_follows_the_budget(tiny_model):
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(5))
    plain = tiny_model.generate(ids, max_new_tokens=6, do_sample=False)
    chunked = tiny_model.generate(ids, max_new_tokens=6, do_sample=False, prefill_chunk_size=32,
                                  cache=CompressedCache(tiny_model, "full", 1.0))
    assert torch.equal(plain, chunked)  # chunking alone changes nothing

    peaks = {}
    for chunk in (None, 32):
        cache = CompressedCache(tiny_model, "snapkv", 0.25)
        layer, held = cache.layers[3], []
        update = layer.update

        def recording_update(*args, **kwargs):
            result = update(*args, **kwargs)
            held.append(layer.keys.numel() // (layer.head_dim * layer.num_heads))  # entries per head, pre-eviction
            return result

        layer.update = recording_update
        tiny_model.generate(ids, max_new_tokens=6, do_sample=False, prefill_chunk_size=chunk, cache=cache)
        peaks[chunk] = max(held)
    assert peaks[None] == 200  # one forward: the layer holds the whole prompt until its attention has read it
    # Chunked: a quarter of what was read before plus one incoming chunk, never the whole prompt.
    assert peaks[32] <= 168 // 4 + 32


@pytest.mark.parametrize("policy", ["snapkv", "headkv"])
def test_chunked_prefill_of_a_left_padded_batch_stores_no_padding(tiny_model, policy):
    """Padding that outlasts the first chunk: once the layers are packed (after chunk 1), the next chunk's padding
    must not become entries, attended from the chunk after and counted as kept."""
    generator = torch.Generator().manual_seed(3)
    long, short = torch.randint(3, 128, (1, 120), generator=generator), torch.randint(3, 128, (1, 40), generator=generator)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 80, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 120), torch.cat([torch.zeros(1, 80), torch.ones(1, 40)], 1)]).long()

    def logits_and_cache(ids, attention_mask):
        cache = CompressedCache(tiny_model, policy, 1.0)  # keeps everything: only the padding may go
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            for start in range(0, ids.shape[1], 32):  # chunks of 32: the short prompt's padding fills chunks 1 and 2
                stop = start + 32
                out = tiny_model(ids[:, start:stop], attention_mask=attention_mask[:, :stop],
                                 position_ids=positions[:, start:stop], cache=cache)
        return out.logits[:, -1], cache

    batched, cache = logits_and_cache(batch, mask)
    assert all(layer.packed for layer in cache.layers)  # the padding of chunk 1 was dropped
    assert cache.kept_per_head()[:, 1].unique().tolist() == [40]  # the short prompt holds its 40 tokens, no padding
    assert [stats.kept_entries for stats in cache.sequence_stats()] == [120 * 8 * 2, 40 * 8 * 2]
    alone, _ = logits_and_cache(short, torch.ones_like(short))
    torch.testing.assert_close(batched[1], alone[0], atol=1e-4, rtol=1e-4)


def test_a_cache_evicts_under_inference_mode(tiny_model):
    """torch.inference_mode() is how many serve a model; its tensors have no version counter to check."""
    cache = CompressedCache(tiny_model, "snapkv", Budget(value=0.25, slack_tokens=0))
    with torch.inference_mode():
        tiny_model.generate(torch.randint(3, 128, (1, 64)), max_new_tokens=3, do_sample=False, cache=cache)
    assert int(cache.kept_per_head()[:, 0].sum()) < 8 * 2 * 64


@pytest.mark.parametrize("policy", ["snapkv", "headkv"])  # headkv moves entries between the heads of rows over budget
def test_chunked_prefill_compresses_a_batch_whose_row_is_padding_only_in_a_chunk(tiny_model, policy):
    ids = torch.randint(3, 128, (2, 120), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :80] = 0  # the second prompt's 40 tokens start in the third chunk
    cache = CompressedCache(tiny_model, policy, Budget(value=0.5, slack_tokens=0))
    with torch.no_grad():
        tiny_model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, prefill_chunk_size=32,
                            cache=cache, pad_token_id=0)
    kept = cache.kept_per_head()[:, 1]  # [layers, kv_heads] of the short prompt
    assert int(kept.max()) <= 40 + 2 and int(kept.sum()) <= 8 * 2 * (20 + 2)  # its own tokens, half of them
