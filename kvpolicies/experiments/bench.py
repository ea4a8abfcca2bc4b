"""Memory and speed of the compressed cache next to the full cache and the physical limit.

For each context length, policy and budget: one prefill of a fixed prompt and a fixed number of greedy decoding
steps, timed in this process after a warm-up, repeated with policies interleaved (drift in machine speed hits all
alike) and reduced to medians. What is reported, and why:

- resident KV bytes, counted from the cache's tensors, next to the physical limit ``2 · head_dim · dtype bytes ·
  kept entries`` (summed over layers and KV heads): the packed layout must not waste memory on padding or
  over-allocation. Index overhead of the ragged layout is per-head run lengths kept as Python ints, not tensors;
  other per-policy state (query buffers, attention tracks, padding masks) is reported apart as auxiliary bytes;
- peak memory: CUDA's peak allocated bytes, or on CPU the growth of the process's resident high-water mark
  (:class:`~kvpolicies.engine.memory.PeakMemory`: the kernel's ``VmHWM``, reset on entry), which includes
  activations, logits and allocator behaviour, not only the cache;
- prefill time, time to first token (prefill plus choosing the first token) and decode tokens/s;
- the policy's own time (signals, scoring, selection, packing) as a share of prefill, and per decoding step;
- decode speed against a plain dense cache holding as many entries as the policy kept (the full cache on a prompt
  of the kept length per KV head, measured in the same repeats): what the compressed layout itself costs. The
  target is at most 1.2x slower (a ratio of at least 0.83); a policy's re-scoring while decoding counts against it.

Logits are computed for the last position only (``logits_to_keep=1``), as generation does, so a ``seq × vocab``
matrix does not dominate the peak. ``prefill_chunk`` feeds the prompt in chunks with eviction after each one.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvpolicies.engine.budget import Budget, BudgetError
from kvpolicies.engine.cache import CompressedCache
from kvpolicies.engine.clock import Stopwatch, clock
from kvpolicies.errors import UsageError


@dataclass
class Measurement:
    policy: str
    """The policy's name, with its storage codec when not full precision (``snapkv + int4``)."""
    budget: str
    context_tokens: int
    prefill_s: float
    ttft_s: float
    decode_ms_per_token: float
    policy_prefill_s: float
    """Time inside the policy during prefill (signals, scores, selection, packing; an after-prefill stage whole,
    its second passes of the model included)."""
    policy_decode_ms_per_token: float
    resident_bytes: int
    physical_bytes: int
    """``kept entries ×`` an entry's price as stored (``2 × head_dim × dtype bytes`` at full precision, the codec's
    price otherwise): what the kept entries need, nothing more."""
    auxiliary_bytes: int
    full_bytes: int
    peak_bytes: int
    """Peak memory growth while the run lasted (see the module docstring)."""
    decode_tokens: int
    kept_per_head: float | None = None
    """Entries kept per (sequence, layer, KV head) after the prefill, the mean over all of them."""
    batch: int = 1
    """Sequences decoded together (``decode_ms_per_token`` is per step of all of them)."""
    dense_kept_decode_ms_per_token: float | None = None
    """Decode time of the plain full cache on a prompt of ``kept_per_head`` tokens (rounded): a dense cache of the
    kept size. None for the full cache itself, and in files written before it was measured."""
    prefill_s_range: tuple[float, float] | None = None
    """The fastest and slowest prefill over the repeats (None for one run, and in files written before): how far
    the median can be trusted on a machine whose speed drifts."""
    decode_ms_per_token_range: tuple[float, float] | None = None
    """The fastest and slowest decoding step over the repeats, as ``prefill_s_range``."""

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms_per_token if self.decode_ms_per_token else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"decode_tokens_per_s": self.decode_tokens_per_s}


def stored_as(policy: str, codec: str) -> str:
    """A policy's name as the tables show it: with its storage codec when that is not full precision."""
    return policy if codec == "full" else f"{policy} + {codec}"


def prompt_ids(tokenizer, tokens: int, device: torch.device, vocab_size: int = 32000) -> torch.Tensor:
    """``[1, tokens]`` ids of a passkey prompt, or seeded random ids without a tokenizer (random-weight models):
    the content does not change the cost."""
    from kvpolicies_evals.data import passkey_prompt

    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(3, vocab_size, (1, tokens), generator=generator).to(device)
    text, _, _ = passkey_prompt(random.Random(0), tokens * 2)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
    if ids.shape[1] < tokens:
        raise UsageError(f"the benchmark prompt has only {ids.shape[1]} tokens and {tokens} were asked; give "
                         f"--contexts of at most {ids.shape[1]}")
    return ids.to(device)


