"""Every check the framework makes on a policy plugin: a plugin that breaks a contract is stopped with an error (or a
warning, for registration) that names it and says what was expected. A hook's broken contract is the plugin's fault,
a :class:`PluginError`; the user's own mistakes (options, a budget too small for them) keep their own errors.

Messages are checked for what they must name (the policy, the hook, the offending numbers), not word for word.
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


def shows(message: str, *parts: str) -> None:
    """Assert that ``message`` shows each of ``parts`` as a whole (``"16"`` is not found in ``"160"``)."""
    for part in parts:
        assert re.search(rf"(?<![\w.]){re.escape(part)}(?![\w])", message), f"{part!r} not in: {message}"


def blames(error: pytest.ExceptionInfo, policy: str, hook: str, *parts: str) -> None:
    """Assert that ``error`` is a PluginError blaming ``policy`` for what its ``hook`` did, showing ``parts``."""
    assert error.type is PluginError, f"{error.type.__name__}: {error.value}"
    shows(str(error.value), f"policy {policy!r}", f"{hook}()", *parts)


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

    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, allocating(moved(one_more)))
    blames(error, "allocating", "allocate", "161", "160")  # allocated, and the budget


def test_allocate_that_empties_a_head_is_refused_with_the_policy_named(tiny_model):
    def empty_head(tokens):
        tokens[2, 0] = 0

    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, allocating(moved(empty_head)))
    blames(error, "allocating", "allocate", "0", "20")  # the empty head, and the sequence length


def test_allocate_beyond_the_sequence_length_is_refused_with_the_policy_named(tiny_model):
    def overfill_one_head(tokens):  # the total is unchanged: only the cap per head is broken
        tokens[0, 0] += 11
        tokens[5] -= torch.tensor([5, 6])

    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, allocating(moved(overfill_one_head)))
    blames(error, "allocating", "allocate", "21", "20")  # the overfilled head, and the sequence length


def test_allocate_cannot_raise_the_budget_by_returning_a_larger_total(tiny_model):
    def doubled(allocation):
        return Allocation(tokens=allocation.tokens * 2, seq_len=allocation.seq_len, total=allocation.total * 2)

    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, allocating(doubled))
    blames(error, "allocating", "allocate", "320", "160")  # checked against the budget's total, not the returned one


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        (lambda allocation: Allocation(tokens=allocation.tokens[:4], seq_len=allocation.seq_len,
                                       total=allocation.total), ["[4, 2]", "[8, 2]"]),
        (lambda allocation: Allocation(tokens=torch.ones(16, 2, dtype=torch.long), seq_len=allocation.seq_len,
                                       total=allocation.total), ["[16, 2]", "[8, 2]"]),
        (lambda allocation: Allocation(tokens=allocation.tokens.float(), seq_len=allocation.seq_len,
                                       total=allocation.total), ["torch.float32"]),
        (lambda allocation: allocation.tokens, ["Tensor"]),
        (lambda allocation: None, ["NoneType"]),
    ],
    ids=["fewer-layers", "more-layers", "float-tokens", "a-tensor", "none"],
)
def test_allocate_that_returns_the_wrong_shape_or_type_is_refused_with_the_policy_named(tiny_model, change, shown):
    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, allocating(change))
    blames(error, "allocating", "allocate", *shown)


# -- reallocate_heads(): moves entries between the heads of one layer -------------------------------------------


def test_reallocate_heads_that_only_moves_entries_is_accepted(tiny_model):
    cache = prefill(tiny_model, reallocating(lambda keep: keep + torch.tensor([[6, -6]])))
    assert cache.kept_per_head()[:, 0].tolist() == [[16, 4]] * 8


def test_reallocate_heads_that_adds_entries_is_refused_with_the_policy_named(tiny_model):
    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, reallocating(lambda keep: keep + torch.tensor([[1, 0]])))
    blames(error, "reallocating", "reallocate_heads", "[21]", "[20]")  # returned per sequence, and allocated


def test_reallocate_heads_that_empties_a_head_is_refused_with_the_policy_named(tiny_model):
    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, reallocating(lambda keep: keep * torch.tensor([[0, 1]])))
    blames(error, "reallocating", "reallocate_heads", "head 0", "0 entries")


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
    with pytest.raises(KVPoliciesError) as error, torch.no_grad():
        tiny_model(torch.tensor([[7]]), cache=cache)
    blames(error, "overfilling", "reallocate_heads", "head 1", "6")  # the head, and what it holds


def test_scores_on_another_device_than_the_cache_are_a_contract_error_naming_the_policy(tiny_model):
    class Elsewhere(Sketch):
        name = "elsewhere"

        def score(self, inputs):  # scores on another device than the cache's (a CPU copy, on a GPU cache)
            return torch.empty(inputs.valid.shape, device="meta")

    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, Elsewhere())
    blames(error, "elsewhere", "score", "meta", "cpu")


def test_reallocate_heads_of_the_wrong_shape_is_refused_with_the_policy_named(tiny_model):
    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, reallocating(lambda keep: keep[:, :1]))
    blames(error, "reallocating", "reallocate_heads", "[1, 1]", "[1, 2]")  # returned, and expected


@pytest.mark.parametrize(("change", "shown"), [(lambda keep: keep.tolist(), "list"), (lambda keep: None, "NoneType"),
                                               (lambda keep: keep.float() * 0.9, "torch.float32")],
                         ids=["a-list", "none", "floats"])
def test_reallocate_heads_that_returns_no_tensor_is_refused_with_the_policy_named(tiny_model, change, shown):
    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, reallocating(change))
    blames(error, "reallocating", "reallocate_heads", shown, "[1, 2]")  # what it returned, and the shape expected


# -- the budget a plugin's allocate() builds on -----------------------------------------------------------------


def test_uncompressed_layers_that_take_the_whole_budget_are_refused_with_the_budget_needed():
    shape = CacheShape(num_layers=8, num_kv_heads=2, head_dim=16, dtype_bytes=4)
    with pytest.raises(BudgetError) as error:
        Budget(value=0.1).allocate(100, shape).with_full_layers([0, 1])
    shows(str(error.value), "[0, 1]", "160", "400")  # the layers, the budget's entries, and what they take
    assert re.search(r"0\.25\d", str(error.value))  # the budget that fits: (400 + 6 x 2) / 1600, rounded up


def test_a_budget_too_small_for_the_users_uncompressed_layers_stays_a_budget_error_not_the_plugins(tiny_model):
    """The user asked for more than the budget holds: not the policy's fault, even though its allocate() raised."""
    with pytest.raises(BudgetError) as error:
        prefill(tiny_model, kvpolicies.get_policy("l2norm", uncompressed_layers=[0, 1, 2, 3]))
    assert not isinstance(error.value, PluginError)
    shows(str(error.value), "[0, 1, 2, 3]", "160")


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
    with pytest.raises(PolicyConfigError) as error:
        Sketch(SketchConfig(bias=1.0), window_tokens=2)
    shows(str(error.value), "policy 'sketch'", "config object", "options")
    assert Sketch(window_tokens=2).config.window_tokens == 2 and Sketch(SketchConfig(bias=1.0)).config.bias == 1.0


