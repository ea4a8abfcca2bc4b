"""A transformers ``Cache`` that physically holds only the entries a policy keeps, and the eviction that cuts it.

Each layer's entries live in a :class:`~kvpolicies.engine.storage.CompressedLayer` (dense, then packed runs), a
container that never calls back: the attention hands every layer it has read to
:meth:`CompressedCache.after_attention`, with the pass's :class:`~kvpolicies.engine.step.Step`. This module
decides *when* and *what* to evict: after each layer's attention, a sequence that outgrew its allocation
(by more than the budget's slack while decoding) is scored by the policy and cut back; the framework, not the
policy, turns scores into kept entries (:mod:`kvpolicies.engine.selection`). Eviction runs right after a layer's
attention has read the full keys, so prefill peaks at one uncompressed layer.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from kvpolicies.engine.attention import prepare_model
from kvpolicies.engine.budget import Allocation, Budget, CacheShape
from kvpolicies.engine.calibration import calibrate
from kvpolicies.engine.clock import Stopwatch, clock
from kvpolicies.engine.codecs import Codec, FullPrecision, GroupedCodec, checked_entry_bytes
from kvpolicies.engine.layer_view import LayerView
from kvpolicies.engine.layout import layer_windows
from kvpolicies.engine.policy import Policy, ScoreInputs, Signal, tracks_of
from kvpolicies.engine.selection import age_order, select
from kvpolicies.engine.signals import CumulativeAttention, LogitScale, Track, attention_received
from kvpolicies.engine.stages import Prefilled, SharedScores, probe, select_across_layers
from kvpolicies.engine.stages import install as install_stage
from kvpolicies.engine.step import Step
from kvpolicies.engine.storage import TRACK, CompressedLayer, hand_over, window_overhang
from kvpolicies.errors import ContextLengthWarning, KVPoliciesError, UsageError


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds, counted from its tensors.

    ``resident_bytes`` is what the key and value tensors (or a lossy codec's tensors) occupy; it exceeds
    ``physical_bytes``, what the kept entries take as the codec stores them, only by ``padding_bytes``, the padded
    positions a layer still stores densely (a left-padded batch before its first eviction, or the full cache, which
    never evicts).
    """

    kept_entries: int
    full_entries: int
    resident_bytes: int
    full_bytes: int
    padding_bytes: int = 0
    physical_bytes: int = 0
    """What the kept entries take as stored: ``kept_entries ×`` the codec's price per entry, plus what a grouped
    codec's full-precision entries cost beyond it."""
    appended_entries: int = 0
    """Of ``kept_entries``, those after the context (see ``CompressedCache.context_lengths``): kept whole and not
    charged to the budget. The context's own entries are ``kept_entries - appended_entries``."""
    appended_bytes: int | None = None
    """What the appended entries take as stored: they are a run's newest, which a grouped codec holds at full
    precision, so they may cost more than an average entry. None: at the average price."""
    auxiliary_bytes: int = 0
    """Bytes the policy holds besides keys and values (query buffers, attention tracks, a dense layer's padding
    mask); a sequence's share of its batch's in ``sequence_stats``."""

    @property
    def kept_fraction(self) -> float:
        return self.kept_entries / self.full_entries if self.full_entries else 1.0

    @property
    def context_bytes(self) -> int:
        """What the context's own entries take: the resident bytes less the appended entries'."""
        if self.appended_bytes is not None:
            return self.resident_bytes - self.appended_bytes
        return self.resident_bytes * (self.kept_entries - self.appended_entries) // max(self.kept_entries, 1)


