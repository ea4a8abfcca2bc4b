"""Built-in policies on hand-made tensors: each keeps exactly what its docstring says."""

from __future__ import annotations

import torch

import kvpolicies
from kvpolicies import ScoreInputs
from kvpolicies.engine.selection import select
from tests.helpers import score_inputs


def kept_positions(policy, inputs: ScoreInputs, keep: int) -> list[list[list[int]]]:
    scores = policy.score(inputs)
    keep_n = torch.full(inputs.valid.shape[:2], keep)
    mask = select(scores, inputs.valid, keep_n, *policy.protected)
    return [[row.nonzero().flatten().tolist() for row in heads] for heads in mask]


def keys_with_norms(norms: list[list[float]], head_dim: int = 4) -> torch.Tensor:
    """``[1, heads, seq, head_dim]`` keys whose L2 norms are exactly ``norms`` (one direction per entry)."""
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(len(norms), len(norms[0]), head_dim), dim=-1)
    return (directions * torch.tensor(norms)[..., None])[None]


def test_l2_keeps_lowest_norm_keys():
    keys = keys_with_norms([[5.0, 1.0, 3.0, 0.5, 4.0, 2.0], [0.1, 9.0, 8.0, 7.0, 0.2, 0.3]])
    policy = kvpolicies.get_policy("l2norm")
    assert kept_positions(policy, score_inputs(keys), keep=3) == [[[1, 3, 5], [0, 4, 5]]]


def test_l2_keep_highest_ablation_keeps_highest_norm_keys():
    keys = keys_with_norms([[5.0, 1.0, 3.0, 0.5, 4.0, 2.0]])
    policy = kvpolicies.get_policy("l2norm", keep_highest=True)
    assert kept_positions(policy, score_inputs(keys), keep=2) == [[[0, 4]]]


def test_l2_ties_keep_the_older_entry_deterministically():
    # Same direction, so the norms tie exactly, as they often do in bf16.
    keys = (torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 3.0])[:, None] * torch.full((4,), 0.5)).to(torch.bfloat16)[None, None]
    policy = kvpolicies.get_policy("l2norm")
    assert kept_positions(policy, score_inputs(keys), keep=2) == [[[1, 2]]]
    assert all(kept_positions(policy, score_inputs(keys), keep=3) == [[[1, 2, 3]]] for _ in range(5))


def test_l2_never_keeps_padding_even_with_the_lowest_norm():
    keys = keys_with_norms([[0.0, 0.0, 5.0, 1.0, 3.0, 2.0]])
    valid = torch.tensor([[[False, False, True, True, True, True]]])
    policy = kvpolicies.get_policy("l2norm")
    assert kept_positions(policy, score_inputs(keys, valid=valid), keep=2) == [[[3, 5]]]
    assert kept_positions(policy, score_inputs(keys, valid=valid), keep=10) == [[[2, 3, 4, 5]]]


def test_l2_skips_the_first_layers_and_pays_for_them_elsewhere():
    from kvpolicies import Budget, CacheShape

    shape = CacheShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    policy = kvpolicies.get_policy("l2norm")
    allocation = policy.allocate(Budget(value=0.5).allocate(1000, shape))
    assert (allocation.tokens[:2] == 1000).all()
    assert int(allocation.tokens.sum()) == 45_000
    assert int(allocation.tokens[2:].max()) == 465  # (45000 - 6000) / 84 heads, rounded up for the remainder


def test_streaming_keeps_sinks_then_the_most_recent():
    keys = torch.randn(1, 2, 10, 4)
    policy = kvpolicies.get_policy("streaming", sink_tokens=2)
    assert kept_positions(policy, score_inputs(keys), keep=5) == [[[0, 1, 7, 8, 9], [0, 1, 7, 8, 9]]]


def test_streaming_sinks_count_real_tokens_not_padding():
    keys = torch.randn(1, 1, 8, 4)
    valid = torch.tensor([[[False, False, False, True, True, True, True, True]]])
    policy = kvpolicies.get_policy("streaming", sink_tokens=1)
    assert kept_positions(policy, score_inputs(keys, valid=valid), keep=3) == [[[3, 6, 7]]]