def test_a_config_object_of_another_class_is_refused_with_the_expected_class_named():
    with pytest.raises(PolicyConfigError) as error:
        Sketch(PolicyConfig(window_tokens=2))
    shows(str(error.value), "policy 'sketch'", "SketchConfig", "PolicyConfig")
    assert Sketch(SketchConfig(bias=1.0)).config.bias == 1.0  # its own config class is taken as given


def test_unknown_options_are_refused_with_every_valid_option_listed():
    with pytest.raises(PolicyConfigError) as error:
        Sketch(window=4, colour="red")
    message = str(error.value)
    shows(message, "policy 'sketch'", "'colour'", "'window'")
    listed = message[message.index("'window'") + len("'window'"):]  # the valid options, after the unknown ones
    shows(listed, "sink_tokens", "window_tokens", "bias", "horizon", "layers", "newest_first")


def test_an_option_of_the_wrong_type_is_refused_with_the_option_named():
    with pytest.raises(PolicyConfigError) as error:
        Sketch(bias="high")
    shows(str(error.value), "policy 'sketch'", "bias", "number")


@pytest.mark.parametrize(("option", "value"), [("bias", True), ("horizon", False), ("layers", [0, True]),
                                               ("sink_tokens", True)])
def test_booleans_are_refused_for_a_plugins_number_options(option, value):
    """pydantic would read True as 1; the check covers a plugin's own fields, optional numbers and lists of them."""
    with pytest.raises(PolicyConfigError) as error:
        Sketch(**{option: value})
    shows(str(error.value), option, "number", repr(value))
    assert Sketch(newest_first=True).config.newest_first is True  # a real yes/no option still takes a bool


