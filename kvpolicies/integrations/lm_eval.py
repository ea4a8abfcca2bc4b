"""lm-evaluation-harness adapter: the model ``kvpolicies`` (an HFLM whose KV cache is compressed) and a drop-in CLI.

``lm_eval`` has no plugin discovery for models, so ``kvpolicies lm-eval ARGS`` (or ``python -m kvpolicies lm-eval
ARGS``, see :mod:`kvpolicies.cli.lm_eval`) imports this module, which registers the model, and hands ARGS unchanged to
lm-eval's own command line.

What is compressed, per request type:

- ``generate_until``: the prompt is prefilled, each layer is cut to the budget right after its attention has read
  it, then generation runs on the compressed cache (decode-time eviction past the budget's slack).
  With ``prefill_chunk=N`` the prompt is prefilled N tokens at a time (transformers' ``prefill_chunk_size``) and
  the cache is cut back to the budget after every chunk, so prefill memory follows the budget, not the prompt.
- ``loglikelihood``: the context is prefilled and compressed the same way; the continuation is then scored on the
  compressed cache. As in generation, the first continuation token is predicted by the last context position
  during prefill, before any eviction, so single-token continuations are not affected by the budget.
- ``loglikelihood_rolling``: each document streams through one cache in chunks of ``stream_chunk`` tokens; after
  every chunk the cache is cut back to the budget, so the budget binds while the document is read (the paper's
  language-modelling setting). Tokens in a chunk see the compressed past plus their own chunk.

``protocol=query_aware`` (default) or ``query_agnostic`` chooses when a generation prompt is compressed relative to
its question (:mod:`kvpolicies.integrations.protocol`); the task names where its question starts.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from tqdm import tqdm

from kvpolicies.engine.attention import prepare_model
from kvpolicies.engine.budget import Budget
from kvpolicies.engine.cache import CacheStats, CompressedCache
from kvpolicies.engine.calibration import calibrate
from kvpolicies.engine.clock import clock
from kvpolicies.engine.replay import Prefill, replay
from kvpolicies.engine.policy import Role, coerce_option
from kvpolicies.errors import CalibrationError, ModelLoadError, PolicyConfigError, UsageError
from kvpolicies.engine.memory import PeakMemory
from kvpolicies.engine.stages import SharedScores
from kvpolicies.integrations.models import resolve_device, resolve_dtype, resolve_source
from kvpolicies.integrations.protocol import QUESTION_MARKER, Protocol, missing_split, question_start, split_cache
from kvpolicies.integrations.shared import SharedPrefill
from kvpolicies.registry import get_codec, get_policy, policy_with_role, registry

_HFLM_ARGUMENTS = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
POLICY_PREFIX = "policy."
"""``policy.NAME=VALUE`` sets the policy's option NAME whatever else is called NAME."""


@dataclasses.dataclass
class RequestMemory:
    """The largest peak of any one request (a batch's prefill and decoding), and its growth above what the process
    held when the request began: a cell's own memory, whichever cells, tasks or warm-up ran before it."""

    peak_bytes: int = 0
    growth_bytes: int = 0
    requests: int = 0
    shared_capture_bytes: int = 0
    """The largest captured prefill this cell was replayed from (every layer's keys, values and queries, held once
    for all the cells sharing it, outside any one cell's peak)."""
    decoded_together_bytes: int = 0
    """The most memory a decoding run this cell's answers shared with other cells' took (:mod:`kvpolicies.engine.rows`):
    every row's cache, held as the batch began, and the run's growth above that; outside this cell's own peak, which
    then covers its replay, its question and its first token."""

    def add(self, peak: PeakMemory, request: bool = True) -> None:
        """A request's peak; or (``request=False``) a peak of work done for this cell and others outside its
        requests (a stage's scoring shared by cells of one prompt), which it would reach in a request of its own."""
        self.peak_bytes = max(self.peak_bytes, peak.peak_bytes)
        self.growth_bytes = max(self.growth_bytes, peak.growth_bytes)
        self.requests += request


def _measured(method):
    """Run a request's method inside its own :class:`~kvpolicies.engine.memory.PeakMemory`."""

    @functools.wraps(method)
    def measured(self, *args, **kwargs):
        with PeakMemory(self.device) as peak:
            result = method(self, *args, **kwargs)
        self.request_memory.add(peak)
        return result

    return measured


