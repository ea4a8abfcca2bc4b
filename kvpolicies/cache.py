"""A transformers ``Cache`` that physically holds only the entries a policy keeps.

Layout. A layer starts *dense* like transformers' ``DynamicLayer`` (``[batch, kv_heads, seq, head_dim]``). The
first eviction turns it *packed*: keys and values become ``[entries, head_dim]`` tensors holding, one run after
another, the kept entries of every (sequence, KV head) pair in age order, with the run lengths kept as Python ints.
Runs may differ in length (per-head budgets, sequences of different lengths), and padding is never stored, so the
memory really is freed. When all runs have one length the packed tensor *is* the dense layout (a free view).

Two lengths. ``get_seq_length()`` is the logical number of tokens seen (RoPE positions continue from it), while a
packed layer holds fewer entries; masks of packed layers are built by :mod:`kvpolicies.attention`, which is why the
model must run the kvpolicies attention (``CompressedCache`` switches it on).

Eviction runs right after a layer's attention has read the full keys, so prefill peaks at one uncompressed layer.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvpolicies.budget import Allocation, Budget, CacheShape
from kvpolicies.errors import ContextLengthWarning, ModelLoadError, PolicyConfigError
from kvpolicies.policy import Policy, ScoreInputs, Signal
from kvpolicies.selection import age_order, select
from kvpolicies.signals import attention_received

_pending = threading.local()


def claim_layer(keys: torch.Tensor) -> CompressedLayer | None:
    """The compressed layer whose ``update()`` just returned ``keys``, or None for any other cache."""
    layer = getattr(_pending, "layer", None)
    if layer is None or getattr(_pending, "keys", None) is not keys:
        return None
    _pending.layer = _pending.keys = None
    return layer


def held_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the storage behind ``tensors``, each storage once: a small view of a large tensor counts the large
    one, because that is what it keeps alive."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds, counted from its tensors.

    ``resident_bytes`` is what the key and value tensors occupy; it exceeds ``kept_entries × entry bytes`` only by
    ``padding_bytes``, the padded positions a layer still stores densely (a left-padded batch before its first
    eviction, or the full cache, which never evicts).
    """

    kept_entries: int
    full_entries: int
    resident_bytes: int
    full_bytes: int
    padding_bytes: int = 0

    @property
    def kept_fraction(self) -> float:
        return self.kept_entries / self.full_entries if self.full_entries else 1.0


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's entries, dense until the first eviction and packed after it.

    Besides keys and values a layer may carry a per-entry track in the same layout (the attention each entry has
    accumulated, for policies that read it) and a rolling buffer of the most recent queries.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: CompressedCache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.reset()

    def reset(self) -> None:
        self.keys = self.values = None
        self.cumulative: torch.Tensor | None = None  # attention received so far, [..., 1] float32
        self.recent_queries: torch.Tensor | None = None  # [batch, heads, <= query_window, head_dim]
        self.is_initialized = False
        self.logical_length = 0
        self.packed = False
        self.lengths: list[int] = []
        self.uniform = True
        self.valid: torch.Tensor | None = None  # dense only: [batch, seq] bool, False on padding
        self.seen: list[int] = []  # real tokens seen per sequence
        self.awaiting_attention = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        if Signal.CUMULATIVE_ATTENTION in self.cache.policy.needs:
            self.cumulative = key_states.new_zeros(self.batch_size, self.num_heads, 0, 1, dtype=torch.float32)
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
        self.keys = self._append(self.keys, key_states)
        self.values = self._append(self.values, value_states)
        if self.cumulative is not None:
            self.cumulative = self._append(self.cumulative, self.cumulative.new_zeros(batch, heads, q_len, 1))
        if self.packed:
            self.lengths = [n + q_len for n in self.lengths]
        self.logical_length += q_len
        if self.logical_length > self.cache.max_positions and self.layer_idx == 0:
            self.cache.warn_past_positions(self.logical_length)
        self.awaiting_attention = True
        _pending.layer, _pending.keys = self, self.keys
        return self.keys, self.values

    def _append(self, stored: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Append ``new`` (``[batch, kv_heads, q_len, dim]``) at the end of every head's run."""
        if not self.packed:
            return torch.cat([stored, new], dim=-2)
        batch, heads, q_len, dim = new.shape
        if self.uniform:
            old = stored.view(batch, heads, self.lengths[0], dim)
            return torch.cat([old, new], dim=2).view(-1, dim)
        runs = stored.split(self.lengths)
        fresh = new.reshape(batch * heads, q_len, dim).unbind(0)
        return torch.cat([piece for pair in zip(runs, fresh) for piece in pair])

    def after_attention(
        self, query: torch.Tensor, new_valid: torch.Tensor | None, scaling: float, module: torch.nn.Module | None = None
    ) -> None:
        """Record which new tokens are real and what they attended to, then let the cache evict.

        ``new_valid``: ``[batch, q_len]`` bool, or None when all are real (no device sync on the decode path).
        """
        started = self.cache.clock() if self.cache.timing else None
        self.awaiting_attention = False
        q_len = query.shape[-2]
        if new_valid is None:
            self.seen = [n + q_len for n in self.seen]
        else:
            self.seen = [s + n for s, n in zip(self.seen, new_valid.sum(1).tolist())]
        if not self.packed:
            if new_valid is None:
                new_valid = torch.ones(self.batch_size, q_len, dtype=torch.bool, device=self.device)
            self.valid = torch.cat([self.valid, new_valid], dim=1)
        window = self.cache.policy.query_window
        if window:
            # One copy of at most `window` rows per step. Never keep a slice of `query`: a view would keep the whole
            # prompt's queries alive in every layer.
            new = query[:, :, -window:]
            room = window - new.shape[2]
            if self.recent_queries is None or room == 0:
                self.recent_queries = new.clone()
            else:
                self.recent_queries = torch.cat([self.recent_queries[:, :, -room:], new], dim=2)
        if self.cumulative is not None:
            self.cumulative += self._attention_received(query, scaling)[..., None]
        self.cache.evict(self, query, scaling, module)
        if started is not None:
            self.cache.policy_seconds += self.cache.clock() - started

    def _attention_received(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention ``query`` gives each stored entry, in storage layout (``[b, h, s]`` dense, ``[N]`` packed)."""
        if not self.packed or self.uniform:
            keys, _, valid = self.dense_view(tracks=False)
            received = attention_received(query, keys, valid, age_order(valid), scaling)
            return received.flatten() if self.packed else received
        groups = query.shape[1] // self.num_heads
        pieces = []
        for run, keys in enumerate(self.keys.split(self.lengths)):
            b, h = divmod(run, self.num_heads)
            valid = torch.ones(1, 1, keys.shape[0], dtype=torch.bool, device=self.device)
            run_query = query[b : b + 1, h * groups : (h + 1) * groups]
            pieces.append(attention_received(run_query, keys[None, None], valid, age_order(valid), scaling).flatten())
        return torch.cat(pieces)

    def counts(self) -> list[list[int]]:
        """Real entries held per sequence and KV head (a dense layer holds every real token seen)."""
        if self.packed:
            return [self.lengths[b * self.num_heads : (b + 1) * self.num_heads] for b in range(self.batch_size)]
        return [[n] * self.num_heads for n in self.seen]

    def kept_counts(self) -> torch.Tensor:
        """``[batch, kv_heads]`` real entries held per head."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.long)
        return torch.tensor(self.counts(), dtype=torch.long)

    def tracks(self) -> dict[str, torch.Tensor]:
        """Every per-entry tensor by name, in storage layout."""
        tracks = {"keys": self.keys, "values": self.values}
        if self.cumulative is not None:
            tracks["cumulative"] = self.cumulative
        return tracks

    def dense_view(self, tracks: bool = True):
        """The entries as ``[batch, kv_heads, seq, ...]`` views for scoring, with ``valid`` ``[batch, kv_heads, seq]``.

        Returns ``(tracks by name, valid)``, or ``(keys, values, valid)`` with ``tracks=False``. Packed layers whose
        runs share one length are viewed for free; ragged ones are padded into a temporary copy.
        """
        shape = (self.batch_size, self.num_heads)
        stored = self.tracks() if tracks else {"keys": self.keys, "values": self.values}
        if not self.packed:
            valid = self.valid[:, None, :].expand(*shape, -1)
            dense = stored
        elif self.uniform:
            length = self.lengths[0]
            valid = torch.ones(*shape, length, dtype=torch.bool, device=self.device)
            dense = {name: t.view(*shape, length, t.shape[-1]) for name, t in stored.items()}
        else:
            lengths = torch.tensor(self.lengths, device=self.device)
            longest = max(self.lengths)
            flat_valid = torch.arange(longest, device=self.device) < lengths[:, None]
            dense = {}
            for name, t in stored.items():
                padded = t.new_zeros(len(self.lengths), longest, t.shape[-1])
                padded[flat_valid] = t
                dense[name] = padded.view(*shape, longest, t.shape[-1])
            valid = flat_valid.view(*shape, longest)
        if tracks:
            return dense, valid
        return dense["keys"], dense["values"], valid

    def store(self, dense: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        """Keep only the entries where ``keep`` (``[batch, kv_heads, seq]``) is True, packed in age order."""
        self.keys, self.values = dense["keys"][keep], dense["values"][keep]
        if self.cumulative is not None:
            self.cumulative = dense["cumulative"][keep]
        self.lengths = keep.sum(-1).flatten().tolist()
        self.uniform = len(set(self.lengths)) == 1
        self.packed, self.valid = True, None

    def resident_bytes(self) -> int:
        """Bytes of the keys and values held (a policy's per-entry attention track is reported apart)."""
        if not self.is_initialized:
            return 0
        return held_bytes(self.keys, self.values)

    def auxiliary_bytes(self) -> int:
        """Bytes held besides keys and values: the recent-query buffer, the attention track, the padding mask."""
        return held_bytes(self.recent_queries, self.cumulative, self.valid)

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Logical sizes: dense layers hold every token; packed layers build their own masks.
        return self.logical_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with a CompressedCache; use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a CompressedCache cannot be cropped (assisted decoding is not supported)")


class CompressedCache(Cache):
    """A KV cache that evicts entries with ``policy`` under ``budget``.

    >>> cache = CompressedCache(model, get_policy("l2norm"), Budget.parse(0.5))
    >>> model.generate(**inputs, cache=cache)
    >>> cache.stats()

    Construction switches the model to the kvpolicies attention (which runs the model's own attention for layers
    that still hold every token), see :func:`kvpolicies.attention.prepare_model`.
    """

    def __init__(self, model, policy: Policy | str, budget: Budget | float | str) -> None:
        from kvpolicies.attention import prepare_model
        from kvpolicies.registry import get_policy

        text_config = model.config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or []
        unsupported = sorted({t for t in layer_types if t != "full_attention"})
        if unsupported:
            raise ModelLoadError(
                f"{type(model).__name__}: CompressedCache supports full-attention layers only; this model also has "
                f"{unsupported} layers"
            )
        self.max_positions: int | float = getattr(text_config, "max_position_embeddings", None) or float("inf")
        prepare_model(model)
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.budget = Budget.parse(budget)
        self.shape = CacheShape.from_config(model.config, model.dtype)
        self._allocations: dict[int, list[list[int]]] = {}
        self.timing = False
        """When True, ``policy_seconds`` accumulates the time spent in the policy (signals, scoring, eviction)."""
        self.policy_seconds = 0.0
        super().__init__(layers=[CompressedLayer(self, i) for i in range(self.shape.num_layers)])

    def warn_past_positions(self, length: int) -> None:
        """Warn once: beyond its trained positions a model's output is unreliable, compressed or not."""
        if not getattr(self, "_warned_positions", False):
            self._warned_positions = True
            warnings.warn(
                f"the sequence has reached {length} tokens, more than the {self.max_positions} positions the model "
                "was trained for; its outputs past that point are unreliable with or without compression. Use "
                "shorter prompts or a model with a longer context.",
                ContextLengthWarning,
                stacklevel=2,
            )

    def allocation(self, seq_len: int) -> Allocation:
        """The policy's allocation for a sequence of ``seq_len`` real tokens, checked against the budget."""
        allocation = self.policy.allocate(self.budget.allocate(seq_len, self.shape))
        allocation.check(self.policy.name)
        return allocation

    def _targets(self, seq_len: int) -> list[list[int]]:
        """Per layer, per KV head allocation as Python ints: the decode-time check must not touch the device."""
        if seq_len not in self._allocations:
            if len(self._allocations) >= 256:  # lengths only grow while decoding: old ones are not asked again
                self._allocations.clear()
            self._allocations[seq_len] = self.allocation(seq_len).tokens.tolist()
        return self._allocations[seq_len]

    def evict(
        self, layer: CompressedLayer, query: torch.Tensor, scaling: float, module: torch.nn.Module | None = None
    ) -> None:
        """Cut ``layer`` back to its allocation if a sequence outgrew it (by more than the slack when decoding)."""
        if not self.policy.compresses:
            return
        slack = 0 if query.shape[-2] > 1 else self.budget.slack_tokens
        targets = [self._targets(max(n, 1))[layer.layer_idx] for n in layer.seen]
        counts = layer.counts()
        # Judged per sequence on the layer total: heads may legitimately sit above their uniform share after a
        # policy moved entries between them, and must not trigger an eviction at every step for it.
        over = [sum(row_c) > sum(row_t) + slack * len(row_c) for row_c, row_t in zip(counts, targets)]
        padded = not layer.packed and min(layer.seen) < layer.logical_length
        if not (any(over) or padded):
            return
        dense, valid = layer.dense_view()
        # Rows over budget get their allocation (select() clamps a head to what it holds), others keep everything.
        keep_n = torch.tensor([row_t if row_over else row_c for row_c, row_t, row_over in zip(counts, targets, over)])
        if any(over):
            inputs = self._score_inputs(layer, dense, valid, keep_n, query, scaling)
            inputs.module = module
            scores = self._checked(self.policy.score(inputs), valid)
            keep_n = self._reallocate_heads(scores, valid, keep_n, over)
        else:
            scores = torch.zeros(valid.shape, device=valid.device)
        keep = select(scores, valid, keep_n, *self.policy.protected)
        layer.store(dense, keep)

    def _checked(self, scores: object, valid: torch.Tensor) -> torch.Tensor:
        """``scores`` if they keep ``score()``'s contract; a policy that breaks it is named, never silently ranked."""
        expected = f"a [batch, kv_heads, seq] = {list(valid.shape)} tensor of scores (higher = keep)"
        if not isinstance(scores, torch.Tensor):
            raise PolicyConfigError(f"policy {self.policy.name!r}: score() returned {type(scores).__name__}; "
                                    f"it must return {expected}")
        if scores.shape != valid.shape:
            raise PolicyConfigError(f"policy {self.policy.name!r}: score() returned shape {list(scores.shape)}; "
                                    f"it must return {expected}")
        if scores.is_complex() or scores.dtype == torch.bool:
            raise PolicyConfigError(f"policy {self.policy.name!r}: score() returned {scores.dtype} scores; "
                                    "return real numbers")
        if scores.is_floating_point() and (torch.isnan(scores) & valid).any():  # padding may hold anything
            raise PolicyConfigError(f"policy {self.policy.name!r}: score() returned NaN for real entries; scores "
                                    "must be numbers (±inf allowed); NaN at padded positions is ignored")
        return scores

    def _reallocate_heads(self, scores, valid, keep_n, over) -> torch.Tensor:
        moved = self.policy.reallocate_heads(scores, valid, keep_n).to(keep_n.device, torch.long)
        if moved.shape != keep_n.shape or (moved.sum(-1) > keep_n.sum(-1)).any():
            raise PolicyConfigError(
                f"policy {self.policy.name!r}: reallocate_heads() must return [batch, kv_heads] with at most the "
                f"allocated entries per sequence ({keep_n.sum(-1).tolist()}), got {moved.sum(-1).tolist()}"
            )
        if (moved < 1).any():
            raise PolicyConfigError(f"policy {self.policy.name!r}: reallocate_heads() left a head with no entry")
        return torch.where(torch.tensor(over)[:, None], moved, keep_n)

    def _score_inputs(self, layer, dense, valid, keep, query, scaling) -> ScoreInputs:
        needs = self.policy.needs
        order = age_order(valid)
        inputs = ScoreInputs(
            layer_idx=layer.layer_idx, valid=valid, order=order, seen_tokens=list(layer.seen), keep=keep
        )
        if Signal.KEYS in needs:
            inputs.keys = dense["keys"]
        if Signal.VALUES in needs:
            inputs.values = dense["values"]
        queries = layer.recent_queries if layer.recent_queries is not None else query
        if Signal.QUERIES in needs:
            inputs.queries = queries
        if Signal.ATTENTION in needs:
            inputs.attention = attention_received(queries, dense["keys"], valid, order, scaling)
        if Signal.CUMULATIVE_ATTENTION in needs:
            inputs.cumulative_attention = dense["cumulative"][..., 0]
        return inputs

    def kept_per_head(self) -> torch.Tensor:
        """``[num_layers, batch, kv_heads]`` entries held per head."""
        return torch.stack([layer.kept_counts() for layer in self.layers])

    def resident_bytes(self) -> int:
        """Bytes of the key and value tensors this cache holds right now (padding included if stored)."""
        return sum(layer.resident_bytes() for layer in self.layers)

    def auxiliary_bytes(self) -> int:
        """Bytes a policy holds besides the cache entries (query buffers, attention tracks, padding masks)."""
        return sum(layer.auxiliary_bytes() for layer in self.layers)

    def clock(self) -> float:
        """A timestamp that includes the device's queued work (CUDA runs asynchronously)."""
        if self.layers[0].is_initialized and self.layers[0].device.type == "cuda":
            torch.cuda.synchronize(self.layers[0].device)
        return time.perf_counter()

    def stats(self) -> CacheStats:
        """The whole batch: every sequence's entries, plus the padding stored with them."""
        per_sequence = self.sequence_stats()
        kept = sum(stats.kept_entries for stats in per_sequence)
        resident = self.resident_bytes()
        return CacheStats(
            kept_entries=kept,
            full_entries=sum(stats.full_entries for stats in per_sequence),
            resident_bytes=resident,
            full_bytes=sum(stats.full_bytes for stats in per_sequence),
            padding_bytes=max(resident - kept * self.shape.entry_bytes, 0),
        )

    def sequence_stats(self) -> list[CacheStats]:
        """One entry per sequence of the batch: its own real entries, so figures do not depend on the batch size or
        on the padding its neighbours forced on it."""
        if not self.layers[0].is_initialized:
            return []
        kept = self.kept_per_head().sum(dim=(0, 2)).tolist()
        stats = []
        for seen, entries in zip(self.layers[0].seen, kept):
            full = seen * self.shape.cells
            stats.append(CacheStats(kept_entries=int(entries), full_entries=full,
                                    resident_bytes=int(entries) * self.shape.entry_bytes,
                                    full_bytes=full * self.shape.entry_bytes))
        return stats
