"""Every check the framework makes on a policy plugin: a plugin that breaks a contract is stopped with an error (or a
warning, for registration) that names it and says what was expected.

``score()``'s contract (None, wrong shape, bool, NaN) is checked in test_errors.py; a plugin that fails to import, a
hook that raises and two plugins claiming one name in test_registry.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from pydantic import Field

import kvpolicies
from kvpolicies import (
    Allocation,
    Budget,
    BudgetError,
    CacheShape,
    CompressedCache,
    Policy,
    PolicyConfig,
    PolicyConfigError,
    ScorerWrapper,
)
from kvpolicies.engine.policy import Signal
from kvpolicies.errors import KVPoliciesError, PluginError
from kvpolicies.registry import PluginWarning

PROMPT_TOKENS = 20  # at budget 0.5 on the tiny model: 10 entries per head, 160 in all (8 layers x 2 KV heads)


class SketchConfig(PolicyConfig):
    bias: float = Field(0.0, description="added to every score")
    horizon: float | None = Field(None, description="an optional number")
    layers: tuple[int, ...] = Field((), description="a list of numbers")
    newest_first: bool = Field(False, description="a real yes/no option")


class Sketch(Policy):
    """A plugin as an author would write it: keeps the newest entries. Tests subclass it to break one contract."""

    name = "sketch"
    Config = SketchConfig

    def score(self, inputs):
        return inputs.order.float() + self.config.bias


def allocating(change: Callable[[Allocation], Allocation]) -> Policy:
    """A Sketch whose ``allocate()`` returns ``change(uniform allocation)``."""

    class Allocating(Sketch):
        name = "allocating"

        def allocate(self, allocation):
            return change(allocation)

    return Allocating()


def moved(edit: Callable[[torch.Tensor], None]) -> Callable[[Allocation], Allocation]:
    """An ``allocate()`` body that edits a copy of the tokens in place and keeps ``seq_len`` and ``total``."""

    def change(allocation: Allocation) -> Allocation:
        tokens = allocation.tokens.clone()
        edit(tokens)
        return Allocation(tokens=tokens, seq_len=allocation.seq_len, total=allocation.total)

    return change


def reallocating(change: Callable[[torch.Tensor], object]) -> Policy:
    """A Sketch whose ``reallocate_heads()`` returns ``change(keep)``, ``keep`` being ``[batch, kv_heads]``."""

    class Reallocating(Sketch):
        name = "reallocating"

        def reallocate_heads(self, scores, valid, keep):
            return change(keep.clone())

    return Reallocating()


def prefill(model, policy: Policy) -> CompressedCache:
    """Prefill ``PROMPT_TOKENS`` tokens at half budget: every layer is cut once, through the policy's hooks."""
    cache = CompressedCache(model, policy, Budget(value=0.5, slack_tokens=0))
    with torch.no_grad():
        model(torch.randint(3, 128, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)), cache=cache)
    return cache


# -- allocate(): moves entries between layers and heads, never adds them ----------------------------------------


def test_allocate_that_only_moves_entries_is_accepted(tiny_model):
    def give_layer_0_to_layer_1(tokens):
        tokens[0] -= 5
        tokens[1] += 5

    cache = prefill(tiny_model, allocating(moved(give_layer_0_to_layer_1)))
    kept = cache.kept_per_head()[:, 0]
    assert kept[0].tolist() == [5, 5] and kept[1].tolist() == [15, 15] and int(kept.sum()) == 160


def test_allocate_that_adds_entries_is_refused_with_the_policy_named(tiny_model):
    def one_more(tokens):
        tokens[3, 1] += 1

    message = "policy 'allocating' allocated 161 entries, more than the budget's 160; reallocation must move entries"
    with pytest.raises(BudgetError, match=re.escape(message)):
        prefill(tiny_model, allocating(moved(one_more)))


def test_allocate_that_empties_a_head_is_refused_with_the_policy_named(tiny_model):
    def empty_head(tokens):
        tokens[2, 0] = 0

    message = "policy 'allocating' allocated between 0 and 10 tokens to a head; each head must keep between 1 and 20"
    with pytest.raises(BudgetError, match=re.escape(message)):
        prefill(tiny_model, allocating(moved(empty_head)))


