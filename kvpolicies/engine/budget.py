"""One memory budget for every policy, resolved into per-layer × per-KV-head token allocations.

Equal memory means equal *bytes*: an entry is one token's key and value in one KV head of one layer, and it costs
what the cache's storage codec stores for it (``2 × head_dim × dtype bytes`` at full precision, whatever the
policy; less for a quantizing codec, scales included). A fraction is a share of the full cache's bytes, at full
precision, so a codec that stores entries for less keeps more of them under the same budget. GQA models are counted
per KV head, never per query head. Layers a policy leaves uncompressed count against the same total.

Sliding-window layers (Gemma 2/3, Mistral with ``sliding_window``) are neither uncompressed nor free. The model
itself only ever attends to their last ``W`` tokens, so its own cache holds ``W - 1`` entries per head there: that
is the "full cache" a fraction is taken of, and those entries are charged to the budget like any other. How the
windows take part is the budget's ``windows`` option:

- ``"share"`` (the default): windows are compressed like any layer. Every layer keeps the same share of what the
  model's own cache holds there (a window at most its ``W - 1``, and under a grouped codec the entries of its
  oldest group that slid out, see ``CacheShape.window_overhang``), and the policy chooses among the window's
  entries as among any layer's. Any budget that leaves each head one entry fits, on every architecture.
- ``"keep"``: windows are held whole (nothing the model attends to next is evicted) and the full-attention layers
  share what remains; a budget too small for the windows is refused with the smallest one that fits, and a model
  whose every layer is windowed cannot be compressed at all once its prompt is longer than the window.

Why share by default: on a Gemma-3 shape the windows hold most of the model's own cache at RULER's lengths, so
``keep`` refuses every budget a user asks for; on a model without windows the two are the same.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvpolicies.errors import BudgetError, PolicyConfigError, describe

BudgetUnit = Literal["fraction", "tokens", "bytes"]
WindowRule = Literal["share", "keep"]
WINDOW_RULES: tuple[WindowRule, ...] = ("share", "keep")

_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_FORMS: list[tuple[str, BudgetUnit, float]] = [
    (r"([^%]+)(%)", "fraction", 0.01),
    (r"(.+?)(tokens?|tok|t)", "tokens", 1.0),
    (r"(.+?)(bytes?|kib|mib|gib|kb|mb|gb|b)", "bytes", 1.0),
]
FORMS = (
    "use a fraction in (0, 1] such as 0.5 or 50%, tokens per KV head such as '512 tokens', or bytes such as '64MiB'"
)


def _number(text: str, spec: object) -> float:
    try:
        return float(text)
    except ValueError:
        raise BudgetError(f"cannot read budget {spec!r}: {FORMS}") from None


@dataclass(frozen=True)
class CacheShape:
    """The geometry of a model's KV cache: what one entry costs and how many heads hold entries."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    windows: tuple[int | None, ...] = ()
    """Per layer, the window ``W`` of a layer the model itself slides (None: full attention); empty when every layer
    is full attention."""
    stored_entry_bytes: int = 0
    """Bytes one kept entry takes as the cache's codec stores it (0: as computed, ``entry_bytes``)."""
    full_precision_entries: int = 0
    """The most entries per head a grouped codec holds at full precision (its residual: the newest entries, not yet
    a whole group past it); each costs ``entry_bytes`` instead of ``kept_entry_bytes``."""
    window_overhang: int = 0
    """The most entries per head a sliding-window layer holds beyond its ``W - 1``: a grouped codec drops a group
    only once all of it slid out, so up to ``group - 1`` of its entries wait there, hidden; the budget counts them
    like any entry, and lets a window hold them (:meth:`held_whole`)."""

    @property
    def cells(self) -> int:
        """Number of (layer, KV head) pairs, each holding its own run of entries."""
        return self.num_layers * self.num_kv_heads

    @property
    def entry_bytes(self) -> int:
        """Bytes of one entry: a key and a value of one token in one KV head."""
        return 2 * self.head_dim * self.dtype_bytes

    @property
    def kept_entry_bytes(self) -> int:
        """Bytes one kept entry costs as stored: the price a budget buys entries at."""
        return self.stored_entry_bytes or self.entry_bytes

    def most_bytes(self, entries: int) -> float:
        """The most bytes ``entries`` entries of one sequence take as stored, however the heads share them.

        Why "the most": under a grouped codec a head of ``n`` entries holds up to ``min(n, full_precision_entries)``
        of them at full precision, and the rest at the codec's price. That cost grows fastest over a head's first
        entries, so spreading entries evenly over the heads costs the most (it is concave in ``n``): the bound holds
        for any allocation, per-head budgets included, at any moment of decoding."""
        per_head = entries / self.cells
        in_full = min(per_head, self.full_precision_entries)
        return self.cells * (per_head * self.kept_entry_bytes + in_full * (self.entry_bytes - self.kept_entry_bytes))

    def entries_within(self, budget_bytes: float) -> int:
        """The most entries of one sequence whose :meth:`most_bytes` fits ``budget_bytes``: each head's first
        ``full_precision_entries`` at full precision, the rest at the codec's price."""
        per_head = budget_bytes / self.cells
        in_full = self.full_precision_entries * self.entry_bytes
        if per_head <= in_full:  # a short budget: every entry held at full precision
            entries = per_head / self.entry_bytes
        else:
            entries = self.full_precision_entries + (per_head - in_full) / self.kept_entry_bytes
        return math.floor(entries * self.cells + 1e-9)

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        """Layers the model windows itself: the next query of one sees at most its window's ``W - 1`` entries per
        head (all of them when the budget keeps windows whole); a packed one stores what slid out, hidden, up to the
        budget's slack (and a grouped codec's window its oldest group's, ``window_overhang``)."""
        return tuple(layer for layer, window in enumerate(self.windows) if window is not None)

    def held(self, layer: int, seq_len: int) -> int:
        """Entries per KV head the model's own cache holds in ``layer`` after ``seq_len`` tokens: all of them, or
        the last ``W - 1`` of a sliding-window layer (what transformers' ``DynamicSlidingWindowLayer`` keeps)."""
        window = self.windows[layer] if self.windows else None
        return seq_len if window is None else min(seq_len, window - 1)

    def held_whole(self, layer: int, seq_len: int) -> int:
        """The most entries per KV head ``layer`` holds after ``seq_len`` tokens: what the model's own cache holds
        there, and in a window the hidden entries of a grouped codec's oldest group (a window held whole holds all
        of them; a shared one is capped there, so that a window left whole is not cut for its hidden entries)."""
        return min(seq_len, self.held(layer, seq_len) + self.window_overhang)

    def most_entries(self, seq_len: int) -> int:
        """Entries of one sequence a cache can hold at most: the model's own cache, and in each window head the
        entries a grouped codec holds hidden (``held_whole``)."""
        if not self.window_overhang:
            return self.full_entries(seq_len)
        return self.num_kv_heads * sum(self.held_whole(layer, seq_len) for layer in range(self.num_layers))

    def full_entries(self, seq_len: int) -> int:
        """Entries of one sequence in the model's own uncompressed cache: what a fraction budget is a fraction of."""
        if not self.sliding_layers:
            return self.cells * seq_len
        return self.num_kv_heads * sum(self.held(layer, seq_len) for layer in range(self.num_layers))

    @classmethod
    def from_config(cls, config, dtype: torch.dtype, windows: tuple[int | None, ...] = ()) -> CacheShape:
        config = config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        windows = windows if any(window is not None for window in windows) else ()
        return cls(config.num_hidden_layers, kv_heads, head_dim, torch.empty((), dtype=dtype).element_size(), windows)


