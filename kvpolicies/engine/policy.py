"""The policy interface: a config, the signals it reads, and a score per cached entry.

A policy only says *what it would rather keep*. The framework turns scores into a kept set under the budget
(:mod:`kvpolicies.engine.selection`), stores it (:mod:`kvpolicies.engine.cache`) and accounts for it, so every policy is
compared on identical mechanics.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvpolicies.engine.budget import Allocation
from kvpolicies.engine.layer_view import LayerView
from kvpolicies.engine.signals import Track

if TYPE_CHECKING:
    from kvpolicies.engine.calibration import Calibration
    from kvpolicies.engine.stages import Prefilled
from kvpolicies.errors import PolicyConfigError, describe


class Signal(StrEnum):
    """What a policy's ``score()`` may read. Signals not declared in ``Policy.needs`` are never computed."""

    KEYS = "keys"
    """Cached keys (after RoPE), ``[batch, kv_heads, seq, head_dim]``."""
    VALUES = "values"
    """Cached values, ``[batch, kv_heads, seq, head_dim]``."""
    QUERIES = "queries"
    """Recent queries (after RoPE), ``[batch, heads, q, head_dim]``: the last ``Policy.query_window`` queries seen
    (kept in a small rolling buffer per layer), or, if that is None, those of the forward pass that triggered the
    eviction (the prompt's at prefill, the newest token's during decoding)."""
    ATTENTION = "attention"
    """Attention each cached entry received from the queries above, summed over the query heads that share its KV
    head and over the queries, ``[batch, kv_heads, seq]``. Computed in query chunks (memory O(chunk × seq)), never
    by switching the model to eager attention."""
    CUMULATIVE_ATTENTION = "cumulative_attention"
    """Attention each cached entry has received from every query since it entered the cache (the prompt's, then
    every generated token's), summed like ``ATTENTION``, ``[batch, kv_heads, seq]``. Costs one extra q·Kᵀ per layer
    and forward pass, since it must be accumulated at every step, not only when evicting. The built-in
    :class:`~kvpolicies.engine.signals.Track` (``CumulativeAttention``); a policy adds its own in
    ``Policy.tracks``."""


class Role(StrEnum):
    """The part a policy plays in a comparison, so that pages and benchmarks name roles, never policies."""

    REFERENCE = "reference"
    """Keeps everything (``compresses`` is False): every budget's score is read against it."""
    CHANCE = "chance"
    """Keeps a uniform sample: a policy that does not beat it has learnt nothing about what matters."""


class PolicyConfig(BaseModel):
    """Base of every policy config: validated, immutable, serialisable, hashable.

    ``sink_tokens`` and ``window_tokens`` are protected by the framework for any policy: the first real tokens
    (attention sinks) and the most recent ones are kept whatever the score, and they count inside the budget.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sink_tokens: int = Field(0, ge=0, description="first real tokens of each head always kept (attention sinks)")
    window_tokens: int = Field(0, ge=0, description="most recent tokens of each head always kept")

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """pydantic reads ``true`` as 1 for an int field; ``window_tokens=true`` is a mistake, not a count."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                values = value if isinstance(value, (list, tuple)) else [value]
                if field is not None and _numeric(field.annotation) and any(isinstance(v, bool) for v in values):
                    raise ValueError(f"{name} takes a number, got {value!r}")
        return data


