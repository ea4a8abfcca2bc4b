"""What a user runs first on a new device and model: does the compressed cache keep its promises here?

``kvpolicies selfcheck`` prints one line per check. Each check is a claim the rest of the project builds on and that
a device, a dtype or an architecture could break without any test here noticing (the test suite runs on a CPU, in
float32, on a few small models):

1. at budget 1.0 a compressing policy evicts nothing, so the logits are the model's own (a plain ``DynamicCache``);
2. a left-padded batch keeps, for each prompt, what the prompt alone keeps (sequences are judged on their own
   lengths; padding is never kept), so its logits are those of the prompt run alone;
3. the cache's tensors hold the kept entries and nothing else: resident bytes = kept entries × entry bytes;
4. a decoding step between evictions waits for the device no more than the plain model does (once: reading the
   sampled token), counted with :class:`~kvpolicies.experiments.device_work.DeviceWork`;
5. decoding with a compressed cache is about as fast as decoding with a dense cache of the kept length (the packed
   layout must not cost more than the memory it saves is worth);
6. a long prompt prefilled in chunks finishes, holds its budget after every chunk, and its peak memory is shown.

Each check is one function returning a :class:`CheckResult`; :func:`run_selfcheck` runs them all and
:func:`table` prints them. Decoding is greedy; where two runs are compared, the second is fed the first's tokens
(teacher forcing), so one near-tie cannot make every later step differ.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from transformers import DynamicCache

from kvpolicies.engine.budget import Budget, BudgetError, CacheShape
from kvpolicies.engine.cache import CompressedCache
from kvpolicies.engine.clock import clock
from kvpolicies.errors import ModelLoadError, UsageError


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SLOW = "slow"
    """A timing beyond its target: a warning, since timings on a shared machine are noisy (a failure with
    ``strict``)."""
    SKIPPED = "skipped"


@dataclass(frozen=True)
class CheckResult:
    """One line of the report: what was checked, what was measured, what was expected, and the verdict."""

    check: str
    measured: str
    expected: str
    verdict: Verdict

    def failed(self, strict: bool = False) -> bool:
        return self.verdict is Verdict.FAIL or (strict and self.verdict is Verdict.SLOW)


RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
"""Allowed ``max |Δlogit|`` as a fraction of the largest reference logit, by the model's dtype. Two runs that keep
the same entries may still round differently (a padded batch runs other kernels than one prompt alone); float32
leaves room for that and no more, bfloat16 keeps 8 bits of mantissa (a logit of 32 moves in steps of 0.25) and
half-precision rounding compounds over the layers."""

SPEED_TARGET = 1.2
"""A compressed cache may decode at most this many times slower than a dense cache of the kept length."""


@dataclass
class SelfCheckSettings:
    """What :func:`run_selfcheck` runs. ``long_context`` 0 skips check 6; None picks 32768 tokens on CUDA (at most
    the model's positions) and skips it elsewhere."""

    policies: Sequence[str] = ("snapkv", "headkv")
    budget: Budget = field(default_factory=lambda: Budget.parse(0.25))
    context_tokens: int = 512
    decode_tokens: int = 4
    long_context: int | None = None
    prefill_chunk: int | None = None
    repeats: int = 3
    timed: bool = True
    """Whether checks 5 and 6 (speed and long context) run: not on the architecture matrix's tiny models, whose
    timings measure kernel launches rather than the cache and whose positions end at 256."""


@dataclass
class Decoded:
    """Greedy decoding of a batch: ``logits`` ``[batch, steps + 1, vocab]`` in float32 (after the prompt, then after
    each fed token), ``tokens`` ``[batch, steps]`` the tokens fed, and the cache they were decoded with."""

    logits: torch.Tensor
    tokens: torch.Tensor
    cache: object


def tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """The ``max |Δlogit|`` allowed against ``reference`` logits computed in ``dtype``."""
    return RELATIVE_TOLERANCE.get(dtype, 1e-2) * max(1.0, float(reference.abs().max()))


@torch.no_grad()
def decode(model, prompts: Sequence[torch.Tensor], cache, steps: int, pad_id: int = 0,
           forced: torch.Tensor | None = None) -> Decoded:
    """Prefill ``prompts`` (1-d id tensors, left-padded into one batch) and decode ``steps`` tokens: greedy, or the
    ``forced`` ``[batch, steps]`` tokens. Positions count real tokens only, so a padded row sees the positions it
    would see alone."""
    device = model.device
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt.cpu()
        mask[row, longest - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = [model(ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]]
    fed = []
    for step in range(steps):
        token = logits[-1].argmax(-1, keepdim=True) if forced is None else forced[:, step : step + 1].to(device)
        fed.append(token)
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1)
        positions = positions[:, -1:] + 1
        logits.append(model(token, attention_mask=mask, position_ids=positions, cache=cache,
                            logits_to_keep=1).logits[:, -1])
    tokens = torch.cat(fed, 1) if fed else torch.empty(len(prompts), 0, dtype=torch.long, device=device)
    return Decoded(torch.stack(logits, 1).float(), tokens, cache)


def compare(reference: Decoded, row: int, other: Decoded, dtype: torch.dtype) -> tuple[float, float, int, int]:
    """``(max |Δlogit|, tolerance, token mismatches, near ties)`` of ``other`` (one sequence, fed ``reference``'s
    tokens) against row ``row`` of ``reference``. A mismatch is a step where ``other`` would pick another token than
    ``reference`` did, by a margin beyond the tolerance; within it, the step is a near tie, not an error."""
    want, got = reference.logits[row], other.logits[0]
    allowed = tolerance(dtype, want)
    difference = float((got - want).abs().max())
    chosen = reference.tokens[row].to(got.device)
    picked = got[:-1].argmax(-1)
    margin = got[:-1].gather(-1, picked[:, None])[:, 0] - got[:-1].gather(-1, chosen[:, None])[:, 0]
    differs = picked != chosen
    return difference, allowed, int((differs & (margin > allowed)).sum()), int((differs & (margin <= allowed)).sum())


def check_full_budget(model, prompt: torch.Tensor, policy: str, steps: int,
                      reference: Decoded | None = None, tokenizer=None) -> CheckResult:
    """Check 1. At budget 1.0 a policy keeps every entry, so nothing may change: the kvpolicies attention must run
    the model's own attention, and the cache must hand back what a plain cache would. Any difference here is a bug
    in the layer between the model and its cache, which every compressed result would inherit."""
    name = f"budget 1.0 = model's own logits ({policy})"
    if reference is None:
        reference = decode(model, [prompt], DynamicCache(config=model.config), steps)
    ours = decode(model, [prompt], CompressedCache(model, policy, 1.0, tokenizer=tokenizer), steps,
                  forced=reference.tokens)
    difference, allowed, mismatches, ties = compare(reference, 0, ours, model.dtype)
    measured = (f"max abs logit diff {difference:.3g} over {steps + 1} steps of {len(prompt)} tokens"
                + (f"; {mismatches} greedy token(s) differ" if mismatches else "")
                + (f"; {ties} near tie(s)" if ties else ""))
    expected = f"≤ {allowed:.3g}, same tokens (vs DynamicCache)"
    verdict = Verdict.PASS if difference <= allowed and not mismatches else Verdict.FAIL
    return CheckResult(name, measured, expected, verdict)


def batch_prompts(prompt: torch.Tensor, count: int = 3) -> list[torch.Tensor]:
    """``count`` prompts of different lengths cut from ``prompt`` (1-d): its last 4/8, 3/8, 2/8, ... of the tokens,
    so each starts somewhere else and a batch of them is left-padded by different amounts. Half the context at most:
    padding and ragged heads are what is checked, and the batch and every prompt alone run for every policy."""
    tokens = len(prompt)
    return [prompt[tokens - tokens * (4 - i) // 8:] for i in range(count)]


def check_batch_equals_alone(model, prompts: Sequence[torch.Tensor], policy: str, steps: int, pad_id: int = 0,
                             budget: Budget | None = None, tokenizer=None) -> tuple[CheckResult, Decoded]:
    """Check 2. A left-padded batch must give each prompt what it gets alone: the cache judges every sequence on its
    own real length, never keeps padding, and a policy's scores must not mix sequences. Without it, lm-eval (which
    batches) would measure something else than ``kvpolicies generate``. Slack 0: every decoding step evicts, so
    eviction in a ragged batch is checked too. Returns the result and the batch's decoding (its cache is check 3's
    subject)."""
    budget = budget or Budget(value=0.5, slack_tokens=0)
    name = f"left-padded batch = each prompt alone ({policy} @ {budget})"
    batched = decode(model, prompts, CompressedCache(model, policy, budget, tokenizer=tokenizer), steps, pad_id)
    rows = []
    for row, prompt in enumerate(prompts):
        alone = decode(model, [prompt], CompressedCache(model, policy, budget, tokenizer=tokenizer), steps,
                       forced=batched.tokens[row : row + 1])
        rows.append(compare(batched, row, alone, model.dtype))
    worst, allowed, _, _ = max(rows, key=lambda row: row[0] / row[1])  # the row nearest to (or past) its tolerance
    mismatches, ties = sum(row[2] for row in rows), sum(row[3] for row in rows)
    lengths = "/".join(str(len(prompt)) for prompt in prompts)
    measured = (f"max abs logit diff {worst:.3g}, prompts of {lengths} tokens, {steps} steps"
                + (f"; {mismatches} greedy token(s) differ" if mismatches else "")
                + (f"; {ties} near tie(s)" if ties else ""))
    expected = f"≤ {allowed:.3g}, same tokens"
    verdict = Verdict.PASS if worst <= allowed and not mismatches else Verdict.FAIL
    return CheckResult(name, measured, expected, verdict), batched


def check_resident_bytes(cache: CompressedCache, label: str) -> CheckResult:
    """Check 3. The memory saving is real only if the tensors hold the kept entries and nothing more: no padding,
    no over-allocation. ``resident_bytes`` is counted from the tensors; the physical limit is ``kept entries ×``
    the bytes the codec stores per entry (``2 · head_dim · dtype bytes`` at full precision; a grouped codec's
    full-precision entries at that price), ``CacheStats.physical_bytes``. Also checks that no
    sequence keeps more than the budget (plus the slack a head may grow by while decoding)."""
    stats = cache.stats()
    physical = stats.physical_bytes
    budget, seen = cache.budget, cache.layers[0].seen
    sequences = cache.sequence_stats()
    allowed = [budget.total_entries(max(tokens - after, 1), cache.shape) + sequence.appended_entries
               + budget.slack_tokens * cache.shape.cells
               for tokens, after, sequence in zip(seen, cache.appended(seen), sequences)]
    over = sum(sequence.kept_entries > limit for sequence, limit in zip(sequences, allowed))
    ratio = stats.resident_bytes / physical if physical else float("inf")
    measured = (f"{stats.resident_bytes / 2**20:.2f} MiB resident / {physical / 2**20:.2f} MiB physical = "
                f"{ratio:.3f}; {stats.kept_entries:,} entries kept, budget {sum(allowed):,}"
                + (f"; {over} sequence(s) over budget" if over else ""))
    ok = stats.resident_bytes == physical and not over
    return CheckResult(f"resident bytes = physical limit ({label})", measured, "1.000, kept ≤ budget",
                       Verdict.PASS if ok else Verdict.FAIL)


@torch.no_grad()
def decode_work(model, prompt: torch.Tensor, cache, steps: int) -> tuple[float, float]:
    """``(launches, syncs)`` per decoding step after prefilling ``prompt`` (1-d), counted as a GPU would pay them.
    Each step reads the sampled token on the host, as a generation loop must (to stream it, or to stop at EOS)."""
    from kvpolicies.experiments.device_work import DeviceWork

    ids = prompt[None].to(model.device)
    with DeviceWork().on_device(model, ids) as work:
        token = model(ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        token.tolist()
        work.step()
        for _ in range(steps):
            token = model(token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            token.tolist()
        launches, syncs = work.step()
    return launches / steps, syncs / steps


def check_step_syncs(model, prompt: torch.Tensor, policy: str, budget: Budget, steps: int,
                     plain: tuple[float, float] | None = None, tokenizer=None) -> CheckResult:
    """Check 4. On a GPU a decoding step of a small model is short, and every wait for the device (a host read of a
    tensor) stalls the pipeline; between evictions the cache must add none to the model's own (the sampled token's
    read). Counted, not timed, so it holds on any device. The budget's slack is raised past ``steps`` so that no
    step evicts (evictions are counted by ``kvpolicies bench --step-costs``)."""
    no_eviction = budget.model_copy(update={"slack_tokens": max(budget.slack_tokens, steps + 1)})
    if plain is None:
        plain = decode_work(model, prompt, DynamicCache(config=model.config), steps)
    launches, syncs = decode_work(model, prompt, CompressedCache(model, policy, no_eviction, tokenizer=tokenizer),
                                  steps)
    measured = (f"{syncs:.2f} syncs, {launches:.0f} launches per step (plain model: {plain[1]:.2f}, "
                f"{plain[0]:.0f})")
    limit = max(1.0, plain[1])
    expected = "≤ 1 sync (the token read)" if limit == 1 else f"≤ {limit:g} syncs (the plain model's)"
    return CheckResult(f"syncs per decoding step ({policy} @ {budget})", measured, expected,
                       Verdict.PASS if syncs <= limit else Verdict.FAIL)


@torch.no_grad()
def _timed_steps(model, cache, token: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    started = clock(model.device)
    for _ in range(steps):
        token = model(token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    return clock(model.device) - started, token


@torch.no_grad()
def check_decode_speed(model, prompt: torch.Tensor, policy: str, budget: Budget, steps: int,
                       repeats: int = 3, tokenizer=None) -> CheckResult:
    """Check 5. A compressed cache saves memory; it must not give the time back. Decoding with it is timed against
    a dense ``DynamicCache`` holding as many tokens as the compressed one keeps per head (the same attention work),
    in interleaved blocks (drift in machine speed hits both) between evictions; the median block times are
    compared. A timing, so a miss is a warning (:attr:`Verdict.SLOW`), not a failure."""
    ids = prompt[None].to(model.device)
    no_eviction = budget.model_copy(update={"slack_tokens": max(budget.slack_tokens, (repeats + 1) * steps + 1)})
    compressed = CompressedCache(model, policy, no_eviction, tokenizer=tokenizer)
    token = model(ids, cache=compressed, logits_to_keep=1).logits[:, -1:].argmax(-1)
    kept = max(1, round(float(compressed.kept_per_head().float().mean())))
    dense = DynamicCache(config=model.config)
    dense_token = model(ids[:, :kept], cache=dense, logits_to_keep=1).logits[:, -1:].argmax(-1)
    _, token = _timed_steps(model, compressed, token, steps)  # warm-up
    _, dense_token = _timed_steps(model, dense, dense_token, steps)
    times: dict[str, list[float]] = {"compressed": [], "dense": []}
    for repeat in range(repeats):
        order = ("compressed", "dense") if repeat % 2 == 0 else ("dense", "compressed")
        for which in order:
            if which == "compressed":
                seconds, token = _timed_steps(model, compressed, token, steps)
            else:
                seconds, dense_token = _timed_steps(model, dense, dense_token, steps)
            times[which].append(seconds / steps)
    ours, theirs = statistics.median(times["compressed"]), statistics.median(times["dense"])
    ratio = ours / theirs
    measured = (f"{ratio:.2f}x: {ours * 1000:.1f} vs {theirs * 1000:.1f} ms/token, {kept} of {len(prompt)} tokens "
                f"kept per head (medians of {repeats} x {steps} steps)")
    return CheckResult(f"decode time vs dense cache of kept length ({policy} @ {budget})", measured,
                       f"≤ {SPEED_TARGET:g}x (a timing: slow = warning)",
                       Verdict.PASS if ratio <= SPEED_TARGET else Verdict.SLOW)


def long_context_tokens(settings: SelfCheckSettings, model) -> int:
    """The prompt length of check 6: as asked, else 32768 on CUDA (at most the model's positions), else 0."""
    if settings.long_context is not None:
        return settings.long_context
    if model.device.type != "cuda":
        return 0
    positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 32768
    return min(32768, positions)


def memory_needed_bytes(model, tokens: int, chunk: int, budget: Budget) -> int:
    """A rough upper estimate of what a chunked prefill of ``tokens`` adds to the weights: the compressed cache at
    ``tokens``, one chunk's uncompressed keys and values in every layer, a chunk's activations (attention and MLP
    inputs and outputs, a few times over) and one layer's attention logits in float32 (the chunk's queries against
    what a head keeps plus the chunk), as an attention that materialises them would need."""
    config = model.config.get_text_config(decoder=True)
    geometry = CacheShape.from_config(model.config, model.dtype)
    kept_entries = budget.total_entries(tokens, geometry)
    chunk_kv = chunk * geometry.cells * geometry.entry_bytes
    width = config.hidden_size * 6 + getattr(config, "intermediate_size", 4 * config.hidden_size) * 3
    activations = chunk * width * geometry.dtype_bytes * 2
    logits = chunk * (kept_entries // geometry.cells + chunk) * config.num_attention_heads * 4
    return kept_entries * geometry.entry_bytes + chunk_kv + activations + logits


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":  # what the device has free, and what torch's allocator holds unused
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    import psutil

    return psutil.virtual_memory().available


@torch.no_grad()
def check_long_context(model, tokenizer, tokens: int, policy: str, budget: Budget,
                       chunk: int | None = None) -> CheckResult:
    """Check 6. What compression is for: a prompt too long for a full cache, prefilled in chunks with eviction after
    each one, so memory follows the budget instead of the prompt. Checks that it finishes, that after every chunk
    the cache holds no more than the budget allows for the tokens seen so far (and no padding), and reports the
    peak memory (the allocator's peak on CUDA; the growth of the resident set on CPU)."""
    from kvpolicies.experiments.bench import prompt_ids
    from kvpolicies.engine.memory import PeakMemory

    from kvpolicies.registry import get_policy

    chunk = chunk or min(2048, max(2, tokens // 4))
    name = f"chunked prefill of {tokens} tokens ({policy} @ {budget}, chunks of {chunk})"
    if get_policy(policy).has_stage:
        return CheckResult(name, f"{policy} chooses once the prompt is in, holding all of it until then: chunks "
                                 "cannot bound its memory", "finishes at budget", Verdict.SKIPPED)
    needed = memory_needed_bytes(model, tokens, chunk, budget)
    free = _free_bytes(model.device)
    if needed > 0.9 * free:
        return CheckResult(name, f"needs about {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
                           "finishes at budget", Verdict.SKIPPED)
    ids = prompt_ids(tokenizer, tokens, model.device, model.config.vocab_size)
    cache = CompressedCache(model, policy, budget, tokenizer=tokenizer)
    worst = 0.0
    started = clock(model.device)
    try:
        with PeakMemory(model.device) as peak:
            for start in range(0, tokens, chunk):
                logits = model(ids[:, start : start + chunk], cache=cache, logits_to_keep=1).logits
                stats = cache.stats()
                allowed = cache.shape.most_bytes(budget.total_entries(min(start + chunk, tokens), cache.shape))
                worst = max(worst, stats.resident_bytes / allowed)
            logits[:, -1].argmax(-1).tolist()
    except torch.cuda.OutOfMemoryError as error:
        first_line = (str(error).splitlines() or ["out of memory"])[0]
        return CheckResult(name, f"out of memory at token {start}: {first_line}", "finishes at budget", Verdict.FAIL)
    seconds = clock(model.device) - started
    stats = cache.stats()
    peak_text = (f"peak {peak.peak_bytes / 2**30:.2f} GiB allocated (+{peak.growth_bytes / 2**30:.2f} GiB in the "
                 "prefill)" if model.device.type == "cuda" else f"peak +{peak.growth_bytes / 2**20:.0f} MiB resident")
    measured = (f"{seconds:.1f} s; KV {stats.resident_bytes / 2**20:.1f} MiB of {stats.full_bytes / 2**20:.1f} MiB "
                f"full, worst chunk {worst:.3f} of budget; {peak_text}")
    ok = worst <= 1.0 and stats.padding_bytes == 0
    return CheckResult(name, measured, "finishes, ≤ 1.000 of budget", Verdict.PASS if ok else Verdict.FAIL)


def skipped_long_context(model) -> CheckResult:
    """Check 6's line where it does not run by default (not on CUDA): why, and how to run it."""
    return CheckResult("chunked prefill at long context", f"not run on {model.device.type} by default (32768 tokens "
                       "take minutes there)", "--long-context N runs it", Verdict.SKIPPED)


def run_selfcheck(model, tokenizer, settings: SelfCheckSettings,
                  progress: Callable[[str], None] | None = None) -> list[CheckResult]:
    """Every check, in order, on ``model``: checks 1 to 4 for every policy, 5 and 6 for the first (if
    ``settings.timed``). A check that raises (a plugin's bug, an engine error) is a failed line that names the error;
    the others still run."""
    from kvpolicies.experiments.bench import prompt_ids

    say = progress or (lambda message: None)
    prompt = prompt_ids(tokenizer, settings.context_tokens, model.device, model.config.vocab_size)[0]
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    steps = settings.decode_tokens
    results: list[CheckResult] = []

    def attempt(name: str, run: Callable[[], CheckResult | list[CheckResult]]) -> None:
        say(name)
        try:
            outcome = run()
        except (UsageError, BudgetError, ModelLoadError):  # the input, not the engine: the command reports it
            raise
        except Exception as error:
            first_line = (str(error).splitlines() or [""])[0]
            results.append(CheckResult(name, f"error: {type(error).__name__}: {first_line}", "no error",
                                       Verdict.FAIL))
            return
        results.extend(outcome if isinstance(outcome, list) else [outcome])

    reference = decode(model, [prompt], DynamicCache(config=model.config), steps)
    for policy in settings.policies:
        attempt(f"budget 1.0 = model's own logits ({policy})",
                lambda: check_full_budget(model, prompt, policy, steps, reference, tokenizer))
    prompts = batch_prompts(prompt)
    for policy in settings.policies:
        def batch_and_bytes(policy: str = policy) -> list[CheckResult]:
            result, batched = check_batch_equals_alone(model, prompts, policy, steps, pad_id, tokenizer=tokenizer)
            return [result, check_resident_bytes(batched.cache, f"{policy}, the batch above")]

        attempt(f"left-padded batch = each prompt alone ({policy})", batch_and_bytes)
    short = prompt[: min(len(prompt), 128)]  # counts do not depend on the length
    plain = decode_work(model, short, DynamicCache(config=model.config), steps)
    for policy in settings.policies:
        attempt(f"syncs per decoding step ({policy})",
                lambda: check_step_syncs(model, short, policy, settings.budget, steps, plain, tokenizer))
    if not settings.timed:
        return results
    first = settings.policies[0]
    attempt(f"decode time vs dense cache ({first})",
            lambda: check_decode_speed(model, prompt, first, settings.budget, steps, settings.repeats, tokenizer))
    tokens = long_context_tokens(settings, model)
    if tokens:
        attempt(f"chunked prefill of {tokens} tokens ({first})",
                lambda: check_long_context(model, tokenizer, tokens, first, settings.budget, settings.prefill_chunk))
    elif settings.long_context == 0:
        results.append(CheckResult("chunked prefill at long context", "--long-context 0", "not asked",
                                   Verdict.SKIPPED))
    else:
        results.append(skipped_long_context(model))
    return results


def failed(results: Sequence[CheckResult], strict: bool = False) -> bool:
    return any(result.failed(strict) for result in results)


def table(results: Sequence[CheckResult], tablefmt: str = "github") -> str:
    """The report: one row per check, then a count of verdicts."""
    from tabulate import tabulate

    rows = [[result.check, result.measured, result.expected, result.verdict.value] for result in results]
    body = tabulate(rows, headers=["check", "measured", "expected", "verdict"], tablefmt=tablefmt,
                    disable_numparse=True)
    counts = {verdict: sum(result.verdict is verdict for result in results) for verdict in Verdict}
    summary = ", ".join(f"{count} {verdict.value}" for verdict, count in counts.items() if count)
    return f"{body}\n\n{len(results)} checks: {summary}"
