"""Signals: computed only when declared, and equal to a slow explicit reference."""

from __future__ import annotations

import torch

import kvpolicies
from kvpolicies import CompressedCache, Policy, PolicyConfig, Signal
from kvpolicies.engine.selection import age_order
from kvpolicies.engine.signals import attention_received
from tests.helpers import attention_received_by_loops


def test_attention_received_matches_explicit_softmax_with_padding_and_gqa():
    torch.manual_seed(0)
    query = torch.randn(2, 6, 5, 8)
    keys = torch.randn(2, 2, 9, 8)
    valid = torch.ones(2, 2, 9, dtype=torch.bool)
    valid[1, :, :3] = False  # left padding in the second sequence
    got = attention_received(query, keys, valid, age_order(valid), scaling=8**-0.5, chunk=2)
    want = attention_received_by_loops(query, keys, 8**-0.5, valid)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Each (query, query head) distributes one unit of attention: 5 queries x 3 heads per KV head.
    torch.testing.assert_close(got.sum(-1), torch.full((2, 2), 15.0))


class Recorder(Policy):
    """Test policy that records the signals it was given."""

    name = "recorder"
    Config = PolicyConfig
    seen: list = []

    def score(self, inputs):
        type(self).seen.append(inputs)
        return torch.zeros(inputs.valid.shape)


def run_recorder(model, needs):
    Recorder.needs = frozenset(needs)
    Recorder.seen = []
    cache = CompressedCache(model, Recorder(), 0.5)
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 20)), cache=cache)
    return Recorder.seen


def test_undeclared_signals_are_never_computed(tiny_model):
    for inputs in run_recorder(tiny_model, []):
        assert inputs.keys is None and inputs.values is None and inputs.queries is None and inputs.attention is None
    everything = run_recorder(tiny_model, [Signal.KEYS, Signal.VALUES, Signal.QUERIES, Signal.ATTENTION])
    assert len(everything) == 8  # one eviction per layer at prefill
    first = everything[0]
    assert first.keys.shape == first.values.shape == (1, 2, 20, 16)
    assert first.queries.shape == (1, 6, 20, 16)
    assert first.attention.shape == (1, 2, 20)
    torch.testing.assert_close(first.attention.sum(-1), torch.full((1, 2), 60.0))  # 20 queries x 3 heads


def test_string_policy_names_are_accepted_by_the_cache(tiny_model):
    cache = CompressedCache(tiny_model, "streaming", "25%")
    assert isinstance(cache.policy, kvpolicies.Policy) and cache.policy.name == "streaming"