@dataclass
class ScoreInputs:
    """What ``Policy.score`` receives for one layer. Padded entries (``valid`` False) get no say in selection.

    Tensors are a dense ``[batch, kv_heads, seq, ...]`` view of the layer's entries; signals the policy did not
    declare in ``needs`` are ``None``. They are read-only: ``keys`` and ``values`` may be the cache's own storage,
    so a policy that edits one in place would change what the model attends to; the cache refuses it (a
    ``PluginError``) rather than hand out copies on every eviction.
    """

    layer_idx: int
    valid: torch.Tensor
    """``[batch, kv_heads, seq]`` bool: True for real cached entries, False for padding."""
    order: torch.Tensor
    """``[batch, kv_heads, seq]`` long: age rank among the valid entries of the head, 0 = oldest (-1 on padding)."""
    seen_tokens: list[int]
    """Real tokens each sequence has seen so far (its logical length without padding)."""
    keep: torch.Tensor
    """``[batch, kv_heads]`` long: how many entries of each head the framework will keep."""
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    cumulative_attention: torch.Tensor | None = None
    tracks: dict[str, torch.Tensor] = field(default_factory=dict)
    """The policy's own tracks (``Policy.tracks``) by name, ``[batch, kv_heads, seq]`` float32."""
    scaling: float = 1.0
    """The attention's logit scale (``head_dim ** -0.5`` unless the model says otherwise), as the model applies it."""
    softcap: float | None = None
    """The attention's logit soft-cap (Gemma 2: ``softcap · tanh(logit / softcap)`` after scaling), None if none.
    The ``attention`` and ``cumulative_attention`` signals already include it."""
    layer: LayerView | None = None
    """Facts about the layer's attention for policies that need more than tensors: ``layer.output_projection``
    (``W_o``), ``layer.rotary_at(seq_len)`` (the RoPE frequencies the model uses at that length). Read through this
    view, never from the model's attributes, so a policy is right on every architecture the view understands.
    Provided whenever the cache runs inside a model's forward (the attention hands it the module); None where a
    layer is evicted without one."""


def tracks_of(policy: Policy) -> tuple[Track, ...]:
    """Every track a policy's cache keeps: its own, and the built-in one behind ``CUMULATIVE_ATTENTION``."""
    from kvpolicies.engine.signals import CumulativeAttention

    tracks = tuple(policy.tracks)
    if Signal.CUMULATIVE_ATTENTION in policy.needs and CumulativeAttention.name not in {t.name for t in tracks}:
        tracks += (CumulativeAttention(),)
    return tracks


def _numeric(annotation: Any) -> bool:
    """True for ``int``/``float`` and containers or optionals of them, never for ``bool``."""
    if annotation in (int, float):
        return True
    return any(_numeric(arg) for arg in get_args(annotation) if arg is not bool and arg is not type(None))


def coerce_option(value: Any) -> Any:
    """Options typed on a command line arrive as text: read JSON where it parses (``[]``, ``true``, ``4``).

    Plain words stay text (``scorer=tova``), but text that starts like JSON (a list, an object, a quoted string)
    must parse: silently keeping ``[1,`` as a string would hide the typo until a confusing validation error.
    """
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        if value.strip()[:1] in ("[", "{", '"'):
            raise PolicyConfigError(f"cannot read option value {value!r} as JSON ({error.msg} at character "
                                    f"{error.pos}); write lists as [0,1], text as a plain word") from None
        return value


