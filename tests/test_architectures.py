"""The architecture matrix, first slice: tiny random-weight models of each family, built from transformers' own
classes, through every registered policy.

For each supported architecture and policy: a budget that keeps everything gives the model's own logits (also in
bf16 and fp16), a quarter budget holds every head to its allocation with resident bytes equal to the physical limit,
greedy generation with decode-time eviction runs, and a left-padded batch keeps for each prompt exactly the entries
it keeps alone. Architectures kvpolicies cannot compress are refused with an error naming what is missing.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import kvpolicies
from kvpolicies import Budget, CompressedCache, ModelLoadError

COMMON = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

ARCHITECTURES = {
    "llama-gqa": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "llama-mha": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "llama-mqa": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 1}),
    "llama-head-dim-24": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24}),
    "mistral": ("MistralConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen3-qk-norm": ("Qwen3Config", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}),
    "olmo2": ("Olmo2Config", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "phi3-partial-rotary": ("Phi3Config", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                           "partial_rotary_factor": 0.5}),
    "qwen3-moe": ("Qwen3MoeConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                     "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
}
UNSUPPORTED = {
    "gemma2": ("Gemma2Config", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}),
}
POLICIES = [info.name for info in kvpolicies.list_policies()]


def build(spec: tuple[str, dict], attn_implementation: str = "sdpa"):
    config_name, options = spec
    config = getattr(transformers, config_name)(**COMMON, **options)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def model(request):
    return build(ARCHITECTURES[request.param])


def prompt(length: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, COMMON["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("name", POLICIES)
def test_a_budget_that_keeps_everything_gives_the_models_own_logits(model, name):
    ids = prompt()
    plain = model(ids).logits
    ours = model(ids, cache=CompressedCache(model, kvpolicies.get_policy(name), 1.0)).logits
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)  # float32: the same kernels on the same numbers


@torch.no_grad()
@pytest.mark.parametrize("name", POLICIES)
def test_a_quarter_budget_holds_every_head_to_its_allocation_and_the_bytes_to_the_physical_limit(model, name):
    ids = prompt(64)
    policy = kvpolicies.get_policy(name)
    cache = CompressedCache(model, policy, Budget(value=0.25, slack_tokens=0))
    try:
        model(ids, cache=cache)
    except kvpolicies.BudgetError as error:  # l2norm keeps 2 of 2 layers whole: the quarter cannot hold them
        assert "uncompressed" in str(error)
        return
    kept = cache.kept_per_head()[:, 0]
    if policy.compresses:
        allocation = cache.allocation(64).tokens
        torch.testing.assert_close(kept.sum(-1), allocation.sum(-1))  # every layer holds its allocation ...
        if type(policy).reallocate_heads is kvpolicies.Policy.reallocate_heads:  # ... and each head, unless moved
            torch.testing.assert_close(kept, allocation)
    stats = cache.stats()
    assert stats.resident_bytes == stats.kept_entries * cache.shape.entry_bytes


@torch.no_grad()
@pytest.mark.parametrize("name", POLICIES)
def test_greedy_generation_with_decode_time_eviction_runs(model, name):
    options = {"uncompressed_layers": []} if name == "l2norm" else {}
    cache = CompressedCache(model, kvpolicies.get_policy(name, **options), Budget(value=0.5, slack_tokens=2))
    out = model.generate(prompt(), cache=cache, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert out.shape[1] == 60 and cache.get_seq_length() == 59


@pytest.mark.parametrize("architecture", sorted(UNSUPPORTED))
def test_models_with_sliding_window_layers_are_refused_with_what_is_missing(architecture):
    model = build(UNSUPPORTED[architecture], attn_implementation="eager")
    with pytest.raises(ModelLoadError, match="supports full-attention layers only.*sliding_attention"):
        CompressedCache(model, kvpolicies.get_policy("l2norm"), 0.5)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["l2norm", "snapkv", "headkv"])
def test_half_precision_keeps_the_models_own_logits_at_full_budget(model, name, dtype):
    """bf16 and fp16 on CPU: the uncompressed path calls the model's own attention, so nothing may change."""
    half = model.to(dtype)
    try:
        ids = prompt()
        plain = half(ids).logits
        ours = half(ids, cache=CompressedCache(half, kvpolicies.get_policy(name), 1.0)).logits
        assert torch.equal(ours, plain)
        cache = CompressedCache(half, kvpolicies.get_policy(name, **({"uncompressed_layers": []} if name == "l2norm"
                                                                      else {})), 0.25)
        assert torch.isfinite(half(prompt(64), cache=cache).logits).all()
    finally:
        model.to(torch.float32)


@torch.no_grad()
@pytest.mark.parametrize("name", POLICIES)
def test_a_left_padded_batch_keeps_for_each_prompt_what_it_keeps_alone(model, name):
    generator = torch.Generator().manual_seed(11)
    first = torch.randint(3, COMMON["vocab_size"], (1, 36), generator=generator)
    second = torch.randint(3, COMMON["vocab_size"], (1, 25), generator=generator)
    batch = torch.cat([first, torch.cat([torch.zeros(1, 11, dtype=torch.long), second], 1)])
    mask = torch.cat([torch.ones(1, 36), torch.cat([torch.zeros(1, 11), torch.ones(1, 25)], 1)]).long()
    options = {"uncompressed_layers": []} if name == "l2norm" else {}

    def prefill(ids, attention_mask):
        cache = CompressedCache(model, kvpolicies.get_policy(name, **options), Budget(value=0.4, slack_tokens=0))
        model(ids, attention_mask=attention_mask, position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
              cache=cache)
        return cache

    batched = prefill(batch, mask)
    for row, ids in enumerate((first, second)):
        alone = prefill(ids, torch.ones_like(ids))
        assert torch.equal(batched.kept_per_head()[:, row], alone.kept_per_head()[:, 0])
        if not batched.policy.compresses:
            continue  # the reference keeps the batch dense, padding included (reported apart as padding bytes)
        for layer_b, layer_a in zip(batched.layers, alone.layers):
            runs = list(layer_b.runs())[row * layer_a.num_heads : (row + 1) * layer_a.num_heads]
            for (_, _, keys_b, _), (_, _, keys_a, _) in zip(runs, layer_a.runs()):
                torch.testing.assert_close(keys_b, keys_a, atol=1e-4, rtol=1e-4)
