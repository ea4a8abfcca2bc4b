"""Query-aware and query-agnostic compression: what is charged, what is kept, and what differs between them."""

from __future__ import annotations

import pytest
import torch

import kvpolicies
from kvpolicies import Budget, CompressedCache
from kvpolicies.errors import UsageError
from kvpolicies.integrations.protocol import Protocol, question_start
from tests.helpers import tiny_llama

CONTEXT, QUESTION = 160, 8  # SnapKV protects its last 32 entries: the context must leave room to score


def ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 128, (1, CONTEXT + QUESTION), generator=torch.Generator().manual_seed(seed))


def context_keys(cache: CompressedCache) -> list[list[torch.Tensor]]:
    """Per layer and KV head, the keys of the context entries held (the newest QUESTION entries are the question)."""
    return [[keys[:-QUESTION] for _, _, keys, _ in layer.runs()] for layer in cache.layers]


@torch.no_grad()
def run(model, name: str, protocol: Protocol, fraction: float = 0.5) -> CompressedCache:
    options = {"uncompressed_layers": []} if name == "l2norm" else {}
    cache = CompressedCache(model, kvpolicies.get_policy(name, **options), Budget(value=fraction, slack_tokens=0))
    prompt = ids()
    if protocol is Protocol.QUERY_AWARE:  # one prefill: the policy chooses with the question in view
        cache.context_lengths = [CONTEXT]
        model(prompt, cache=cache)
    else:  # the context alone, compressed; then the question on the compressed cache
        model(prompt[:, :CONTEXT], cache=cache)
        cache.context_lengths = [CONTEXT]
        model(prompt[:, CONTEXT:], cache=cache)
    return cache


@pytest.mark.parametrize("protocol", list(Protocol))
def test_the_question_is_kept_whole_and_the_budget_is_a_fraction_of_the_context(protocol):
    model = tiny_llama()
    cache = run(model, "snapkv", protocol)
    allocation = cache.allocation(CONTEXT).tokens
    kept = cache.kept_per_head()[:, 0]
    torch.testing.assert_close(kept, allocation + QUESTION)
    stats = cache.stats()
    assert stats.appended_entries == QUESTION * cache.shape.cells
    assert stats.kept_entries - stats.appended_entries == int(allocation.sum())
    with torch.no_grad():  # decoding adds entries outside the budget too: nothing is evicted after the context
        model(torch.tensor([[9]]), cache=cache)
    assert (cache.kept_per_head()[:, 0] == allocation + QUESTION + 1).all()


@pytest.mark.parametrize("name", ["l2norm", "keydiff", "streaming"])
def test_policies_that_read_no_queries_keep_the_same_context_under_both_protocols(name):
    model = tiny_llama()
    aware, agnostic = (context_keys(run(model, name, protocol)) for protocol in Protocol)
    for layer_aware, layer_agnostic in zip(aware, agnostic):
        for keys_aware, keys_agnostic in zip(layer_aware, layer_agnostic):
            torch.testing.assert_close(keys_aware, keys_agnostic, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["snapkv", "tova"])
def test_attention_based_policies_choose_differently_when_they_see_the_question(name):
    model = tiny_llama()
    aware, agnostic = (context_keys(run(model, name, protocol)) for protocol in Protocol)
    # Query-agnostic is exactly the context compressed alone, as if no question would ever come...
    cache = CompressedCache(model, kvpolicies.get_policy(name), Budget(value=0.5, slack_tokens=0))
    with torch.no_grad():
        model(ids()[:, :CONTEXT], cache=cache)
    alone = [[keys for _, _, keys, _ in layer.runs()] for layer in cache.layers]
    assert all(torch.equal(a, b) for la, lb in zip(agnostic, alone) for a, b in zip(la, lb))
    # ... and with the question in view the same budget keeps other entries, in most layers and heads.
    differ = sum(not torch.equal(a, b) for la, lb in zip(aware, agnostic) for a, b in zip(la, lb))
    assert differ >= len(aware) * len(aware[0]) // 2, differ


def test_question_start_is_the_token_holding_the_markers_last_occurrence():
    text = "ab\nWhat is x? noise \nWhat is the key? The key is"
    tokens = [ord(c) for c in text]
    decode = "".join  # one character per token would hide merges: use two-character tokens instead
    pairs = [text[i : i + 2] for i in range(0, len(text), 2)]
    start = question_start(lambda part: decode(part), pairs, "\nWhat is the key")
    assert "".join(pairs[:start]) == text[: text.rfind("\nWhat is the key") // 2 * 2]
    assert question_start(lambda part: "".join(chr(t) for t in part), tokens, "\nWhat") == text.rfind("\nWhat")
    assert question_start(lambda part: "".join(chr(t) for t in part), tokens, "Question:") is None


def test_unknown_protocols_are_refused_with_the_choices():
    with pytest.raises(UsageError, match="unknown protocol 'agnostic'; use query_aware or query_agnostic"):
        Protocol.parse("agnostic")
    assert Protocol.parse(None) is Protocol.QUERY_AWARE


def test_a_pass_carries_the_split_between_each_context_and_what_follows_it():
    """Read once per forward pass for every layer: real tokens after each sequence's context once the pass is in."""
    from kvpolicies.engine.step import Step

    padded = torch.tensor([[True, True, True], [False, True, True]])
    step = Step.of(2, 3, padded, seen=[10, 5], context_lengths=[11, 20])
    assert step.real == [3, 2] and step.appended == [2, 0]  # 13 real tokens, 11 of them context; 7 of 20
    assert Step.of(2, 1, None, seen=[10, 5]).appended == [0, 0]  # no split: every token is context