def test_allocate_beyond_the_sequence_length_is_refused_with_the_policy_named(tiny_model):
    def overfill_one_head(tokens):  # the total is unchanged: only the cap per head is broken
        tokens[0, 0] += 11
        tokens[5] -= torch.tensor([5, 6])

    message = "policy 'allocating' allocated between 4 and 21 tokens to a head; each head must keep between 1 and 20"
    with pytest.raises(BudgetError, match=re.escape(message)):
        prefill(tiny_model, allocating(moved(overfill_one_head)))


def test_allocate_cannot_raise_the_budget_by_returning_a_larger_total(tiny_model):
    def doubled(allocation):
        return Allocation(tokens=allocation.tokens * 2, seq_len=allocation.seq_len, total=allocation.total * 2)

    try:
        cache = prefill(tiny_model, allocating(doubled))
    except KVPoliciesError as error:
        assert "'allocating'" in str(error)
    else:
        raise AssertionError(f"kept {cache.stats().kept_entries} entries at a budget of 160")


@pytest.mark.parametrize(
    "change",
    [
        lambda allocation: Allocation(tokens=allocation.tokens[:4], seq_len=allocation.seq_len, total=allocation.total),
        lambda allocation: Allocation(tokens=torch.ones(16, 2, dtype=torch.long), seq_len=allocation.seq_len,
                                      total=allocation.total),
        lambda allocation: allocation.tokens,
        lambda allocation: None,
    ],
    ids=["fewer-layers", "more-layers", "a-tensor", "none"],
)
def test_allocate_that_returns_the_wrong_shape_or_type_is_refused_with_the_policy_named(tiny_model, change):
    try:
        prefill(tiny_model, allocating(change))
    except KVPoliciesError as error:
        assert "'allocating'" in str(error)
    except Exception as error:
        raise AssertionError(f"{type(error).__name__}: {error}") from error
    else:
        raise AssertionError("accepted")


# -- reallocate_heads(): moves entries between the heads of one layer -------------------------------------------


def test_reallocate_heads_that_only_moves_entries_is_accepted(tiny_model):
    cache = prefill(tiny_model, reallocating(lambda keep: keep + torch.tensor([[6, -6]])))
    assert cache.kept_per_head()[:, 0].tolist() == [[16, 4]] * 8


def test_reallocate_heads_that_adds_entries_is_refused_with_the_policy_named(tiny_model):
    message = ("policy 'reallocating': reallocate_heads() must return [batch, kv_heads] with at most the allocated "
               "entries per sequence ([20]), got [21]")
    with pytest.raises(PolicyConfigError, match=re.escape(message)):
        prefill(tiny_model, reallocating(lambda keep: keep + torch.tensor([[1, 0]])))


def test_reallocate_heads_that_empties_a_head_is_refused_with_the_policy_named(tiny_model):
    with pytest.raises(PolicyConfigError, match=re.escape("policy 'reallocating': reallocate_heads() left a head "
                                                          "with no entry")):
        prefill(tiny_model, reallocating(lambda keep: keep * torch.tensor([[0, 1]])))


def test_reallocate_heads_that_gives_a_head_more_than_it_holds_is_refused_not_silently_unspent(tiny_model):
    class Overfilling(Sketch):
        name = "overfilling"

        def reallocate_heads(self, scores, valid, keep):
            held = valid.sum(-1)
            if bool((held == held[:, :1]).all()):  # the prefill: every head holds the prompt; move 5 to head 0
                return keep + torch.tensor([[5, -5]])
            return torch.stack([torch.ones_like(keep[:, 0]), keep.sum(-1) - 1], -1)  # all to head 1, which holds 6

    cache = prefill(tiny_model, Overfilling())
    assert cache.kept_per_head()[0, 0].tolist() == [15, 5]
    with pytest.raises(PolicyConfigError, match=r"policy 'overfilling': reallocate_heads\(\) gave KV head 1 of "
                                                r"sequence 0 \d+ entries, but it holds 6"):
        with torch.no_grad():
            tiny_model(torch.tensor([[7]]), cache=cache)


def test_scores_on_another_device_than_the_cache_are_a_contract_error_naming_the_policy(tiny_model):
    class Elsewhere(Sketch):
        name = "elsewhere"

        def score(self, inputs):  # scores on another device than the cache's (a CPU copy, on a GPU cache)
            return torch.empty(inputs.valid.shape, device="meta")

    with pytest.raises(PolicyConfigError, match=r"policy 'elsewhere': score\(\) returned scores on meta, the cache "
                                                r"is on cpu"):
        prefill(tiny_model, Elsewhere())