class Policy:
    """Base class of an eviction policy. Subclasses set ``name``, ``Config``, ``needs`` and implement ``score``.

    The docstring's first line is the one-line description shown by ``kvpolicies list``.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig
    needs: frozenset[Signal] = frozenset()
    """Signals ``score()`` reads. A class attribute; a policy that wraps another sets it per instance."""
    tracks: tuple[Track, ...] = ()
    """Per-entry quantities ``score()`` reads (``inputs.tracks[name]``), kept up to date at every forward pass by
    the cache (see :class:`~kvpolicies.engine.signals.Track`). Like ``needs``, set per instance by a wrapper."""
    compresses: ClassVar[bool] = True
    """False only for the reference full cache: the cache then never evicts, whatever the budget."""
    role: ClassVar[Role | None] = None
    """The baseline this policy stands for in comparisons, if any (see :class:`Role`)."""
    calibrated: Any = None
    """What :meth:`calibrate` returned for the model in use (None for a policy that does not calibrate). An instance
    serves one model at a time: building a cache on another model binds that model's fit."""
    stage_ignores_budget: ClassVar[bool] = False
    """Set True by a policy whose :meth:`after_prefill` scores do not depend on the budget (it reads neither
    ``prefilled.budget`` nor a layer's ``keep``): cells that differ only in budget and share a prompt's prefill
    then run its stage once for all of them (:mod:`kvpolicies.integrations.shared`); KVzip's second pass is the
    costliest thing such a cell does. Its scores must then follow from the prefilled entries alone."""

    def __init__(self, config: PolicyConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise PolicyConfigError(f"policy {self.name!r}: pass either a config object or keyword options, not both")
        if config is None:
            config = self.parse_config(options)
        elif not isinstance(config, self.Config):
            raise PolicyConfigError(
                f"policy {self.name!r} expects a {self.Config.__name__}, got {type(config).__name__}"
            )
        self.config = config

    @classmethod
    def parse_config(cls, options: dict[str, Any]) -> PolicyConfig:
        """Validate user options into ``Config``, with an error that lists the valid keys."""
        unknown = sorted(set(options) - set(cls.Config.model_fields))
        if unknown:
            raise PolicyConfigError(
                f"policy {cls.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(cls.Config.model_fields)}"
            )
        try:
            return cls.Config(**options)
        except ValidationError as error:
            problems = describe(error)
            raise PolicyConfigError(f"policy {cls.name!r}: invalid option ({problems})") from None

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.splitlines()[0] if doc else ""

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """Return ``[batch, kv_heads, seq]`` scores: higher means keep. Values at padded positions are ignored."""
        raise NotImplementedError(f"policy {self.name!r} does not implement score()")

    @property
    def protected(self) -> tuple[int, int]:
        """``(sink_tokens, window_tokens)`` the framework keeps before any scored entry."""
        return self.config.sink_tokens, self.config.window_tokens

    @property
    def query_window(self) -> int | None:
        """How many recent queries ``QUERIES``/``ATTENTION`` cover; None means the triggering forward's queries."""
        return None

    def allocate(self, allocation: Allocation) -> Allocation:
        """Redistribute the budget across layers and KV heads before scoring; the default keeps it uniform.

        Whatever is returned must keep at most ``allocation.total`` entries, at least one per head and none above
        what the model's own cache holds in the head's layer (``allocation.caps``: the sequence, or a window's
        ``W - 1`` and a grouped codec's hidden entries there); the cache checks and names the policy otherwise.
        """
        return allocation

    def reallocate_heads(self, scores: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Move entries between the KV heads of one layer after scoring (AdaKV-style); the default moves none.

        ``scores``/``valid``: ``[batch, kv_heads, seq]``; ``keep``: ``[batch, kv_heads]`` allocation. Return a new
        ``[batch, kv_heads]`` with at most the same row sums and at least one entry per head.
        """
        return keep

    def after_prefill(self, prefilled: Prefilled) -> list[torch.Tensor | None]:
        """Optional stage: score every entry of every layer at once, after the prompt is in (see
        :mod:`kvpolicies.engine.stages`). A policy that implements it is not asked to ``score()`` while prefilling;
        the framework keeps, per sequence, ``prefilled.budget[b]`` entries across all layers and heads by these
        scores. Return one ``[batch, kv_heads, seq]`` tensor per layer (``prefilled.layers[i].valid``'s shape), None
        for the sliding-window layers held whole (``prefilled.layers[i] is None``, a budget with
        ``windows="keep"``)."""
        raise NotImplementedError(f"policy {self.name!r} has no after-prefill stage")

    def calibrate(self, calibration: Calibration) -> Any:
        """Optional: fit to the model what ``score()`` needs, before the policy's first cache on a model is used
        (see :mod:`kvpolicies.engine.calibration`): ``calibration.queries(...)`` runs the model on calibration text
        and returns its queries. Return the fit; the framework sets it as ``self.calibrated``, and calibrates once
        per model and config in a process. Q-Filters fits its filters here."""
        raise NotImplementedError(f"policy {self.name!r} does not calibrate")

    @property
    def calibrates(self) -> bool:
        """Whether this policy implements :meth:`calibrate`."""
        return type(self).calibrate is not Policy.calibrate

    @property
    def has_stage(self) -> bool:
        """Whether this policy implements :meth:`after_prefill` (then it chooses once, over every layer)."""
        return type(self).after_prefill is not Policy.after_prefill

    def identity(self) -> dict[str, Any]:
        """The JSON-able description of this policy that identifies a run."""
        return {"policy": self.name, "config": self.config.model_dump(mode="json")}

    def config_hash(self) -> str:
        """A stable 16-hex-digit hash of the policy name and its full config (defaults included)."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items())
        return f"{type(self).__name__}({options})"
