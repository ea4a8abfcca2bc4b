"""Budget arithmetic: one total for every policy, honest ranges, never an empty head."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from kvpolicies import Budget, BudgetError, CacheShape

SMOL = CacheShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)

shapes = st.builds(
    CacheShape,
    num_layers=st.integers(1, 40),
    num_kv_heads=st.integers(1, 8),
    head_dim=st.sampled_from([16, 64, 128]),
    dtype_bytes=st.sampled_from([2, 4]),
)


@given(shape=shapes, seq_len=st.integers(1, 5000), fraction=st.floats(0.001, 1.0))
def test_fraction_allocation_sums_to_the_budget_with_at_least_one_entry_per_head(shape, seq_len, fraction):
    allocation = Budget(value=fraction).allocate(seq_len, shape)
    tokens = allocation.tokens
    assert tokens.shape == (shape.num_layers, shape.num_kv_heads)
    assert int(tokens.sum()) == allocation.total
    assert int(tokens.min()) >= 1 and int(tokens.max()) <= seq_len
    assert int(tokens.max()) - int(tokens.min()) <= 1  # uniform: remainders differ by one at most
    wanted = int(fraction * shape.cells * seq_len + 1e-9)
    assert allocation.total == max(min(wanted, shape.cells * seq_len), shape.cells)


@given(shape=shapes, seq_len=st.integers(1, 5000), per_head=st.floats(0.5, 10000))
def test_token_budget_is_an_average_per_kv_head_capped_by_the_sequence(shape, seq_len, per_head):
    allocation = Budget(unit="tokens", value=per_head).allocate(seq_len, shape)
    tokens = allocation.tokens
    expected = min(int(per_head * shape.cells + 1e-9), shape.cells * seq_len)
    assert allocation.total == max(expected, shape.cells)  # at least one entry per head
    assert int(tokens.sum()) == allocation.total
    assert int(tokens.min()) >= 1 and int(tokens.max()) <= seq_len
    assert int(tokens.max()) - int(tokens.min()) <= 1  # uniform: remainders differ by one at most
    if per_head <= seq_len and per_head >= 1:  # the average is what was asked for, to within one entry in total
        assert abs(float(tokens.double().mean()) - per_head) * shape.cells < 1 + 1e-6


@given(shape=shapes, seq_len=st.integers(1, 5000), megabytes=st.floats(0.01, 100))
def test_byte_budget_counts_keys_and_values_per_kv_head(shape, seq_len, megabytes):
    budget = Budget(unit="bytes", value=megabytes * 1e6)
    allocation = budget.allocate(seq_len, shape)
    entries = int(allocation.tokens.sum())
    if entries > shape.cells:  # above the one-per-head floor the bytes bound is exact
        assert entries * shape.entry_bytes <= budget.value
        assert (entries + 1) * shape.entry_bytes > budget.value or entries == shape.cells * seq_len


@given(seq_len=st.integers(1, 4000), fraction=st.floats(0.05, 1.0))
def test_uncompressed_layers_count_against_the_same_total(seq_len, fraction):
    allocation = Budget(value=fraction).allocate(seq_len, SMOL)
    try:
        moved = allocation.with_full_layers([0, 1])
    except BudgetError:
        assert allocation.total < 2 * 3 * seq_len + 28 * 3
        return
    assert int(moved.tokens.sum()) == allocation.total
    assert (moved.tokens[:2] == seq_len).all()
    assert int(moved.tokens[2:].min()) >= 1


def test_budget_at_or_above_the_sequence_is_a_no_op():
    assert (Budget(value=1.0).allocate(100, SMOL).tokens == 100).all()
    assert (Budget.parse("512 tokens").allocate(100, SMOL).tokens == 100).all()
    assert (Budget.parse("1GiB").allocate(100, SMOL).tokens == 100).all()


def test_tiny_budget_never_empties_a_head():
    tokens = Budget(value=1e-6).allocate(50, SMOL).tokens
    assert (tokens == 1).all()


def test_smollm_half_budget_is_half_the_entries():
    allocation = Budget(value=0.5).allocate(2000, SMOL)
    assert allocation.total == 90_000
    assert SMOL.entry_bytes == 512  # 2 x 64 x fp32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"value": 0}, "(0, 1]"),
        ({"value": -0.5}, "(0, 1]"),
        ({"value": 1.5}, "(0, 1]"),
        ({"unit": "tokens", "value": -3}, "must be > 0"),
        ({"unit": "bytes", "value": 0}, "must be > 0"),
        ({"unit": "pages", "value": 3}, "fraction"),
        ({"value": 0.5, "slack_tokens": -1}, "greater than or equal to 0"),
        ({"value": 0.5, "colour": "red"}, "Extra inputs"),
    ],
)
def test_invalid_budgets_name_the_valid_range(kwargs, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace("]", r"\]")):
        Budget(**kwargs)


@pytest.mark.parametrize(
    ("text", "unit", "value"),
    [
        ("0.5", "fraction", 0.5),
        ("25%", "fraction", 0.25),
        ("512 tokens", "tokens", 512),
        ("64tok", "tokens", 64),
        ("2MiB", "bytes", 2 * 2**20),
        ("1e6 bytes", "bytes", 1e6),
        (0.1, "fraction", 0.1),
    ],
)
def test_budget_parse_reads_every_unit(text, unit, value):
    budget = Budget.parse(text)
    assert (budget.unit, budget.value) == (unit, value)


def test_bare_number_above_one_is_rejected_with_the_fix():
    with pytest.raises(BudgetError, match="512 tokens"):
        Budget.parse("512")
    with pytest.raises(BudgetError, match="fraction in"):
        Budget.parse("lots")


@given(
    weights=st.lists(st.floats(0, 100), min_size=1, max_size=60),
    cap=st.integers(1, 500),
    floor=st.integers(0, 20),
    total=st.integers(0, 20000),
)
def test_distribute_respects_floor_cap_and_total(weights, cap, floor, total):
    from kvpolicies.engine.budget import distribute

    shares = distribute(total, torch.tensor(weights), cap=cap, floor=floor)
    low = min(floor, cap)
    assert int(shares.min()) >= low and int(shares.max()) <= cap
    assert int(shares.sum()) == max(min(total, cap * len(weights)), low * len(weights))
    # More weight never means fewer entries (floors and caps being equal).
    order = sorted(range(len(weights)), key=lambda i: weights[i])
    assert all(shares[a] <= shares[b] + 1 for a, b in zip(order, order[1:]))


@given(cells=st.integers(1, 2000), cap=st.integers(0, 200000), total=st.integers(0, 10**8))
def test_spread_is_distribute_with_equal_weights(cells, cap, total):
    """The closed form every uniform allocation takes gives exactly what water filling gives (bit for bit the same
    allocations as before it existed)."""
    from kvpolicies.engine.budget import distribute, spread

    total = min(total, cells * cap + cells + 3)  # around the clamps too
    assert torch.equal(spread(total, cells, cap), distribute(total, torch.ones(cells), cap=cap))


@pytest.mark.parametrize("ratio, kept", [(0, 1.0), (0.1, 0.9), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25),
                                         (0.875, 0.125), (0.9, 0.1), ("0.7", 0.3)])
def test_kvpress_compression_ratio_is_the_fraction_removed_and_round_trips(ratio, kept):
    budget = Budget.from_compression_ratio(ratio, slack_tokens=0)
    assert budget == Budget.parse(kept, slack_tokens=0)  # the same budget, so the same cell, however it is written
    assert budget.compression_ratio == float(ratio)
    assert Budget.from_compression_ratio(budget.compression_ratio, slack_tokens=0) == budget


@pytest.mark.parametrize("ratio", [1, 1.5, -0.1, float("nan"), "most", True, None])
def test_a_compression_ratio_outside_zero_to_one_is_refused_naming_the_convention(ratio):
    with pytest.raises(BudgetError, match=r"compression_ratio .*(\[0, 1\)|fraction of the cache removed)"):
        Budget.from_compression_ratio(ratio)


def test_only_a_fraction_has_a_compression_ratio():
    assert Budget.parse("512 tokens").compression_ratio is None and Budget.parse("64MiB").compression_ratio is None


# -- sliding-window layers -----------------------------------------------------------------------------------------

GEMMA_LIKE = CacheShape(num_layers=6, num_kv_heads=2, head_dim=16, dtype_bytes=2,
                        windows=(512, 512, None, 512, 512, None))


GEMMA_LIKE_KIVI = dataclasses.replace(GEMMA_LIKE, stored_entry_bytes=18, full_precision_entries=159,
                                      window_overhang=31)
"""KIVI's 4 bits on the same shape: an encoded entry in 18 bytes of 64, each head's 128 to 159 newest in full, and
a window's oldest group waiting until all of it slid out (up to 31 entries)."""