def test_reallocate_heads_of_the_wrong_shape_is_refused_with_the_policy_named(tiny_model):
    message = "policy 'reallocating': reallocate_heads() must return [batch, kv_heads]"
    with pytest.raises(PolicyConfigError, match=re.escape(message)):
        prefill(tiny_model, reallocating(lambda keep: keep[:, :1]))


@pytest.mark.parametrize("change", [lambda keep: keep.tolist(), lambda keep: None, lambda keep: keep.float() * 0.9],
                         ids=["a-list", "none", "floats"])
def test_reallocate_heads_that_returns_no_tensor_is_refused_with_the_policy_named(tiny_model, change):
    try:
        prefill(tiny_model, reallocating(change))
    except KVPoliciesError as error:
        assert "'reallocating'" in str(error)
    except Exception as error:
        raise AssertionError(f"{type(error).__name__}: {error}") from error
    else:
        raise AssertionError("accepted")


# -- the budget a plugin's allocate() builds on -----------------------------------------------------------------


def test_uncompressed_layers_that_take_the_whole_budget_are_refused_with_the_budget_needed():
    shape = CacheShape(num_layers=8, num_kv_heads=2, head_dim=16, dtype_bytes=4)
    with pytest.raises(BudgetError, match=r"leaving layers \[0, 1\] uncompressed already takes 400 of them for a "
                                          r"100-token sequence; raise the budget to at least 0\.25\d of the cache"):
        Budget(value=0.1).allocate(100, shape).with_full_layers([0, 1])


@pytest.mark.parametrize(("seq_len", "num_layers"), [(100, 8), (2000, 30)])
def test_the_budget_suggested_for_uncompressed_layers_is_enough(seq_len, num_layers):
    shape = CacheShape(num_layers=num_layers, num_kv_heads=3, head_dim=16, dtype_bytes=4)
    with pytest.raises(BudgetError) as error:
        Budget(value=0.01).allocate(seq_len, shape).with_full_layers([0, 1])
    suggested = float(re.search(r"at least ([0-9.]+) of the cache", str(error.value)).group(1))
    allocation = Budget(value=suggested).allocate(seq_len, shape).with_full_layers([0, 1])
    assert (allocation.tokens[:2] == seq_len).all()


# -- options: Policy(config) / Policy(**options) ----------------------------------------------------------------


def test_a_config_object_and_options_together_are_refused():
    with pytest.raises(PolicyConfigError, match=re.escape("policy 'sketch': pass either a config object or keyword "
                                                          "options, not both")):
        Sketch(SketchConfig(bias=1.0), window_tokens=2)


def test_a_config_object_of_another_class_is_refused_with_the_expected_class_named():
    with pytest.raises(PolicyConfigError, match="policy 'sketch' expects a SketchConfig, got PolicyConfig"):
        Sketch(PolicyConfig(window_tokens=2))
    assert Sketch(SketchConfig(bias=1.0)).config.bias == 1.0  # its own config class is taken as given


def test_unknown_options_are_refused_with_every_valid_option_listed():
    message = ("policy 'sketch' has no option 'colour', 'window'; valid options: sink_tokens, window_tokens, bias, "
               "horizon, layers, newest_first")
    with pytest.raises(PolicyConfigError, match=re.escape(message)):
        Sketch(window=4, colour="red")


def test_an_option_of_the_wrong_type_is_refused_with_the_option_named():
    with pytest.raises(PolicyConfigError, match=r"policy 'sketch': invalid option \(bias: .*number"):
        Sketch(bias="high")


@pytest.mark.parametrize(("option", "value"), [("bias", True), ("horizon", False), ("layers", [0, True]),
                                               ("sink_tokens", True)])
def test_booleans_are_refused_for_a_plugins_number_options(option, value):
    """pydantic would read True as 1; the check covers a plugin's own fields, optional numbers and lists of them."""
    with pytest.raises(PolicyConfigError, match=re.escape(f"{option} takes a number, got {value!r}")):
        Sketch(**{option: value})
    assert Sketch(newest_first=True).config.newest_first is True  # a real yes/no option still takes a bool


def test_a_policy_without_score_is_named_when_the_cache_needs_its_scores(tiny_model):
    class Unfinished(Policy):
        name = "unfinished"

    with pytest.raises(PluginError, match=r"raised NotImplementedError in score\(\): policy 'unfinished' does not "
                                          r"implement score\(\)") as error:
        prefill(tiny_model, Unfinished())
    assert isinstance(error.value.__cause__, NotImplementedError)


