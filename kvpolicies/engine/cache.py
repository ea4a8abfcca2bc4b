"""A transformers ``Cache`` that physically holds only the entries a policy keeps, and the eviction that cuts it.

Each layer's entries live in a :class:`~kvpolicies.engine.storage.CompressedLayer` (dense, then packed runs). This
module decides *when* and *what* to evict: after each layer's attention, a sequence that outgrew its allocation
(by more than the budget's slack while decoding) is scored by the policy and cut back; the framework, not the
policy, turns scores into kept entries (:mod:`kvpolicies.engine.selection`). Eviction runs right after a layer's
attention has read the full keys, so prefill peaks at one uncompressed layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from kvpolicies.engine.attention import prepare_model
from kvpolicies.engine.budget import Allocation, Budget, CacheShape
from kvpolicies.engine.clock import Stopwatch
from kvpolicies.engine.layer_view import LayerView
from kvpolicies.engine.layout import layer_windows
from kvpolicies.engine.policy import Policy, ScoreInputs, Signal
from kvpolicies.engine.selection import age_order, select
from kvpolicies.engine.signals import LogitScale, attention_received
from kvpolicies.engine.storage import CompressedLayer
from kvpolicies.errors import ContextLengthWarning, PolicyConfigError, UsageError


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
    appended_entries: int = 0
    """Of ``kept_entries``, those after the context (see ``CompressedCache.context_lengths``): kept whole and not
    charged to the budget. The context's own entries are ``kept_entries - appended_entries``."""

    @property
    def kept_fraction(self) -> float:
        return self.kept_entries / self.full_entries if self.full_entries else 1.0


