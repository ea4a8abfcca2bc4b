"""The plugin interface of kvpolicies: what a plugin may implement.

A plugin is any module (or object) exposed through the ``kvpolicies`` entry-point group; it implements one or
more of the hooks below with ``@kvpolicies.hookimpl``. Built-in policies are registered exactly this way, so a
third-party package has the same power as the core.

Minimal plugin package::

    # my_policy.py
    import kvpolicies
    from kvpolicies import Policy, PolicyConfig, Signal

    class NewestKeysConfig(PolicyConfig):
        pass

    class NewestKeys(Policy):
        '''Keep the most recent entries of every head (a sliding window).'''
        name = "newest"
        Config = NewestKeysConfig
        needs = frozenset()

        def score(self, inputs):
            return inputs.order.float()

    @kvpolicies.hookimpl
    def register_policies(register):
        register(NewestKeys)

    # pyproject.toml
    [project.entry-points.kvpolicies]
    newest = "my_policy"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import pluggy

if TYPE_CHECKING:
    from kvpolicies.engine.policy import Policy

PROJECT = "kvpolicies"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegisterPolicy(Protocol):
    def __call__(self, policy_class: type[Policy], *, aliases: tuple[str, ...] = ()) -> None: ...


@hookspec
def register_policies(register: RegisterPolicy) -> None:
    """Register eviction policies by calling ``register(PolicyClass)`` once per policy.

    ``PolicyClass`` is a subclass of :class:`kvpolicies.Policy`. Its ``name`` is how users select it
    (``get_policy("name")``, ``--policy name``); names must be unique across all installed plugins, and a clash is
    reported with both plugins named. ``aliases`` adds further names for the same class.

    The class declares, as class attributes:

    - ``name``: the registry name;
    - ``Config``: a :class:`kvpolicies.PolicyConfig` subclass (pydantic, ``extra="forbid"``) holding every knob;
    - ``needs``: the :class:`kvpolicies.Signal` values that ``score()`` reads; the framework computes only those;

    and implements ``score(inputs) -> Tensor[batch, kv_heads, seq]`` (higher = keep). It may override
    ``allocate(allocation)`` to move the budget between layers and heads while keeping the total.

    The framework owns selection, protected tokens (``sink_tokens``, ``window_tokens`` in every config), storage
    and accounting, so a policy never slices tensors itself.
    """
