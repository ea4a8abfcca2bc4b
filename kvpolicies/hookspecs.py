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
    from kvpolicies.engine.codecs import Codec
    from kvpolicies.engine.policy import Policy

PROJECT = "kvpolicies"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegisterPolicy(Protocol):
    def __call__(self, policy_class: type[Policy], *, aliases: tuple[str, ...] = ()) -> None: ...


class RegisterCodec(Protocol):
    def __call__(self, codec_class: type[Codec], *, aliases: tuple[str, ...] = ()) -> None: ...


@hookspec
def register_policies(register: RegisterPolicy) -> None:
    """Register eviction policies by calling ``register(PolicyClass)`` once per policy.

    ``PolicyClass`` is a subclass of :class:`kvpolicies.Policy`. Its ``name`` is how users select it
    (``get_policy("name")``, ``--policy name``); names must be unique across all installed plugins, and a clash is
    reported with both plugins named. ``aliases`` adds further names for the same class.

    The class declares, as class attributes:

    - ``name``: the registry name;
    - ``Config``: a :class:`kvpolicies.PolicyConfig` subclass (pydantic, ``extra="forbid"``) holding every knob;
      every config has ``sink_tokens`` and ``window_tokens``, the oldest and newest entries of each head that the
      framework keeps before any scored one;
    - ``needs``: the :class:`kvpolicies.Signal` values that ``score()`` reads; the framework computes only those;
    - ``tracks``: :class:`kvpolicies.Track` instances, per-entry quantities the cache keeps up to date at every
      forward pass and carries through eviction (the attention an entry has received, reduced and accumulated as
      the track says), read as ``inputs.tracks[name]``; for example the largest weight each entry ever received::

          class MaxReceived(Track):
              name, reduce = "max_received", "max"  # per pass: the largest weight over query heads and queries

              def update(self, held, received):  # elementwise, any layout
                  return torch.maximum(held, received)

      ``tests/test_tracks.py`` checks such a track against explicit loops;
    - ``compresses``: False only for a policy that keeps everything (the reference full cache);
    - ``role``: the baseline it stands for in comparisons (:class:`kvpolicies.Role`), if any.

    It implements one of two stages:

    - ``score(inputs) -> Tensor[batch, kv_heads, seq]`` (higher = keep): called for one layer right after its
      attention, whenever a sequence holds more than its allocation (at prefill, then when decoding outgrows the
      budget's slack). ``inputs`` is a read-only :class:`kvpolicies.ScoreInputs`;
    - ``after_prefill(prefilled) -> list[Tensor | None]``: called once the prompt (or its context) is in, before
      the next forward pass, with every layer's entries and a handle to run the model again
      (:class:`kvpolicies.engine.stages.Prefilled`); it returns scores for every layer and the framework keeps the
      budget's best entries across all layers and heads at once. Such a policy evicts nothing while prefilling,
      and what follows the prompt is kept whole.

    and may override:

    - ``allocate(allocation) -> Allocation``: move the budget between layers and heads before scoring (PyramidKV,
      HeadKV), keeping the total; ``allocation.redistribute(weights)`` and ``allocation.with_full_layers(layers)``
      do the arithmetic;
    - ``reallocate_heads(scores, valid, keep) -> Tensor[batch, kv_heads]``: move entries between the KV heads of a
      layer after scoring (AdaKV), at most the same row sums, at least one entry and at most what it holds per head;
    - ``query_window`` (a property): how many recent queries the ``QUERIES`` and ``ATTENTION`` signals cover (None:
      the triggering forward's);
    - ``protected`` (a property): ``(sink_tokens, window_tokens)``, read from the config by default;
    - ``calibrate(calibration) -> object``: fit to the model what ``score()`` needs, once per model and config,
      before the first cache uses the policy; ``calibration.queries(sequences, tokens, samples)`` runs the model on
      bundled calibration text and returns each layer's queries, and what ``calibrate`` returns is set as
      ``self.calibrated`` (:mod:`kvpolicies.engine.calibration`; the built-in ``qfilters`` fits its filters so).
      Its time is recorded with every result as ``calibration_s``.

    The framework owns selection, protected tokens, storage and accounting, so a policy never slices tensors
    itself. What a hook returns is checked: a broken contract (scores of the wrong shape, NaN, an allocation that
    adds entries, inputs edited in place) is a :class:`kvpolicies.PluginError` naming the plugin.

    A stage that keeps one top-k across all layers and heads, runnable as is (``tests/test_stages.py`` runs it)::

        import torch
        from kvpolicies import CompressedCache, Policy

        class GlobalNorm(Policy):
            '''Keep the lowest-norm keys of the whole model, not of each layer.'''
            name = "global-norm"

            def after_prefill(self, prefilled):
                return [None if layer is None else -layer.keys.float().norm(dim=-1) for layer in prefilled.layers]

        cache = CompressedCache(model, GlobalNorm(), 0.25)
        model.generate(ids, cache=cache, max_new_tokens=8)  # the stage runs before the first decoding step

    ``prefilled.attention_from(ids, reduce="max")`` runs the model on ``ids`` as if they followed the prompt and
    returns the attention each entry receives from them (KVzip's reconstruction pass, with ``prefilled.ids``, the
    prompt's own tokens, repeated), leaving the cache as it was; ``mask=`` right-pads ``ids`` so that each prompt of
    a batch probes with its own tokens, and ``prefilled.encode(text)`` gives the model's tokens for a prompt of the
    policy's own (None where the cache was built without ``tokenizer=``). The built-in ``kvzip`` is the full case.
    """