class CompressedCache(Cache):
    """A KV cache that evicts entries with ``policy`` under ``budget``.

    >>> cache = CompressedCache(model, get_policy("l2norm"), Budget.parse(0.5))
    >>> model.generate(**inputs, cache=cache)
    >>> cache.stats()

    Construction switches the model to the kvpolicies attention (which runs the model's own attention for layers
    that still hold every token), see :func:`kvpolicies.engine.attention.prepare_model`.
    """

    def __init__(self, model, policy: Policy | str, budget: Budget | float | str) -> None:
        from kvpolicies.registry import (
            get_policy,  # the registry imports the plugins, which import the engine
        )

        text_config = model.config.get_text_config(decoder=True)
        windows = layer_windows(model)  # refuses layer kinds that hold no per-token keys and values
        self.max_positions: int | float = getattr(text_config, "max_position_embeddings", None) or float("inf")
        prepare_model(model)
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.budget = Budget.parse(budget)
        self.shape = CacheShape.from_config(model.config, model.dtype, windows)
        if self.budget.unit != "fraction" and self.shape.sliding_layers and self.policy.compresses:
            # A fixed number of entries against windows that fill up as the sequence grows: check the full windows
            # now, not halfway through a generation.
            self.budget.allocate(max(w for w in windows if w), self.shape)
        self._allocations: dict[int, list[list[int]]] = {}
        self._layer_views: dict[int, LayerView] = {}
        self.policy_time: Stopwatch | None = None
        """Set (by a benchmark) to time the policy's share of every layer's forward (signals, scoring, eviction)."""
        self._warned_positions = False
        self.context_lengths: list[int] | None = None
        """Real tokens of each sequence that are its *context*; the entries after it (a question appended to a
        compressed context, generated tokens) are kept whole and are not charged to the budget, as in kvpress's
        protocol. None: every token is context (the whole prompt is compressed, and decoding evicts too). See
        :mod:`kvpolicies.integrations.protocol`."""
        super().__init__(layers=[CompressedLayer(self, i, window) for i, window in enumerate(windows)])

    def warn_past_positions(self, length: int) -> None:
        """Warn once: beyond its trained positions a model's output is unreliable, compressed or not."""
        if not self._warned_positions:
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
        uniform = self.budget.allocate(seq_len, self.shape)
        handed = Allocation(tokens=uniform.tokens.clone(), seq_len=uniform.seq_len, total=uniform.total,
                            fixed=uniform.fixed)
        try:
            allocated = self.policy.allocate(handed)
        except Exception as error:
            raise self._plugin_error("allocate", error)
        return uniform.check(allocated, self.policy.name)  # handed a copy: edits cannot move the bar

    def _targets(self, seq_len: int) -> list[list[int]]:
        """Per layer, per KV head allocation as Python ints: the decode-time check must not touch the device."""
        if seq_len not in self._allocations:
            if len(self._allocations) >= 256:  # lengths only grow while decoding: old ones are not asked again
                self._allocations.clear()
            self._allocations[seq_len] = self.allocation(seq_len).tokens.tolist()
        return self._allocations[seq_len]

    def evict(
        self, layer: CompressedLayer, query: torch.Tensor, scale: LogitScale, module: torch.nn.Module | None = None
    ) -> None:
        """Cut ``layer`` back to its allocation if a sequence outgrew it (by more than the slack when decoding)."""
        if not self.policy.compresses:
            return
        if layer.window is not None:  # holds its window, set by the model; the budget must still afford it
            for n, a in zip(layer.seen, self.appended(layer.seen)):
                self._targets(max(n - a, 1))
            return
        appended = self.appended(layer.seen)
        slack = 0 if query.shape[-2] > 1 or any(appended) else self.budget.slack_tokens
        targets = [self._targets(max(n - a, 1))[layer.layer_idx] for n, a in zip(layer.seen, appended)]
        counts = [[c - a for c in row] for row, a in zip(layer.counts(), appended)]  # the context's entries
        # Judged per sequence on the layer total: heads may legitimately sit above their uniform share after a
        # policy moved entries between them, and must not trigger an eviction at every step for it.
        over = [sum(row_c) > sum(row_t) + slack * len(row_c) for row_c, row_t in zip(counts, targets)]
        padded = not layer.packed and min(layer.seen) < layer.logical_length
        if not (any(over) or padded):
            return
        dense, valid = layer.dense_view()
        newest = None
        if any(appended):  # entries after the context: kept whole, never scored, outside the budget
            order = age_order(valid)
            after = torch.tensor(appended, device=valid.device)[:, None, None]
            newest = valid & (order >= valid.sum(-1, keepdim=True) - after)
        context = valid if newest is None else valid & ~newest
        # Rows over budget get their allocation (select() clamps a head to what it holds), others keep everything.
        # One upload for both: the entries to keep per head and, in the last column, whether the row is over.
        table = torch.tensor([[*(row_t if row_over else row_c), row_over]
                              for row_c, row_t, row_over in zip(counts, targets, over)], device=valid.device)
        keep_n, over_rows = table[:, :-1], table[:, -1:].bool()  # on the device, as every field a policy sees
        if any(over):
            inputs = self._score_inputs(layer, dense, valid, context, keep_n.clone(), query, scale)
            inputs.layer = self._layer_view(layer.layer_idx, module)
            versions = {name: t._version for name, t in vars(inputs).items()  # inference tensors have none
                        if isinstance(t, torch.Tensor) and not t.is_inference()}
            try:
                scores = self.policy.score(inputs)
            except Exception as error:
                raise self._plugin_error("score", error)
            self._unchanged(inputs, versions)
            scores = self._checked(scores, context)
            keep_n = self._reallocate_heads(scores, context, keep_n, over, over_rows)
        else:
            scores = torch.zeros(valid.shape, device=valid.device)
        keep = select(scores, context, keep_n, *self.policy.protected)
        layer.store(dense, keep if newest is None else keep | newest)

    def appended(self, seen: list[int]) -> list[int]:
        """Per sequence, the real tokens after its context (0 for all when no context is set)."""
        if self.context_lengths is None:
            return [0] * len(seen)
        if len(self.context_lengths) != len(seen):
            raise UsageError(f"context_lengths gives {len(self.context_lengths)} lengths for a batch of {len(seen)} "
                             "sequences; give one per sequence")
        return [max(n - c, 0) for n, c in zip(seen, self.context_lengths)]

    def reset(self) -> None:
        super().reset()
        self.context_lengths = None  # the next prompt's split is its own

    def _plugin_error(self, hook: str, error: Exception) -> Exception:
        """What to raise for ``error`` from the policy's ``hook``: a PluginError naming the plugin (see
        :func:`kvpolicies.registry.plugin_error`). The hooks are called in a bare try/except: nothing per token."""
        from kvpolicies.registry import plugin_error  # the registry imports the plugins, which import the engine

        return plugin_error(type(self.policy), hook, error)

    def _unchanged(self, inputs: ScoreInputs, versions: dict[str, int]) -> None:
        """Refuse a ``score()`` that edited its inputs in place: ``keys`` and ``values`` may be the layer's storage,
        and the change would reach the model's next attention. Read from torch's version counters (bumped by every
        in-place op): no copy, no device sync."""
        edited = [name for name, version in versions.items()  # a field replaced or cleared is no edit of ours
                  if (t := getattr(inputs, name, None)) is not None and not t.is_inference() and t._version != version]
        if edited:
            from kvpolicies.registry import plugin_fault

            raise plugin_fault(type(self.policy), f"edited inputs.{', inputs.'.join(edited)} in place in score(); the "
                               "inputs are read-only (keys and values may be the cache's own storage): compute on a "
                               "copy (t.clone()) or with out-of-place ops")

    def _checked(self, scores: object, valid: torch.Tensor) -> torch.Tensor:
        """``scores`` if they keep ``score()``'s contract; a policy that breaks it is named, never silently ranked."""
        expected = f"a [batch, kv_heads, seq] = {list(valid.shape)} tensor of scores (higher = keep)"
        if not isinstance(scores, torch.Tensor):
            raise PolicyConfigError(f"policy {self.policy.name!r}: score() returned {type(scores).__name__}; "
                                    f"it must return {expected}")
        if scores.device != valid.device:
            raise PolicyConfigError(f"policy {self.policy.name!r}: score() returned scores on {scores.device}, the "
                                    f"cache is on {valid.device}; build them from the inputs' tensors (or move them "
                                    "with .to(inputs.valid.device))")
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

    def _reallocate_heads(self, scores, valid, keep_n, over: list[bool], over_rows: torch.Tensor) -> torch.Tensor:
        if type(self.policy).reallocate_heads is Policy.reallocate_heads:  # moves nothing: nothing to check
            return keep_n
        try:
            moved = self.policy.reallocate_heads(scores, valid, keep_n.clone())  # checked against keep_n, untouched
        except Exception as error:
            raise self._plugin_error("reallocate_heads", error)
        if not isinstance(moved, torch.Tensor) or moved.is_floating_point() or moved.dtype == torch.bool:
            raise PolicyConfigError(
                f"policy {self.policy.name!r}: reallocate_heads() returned "
                f"{moved.dtype if isinstance(moved, torch.Tensor) else type(moved).__name__}; it must return a "
                "[batch, kv_heads] tensor of whole numbers of entries"
            )
        moved = moved.to(keep_n.device, torch.long)
        if moved.shape != keep_n.shape:
            raise PolicyConfigError(f"policy {self.policy.name!r}: reallocate_heads() must return [batch, kv_heads] = "
                                    f"{list(keep_n.shape)}, got {list(moved.shape)}")
        held = valid.sum(-1).to(moved.device)
        # Every check in one host read. A head raised past what it holds would be clamped by select(), and the
        # budget would go unspent, unsaid.
        # Only rows over budget take the move (the others keep what they hold, padding-only rows of a chunked
        # prefill included, which hold nothing).
        beyond = (moved > held) & (moved > keep_n) & over_rows
        grown, emptied, overfilled = torch.stack(
            [((moved.sum(-1, keepdim=True) > keep_n.sum(-1, keepdim=True)) & over_rows).any(),
             ((moved < 1) & over_rows).any(), beyond.any()]).tolist()
        if grown:
            raise PolicyConfigError(
                f"policy {self.policy.name!r}: reallocate_heads() must return [batch, kv_heads] with at most the "
                f"allocated entries per sequence ({keep_n.sum(-1).tolist()}), got {moved.sum(-1).tolist()}"
            )
        if emptied:
            raise PolicyConfigError(f"policy {self.policy.name!r}: reallocate_heads() left a head with no entry")
        if overfilled:
            b, h = beyond.nonzero()[0].tolist()
            raise PolicyConfigError(
                f"policy {self.policy.name!r}: reallocate_heads() gave KV head {h} of sequence {b} {int(moved[b, h])} "
                f"entries, but it holds {int(held[b, h])}; give no head more than it holds (valid.sum(-1)) and move "
                "the rest to heads that have more"
            )
        return moved if all(over) else torch.where(over_rows, moved, keep_n)

    def _layer_view(self, layer_idx: int, module: torch.nn.Module | None) -> LayerView | None:
        """One view per layer, so what it reads from the model (RoPE, projections) is read once."""
        if module is None:
            return None
        view = self._layer_views.get(layer_idx)
        if view is None or view.module is not module:
            view = self._layer_views[layer_idx] = LayerView(module)
        return view

    def _score_inputs(self, layer, dense, valid, context, keep, query, scale: LogitScale) -> ScoreInputs:
        """What the policy sees: the ``context`` entries as valid (entries after the context are not its to judge),
        and signals computed over everything the layer holds, as the model attended to it."""
        needs = self.policy.needs
        order = age_order(valid)
        inputs = ScoreInputs(
            layer_idx=layer.layer_idx, valid=context, order=order if context is valid else age_order(context),
            seen_tokens=list(layer.seen), keep=keep, scaling=scale.scaling, softcap=scale.softcap,
        )
        if Signal.KEYS in needs:
            inputs.keys = dense["keys"]
        if Signal.VALUES in needs:
            inputs.values = dense["values"]
        queries = layer.recent_queries if layer.recent_queries is not None else query
        if Signal.QUERIES in needs:
            inputs.queries = queries
        if Signal.ATTENTION in needs:
            inputs.attention = attention_received(queries, dense["keys"], valid, order, scale)
        if Signal.CUMULATIVE_ATTENTION in needs:
            inputs.cumulative_attention = dense["cumulative"][..., 0]
        if context is not valid:  # what the entries after the context received is not the policy's to weigh
            for name in ("attention", "cumulative_attention"):
                if getattr(inputs, name) is not None:
                    setattr(inputs, name, getattr(inputs, name) * context)
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
            appended_entries=sum(stats.appended_entries for stats in per_sequence),
        )

    def sequence_stats(self) -> list[CacheStats]:
        """One entry per sequence of the batch: its own real entries, so figures do not depend on the batch size or
        on the padding its neighbours forced on it."""
        if not self.layers[0].is_initialized:
            return []
        kept = self.kept_per_head().sum(dim=(0, 2)).tolist()
        stats = []
        seen_tokens = self.layers[0].seen
        for seen, entries, after in zip(seen_tokens, kept, self.appended(seen_tokens)):
            full = self.shape.full_entries(seen)  # the model's own cache: sliding layers hold their window
            appended = self.shape.full_entries(after) if after else 0  # every layer holds them (windows: the last)
            stats.append(CacheStats(kept_entries=int(entries), full_entries=full,
                                    resident_bytes=int(entries) * self.shape.entry_bytes,
                                    full_bytes=full * self.shape.entry_bytes, appended_entries=appended))
        return stats
