"""How one decoder layer stores its KV entries: dense until the first eviction, packed runs after it.

Layout. A layer starts *dense* like transformers' ``DynamicLayer`` (``[batch, kv_heads, seq, head_dim]``). The
first eviction turns it *packed*: keys and values become ``[entries, head_dim]`` tensors holding, one run after
another, the kept entries of every (sequence, KV head) pair in age order, with the run lengths kept as Python ints.
Runs may differ in length (per-head budgets, sequences of different lengths), and padding is never stored, so the
memory really is freed. When all runs have one length the packed tensor *is* the dense layout (a free view).

Two lengths. ``get_seq_length()`` is the logical number of tokens seen (RoPE positions continue from it), while a
packed layer holds fewer entries; masks of packed layers are built by :mod:`kvpolicies.engine.attention`.

Codecs. With a lossy storage codec (:mod:`kvpolicies.engine.codecs`) a layer holds the codec's tensors, in the
same layout, instead of keys and values; each forward pass decodes them into a working copy that its attention and
eviction read, and drops it at the end (``settle()``). Full precision stores keys and values directly. A grouped
codec's tensors are per group, not per entry: the layer holds them as a
:class:`~kvpolicies.engine.residual.Residual` (whole groups encoded, each run's newest entries in full), encodes
at ``settle()`` what the pass appended, and encodes afresh what an eviction re-laid.

Sliding-window layers. A layer the model windows to ``W`` tokens drops, after each forward, what lies before its
last ``W - 1`` positions, as transformers' ``DynamicSlidingWindowLayer`` does, and reports the same mask sizes, so
while it is dense the model builds its own sliding mask and runs its own attention there. Where the budget lets the
windows share it (``Budget.windows``), the policy also chooses among a window's entries, and the layer packs like
any other: it then keeps each entry's position (``positions``), since age order no longer says how far back an entry
lies, and the kvpolicies attention hides from every query what lies outside its window. Entries that slide out of a
packed window stay stored, hidden, until a run holds more than ``W - 1`` plus the budget's slack, or an eviction
comes first (dropping them at every step would read their count back from the device at every step). Under a
grouped codec a window drops a group only once all of it slid out, so no group is split and encoded again: up to
``group - 1`` more entries wait, hidden (a dense layer hands the attention its keys without them); the layer keeps
positions whether dense or packed, and a re-laid run waits for ``W - 1 + group - 1`` plus the slack.

The hand-off to the attention. transformers calls ``cache.update(keys, values, layer_idx)`` and then the
attention function with the tensors it returned, but never tells the attention which cache they came from. The
attention needs the layer to read packed runs (their lengths are not in the tensors) and the cache to decide,
once the keys are read, what the layer keeps. So the cache's ``update()`` leaves ``(cache, layer, keys)`` in a
thread-local slot (:func:`hand_over`) and the kvpolicies attention claims it with :func:`claim_layer`, matching
the keys tensor by identity: any other cache (a plain ``DynamicCache``, another model in the same thread) never
matches, and concurrent generations in threads never see each other's slot. A layer is a container: it stores,
appends, packs and reads back, and never calls the cache that owns it; the cache decides (see
:meth:`kvpolicies.engine.cache.CompressedCache.after_attention`). This module imports neither the cache nor the
attention, so the three form no import cycle.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from kvpolicies.engine.codecs import Codec, FullPrecision, GroupedCodec
from kvpolicies.engine.paths import launch_bound
from kvpolicies.engine.residual import Residual
from kvpolicies.engine.runs import Counts, take
from kvpolicies.engine.selection import age_order
from kvpolicies.engine.signals import LogitScale, Reduce, SlidingWindow, Track, attention_received
from kvpolicies.engine.step import Step
from kvpolicies.errors import UsageError


_pending = threading.local()

CODE, TRACK = "code:", "track:"
"""Prefixes of a codec's tensors and of a policy's tracks among a layer's per-entry tensors (either may name one
``keys``)."""


def hand_over(owner: Any, layer: CompressedLayer | RowLayers, keys: torch.Tensor) -> None:
    """Leave ``layer`` of ``owner`` (its cache), which just returned ``keys``, for the attention to claim."""
    _pending.owner, _pending.layer, _pending.keys = owner, layer, keys


def claim_layer(keys: torch.Tensor) -> tuple[Any, CompressedLayer | RowLayers] | None:
    """``(cache, layer)`` whose update just returned ``keys``, or None for any other cache."""
    layer = getattr(_pending, "layer", None)
    if layer is None or getattr(_pending, "keys", None) is not keys:
        return None
    owner = _pending.owner
    _pending.owner = _pending.layer = _pending.keys = None
    return owner, layer


@dataclass(frozen=True)
class RowLayers:
    """One layer of several caches decoded as the rows of one batch (:mod:`kvpolicies.engine.rows`): row ``i`` is
    ``owners[i]``'s ``layers[i]``, whose update returned ``keys[i]`` and ``values[i]`` (``[1, kv_heads, seq,
    head_dim]``)."""

    owners: tuple[Any, ...]
    layers: tuple[CompressedLayer, ...]
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]


def window_overhang(window: int | None, codec: Codec) -> int:
    """The most entries a run of a layer windowed to ``window`` keeps beyond its ``W - 1`` under ``codec``: a
    grouped codec's oldest group waits until all of it slid out, up to ``group - 1`` entries, once a window is long
    enough to encode groups at all (more than the codec's ``residual + group - 1`` newest, which it holds in full)."""
    if window is None or not isinstance(codec, GroupedCodec) or window - 1 <= codec.most_at_full_precision:
        return 0
    return codec.group - 1


def droppable(hidden: int, encoded: int, group: int) -> int:
    """Of a run's ``hidden`` oldest entries (slid out of its window), how many can go when its ``encoded`` oldest
    are held in groups of ``group``: the whole groups among them, or all of them once every group is among them."""
    return hidden if hidden >= encoded else hidden // group * group


def held_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the storage behind ``tensors``, each storage once: a small view of a large tensor counts the large
    one, because that is what it keeps alive."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's entries, dense until the first eviction and packed after it.

    Besides keys and values a layer may carry per-entry tracks in the same layout (the attention each entry has
    accumulated, or another :class:`~kvpolicies.engine.signals.Track` a policy reads) and a rolling buffer of the
    most recent queries. With a lossy codec the
    codec's tensors are stored instead of keys and values (``codes``), and ``keys``/``values`` are a working copy
    that exists only during the layer's forward pass.
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, layer_idx: int, window: int | None = None, codec: Codec | None = None,
                 tracks: tuple[Track, ...] = (), window_compressed: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.codec = codec or FullPrecision()
        """How entries are stored (:mod:`kvpolicies.engine.codecs`)."""
        self.tracked_by = tracks
        """The tracks the layer keeps beside its entries (:class:`~kvpolicies.engine.signals.Track`)."""
        self.window = window
        """The model's sliding window for this layer (None: full attention, compressed by the policy)."""
        self.window_compressed = window is not None and window_compressed
        """A sliding-window layer whose entries the policy chooses among (it may pack, so it keeps positions)."""
        self.scored = window is None or self.window_compressed
        """Whether the policy chooses among this layer's entries (every layer but a window held whole)."""
        self.grouped_window = window is not None and isinstance(self.codec, GroupedCodec)
        """A window under a grouped codec: its oldest group is dropped whole once all of it slid out (see
        :meth:`slide`), so a run may hold up to ``overhang`` entries its window hides."""
        self.overhang = window_overhang(window, self.codec)
        """The most entries a run keeps beyond its window's ``W - 1`` (before its next slide or cut)."""
        self.is_sliding = window is not None  # read by transformers to build this layer's mask
        self.reset()

    def reset(self) -> None:
        self.keys = self.values = None
        self.codes: dict[str, torch.Tensor] | None = None
        """A lossy codec's stored tensors by name, in the layer's layout (None: keys and values are stored). Never
        edited in place: a new dict on every change, so a saved state (an after-prefill probe's) stays valid."""
        self.residual: Residual | None = None
        """A grouped codec's stored form (None with any other codec); a new one on every change, like ``codes``."""
        self.intact: Counts | None = None
        """Set when this forward pass re-laid the entries (not only appended or dropped new padding): how many
        leading entries of each run it left in place, which a grouped codec keeps encoded as they were."""
        self.fit_queries: torch.Tensor | None = None
        """This pass's last queries, ``[batch, heads, n, head_dim]`` (zero where padded), while a fitting codec
        (ThinK) has yet to choose its parameters (set by the cache, dropped when the pass settles)."""
        self.tracked: dict[str, torch.Tensor] = {}
        """The policy's tracks by name (:class:`~kvpolicies.engine.signals.Track`), ``[..., 1]`` float32 in the
        layer's layout; a new dict on every change, like ``codes``."""
        self._queries: torch.Tensor | None = None  # a ring of the recent queries: see ``remember_queries``
        self._oldest = 0  # where its oldest row is
        self.positions: torch.Tensor | None = None
        """A sliding-window layer's entries' positions in the sequence, ``[..., 1]`` int32 in the layer's layout
        (kept where a run may hold entries its window hides: the policy chooses among them, or a codec groups)."""
        self.hidden = 0
        """Columns a dense window holds before its last ``W - 1``: its oldest group's entries that slid out, which
        the attention is handed without (a view), so the model's own sliding mask and kernels see the window as
        they would without a codec. 0 once the layer is packed (its positions hide them)."""
        self.cut = False
        """Whether an eviction re-laid the runs: until then each run holds consecutive positions up to the newest,
        so the host knows how many of its entries a window hides without reading positions back."""
        self.is_initialized = False
        self.logical_length = 0
        self.packed = False
        self.lengths: list[int] = []
        self.run_lengths: torch.Tensor | None = None  # packed only: ``lengths`` on the device, so no upload per use
        self.uniform = True
        self.valid: torch.Tensor | None = None  # dense only: [batch, seq] bool, False on padding
        self.seen: list[int] = []  # real tokens seen per sequence
        self.awaiting_attention = False
        self._places: tuple[int, torch.Tensor, torch.Tensor] | None = None  # see _append_places
        self._slots: tuple[int, torch.Tensor] | None = None  # see _padded_slots

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        if isinstance(self.codec, GroupedCodec):
            self.residual = Residual.empty(self.codec, self.batch_size * self.num_heads, key_states)
        elif not self.codec.lossless:
            self.codes = self.codec.encode(self.keys, self.values)
        self.tracked = {track.name: key_states.new_zeros(self.batch_size, self.num_heads, 0, 1, dtype=torch.float32)
                        for track in self.tracked_by}
        if self.window_compressed or self.grouped_window:
            self.positions = key_states.new_zeros(self.batch_size, self.num_heads, 0, 1, dtype=torch.int32)
        self.valid = torch.zeros(self.batch_size, 0, dtype=torch.bool, device=self.device)
        self.seen = [0] * self.batch_size
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens; return what the attention reads (dense, or packed for kvpolicies attention)."""
        if self.awaiting_attention:
            raise RuntimeError(
                "CompressedCache was updated twice without its attention running: the model is not using the "
                "kvpolicies attention. Build the cache with CompressedCache(model, ...) or call "
                "kvpolicies.prepare_model(model) before generating."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q_len, _ = key_states.shape
        self._places = None  # the run lengths the appends are placed by: this forward's
        if self.codes is not None:
            if self.keys is None:  # settled since the last forward: read what is stored back for this one
                self.keys, self.values = self.codec.decode(self.codes, self.dtype)
            fresh = self.codec.encode(key_states, value_states)
            self.codes = {name: self._append(stored, fresh[name]) for name, stored in self.codes.items()}
        elif self.residual is not None and self.keys is None:  # settled: the working copy, from what is stored
            self.keys, self.values = self._keys_values()
        self.keys = self._append(self.keys, key_states)  # this forward attends to its new tokens as computed
        self.values = self._append(self.values, value_states)
        if self.tracked:
            zeros = key_states.new_zeros(batch, heads, q_len, 1, dtype=torch.float32)
            self.tracked = {name: self._append(t, zeros) for name, t in self.tracked.items()}
        if self.positions is not None:
            new = torch.arange(self.logical_length, self.logical_length + q_len, dtype=torch.int32,
                               device=self.device)
            self.positions = self._append(self.positions, new[:, None].expand(batch, heads, q_len, 1))
        if self.packed:
            self.lengths = [n + q_len for n in self.lengths]
            self.run_lengths = self.run_lengths + q_len
            self._slots = None
        self.logical_length += q_len
        self.awaiting_attention = True
        return self.keys, self.values

    def _append(self, stored: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Append ``new`` (``[batch, kv_heads, q_len, dim]``) at the end of every head's run."""
        if not self.packed:
            return torch.cat([stored, new], dim=-2)
        batch, heads, q_len, dim = new.shape
        if self.uniform:
            old = stored.view(batch, heads, self.lengths[0], dim)
            return torch.cat([old, new], dim=2).view(-1, dim)
        if not launch_bound(self.device):  # a CPU: one copy of the pieces in order is cheapest (engine.paths)
            runs = stored.split(self.lengths)
            fresh = new.reshape(batch * heads, q_len, dim).unbind(0)
            return torch.cat([piece for pair in zip(runs, fresh) for piece in pair])
        # Ragged runs where launches cost: two index copies into the grown tensor, however many runs (a split and a
        # cat would handle 2 · batch · heads pieces per layer per step). The places are computed once per forward.
        old_places, new_places = self._append_places(q_len)
        grown = stored.new_empty(stored.shape[0] + new_places.numel(), dim)
        grown.index_copy_(0, old_places, stored)
        return grown.index_copy_(0, new_places, new.reshape(-1, dim))

    def _append_places(self, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the stored entries and the ``q_len`` new ones of every run go once the runs grow by ``q_len``:
        ``(old places [stored entries], new places [runs * q_len])``, computed on the device from the run lengths
        before the update, and shared by keys, values and tracks of one forward."""
        if self._places is None or self._places[0] != q_len:
            total = sum(self.lengths)
            runs = torch.arange(1, len(self.lengths) + 1, device=self.device)  # run r is number r + 1
            # Entry i of run r moves down by the r · q_len new entries of the runs before it.
            moved = runs.repeat_interleave(self.run_lengths, output_size=total)  # output_size: no host read
            old = torch.arange(-q_len, total - q_len, device=self.device).add_(moved, alpha=q_len)
            ends = self.run_lengths.cumsum(0).add_(runs, alpha=q_len)  # each run's end once grown
            new = ends[:, None] - torch.arange(q_len, 0, -1, device=self.device)
            self._places = (q_len, old, new.flatten())
        return self._places[1], self._places[2]

    def settle(self, encode: bool = True, hold: bool = False) -> None:
        """Drop the working copy of a lossy codec's layer: between forward passes only its codes are resident. A
        grouped codec first encodes what the pass brought (see :mod:`kvpolicies.engine.residual`), unless the pass
        is to be forgotten (``encode=False``: an after-prefill probe, whose state is restored after).

        ``hold``: a choice is still to come over every entry (an after-prefill stage): hold them all as computed,
        so that what it keeps is encoded once, from full precision, and not read back from codes and encoded again
        in shifted groups. The stage decodes every layer at once to score them, so holding them costs no peak.
        Only while nothing is encoded (a stage run by hand between chunks finds earlier survivors encoded)."""
        if self.residual is not None and self.keys is not None and encode:
            begun = all(self.seen)  # every sequence holds a real token
            if self.fit_queries is not None and not self.residual.fitted and begun:
                self.residual = self.residual.with_fitted(self._fit())  # the first pass with every prompt begun
            padded = not self.packed and any(n < self.keys.shape[2] for n in self.seen)
            unfitted = self.codec.fits and not self.residual.fitted
            hold = hold and not any(self.residual.encoded.host)
            if hold or (not begun and (padded or unfitted)):  # nothing to group or fit yet: hold it all as computed
                self.residual = self.residual.held(*self._flat_working_copy())
            else:
                if padded:
                    self._pack_real()  # a left-padded batch: each run's groups start at its prompt's first token
                keys, values, lengths = self._flat_working_copy()
                if self.intact is None:
                    self.residual = self.residual.extended(keys, values, lengths, self._fit)
                else:
                    self.residual = self.residual.relaid(keys, values, lengths, self.intact, self._fit)
        self.fit_queries = self.intact = None
        if self.codes is not None or self.residual is not None:
            self.keys = self.values = None

    def _flat_working_copy(self) -> tuple[torch.Tensor, torch.Tensor, Counts]:
        """The working copy as ``[entries, head_dim]`` keys and values, and its runs' lengths."""
        head_dim = self.keys.shape[-1]
        lengths = (Counts(tuple(self.lengths), self.run_lengths) if self.packed else
                   Counts.same(self.keys.shape[2], self.batch_size * self.num_heads))
        return self.keys.reshape(-1, head_dim), self.values.reshape(-1, head_dim), lengths

    def _fit(self) -> dict[str, torch.Tensor]:
        """A fitting codec's parameters for every run, from the working copy and this pass's queries."""
        if self.fit_queries is None:
            raise UsageError(f"codec {self.codec.name!r} chooses its parameters with the queries of the first pass "
                             "that holds a token of every sequence, and this layer must encode in a pass that brought "
                             "no queries; run a forward pass over a token of every sequence first")
        keys, _, valid = self.dense_view(tracks=False)
        batch, query_heads, count, head_dim = self.fit_queries.shape
        grouped = self.fit_queries.reshape(batch * self.num_heads, query_heads // self.num_heads, count, head_dim)
        fitted = self.codec.fit(keys.flatten(0, 1), valid.flatten(0, 1), grouped)
        self.fit_queries = None
        return fitted

    def _keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as the attention reads them: stored, the working copy, or decoded now."""
        if self.keys is None and self.codes is not None:
            return self.codec.decode(self.codes, self.dtype)
        if self.keys is None and self.residual is not None:
            keys, values = self.residual.decoded(self.dtype)
            if self.packed:
                return keys, values
            shape = (self.batch_size, self.num_heads, -1, keys.shape[-1])
            return keys.view(shape), values.view(shape)
        return self.keys, self.values

    def record_probe(self, q_len: int, new_valid: torch.Tensor | None = None) -> None:
        """The attention of an after-prefill probe has read the layer: mark its ``q_len`` new tokens real, or those
        ``new_valid`` (``[batch, q_len]``) says are (a right-padded probe). The stage restores the layer's state
        after the pass."""
        self.awaiting_attention = False
        if not self.packed:
            new = self.valid.new_ones(self.batch_size, q_len) if new_valid is None else new_valid
            self.valid = torch.cat([self.valid, new], dim=1)
        elif new_valid is not None and not bool(new_valid.all()):
            raise ValueError("a padded probe runs over layers the stage has not compressed yet; this layer was "
                             "compressed by an earlier stage: probe with every sequence's tokens real")

    def record(self, step: Step) -> None:
        """The attention has read the layer: count the pass's real new tokens, and keep its padding out of a packed
        layer (a dense one marks it invalid)."""
        self.awaiting_attention = False
        self.seen = [s + n for s, n in zip(self.seen, step.real)]
        if not self.packed:
            new_valid = step.new_valid
            if new_valid is None:
                new_valid = torch.ones(self.batch_size, step.q_len, dtype=torch.bool, device=self.device)
            self.valid = torch.cat([self.valid, new_valid], dim=1)
        elif step.new_valid is not None and step.padded:
            self._drop_new_padding(step.new_valid, [step.q_len - n for n in step.real])

    @property
    def recent_queries(self) -> torch.Tensor | None:
        """The last queries kept (``[batch, heads, <= query_window, head_dim]``), oldest first: a copy, since the
        ring is written in place."""
        if self._queries is None:
            return None
        if self._oldest == 0:
            return self._queries.clone()
        return torch.cat([self._queries[:, :, self._oldest:], self._queries[:, :, : self._oldest]], dim=2)

    def remember_queries(self, query: torch.Tensor, window: int) -> None:
        """Keep the last ``window`` queries in a ring: once it is full, a step writes its rows over the oldest in
        place (one small copy, and nothing allocated, per layer per decoding step), and the ring is put in order
        only when an eviction reads it. Never a slice of ``query``: a view would keep the whole prompt's queries
        alive in every layer."""
        if query.shape[2] == 1 and self._queries is not None and self._queries.shape[2] == window:  # decoding
            self._queries.narrow(2, self._oldest, 1).copy_(query)
            self._oldest = (self._oldest + 1) % window
            return
        new = query[:, :, -window:]
        count = new.shape[2]
        if self._queries is None or count == window:
            self._queries, self._oldest = new.clone(), 0
        elif self._queries.shape[2] < window:  # still filling (a prompt shorter than the window): grow in order
            self._queries = torch.cat([self.recent_queries, new], dim=2)[:, :, -window:]
            self._oldest = 0
        else:
            first = min(count, window - self._oldest)  # rows up to the ring's end, then the rest from its start
            self._queries[:, :, self._oldest : self._oldest + first] = new[:, :, :first]
            self._queries[:, :, : count - first] = new[:, :, first:]
            self._oldest = (self._oldest + count) % window

    def _drop_new_padding(self, new_valid: torch.Tensor, pads: list[int]) -> None:
        """Remove the padding among the ``q_len`` entries just appended to every run of a packed layer.

        Why: a packed layer tracks no validity (its runs hold real entries only), so padding it appended would be
        attended by every later query and counted as kept. It arrives where a left-padded batch is prefilled in
        chunks and a prompt's padding outlasts the first chunk. ``new_valid``: ``[batch, q_len]`` bool; ``pads``:
        the padded positions of each sequence among them, as the host already read them.
        """
        q_len = new_valid.shape[1]
        ends = self.run_lengths.cumsum(0)
        new = ends[:, None] - q_len + torch.arange(q_len, device=self.device)  # [runs, q_len] storage indices
        keep = torch.ones(sum(self.lengths), dtype=torch.bool, device=self.device)
        keep.scatter_(0, new.flatten(), new_valid.repeat_interleave(self.num_heads, dim=0).flatten())
        self.lengths = [n - pads[run // self.num_heads] for run, n in enumerate(self.lengths)]
        self.run_lengths = self.run_lengths - (~new_valid).sum(1).repeat_interleave(self.num_heads)
        self.uniform = len(set(self.lengths)) == 1
        self._slots = None
        self._select(self.tracks(), keep, sum(self.lengths))

    def slide(self, slack: int = 0) -> None:
        """Drop what a window's next query cannot see, once the pass has read it.

        A dense layer keeps its last ``W - 1`` positions: a copy, so the dropped entries' memory is freed (a view
        would keep the whole prompt alive). A packed one hides what slid out (see ``window_view``) until a run
        holds more than ``W - 1`` plus ``slack`` (the budget's) or its next eviction comes: so it reads its runs'
        lengths back at most once every ``slack + 1`` decoding steps.

        Under a grouped codec an entry goes with its whole group, once all of the group slid out, so no group is
        split and encoded again: up to ``group - 1`` entries of the oldest group wait, hidden by their positions.
        Runs no eviction re-laid hold consecutive positions up to the newest, so the host knows how many of their
        entries slid out and they slide at every pass; re-laid runs are read back like a packed window's."""
        limit = self.window - 1
        if self.grouped_window and not self.cut:
            held = self.lengths if self.packed else [self.valid.shape[1]] * (self.batch_size * self.num_heads)
            out = tuple(max(n - limit, 0) for n in held)
            if any(out):
                self._drop_leading(self._droppable(Counts(out, (self.run_lengths - limit).clamp(min=0)
                                                          if self.packed and len(set(out)) > 1 else None)))
            self.hidden = 0 if self.packed else max(self.valid.shape[1] - limit, 0)
        elif self.packed:  # (a re-laid run may form groups past W - 1 while it grows by the slack)
            if max(self.lengths) > limit + (self.codec.group - 1 if self.grouped_window else 0) + slack:
                self.drop_slid_out()
        elif self.keys.shape[2] > limit:
            self._drop_leading(Counts.same(self.keys.shape[2] - limit, self.batch_size * self.num_heads))

    def window_view(self, positions: torch.Tensor | None, q_len: int) -> SlidingWindow | None:
        """What this forward's ``q_len`` queries see through a sliding window, for ``positions`` (``[batch,
        kv_heads, seq]``, from a view of the layer), or None for a full-attention layer."""
        if self.window is None or positions is None:
            return None
        return SlidingWindow(positions, self.logical_length - q_len, self.window)

    def in_window(self, positions: torch.Tensor) -> torch.Tensor:
        """Which entries (``positions`` from a view of the layer) the next forward's first query can see."""
        return positions >= self.logical_length - self.window + 1

    def drop_slid_out(self) -> None:
        """Drop the entries of a packed window that its next query cannot see (under a grouped codec, the whole
        groups among them). One host read, the count of each run's."""
        hidden = (~self.in_window(self.positions[:, 0])).long()
        total = hidden.shape[0]
        run_of = torch.arange(len(self.lengths), device=self.device).repeat_interleave(self.run_lengths,
                                                                                     output_size=total)
        counts = torch.zeros_like(self.run_lengths).index_add_(0, run_of, hidden)
        self._drop_leading(self._droppable(Counts(tuple(counts.tolist()), counts)))

    def _droppable(self, hidden: Counts) -> Counts:
        """Of each run's ``hidden`` oldest entries (slid out of the window), those that can go: all of them,
        or under a grouped codec the whole groups among what it encoded (all, once every group is among them)."""
        if self.residual is None or self.codec.group == 1:
            return hidden
        group, encoded = self.codec.group, self.residual.encoded
        host = tuple(droppable(n, e, group) for n, e in zip(hidden.host, encoded.host))
        if not any(host) or (hidden.device is None and encoded.device is None):  # nothing to drop: no launch
            return Counts(host)
        held, done = hidden.on(self.device), encoded.on(self.device)
        return Counts(host, torch.where(held >= done, held, held // group * group))

    def _drop_leading(self, drop: Counts) -> None:
        """Drop each run's ``drop[r]`` oldest entries, from every per-entry tensor and, under a grouped codec,
        from its groups (``drop`` from :meth:`_droppable`: whole groups, or every group and then some of the
        full-precision entries)."""
        if not any(drop.host):
            return
        tracks = self.tracks()  # read before the groups go: a settled layer decodes them here
        if self.residual is not None:
            gone = drop.minimum(self.residual.encoded).over(self.codec.group)
            self.residual = self.residual.without_first(gone)
        if not self.packed:  # every run holds the same columns: drop the oldest of them
            first = drop.host[0]
            self.valid = self.valid[:, first:].clone()
            self._assign({name: t[:, :, first:].clone() for name, t in tracks.items()})
            return
        lengths = Counts(tuple(self.lengths), self.run_lengths)
        left = lengths.minus(drop)
        self._assign({name: take(t, lengths, drop, left) for name, t in tracks.items()})
        self.lengths, self.run_lengths = list(left.host), left.on(self.device)
        self.uniform = len(set(self.lengths)) == 1
        self._slots = None

    def update_tracks(self, query: torch.Tensor, scale: LogitScale) -> None:
        """Let every track take the attention its entries received from this forward's ``query`` (computed once
        per reduction)."""
        received: dict[str, torch.Tensor] = {}
        tracked = {}
        for track in self.tracked_by:
            if track.reduce not in received:
                received[track.reduce] = self._attention_received(query, scale, track.reduce)[..., None]
            held = self.tracked[track.name]
            updated = track.update(held, received[track.reduce])
            if not isinstance(updated, torch.Tensor) or updated.shape != held.shape:
                shape = list(updated.shape) if isinstance(updated, torch.Tensor) else type(updated).__name__
                raise TypeError(f"track {track.name!r} returned {shape} from update() for entries held as "
                                f"{list(held.shape)}; it must return a tensor of the held values' shape (elementwise)")
            tracked[track.name] = updated
        self.tracked = tracked

    def _attention_received(self, query: torch.Tensor, scale: LogitScale, reduce: Reduce = "sum") -> torch.Tensor:
        """Attention ``query`` gives each stored entry, in storage layout (``[b, h, s]`` dense, ``[N]`` packed).

        Ragged runs are scored in their padded view and read back by index where launches cost (a fixed number of
        kernels whatever the batch and head count: H2O pays this on every decoding step), run by run on a CPU
        (see :mod:`kvpolicies.engine.paths`)."""
        q_len = query.shape[2]
        if self.packed and not self.uniform and not launch_bound(self.device):  # see engine.paths
            groups = query.shape[1] // self.num_heads
            positions = self.positions.split(self.lengths) if self.positions is not None else None
            pieces = []
            for run, (b, h, keys, _) in enumerate(self.runs()):
                valid = torch.ones(1, 1, keys.shape[0], dtype=torch.bool, device=self.device)
                run_query = query[b : b + 1, h * groups : (h + 1) * groups]
                window = self.window_view(positions[run].view(1, 1, -1) if positions else None, q_len)
                received = attention_received(run_query, keys[None, None], valid, age_order(valid), scale,
                                              reduce=reduce, window=window)
                pieces.append(received.flatten())
            return torch.cat(pieces)
        dense, valid = self.dense_view(("keys", "positions"))
        window = self.window_view(dense["positions"][..., 0] if "positions" in dense else None, q_len)
        received = attention_received(query, dense["keys"], valid, age_order(valid), scale, reduce=reduce,
                                      window=window)
        if not self.packed:
            return received
        if self.uniform:
            return received.flatten()
        return received.flatten().index_select(0, self._padded_slots(valid.shape[-1]))

    def received_by_old(self, query: torch.Tensor, scale: LogitScale, reduce: str,
                        new_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Attention the entries held before this forward receive from its ``query`` (``[batch, heads, n, dim]``),
        ``[batch, kv_heads, seq]`` aligned with the layer's ``dense_view()`` before the ``n`` new entries came.
        ``new_valid`` (``[batch, n]``, a right-padded probe over an uncompressed layer): only each sequence's real
        queries count, one sequence at a time."""
        keys, _, valid = self.dense_view(tracks=False)  # the window is not applied: see stages.probe
        new = query.shape[-2]
        if new_valid is None or bool(new_valid.all()):
            return self._received(query, keys, valid, scale, reduce, new)[..., : keys.shape[2] - new]
        rows = []
        for row, real in enumerate(new_valid.sum(1).tolist()):  # a probe, not the decoding path: one read
            one = slice(row, row + 1)
            rows.append(self._received(query[one, :, :real], keys[one], valid[one], scale, reduce, real))
        return torch.cat(rows)[..., : keys.shape[2] - new]

    @staticmethod
    def _received(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: LogitScale, reduce: str,
                  new: int) -> torch.Tensor:
        order = age_order(valid)
        received = attention_received(query, keys, valid, order, scale, reduce=reduce)
        return received.masked_fill(~(order < valid.sum(-1, keepdim=True) - new), 0.0)

    def runs(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """``(sequence, kv_head, keys, values)`` of every run of a packed layer, ``[entries, head_dim]`` views in age
        order, in storage order (sequence-major)."""
        for run, (keys, values) in enumerate(zip(self.keys.split(self.lengths), self.values.split(self.lengths))):
            yield *divmod(run, self.num_heads), keys, values

    def uniform_view(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values as ``[batch, kv_heads, length, head_dim]`` views when every run of a packed layer has one
        length (free: the packed tensor is that layout), else None."""
        if not (self.packed and self.uniform):
            return None
        shape = (self.batch_size, self.num_heads, self.lengths[0], self.head_dim)
        return self.keys.view(shape), self.values.view(shape)

    def counts(self) -> list[list[int]]:
        """Real entries held per sequence and KV head (a dense layer holds every real token seen)."""
        if self.packed:
            return [self.lengths[b * self.num_heads : (b + 1) * self.num_heads] for b in range(self.batch_size)]
        if self.window is not None:  # the window's real entries: the padding of a left-padded batch is older
            return [[min(n, self.window - 1 + self._kept_hidden())] * self.num_heads for n in self.seen]
        return [[n] * self.num_heads for n in self.seen]

    def _kept_hidden(self) -> int:
        """Entries a dense window holds beyond its ``W - 1`` once this pass has slid it (between passes, ``hidden``):
        what the budget judges it by, before the slide that comes after the eviction."""
        if not self.grouped_window:
            return 0
        out = max(self.valid.shape[1] - (self.window - 1), 0)
        encoded = self.residual.encoded.host[0] if self.residual.encoded.host else 0
        return out - droppable(out, encoded, self.codec.group)

    def kept_counts(self) -> torch.Tensor:
        """``[batch, kv_heads]`` real entries held per head."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.long)
        return torch.tensor(self.counts(), dtype=torch.long)

    def tracks(self) -> dict[str, torch.Tensor]:
        """Every per-entry tensor by name, in storage layout: keys and values (a lossy codec's decoded), a window's
        ``positions``, the policy's tracks as ``track:<name>``, and a codec's tensors as ``code:<name>``."""
        keys, values = self._keys_values()
        tracks = {"keys": keys, "values": values}
        if self.positions is not None:
            tracks["positions"] = self.positions
        tracks.update({TRACK + name: t for name, t in self.tracked.items()})
        if self.codes is not None:
            tracks.update({CODE + name: t for name, t in self.codes.items()})
        return tracks

    def dense_view(self, tracks: bool | tuple[str, ...] = True):
        """The entries as ``[batch, kv_heads, seq, ...]`` views for scoring, with ``valid`` ``[batch, kv_heads, seq]``.

        Returns ``(tracks by name, valid)`` (only those named, those the layer has, with a tuple of names), or
        ``(keys, values, valid)`` with ``tracks=False``. Packed layers whose runs share one length are viewed for
        free; ragged ones are padded into a temporary copy.
        """
        shape = (self.batch_size, self.num_heads)
        if tracks is False:
            stored = dict(zip(("keys", "values"), self._keys_values()))
        else:
            stored = self.tracks()
            if tracks is not True:
                stored = {name: t for name, t in stored.items() if name in tracks}
        if not self.packed:
            valid = self.valid[:, None, :].expand(*shape, -1)
            dense = stored
        elif self.uniform:
            length = self.lengths[0]
            valid = torch.ones(*shape, length, dtype=torch.bool, device=self.device)
            dense = {name: t.view(*shape, length, t.shape[-1]) for name, t in stored.items()}
        else:
            longest = max(self.lengths)
            flat_valid = torch.arange(longest, device=self.device) < self.run_lengths[:, None]
            slots = self._padded_slots(longest)
            dense = {}
            for name, t in stored.items():
                padded = t.new_zeros(len(self.lengths) * longest, t.shape[-1])
                padded.index_copy_(0, slots, t)  # integer indices: no host read of the layout, unlike a bool mask
                dense[name] = padded.view(*shape, longest, t.shape[-1])
            valid = flat_valid.view(*shape, longest)
        if tracks is not False:
            return dense, valid
        return dense["keys"], dense["values"], valid

    def _padded_slots(self, longest: int) -> torch.Tensor:
        """Where each stored entry goes in a ``[runs * longest]`` padded layout: run ``r``'s ``j``-th entry at
        ``r * longest + j``, computed on the device from the run lengths (once per layout)."""
        if self._slots is None or self._slots[0] != longest:
            total = sum(self.lengths)
            runs = torch.arange(len(self.lengths), device=self.device)
            run_of = runs.repeat_interleave(self.run_lengths, output_size=total)  # output_size: no host read
            starts = self.run_lengths.cumsum(0) - self.run_lengths
            self._slots = (longest, run_of * longest + torch.arange(total, device=self.device) - starts[run_of])
        return self._slots[1]

    def store(self, dense: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        """Keep only the entries where ``keep`` (``[batch, kv_heads, seq]``) is True, packed in age order.

        One host read per call, the kept count of every run (the layout's Python ints); the selection itself uses
        indices of a size known from it, so it reads nothing more back (a boolean mask index would)."""
        self.run_lengths = keep.sum(-1).flatten()
        if self.residual is None:
            self.lengths = self.run_lengths.tolist()
        else:  # and, in the same read, how many leading entries of each run stay in place (a grouped codec's)
            intact = keep.long().cumprod(-1).sum(-1).flatten()
            self.lengths, in_place = torch.stack([self.run_lengths, intact]).tolist()
            self.intact = Counts(tuple(in_place), intact)
        self.uniform = len(set(self.lengths)) == 1
        self.packed, self.valid, self._slots, self.cut, self.hidden = True, None, None, True, 0
        self._select(dense, keep.flatten(), sum(self.lengths))
        self.settle()  # eviction ends a forward's work on the layer; an after-prefill stage runs between forwards

    def _pack_real(self) -> None:
        """Pack a left-padded dense layer to its real entries, reading nothing back: the host knows each
        sequence's real tokens (``seen``), all of which a dense layer holds."""
        keep = self.valid[:, None, :].expand(self.batch_size, self.num_heads, -1)
        self.run_lengths = keep.sum(-1).flatten()
        held = self.valid.shape[1]  # a window holds its last columns only
        self.lengths = [min(n, held) for n in self.seen for _ in range(self.num_heads)]
        self.intact = self.residual.encoded  # what is encoded lies before any padding: right padding comes last
        self.uniform = len(set(self.lengths)) == 1
        self.packed, self.valid, self._slots, self.hidden = True, None, None, 0
        self._select(self.tracks(), keep.flatten(), sum(self.lengths))

    def _select(self, tracks: dict[str, torch.Tensor], keep: torch.Tensor, total: int) -> None:
        """Set every track to its rows where the flat ``keep`` is True, ``total`` of them, in order."""
        rows = keep.nonzero_static(size=total)[:, 0]
        self._assign({name: t.reshape(-1, t.shape[-1]).index_select(0, rows) for name, t in tracks.items()})

    def _assign(self, tracks: dict[str, torch.Tensor]) -> None:
        """Hold ``tracks`` (named as :meth:`tracks` names them) as the layer's per-entry tensors."""
        codes, tracked = {}, {}
        for name, t in tracks.items():
            if name.startswith(CODE):
                codes[name[len(CODE):]] = t
            elif name.startswith(TRACK):
                tracked[name[len(TRACK):]] = t
            else:
                setattr(self, name, t)
        if codes:
            self.codes = codes
        if tracked:
            self.tracked = tracked

    def resident_bytes(self) -> int:
        """Bytes of the keys and values held (a policy's per-entry attention track is reported apart)."""
        if not self.is_initialized:
            return 0
        if self.codes is not None:  # what is stored between forward passes: the codec's tensors
            return held_bytes(*self.codes.values())
        if self.residual is not None:
            return held_bytes(*self.residual.tensors())
        return held_bytes(self.keys, self.values)

    def full_precision_counts(self, newest: list[int] | None = None) -> list[int]:
        """Real entries per sequence a grouped codec holds at full precision (its runs' newest; none with any other
        codec): what they cost beyond the codec's price per entry is charged apart (``CacheShape``). With
        ``newest``, only those among each run's ``newest[sequence]`` newest entries."""
        if self.residual is None or not self.is_initialized:
            return [0] * len(self.seen)
        tails = self.residual.tails.host
        bound = newest if newest is not None else [self.logical_length] * len(self.seen)  # a run holds no more
        return [sum(min(tails[b * self.num_heads + h], held, bound[b]) for h, held in enumerate(real))
                for b, real in enumerate(self.counts())]

    def auxiliary_bytes(self) -> int:
        """Bytes held besides keys and values: the recent-query buffer, the tracks, the padding mask, a window's
        positions."""
        fitted = self.residual.fitted.values() if self.residual is not None else ()
        return held_bytes(self._queries, self.valid, self.positions, *self.tracked.values(), *fitted)

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.window is not None and self.logical_length >= self.window:
            # The stored last W - 1 positions and the new ones, starting where the stored ones start (a grouped
            # codec's hidden entries before them are left out of what the attention reads: see ``hidden``).
            return self.window - 1 + query_length, self.logical_length - self.window + 1
        # Logical sizes: dense layers hold every token; packed layers build their own masks.
        return self.logical_length + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with a CompressedCache; use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a CompressedCache cannot be cropped (assisted decoding is not supported)")