def padded_batch(ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids, attention mask)`` of ``batch`` copies of the ``[1, tokens]`` prompt ``ids``, row ``b`` left-padded
    over its first ``b · tokens / (4 · batch)`` positions (so every layer of the batch is ragged, as under lm-eval
    with prompts of different lengths); batch 1 is ``ids`` with no mask."""
    if batch == 1:
        return ids, None
    tokens = ids.shape[1]
    mask = torch.ones(batch, tokens, dtype=torch.long, device=ids.device)
    for row in range(1, batch):
        mask[row, : row * tokens // (4 * batch)] = 0
    return ids.expand(batch, -1).masked_fill(mask == 0, 0), mask


@torch.no_grad()
def measure(model, ids: torch.Tensor, policy: str, budget: Budget, decode_tokens: int,
            prefill_chunk: int | None = None, mask: torch.Tensor | None = None, codec: str = "full",
            tokenizer=None) -> Measurement:
    """One prefill of ``ids`` (``[batch, tokens]``, left-padded where ``mask`` is 0) and ``decode_tokens`` greedy
    steps on a fresh cache that stores its entries with ``codec`` (and writes a stage's prompts with
    ``tokenizer``)."""
    from kvpolicies.engine.memory import PeakMemory

    cache = CompressedCache(model, policy, budget, codec=codec, tokenizer=tokenizer)
    cache.policy_time = Stopwatch(model.device)  # CUDA events: timing the policy does not slow the run down
    chunk = prefill_chunk or ids.shape[1]
    batch = ids.shape[0]
    with PeakMemory(model.device) as peak:
        started = clock(model.device)
        for start in range(0, ids.shape[1], chunk):
            seen = None if mask is None else mask[:, : start + chunk]
            logits = model(ids[:, start : start + chunk], attention_mask=seen, cache=cache, logits_to_keep=1).logits
        if cache.policy.has_stage and not cache.stage_ran:  # a stage is part of the prefill (before any decoding)
            cache.after_prefill(model)
        prefilled = clock(model.device)
        token = logits[:, -1:].argmax(-1)
        first_token = clock(model.device)
        policy_prefill = cache.policy_time.seconds + cache.stage_s
        cache.policy_time.reset()
        prefilled_stats = cache.stats()
        decoding = clock(model.device)
        for _ in range(decode_tokens):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            token = model(token, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        decoded = clock(model.device)
    stats = cache.stats()
    steps = max(decode_tokens, 1)
    return Measurement(
        policy=stored_as(policy, codec), budget=str(budget), context_tokens=ids.shape[1],
        prefill_s=prefilled - started, ttft_s=first_token - started,
        decode_ms_per_token=(decoded - decoding) * 1000 / steps,
        policy_prefill_s=policy_prefill, policy_decode_ms_per_token=cache.policy_time.seconds * 1000 / steps,
        resident_bytes=stats.resident_bytes, physical_bytes=stats.physical_bytes,
        auxiliary_bytes=cache.auxiliary_bytes(), full_bytes=stats.full_bytes, peak_bytes=peak.growth_bytes,
        decode_tokens=decode_tokens, kept_per_head=(prefilled_stats.kept_entries - prefilled_stats.appended_entries) / cache.shape.cells / batch,
        batch=batch,
    )


@torch.no_grad()
def profile(model, ids: torch.Tensor, policy: str, budget: Budget, decode_tokens: int,
            prefill_chunk: int | None = None, rows: int = 12, codec: str = "full", tokenizer=None) -> str:
    """Where one run's time goes: the operators with the most self time, prefill and decode profiled apart.

    The benchmark says how fast; this says why, e.g. whether a slow decode is the model's linear layers, the
    attention over the kept entries, the policy's own re-scoring (its tensor ops show up under their names), or a
    storage codec's encoding and decoding (``codec``).
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    measure(model, ids, policy, budget, 2, prefill_chunk, codec=codec, tokenizer=tokenizer)  # warm-up, unprofiled
    cache = CompressedCache(model, policy, budget, codec=codec, tokenizer=tokenizer)
    chunk = prefill_chunk or ids.shape[1]
    with torch_profile(activities=activities) as prefill:
        for start in range(0, ids.shape[1], chunk):
            logits = model(ids[:, start : start + chunk], cache=cache, logits_to_keep=1).logits
        if cache.policy.has_stage and not cache.stage_ran:  # the stage belongs to the prefill
            cache.after_prefill(model)
    token = logits[:, -1:].argmax(-1)
    with torch_profile(activities=activities) as decode:
        for _ in range(decode_tokens):
            token = model(token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    title = f"{stored_as(policy, codec)} @ {budget}, {ids.shape[1]} tokens"
    return (f"{title}: prefill\n{prefill.key_averages().table(sort_by=sort, row_limit=rows)}\n"
            f"{title}: {decode_tokens} decoding steps\n{decode.key_averages().table(sort_by=sort, row_limit=rows)}")


def median_measurement(runs: list[Measurement]) -> Measurement:
    """Medians of the timings and peaks; byte counts are deterministic, taken from the last run."""
    timed = ("prefill_s", "ttft_s", "decode_ms_per_token", "policy_prefill_s", "policy_decode_ms_per_token",
             "peak_bytes", "dense_kept_decode_ms_per_token")
    medians = {name: statistics.median(getattr(run, name) for run in runs) if getattr(runs[-1], name) is not None
               else None for name in timed}
    spread = {f"{name}_range": (min(getattr(run, name) for run in runs), max(getattr(run, name) for run in runs))
              if len(runs) > 1 else None for name in ("prefill_s", "decode_ms_per_token")}
    return Measurement(**(asdict(runs[-1]) | medians | spread))


def run_benchmark(model, tokenizer, contexts: list[int], policies: list[str], budgets: list[str | float],
                  decode_tokens: int = 32, repeats: int = 3, prefill_chunk: int | None = None,
                  progress=None, batch: int = 1, codec: str = "full") -> list[Measurement]:
    """Every context × (full cache + every policy × budget), medians over ``repeats`` interleaved runs; a
    ``batch`` above 1 decodes that many left-padded copies of the prompt together (see :func:`padded_batch`).
    The policies store their entries with ``codec``; the full cache, the reference, at full precision."""
    results: list[Measurement] = []
    skipped: dict[int, dict[int, str]] = {}
    for tokens in contexts:
        ids, mask = padded_batch(prompt_ids(tokenizer, tokens, model.device, model.config.vocab_size), batch)
        grid = reference_first(policies, budgets)
        measure(model, ids, *grid[0], 2, prefill_chunk, mask)  # warm-up: allocator, kernels, caches
        runs: dict[int, list[Measurement]] = {i: [] for i in range(len(grid))}
        for repeat in range(repeats):
            dense: dict[int, float] = {}  # decode ms per token of the full cache by prompt length, this repeat
            for i, (name, budget) in enumerate(grid):
                if i in skipped.get(tokens, {}):
                    continue
                try:
                    run = measure(model, ids, name, budget, decode_tokens, prefill_chunk, mask,
                                  codec if i > 0 else "full", tokenizer)
                except BudgetError as error:  # e.g. l2norm's whole layers do not fit a small budget
                    skipped.setdefault(tokens, {})[i] = f"{name} @ {budget}: {error}"
                    continue
                if i > 0:  # the full cache is its own dense reference; an unpadded one: every entry is real
                    kept = max(1, min(tokens, round(run.kept_per_head)))
                    if kept not in dense:
                        dense[kept] = measure(model, ids[:1, -kept:].expand(batch, -1), *grid[0],
                                              decode_tokens).decode_ms_per_token
                    run.dense_kept_decode_ms_per_token = dense[kept]
                runs[i].append(run)
                if progress:
                    progress(f"{tokens} tokens, repeat {repeat + 1}/{repeats}: {name} @ {budget}")
        results += [median_measurement(runs[i]) for i in range(len(grid)) if runs[i]]
    for per_context in skipped.values():
        for reason in per_context.values():
            if progress:
                progress(f"skipped {reason}")
    return results


def tables(results: list[Measurement], tablefmt: str = "github") -> str:
    """One table per context length, rows in the order measured, times relative to the full cache."""
    from tabulate import tabulate

    reference = _reference()
    out = []
    for tokens in sorted({r.context_tokens for r in results}):
        rows = [r for r in results if r.context_tokens == tokens]
        full = next(r for r in rows if r.policy == reference)
        body = [
            [
                r.policy, "-" if r.policy == reference else r.budget,
                f"{r.resident_bytes / 2**20:.1f}", f"{r.resident_bytes / r.physical_bytes:.3f}" if r.physical_bytes else "",
                f"{r.auxiliary_bytes / 2**20:.2f}", f"{r.peak_bytes / 2**20:.0f}",
                f"{r.prefill_s:.2f}" + _range(r.prefill_s_range, "{:.2f}"), f"{r.prefill_s / full.prefill_s:.2f}x",
                f"{r.ttft_s:.2f}", f"{r.policy_prefill_s / r.prefill_s:.1%}",
                f"{r.decode_tokens_per_s:.1f}" + _range(r.decode_ms_per_token_range, "{:.1f}", per_s=True),
                f"{r.decode_tokens_per_s / full.decode_tokens_per_s:.2f}x",
                f"{r.dense_kept_decode_ms_per_token / r.decode_ms_per_token:.2f}x"
                if r.dense_kept_decode_ms_per_token else "-",
                f"{r.policy_decode_ms_per_token:.2f}",
            ]
            for r in rows
        ]
        headers = ["policy", "budget", "KV MiB", "KV / physical", "aux MiB", "peak +MiB", "prefill s (range)",
                   "vs full", "TTFT s", "policy share of prefill", "decode tok/s (range)", "vs full",
                   "vs dense of kept size", "policy ms/step"]
        table = tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)
        out.append(f"context: {tokens} tokens\n\n" + table)
    if len({r.context_tokens for r in results}) > 1:
        out.append(scaling(results, tablefmt))
    return "\n\n".join(out)