@register_model("kvpolicies")
class KVPoliciesLM(HFLM):
    """An HFLM whose every request runs on a ``CompressedCache``; model args beyond HFLM's are policy options.

    ``policy.NAME=VALUE`` names a policy option explicitly; it is required when HFLM (or this adapter) takes NAME too.
    """

    def __init__(
        self,
        pretrained: str | torch.nn.Module | None = None,
        policy: str | None = None,
        budget: Budget | float | str | None = None,
        compression_ratio: float | str | None = None,
        slack_tokens: int | str | None = None,
        budget_windows: str | None = None,
        codec: str | None = None,
        stream_chunk: int | str = 128,
        prefill_chunk: int | str | None = None,
        protocol: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        **kwargs: Any,
    ) -> None:
        policy = policy or policy_with_role(Role.REFERENCE)  # no policy: keep everything, like lm-eval's own model
        if policy is None:
            raise UsageError("no policy= given and no installed policy keeps the whole cache; name a policy")
        adapter_args = dict(pretrained=pretrained, budget=budget, compression_ratio=compression_ratio,
                            slack_tokens=slack_tokens,
                            budget_windows=budget_windows, codec=codec, stream_chunk=stream_chunk,
                            prefill_chunk=prefill_chunk, protocol=protocol, device=device, dtype=dtype,
                            device_map=device_map, attn_implementation=attn_implementation)
        options = _policy_options(policy, kwargs, adapter_args)  # takes the policy's own args out of kwargs
        try:
            # One instance per model, built from its own args; a policy keeps no state but what it calibrated on
            # this model, so its caches share it.
            self.kv_policy = get_policy(policy, **options)
        except PolicyConfigError as error:
            raise PolicyConfigError(
                f"{error}. Model args that are neither HFLM's nor the policy's are rejected (policy.NAME= names a "
                f"policy option explicitly); HFLM's are: "
                f"{', '.join(sorted(_HFLM_ARGUMENTS))}"
            ) from None
        slack = None if slack_tokens is None else _count("slack_tokens", slack_tokens, minimum=0)
        # The budget's own slack (16) and window rule (share) unless given; no budget keeps everything.
        windows = budget_windows or None
        if compression_ratio not in (None, "") and budget not in (None, ""):
            raise UsageError(f"budget={budget} and compression_ratio={compression_ratio} both say how much to keep; "
                             "give one (compression_ratio is kvpress's: the fraction removed, so 0.75 = budget=0.25)")
        if compression_ratio not in (None, ""):
            self.kv_budget = Budget.from_compression_ratio(compression_ratio, slack_tokens=slack, windows=windows)
        else:
            self.kv_budget = Budget.parse(1.0 if budget in (None, "") else budget, slack_tokens=slack,
                                          windows=windows)
        self.kv_codec = get_codec(codec or "full")  # an unknown name fails here, before the model loads
        self.stream_chunk = _count("stream_chunk", stream_chunk)
        self.prefill_chunk = None if prefill_chunk in (None, "", "None") else _count("prefill_chunk", prefill_chunk, minimum=2)
        self.protocol = Protocol.parse(protocol)
        if self.protocol is Protocol.QUERY_AGNOSTIC:
            # Each context is compressed alone before its question: one request at a time.
            kwargs["batch_size"] = 1
            kwargs.pop("max_batch_size", None)
        if isinstance(pretrained, torch.nn.Module):  # a model already loaded (pass its tokenizer= too)
            super().__init__(pretrained=pretrained, **kwargs)
        else:
            source, _ = resolve_source(pretrained)
            if device_map not in (None, ""):
                placement = _spread(device_map, device)
            else:
                resolved = resolve_device(device)
                placement = {"device": str(resolved)}
            first = torch.device(placement.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
            dtype = str(resolve_dtype(dtype, first)).removeprefix("torch.")
            if attn_implementation not in (None, ""):
                kwargs["attn_implementation"] = attn_implementation
            super().__init__(pretrained=source, dtype=dtype, **placement, **kwargs)
        if self.backend != "causal":
            raise ModelLoadError("kvpolicies evaluates decoder-only (causal) models")
        prepare_model(self.model)
        self.kv_measurements: list[CacheStats] = []  # one per sequence, at the end of its request
        self.kv_padding_bytes = 0  # largest padding a batch stored next to its sequences' entries
        self.timings = Timings()
        # Before any request: a policy fitted to the model (Q-Filters) is fitted now, outside every timed prefill.
        try:
            self.timings.calibration_s = calibrate(self.kv_policy, self.model, self.tokenizer)
        except Exception as error:  # the policy's failure on this model, not the model's: only its cells fail
            raise CalibrationError(f"policy {policy!r} could not calibrate on this model: {error}",
                                   model=self.model, tokenizer=self.tokenizer) from error
        self.request_memory = RequestMemory()
        self.shared: SharedPrefill | None = None
        """Set when this cell shares each prompt's prefill with others (:mod:`kvpolicies.integrations.shared`)."""
        self.answers: dict[str, Any] = {}
        """This cell's outputs computed with the others', waiting for lm-eval to ask for them."""
        self.shared_scores: SharedScores | None = None
        """Set while this cell computes a request whose stage scores it shares with others (see
        :class:`~kvpolicies.engine.stages.SharedScores`): the caches it builds select from them."""
        self.stage_shared: SharedScores | None = None
        """The shared scores this cell's cache selected from in the request under way, until the group charges
        their scoring (:class:`~kvpolicies.integrations.shared.SharedPrefill`)."""
        self.stage_after = False
        """Whether the last request's stage ran after it ended (its answer done at the first token), so that its
        time is charged to ``stage_s`` alone."""

    def new_cache(self) -> CompressedCache:
        cache = CompressedCache(self.model, self.kv_policy, self.kv_budget, codec=self.kv_codec,
                                tokenizer=self.tokenizer)
        cache.shared_scores = self.shared_scores
        return cache

    def _measure(self, cache: CompressedCache) -> None:
        self.stage_after = cache.policy.has_stage and not cache.stage_ran
        if self.stage_after:
            # The request ended before the stage's turn (the next forward): an answer done at its first token, which
            # comes from the prompt's own forward (for every policy, as in kvpress), or a one-token continuation. A
            # deployment compresses whatever follows: run it now, or the record would count the whole prompt kept.
            # Its time goes to stage_s only: nothing was prefilled or decoded after it.
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                cache.after_prefill(self.model)
        self.kv_measurements += cache.sequence_stats()
        if cache.used_shared_scores:  # its own part now; the scoring's once the cells that shared it are known
            self.timings.add_stage(cache.stage_s, 0)
            self.stage_shared = cache.shared_scores
        else:
            self.timings.add_stage(cache.stage_s, cache.probe_tokens)
        self.kv_padding_bytes = max(self.kv_padding_bytes, cache.stats().padding_bytes)

    # -- generate_until ------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # A task names where its question starts on its docs; it travels with the request's generation kwargs
        # (requests are batched by those, so a batch shares one marker) and never reaches another model.
        marked = []
        for request in requests:
            marker = request.doc.get(QUESTION_MARKER) if isinstance(request.doc, dict) else None
            if marker:  # a copy: lm-eval's own request (and its logged arguments) stays as the task made it
                context, gen_kwargs = request.args
                request = dataclasses.replace(request, arguments=(context, {**gen_kwargs, QUESTION_MARKER: marker}))
            marked.append(request)
        return super().generate_until(marked, disable_tqdm=disable_tqdm)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        if self.shared is not None:  # a cell of a group that shares each prompt's prefill
            return self.shared.answer(self, context, max_length, stop, generation_kwargs)
        return self._generate(context, max_length, stop, **generation_kwargs)

    @_measured
    def _generate(self, context, max_length: int, stop: list[str], prefill: Prefill | None = None,
                  shared: tuple[float, int] | None = None, **generation_kwargs):
        """This cell's output for one ``generate`` call of lm-eval: its own prefill, or, with ``prefill``, its
        cache replayed from the one its group shares (``shared``: that prefill's seconds and how many cells share
        it, each charged an equal part)."""
        cache, steps, prefilled, generation_kwargs = self._prefilled(context, prefill, shared, generation_kwargs)
        if prefill is not None and prefill.sequence is not None:  # query-aware: the prompt and its first token
            output = self._continue(prefill.sequence, cache, context.shape[1], max_length, stop, steps,
                                    **generation_kwargs)
            self._measure(cache)
            self.timings.add_decoding(context.shape[0], steps)
            return output
        output = super()._model_generate(
            context, max_length, stop, cache=cache, streamer=steps, **generation_kwargs
        )
        self._measure(cache)
        self.timings.add_generation(context.numel() - prefilled, context.shape[0], steps)
        return output

    @_measured
    def first_token(self, context, max_length: int, stop: list[str], prefill: Prefill, shared: tuple[float, int],
                    **generation_kwargs) -> tuple[CompressedCache, torch.Tensor]:
        """This cell's cache replayed from the prefill its group shares, the question prefilled on it (query-
        agnostic) and its first token chosen, as its own ``generate`` call would: ``(cache, prompt and first
        token)``. The rest is decoded with the other cells of the request (:mod:`kvpolicies.engine.rows`), and
        counted by :meth:`decoded`."""
        cache, steps, prefilled, generation_kwargs = self._prefilled(context, prefill, shared, generation_kwargs)
        if prefill.sequence is not None:  # query-aware: the capture chose it
            return cache, prefill.sequence
        sequence = super()._model_generate(context, context.shape[1] + 1, stop, cache=cache, streamer=steps,
                                           **generation_kwargs)
        self.timings.add_generation(context.numel() - prefilled, context.shape[0], steps)
        return cache, sequence

    @torch.no_grad()
    def share_stage(self, context, prefill: Prefill, **generation_kwargs) -> tuple[SharedScores, PeakMemory]:
        """This cell's stage scored once for the cells of its group that would score the same (same policy config,
        codec and window rule; any budgets): its cache replayed from ``prefill`` as for its own request, up to
        where its stage would run, scored, and dropped. Returns the scores and the work's peak memory."""
        marker = generation_kwargs.get(QUESTION_MARKER)
        with PeakMemory(self.device) as peak, torch.autocast(
                device_type=self.device.type, dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None):
            cache = CompressedCache(self.model, self.kv_policy, self.kv_budget, codec=self.kv_codec,
                                    tokenizer=self.tokenizer)
            starts = None if marker is None else self.question_starts(context, marker,
                                                                      generation_kwargs.get("attention_mask"))
            if prefill.sequence is not None:  # query-aware: the whole prompt, its question kept whole
                cache.context_lengths = starts
            replay(prefill, cache)
            if prefill.sequence is None:  # query-agnostic: the context alone, its question to follow
                cache.context_lengths = starts
            shared = cache.share_stage(self.model)
            del cache
        return shared, peak

    def decoded(self, cache: CompressedCache, tokens: int, seconds: float, rows: int) -> None:
        """This cell's share of a decoding run with others: ``tokens`` of its own in ``seconds`` (each step's time
        split equally among the rows it decoded), in batches of up to ``rows``."""
        self._measure(cache)
        self.timings.add_together(tokens, seconds, rows)

    def _prefilled(self, context, prefill: Prefill | None, shared: tuple[float, int] | None,
                   generation_kwargs: dict[str, Any]
                   ) -> tuple[CompressedCache, StepClock, int, dict[str, Any]]:
        """A new cache for this request, with what this cell prefills before ``generate``: the context alone
        (query-agnostic), or, with ``prefill``, the prompt (query-aware) or its context (query-agnostic) replayed.
        Returns the cache, the clock of the steps to come, the tokens prefilled, and the arguments for ``generate``."""
        marker = generation_kwargs.pop(QUESTION_MARKER, None)
        cache = self.new_cache()
        steps = StepClock(self.device)
        if self.prefill_chunk:
            generation_kwargs["prefill_chunk_size"] = self.prefill_chunk
        prefilled = 0
        share = 0.0 if shared is None else shared[0] / shared[1]
        if shared is not None:
            self.timings.add_shared(*shared)
            self.request_memory.shared_capture_bytes = max(self.request_memory.shared_capture_bytes, prefill.nbytes)
        if marker is None and self.protocol is Protocol.QUERY_AGNOSTIC:
            raise missing_split()
        started = clock(self.device)
        if marker is not None:
            starts = self.question_starts(context, marker, generation_kwargs.get("attention_mask"))
            if prefill is not None and self.protocol is Protocol.QUERY_AGNOSTIC:
                replay(prefill, cache)  # the context, compressed as its own forward would have
                cache.context_lengths = list(starts)
                prefilled = starts[0]
            else:
                prefilled = split_cache(self.model, cache, context, starts, self.protocol, self.prefill_chunk)
            if prefilled:
                self.timings.add_prefill(prefilled, share + _synchronized(self.device, started))
        if prefill is not None and prefill.sequence is not None:  # query-aware: the prompt and its first token
            replay(prefill, cache)
            self.timings.add_prefill(context.numel(), share + _synchronized(self.device, started))
        return cache, steps, prefilled, generation_kwargs

    def plain_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """HFLM's own ``generate`` call (its defaults for greedy decoding, its stop sequences), on the cache given."""
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _continue(self, sequence: torch.Tensor, cache: CompressedCache, prompt_length: int, max_length: int,
                  stop: list[str], steps: StepClock, **generation_kwargs) -> torch.Tensor:
        """Decode on from ``sequence`` (a prompt of ``prompt_length`` tokens and its first token, which ``cache``
        holds the prompt of) as the single ``generate`` call of a cell alone would: it stops where that call
        would have stopped after the first token (an end-of-sequence token, a stop sequence, the length), and its
        stop sequences are looked for from the prompt's end, the first token included."""
        from lm_eval.models.utils_hf import stop_sequences_criteria

        if sequence.shape[1] >= max_length or self.stopper(prompt_length, stop)(sequence):
            return sequence
        mask = generation_kwargs.pop("attention_mask", None)
        if mask is not None:
            generation_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
        if generation_kwargs["temperature"] == 0.0 and generation_kwargs.get("do_sample") is None:
            generation_kwargs["do_sample"] = False
        if generation_kwargs.get("do_sample") is False and generation_kwargs["temperature"] == 0.0:
            generation_kwargs.pop("temperature")
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            return self.model.generate(
                input_ids=sequence, max_length=max_length, cache=cache, streamer=steps, use_cache=True,
                stopping_criteria=stop_sequences_criteria(self.tokenizer, stop, prompt_length, sequence.shape[0]),
                pad_token_id=self.tokenizer.pad_token_id, **generation_kwargs,
            )

    def stopper(self, prompt_length: int, stop: list[str]) -> Callable[[torch.Tensor], bool]:
        """Whether a sequence (``[1, length]``) of a prompt of ``prompt_length`` tokens is done after its newest
        token, as one ``generate`` call stops: an end-of-sequence token, or one of lm-eval's ``stop`` sequences
        looked for from the prompt's end. Each stopper follows one sequence, token after token (lm-eval's criteria
        remember what they saw)."""
        from lm_eval.models.utils_hf import stop_sequences_criteria

        ends = self.model.generation_config.eos_token_id
        ends = set(ends if isinstance(ends, list) else [] if ends is None else [ends])
        criteria = stop_sequences_criteria(self.tokenizer, stop, prompt_length, 1)
        return lambda sequence: sequence[0, -1].item() in ends or bool(criteria(sequence, None).all())

    def question_starts(self, context: torch.Tensor, marker: str, mask: torch.Tensor | None) -> list[int]:
        """Real tokens before each prompt's question (``context`` ``[batch, seq]``, left-padded by ``mask``)."""
        return [self._question_start(row if mask is None else row[mask[i].bool()], marker)
                for i, row in enumerate(context)]

    def _question_start(self, ids: torch.Tensor, marker: str) -> int:
        """Real tokens before the question: the context the budget is a fraction of."""
        start = question_start(lambda part: self.tokenizer.decode(part), ids.tolist(), marker)
        if start is None:
            raise UsageError(f"the task names its question by {marker!r}, which this prompt does not contain; the "
                             "split between context and question is unknown (fix the task's kvp_question_marker)")
        if start == 0:
            raise UsageError(f"the question marker {marker!r} starts the prompt: there is no context to compress")
        return start

    # -- loglikelihood -------------------------------------------------------------------------------------------
    @torch.no_grad()
    @_measured
    def _continuation_logprobs(self, batch: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        """Per request ``(tokens, continuation)``, log-probs ``[continuation, vocab]`` of its last ``continuation``
        tokens, every context compressed first; the requests run as one batch.

        Contexts are left-padded to one length and each is compressed to its own budget (a context keeps the same
        entries alone or in a padded batch); continuations are right-padded, which no real position attends to.
        The continuation's pass, a request's last, is cut back to the same counts as alone afterwards; with right
        padding that last cut may choose other entries than alone would (the padded queries weigh in), but nothing
        reads the cache after it.
        Only the rows scored are computed (each context's last one, then the continuations') and only they are
        turned into float32: never ``[context, vocab]`` logits, which at 32k tokens and a 128k vocabulary are 8 GB.
        """
        cache = self.new_cache()
        splits = [len(tokens) - continuation for tokens, continuation in batch]  # each context's end
        contexts = [tokens[:split] for (tokens, _), split in zip(batch, splits)]
        rest = [tokens[split:-1] for (tokens, _), split in zip(batch, splits)]  # the continuations' inputs
        ids, mask = _padded(contexts, self.tokenizer.pad_token_id or 0, left=True, device=self.device)
        started = clock(self.device)
        first = self.model(ids, attention_mask=mask, position_ids=_positions(mask), cache=cache,
                           logits_to_keep=1).logits[:, -1:]
        self.timings.add_prefill(sum(splits), _synchronized(self.device, started))
        pieces = [[first[row]] for row in range(len(batch))]
        if any(rest):
            if cache.policy.has_stage:  # the contexts are in: a policy that chooses over every layer does it now
                cache.after_prefill(self.model)
            # A forward of one token reads no padding mask (see kvpolicies.engine.attention): pad to two instead.
            longest = max(map(len, rest))
            width = 2 if longest == 1 and min(map(len, rest)) == 0 else longest
            more, more_mask = _padded(rest, self.tokenizer.pad_token_id or 0, left=False, device=self.device,
                                      width=width)
            full_mask = None if mask is None and more_mask is None else torch.cat(
                [_ones_if_none(mask, ids), _ones_if_none(more_mask, more)], dim=1)
            positions = None if full_mask is None else _positions(full_mask)[:, -more.shape[1]:]
            logits = self.model(more, attention_mask=full_mask, position_ids=positions, cache=cache).logits
            for row, part in enumerate(rest):
                pieces[row].append(logits[row, : len(part)])
        self._measure(cache)
        return [torch.cat([F.log_softmax(piece.float(), dim=-1) for piece in row]) for row in pieces]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.protocol is Protocol.QUERY_AGNOSTIC:
            raise missing_split(" (log-likelihood requests have no question)")
        # Longest first, as HFLM orders them: a batch pads to its first request, and memory errors come early.
        ordered = Collator(requests, sort_fn=lambda request: (-len(request[1] + request[2]),
                                                              tuple(request[1] + request[2])))
        size = self.batch_size if self.batch_size != "auto" else override_bs or 1  # no probe: memory is the budget's
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="kvpolicies loglikelihood")
        for chunk in ordered.get_batched(n=size):
            batch = [((context + continuation)[-(self.max_length + 1) :], len(continuation))
                     for _, context, continuation in chunk]
            for (request_str, _, continuation), logprobs in zip(chunk, self._continuation_logprobs(batch)):
                target = torch.tensor(continuation, device=logprobs.device)
                answer = (
                    float(logprobs.gather(1, target[:, None]).sum()),
                    bool((logprobs.argmax(-1) == target).all()),
                )
                results.append(answer)
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                bar.update(1)
        bar.close()
        return ordered.get_original(results)

    # -- loglikelihood_rolling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if self.protocol is Protocol.QUERY_AGNOSTIC:
            raise missing_split(" (perplexity requests have no question)")
        results = []
        for (text,) in tqdm(
            [request.args for request in requests], disable=disable_tqdm or self.rank != 0, desc="kvpolicies rolling"
        ):
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            total = sum(self._streamed_logprob(context, continuation) for context, continuation in windows)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    @torch.no_grad()
    @_measured
    def _streamed_logprob(self, context: list[int], continuation: list[int]) -> float:
        """Sum of log-probs of ``continuation``, streamed in chunks with the cache cut to budget after each.

        Each chunk computes the logits of the rows scored in it only (none of the context's), and they are reduced
        to the targets' log-probs before the next chunk: logits memory is one chunk's, not the document's.
        """
        cache = self.new_cache()
        ids = torch.tensor([(context + continuation)[:-1]], device=self.device)
        targets = torch.tensor(continuation, device=self.device)
        first_scored = ids.shape[1] - len(continuation)  # the position predicting the continuation's first token
        picked = []
        started = clock(self.device)
        for start in range(0, ids.shape[1], self.stream_chunk):
            stop = min(start + self.stream_chunk, ids.shape[1])
            scored = stop - max(start, first_scored)  # the chunk's last rows; 0 keeps all in transformers, so 1
            logits = self.model(ids[:, start:stop], cache=cache, logits_to_keep=max(scored, 1)).logits
            if cache.policy.has_stage:  # it chooses after every chunk, over all it holds; after the last one too,
                cache.after_prefill(self.model)  # so that the record holds what it keeps, as a scoring policy's does
            if scored > 0:
                rows = targets[stop - scored - first_scored : stop - first_scored, None]
                picked.append(F.log_softmax(logits[0].float(), dim=-1).gather(1, rows))
            del logits  # before the next chunk's
        self.timings.add_prefill(ids.shape[1], _synchronized(self.device, started))
        self._measure(cache)
        return float(torch.cat(picked).sum())

    # -- results -------------------------------------------------------------------------------------------------
    def kv_memory(self) -> dict[str, Any]:
        """Resident KV bytes of each sequence at the end of its request, next to the full cache's and the policy's
        auxiliary bytes (:func:`kv_memory_record`; ``KVMemory`` in the results module declares every field).

        Counted per sequence, so the figures are the same at any batch size; padding that a batch stored (the full
        cache keeps a left-padded batch dense) is reported apart, as ``padding_bytes_peak``.
        """
        return kv_memory_record(self.kv_measurements, self.kv_padding_bytes)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["kvpolicies"] = {
            **self.kv_policy.identity(),
            "config_hash": self.kv_policy.config_hash(),
            "budget": self.kv_budget.model_dump(),
            "compression_ratio": self.kv_budget.compression_ratio,  # kvpress's name for it: the fraction removed
            "codec": self.kv_codec.name,
            "stream_chunk": self.stream_chunk,
            "protocol": self.protocol.value,
            "kv_memory": self.kv_memory(),
            "speed": self.timings.summary(),
            "request_memory": dataclasses.asdict(self.request_memory),
        }
        return info


def kv_memory_record(sequences: Sequence[CacheStats], padding_bytes: int = 0) -> dict[str, Any]:
    """The ``kv_memory`` of a result record, from one :class:`CacheStats` per sequence (at the end of its request)
    and the largest padding a batch stored: the one place that turns the cache's counts into what a result says.
    ``auxiliary_bytes_*`` are what the policy held besides keys and values, a sequence's share of its batch's
    (query buffers, attention tracks): equal memory is equal KV bytes, and these are reported next to them."""
    if not sequences:
        return {"sequences": 0}
    resident = [s.resident_bytes for s in sequences]
    full = [s.full_bytes for s in sequences]
    context = [s.context_bytes for s in sequences]
    auxiliary = [s.auxiliary_bytes for s in sequences]
    return {
        "sequences": len(sequences),
        "resident_bytes_peak": max(resident),
        "resident_bytes_mean": statistics.fmean(resident),
        "full_bytes_peak": max(full),
        "full_bytes_mean": statistics.fmean(full),
        "resident_fraction_mean": statistics.fmean(r / f for r, f in zip(resident, full) if f) if any(full) else 1.0,
        # Entries, not bytes: with a codec, what eviction kept (1.0: quantization alone), bytes being the codec's.
        "kept_fraction_mean": statistics.fmean(s.kept_fraction for s in sequences),
        "padding_bytes_peak": padding_bytes,
        "context_bytes_peak": max(context),
        "context_bytes_mean": statistics.fmean(context),
        "auxiliary_bytes_peak": max(auxiliary),
        "auxiliary_bytes_mean": statistics.fmean(auxiliary),
    }


_ADAPTER_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(KVPoliciesLM.__init__).parameters.items()
    if name not in ("self", "policy", "kwargs")
}