def test_window_and_sinks_are_protected_for_any_policy():
    keys = keys_with_norms([[0.1, 0.2, 0.3, 9.0, 9.0, 9.0, 9.0, 9.0]])
    policy = kvpolicies.get_policy("l2norm", sink_tokens=1, window_tokens=2)
    # Sink 0 and window 6, 7 are forced in; the one scored slot goes to the lowest norm left (position 1).
    assert kept_positions(policy, score_inputs(keys), keep=4) == [[[0, 1, 6, 7]]]
    # A budget smaller than sinks + window keeps sinks first, then the newest.
    assert kept_positions(policy, score_inputs(keys), keep=2) == [[[0, 7]]]


def test_random_is_reproducible_per_seed_and_independent_of_padding():
    keys = torch.randn(1, 2, 12, 4)
    policy = kvpolicies.get_policy("random", seed=7)
    first = kept_positions(policy, score_inputs(keys), keep=4)
    assert first == kept_positions(policy, score_inputs(keys), keep=4)
    assert first != kept_positions(kvpolicies.get_policy("random", seed=8), score_inputs(keys), keep=4)
    padded_keys = torch.cat([torch.zeros(1, 2, 3, 4), keys], dim=2)
    valid = torch.cat([torch.zeros(1, 2, 3, dtype=torch.bool), torch.ones(1, 2, 12, dtype=torch.bool)], dim=2)
    shifted = kept_positions(policy, score_inputs(padded_keys, valid=valid), keep=4)
    assert shifted == [[[p + 3 for p in head] for head in first[0]]]


def random_kept_masks(policy, layers: int = 200, seq: int = 100, keep: int = 25) -> torch.Tensor:
    """``[layers, seq]`` bool: what ``policy`` keeps of one head in each of ``layers`` layers (one draw each)."""
    keys = torch.randn(1, 1, seq, 4)
    valid = torch.ones(1, 1, seq, dtype=torch.bool)
    return torch.stack([select(policy.score(score_inputs(keys, layer_idx=layer)), valid, torch.tensor([[keep]]))[0, 0]
                        for layer in range(layers)])


def test_random_keeps_each_entry_about_as_often_as_the_budget_says():
    """200 layers each keep 25 of 100 entries: every entry should be kept in about 50 of them, whatever its age.

    (The mean count is 50 by construction, since select() keeps exactly 25 per draw; the spread is what tells a
    uniform draw from a biased one.)
    """
    counts = random_kept_masks(kvpolicies.get_policy("random")).sum(0).double()
    # Per entry: 200 draws of probability 1/4, so 50 +- 6 (variance 200 x 1/4 x 3/4 = 37.5).
    assert counts.min() > 20 and counts.max() < 85  # no entry always or never kept
    chi_squared = float(((counts - 50) ** 2 / 37.5).sum())  # ~ chi-squared with 99 degrees of freedom if uniform
    assert chi_squared < 150  # P(> 150) < 0.001 for a uniform draw
    older, newer = float(counts[:50].sum()), float(counts[50:].sum())
    assert abs(older - newer) < 200  # no age bias: each half is kept 2500 +- 31 times


def test_random_draws_each_layer_independently():
    masks = random_kept_masks(kvpolicies.get_policy("random"))
    shared = (masks[1:] & masks[:-1]).sum(-1).double()  # entries two neighbouring layers both keep
    assert 4 < float(shared.mean()) < 9  # independent draws share 25 x 25/100 = 6.25 of their 25 on average
    assert int(shared.max()) < 25  # never the same set twice in a row


def test_full_policy_never_evicts(tiny_model):
    cache = kvpolicies.CompressedCache(tiny_model, kvpolicies.get_policy("full"), 0.1)
    with torch.no_grad():
        tiny_model(torch.randint(3, 128, (1, 50)), cache=cache)
    stats = cache.stats()
    assert stats.kept_entries == stats.full_entries and stats.resident_bytes == stats.full_bytes