def split_context(valid: torch.Tensor, appended: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(context, newest)`` masks of ``valid`` (``[batch, kv_heads, seq]``): each sequence's newest ``appended[b]``
    entries (a question, generated tokens) are kept whole, never scored and not charged; ``newest`` is None when
    there are none."""
    if not any(appended):
        return valid, None
    after = torch.tensor(appended, device=valid.device)[:, None, None]
    newest = valid & (age_order(valid) >= valid.sum(-1, keepdim=True) - after)
    return valid & ~newest, newest


def tensor_versions(inputs: ScoreInputs) -> dict[str, tuple[torch.Tensor, int]]:
    """Every tensor ``inputs`` hands a policy, by name (``tracks.<name>`` for a track), with torch's version counter
    (bumped by every in-place op); inference tensors have none."""
    named = {name: t for name, t in vars(inputs).items() if isinstance(t, torch.Tensor)}
    named.update({f"tracks.{name}": t for name, t in inputs.tracks.items() if isinstance(t, torch.Tensor)})
    return {name: (t, t._version) for name, t in named.items() if not t.is_inference()}


class CompressedCache(Cache):
    """A KV cache that evicts entries with ``policy`` under ``budget``, and stores what it keeps with ``codec``.

    >>> cache = CompressedCache(model, get_policy("l2norm"), Budget.parse(0.5))
    >>> model.generate(**inputs, cache=cache)
    >>> cache.stats()

    ``codec`` (a registered name or a :class:`~kvpolicies.engine.codecs.Codec`; default full precision) sets what
    an entry costs, so the budget, in bytes, buys more entries from a codec that stores them for less.
    ``tokenizer`` (the model's, optional) lets an after-prefill stage write prompts of its own (KVzip's).

    Construction switches the model to the kvpolicies attention (which runs the model's own attention for layers
    that still hold every token), see :func:`kvpolicies.engine.attention.prepare_model`.
    """

    def __init__(self, model, policy: Policy | str, budget: Budget | float | str,
                 codec: Codec | str | None = None, tokenizer=None) -> None:
        from kvpolicies.registry import (  # the registry imports the plugins, which import the engine
            get_codec,
            get_policy,
        )

        text_config = model.config.get_text_config(decoder=True)
        windows = layer_windows(model)  # refuses layer kinds that hold no per-token keys and values
        self.max_positions: int | float = getattr(text_config, "max_position_embeddings", None) or float("inf")
        prepare_model(model)
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.budget = Budget.parse(budget)
        self.tracks = self._tracks()
        self.codec = FullPrecision() if codec is None else get_codec(codec) if isinstance(codec, str) else codec
        if not isinstance(self.codec, Codec):
            raise UsageError(f"codec must be a kvpolicies.Codec instance or a registered codec's name, got "
                             f"{self.codec!r}")
        self.shape = CacheShape.from_config(model.config, model.dtype, windows)
        if not self.codec.lossless:
            self.shape = dataclasses.replace(self.shape, stored_entry_bytes=self._codec_entry_bytes(model))
        if isinstance(self.codec, GroupedCodec):
            if self.shape.kept_entry_bytes > self.shape.entry_bytes:  # the budget's bound assumes it never is
                raise UsageError(
                    f"codec {self.codec.name!r} stores an encoded entry in {self.shape.kept_entry_bytes} bytes on "
                    f"this model, more than the {self.shape.entry_bytes} of full precision; use a codec that stores "
                    "less than the model's own cache (fewer bits, larger groups), or none")
            self.shape = dataclasses.replace(self.shape, full_precision_entries=self.codec.most_at_full_precision,
                                             window_overhang=max(window_overhang(w, self.codec) for w in windows))
        if self.budget.unit != "fraction" and self.shape.sliding_layers and self.policy.compresses:
            # A fixed number of entries against windows that fill up as the sequence grows: check the full windows
            # now, not halfway through a generation.
            self.budget.allocate(max(w for w in windows if w) + self.shape.window_overhang, self.shape)
        self._allocations: dict[int, list[list[int]]] = {}
        self._layer_views: dict[int, LayerView] = {}
        self._scales: dict[int, LogitScale] = {}  # each layer's logit scale, as its attention last reported it
        self.tokenizer = tokenizer
        self.calibration_s = calibrate(self.policy, model, tokenizer)
        """Seconds the policy's calibration on this model took when it ran (:mod:`kvpolicies.engine.calibration`):
        paid once per model and config in a process, by the first cache, and reported by every cache that uses it;
        0 for a policy that does not calibrate."""
        self.stage_s = 0.0
        """Seconds the after-prefill stages took, their second passes included: a cost the method's users pay."""
        self.probe_tokens = 0
        """Tokens the stages' second passes ran through the model (real tokens, summed over the batch)."""
        self.shared_scores: SharedScores | None = None
        """A stage's scores computed once for this cache and others that hold the same entries (set by whoever
        shares them, see :class:`~kvpolicies.engine.stages.SharedScores`): its first stage selects from them
        instead of running the policy's ``after_prefill`` if its :meth:`stage_key` matches theirs;
        ``used_shared_scores`` says whether it did."""
        self.used_shared_scores = False
        self.probing: dict | None = None
        """Set while an after-prefill stage runs the model over this cache (see :mod:`kvpolicies.engine.stages`):
        layers then record the attention their entries receive instead of storing the new tokens for good."""
        self._reset_stage()
        if self.policy.has_stage:
            install_stage(model)
        self.step: Step | None = None
        """The forward pass under way, as its first layer read it (see :mod:`kvpolicies.engine.step`)."""
        self.cuts = 0
        """Layers cut back so far (one per layer and eviction, whatever the batch): what an eviction's costs are
        counted per."""
        self.policy_time: Stopwatch | None = None
        """Set (by a benchmark) to time the policy's share of every layer's forward (signals, scoring, eviction)."""
        self._warned_positions = False
        self.context_lengths: list[int] | None = None
        """Real tokens of each sequence that are its *context*; the entries after it (a question appended to a
        compressed context, generated tokens) are kept whole and are not charged to the budget, as in kvpress's
        protocol. None: every token is context (the whole prompt is compressed, and decoding evicts too). See
        :mod:`kvpolicies.integrations.protocol`."""
        shared = self.budget.windows == "share" and self.policy.compresses
        super().__init__(layers=[CompressedLayer(i, window, self.codec, self.tracks if shared or not window else (),
                                                 window_compressed=shared) for i, window in enumerate(windows)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a layer's new tokens (transformers calls this before the layer's attention) and leave the layer
        for the kvpolicies attention, which hands it back to :meth:`after_attention` once it has read the keys."""
        if layer_idx == 0:  # a new forward pass: its step is read afresh by its first layer's attention
            self.step = None
        layer = self.layers[layer_idx]
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if layer_idx == 0 and layer.logical_length > self.max_positions:
            self.warn_past_positions(layer.logical_length)
        hand_over(self, layer, keys)
        return keys, values

    def after_attention(self, layer: CompressedLayer, query: torch.Tensor, new_valid: torch.Tensor | None,
                        scale: LogitScale, module: torch.nn.Module | None = None) -> None:
        """A layer's attention has read its keys: record the pass's new tokens, keep the policy's tracks and query
        buffer up to date, and cut the layer back to its allocation if a sequence outgrew it. The layer's forward
        pass ends here (a lossy codec's working copy is dropped).

        ``query``: ``[batch, heads, q_len, head_dim]``; ``new_valid``: ``[batch, q_len]`` bool, or None when all
        new tokens are real (no device sync on the decode path).
        """
        q_len = query.shape[-2]
        if self.probing is not None:  # an after-prefill stage runs the model: record, keep nothing
            layer.record_probe(q_len, new_valid)
            if layer.scored:
                self.probing["received"][layer.layer_idx] = layer.received_by_old(query, scale,
                                                                                  self.probing["reduce"], new_valid)
            layer.settle(encode=False)  # the probe restores the layer's state: nothing to store
            return
        watch = self.policy_time if layer.scored else None
        started = watch.start() if watch is not None else None
        if self.step is None or layer.layer_idx == 0 or self.step.q_len != q_len:  # the first layer reads it for all
            self.step = Step.of(layer.batch_size, q_len, new_valid, layer.seen, self._context(layer.batch_size))
        layer.record(self.step)
        if layer.residual is not None and layer.codec.fits and not layer.residual.fitted:
            # A fitting codec chooses its parameters with the pass's last queries; a padded one reads as zero.
            last = query[:, :, -(layer.codec.fit_queries or q_len):]
            if new_valid is not None:
                last = last * new_valid[:, None, -last.shape[2]:, None]
            layer.fit_queries = last
        if not layer.scored:  # a window held whole: the model's own mechanism, not timed as policy work
            layer.slide()
            self.evict(layer, query, scale, module)  # evicts nothing: checks the budget affords the window
            layer.settle()
            return
        if window := self.policy.query_window:
            layer.remember_queries(query, window)
        if layer.tracked:
            try:
                layer.update_tracks(query, scale)
            except Exception as error:
                raise self._plugin_error("Track.update", error)
        self.evict(layer, query, scale, module, self.step.real)  # drops what slid out of a window, if it cuts
        if layer.window is not None:  # a window the policy chooses in: what slid out goes once the pass has read it
            layer.slide(self.budget.slack_tokens)  # (a packed one, once a run outgrew it by more than the slack)
        layer.settle(hold=self.policy.has_stage and not self._stage_ran)  # a stage keeps entries encoded once
        if started is not None:
            watch.stop(started)

    def _tracks(self) -> tuple[Track, ...]:
        """The tracks every scored layer (full attention, and windows that share the budget) keeps for the policy,
        checked: a tuple of Track instances with
        distinct, non-empty names and a known reduction."""
        declared = self.policy.tracks
        wrong = (not isinstance(declared, (tuple, list)) or not all(isinstance(t, Track) for t in declared)
                 or not all(t.name for t in declared) or len({t.name for t in declared}) != len(declared)
                 or any(t.reduce not in ("sum", "max") for t in declared))
        if wrong:
            raise self._plugin_fault(f"declares tracks {declared!r}; Policy.tracks must be a tuple of kvpolicies "
                                     "Track instances with distinct, non-empty names, each reducing by 'sum' or "
                                     "'max'")
        return tracks_of(self.policy)

    def _codec_entry_bytes(self, model) -> int:
        """The codec's price per entry, once seen to match what it stores (a PluginError naming it if not)."""
        from kvpolicies.registry import plugin_error, plugin_fault

        def fault(what: str) -> Exception:
            return plugin_fault(type(self.codec), what)

        try:
            return checked_entry_bytes(self.codec, self.shape.head_dim, model.dtype, model.device, fault)
        except KVPoliciesError:  # the codec's own fault, named already, or a model it says it cannot store
            raise
        except Exception as error:
            raise plugin_error(type(self.codec), "a trial encode and decode", error)

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
        handed = dataclasses.replace(uniform, tokens=uniform.tokens.clone())
        try:
            allocated = self.policy.allocate(handed)
        except Exception as error:
            raise self._plugin_error("allocate", error)
        return uniform.check(allocated, self._plugin_fault)  # handed a copy: edits cannot move the bar

    def _targets(self, seq_len: int) -> list[list[int]]:
        """Per layer, per KV head allocation as Python ints: the decode-time check must not touch the device."""
        if seq_len not in self._allocations:
            if len(self._allocations) >= 256:  # lengths only grow while decoding: old ones are not asked again
                self._allocations.clear()
            self._allocations[seq_len] = self.allocation(seq_len).tokens.tolist()
        return self._allocations[seq_len]

    def evict(
        self, layer: CompressedLayer, query: torch.Tensor, scale: LogitScale, module: torch.nn.Module | None = None,
        real: list[int] | None = None,
    ) -> None:
        """Cut ``layer`` back to its allocation if a sequence outgrew it (by more than the slack when decoding).

        ``real``: the real new tokens of each sequence in this forward (None: all ``q_len`` real). A sequence that
        received at most one is decoding, and may grow by the budget's slack, even inside a padded forward of
        several tokens, so it keeps what it would keep alone."""
        if not self.policy.compresses:
            return
        if not layer.scored:  # holds its window, set by the model; the budget must still afford it
            for n, a in zip(layer.seen, self.step.appended):
                self._targets(max(n - a, 1))
            return
        if self.policy.has_stage:  # it chooses once the prompt is in, over every layer: see after_prefill()
            self._layer_view(layer.layer_idx, module)
            self._scales[layer.layer_idx] = scale
            return
        appended = self.step.appended  # read once for the pass, the same in every layer
        real = real or [query.shape[-2]] * len(appended)
        slack = [0 if n > 1 or any(appended) else self.budget.slack_tokens for n in real]
        targets = [self._targets(max(n - a, 1))[layer.layer_idx] for n, a in zip(layer.seen, appended)]
        counts = [[c - a for c in row] for row, a in zip(layer.counts(), appended)]  # the context's entries
        # Judged per sequence on the layer total: heads may legitimately sit above their uniform share after a
        # policy moved entries between them, and must not trigger an eviction at every step for it.
        over = [sum(row_c) > sum(row_t) + row_slack * len(row_c)
                for row_c, row_t, row_slack in zip(counts, targets, slack)]
        padded = not layer.packed and min(layer.seen) < layer.logical_length
        if not (any(over) or padded):
            return
        dense, valid = layer.dense_view()
        # A window's entries its next query cannot see are dropped, never chosen (entries that slid out are stored
        # until this eviction, hidden from the attention).
        reach = valid if layer.positions is None else valid & layer.in_window(dense["positions"][..., 0])
        context, newest = split_context(reach, appended)
        # Rows over budget get their allocation (select() clamps a head to what it holds), others keep everything.
        # One upload for all: the entries to keep per head, whether the row is over, and its sinks.
        sinks, recent = self.protected(layer)
        table = torch.tensor([[*(row_t if row_over else row_c), row_over, row_sinks]
                              for row_c, row_t, row_over, row_sinks in zip(counts, targets, over, sinks)],
                             device=valid.device)
        keep_n, over_rows = table[:, :-2], table[:, -2:-1].bool()  # on the device, as every field a policy sees
        sink_tokens = table[:, -1:, None] if len(set(sinks)) > 1 else sinks[0]  # per sequence only where they differ
        if any(over):
            inputs = self._score_inputs(layer, dense, valid, context, keep_n.clone(), query, scale)
            inputs.layer = self._layer_view(layer.layer_idx, module)
            versions = tensor_versions(inputs)
            try:
                scores = self.policy.score(inputs)
            except Exception as error:
                raise self._plugin_error("score", error)
            self._unchanged(versions)
            scores = self._checked(scores, context)
            keep_n = self._reallocate_heads(scores, context, keep_n, over, over_rows)
        else:
            scores = torch.zeros(valid.shape, device=valid.device)
        keep = select(scores, context, keep_n, sink_tokens, recent)
        layer.store(dense, keep if newest is None else keep | newest)
        self.cuts += 1

    def protected(self, layer: CompressedLayer) -> tuple[list[int], int]:
        """``(sink_tokens per sequence, window_tokens)`` the policy protects in ``layer``, on the host (they travel
        with the eviction's one upload). A sliding window that no longer holds a sequence's first tokens has no
        sinks to protect there: its oldest entries are the next to slide out. So in a window the sinks are kept
        while the sequence is shorter than the window, as it would be alone whatever its neighbours' padding."""
        sinks, recent = self.policy.protected
        if layer.window is None:
            return [sinks] * len(layer.seen), recent
        return [sinks if seen < layer.window else 0 for seen in layer.seen], recent

    def appended(self, seen: list[int]) -> list[int]:
        """Per sequence, the real tokens after its context (0 for all when no context is set)."""
        context = self._context(len(seen))
        return [0] * len(seen) if context is None else [max(n - c, 0) for n, c in zip(seen, context)]

    def _context(self, batch: int) -> list[int] | None:
        """``context_lengths``, checked against the batch."""
        if self.context_lengths is not None and len(self.context_lengths) != batch:
            raise UsageError(f"context_lengths gives {len(self.context_lengths)} lengths for a batch of {batch} "
                             "sequences; give one per sequence")
        return self.context_lengths

    def reset(self) -> None:
        super().reset()
        self.context_lengths = None  # the next prompt's split is its own
        self.step = None
        self._reset_stage()

    # -- the after-prefill stage (see kvpolicies.engine.stages) -----------------------------------------------------
    def _reset_stage(self) -> None:
        self._stage_ran = False
        self._stage_split = False  # context_lengths were set by the stage, not by a protocol
        self._prompt_ids: list[torch.Tensor] = []

    @property
    def stage_ran(self) -> bool:
        """Whether an after-prefill stage has chosen from this prompt already."""
        return self._stage_ran

    def stage_due(self, new_tokens: int) -> bool:
        """Whether the after-prefill stage must run before a forward pass of ``new_tokens`` tokens: the prompt is
        in (a decoding step), or every sequence has reached its context's end."""
        if self.probing is not None or self._stage_ran or not self.layers[0].is_initialized:
            return False
        if self.context_lengths is not None and not self._stage_split:
            return all(n >= c for n, c in zip(self.layers[0].seen, self.context_lengths))
        return new_tokens == 1

    def record_ids(self, ids: torch.Tensor | None) -> None:
        """Keep the token ids this cache has seen, for the stage (``Prefilled.ids``; a few bytes per token), joined
        into one tensor now and then so that a long generation does not keep one small tensor per step."""
        if ids is not None and self.probing is None:
            self._prompt_ids.append(ids)
            if len(self._prompt_ids) > 64:
                self._prompt_ids = [torch.cat(self._prompt_ids, dim=1)]

    def after_prefill(self, model) -> None:
        """Run the policy's after-prefill stage now: score every entry of every layer, keep the best across all of
        them per sequence, and from then on keep what follows whole and uncharged. Runs by itself before the first
        forward pass after the prompt (or context); call it by hand to compress in chunks (each call judges all
        entries held, earlier survivors included)."""
        if not self.layers[0].is_initialized:  # nothing prefilled yet: nothing to choose from
            return
        started = clock(self.layers[0].device)
        try:
            self._run_stage(model)
        finally:
            self.stage_s += clock(self.layers[0].device) - started

    def _run_stage(self, model) -> None:
        if self._stage_split:  # a previous stage's split: everything held is context now
            self.context_lengths, self._stage_split = None, False
        prefilled, held = self._stage_inputs(model)
        views = prefilled.layers
        if self.shared_scores is not None and not self._stage_ran and self.shared_scores.key == self.stage_key():
            returned, self.used_shared_scores = self.shared_scores.scores, True
        else:
            returned = self.stage_scores(prefilled)
        scored = [i for i, inputs in enumerate(views) if inputs is not None]
        if not isinstance(returned, (list, tuple)) or len(returned) != len(views):
            raise self._plugin_fault(
                f"returned {type(returned).__name__} from after_prefill(); it must return a list of {len(views)} "
                f"entries, one per layer: a [batch, kv_heads, seq] tensor of scores for layers {scored} and None "
                "for the sliding-window layers held whole")
        scores = [self._checked(returned[i], views[i].valid, "after_prefill") for i in scored]
        per_layer = [self.protected(self.layers[i])[0] for i in scored]
        counts = {count for row in per_layer for count in row}
        sinks = (0 if not counts else counts.pop() if len(counts) == 1 else  # one count for all, or one upload
                 torch.tensor(per_layer, device=views[scored[0]].valid.device)[..., None, None])  # [layers, b, 1, 1]
        keeps = select_across_layers(scores, [views[i].valid for i in scored], prefilled.budget, sinks,
                                     self.policy.protected[1])
        for i, keep in zip(scored, keeps):
            dense, newest = held[i]
            self.layers[i].store(dense, keep if newest is None else keep | newest)
            self.cuts += 1
        self._stage_ran = True
        if self.context_lengths is None:  # what follows the prompt is kept whole and not charged
            self.context_lengths, self._stage_split = list(self.layers[0].seen), True

    def share_stage(self, model) -> SharedScores:
        """This cache's first stage scored now, over what it holds, for other caches to select from (this one is
        left as it was, its stage still due): see :class:`~kvpolicies.engine.stages.SharedScores`. Timed from the
        policy's call on: each cache builds its own inputs to select from, and counts that itself."""
        if self._stage_ran or not self.layers[0].is_initialized:
            raise ValueError("share_stage() scores a prompt's first stage: call it once the prompt (or its context) "
                             "is in and before the stage runs")
        probed = self.probe_tokens
        prefilled, _ = self._stage_inputs(model)
        started = clock(self.layers[0].device)
        scores = self.stage_scores(prefilled)
        seconds = clock(self.layers[0].device) - started
        tokens, self.probe_tokens = self.probe_tokens - probed, probed
        return SharedScores(self.stage_key(), scores, seconds, tokens)

    def _stage_inputs(self, model) -> tuple[Prefilled, list]:
        """The stage's view of every layer, and per scored layer its dense entries and newest-entry mask (what the
        selection stores from), or None."""
        seen = list(self.layers[0].seen)
        appended = self.appended(seen)
        allocations = [self.allocation(max(n - a, 1)) for n, a in zip(seen, appended)]
        held, views = [], []
        for layer in self.layers:
            if not layer.scored:
                held.append(None)
                views.append(None)
                continue
            dense, valid = layer.dense_view()
            if layer.positions is not None:  # a window: what slid out is dropped
                valid = valid & layer.in_window(dense["positions"][..., 0])
            context, newest = split_context(valid, appended)
            keep = torch.stack([allocation.tokens[layer.layer_idx] for allocation in allocations]).to(valid.device)
            scale = self._scales.get(layer.layer_idx, LogitScale(layer.head_dim ** -0.5))
            views.append(ScoreInputs(
                layer_idx=layer.layer_idx, valid=context, order=age_order(context), seen_tokens=seen, keep=keep,
                keys=dense["keys"], values=dense["values"], scaling=scale.scaling, softcap=scale.softcap,
                queries=layer.recent_queries if self.policy.query_window else None,
                layer=self._layer_views.get(layer.layer_idx),
                cumulative_attention=(dense[TRACK + CumulativeAttention.name][..., 0] * context
                                      if TRACK + CumulativeAttention.name in dense else None),
                tracks={track.name: dense[TRACK + track.name][..., 0] * context for track in self.policy.tracks},
            ))
            held.append((dense, newest))
        prefilled = Prefilled(layers=views, budget=[allocation.free_total for allocation in allocations],
                              ids=torch.cat(self._prompt_ids, dim=1) if self._prompt_ids else None,
                              context_tokens=[n - a for n, a in zip(seen, appended)], first=not self._stage_ran,
                              encode=None if self.tokenizer is None else self._encode,
                              _probe=self._prober(model))
        return prefilled, held

    def stage_scores(self, prefilled: Prefilled) -> list[torch.Tensor | None]:
        """What the policy's ``after_prefill`` returns for ``prefilled``, its inputs checked unedited after."""
        versions = [tensor_versions(inputs) if inputs else None for inputs in prefilled.layers]
        try:
            returned = self.policy.after_prefill(prefilled)
        except Exception as error:
            raise self._plugin_error("after_prefill", error)
        for version in versions:
            if version is not None:
                self._unchanged(version, "after_prefill")
        return returned

    def stage_key(self) -> tuple:
        """What a stage whose scores ignore the budget (``Policy.stage_ignores_budget``) scores from, besides the
        prompt: the policy's config, the codec the entries are held in, the window rule, each sequence's tokens
        seen and appended after its context, and the prompt's ids. Two caches of one prefill with equal keys get
        equal scores."""
        seen = tuple(self.layers[0].seen)
        ids = tuple(torch.cat(self._prompt_ids, dim=1).flatten().tolist()) if self._prompt_ids else None
        return (self.policy.config_hash(), self.codec.name, self.budget.windows, seen,
                tuple(self.appended(list(seen))), ids)

    def _prober(self, model):
        def attention_from(ids: torch.Tensor, reduce, mask: torch.Tensor | None) -> list[torch.Tensor | None]:
            self.probe_tokens += ids.numel() if mask is None else int(mask.sum())
            return probe(self, model, ids, reduce, mask)

        return attention_from

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _plugin_error(self, hook: str, error: Exception) -> Exception:
        """What to raise for ``error`` from the policy's ``hook``: a PluginError naming the plugin (see
        :func:`kvpolicies.registry.plugin_error`). The hooks are called in a bare try/except: nothing per token."""
        from kvpolicies.registry import plugin_error  # the registry imports the plugins, which import the engine

        return plugin_error(type(self.policy), hook, error)

    def _plugin_fault(self, what: str) -> Exception:
        """What to raise when the policy's hook returned something that breaks its contract: a PluginError saying
        ``what`` and naming the plugin (see :func:`kvpolicies.registry.plugin_fault`)."""
        from kvpolicies.registry import plugin_fault  # the registry imports the plugins, which import the engine

        return plugin_fault(type(self.policy), what)

    def _unchanged(self, versions: dict[str, tuple[torch.Tensor, int]], hook: str = "score") -> None:
        """Refuse a ``score()`` (or other ``hook``) that edited its inputs in place: ``keys`` and ``values`` may be the
        layer's storage, and the change would reach the model's next attention. Read from torch's version counters
        (bumped by every in-place op): no copy, no device sync."""
        edited = [name for name, (t, version) in versions.items() if t._version != version]  # the tensors handed
        # out, whatever the policy did to the fields
        if edited:
            from kvpolicies.registry import plugin_fault

            raise plugin_fault(type(self.policy), f"edited inputs.{', inputs.'.join(edited)} in place in {hook}(); the "
                               "inputs are read-only (keys and values may be the cache's own storage): compute on a "
                               "copy (t.clone()) or with out-of-place ops")

    def _checked(self, scores: object, valid: torch.Tensor, hook: str = "score") -> torch.Tensor:
        """``scores`` if they keep the contract of ``score()`` (or of the ``hook`` that returned them); a policy that
        breaks it is named (a PluginError: the fault is in its code, not in the user's input), never silently
        ranked."""
        expected = f"a [batch, kv_heads, seq] = {list(valid.shape)} tensor of scores (higher = keep)"
        if not isinstance(scores, torch.Tensor):
            raise self._plugin_fault(f"returned {type(scores).__name__} from {hook}(); it must return {expected}")
        if scores.device != valid.device:
            raise self._plugin_fault(f"returned scores on {scores.device} from {hook}(), but the cache is on "
                                     f"{valid.device}; build them from the inputs' tensors (or move them with "
                                     ".to(inputs.valid.device))")
        if scores.shape != valid.shape:
            raise self._plugin_fault(f"returned scores of shape {list(scores.shape)} from {hook}(); it must return "
                                     f"{expected}")
        if scores.is_complex() or scores.dtype == torch.bool:
            raise self._plugin_fault(f"returned {scores.dtype} scores from {hook}(); it must return real numbers "
                                     "(a float or integer tensor)")
        if scores.is_floating_point() and (torch.isnan(scores) & valid).any():  # padding may hold anything
            raise self._plugin_fault(f"returned NaN scores for real entries from {hook}(); scores must be numbers "
                                     "(±inf allowed; NaN where inputs.valid is False, at padding, is ignored)")
        return scores

    def _reallocate_heads(self, scores, valid, keep_n, over: list[bool], over_rows: torch.Tensor) -> torch.Tensor:
        if type(self.policy).reallocate_heads is Policy.reallocate_heads:  # moves nothing: nothing to check
            return keep_n
        try:
            moved = self.policy.reallocate_heads(scores, valid, keep_n.clone())  # checked against keep_n, untouched
        except Exception as error:
            raise self._plugin_error("reallocate_heads", error)
        expected = f"a [batch, kv_heads] = {list(keep_n.shape)} tensor of whole numbers of entries"
        if not isinstance(moved, torch.Tensor) or moved.is_floating_point() or moved.dtype == torch.bool:
            kind = f"a {moved.dtype} tensor" if isinstance(moved, torch.Tensor) else type(moved).__name__
            raise self._plugin_fault(f"returned {kind} from reallocate_heads(); it must return {expected}")
        moved = moved.to(keep_n.device, torch.long)
        if moved.shape != keep_n.shape:
            raise self._plugin_fault(f"returned shape {list(moved.shape)} from reallocate_heads(); it must return "
                                     f"{expected}")
        held = valid.sum(-1).to(moved.device)
        # Every check in one host read. A head raised past what it holds would be clamped by select(), and the
        # budget would go unspent, unsaid.
        # Only rows over budget take the move (the others keep what they hold, padding-only rows of a chunked
        # prefill included, which hold nothing).
        beyond = (moved > held) & (moved > keep_n) & over_rows
        empty = (moved < 1) & over_rows
        grown, emptied, overfilled = torch.stack(
            [((moved.sum(-1, keepdim=True) > keep_n.sum(-1, keepdim=True)) & over_rows).any(),
             empty.any(), beyond.any()]).tolist()
        if grown:
            raise self._plugin_fault(
                f"returned {moved.sum(-1).tolist()} entries per sequence from reallocate_heads(), more than the "
                f"{keep_n.sum(-1).tolist()} allocated; move entries between heads, never add them"
            )
        if emptied:
            b, h = empty.nonzero()[0].tolist()
            raise self._plugin_fault(
                f"left KV head {h} of sequence {b} with {int(moved[b, h])} entries in reallocate_heads(); every head "
                "must keep at least one entry"
            )
        if overfilled:
            b, h = beyond.nonzero()[0].tolist()
            raise self._plugin_fault(
                f"gave KV head {h} of sequence {b} {int(moved[b, h])} entries in reallocate_heads(), but it holds "
                f"{int(held[b, h])}; give no head more than it holds (valid.sum(-1)) and move the rest to heads that "
                "have more"
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
        queries = layer.recent_queries
        queries = queries if queries is not None else query
        if Signal.QUERIES in needs:
            inputs.queries = queries
        if Signal.ATTENTION in needs:
            window = layer.window_view(dense["positions"][..., 0] if "positions" in dense else None, queries.shape[2])
            inputs.attention = attention_received(queries, dense["keys"], valid, order, scale, window=window)
        if Signal.CUMULATIVE_ATTENTION in needs:
            inputs.cumulative_attention = dense[TRACK + CumulativeAttention.name][..., 0]
        inputs.tracks = {track.name: dense[TRACK + track.name][..., 0] for track in self.policy.tracks}
        if context is not valid:  # what the entries after the context received is not the policy's to weigh
            for name in ("attention", "cumulative_attention"):
                if getattr(inputs, name) is not None:
                    setattr(inputs, name, getattr(inputs, name) * context)
            inputs.tracks = {name: t * context for name, t in inputs.tracks.items()}
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
        physical = sum(stats.physical_bytes for stats in per_sequence)
        return CacheStats(
            kept_entries=kept,
            full_entries=sum(stats.full_entries for stats in per_sequence),
            resident_bytes=resident,
            full_bytes=sum(stats.full_bytes for stats in per_sequence),
            padding_bytes=max(resident - physical, 0),
            physical_bytes=physical,
            appended_entries=sum(stats.appended_entries for stats in per_sequence),
            appended_bytes=sum(stats.appended_bytes for stats in per_sequence),
            auxiliary_bytes=self.auxiliary_bytes(),
        )

    def sequence_stats(self) -> list[CacheStats]:
        """One entry per sequence of the batch: its own real entries, so figures do not depend on the batch size or
        on the padding its neighbours forced on it."""
        if not self.layers[0].is_initialized:
            return []
        kept = self.kept_per_head().sum(dim=(0, 2)).tolist()
        seen_tokens = self.layers[0].seen
        afters = self.appended(seen_tokens)
        in_full = [sum(counts) for counts in zip(*(layer.full_precision_counts() for layer in self.layers))]
        appended_in_full = [sum(counts) for counts in
                            zip(*(layer.full_precision_counts(newest=afters) for layer in self.layers))]
        extra = self.shape.entry_bytes - self.shape.kept_entry_bytes  # a full-precision entry's cost beyond the price
        stats = []
        auxiliary = self.auxiliary_bytes() // len(seen_tokens)  # buffers and tracks are per batch: an even share
        for seen, entries, full_precision, after, after_in_full in zip(seen_tokens, kept, in_full, afters,
                                                                      appended_in_full):
            full = self.shape.full_entries(seen)  # the model's own cache: sliding layers hold their window
            appended = self.shape.full_entries(after) if after else 0  # every layer holds them (windows: the last)
            physical = int(entries) * self.shape.kept_entry_bytes + full_precision * extra
            stats.append(CacheStats(kept_entries=int(entries), full_entries=full,
                                    resident_bytes=physical, physical_bytes=physical,
                                    full_bytes=full * self.shape.entry_bytes, appended_entries=appended,
                                    appended_bytes=appended * self.shape.kept_entry_bytes + after_in_full * extra,
                                    auxiliary_bytes=auxiliary))
        return stats
