"""The architecture matrix: tiny random-weight models of each family, built from transformers' own classes, through
every registered policy.

For each architecture and policy: a budget that keeps everything gives the model's own logits (float32, and bit for
bit in bf16 and fp16), a quarter budget holds every head to its allocation with resident bytes at the physical
limit, greedy generation with decode-time eviction runs, and a left-padded batch keeps for each prompt exactly the
entries it keeps alone. Per architecture: the attention signals equal the model's own eager attention weights, the
kept entries replayed through transformers' own cache give the same next token, sliding-window layers never hold
more than the model's window (and hold it whole with ``windows="keep"``), what slid out of a packed window is never
attended, and bf16 ties break towards the older entry. Architectures
kvpolicies cannot compress are refused, before any result, with an error naming what is missing.

``pytest tests/test_architectures.py --models-table docs/models.md`` writes the support table from these results.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache, DynamicLayer

import kvpolicies
from kvpolicies import Budget, BudgetError, CompressedCache, LayerView, ModelLoadError, PolicyConfig, Signal
from kvpolicies.engine.policy import Policy
from tests.architectures import (  # noqa: F401 (architecture, model: fixtures)
    ALL_WINDOWED,
    ARCHITECTURES,
    COMMON,
    REFUSED,
    UNSUPPORTED,
    WHOLE,
    WINDOW,
    architecture,
    build,
    model,
    prompt,
)

POLICIES = [info.name for info in kvpolicies.list_policies()]

def policy(name: str) -> Policy:
    return kvpolicies.get_policy(name, **WHOLE.get(name, {}))


def refused(architecture: str, name: str) -> bool:
    """True (after checking the refusal) when this policy cannot run on this architecture: it must say why at once."""
    reason = REFUSED.get((architecture, name))
    if reason is None:
        return False
    model = build(ARCHITECTURES[architecture])
    with pytest.raises(ModelLoadError, match=reason):
        model(prompt(), cache=CompressedCache(model, policy(name), Budget(value=0.5, slack_tokens=0)))
    return True


def own_cache_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of keys and values in transformers' own cache after ``ids`` (sliding layers: their last W - 1)."""
    cache = DynamicCache(config=model.config)
    model(ids, cache=cache)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def held(layer, row: int) -> list[torch.Tensor]:
    """The keys each KV head of ``row`` holds, oldest first, packed or dense."""
    if layer.packed:
        runs = list(layer.runs())
        return [keys for b, _, keys, _ in runs if b == row]
    return [layer.keys[row, head][layer.valid[row]] for head in range(layer.num_heads)]


@torch.no_grad()
@pytest.mark.parametrize("name", POLICIES)
def test_a_budget_that_keeps_everything_gives_the_models_own_logits(model, name):
    ids = prompt()
    plain = model(ids).logits
    ours = model(ids, cache=CompressedCache(model, kvpolicies.get_policy(name), 1.0)).logits
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)  # float32: the same kernels on the same numbers


@torch.no_grad()
def test_greedy_decoding_at_full_budget_is_the_models_own(model):
    """Decoding crosses the sliding windows: the rolling window must be the model's own at every step."""
    ids = prompt()
    plain = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    ours = model.generate(ids, cache=CompressedCache(model, kvpolicies.get_policy("snapkv"), 1.0), max_new_tokens=12,
                          min_new_tokens=12, do_sample=False)
    assert torch.equal(ours, plain)


@torch.no_grad()
@pytest.mark.parametrize("name", POLICIES)
def test_a_quarter_budget_holds_every_head_to_its_allocation_and_the_bytes_to_the_physical_limit(
        architecture, model, name):
    if refused(architecture, name):
        return
    ids = prompt(64)
    chosen = policy(name)
    cache = CompressedCache(model, chosen, Budget(value=0.25, slack_tokens=0))
    model(ids, cache=cache)
    if chosen.has_stage:  # it would run before the first decoding step
        cache.after_prefill(model)
    kept = cache.kept_per_head()[:, 0]
    if chosen.has_stage:  # one choice over every layer and head: the budget in all, layers and heads compete
        assert int(kept.sum()) == int(cache.allocation(64).tokens.sum())
    elif chosen.compresses:
        allocation = cache.allocation(64).tokens
        torch.testing.assert_close(kept.sum(-1), allocation.sum(-1))  # every layer holds its allocation ...
        if type(chosen).reallocate_heads is Policy.reallocate_heads:  # ... and each head, unless moved
            torch.testing.assert_close(kept, allocation)
    for layer in cache.shape.sliding_layers:  # a window shares the budget: never more than the model's W - 1
        assert (kept[layer] <= WINDOW - 1).all()
    stats = cache.stats()
    assert stats.resident_bytes == stats.kept_entries * cache.shape.entry_bytes