@pytest.mark.parametrize("shape", [GEMMA_LIKE, GEMMA_LIKE_KIVI], ids=["full-precision", "kivi4"])
@given(seq_len=st.integers(1, 20000), fraction=st.floats(0.001, 1.0))
def test_windows_kept_whole_hold_their_window_and_full_layers_share_the_rest_or_the_budget_is_refused(shape, seq_len,
                                                                                                      fraction):
    """windows="keep": the full cache is the model's own (windows of W - 1); windows are charged, never cut (and
    under a grouped codec, charged the entries that wait for their group to slide out); the rest is shared. A
    refusal names the smallest budget that fits, which a grouped codec's full-precision newest entries raise."""
    windowed = 4 * 2 * min(seq_len, 511 + shape.window_overhang)
    assert shape.full_entries(seq_len) == 4 * 2 * min(seq_len, 511) + 2 * 2 * seq_len
    try:
        allocation = Budget(value=fraction, windows="keep").allocate(seq_len, shape)
    except BudgetError as error:
        minimum = float(str(error).rsplit("at least ", 1)[1].split()[0])
        assert fraction < minimum and "windows=share" in str(error)
        assert Budget(value=minimum, windows="keep").allocate(seq_len, shape).total >= windowed + 4
        return
    tokens = allocation.tokens
    assert allocation.fixed == (0, 1, 3, 4)
    assert (tokens[list(allocation.fixed)] == min(seq_len, 511 + shape.window_overhang)).all()
    assert int(tokens.sum()) == allocation.total <= shape.most_entries(seq_len)
    assert int(tokens[[2, 5]].min()) >= 1 and int(tokens[[2, 5]].max()) <= seq_len
    if allocation.total > shape.cells:  # above the floor of one entry a head, the bytes fit the budget
        assert shape.most_bytes(allocation.total) <= fraction * shape.full_entries(seq_len) * 64 + 1e-6


