"""Storage codecs: how a kept entry's key and value are stored, and read back for the attention.

Why a stage of its own: eviction decides *which* entries stay; a codec decides *how* they are held (full precision,
integers with per-group scales, fewer key channels). The two compose: any policy with any codec, under one budget
in bytes, where an entry costs what the codec really stores (:meth:`Codec.entry_bytes`, scales and zero-points
included). The cache checks that claim against the codec's own tensors when it is built, and resident bytes are
read from the stored tensors, so "equal memory" stays a measured fact for every codec.

How a layer uses one (see :mod:`kvpolicies.engine.storage`): new tokens are encoded as they arrive and appended, in
the layer's layout, to the codec's stored tensors; their forward pass attends to them at full precision, as
transformers' ``QuantizedCache`` does at prefill. Before each later forward pass the layer decodes what it holds
into a working copy, which the attention and the policy's scoring read, and drops it once its attention and
eviction are done: between forward passes only the codec's tensors are resident. A decoded layer is transient
memory like an activation, paid one layer at a time; the one exception is an after-prefill stage, which reads every
layer at once and so holds every layer decoded while it chooses (the prompt at full precision, as without a
codec: the stage's peak is the prompt's either way).

Two shapes of codec. A :class:`Codec` encodes each entry on its own (per-token quantization): the stored tensors
are per entry, ``[..., n]`` for entries ``[..., head_dim]``, so eviction selects, packs and appends them exactly
like keys. A :class:`GroupedCodec` encodes ``group`` consecutive entries of one head together (KIVI's keys, one
scale per channel across the group) and holds each head's newest entries at full precision, its ``residual``, until
a whole group is older than them: see :mod:`kvpolicies.engine.residual` for how a layer holds that, and
:class:`~kvpolicies.engine.budget.CacheShape` for how the budget charges the full-precision entries.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class Codec:
    """How entries are stored. Subclass it, set ``name``, and implement the three methods.

    ``encode`` and ``decode`` must be elementwise over entries: entry ``i``'s stored rows depend on entry ``i``
    alone, whatever the leading dimensions (``[batch, kv_heads, seq]`` while a layer is dense, ``[entries]`` once
    it is packed).
    """

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    """True only when the stored tensors *are* the keys and values (full precision): the layer then stores them
    directly, with no encode or decode on the hot path."""

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one entry (the key and the value of one token in one KV head) takes as stored, scales and
        zero-points included, for keys of ``head_dim`` channels in ``dtype``. The budget buys entries at this
        price; the cache checks it against :meth:`encode`'s tensors."""
        raise NotImplementedError

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored form of ``keys`` and ``values`` (``[..., head_dim]``): named tensors ``[..., n]`` with the same
        leading dimensions, any dtype and any ``n`` per name."""
        raise NotImplementedError

    def decode(self, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[..., head_dim]`` in ``dtype`` read back from what :meth:`encode` returned (possibly
        selected, packed and appended to since)."""
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().split("\n")[0]


