"""One prefill, many caches: a cache replayed from a captured prefill is the cache the prefill itself leaves."""

from __future__ import annotations

import pytest
import torch

import kvpolicies
from kvpolicies import CompressedCache
from kvpolicies.engine.replay import capture, replay
from tests.architectures import ARCHITECTURES, build
from tests.helpers import tiny_llama
from tests.test_grouped_codecs import GlobalNorm, SmallKivi


def state(cache: CompressedCache) -> list[dict]:
    """Everything a cache's layers hold, to compare two caches exactly."""
    found = []
    for layer in cache.layers:
        held = {name: t.clone() for name, t in layer.tracks().items()}
        held["lengths"] = list(layer.lengths) if layer.packed else None
        held["seen"] = list(layer.seen)
        held["logical"] = layer.logical_length
        found.append(held)
    return found


def assert_same(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for one, other in zip(first, second):
        assert one.keys() == other.keys()
        for name, value in one.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other[name]), name
            else:
                assert value == other[name], name


def decoded(model, cache: CompressedCache, first: torch.Tensor, steps: int = 4, mask: torch.Tensor | None = None):
    """Greedy steps from ``first`` (``[batch, 1]``): every step's logits."""
    logits, token = [], first
    for _ in range(steps):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(token, cache=cache, attention_mask=mask).logits[:, -1]
        logits.append(out)
        token = out.argmax(-1, keepdim=True)
    return torch.stack(logits)


def prompt(batch: int = 1, length: int = 48, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def alone_and_replayed(model, build_cache, ids, mask=None, context_lengths=None):
    """The cache a forward leaves and the one replayed from its capture, with the forward's last logits."""
    forward = {} if mask is None else {"attention_mask": mask}
    alone = build_cache()
    alone.context_lengths = context_lengths
    with torch.no_grad():
        logits = model(ids, cache=alone, logits_to_keep=1, **forward).logits
    prefill = capture(model, ids, **forward)
    replayed = build_cache()
    replayed.context_lengths = context_lengths
    replay(prefill, replayed)
    assert torch.equal(prefill.logits, logits)  # the prompt's last logits are the policy's business of no one
    return alone, replayed, logits


@torch.no_grad()
@pytest.mark.parametrize("policy", sorted(info.name for info in kvpolicies.list_policies()))
def test_every_policy_replayed_keeps_what_its_own_prefill_keeps_and_decodes_alike(policy):
    model = tiny_llama()
    ids = prompt()
    alone, replayed, logits = alone_and_replayed(model, lambda: CompressedCache(model, policy, 0.4), ids)
    assert_same(state(alone), state(replayed))
    first = logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(decoded(model, alone, first), decoded(model, replayed, first))
    assert_same(state(alone), state(replayed))  # decode-time eviction alike too


@torch.no_grad()
@pytest.mark.parametrize("codec", ["int4", "kivi", "think"])
def test_a_replayed_cache_stores_with_its_codec_as_its_own_prefill_does(codec):
    from tests.test_grouped_codecs import SmallThinK

    model = tiny_llama()
    made = {"int4": lambda: "int4", "kivi": SmallKivi, "think": SmallThinK}[codec]
    alone, replayed, logits = alone_and_replayed(model, lambda: CompressedCache(model, "snapkv", 0.4, codec=made()),
                                                 prompt())
    assert_same(state(alone), state(replayed))
    first = logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(decoded(model, alone, first), decoded(model, replayed, first))


@torch.no_grad()
def test_an_after_prefill_stage_and_a_question_kept_whole_replay_alike():
    model = tiny_llama()
    ids = prompt(length=56)
    for build_cache in (lambda: CompressedCache(model, GlobalNorm(), 0.4),
                        lambda: CompressedCache(model, "snapkv", 0.4)):
        alone, replayed, logits = alone_and_replayed(model, build_cache, ids, context_lengths=[40])
        first = logits[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(decoded(model, alone, first), decoded(model, replayed, first))  # the stage runs here
        assert_same(state(alone), state(replayed))


@torch.no_grad()
def test_a_left_padded_batch_replays_alike():
    model = tiny_llama()
    ids = prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    alone, replayed, logits = alone_and_replayed(model, lambda: CompressedCache(model, "headkv", 0.4), ids, mask)
    assert_same(state(alone), state(replayed))
    first = logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(decoded(model, alone, first, mask=mask), decoded(model, replayed, first, mask=mask))


@torch.no_grad()
@pytest.mark.parametrize("name", ["gemma3", "gemma2"])
def test_sliding_windows_replay_alike(name):
    model = build(ARCHITECTURES[name])  # windows of WINDOW tokens, Gemma 2 soft-capped and eager
    ids = prompt(length=160) % model.config.vocab_size
    alone, replayed, logits = alone_and_replayed(model, lambda: CompressedCache(model, "snapkv", 0.5), ids)
    assert_same(state(alone), state(replayed))
    first = logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(decoded(model, alone, first), decoded(model, replayed, first))


def test_a_capture_is_replayed_into_empty_caches_of_its_model_only():
    model = tiny_llama()
    prefill = capture(model, prompt())
    assert prefill.nbytes > 8 * 2 * 2 * 48 * 16 * 4  # every layer's keys and values, and more
    cache = CompressedCache(model, "snapkv", 0.4)
    replay(prefill, cache)
    with pytest.raises(ValueError, match="starts from an empty cache"):
        replay(prefill, cache)
    with pytest.raises(ValueError, match="the prefill has 8 layers and the cache 4"):
        replay(prefill, CompressedCache(tiny_llama(num_layers=4), "snapkv", 0.4))