def test_a_policy_without_score_is_named_when_the_cache_needs_its_scores(tiny_model):
    class Unfinished(Policy):
        name = "unfinished"

    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, Unfinished())
    blames(error, "unfinished", "score", "NotImplementedError")
    assert isinstance(error.value.__cause__, NotImplementedError)  # chained: --debug shows where it was raised


# -- wrappers ---------------------------------------------------------------------------------------------------


class RescaledConfig(kvpolicies.WrapperConfig):
    scorer: str = "l2norm"


class Rescaled(ScorerWrapper):
    """A third-party wrapper: any scorer's ranking, its own allocation."""

    name = "rescaled"
    Config = RescaledConfig


def test_a_wrapper_configured_with_the_reference_policy_as_scorer_is_refused():
    assert Rescaled().scorer.name == "l2norm"
    with pytest.raises(PolicyConfigError) as error:
        Rescaled(scorer="full")
    shows(str(error.value), "policy 'rescaled'", "'full'", "scorer")


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
    with pytest.warns(PluginWarning) as caught:
        names = {info.name for info in kvpolicies.list_policies()}
    (warning,) = [str(w.message) for w in caught if "'guarded'" in str(w.message)]
    shows(warning, "plugin 'guarded'", "TypeError", "register()", "kvpolicies.Policy")
    assert re.search(rf"(?<![\w.]){shown}", warning), warning  # what it was given
    assert "sketch" not in names and {"l2norm", "random"} <= names  # only the faulty plugin is skipped


def test_register_a_policy_without_a_name_skips_the_plugin_with_a_warning(fresh_registry):
    register_test_plugin(Sketch, Nameless)
    with pytest.warns(PluginWarning) as caught:
        names = {info.name for info in kvpolicies.list_policies()}
    (warning,) = [str(w.message) for w in caught if "'guarded'" in str(w.message)]
    shows(warning, "plugin 'guarded'", "TypeError", "Nameless", "`name`")
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

    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, allocating(inflate))
    blames(error, "allocating", "allocate", "320", "160")  # the budget's 160, not the 10**6 the policy wrote


def test_reallocate_heads_that_raises_the_allocation_in_place_is_refused(tiny_model):
    class Inflating(Sketch):
        name = "inflating"

        def reallocate_heads(self, scores, valid, keep):
            keep.add_(50)
            return keep

    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, Inflating())
    blames(error, "inflating", "reallocate_heads", "[120]", "[20]")  # 10 + 50 per head, against the allocated 20


def test_a_policy_that_edits_its_inputs_in_place_is_refused_before_the_model_reads_them(tiny_model):
    class Scribbler(Sketch):
        name = "scribbler"
        needs = frozenset({Signal.KEYS})

        def score(self, inputs):
            inputs.keys.zero_()  # would reach the next attention: on a dense layer the keys are the cache's storage
            return inputs.order.float()

    with pytest.raises(KVPoliciesError) as error:
        prefill(tiny_model, Scribbler())
    blames(error, "scribbler", "score", "inputs.keys", "tests.test_plugin_guards")  # what it edited; its module