# -- wrappers ---------------------------------------------------------------------------------------------------


class RescaledConfig(kvpolicies.WrapperConfig):
    scorer: str = "l2norm"


class Rescaled(ScorerWrapper):
    """A third-party wrapper: any scorer's ranking, its own allocation."""

    name = "rescaled"
    Config = RescaledConfig


def test_a_wrapper_configured_with_the_reference_policy_as_scorer_is_refused():
    assert Rescaled().scorer.name == "l2norm"
    message = "policy 'rescaled' cannot use 'full' as its scorer: it keeps everything"
    with pytest.raises(PolicyConfigError, match=message):
        Rescaled(scorer="full")


# -- registration -----------------------------------------------------------------------------------------------


class Nameless(Policy):
    """A policy whose author forgot ``name``."""

    def score(self, inputs):
        return inputs.order.float()


def register_test_plugin(*policies: object) -> None:
    """Register a plugin (named 'guarded') whose hook registers ``policies``, the registry being fresh."""

    class Plugin:
        @kvpolicies.hookimpl
        def register_policies(self, register):
            for policy in policies:
                register(policy)

    kvpolicies.registry.registry().register_plugin(Plugin(), name="guarded")


@pytest.mark.parametrize(
    ("registered", "shown"),
    [(Sketch(), re.escape(repr(Sketch()))), ("sketch", "'sketch'"), (PolicyConfig, r"<class '.*\.PolicyConfig'>")],
    ids=["an-instance", "a-name", "another-class"],
)
def test_register_with_anything_but_a_policy_class_skips_the_plugin_with_a_warning(fresh_registry, registered, shown):
    register_test_plugin(Sketch, registered)
    with pytest.warns(PluginWarning, match=r"plugin 'guarded' failed while registering policies and was skipped: "
                                           rf"TypeError: register\(\) takes a kvpolicies.Policy subclass, got {shown}"):
        names = {info.name for info in kvpolicies.list_policies()}
    assert "sketch" not in names and {"l2norm", "random"} <= names  # only the faulty plugin is skipped


def test_register_a_policy_without_a_name_skips_the_plugin_with_a_warning(fresh_registry):
    register_test_plugin(Sketch, Nameless)
    with pytest.warns(PluginWarning, match=r"plugin 'guarded' failed while registering policies and was skipped: "
                                           r"TypeError: Nameless has no `name`"):
        names = {info.name for info in kvpolicies.list_policies()}
    assert "sketch" not in names and {"l2norm", "random"} <= names


def test_a_well_formed_test_plugin_registers(fresh_registry):
    """The control for the two tests above: the same plugin without the faulty registration is listed."""
    register_test_plugin(Sketch)
    assert kvpolicies.get_policy("sketch", bias=2.0).config.bias == 2.0


# -- hooks that edit what they are handed in place cannot move the bar they are checked against ------------------


def test_allocate_that_raises_the_total_of_the_allocation_it_was_handed_is_refused(tiny_model):
    def inflate(allocation):
        allocation.total = 10**6
        allocation.tokens.fill_(allocation.seq_len)
        return allocation

    with pytest.raises(BudgetError, match="policy 'allocating' allocated .* more than the budget's"):
        prefill(tiny_model, allocating(inflate))


def test_reallocate_heads_that_raises_the_allocation_in_place_is_refused(tiny_model):
    class Inflating(Sketch):
        name = "inflating"

        def reallocate_heads(self, scores, valid, keep):
            keep.add_(50)
            return keep

    with pytest.raises(PolicyConfigError, match="'inflating': reallocate_heads\\(\\) must return"):
        prefill(tiny_model, Inflating())


def test_a_policy_that_edits_its_inputs_in_place_is_refused_before_the_model_reads_them(tiny_model):
    class Scribbler(Sketch):
        name = "scribbler"
        needs = frozenset({Signal.KEYS})

        def score(self, inputs):
            inputs.keys.zero_()  # would reach the next attention: on a dense layer the keys are the cache's storage
            return inputs.order.float()

    with pytest.raises(PluginError, match=r"policy 'scribbler' \(class .*Scribbler of module tests.test_plugin_guards, "
                                          r"not a registered plugin\) edited inputs.keys in place in score\(\)"):
        prefill(tiny_model, Scribbler())