def _policy_options(policy: str, kwargs: dict[str, Any], adapter_args: dict[str, Any]) -> dict[str, Any]:
    """Take the policy's options out of the model args ``kwargs`` (what stays there is HFLM's) and return them.

    ``policy.NAME=`` is always the policy's. A plain name is HFLM's when HFLM takes it, else the policy's (unknown
    names are then rejected by the policy, with its valid options). A plain name that HFLM or this adapter takes
    *and* the policy has as an option is an error, not a guess: it would silently configure only one of them.
    """
    fields = set(registry().get(policy).policy_class.Config.model_fields)
    explicit = {key.removeprefix(POLICY_PREFIX): kwargs.pop(key) for key in list(kwargs)
                if key.startswith(POLICY_PREFIX)}
    given = {**kwargs, **{name: value for name, value in adapter_args.items() if value != _ADAPTER_DEFAULTS[name]}}
    for name in sorted((fields & set(given)) - set(explicit)):
        if name in _HFLM_ARGUMENTS or name in _ADAPTER_DEFAULTS:
            owner = "HFLM's" if name in kwargs else "kvpolicies' model"
            raise PolicyConfigError(
                f"model arg {name}={given[name]!r} is ambiguous: it is {owner} argument {name!r} and also an option of "
                f"policy {policy!r}; write {POLICY_PREFIX}{name}=VALUE for the policy's option (a plain {name}= then "
                f"goes to {'HFLM' if name in kwargs else 'the model'} alone)"
            )
    plain = {key: kwargs.pop(key) for key in list(kwargs) if key not in _HFLM_ARGUMENTS}
    for name in sorted(set(plain) & set(explicit)):
        raise PolicyConfigError(f"policy option {name!r} is given twice, as {name}= and {POLICY_PREFIX}{name}=; "
                                "give it once")
    return {key: coerce_option(value) for key, value in {**plain, **explicit}.items()}