@torch.no_grad()
@pytest.mark.parametrize("name", POLICIES)
def test_greedy_generation_with_decode_time_eviction_runs(architecture, model, name):
    if refused(architecture, name):
        return
    budget = Budget(value=0.5, slack_tokens=2)
    cache = CompressedCache(model, policy(name), budget)
    out = model.generate(prompt(), cache=cache, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert out.shape[1] == 60 and cache.get_seq_length() == 59
    for layer in cache.shape.sliding_layers:  # what slid out is held, hidden, until the next eviction: the slack
        assert (cache.kept_per_head()[layer] <= WINDOW - 1 + budget.slack_tokens).all()


@pytest.mark.parametrize("architecture", sorted(UNSUPPORTED))
def test_architectures_without_per_token_keys_and_values_are_refused_with_what_is_missing(architecture,
                                                                                          record_property):
    config_name, options, missing = UNSUPPORTED[architecture]
    config = getattr(transformers, config_name)(**options)
    torch.manual_seed(0)
    unsupported = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ModelLoadError, match=missing) as error:
        CompressedCache(unsupported, kvpolicies.get_policy("snapkv"), 0.5)
    record_property("refusal", str(error.value))
    assert type(unsupported).__name__ in str(error.value)
    assert not type(unsupported).__name__.startswith("kvpolicies")
    assert not unsupported.config._attn_implementation.startswith("kvpolicies-")  # refused before any change


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", POLICIES)
def test_half_precision_keeps_the_models_own_logits_at_full_budget_and_stays_finite_compressed(
        architecture, model, name, dtype):
    """bf16 and fp16 on CPU: the uncompressed path calls the model's own attention, so nothing may change."""
    half = copy.deepcopy(model).to(dtype)  # a copy: a round trip through bf16 would round the fp32 model's buffers
    ids = prompt()
    plain = half(ids).logits
    ours = half(ids, cache=CompressedCache(half, kvpolicies.get_policy(name), 1.0)).logits
    assert torch.equal(ours, plain)
    if refused(architecture, name):
        return
    cache = CompressedCache(half, policy(name), Budget(value=0.3, slack_tokens=0))
    out = half(prompt(64), cache=cache)
    assert torch.isfinite(out.logits).all()
    for _ in range(3):
        out = half(out.logits[:, -1:].argmax(-1), cache=cache)
        assert torch.isfinite(out.logits).all()
    assert all(layer.keys.dtype == dtype for layer in cache.layers)


@torch.no_grad()
@pytest.mark.parametrize("name", POLICIES)
def test_a_left_padded_batch_keeps_for_each_prompt_what_it_keeps_alone(architecture, model, name):
    if refused(architecture, name):
        return
    fraction = 0.45
    generator = torch.Generator().manual_seed(11)
    first = torch.randint(3, COMMON["vocab_size"], (1, 36), generator=generator)
    second = torch.randint(3, COMMON["vocab_size"], (1, 25), generator=generator)
    batch = torch.cat([first, torch.cat([torch.zeros(1, 11, dtype=torch.long), second], 1)])
    mask = torch.cat([torch.ones(1, 36), torch.cat([torch.zeros(1, 11), torch.ones(1, 25)], 1)]).long()

    def prefill(ids, attention_mask):
        cache = CompressedCache(model, policy(name), Budget(value=fraction, slack_tokens=0))
        model(ids, attention_mask=attention_mask, position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
              cache=cache)
        if cache.policy.has_stage:  # it would run before the first decoding step
            cache.after_prefill(model)
        return cache

    batched = prefill(batch, mask)
    for row, ids in enumerate((first, second)):
        alone = prefill(ids, torch.ones_like(ids))
        assert torch.equal(batched.kept_per_head()[:, row], alone.kept_per_head()[:, 0])
        if not batched.policy.compresses:
            continue  # the reference keeps the batch dense, padding included (reported apart as padding bytes)
        assert any(layer.packed or layer.window for layer in alone.layers)
        for layer_b, layer_a in zip(batched.layers, alone.layers):
            for keys_b, keys_a in zip(held(layer_b, row), held(layer_a, 0)):
                torch.testing.assert_close(keys_b, keys_a, atol=1e-4, rtol=1e-4)


