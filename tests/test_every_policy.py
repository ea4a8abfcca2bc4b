"""Contracts every registered policy must honour: decode-time eviction, padding invariance, equal budgets."""

from __future__ import annotations

import pytest
import torch

import kvpolicies
from kvpolicies import Budget, CompressedCache

COMPRESSING = [info.name for info in kvpolicies.list_policies() if info.policy_class.compresses]
SCORING = [name for name in COMPRESSING if not kvpolicies.get_policy(name).has_stage]
"""Policies that evict while decoding. An after-prefill stage (KVzip) chooses once, before the first decoding
step, and keeps what follows whole and uncharged, as kvpress's protocol does (tests/test_stages.py)."""


def options_for(name: str) -> dict:
    # L2-norm's uncompressed layers would eat a small test budget; everything else runs on defaults.
    return {"uncompressed_layers": []} if name == "l2norm" else {}


@pytest.mark.parametrize("name", SCORING)
def test_decode_time_eviction_holds_every_head_to_its_allocation(tiny_model, name):
    budget = Budget(unit="tokens", value=12, slack_tokens=2)
    cache = CompressedCache(tiny_model, kvpolicies.get_policy(name, **options_for(name)), budget)
    ids = torch.randint(3, 128, (1, 30))
    with torch.no_grad():
        out = tiny_model(ids, cache=cache)
        for step in range(12):
            out = tiny_model(out.logits[:, -1:].argmax(-1), cache=cache)
            kept = cache.kept_per_head()[:, 0]  # [layers, kv_heads]
            # The budget's own figure, not the cache's: 12 entries per head on average, each head 2 over at most.
            assert int(kept.sum()) <= (12 + 2) * kept.numel() and int(kept.max()) <= 31 + step
    assert cache.get_seq_length() == 42
    assert int(cache.kept_per_head().sum()) <= 8 * 2 * (12 + 2)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", COMPRESSING)
def test_left_padded_batch_keeps_the_same_entries_as_each_sequence_alone(tiny_model, name):
    generator = torch.Generator().manual_seed(11)
    first = torch.randint(3, 128, (1, 36), generator=generator)
    second = torch.randint(3, 128, (1, 25), generator=generator)
    batch = torch.cat([first, torch.cat([torch.zeros(1, 11, dtype=torch.long), second], 1)])
    mask = torch.cat([torch.ones(1, 36), torch.cat([torch.zeros(1, 11), torch.ones(1, 25)], 1)]).long()
    budget = Budget(value=0.4, slack_tokens=0)

    def prefill(ids, attention_mask):
        cache = CompressedCache(tiny_model, kvpolicies.get_policy(name, **options_for(name)), budget)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            tiny_model(ids, attention_mask=attention_mask, position_ids=positions, cache=cache)
            if cache.policy.has_stage:  # it would run before the first decoding step
                cache.after_prefill(tiny_model)
        return cache

    batched = prefill(batch, mask)
    for row, ids in enumerate((first, second)):
        alone = prefill(ids, torch.ones_like(ids))
        for layer_b, layer_a in zip(batched.layers, alone.layers):
            heads = layer_a.num_heads
            runs_b = layer_b.keys.split(layer_b.lengths)[row * heads : (row + 1) * heads]
            for kb, ka in zip(runs_b, layer_a.keys.split(layer_a.lengths)):
                assert kb.shape == ka.shape
                torch.testing.assert_close(kb, ka, atol=1e-4, rtol=1e-4)


class EveryOtherConfig(kvpolicies.PolicyConfig):
    pass


class EveryOther(kvpolicies.Policy):
    """Test plugin: prefers entries at even age ranks."""

    name = "every-other"
    Config = EveryOtherConfig

    def score(self, inputs):
        return (inputs.order % 2 == 0).float()


class TestPlugin:
    @kvpolicies.hookimpl
    def register_policies(self, register):
        register(EveryOther)


@pytest.fixture
def with_test_plugin(fresh_registry):
    kvpolicies.registry.registry().register_plugin(TestPlugin(), name="test-plugin")
    yield


@pytest.mark.slow
def test_equal_budget_across_every_policy_on_the_embedded_model(real_model, with_test_plugin):
    model, tokenizer = real_model
    text = open("evals/prompts/passkey-1k.txt").read()
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    tokens = inputs["input_ids"].shape[1]
    budget = Budget(value=0.25, slack_tokens=0)
    measured = {}
    for info in kvpolicies.list_policies():
        if not info.policy_class.compresses:
            continue
        cache = CompressedCache(model, info.policy_class(), budget, tokenizer=tokenizer)
        with torch.no_grad():
            model(**inputs, cache=cache)
            if cache.policy.has_stage:  # it would run before the first decoding step
                cache.after_prefill(model)
        stats = cache.stats()
        measured[info.name] = (stats.kept_entries, stats.resident_bytes)
    assert "every-other" in measured and {"l2norm", "h2o", "snapkv", "pyramidkv", "headkv", "kvzip"} <= set(measured)
    target_entries = budget.total_entries(tokens, cache.shape)
    target_bytes = target_entries * cache.shape.entry_bytes
    for name, (entries, resident) in measured.items():
        assert entries == target_entries, name
        assert resident == pytest.approx(target_bytes, rel=0.01), name