@hookspec
def register_codecs(register: RegisterCodec) -> None:
    """Register storage codecs by calling ``register(CodecClass)`` once per codec.

    A codec says how a kept entry is stored and read back (:class:`kvpolicies.Codec`); eviction policies say which
    entries are kept. Any policy composes with any codec: ``CompressedCache(model, policy, budget, codec=...)``,
    where ``codec`` is a registered name (``get_codec("name")``) or an instance. Names are unique among codecs
    (policies have their own names). The built-in ``"full"`` stores keys and values as computed.

    The class declares ``name`` and implements:

    - ``entry_bytes(head_dim, dtype) -> int``: what one entry (a key and a value of one token in one KV head)
      costs as stored, scales and zero-points included. A budget in bytes, or a fraction of the full cache's
      bytes, buys entries at this price, so a codec that stores less keeps more entries under the same budget;
    - ``encode(keys, values) -> dict[str, Tensor]``: the stored form of entries ``[..., head_dim]``, named tensors
      ``[..., n]`` with the same leading dimensions, each entry encoded on its own;
    - ``decode(stored, dtype) -> (keys, values)``: back to ``[..., head_dim]`` in ``dtype``, for the attention and
      for the policy's scoring.

    New tokens are encoded as they arrive; the forward pass that brings them attends to them at full precision,
    and later ones read them decoded. Between forward passes only the stored tensors are resident, and the cache's
    resident bytes are read from them. When a cache is built its codec is tried on two entries: a declared
    ``entry_bytes`` that differs from what ``encode`` stores, or tensors of the wrong shape, are a
    :class:`kvpolicies.PluginError` naming the plugin.

    A codec that stores every entry as 8-bit integers with one scale and offset per entry, runnable as is
    (``tests/test_codecs.py`` runs it)::

        import torch
        from kvpolicies import Codec, CompressedCache, hookimpl

        class Int8PerEntry(Codec):
            '''Keys and values as uint8, each entry with its own float32 minimum and step.'''
            name = "int8-entry"

            def entry_bytes(self, head_dim, dtype):
                return 2 * (head_dim + 2 * 4)  # codes, and a float32 minimum and step, for the key and the value

            def encode(self, keys, values):
                stored = {}
                for name, t in (("keys", keys.float()), ("values", values.float())):
                    low, high = t.aminmax(dim=-1, keepdim=True)
                    step = ((high - low) / 255).clamp(min=1e-12)
                    stored[name] = ((t - low) / step).round().to(torch.uint8)
                    stored[name + ".range"] = torch.cat([low, step], dim=-1)
                return stored

            def decode(self, stored, dtype):
                def read(name):
                    low, step = stored[name + ".range"].split(1, dim=-1)
                    return (low + stored[name].float() * step).to(dtype)
                return read("keys"), read("values")

        @hookimpl
        def register_codecs(register):
            register(Int8PerEntry)

        cache = CompressedCache(model, "snapkv", 0.25, codec=Int8PerEntry())
        model.generate(ids, cache=cache, max_new_tokens=8)

    On a float32 model with 64-channel heads a full entry costs 512 bytes and this one 144, so a quarter of the
    full cache's bytes keeps 88% of the entries instead of 25%.

    A codec that encodes several consecutive entries of a head together (KIVI's keys, one scale per channel across
    a group of tokens) subclasses :class:`kvpolicies.GroupedCodec` instead, sets ``group`` (entries encoded
    together) and ``residual`` (newest entries of each head left unencoded), and implements the three methods on
    groups: ``encode(keys, values, fitted)`` takes ``[groups, group, head_dim]`` and returns tensors
    ``[groups, ...]``, ``decode(stored, dtype, fitted)`` reads them back, and ``entry_bytes`` is a group's bytes
    over ``group`` (``fitted`` is ``{}`` unless the codec fits, below). The cache encodes each group once it is
    older than a head's ``residual`` newest entries, keeps those at full precision, and charges them as full
    entries under the budget. The built-in ``kivi4`` and ``kivi2`` (module ``kvpolicies_plugins.kivi``,
    ``plugins/kivi.py`` in the repository, a page long) are the worked example, tried by
    ``tests/test_grouped_codecs.py`` with groups of 4 on a tiny model. A grouped codec that sets ``fits = True``
    also implements ``fit(keys, valid, queries)``: parameters for each run (one sequence's entries in one KV
    head), chosen once, in the first pass that holds a token of every sequence (the prompt's prefill), from the
    layer's entries and that pass's last ``fit_queries`` queries, and handed back to ``encode`` and ``decode`` one
    row per group as ``fitted``: the built-in ``think`` (``kvpolicies_plugins.think``) chooses each head's key
    channels this way.
    """