def test_the_whole_budget_keeps_all_a_cache_can_hold_a_grouped_codecs_hidden_entries_included():
    full_price = dataclasses.replace(GEMMA_LIKE, full_precision_entries=5, window_overhang=3)  # e.g. exact groups
    for seq_len in (5, 515, 600):
        expected = 4 * 2 * min(seq_len, 511 + 3) + 2 * 2 * seq_len
        assert Budget(value=1.0).total_entries(seq_len, full_price) == full_price.most_entries(seq_len) == expected
        allocation = Budget(value=1.0).allocate(seq_len, full_price)
        assert allocation.tokens.tolist() == [[min(seq_len, 514)] * 2] * 2 + [[seq_len] * 2] + \
            [[min(seq_len, 514)] * 2] * 2 + [[seq_len] * 2]


@given(seq_len=st.integers(1, 20000), fraction=st.floats(0.001, 1.0))
def test_shared_windows_give_every_layer_the_same_share_of_what_the_model_holds_there(seq_len, fraction):
    """windows="share" (the default): any budget fits; each head keeps between 1 and what the model's own cache
    holds in its layer (a window's W - 1), and every layer about the same share of it."""
    allocation = Budget(value=fraction).allocate(seq_len, GEMMA_LIKE)
    tokens, caps = allocation.tokens, allocation.caps
    assert allocation.fixed == () and allocation.held == (min(seq_len, 511),) * 2 + (seq_len,) + (min(seq_len, 511),) * 2 + (seq_len,)
    assert int(tokens.sum()) == allocation.total == max(math.floor(fraction * GEMMA_LIKE.full_entries(seq_len) + 1e-9),
                                                        min(12, GEMMA_LIKE.full_entries(seq_len)))
    assert (tokens >= 1).all() and (tokens <= caps).all()
    # One entry each, then the rest in proportion to what each head's layer holds: off by rounding (and by what a
    # window's W - 1 could not take, under one entry per window head) only.
    exact = 1 + (allocation.total - tokens.numel()) * caps.double() / float(caps.sum() * tokens.shape[1])
    assert ((tokens - exact).abs() < 2).all()