def _padded(rows: list[list[int]], pad: int, left: bool, device, width: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rows`` of token ids as one ``[batch, width]`` tensor, padded on the left (contexts, whose ends must line
    up) or on the right (continuations), and its attention mask; None when no row is padded."""
    width = max(map(len, rows)) if width is None else width
    if all(len(row) == width for row in rows):
        return torch.tensor(rows, device=device), None
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, place] = torch.tensor(row, dtype=torch.long)
        mask[i, place] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each token's position from a padding mask (what ``generate`` computes), or None: the model's own."""
    return None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)


def _ones_if_none(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(ids) if mask is None else mask


def _synchronized(device, started: float) -> float:
    """Seconds since ``started``, the device's queued work included."""
    return clock(device) - started


class StepClock:
    """A ``generate`` streamer that only notes times: once before prefill, then after every new token."""

    def __init__(self, device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(clock(self.device))

    def end(self) -> None:
        pass


class Timings:
    """Prefill and decode throughput over the requests of a run (tokens summed over the batch)."""

    def __init__(self) -> None:
        self.prefill_tokens = self.decode_tokens = 0
        self.prefill_s = self.decode_s = 0.0
        self.shared_prefill_s = 0.0
        self.shared_prefills = self.shared_by = 0
        self.stage_s, self.probe_tokens = 0.0, 0
        self.stage_shared_by = 0
        self.calibration_s = 0.0
        """The policy's calibration on the model (Q-Filters' filters): paid once per model, before any prompt, so
        counted in neither prefill nor decoding, and said apart."""
        self.decoded_together = 0

    def add_prefill(self, tokens: int, seconds: float) -> None:
        self.prefill_tokens += tokens
        self.prefill_s += seconds

    def add_shared(self, seconds: float, cells: int) -> None:
        """A prefill this cell shared with ``cells`` cells in all, which took ``seconds``: each is charged an
        equal part in ``prefill_s``; the whole is said apart."""
        self.shared_prefill_s += seconds
        self.shared_prefills += 1
        self.shared_by = max(self.shared_by, cells)

    def add_stage(self, seconds: float, probe_tokens: int) -> None:
        """An after-prefill stage's time and its second passes' tokens (KVzip's repetition), counted within the
        prefill or the first decoding step where it ran (in neither where it ran after the request ended, see
        ``KVPoliciesLM._measure``), and said apart."""
        self.stage_s += seconds
        self.probe_tokens += probe_tokens

    def add_shared_stage(self, shared: SharedScores, cells: int, in_prefill: bool, after: bool = False) -> None:
        """A stage's scoring this cell shared with ``cells`` cells in all (its own inputs and selection came in
        :meth:`add_stage`): ``stage_s`` says the scoring's whole time, as a cell alone pays it, and an equal part
        is charged where the cell's own stage ran: with the question's prefill (``in_prefill``, query-agnostic)
        or at the first decoding step; nowhere else where it ran ``after`` the request ended, as alone."""
        self.stage_s += shared.seconds
        self.probe_tokens += shared.probe_tokens
        self.stage_shared_by = max(self.stage_shared_by, cells)
        if after:
            return
        if in_prefill:
            self.prefill_s += shared.seconds / cells
        else:
            self.decode_s += shared.seconds / cells

    def add_decoding(self, batch: int, clock: StepClock) -> None:
        """Decoding that began after a shared prefill: every stamp after the first is a decoded token."""
        if len(clock.stamps) >= 2:
            self.decode_tokens += (len(clock.stamps) - 1) * batch
            self.decode_s += clock.stamps[-1] - clock.stamps[0]

    def add_together(self, tokens: int, seconds: float, rows: int) -> None:
        """Decoding with other cells' rows (:mod:`kvpolicies.engine.rows`): ``tokens`` of this cell's, its share
        of the time, in batches of up to ``rows`` rows."""
        self.decode_tokens += tokens
        self.decode_s += seconds
        self.decoded_together = max(self.decoded_together, rows)

    def add_generation(self, prompt_tokens: int, batch: int, clock: StepClock) -> None:
        if len(clock.stamps) >= 2:  # stamps: before prefill, after the first token, after each further one
            self.add_prefill(prompt_tokens, clock.stamps[1] - clock.stamps[0])
            self.decode_tokens += (len(clock.stamps) - 2) * batch
            self.decode_s += clock.stamps[-1] - clock.stamps[1]

    def summary(self) -> dict[str, float | None]:
        return {
            "prefill_tokens_per_s": self.prefill_tokens / self.prefill_s if self.prefill_s else None,
            "decode_tokens_per_s": self.decode_tokens / self.decode_s if self.decode_s else None,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            **({"shared_prefill_s": self.shared_prefill_s, "shared_prefills": self.shared_prefills,
                "shared_by": self.shared_by} if self.shared_prefills else {}),
            **({"stage_s": self.stage_s, "stage_probe_tokens": self.probe_tokens} if self.stage_s else {}),
            **({"stage_shared_by": self.stage_shared_by} if self.stage_shared_by else {}),
            **({"decoded_together": self.decoded_together} if self.decoded_together else {}),
            **({"calibration_s": self.calibration_s} if self.calibration_s else {}),
        }


def _spread(device_map: str, device: str | None) -> dict[str, Any]:
    """HFLM's arguments for ``device_map=auto``: its own ``parallelize`` (accelerate spreads the model over every
    visible GPU); on a machine without one, the CPU holds it all, as accelerate would place it."""
    if device_map != "auto":
        raise UsageError(f"device_map={device_map}: give device_map=auto (accelerate spreads the model over every "
                         "visible GPU) or leave it out and give device=")
    if device not in (None, "", "auto"):
        raise UsageError(f"device_map=auto places the model itself; give it or device={device}, not both")
    if not torch.cuda.is_available():
        return {"device": "cpu"}
    return {"parallelize": True}


def _count(name: str, value: Any, minimum: int = 1) -> int:
    """A model arg that must be a whole number (they arrive as text from ``--model_args``)."""
    try:
        number = float(value)  # lm-eval hands numbers over as floats (-1.0)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise UsageError(f"model arg {name}={value!r} must be a whole number >= {minimum}")
    number = int(number)
    if number < minimum:
        raise UsageError(f"model arg {name}={number} must be a whole number >= {minimum}")
    return number