class FullPrecision(Codec):
    """Keys and values as the model computed them (the default; no encode, no decode)."""

    name = "full"
    lossless = True

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * head_dim * torch.empty((), dtype=dtype).element_size()

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"keys": keys, "values": values}

    def decode(self, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return stored["keys"].to(dtype), stored["values"].to(dtype)


class GroupedCodec(Codec):
    """How entries are stored when ``group`` consecutive entries of one head are encoded together, or with
    parameters fitted to each head. Subclass it, set ``name``, ``group`` and ``residual``, and implement
    ``entry_bytes``, ``encode`` and ``decode`` on groups (and ``fit``, with ``fits = True``).

    Each head keeps its newest entries at full precision, from ``residual`` up to ``residual + group - 1`` of them
    (all of a shorter run): an entry is encoded once a whole group of entries older than the ``residual`` newest
    has formed, so the recent tokens, which most queries attend to, are never quantized (KIVI's residual).
    Eviction reads every entry decoded: each run keeps the groups before its first cut entry, and the entries after
    them are grouped and encoded again (a cut among the newest entries may leave fewer than ``residual`` in full).

    A codec that ``fits`` chooses parameters for each run (one sequence's entries in one KV head) once, in the
    first pass that holds a token of every sequence, from the layer's entries and that pass's last queries (ThinK's
    key channels, chosen by the prompt's last queries): see :meth:`fit`. The parameters are kept per layer and run and
    handed to ``encode`` and ``decode`` row by row, one row per group, as ``fitted``.
    """

    group: ClassVar[int] = 32
    """Consecutive entries of one head encoded together."""
    residual: ClassVar[int] = 0
    """Newest entries of each head left unencoded (held at full precision): ``residual`` to ``residual + group -
    1`` of them as entries arrive."""
    fits: ClassVar[bool] = False
    """Whether the codec chooses parameters per run (:meth:`fit`) before it encodes anything."""
    fit_queries: ClassVar[int | None] = None
    """How many of the pass's last queries :meth:`fit` reads (None: all of them)."""

    def fit(self, keys: torch.Tensor, valid: torch.Tensor, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters for each run, from its entries ``keys`` ``[runs, seq, head_dim]`` (``valid`` ``[runs, seq]``
        False on padding) and the queries of the pass that brought them, ``[runs, query_heads, q_len, head_dim]``
        (the query heads sharing the run's KV head, the last ``fit_queries`` of the pass; a padded position's query
        is zero): named tensors ``[runs, ...]``, at least one. Called once per layer, in the first pass that holds a
        real token of every sequence (the prompt's prefill, or its first chunk), with the layer's working copy (what
        the model attends to); also with zero runs when a layer is set up (for the parameters' shapes), and with
        two runs of one group each when the cache is built (the codec's trial)."""
        raise NotImplementedError

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one encoded entry takes: a group's stored bytes over ``group`` (a whole number). The entries held at
        full precision cost ``2 × head_dim × dtype bytes`` each, which the budget charges apart."""
        raise NotImplementedError

    def encode(self, keys: torch.Tensor, values: torch.Tensor,
               fitted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stored form of ``keys`` and ``values`` ``[groups, group, head_dim]`` (each group the consecutive entries
        of one head, oldest first): named tensors ``[groups, ...]``, any dtype, group ``i``'s rows depending on group
        ``i`` alone. ``fitted``: each group's row of its run's parameters (empty unless the codec ``fits``)."""
        raise NotImplementedError

    def decode(self, stored: dict[str, torch.Tensor], dtype: torch.dtype,
               fitted: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[groups, group, head_dim]`` in ``dtype`` read back from what :meth:`encode` returned
        (possibly with groups removed and added since), with each group's ``fitted`` row as in :meth:`encode`."""
        raise NotImplementedError

    @property
    def most_at_full_precision(self) -> int:
        """The most entries a head holds at full precision: ``residual + group - 1``."""
        return self.residual + self.group - 1


def checked_entry_bytes(codec: Codec, head_dim: int, dtype: torch.dtype, device: torch.device, fault) -> int:
    """``codec.entry_bytes(head_dim, dtype)``, once :meth:`Codec.encode` and :meth:`Codec.decode` were seen to keep
    their contract on two entries: the declared price equals the bytes encode stores per entry, the stored tensors
    keep the entries' leading dimensions, and decode gives back keys and values of the right shape and dtype.
    ``fault(what)`` builds the error naming the plugin; what a codec raises is wrapped by the caller."""
    declared = codec.entry_bytes(head_dim, dtype)
    if not isinstance(declared, int) or isinstance(declared, bool) or declared < 1:
        raise fault(f"returned {declared!r} from entry_bytes(); it must return a positive whole number of bytes")
    if isinstance(codec, GroupedCodec):
        return _checked_group_bytes(codec, declared, head_dim, dtype, device, fault)
    # Fixed values, not random ones: building a cache must not move the random stream a sampled generation uses.
    keys = torch.linspace(-2, 2, 2 * head_dim, device=device).view(1, 1, 2, head_dim).to(dtype)
    values = keys.flip(-1) * 0.5
    stored = codec.encode(keys, values)
    if not isinstance(stored, dict) or not stored or not all(
            isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in stored.items()):
        raise fault(f"returned {type(stored).__name__} from encode(); it must return a dict of named tensors")
    wrong = {name: list(t.shape) for name, t in stored.items() if t.ndim != 4 or t.shape[:3] != keys.shape[:3]}
    if wrong:
        raise fault(f"returned tensors of shapes {wrong} from encode() for entries of shape {list(keys.shape)}; "
                    "each stored tensor must keep the entries' leading dimensions and add one of its own, [..., n]")
    stored_bytes = sum(t[0, 0, 0].numel() * t.element_size() for t in stored.values())
    if stored_bytes != declared:
        raise fault(f"stores {stored_bytes} bytes per entry in encode() but declares {declared} in entry_bytes(); "
                    "the budget buys entries at the declared price, so the two must agree (count every stored "
                    "tensor: codes, scales, zero-points)")
    # As a dense layer holds entries ([batch, kv_heads, seq, n]), then as a packed one ([entries, n]).
    for shape, held in ((keys.shape, stored), (keys.shape[2:], {name: t[0, 0] for name, t in stored.items()})):
        decoded = codec.decode(held, dtype)
        if not (isinstance(decoded, tuple) and len(decoded) == 2 and all(
                isinstance(t, torch.Tensor) and t.shape == shape and t.dtype == dtype for t in decoded)):
            raise fault(f"returned {type(decoded).__name__} from decode() for entries of shape {list(shape)}; it "
                        f"must return (keys, values), each of that shape and dtype {dtype}, whatever the leading "
                        "dimensions (a packed layer holds [entries, n])")
    return declared


def _checked_group_bytes(codec: GroupedCodec, declared: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device, fault) -> int:
    """:func:`checked_entry_bytes` for a grouped codec, tried on two groups."""
    group, residual = codec.group, codec.residual
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (group, residual)) or group < 1 or residual < 0:
        raise fault(f"declares group={group!r} and residual={residual!r}; a grouped codec encodes a positive whole "
                    "number of entries together and keeps a whole number (0 or more) at full precision")
    keys = torch.linspace(-2, 2, 2 * group * head_dim, device=device).view(2, group, head_dim).to(dtype)
    values = keys.flip(-1) * 0.5
    fitted = {}
    if codec.fits:  # two runs of one group each, read by their own keys as queries
        fitted = codec.fit(keys, torch.ones(keys.shape[:2], dtype=torch.bool, device=device), keys.flip(1)[:, None])
        if not isinstance(fitted, dict) or not fitted or not all(
                isinstance(name, str) and isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == 2
                for name, t in fitted.items()):
            raise fault(f"returned {type(fitted).__name__} from fit() for two runs; it must return a dict of named "
                        "tensors with one row per run, [runs, ...]")
    stored = codec.encode(keys, values, fitted)
    if not isinstance(stored, dict) or not stored or not all(
            isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in stored.items()):
        raise fault(f"returned {type(stored).__name__} from encode(); it must return a dict of named tensors")
    wrong = {name: list(t.shape) for name, t in stored.items() if t.ndim < 1 or t.shape[0] != 2}
    if wrong:
        raise fault(f"returned tensors of shapes {wrong} from encode() for two groups of shape {list(keys.shape)}; "
                    "each stored tensor must have one row per group, [groups, ...]")
    group_bytes = sum(t[0].numel() * t.element_size() for t in stored.values())
    if group_bytes != declared * group:
        raise fault(f"stores {group_bytes} bytes per group of {group} entries in encode() but declares "
                    f"{declared} per entry in entry_bytes(), {declared * group} per group; the budget buys entries "
                    "at the declared price, so the two must agree (count every stored tensor: codes, scales, "
                    "zero-points)")
    for held, rows in ((stored, fitted), ({name: t[1:] for name, t in stored.items()},
                                          {name: t[1:] for name, t in fitted.items()})):
        shape = (held[next(iter(held))].shape[0], group, head_dim)
        decoded = codec.decode(held, dtype, rows)
        if not (isinstance(decoded, tuple) and len(decoded) == 2 and all(
                isinstance(t, torch.Tensor) and t.shape == shape and t.dtype == dtype for t in decoded)):
            raise fault(f"returned {type(decoded).__name__} from decode() for {shape[0]} groups; it must return "
                        f"(keys, values), each of shape [groups, {group}, {head_dim}] and dtype {dtype}")
    return declared
