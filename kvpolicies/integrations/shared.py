"""Cells that share each prompt's prefill: one capture per request, every cell's cache replayed from it.

Why: for compression after the prompt (or its context) is prefilled in one pass, the prefill is the same for every
policy, budget and codec (see :mod:`kvpolicies.engine.replay`), and on a long prompt it is most of a cell's time.
A group of cells of one model and one task (same samples, same seed, same batching) is evaluated by lm-eval cell
by cell as always, each with its own :class:`~kvpolicies.integrations.lm_eval.KVPoliciesLM`; the first request that
one of them receives is served for all of them at once: the prompt is prefilled once per protocol (``query_aware``:
the whole prompt, and the first token, by ``generate`` itself; ``query_agnostic``: the context alone), each cell's
cache is replayed from it, and each cell generates the rest on its own cache. The other cells find their answers
waiting when lm-eval asks them for the same request.

The answers are decoded as one batch by default, each row on its own cell's cache (:mod:`kvpolicies.engine.rows`):
one forward per step for all the cells of the request, which is where a shared run spends most of its time
otherwise. A batch's forward may round differently from a forward of one row, so a cell's answer agrees with its
answer alone as often as the model's batched and single forwards choose the same tokens (measured in
docs/performance.md). Decoded one cell after another (``together=False``, ``kvpolicies sweep --decode-alone``),
every cell's record is the one it writes alone: same key, same kept entries, same generated tokens, the same scores
(tested). Either way its timing fields say what was shared (``shared_by``, ``decoded_together``).

A policy whose after-prefill stage ignores the budget (``Policy.stage_ignores_budget``: KVzip, DuoAttention)
scores each prompt once for all its cells that differ only in budget, and each selects its own budget's entries
from those scores (:class:`~kvpolicies.engine.stages.SharedScores`): KVzip's second pass, which costs more than the
prefill, runs once per prompt and protocol instead of once per budget. Each such cell's ``stage_s`` is the whole
scoring's time, as alone, ``stage_shared_by`` says how many shared it, and an equal part is charged to each.

What does not share, and runs per cell as alone: a batch of several prompts, sampling, a prefill in chunks, beam
search, a minimum length, and log-likelihood requests (perplexity streams its documents through the cache). What
shares its prefill but decodes per cell: a request whose logits ``generate`` would change before its argmax (a
repetition penalty, banned words, ...: :func:`apart`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvpolicies.engine.clock import clock
from kvpolicies.engine.memory import PeakMemory
from kvpolicies.engine.replay import Capture, Prefill, capture
from kvpolicies.engine.rows import decode_together
from kvpolicies.errors import BudgetError, UsageError, out_of_memory
from kvpolicies.integrations.protocol import QUESTION_MARKER, Protocol, missing_split

if TYPE_CHECKING:
    from kvpolicies.integrations.lm_eval import KVPoliciesLM


class Failed:
    """A cell's answer that raised: raised again when that cell asks for it, so it fails its own cell only. Kept
    without its traceback, whose frames would hold a captured prefill alive until the group ends."""

    def __init__(self, error: BaseException) -> None:
        self.error = error.with_traceback(None)


@dataclasses.dataclass
class Begun:
    """A cell whose answer is to be decoded with others: its cache and its sequence so far (the prompt and its
    first token), and its timings and memory as they were before the request (restored if the batch fails)."""

    member: KVPoliciesLM
    cache: Any
    sequence: torch.Tensor | None
    timings: Any
    memory: Any


class SharedPrefill:
    """Serves the ``generate`` calls of a group of cells (``members``) from one prefill per request and protocol."""

    def __init__(self, members: Sequence[KVPoliciesLM], together: bool = True) -> None:
        models = {id(member.model) for member in members}
        if len(models) != 1:
            raise ValueError("the cells of a shared prefill must run on one loaded model")
        self.members = list(members)
        for member in self.members:
            member.shared = self
            member.answers = {}
        self.together = together
        """Whether the cells of a request decode their answers as one batch (:mod:`kvpolicies.engine.rows`), or one
        after another (each bit for bit what it writes alone)."""
        self.served = self.alone = 0
        """Requests served from one prefill, and requests each cell ran alone (see :func:`shareable`)."""
        self.said: set[str] = set()
        self._stage_peaks: dict[int, PeakMemory] = {}  # a shared stage scoring's peak, by id of its scores
        self.failed: set[int] = set()
        """Members (by ``id``) whose answer raised: their cell fails when it asks for it, and nothing more is
        computed for it."""

    def answer(self, caller: KVPoliciesLM, context: torch.Tensor, max_length: int, stop: list[str],
               generation_kwargs: dict[str, Any]) -> torch.Tensor:
        """``caller``'s output for this ``generate`` call, computed now for every member if not yet."""
        key = request_key(context, max_length, stop, generation_kwargs)
        if key not in caller.answers:
            self._serve(caller, key, context, max_length, stop, generation_kwargs)
        found = caller.answers.pop(key)
        if isinstance(found, Failed):
            raise found.error
        return torch.cat([context, found.to(context.device)], dim=1)

    def leave(self, member: KVPoliciesLM) -> None:
        """``member``'s cell is done (finished or failed): nothing more is computed for it, and what waits for it
        is dropped."""
        if member in self.members:
            self.members.remove(member)
        member.answers.clear()
        member.shared = None

    def _store(self, member: KVPoliciesLM, key: str, context: torch.Tensor, compute) -> None:
        """Compute ``member``'s answer and keep it until lm-eval asks: only the generated tokens, on the host (the
        prompt is the request's own), so that a group's waiting answers take no device memory. A member whose
        answer raised gets no more answers computed: its cell fails at that request, as alone."""
        try:
            member.answers[key] = compute()[:, context.shape[1]:].cpu()
        except Exception as error:
            member.answers[key] = Failed(error)
            self.failed.add(id(member))

    def _serve(self, caller: KVPoliciesLM, key: str, context: torch.Tensor, max_length: int, stop: list[str],
               generation_kwargs: dict[str, Any]) -> None:
        waiting = [member for member in self.members
                   if key not in member.answers and id(member) not in self.failed]
        if caller not in waiting:  # asked again (a task's repeats): computed for it alone
            waiting = [caller]
        why_not = shareable(waiting[0], context, generation_kwargs)
        if why_not:
            self._alone(waiting, key, context, max_length, stop, generation_kwargs, why_not)
            return
        self.served += 1
        for protocol in (Protocol.QUERY_AWARE, Protocol.QUERY_AGNOSTIC):
            group = [member for member in waiting if member.protocol is protocol]
            if not group:
                continue
            try:
                prefill, seconds = self._capture(group[0], protocol, context, max_length, stop, generation_kwargs)
            except UsageError as error:  # no question to split at: every cell of the protocol fails alike, as alone
                for member in group:
                    member.answers[key] = Failed(error)
                    self.failed.add(id(member))
                continue
            except Exception as error:  # out of memory, a model that cannot share: each cell runs its own
                self._alone(group, key, context, max_length, stop, generation_kwargs,
                            f"the shared prefill failed ({type(error).__name__}: {error})")
                continue
            why_apart = "" if len(group) == 1 or not self.together else apart(group[0], generation_kwargs)
            if why_apart:
                self._say(f"each cell decodes its own answers here: {why_apart}")
            try:
                # Also where the capture's first token ends the answer: each cell's stage then runs when its answer
                # is done, so that its record counts what it keeps (KVPoliciesLM._measure).
                self._share_stages(group, context, prefill, generation_kwargs)
                if len(group) > 1 and self.together and not why_apart:
                    self._together(group, key, context, max_length, stop, generation_kwargs, prefill, seconds)
                else:
                    for member in group:
                        self._store(member, key, context, lambda m=member: m._generate(
                            context, max_length, stop, prefill=prefill, shared=(seconds, len(group)),
                            **dict(generation_kwargs)))
                self._charge_stages(group)
            finally:
                for member in group:
                    member.shared_scores = member.stage_shared = None
                self._stage_peaks.clear()
            del prefill  # before the next protocol's capture: one held at a time

    def _share_stages(self, group: list[KVPoliciesLM], context: torch.Tensor, prefill: Prefill,
                      generation_kwargs: dict[str, Any]) -> None:
        """Score once the stage of cells that would score the same (a policy whose stage ignores the budget, one
        config, one codec, one window rule: they differ in budget only) and hand every one of them the scores
        (:meth:`_charge_stages` charges them). The first cell whose budget allocates scores (a refused budget fails
        its own cell only); a scoring that raises otherwise is dropped: each cell then runs its own stage, and
        fails alone if it fails."""
        alike: dict[tuple, list[KVPoliciesLM]] = {}
        for member in group:
            policy = member.kv_policy
            if policy.has_stage and policy.stage_ignores_budget:
                kind = (policy.config_hash(), member.kv_codec.name, member.kv_budget.windows)
                alike.setdefault(kind, []).append(member)
        for members in alike.values():
            if len(members) < 2:
                continue
            for scorer in members:
                try:
                    shared, peak = scorer.share_stage(context, prefill, **dict(generation_kwargs))
                except BudgetError:
                    continue
                except Exception as error:
                    self._say(f"a stage's scores could not be shared ({type(error).__name__}: {error}); each cell "
                              "runs its own")
                    break
                self._stage_peaks[id(shared)] = peak
                for member in members:
                    member.shared_scores = shared
                break

    def _charge_stages(self, group: list[KVPoliciesLM]) -> None:
        """Each cell whose cache selected from shared stage scores is charged an equal part of their scoring,
        among the cells that did (not those that failed first), and the scoring's peak memory, which it would reach
        alone."""
        users: dict[int, list[KVPoliciesLM]] = {}
        for member in group:
            if member.stage_shared is not None:
                users.setdefault(id(member.stage_shared), []).append(member)
        for members in users.values():
            shared, peak = members[0].stage_shared, self._stage_peaks.get(id(members[0].stage_shared))
            for member in members:
                member.timings.add_shared_stage(shared, len(members),
                                                in_prefill=member.protocol is Protocol.QUERY_AGNOSTIC,
                                                after=member.stage_after)
                if peak is not None:
                    member.request_memory.add(peak, request=False)
                member.stage_shared = None

    def _together(self, group: list[KVPoliciesLM], key: str, context: torch.Tensor, max_length: int,
                  stop: list[str], generation_kwargs: dict[str, Any], prefill: Prefill, seconds: float) -> None:
        """Every cell of ``group`` replayed from ``prefill`` and given its first token, then their answers decoded
        as one batch, each row on its own cache; in several batches where the caches would hold more than half of
        the memory free now (each counted with room for every token it may still generate). A cell whose first
        steps raise fails alone; out of memory while others' caches wait, it tries again once they are decoded."""
        prompt = context.shape[1]
        room = decoding_room(group[0].device)
        batch: list[Begun] = []
        held = 0
        arguments = dict(max_length=max_length, stop=stop, prefill=prefill, shared=(seconds, len(group)))
        for member in group:
            before = Begun(member, None, None, copy.deepcopy(member.timings), copy.deepcopy(member.request_memory))
            begun = self._first_token(before, context, arguments, generation_kwargs)
            if isinstance(begun, Exception) and batch and out_of_memory(begun):
                self._decode(batch, key, context, max_length, stop, generation_kwargs, prefill, (seconds, len(group)))
                batch, held = [], 0
                begun = self._first_token(before, context, arguments, generation_kwargs)
            if isinstance(begun, Exception):
                member.answers[key] = Failed(begun)
                self.failed.add(id(member))
                continue
            if begun.sequence.shape[1] >= max_length or member.stopper(prompt, stop)(begun.sequence):
                try:  # done at its first token, as its own generate call would be; its stage runs now (_measure)
                    member.decoded(begun.cache, 0, 0.0, 0)
                except Exception as error:  # that cell fails alone, as it would in its own request
                    member.timings, member.request_memory = copy.deepcopy(before.timings), copy.deepcopy(before.memory)
                    member.answers[key] = Failed(error.with_traceback(None))
                    self.failed.add(id(member))
                else:
                    member.answers[key] = begun.sequence[:, prompt:].cpu()
                del begun  # its cache is done with
                continue
            shape = begun.cache.shape
            needed = begun.cache.resident_bytes() + (max_length - begun.sequence.shape[1]) * shape.entry_bytes * \
                shape.cells
            if batch and room is not None and held + needed > room:
                self._decode(batch, key, context, max_length, stop, generation_kwargs, prefill, (seconds, len(group)))
                batch, held = [], 0
            batch.append(begun)
            held += needed
            del begun  # the batch holds the cache now, and lets it go when it is decoded
        if batch:
            self._decode(batch, key, context, max_length, stop, generation_kwargs, prefill, (seconds, len(group)))

    @staticmethod
    def _first_token(before: Begun, context: torch.Tensor, arguments: dict[str, Any],
                     generation_kwargs: dict[str, Any]) -> Begun | Exception:
        """``before``'s cell replayed and given its first token, or what it raised (its timings and memory then as
        they were before, without the traceback's frames, which would hold the cache)."""
        member = before.member
        try:
            cache, sequence = member.first_token(context, **arguments, **dict(generation_kwargs))
        except Exception as error:
            member.timings, member.request_memory = copy.deepcopy(before.timings), copy.deepcopy(before.memory)
            return error.with_traceback(None)
        return dataclasses.replace(before, cache=cache, sequence=sequence)

    def _decode(self, batch: list[Begun], key: str, context: torch.Tensor, max_length: int, stop: list[str],
                generation_kwargs: dict[str, Any], prefill: Prefill, shared: tuple[float, int]) -> None:
        """The answers of ``batch`` decoded as one batch, each cell charged its own tokens, an equal share of each
        step it took part in, and what its own cache did alone (a stage). If the batch raises, which row broke is
        unknown: once the batch and its memory are let go, each of its cells decodes alone from a fresh replay (its
        timings and memory as if the batch had not run), and only a broken one fails."""
        prompt = context.shape[1]
        stoppers = [begun.member.stopper(prompt, stop) for begun in batch]
        spent, tokens = [0.0] * len(batch), [0] * len(batch)

        def step_done(rows: list[int], step_s: float, own: dict[int, float]) -> None:
            for row in rows:  # a step's time, split equally among the rows it decoded
                spent[row] += step_s / len(rows) + own.get(row, 0.0)
                tokens[row] += 1

        first = batch[0].member
        caches_bytes = sum(begun.cache.resident_bytes() + begun.cache.auxiliary_bytes()  # held as the batch begins
                           for begun in batch)
        failure = ""
        try:
            with PeakMemory(first.device) as peak, torch.autocast(
                    device_type=first.device.type, dtype=first.mixed_precision_dtype,
                    enabled=first.mixed_precision_dtype is not None):
                sequences = decode_together(first.model, [begun.cache for begun in batch],
                                            [begun.sequence for begun in batch], max_length,
                                            lambda row, sequence: stoppers[row](sequence), step_done,
                                            clock=lambda: clock(first.device))
        except Exception as error:  # handled below, once the traceback (and the batch's frames) is gone
            failure = f"{type(error).__name__}: {error}"
        if failure:
            members = [begun.member for begun in batch]
            for index, member in enumerate(members):
                member.timings, member.request_memory = batch[index].timings, batch[index].memory
            batch.clear()  # the caches go before the cells decode again
            self._say(f"decoding the cells of a request together failed ({failure}); each decodes its own answer "
                      "instead")
            for member in members:
                self._store(member, key, context, lambda m=member: m._generate(
                    context, max_length, stop, prefill=prefill, shared=shared, **dict(generation_kwargs)))
            return
        for row, begun in enumerate(batch):
            member = begun.member
            member.decoded(begun.cache, tokens[row], spent[row], len(batch))
            member.request_memory.decoded_together_bytes = max(member.request_memory.decoded_together_bytes,
                                                               caches_bytes + peak.growth_bytes)
            member.answers[key] = sequences[row][:, prompt:].cpu()

    def _say(self, note: str) -> None:
        """``note`` on stderr, once per run whatever the requests it applies to."""
        if note not in self.said:
            self.said.add(note)
            print(f"kvpolicies: note: {note}", file=sys.stderr)

    def _alone(self, members: list[KVPoliciesLM], key: str, context: torch.Tensor, max_length: int,
               stop: list[str], generation_kwargs: dict[str, Any], why: str) -> None:
        """Each of ``members`` computes this request with its own prefill, as alone; ``why`` said once."""
        self.alone += 1
        self._say(f"each cell prefills its own prompts here: {why}")  # once per reason, not per request
        for member in members:
            self._store(member, key, context, lambda m=member: m._generate(context, max_length, stop,
                                                                           **dict(generation_kwargs)))

    @torch.no_grad()
    def _capture(self, first: KVPoliciesLM, protocol: Protocol, context: torch.Tensor, max_length: int,
                 stop: list[str], generation_kwargs: dict[str, Any]) -> tuple[Prefill, float]:
        """The prefill the cells of ``protocol`` share, and its seconds: ``query_agnostic``, the context alone, as
        :func:`~kvpolicies.integrations.protocol.split_cache` runs it; ``query_aware``, the whole prompt and its
        first token, by ``generate`` with the same arguments as each cell's own call (so the same forward, and the
        same first token, logits processors included)."""
        started = clock(first.device)
        marker = generation_kwargs.get(QUESTION_MARKER)
        if protocol is Protocol.QUERY_AGNOSTIC:
            if marker is None:
                raise missing_split()  # as each cell alone would
            starts = first.question_starts(context, marker, generation_kwargs.get("attention_mask"))
            prefill = capture(first.model, context[:, : starts[0]])
        else:
            cache = Capture(first.model)
            kwargs = {name: value for name, value in generation_kwargs.items() if name != QUESTION_MARKER}
            sequence = first.plain_generate(context, context.shape[1] + 1, stop, cache=cache, **kwargs)
            prefill = cache.prefill(sequence)
        return prefill, clock(first.device) - started