class Recorder(Policy):
    """Test policy: keeps the newest entries and records the attention signals it was given, per layer."""

    name = "signal-recorder"
    Config = PolicyConfig
    needs = frozenset({Signal.ATTENTION, Signal.CUMULATIVE_ATTENTION})

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def score(self, inputs):
        self.seen[inputs.layer_idx] = (inputs.attention.clone(), inputs.cumulative_attention.clone())
        return inputs.order.float()


@torch.no_grad()
def test_attention_signals_equal_the_models_own_eager_attention_weights(architecture):
    """Soft-capping (Gemma 2), QK-norm (Qwen3, OLMo2, Gemma 3), query_pre_attn_scalar (Gemma) and partial rotary
    (Phi-3) included: what a policy reads as attention is what the model computed."""
    eager = build(ARCHITECTURES[architecture], attn="eager")
    ids = prompt(24)
    weights = eager(ids, output_attentions=True).attentions  # per layer [batch, heads, q, k]
    recorder = Recorder()
    cache = CompressedCache(eager, recorder, Budget(value=0.5, slack_tokens=0))
    eager(ids, cache=cache)
    scored = list(range(len(weights)))  # windows share the budget: scored too, through the model's sliding mask
    assert sorted(recorder.seen) == scored
    for layer in scored:
        groups = weights[layer].shape[1] // cache.shape.num_kv_heads
        received = weights[layer].unflatten(1, (cache.shape.num_kv_heads, groups)).sum(dim=(2, 3))
        attention, cumulative = recorder.seen[layer]
        if layer in cache.shape.sliding_layers:  # what the next token cannot see is not the policy's to judge
            assert not attention[..., : -(WINDOW - 1)].any() and not cumulative[..., : -(WINDOW - 1)].any()
            attention, cumulative, received = (t[..., -(WINDOW - 1):] for t in (attention, cumulative, received))
        torch.testing.assert_close(attention, received, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cumulative, received, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("name", ["snapkv", "keydiff", "streaming"])
def test_kept_entries_replayed_through_transformers_own_cache_give_the_same_next_token(architecture, model, name):
    """After a compressed prefill each layer's kept entries, put into transformers' ``DynamicCache``, give the same
    next-token logits: the packed attention (soft-cap included) is the model's attention over what was kept."""
    ids = prompt()
    cache = CompressedCache(model, policy(name), 1.0)
    # transformers' sliding layer holds a whole window: where full layers build the masks beside it (Gemma), the
    # windows are kept whole; where every layer is windowed, a cut window is replayed as a plain layer (all it
    # holds is within the next token's reach, and every layer holds as many).
    rule = "share" if architecture in ALL_WINDOWED else "keep"
    # A budget near 0.4 whose heads all get one length: a dense DynamicCache cannot hold ragged heads.
    fraction = next(f / 100 for f in range(40, 60)
                    if (Budget(value=f / 100, windows=rule).allocate(40, cache.shape).tokens.diff(dim=1) == 0).all())
    cache = CompressedCache(model, policy(name), Budget(value=fraction, slack_tokens=0, windows=rule))
    model(ids, cache=cache)
    assert any(layer.packed for layer in cache.layers)
    plain = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        keys, values, _ = layer.dense_view(tracks=False)
        if layer.window is not None and rule == "share":  # fewer than W - 1 kept, all within the next token's reach
            assert keys.shape[2] < WINDOW - 1
            plain.layers[index] = DynamicLayer()
        plain.layers[index].update(keys.clone(), values.clone())
        if layer.window is not None and rule == "keep":
            plain.layers[index].cumulative_length = layer.logical_length
    token = torch.tensor([[7]])
    got = model(token, cache=cache).logits  # positions from the cache's logical length
    want = model(token, cache=plain, position_ids=torch.tensor([[ids.shape[1]]])).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.75, 1.0])
def test_resident_bytes_never_exceed_the_models_own_cache(architecture, model, fraction):
    """Sliding windows are charged to the budget: at every budget we hold at most what transformers' own cache
    (windows of W - 1) holds."""
    ids = prompt(64)
    cache = CompressedCache(model, kvpolicies.get_policy("snapkv"), Budget(value=fraction, slack_tokens=0))
    model(ids, cache=cache)
    own = own_cache_bytes(model, ids)
    assert cache.stats().full_bytes == own
    assert cache.resident_bytes() <= fraction * own + cache.shape.entry_bytes