def test_shared_windows_make_every_budget_fit_where_keeping_them_refuses():
    """The issue's case: a Gemma-3-4B shape (34 layers, 29 windowed at 1024) at 4k, and an all-windowed Mistral."""
    gemma3 = CacheShape(num_layers=34, num_kv_heads=4, head_dim=256, dtype_bytes=2,
                        windows=tuple(None if layer % 6 == 5 else 1024 for layer in range(34)))
    mistral = CacheShape(num_layers=4, num_kv_heads=2, head_dim=16, dtype_bytes=2, windows=(4096,) * 4)
    for shape, seq_len in ((gemma3, 4096), (mistral, 8000)):
        for fraction in (0.5, 0.25, 0.125):
            with pytest.raises(BudgetError, match="windows=share"):
                Budget(value=fraction, windows="keep").allocate(seq_len, shape)
            shared = Budget(value=fraction).allocate(seq_len, shape)
            assert int(shared.tokens.sum()) == shared.total <= fraction * shape.full_entries(seq_len)
            windows = list(shape.sliding_layers)
            assert (shared.tokens[windows] < 1023 if shape is gemma3 else shared.tokens < 4095).all()


def test_policies_move_entries_between_full_layers_only_when_windows_are_kept_whole():
    import kvpolicies

    uniform = Budget(value=0.7, windows="keep").allocate(4000, GEMMA_LIKE)
    for name, options in [("pyramidkv", {}), ("l2norm", {"uncompressed_layers": [0, 2]})]:
        policy = kvpolicies.get_policy(name, **options)
        moved = uniform.check(policy.allocate(uniform), AssertionError)  # a breach would fail the test
        assert torch.equal(moved.tokens[list(uniform.fixed)], uniform.tokens[list(uniform.fixed)])
        assert int(moved.tokens.sum()) == uniform.total
    pyramid = kvpolicies.get_policy("pyramidkv").allocate(uniform).tokens
    assert pyramid[2].sum() > pyramid[5].sum()  # the pyramid runs over the full layers
    l2 = kvpolicies.get_policy("l2norm", uncompressed_layers=[0, 2]).allocate(uniform).tokens
    assert (l2[2] == 4000).all()  # layer 0 is windowed: "uncompressed" already


def test_policies_move_shared_window_entries_up_to_the_window_only():
    import kvpolicies

    uniform = Budget(value=0.7).allocate(4000, GEMMA_LIKE)
    for name, options in [("pyramidkv", {}), ("l2norm", {"uncompressed_layers": [0, 2]})]:
        moved = uniform.check(kvpolicies.get_policy(name, **options).allocate(uniform), AssertionError)
        assert int(moved.tokens.sum()) <= uniform.total and (moved.tokens <= moved.caps).all()
    l2 = kvpolicies.get_policy("l2norm", uncompressed_layers=[0, 2]).allocate(uniform).tokens
    assert (l2[0] == 511).all() and (l2[2] == 4000).all()  # a window left whole holds W - 1, as the model does
    pyramid = kvpolicies.get_policy("pyramidkv").allocate(uniform).tokens
    assert (pyramid[:2] == 511).all()  # the lowest layers' large shares stop at the window