def _range(bounds: Sequence[float] | None, form: str, per_s: bool = False) -> str:
    """`` (low–high)`` over the repeats, empty for one run; ``per_s`` turns milliseconds per step into steps/s."""
    if bounds is None:
        return ""
    low, high = sorted(1000.0 / value if per_s else value for value in bounds)
    return f" ({form.format(low)}–{form.format(high)})"


def scaling(results: list[Measurement], tablefmt: str = "github") -> str:
    """How each policy's advantage changes with the context: decode speed, prefill time and peak memory by context.

    The per-context tables hold the detail; this is the question a reader brings to them, e.g. from which prompt
    length on a small cache pays for its eviction.
    """
    from tabulate import tabulate

    contexts = sorted({r.context_tokens for r in results})
    reference = _reference()
    full = {r.context_tokens: r for r in results if r.policy == reference}
    cells = {(r.policy, r.budget, r.context_tokens): r for r in results}
    keys = list(dict.fromkeys((r.policy, r.budget) for r in results))
    parts = []
    for title, value in (
        ("decode tokens/s vs the full cache",
         lambda r: f"{r.decode_tokens_per_s / full[r.context_tokens].decode_tokens_per_s:.2f}x"),
        ("prefill time vs the full cache", lambda r: f"{r.prefill_s / full[r.context_tokens].prefill_s:.2f}x"),
        ("peak memory growth, MiB", lambda r: f"{r.peak_bytes / 2**20:.0f}"),
    ):
        body = [[policy, "-" if policy == reference else budget,
                 *(value(cells[policy, budget, tokens]) if (policy, budget, tokens) in cells and tokens in full
                   else "" for tokens in contexts)]
                for policy, budget in keys]
        headers = ["policy", "budget", *(f"{tokens} tokens" for tokens in contexts)]
        parts.append(f"{title}, by context\n\n" + tabulate(body, headers=headers, tablefmt=tablefmt,
                                                             disable_numparse=True))
    return "\n\n".join(parts)