class Tied(Policy):
    """Test policy: scores every entry by its key norm rounded to one significant bit, so ties are everywhere."""

    name = "tied-norms"
    Config = PolicyConfig
    needs = frozenset({Signal.KEYS})

    def __init__(self) -> None:
        super().__init__()
        self.scores: dict[int, torch.Tensor] = {}

    def score(self, inputs):
        scores = inputs.keys.float().norm(dim=-1).log2().round()
        self.scores[inputs.layer_idx] = scores.masked_fill(~inputs.valid, float("-inf"))  # a window's reach only
        return scores


@torch.no_grad()
def test_ties_in_bf16_break_towards_the_older_entry(architecture, model):
    half = copy.deepcopy(model).to(torch.bfloat16)
    ids = prompt(48)
    runs = []
    for _ in range(2):
        tied = Tied()
        cache = CompressedCache(half, tied, Budget(value=0.3, slack_tokens=0))
        half(ids, cache=cache)
        runs.append((tied, cache))
    (tied, cache), (_, again) = runs
    for index, scores in tied.scores.items():
        layer = cache.layers[index]
        dense = DynamicCache()  # no config: every layer holds every token, windows too
        half(ids, cache=dense)
        for head, kept_keys in enumerate(held(layer, 0)):
            row = scores[0, head]
            assert len(row[row.isfinite()].unique()) < int(row.isfinite().sum())  # there are ties to break
            # Highest score first; among equal scores, the older (lower position) first.
            order = sorted(range(len(row)), key=lambda position: (-row[position].item(), position))
            chosen = sorted(order[: len(kept_keys)])
            torch.testing.assert_close(kept_keys, dense.layers[index].keys[0, head, chosen], atol=0, rtol=0)
            assert torch.equal(kept_keys, held(again.layers[index], 0)[head])


def test_the_layer_view_reads_each_layers_own_output_projection_and_rope(architecture, model):
    """The model facts policies read (criticalkv: W_o; expected_attention: RoPE) come from one reader, right for
    every architecture: per layer type (Gemma 3), partial (Phi-3), or refused (interleaved pairs)."""
    config = model.config.get_text_config(decoder=True)
    rotary = model.model.rotary_emb
    for index, block in enumerate(model.model.layers):
        attention = block.self_attn
        view = LayerView(attention)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        assert view.output_projection is attention.o_proj.weight
        assert tuple(view.output_projection.shape) == (config.hidden_size, config.num_attention_heads * head_dim)
        if (architecture, "expected_attention") in REFUSED:
            with pytest.raises(ModelLoadError, match=REFUSED[(architecture, "expected_attention")]):
                view.rotary
            continue
        kind = (getattr(config, "layer_types", None) or [None] * (index + 1))[index]
        own = getattr(rotary, f"{kind}_inv_freq", None) if kind else None
        own = rotary.inv_freq if own is None else own
        torch.testing.assert_close(view.rotary.inv_freq, own.float())
        assert view.rotary.dim == 2 * own.numel() <= head_dim


def test_a_model_written_without_the_attention_interface_is_refused_before_any_result(record_property):
    """Eviction runs inside the attention function, so a model whose attention cannot be swapped cannot be served."""

    class HandWrittenAttention(transformers.LlamaForCausalLM):
        # What transformers concludes for a modeling file whose attention never calls ALL_ATTENTION_FUNCTIONS.
        _can_set_attn_implementation_cached_value = False

    config = transformers.LlamaConfig(**COMMON | {"num_attention_heads": 4, "num_key_value_heads": 2})
    config._attn_implementation = "eager"
    model = HandWrittenAttention(config).eval()
    with pytest.raises(ModelLoadError, match="HandWrittenAttention cannot switch its attention implementation") as error:
        CompressedCache(model, kvpolicies.get_policy("snapkv"), 0.5)
    record_property("refusal", str(error.value))


@torch.no_grad()
def test_learned_attention_sinks_are_refused_before_any_result(record_property):
    """GPT-OSS adds a learned sink logit to every softmax; compressed layers would silently drop it."""
    config = transformers.GptOssConfig(**COMMON | {
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64,
        "num_local_experts": 2, "num_experts_per_tok": 1, "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"]})
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ModelLoadError, match="learned attention sinks") as error:
        model(prompt(), cache=CompressedCache(model, kvpolicies.get_policy("snapkv"), 0.5))
    record_property("refusal", str(error.value))