def shareable(member: KVPoliciesLM, context: torch.Tensor, generation_kwargs: dict[str, Any]) -> str:
    """Why this request cannot share its prefill ("" if it can)."""
    if context.shape[0] != 1:
        return "a batch of several prompts"
    if member.prefill_chunk:
        return "a prefill in chunks"
    if generation_kwargs.get("do_sample") or (generation_kwargs.get("temperature") or 0.0) > 0.0:
        return "sampling"
    config = member.model.generation_config
    if (generation_kwargs.get("num_beams") or config.num_beams or 1) > 1:
        return "beam search"
    if generation_kwargs.get("min_new_tokens") or generation_kwargs.get("min_length") or config.min_new_tokens \
            or (config.min_length or 0) > 0:
        return "a minimum length"
    needed, free = capture_bytes(member.model, context.shape[1]), free_bytes(member.device)
    if free is not None and needed > free / 2:
        return (f"one prompt's captured prefill ({needed / 2**20:,.0f} MiB: every layer's keys, values and "
                f"queries) would take more than half the free memory ({free / 2**20:,.0f} MiB)")
    return ""


GREEDY_ARGUMENTS = {"attention_mask", "do_sample", "temperature", "top_k", "top_p", QUESTION_MARKER}
"""The ``generate`` arguments a greedy request may carry for its cells to decode together (top-k and top-p act
only when sampling, which does not share)."""