def load(paths: Sequence) -> tuple[list[str], list[Measurement]]:
    """The headers and measurements of saved benchmark files (``--json``), e.g. one run per context, as one set."""
    import json
    from dataclasses import fields
    from pathlib import Path

    names = {field.name for field in fields(Measurement)}
    headers: list[str] = []
    results: list[Measurement] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "results" not in data:
            what = "--codec-error" if "codec_errors" in data else "a command other than bench"
            raise UsageError(f"{path} was written by {what}, not by bench's timing tables; give files that `kvpolicies "
                             "bench --json` wrote")
        if data["header"] not in headers:
            headers.append(data["header"])
        results += [Measurement(**{k: v for k, v in row.items() if k in names}) for row in data["results"]]
    return headers, results


def benchmark(model_name: str | None = None, contexts: Sequence[int] = (2048,), policies: Sequence[str] | None = None,
              budgets: Sequence[str | float] = ("0.25",), decode_tokens: int = 32, repeats: int = 3,
              prefill_chunk: int | None = None, device: str | None = None, dtype: str | None = None,
              random_model: str | None = None, json_path=None, progress=None, batch: int = 1,
              codec: str = "full", loading: dict | None = None) -> tuple[str, list[Measurement]]:
    """Load the model, measure every policy (default: every registered one) and describe the setting in a header;
    with ``json_path``, also save ``{"header", "results"}`` there (what the generated pages read)."""
    import json
    import platform

    import transformers

    from kvpolicies.registry import get_codec

    policies, budgets = _checked(policies, budgets)
    get_codec(codec)  # an unknown name fails before the model loads
    model, tokenizer = _load(model_name, device, dtype, random_model, loading)
    results = run_benchmark(model, tokenizer, list(contexts), policies, budgets, decode_tokens, repeats,
                            prefill_chunk, progress, batch, codec)
    where = (torch.cuda.get_device_name(model.device) if model.device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    name = f"random-weight {random_model}" if random_model else model_name or "embedded SmolLM2-135M-Instruct"
    header = (f"model: {name}, device: {model.device} ({where}), dtype: {model.dtype}, attention: "
              f"{model.config._attn_implementation}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"decode: {decode_tokens} tokens, medians of {repeats}, prefill chunk: {prefill_chunk or 'none'}"
              + (f", batch: {batch} left-padded rows" if batch > 1 else "")
              + (f", codec: {codec} (the policies'; the full cache at full precision)" if codec != "full" else ""))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"header": header, "results": [r.as_dict() for r in results]}, indent=1))
    return header, results