class Budget(BaseModel):
    """How much of the KV cache a policy may keep.

    - ``fraction``: share of the full cache, in (0, 1]; 1 keeps everything.
    - ``tokens``: average tokens kept per KV head (per layer), > 0.
    - ``bytes``: resident bytes of keys and values for one sequence, as the codec stores them, > 0.

    ``slack_tokens`` lets a head grow that many entries past its allocation during decoding before eviction runs
    again, so eviction is not paid on every generated token (0 = evict at every step). Prefill is always cut to
    the allocation exactly.

    ``windows`` says how a model's sliding-window layers take part (see the module's docstring): ``"share"`` the
    budget like any layer, or ``"keep"`` their whole window. It changes nothing on a model without windows.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: BudgetUnit = "fraction"
    value: float
    slack_tokens: int = Field(16, ge=0, description="decode-time growth allowed before re-evicting, per head")
    windows: WindowRule = Field("share", description="sliding-window layers: 'share' the budget or 'keep' whole")

    @model_validator(mode="after")
    def _check_range(self) -> Budget:
        if not math.isfinite(self.value):
            raise ValueError(f"budget value must be a finite number, got {self.value}")
        if self.unit == "fraction" and not 0 < self.value <= 1:
            raise ValueError(
                f"a fraction budget must be in (0, 1] (the share of the full cache kept), got {self.value}"
            )
        if self.unit in ("tokens", "bytes") and self.value <= 0:
            raise ValueError(f"a {self.unit} budget must be > 0, got {self.value}")
        return self

    @classmethod
    def stored(cls, value: object) -> object:
        """A budget as a result file holds it: one written before budgets had a window rule ran with windows
        held whole (``"keep"``), whatever the default is now."""
        if isinstance(value, dict) and "value" in value and "windows" not in value:
            return value | {"windows": "keep"}
        return value

    @classmethod
    def parse(cls, spec: Budget | float | int | str, slack_tokens: int | None = None,
              windows: str | None = None) -> Budget:
        """Read ``0.5``, ``"50%"``, ``"512 tokens"``, ``"64MiB"`` or ``"1e6 bytes"`` into a Budget (``slack_tokens``
        and ``windows``, when given, replace the spec's own).

        Every way a budget enters kvpolicies (command line, sweep file, lm-eval model args, Python) goes through
        here, so a bad one always fails the same way: a :class:`BudgetError` that shows the accepted forms.
        """
        if isinstance(spec, Budget):
            budget = spec
        elif isinstance(spec, dict):
            budget = cls._validated(spec, spec)
        else:
            unit, value = cls._read(spec)
            budget = cls._validated({"unit": unit, "value": value}, spec)
        if slack_tokens is not None and slack_tokens != budget.slack_tokens:
            budget = cls._validated(budget.model_dump() | {"slack_tokens": slack_tokens}, spec)
        if windows is not None and windows != budget.windows:
            if windows not in WINDOW_RULES:
                raise BudgetError(f"windows={windows!r}: sliding-window layers either 'share' the budget like any "
                                  "layer or 'keep' their whole window; use windows=share or windows=keep")
            budget = cls._validated(budget.model_dump() | {"windows": windows}, spec)
        return budget

    @classmethod
    def from_compression_ratio(cls, ratio: float | str, slack_tokens: int | None = None,
                               windows: str | None = None) -> Budget:
        """The budget kvpress calls ``compression_ratio``: the fraction of the cache *removed*, in [0, 1), so
        ``0.75`` keeps a quarter (budget 0.25). The kept fraction is what kvpolicies stores and shows first."""
        name = "compression_ratio"
        unreadable = BudgetError(f"cannot read {name} {ratio!r}: give the fraction of the cache removed, in [0, 1)")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float, str)):
            raise unreadable
        try:
            value = float(ratio)
        except ValueError:
            raise unreadable from None
        if not (math.isfinite(value) and 0 <= value < 1):
            raise BudgetError(f"{name} {ratio!r} is not in [0, 1): it is the fraction of the cache removed "
                              "(kvpress's convention; 0.75 keeps a quarter), so 1 would keep nothing; for the kept "
                              "fraction use a budget instead")
        return cls.parse(round(1 - value, 12), slack_tokens=slack_tokens, windows=windows)  # 1 - 0.9 is 0.0999...

    @property
    def compression_ratio(self) -> float | None:
        """kvpress's name for this budget, the fraction removed (None for a budget in tokens or bytes)."""
        return round(1 - self.value, 12) if self.unit == "fraction" else None

    @classmethod
    def _read(cls, spec: float | int | str) -> tuple[BudgetUnit, float]:
        if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
            raise BudgetError(f"cannot read budget {spec!r}: {FORMS}")
        if isinstance(spec, str):
            text = spec.strip().lower().replace(" ", "")
            for pattern, unit, scale in _FORMS:
                if match := re.fullmatch(pattern, text):
                    factor = _BYTE_UNITS["b" if match[2].startswith("byte") else match[2]] if unit == "bytes" else scale
                    return unit, _number(match[1], spec) * factor
            spec = _number(text, spec)
        if not math.isfinite(spec):
            raise BudgetError(f"budget {spec!r} is not a finite number: {FORMS}")
        if spec > 1:
            raise BudgetError(
                f"budget {spec:g}: a bare number is a fraction in (0, 1]; "
                f"write '{spec:g} tokens' for tokens per KV head or '{spec:g}B' for bytes"
            )
        return "fraction", float(spec)

    @classmethod
    def _validated(cls, data: dict, spec: object) -> Budget:
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            problems = describe(error)
            raise BudgetError(f"invalid budget {spec!r}: {problems}") from None

    def total_entries(self, seq_len: int, shape: CacheShape) -> int:
        """Entries the whole cache of one sequence may hold: at least one per head, at most the full cache (the
        model's own cache, sliding windows included, and the entries a grouped codec's windows hold hidden)."""
        full = shape.full_entries(seq_len)
        if self.unit == "fraction" and self.value >= 1:  # the whole cache, whatever a codec's entries cost
            return shape.most_entries(seq_len)
        if self.unit == "tokens":
            wanted = math.floor(self.value * shape.cells + 1e-9)
        elif shape.full_precision_entries:  # a grouped codec: each head's newest entries cost full precision
            wanted = shape.entries_within(self.value * full * shape.entry_bytes if self.unit == "fraction" else
                                          self.value)
        elif self.unit == "fraction" and shape.kept_entry_bytes == shape.entry_bytes:
            wanted = math.floor(self.value * full + 1e-9)
        elif self.unit == "fraction":  # the full cache's bytes, spent at the codec's price per entry
            wanted = math.floor(self.value * full * shape.entry_bytes / shape.kept_entry_bytes + 1e-9)
        else:
            wanted = math.floor(self.value / shape.kept_entry_bytes)
        return max(min(wanted, shape.most_entries(seq_len)), min(shape.cells, full))

    def allocate(self, seq_len: int, shape: CacheShape) -> Allocation:
        """The uniform allocation of a sequence of ``seq_len`` tokens. Without sliding windows every (layer, KV head)
        gets the same share of the total, remainders to the first cells; with them, see ``windows``."""
        total, full = self.total_entries(seq_len, shape), shape.full_entries(seq_len)
        own = tuple(shape.held(layer, seq_len) for layer in range(shape.num_layers))
        held = tuple(shape.held_whole(layer, seq_len) for layer in range(shape.num_layers))  # hidden ones too
        if not shape.sliding_layers:
            tokens = spread(total, shape.cells, seq_len).view(shape.num_layers, shape.num_kv_heads)
            return Allocation(tokens=tokens, seq_len=seq_len, total=total)
        if self.windows == "share":  # every layer the same share of what the model's own cache holds there
            weights = torch.tensor(own, dtype=torch.double).repeat_interleave(shape.num_kv_heads)
            caps = torch.tensor(held, dtype=torch.long).repeat_interleave(shape.num_kv_heads)
            tokens = distribute(total, weights, cap=caps).view(shape.num_layers, shape.num_kv_heads)
            return Allocation(tokens=tokens, seq_len=seq_len, total=total, full_entries=full, held=held, own=own)
        fixed = shape.sliding_layers
        tokens = torch.zeros(shape.num_layers, shape.num_kv_heads, dtype=torch.long)
        for layer in fixed:
            tokens[layer] = held[layer]
        windowed = int(tokens.sum())
        free = [layer for layer in range(shape.num_layers) if layer not in fixed]
        if total < windowed + len(free) * shape.num_kv_heads:
            entries = windowed + len(free) * shape.num_kv_heads
            needed_bytes = math.ceil(shape.most_bytes(entries))  # a grouped codec's newest entries cost in full
            share = needed_bytes / (shape.full_entries(seq_len) * shape.entry_bytes)
            needed = math.ceil(share * 1000) / 1000  # rounded up: must be enough
            in_units = (f"{min(needed, 1.0):.3f} of the cache" if self.unit == "fraction" else
                        f"{math.ceil(entries / shape.cells)} tokens per KV head" if self.unit == "tokens" else
                        f"{needed_bytes}B")
            hidden = (f", and up to {shape.window_overhang} a head that slid out of a group still in view"
                      if shape.window_overhang else "")
            where = (f"and one entry per head of its {len(free)} full-attention layers" if free else
                     "(every layer is windowed: a smaller cache would evict inside the window the model attends to)")
            raise BudgetError(
                f"budget {self} with windows=keep keeps {total} entries of a {seq_len}-token sequence, but the "
                f"model's {len(fixed)} sliding-window layers hold {windowed} (the last W - 1 tokens each, all of "
                f"which the model attends to{hidden}) {where}; raise the budget to at least {in_units} for this length, or "
                "let the windows share the budget (windows=share)"
            )
        if free:
            tokens[free] = spread(total - windowed, len(free) * shape.num_kv_heads, seq_len).view(len(free), -1)
        return Allocation(tokens=tokens, seq_len=seq_len, total=total, full_entries=full, fixed=fixed, held=held,
                          own=own)

    def __str__(self) -> str:
        """The budget as a user writes it (the slack and the window rule are said where they matter)."""
        if self.unit == "fraction":
            return f"{self.value:g}"
        if self.unit == "tokens":
            return f"{self.value:g} tokens"
        return f"{self.value:g}B"


def spread(total: int, cells: int, cap: int) -> torch.Tensor:
    """Split ``total`` entries over ``cells`` heads as evenly as possible, none above ``cap``, none below 1: what
    :func:`distribute` gives equal weights (the remainder to the first cells), in closed form, since a decoding
    step asks for it afresh at every new length."""
    if cells == 0 or cap < 1:
        return distribute(total, torch.ones(cells), cap=cap)
    share, remainder = divmod(max(min(total, cells * cap), cells), cells)
    tokens = torch.full((cells,), share, dtype=torch.long)
    tokens[:remainder] += 1
    return tokens


def distribute(
    total: int,
    weights: torch.Tensor,
    cap: int | torch.Tensor,
    floor: int | torch.Tensor = 1,
) -> torch.Tensor:
    """Integer shares of ``total`` proportional to ``weights``, each within ``[floor, cap]``, summing to ``total``.

    Every cell first gets its floor; the rest is shared in proportion to the weights, cells that would pass their
    cap are fixed at it and the others share again (water filling). Rounding gives the leftover units to the
    largest fractional parts, ties to the first cells, so the result is deterministic. ``total`` is clamped to what
    the floors and caps allow.
    """
    weights = weights.detach().flatten().double().clamp(min=0).cpu()
    cells = weights.numel()
    if cells == 0:
        return torch.zeros(0, dtype=torch.long)
    cap = torch.as_tensor(cap, dtype=torch.double).flatten().expand(cells)
    floor = torch.minimum(torch.as_tensor(floor, dtype=torch.double).flatten().expand(cells), cap)
    total = int(max(min(total, int(cap.sum())), int(floor.sum())))
    capped = torch.zeros(cells, dtype=torch.bool)
    while True:
        free = ~capped
        pool = total - cap[capped].sum() - floor[free].sum()
        share = torch.where(free, weights, 0.0)
        share = share / share.sum() if share.sum() > 0 else free.double() / free.sum().clamp(min=1)
        shares = torch.where(capped, cap, floor + pool * share)
        newly = free & (shares > cap)
        if not newly.any():
            break
        capped |= newly
    base = shares.floor().long()
    leftover = total - int(base.sum())
    if leftover > 0:
        fraction = (shares - base).masked_fill(base >= cap.long(), -1.0)
        base[torch.sort(fraction, descending=True, stable=True).indices[:leftover]] += 1
    return base


@dataclass
class Allocation:
    """Tokens kept per (layer, KV head) for one sequence of ``seq_len`` real tokens; ``tokens.sum() == total``.

    A policy may move entries between the ``free_layers`` (and their heads), none past what the model's own cache
    holds there (``held``: the sequence, or a window's ``W - 1`` and a grouped codec's hidden entries); the ``fixed``
    layers are sliding-window layers
    held whole (a budget with ``windows="keep"``), which hold their window whatever the policy says.
    """

    tokens: torch.Tensor
    """``[num_layers, num_kv_heads]`` long."""
    seq_len: int
    total: int
    fixed: tuple[int, ...] = ()
    """Layers whose allocation the model sets (windows held whole): ``check`` refuses a policy that changes them."""
    full_entries: int = 0
    """Entries of the model's own cache for this sequence, what a fraction is a fraction of (0: the caps' sum)."""
    held: tuple[int, ...] = ()
    """Per layer, entries per head the model's own cache holds (empty: ``seq_len`` in every layer), and in a window
    the entries a grouped codec holds hidden there (``CacheShape.held_whole``)."""
    own: tuple[int, ...] = ()
    """Per layer, entries per head the model's own cache holds, without a grouped codec's hidden entries: what
    layers are shared in proportion to (empty: ``held``)."""

    @property
    def caps(self) -> torch.Tensor:
        """``[num_layers, 1]`` the most entries a head of each layer can keep: what the model's own cache holds (and a
        window's hidden entries, see ``held``)."""
        held = self.held or (self.seq_len,) * self.tokens.shape[0]
        return torch.tensor(held, dtype=torch.long)[:, None]

    @property
    def free_layers(self) -> list[int]:
        """Layers a policy may give more or fewer entries: every layer not held whole."""
        return [layer for layer in range(self.tokens.shape[0]) if layer not in self.fixed]

    @property
    def free_total(self) -> int:
        """Entries the free layers share: the total less what the windows held whole hold."""
        return self.total - int(self.tokens[list(self.fixed)].sum()) if self.fixed else self.total

    def _with(self, tokens: torch.Tensor) -> Allocation:
        return dataclasses.replace(self, tokens=tokens)

    def redistribute(self, weights: torch.Tensor, floor: int | torch.Tensor = 1) -> Allocation:
        """Share the free layers' entries in proportion to ``weights`` (``[layers, kv_heads]``; fixed layers'
        weights are ignored), each head within ``[floor, held]`` (the sequence, or a window's ``W - 1`` and its
        hidden entries); windows held whole keep their window."""
        free = self.free_layers
        tokens = self.tokens.clone()
        if free:
            caps = self.caps.expand_as(self.tokens)[free]
            shares = distribute(self.free_total, weights.reshape(self.tokens.shape)[free], cap=caps, floor=floor)
            tokens[free] = shares.view(len(free), -1)
        return self._with(tokens)

    def with_full_layers(self, layers: Iterable[int]) -> Allocation:
        """Leave ``layers`` uncompressed (each head keeps what the model's own cache holds there) and share what is
        left of the total among the other layers.

        A window held whole named here already holds all the model attends to (its window), so it is left as is.
        """
        num_layers, num_heads = self.tokens.shape
        outside = [layer for layer in layers if not -num_layers <= layer < num_layers]
        if outside:
            raise PolicyConfigError(
                f"layers {outside} do not exist in a model of {num_layers} layers; name layers 0 to "
                f"{num_layers - 1} (or -1 for the last, -2 for the one before, ...)"
            )
        full = sorted({layer % num_layers for layer in layers} - set(self.fixed))
        if not full:
            return self
        caps = self.caps[:, 0]
        rest = [layer for layer in self.free_layers if layer not in full]
        taken = int(caps[full].sum()) * num_heads
        remaining = self.free_total - taken
        if remaining < len(rest) * num_heads:
            windowed = self.total - self.free_total
            full_cache = self.full_entries or windowed + int(caps[self.free_layers].sum()) * num_heads
            needed = (windowed + taken + len(rest) * num_heads) / full_cache
            needed = math.ceil(needed * 1000) / 1000  # rounded up: the budget suggested must be enough
            raise BudgetError(
                f"the budget keeps {self.total} entries, but leaving layers {full} uncompressed already takes "
                f"{taken} of them for a {self.seq_len}-token sequence"
                + (f" (and the sliding-window layers hold {windowed})" if windowed else "")
                + f"; raise the budget to at least {min(needed, 1.0):.3f} of the cache or leave fewer layers "
                "uncompressed"
            )
        tokens = self.tokens.clone()
        tokens[full] = caps[full, None]
        if rest and not self.held:
            tokens[rest] = spread(remaining, len(rest) * num_heads, self.seq_len).view(len(rest), num_heads)
        elif rest:  # as allocate() shares with windows: the same share of what each layer holds
            rest_caps = caps[rest, None].expand(-1, num_heads)
            own = torch.tensor(self.own or self.held, dtype=torch.double)[rest, None].expand(-1, num_heads)
            tokens[rest] = distribute(remaining, own, cap=rest_caps).view(len(rest), num_heads)
        return self._with(tokens)

    def check(self, returned: object, fault: Callable[[str], Exception]) -> Allocation:
        """``returned`` (what a policy's ``allocate()`` made of this allocation) if it keeps the equal-budget
        contract: the same layer × head shape, every head between 1 and the sequence length, no more entries in all
        than this allocation's total, the sliding-window layers unchanged. Checked against this allocation, never
        against the returned one's own ``total``, which a policy could have raised.

        A breach is the policy's fault, not the user's: it raises ``fault(what the policy did)``, which the cache
        makes a :class:`~kvpolicies.errors.PluginError` naming the plugin (a budget too small for the user's
        options, say ``with_full_layers``, is a ``BudgetError`` raised inside ``allocate()`` and passes through).
        """
        if not isinstance(returned, Allocation):
            raise fault(f"returned {type(returned).__name__} from allocate(); it must return an "
                               "Allocation (e.g. allocation.with_full_layers(...) or allocation.redistribute(weights))")
        tokens = returned.tokens
        expected = f"[layers, kv_heads] = {list(self.tokens.shape)}"
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dtype == torch.bool:
            kind = f"a {tokens.dtype} tensor" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise fault(f"returned an Allocation whose tokens are {kind} from allocate(); they "
                               f"must be a {expected} tensor of whole numbers of entries")
        if tuple(tokens.shape) != tuple(self.tokens.shape):
            raise fault(f"returned tokens of shape {list(tokens.shape)} from allocate(); the "
                               f"model has {expected}")
        low, total = int(tokens.min()), int(tokens.sum())
        caps = self.caps.expand_as(self.tokens).clone()
        caps[list(self.fixed)] = self.tokens[list(self.fixed)]  # a window held whole: what it holds (checked below)
        beyond = (tokens.cpu() > caps).nonzero()  # a policy may hand back tokens on its device
        if low < 1 or len(beyond):
            layer = int(beyond[0, 0]) if len(beyond) else int((tokens < 1).nonzero()[0, 0])
            cap = int(caps[layer].max())
            what = ("the sequence length" if cap == self.seq_len else
                    "what the model's own cache holds there: its window of W - 1, and the entries a grouped codec "
                    "holds hidden there until their group slides out")
            raise fault(f"allocated between {int(tokens[layer].min())} and {int(tokens[layer].max())} entries to "
                        f"the heads of layer {layer} in allocate(); each head must keep between 1 and {cap} "
                        f"({what})")
        if total > self.total:
            raise fault(f"allocated {total} entries in allocate(), more than the budget's "
                               f"{self.total}; reallocation must move entries, not add them")
        moved = [layer for layer in self.fixed if not torch.equal(tokens[layer], self.tokens[layer])]
        if moved:
            raise fault(
                f"changed the allocation of sliding-window layers {moved} in allocate(), which hold exactly the "
                "window the model attends to; move entries between allocation.free_layers only (e.g. with "
                "allocation.redistribute(weights))"
            )
        if (tuple(returned.fixed), tuple(returned.held), tuple(returned.own)) != (self.fixed, self.held, self.own):
            returned = Allocation(tokens=tokens, seq_len=returned.seq_len, total=returned.total,
                                  full_entries=self.full_entries, fixed=self.fixed, held=self.held, own=self.own)
        return returned