def test_a_fixed_budget_that_full_windows_would_outgrow_is_refused_when_the_cache_is_built():
    """Windows fill up as the sequence grows; a tokens budget must not pass at prefill and fail mid-generation."""
    model = build(ARCHITECTURES["gemma2"])
    keep = Budget.parse("8 tokens", windows="keep")
    CompressedCache(model, kvpolicies.get_policy("snapkv"), keep)  # windows of 7 plus one: fits
    with pytest.raises(BudgetError, match="tokens per KV head.*windows=share"):
        CompressedCache(model, kvpolicies.get_policy("snapkv"), Budget.parse("3 tokens", windows="keep"))
    CompressedCache(model, kvpolicies.get_policy("snapkv"), "3 tokens")  # windows sharing the budget: any fits


@torch.no_grad()
@pytest.mark.parametrize("architecture", ["gemma2", "gemma3", "mistral-sliding-window"])
def test_padding_inside_a_window_is_never_counted_and_decoding_keeps_each_row_as_alone(architecture):
    """A prompt shorter than the window, left-padded next to a long one: its window holds padding for a while."""
    model = build(ARCHITECTURES[architecture])
    generator = torch.Generator().manual_seed(3)
    long = torch.randint(3, COMMON["vocab_size"], (1, 30), generator=generator)
    short = torch.randint(3, COMMON["vocab_size"], (1, 4), generator=generator)  # 4 < W - 1 = 7
    batch = torch.cat([long, torch.cat([torch.zeros(1, 26, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.zeros(1, 26), torch.ones(1, 4)], 1)]).long()
    steps = torch.randint(3, COMMON["vocab_size"], (2, 3), generator=generator)

    def run(ids, attention_mask, tokens):
        fraction = 0.8
        cache = CompressedCache(model, kvpolicies.get_policy("snapkv"), Budget(value=fraction, slack_tokens=0))
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        model(ids, attention_mask=attention_mask, position_ids=positions, cache=cache)
        kept = [cache.kept_per_head()]
        for step in range(tokens.shape[1]):
            attention_mask = torch.cat([attention_mask, torch.ones(ids.shape[0], 1, dtype=torch.long)], 1)
            model(tokens[:, step : step + 1], attention_mask=attention_mask,
                  position_ids=positions[:, -1:] + step + 1, cache=cache)
            kept.append(cache.kept_per_head())
        return kept, cache

    together, cache = run(batch, mask, steps)
    alone, _ = run(short, torch.ones_like(short), steps[1:])
    for both, single in zip(together, alone):
        assert torch.equal(both[:, 1], single[:, 0])  # the padding in the short row's window is never counted
    assert cache.sequence_stats()[1].kept_entries == int(alone[-1][:, 0].sum())


WINDOWED = ["gemma2", "gemma3", "mistral-sliding-window"]


@torch.no_grad()
@pytest.mark.parametrize("architecture", WINDOWED)
@pytest.mark.parametrize("gpu_shaped", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_packed_windows_decode_each_prompt_of_a_padded_batch_as_the_model_does_alone(architecture, gpu_shaped,
                                                                                     chunk):
    """A left-padded batch packs every layer at prefill, windows included, and decoding then slides the packed
    windows by their entries' positions: at a budget that keeps what the model keeps, each row's logits at every
    step are the model's own for that prompt alone (run by run on a CPU, one padded call shaped for a GPU). The
    short row's windows hold fewer entries than the long one's for its first steps: the runs are ragged. ``chunk``
    tokens a forward: several new tokens see each other causally and the window by position at once."""
    from kvpolicies.engine.paths import shaped_for_gpu

    model = build(ARCHITECTURES[architecture])
    generator = torch.Generator().manual_seed(5)
    first = torch.randint(3, COMMON["vocab_size"], (1, 30), generator=generator)
    second = torch.randint(3, COMMON["vocab_size"], (1, 4), generator=generator)  # 4 < W - 1: a short window
    batch = torch.cat([first, torch.cat([torch.zeros(1, 26, dtype=torch.long), second], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.zeros(1, 26), torch.ones(1, 4)], 1)]).long()
    length = -(-2 * WINDOW // chunk) * chunk  # past the window twice, in whole chunks
    steps = torch.randint(3, COMMON["vocab_size"], (2, length), generator=generator)
    cache = CompressedCache(model, kvpolicies.get_policy("snapkv"), Budget(value=1.0, slack_tokens=3))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with shaped_for_gpu() if gpu_shaped else contextlib.nullcontext():
        got = [model(batch, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]]
        assert all(layer.packed for layer in cache.layers)
        assert all(not cache.layers[index].uniform for index in cache.shape.sliding_layers)  # 7 and 4 entries
        for step in range(0, steps.shape[1], chunk):
            mask = torch.cat([mask, torch.ones(2, chunk, dtype=torch.long)], 1)
            at = positions[:, -1:] + step + 1 + torch.arange(chunk)
            got.append(model(steps[:, step : step + chunk], attention_mask=mask, position_ids=at,
                             cache=cache).logits[:, -chunk:])
    for row, ids in enumerate((first, second)):
        own = DynamicCache(config=model.config)
        want = [model(ids, cache=own).logits[:, -1]]
        for step in range(0, steps.shape[1], chunk):
            want.append(model(steps[row : row + 1, step : step + chunk], cache=own).logits[:, -chunk:])
        for got_step, want_step in zip(got, want):
            torch.testing.assert_close(got_step[row : row + 1], want_step, atol=1e-5, rtol=1e-5)
    for index in cache.shape.sliding_layers:  # what slid out is held only until the next eviction: the slack
        assert (cache.kept_per_head()[index] <= WINDOW - 1 + 3).all()


@torch.no_grad()
@pytest.mark.parametrize("architecture", WINDOWED)
@pytest.mark.parametrize("name", ["snapkv", "headkv", "h2o"])
@pytest.mark.parametrize("gpu_shaped", [False, True])
def test_entries_that_slid_out_of_a_packed_window_are_never_attended(architecture, name, gpu_shaped):
    """Compressed windows keep entries from all over the window; decoding slides it past some of them, which stay
    stored until the next eviction. Whatever they hold, the next token's logits do not change (headkv's runs are
    ragged: run by run on a CPU, one padded call shaped for a GPU; h2o's track reads the window too)."""
    from kvpolicies.engine.paths import shaped_for_gpu

    model = build(ARCHITECTURES[architecture])
    ids = prompt(40)
    caches = []
    for _ in range(2):
        cache = CompressedCache(model, policy(name), Budget(value=0.5, slack_tokens=50))  # no eviction while decoding
        model(ids, cache=cache)
        for token in range(3, 3 + WINDOW // 2):
            model(torch.tensor([[token]]), cache=cache)
        caches.append(cache)
    clean, poisoned = caches
    stale = 0
    for layer in poisoned.layers:
        if layer.window is None:
            continue
        assert layer.packed
        out = ~layer.in_window(layer.positions[:, 0])
        stale += int(out.sum())
        layer.values[out] = 1e4
        layer.keys[out] = 1e2
    assert stale > 0  # the window really slid past kept entries
    token = torch.tensor([[7]])
    with shaped_for_gpu() if gpu_shaped else contextlib.nullcontext():
        got, want = model(token, cache=poisoned).logits, model(token, cache=clean).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    if name == "h2o":  # what the track took from this step: nothing from what slid out
        for clean_layer, poisoned_layer in zip(clean.layers, poisoned.layers):
            for track, values in poisoned_layer.tracked.items():
                torch.testing.assert_close(values, clean_layer.tracked[track], atol=0, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("architecture", WINDOWED)
def test_windows_kept_whole_hold_their_window_and_refuse_what_does_not_fit(architecture):
    """``windows="keep"``: a window holds the model's W - 1 and the full-attention layers share the rest; a model
    whose every layer is windowed has nothing else to cut, and says how to let windows share the budget."""
    model = build(ARCHITECTURES[architecture])
    cache = CompressedCache(model, kvpolicies.get_policy("snapkv"), Budget(value=0.5, slack_tokens=0, windows="keep"))
    if architecture in ALL_WINDOWED:
        with pytest.raises(BudgetError, match="every layer is windowed.*windows=share"):
            model(prompt(64), cache=cache)
        return
    model(prompt(64), cache=cache)
    kept = cache.kept_per_head()[:, 0]
    for index in cache.shape.sliding_layers:
        assert (kept[index] == WINDOW - 1).all() and not cache.layers[index].packed
    assert all(cache.layers[index].packed for index in range(len(kept)) if index not in cache.shape.sliding_layers)
    assert int(kept.sum()) == cache.allocation(64).total


def test_a_window_sees_the_positions_the_models_own_mask_sees():
    """By hand: a window of 4 after 10 tokens; the next query (position 10) sees positions 7, 8 and 9 and itself;
    a pass of two queries at 8 and 9 sees 5 to 8 and 6 to 9."""
    from kvpolicies.engine.signals import SlidingWindow
    from kvpolicies.engine.storage import CompressedLayer

    positions = torch.tensor([0, 3, 5, 6, 7, 9]).view(1, 1, -1)
    layer = CompressedLayer(0, window=4, window_compressed=True)
    layer.logical_length = 10
    assert layer.in_window(positions).flatten().tolist() == [False, False, False, False, True, True]
    two = SlidingWindow(positions, first_query=8, size=4).visible(0, 2, 6)[0, 0]
    assert two.tolist() == [[False, False, True, True, True, True], [False, False, False, True, True, True]]
    # Causality (9 is newer than the query at 8) is the caller's: the window only bounds the past.


@torch.no_grad()
@pytest.mark.parametrize("architecture", WINDOWED)
@pytest.mark.parametrize("name", ["snapkv", "kvzip-like"])
def test_a_question_and_answer_longer_than_the_window_leave_each_window_at_its_size_plus_the_slack(architecture,
                                                                                                   name):
    """The protocol keeps what follows the context whole, and a stage policy evicts nothing after choosing: neither
    calls an eviction while decoding, so what slides out of a packed window is dropped on its own once a run holds
    more than W - 1 plus the slack."""
    from tests.test_stages import RepeatTail

    model = build(ARCHITECTURES[architecture])
    chosen = RepeatTail() if name == "kvzip-like" else policy(name)
    cache = CompressedCache(model, chosen, Budget(value=0.4, slack_tokens=2))
    ids = prompt(40)
    cache.context_lengths = [30]  # the last 10 tokens are the question, kept whole and not charged
    model(ids[:, :30], cache=cache)  # query-agnostic: the context alone first, then its question
    model(ids[:, 30:], cache=cache)
    assert all(cache.layers[index].packed for index in cache.shape.sliding_layers)
    for token in range(3, 3 + 3 * WINDOW):  # an answer three windows long
        model(torch.tensor([[token]]), cache=cache)
        for index in cache.shape.sliding_layers:
            layer = cache.layers[index]
            assert max(layer.lengths) <= WINDOW - 1 + 2


@torch.no_grad()
@pytest.mark.parametrize("architecture", WINDOWED)
@pytest.mark.parametrize("name", ["streaming", "kvzip-like"])
def test_a_short_prompt_keeps_its_sinks_in_a_window_beside_a_long_one_as_alone(architecture, name):
    """Sinks are the sequence's first tokens: a window that still holds them protects them, one that has slid past
    them protects nothing (its oldest entries are the next to go). Decided per sequence, so a short prompt beside a
    long one keeps the window entries it keeps alone."""
    from tests.test_stages import RepeatTail

    model = build(ARCHITECTURES[architecture])
    generator = torch.Generator().manual_seed(9)
    long = torch.randint(3, COMMON["vocab_size"], (1, 30), generator=generator)
    short = torch.randint(3, COMMON["vocab_size"], (1, 6), generator=generator)  # 6 < W: its window holds its start
    batch = torch.cat([long, torch.cat([torch.zeros(1, 24, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.zeros(1, 24), torch.ones(1, 6)], 1)]).long()

    def run(ids, attention_mask):
        chosen = RepeatTail(sink_tokens=2) if name == "kvzip-like" else kvpolicies.get_policy("streaming", sink_tokens=2,
                                                                                  window_tokens=1)
        cache = CompressedCache(model, chosen, Budget(value=0.5, slack_tokens=0))
        model(ids, attention_mask=attention_mask, position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
              cache=cache)
        if name == "kvzip-like":
            cache.after_prefill(model)
        return cache

    together, alone = run(batch, mask), run(short, torch.ones_like(short))
    for index in together.shape.sliding_layers:
        for keys_b, keys_a in zip(held(together.layers[index], 1), held(alone.layers[index], 0)):
            torch.testing.assert_close(keys_b, keys_a, atol=1e-4, rtol=1e-4)