def profiles(model_name: str | None = None, contexts: Sequence[int] = (2048,), policies: Sequence[str] | None = None,
             budgets: Sequence[str | float] = ("0.25",), decode_tokens: int = 32, prefill_chunk: int | None = None,
             device: str | None = None, dtype: str | None = None, random_model: str | None = None,
             rows: int = 12, codec: str = "full", loading: dict | None = None) -> str:
    """``profile`` of the full cache (at full precision, the reference) and every policy × budget (storing its
    entries with ``codec``) at every context, as one text."""
    from kvpolicies.registry import get_codec

    policies, budgets = _checked(policies, budgets)
    get_codec(codec)  # an unknown name fails before the model loads
    model, tokenizer = _load(model_name, device, dtype, random_model, loading)
    out = []
    for tokens in contexts:
        ids = prompt_ids(tokenizer, tokens, model.device, model.config.vocab_size)
        grid = reference_first(policies, budgets)
        for i, (name, budget) in enumerate(grid):
            try:
                out.append(profile(model, ids, name, budget, decode_tokens, prefill_chunk, rows,
                                   codec if i > 0 else "full", tokenizer))
            except BudgetError as error:
                out.append(f"{name} @ {budget}, {tokens} tokens: skipped: {error}")
    return "\n\n".join(out)


def _reference() -> str:
    """The name of the installed reference policy (the full cache): every row is timed against it."""
    from kvpolicies.engine.policy import Role
    from kvpolicies.registry import policy_with_role

    name = policy_with_role(Role.REFERENCE)
    if name is None:
        raise UsageError("no installed policy keeps the whole cache (Role.REFERENCE), so there is nothing to time "
                         "the others against; install kvpolicies' built-in plugins or allow `full` in "
                         "KVPOLICIES_PLUGINS")
    return name


def reference_first(policies: Sequence[str], budgets: Sequence[Budget | str | float]) -> list[tuple[str, Budget]]:
    """The benchmark grid: the reference once (budgets do not apply to it), then every policy × budget."""
    reference = _reference()
    return [(reference, Budget.parse(1.0))] + [(name, Budget.parse(budget)) for name in policies if name != reference
                                               for budget in budgets]


def _checked(policies: Sequence[str] | None, budgets: Sequence[str | float]) -> tuple[list[str], list[Budget]]:
    from kvpolicies.registry import get_policy, list_policies

    names = list(policies) if policies else [info.name for info in list_policies()]
    for name in names:
        get_policy(name)  # fail before loading anything
    return names, [Budget.parse(budget) for budget in budgets]


def _load(model_name: str | None, device: str | None, dtype: str | None, random_model: str | None,
          loading: dict | None = None):
    """``(model, tokenizer)``; random-weight models have no tokenizer (their prompts are random ids). ``loading``:
    the other options of :class:`~kvpolicies.integrations.loading.Loading` (device map, attention, revision)."""
    loading = {name: value for name, value in (loading or {}).items() if name not in ("device", "dtype")}
    if random_model:
        from kvpolicies.integrations.models import random_model as build

        if loading:
            raise UsageError(f"--random-model builds its weights here: {', '.join(sorted(loading))} apply to "
                             "--model only")
        return build(random_model, device=device, dtype=dtype), None
    from kvpolicies.integrations.models import load_model

    return load_model(model_name, device=device, dtype=dtype, **loading)