LOGITS_PROCESSING = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                     "sequence_bias": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
                     "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
                     "remove_invalid_values": (None, False), "exponential_decay_length_penalty": (None,),
                     "guidance_scale": (None, 1.0), "watermarking_config": (None,), "max_new_tokens": (None,)}
"""Generation settings that make ``generate`` change the logits before its argmax (or its length), with the
values that leave them alone: decoding together chooses the argmax itself, so it runs only where all are so."""


def apart(member: KVPoliciesLM, generation_kwargs: dict[str, Any]) -> str:
    """Why the cells of this (shareable) request cannot decode as one batch ("" if they can): a ``generate``
    argument or a generation setting of the model that decoding together does not apply."""
    unknown = sorted(set(generation_kwargs) - GREEDY_ARGUMENTS)
    if unknown:
        return f"the task passes {', '.join(unknown)} to generate"
    config = member.model.generation_config
    changed = [name for name, neutral in LOGITS_PROCESSING.items() if getattr(config, name, None) not in neutral]
    if changed:
        return f"the model's generation config sets {', '.join(changed)}"
    return ""


def capture_bytes(model, tokens: int) -> int:
    """What a capture of a ``tokens``-token prompt holds (:attr:`~kvpolicies.engine.replay.Prefill.nbytes`):
    every layer's keys and values (the full cache) and its queries."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    size = torch.empty((), dtype=model.dtype).element_size()
    return tokens * config.num_hidden_layers * (2 * kv_heads + heads) * head_dim * size


def decoding_room(device: torch.device) -> float | None:
    """Bytes the caches of cells decoded together may hold at once: half the memory free now (None: unknown)."""
    free = free_bytes(device)
    return None if free is None else free / 2


def free_bytes(device: torch.device) -> int | None:
    """Memory free for a capture on ``device`` (None where it cannot be read)."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        import psutil

        return psutil.virtual_memory().available
    except Exception:
        return None


def request_key(context: torch.Tensor, max_length: int, stop: list[str], generation_kwargs: dict[str, Any]) -> str:
    """What identifies one ``generate`` call among a group's: its tokens and every argument."""
    arguments = {name: value for name, value in generation_kwargs.items() if not isinstance(value, torch.Tensor)}
    tensors = {name: value.tolist() for name, value in generation_kwargs.items() if isinstance(value, torch.Tensor)}
    return json.dumps([context.tolist(), max_length, list(stop), arguments, tensors], sort_keys=True, default=str)