def test_a_policy_that_cuts_a_window_is_named_as_the_plugins_fault():
    from functools import partial

    from kvpolicies import Allocation, Policy
    from kvpolicies.errors import PluginError
    from kvpolicies.registry import plugin_fault

    class Greedy(Policy):
        name = "greedy"

    fault = partial(plugin_fault, Greedy)  # what the cache passes: the PluginError of its policy

    uniform = Budget(value=0.3, windows="keep").allocate(4000, GEMMA_LIKE)
    tokens = uniform.tokens.clone()
    tokens[0] -= 100
    tokens[2] += 100
    with pytest.raises(PluginError) as error:
        uniform.check(Allocation(tokens=tokens, seq_len=4000, total=uniform.total), fault)
    for part in ("policy 'greedy'", "allocate()", "sliding-window layers [0]"):  # the window that was cut
        assert part in str(error.value), str(error.value)
    tokens = uniform.tokens.clone()
    tokens[5] -= 100  # the same move between the full layers 5 and 2 is accepted
    tokens[2] += 100
    assert uniform.check(Allocation(tokens=tokens, seq_len=4000, total=uniform.total), fault).fixed == uniform.fixed
    shared = Budget(value=0.3).allocate(4000, GEMMA_LIKE)  # windows share: a window may give, never pass W - 1
    tokens = shared.tokens.clone()
    tokens[0] = 600
    tokens[2] -= 2 * (600 - int(shared.tokens[0, 0]))
    with pytest.raises(PluginError, match="heads of layer 0 .* between 1 and 511"):
        shared.check(Allocation(tokens=tokens, seq_len=4000, total=shared.total), fault)


def test_every_layer_windowed_and_kept_whole_refuses_any_cut_with_the_fix():
    mistral = CacheShape(num_layers=4, num_kv_heads=2, head_dim=16, dtype_bytes=2, windows=(4096,) * 4)
    assert Budget(value=1.0, windows="keep").allocate(2000, mistral).total == 4 * 2 * 2000
    with pytest.raises(BudgetError, match="every layer is windowed.*windows=share"):
        Budget(value=0.5, windows="keep").allocate(2000, mistral)


def test_a_too_small_budget_is_answered_in_its_own_unit():
    with pytest.raises(BudgetError, match=r"at least 341 tokens per KV head for this length"):
        Budget.parse("100 tokens", windows="keep").allocate(4000, GEMMA_LIKE)  # (4 x 511 + 2) x 2 / 12, rounded up
    with pytest.raises(BudgetError, match=r"at least 0\.\d+ of the cache for this length"):
        Budget(value=0.05, windows="keep").allocate(600, GEMMA_LIKE)


def test_the_window_rule_is_read_wherever_a_budget_is_and_a_wrong_one_says_both_choices():
    from kvpolicies.experiments.grid import SweepConfig

    assert Budget.parse("0.5").windows == "share"
    assert Budget.parse("0.5", windows="keep") == Budget(value=0.5, windows="keep")
    assert Budget.parse({"value": 0.5, "windows": "keep"}).windows == "keep"  # a grid file's budget mapping
    with pytest.raises(BudgetError, match="windows=share or windows=keep"):
        Budget.parse("0.5", windows="drop")
    with pytest.raises(BudgetError, match="windows"):
        Budget.parse({"value": 0.5, "windows": "drop"})
    with pytest.raises(ValidationError, match="differ only in how sliding windows take part"):
        SweepConfig(budgets=[0.5, {"value": 0.5, "windows": "keep"}])


def test_a_result_written_before_the_window_rule_reads_as_the_windows_held_whole_it_ran_with():
    from kvpolicies.experiments.grid import Cell
    from kvpolicies.experiments.results import Identity

    old = {"unit": "fraction", "value": 0.5, "slack_tokens": 16}
    assert Identity(model="m", policy={}, budget=old, code_version="v").budget.windows == "keep"
    cell = Cell.model_validate({"model": None, "task": {"name": "kvp_passkey"}, "policy": {"name": "snapkv"},
                                "budget": old, "seed": 0})
    assert cell.budget == Budget(value=0.5, windows="keep")
    assert Identity(model="m", policy={}, budget=old | {"windows": "share"}, code_version="v").budget.windows == "share"
    assert Cell(model=None, task={"name": "kvp_passkey"}, policy={"name": "snapkv"}, budget=0.5,
                seed=0).budget.windows == "share"  # a budget given now takes today's default
