"""What a sweep will cost, said before it starts (``kvpolicies sweep --dry-run``): its cells, models, tasks and samples,
and per cell an estimate of peak memory and time for the model's real shape on this device, with the prefill chunk
that fits.

Nothing is loaded (but for the embedded model's one-time conversion on a fresh machine, which any use of it makes):
a model's shape comes from its config (the local cache, or the hub where it is reachable), else from a table of
known shapes, and its parameters are counted on the meta device. The estimate is a roofline:

- **memory** = weights + the KV cache at the cell's budget (while a layer is prefilled it holds the chunk's tokens,
  the whole prompt without chunks, before its cut: one layer counts them in full) + a prefill chunk's activations
  (hidden states, the MLP's intermediate rows, the attention's output) + the policy's scoring buffer (float32
  attention of a block of 256 queries over the prompt, the largest signal a built-in computes); a policy that
  chooses in an after-prefill stage (KVzip) holds the whole prompt in every layer until then, and pays one more
  prefill of its own;
- **time** = per sample, the prefill's FLOPs (``2 · parameters · tokens`` plus causal attention) at the device's
  measured matrix-multiply rate, and per generated token the larger of its FLOPs at that rate and the bytes it must
  read (weights and kept KV) at the device's measured copy bandwidth.

A sweep prefills each prompt once for all the cells of a task (:mod:`kvpolicies.integrations.shared`; not for
log-likelihood tasks, chunked prefills or ``--no-shared-prefill``), so a task's time counts one prefill per sample
and protocol and each cell's generation, and its peak adds the capture (every layer's keys, values and queries) to
the worst cell's. Where the capture would take more than half of what is free, the sweep runs each cell alone, and
so does the estimate (judging the longest prompt beside the worst cell's peak).

Both rates are measured on the device in a second before the estimate. Generation is counted at each task's
``max_gen_toks`` (an answer that stops sooner costs less); the policies' scoring and eviction and lm-eval's own work
are not counted: docs/performance.md compares the estimate with measured sweeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpolicies.errors import UsageError
from kvpolicies.experiments.grid import Cell, SweepConfig, cells

KNOWN_SHAPES = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama3-8b", "meta-llama/Llama-3.1-8B": "llama3-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b", "meta-llama/Meta-Llama-3-8B": "llama3-8b",
    "Qwen/Qwen3-8B": "qwen3-8b",
}
"""Hub ids whose shape is known here without their config (``RANDOM_SHAPES`` in integrations.models)."""

GROUPS = ("kvp_ruler",)
"""Task groups of ours: a dry run sizes their tasks listed one by one, not the group."""
SCORING_QUERIES = 256
"""Queries per block when a signal computes attention (``signals.attention_received``'s chunk)."""
CHUNKS = (None, 16384, 8192, 4096, 2048, 1024, 512)
"""Prefill chunks tried, largest first (None: the whole prompt in one pass)."""
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """What the estimate reads of a model."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    parameters: int
    source: str
    """Where the shape came from: its config, or the table of known shapes."""

    def kv_bytes(self, tokens: float, dtype_bytes: int) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes * tokens


@dataclass(frozen=True)
class Device:
    """The device the estimate is for, with the rates measured on it."""

    name: str
    flops_per_s: float
    """Matrix-multiply rate measured in the sweep's dtype."""
    bandwidth_bytes_per_s: float
    """Copy bandwidth measured (bytes read and written)."""
    memory_bytes: int
    """Memory the sweep can use: the GPU's, or the machine's RAM on a CPU."""


@dataclass(frozen=True)
class Workload:
    """One task of the grid: its samples and their token lengths."""

    task: str
    samples: int | None
    """Samples per cell (None: unknown, a task of lm-eval's that the estimate cannot size)."""
    lengths: tuple[tuple[int, int], ...]
    """``(prompt tokens, samples)`` per length."""
    generated: int


def model_shape(model: str | None) -> Shape:
    """The shape of ``model`` without loading it (see the module's docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvpolicies.integrations.models import random_config, resolve_source

    source, options = resolve_source(model)
    try:  # the local cache first, then the known shapes: a hub that cannot be reached costs retries
        config, where = AutoConfig.from_pretrained(source, **options | {"local_files_only": True}), "its config"
    except (OSError, ValueError):
        if model in KNOWN_SHAPES:
            config = random_config(KNOWN_SHAPES[model])
            where = f"the known shape of {model}; its config is not in the local cache"
        else:
            try:
                config, where = AutoConfig.from_pretrained(source, **options), "its config, from the hub"
            except (OSError, ValueError):
                raise UsageError(f"cannot read the config of model {model!r} (not in the local cache, and the hub "
                                 "not reachable) and its shape is not among the known ones "
                                 f"({', '.join(KNOWN_SHAPES)}); run the dry run where the hub is reachable, or "
                                 f"download the model's config first (`hf download {model} config.json`)") from None
    text = config.get_text_config(decoder=True)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    heads = text.num_attention_heads
    return Shape(layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
                 heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                 head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
                 parameters=parameters, source=where)


def measure_device(device: torch.device, dtype: torch.dtype) -> Device:
    """Matrix-multiply rate and copy bandwidth of ``device``, measured in about a second, and its memory."""
    import psutil

    from kvpolicies.engine.clock import clock

    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    block = torch.empty((256 if device.type == "cuda" else 64) * 2**20, dtype=torch.uint8, device=device)

    def rate(run, work: float, rounds: int = 3, seconds: float = 0.15) -> float:
        """The best of ``rounds`` timed rounds of at least ``seconds`` each: a round that a thread pool's start or
        a neighbour's burst slowed says nothing about the device."""
        run()  # warm-up
        best = 0.0
        for _ in range(rounds):
            count, started = 0, clock(device)
            while (elapsed := clock(device) - started) < seconds:
                run()
                count += 1
            best = max(best, work * count / elapsed)
        return best

    flops = rate(lambda: a @ b, 2 * size**3)
    bandwidth = rate(lambda: block.clone(), 2 * block.numel())
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        name = torch.cuda.get_device_name(device)
    else:
        memory = psutil.virtual_memory().total
        name = f"CPU, {torch.get_num_threads()} threads"
    return Device(name=name, flops_per_s=flops, bandwidth_bytes_per_s=bandwidth, memory_bytes=memory)


def workload(cell: Cell) -> Workload:
    """The samples of ``cell``'s task and their prompt lengths, from its metadata and limit."""
    from kvpolicies_evals.data import DEFAULT_DEPTHS, DEFAULT_PER_CELL
    from kvpolicies_evals.metadata import schema
    from kvpolicies_evals.tasks import generated_tokens

    task, metadata, limit = cell.task.name, cell.task.metadata, cell.task.limit
    kind = schema(task)
    generated = generated_tokens(task)
    if kind is None:  # lm-eval's own task: only a limit says how many samples; their lengths are unknown here
        return Workload(task=task, samples=None, lengths=(), generated=generated)
    lengths = list(metadata.get(kind.LENGTHS) or kind.DEFAULT_LENGTHS)
    if not lengths or task in GROUPS:  # lengths lm-eval picks, or a group of tasks: not sized here
        return Workload(task=task, samples=None, lengths=(), generated=generated)
    if kind.LENGTHS_INCLUDE_GENERATION:
        lengths = [length - generated for length in lengths]
        per_length = 500  # lm-eval's RULER draws 500 samples per length
    else:
        per_length = kind.samples_per_length(metadata) or len(DEFAULT_DEPTHS) * DEFAULT_PER_CELL
    counted, left = [], limit
    for length in lengths:  # lm-eval takes the first `limit` samples: shortest lengths first
        take = per_length if left is None else min(per_length, left)
        if take > 0:
            counted.append((length, take))
        left = None if left is None else left - take
    return Workload(task=task, samples=sum(n for _, n in counted), lengths=tuple(counted), generated=generated)


def cell_memory(shape: Shape, cell: Cell, length: int, generated: int, dtype_bytes: int,
                chunk: int | None) -> dict[str, float]:
    """Peak bytes of one cell's sample of ``length`` prompt tokens, by part."""
    from kvpolicies.registry import get_policy

    policy = get_policy(cell.policy.name, **cell.policy.options)
    kept = _kept(cell, policy)  # a budget in tokens or bytes is counted as the whole cache: an upper bound
    total = length + generated
    rows = min(chunk or length, length)
    # The layer being prefilled holds the chunk's tokens before its cut (all of the prompt without chunks).
    one_layer = shape.kv_bytes(rows, dtype_bytes) / shape.layers if policy.compresses else 0
    kv = shape.kv_bytes(total * kept + (cell.budget.slack_tokens if kept < 1 else 0), dtype_bytes) + one_layer
    if policy.has_stage:  # an after-prefill stage holds the whole prompt in every layer until it chooses
        kv = shape.kv_bytes(total, dtype_bytes)
    activations = rows * dtype_bytes * (4 * shape.hidden + 3 * shape.intermediate + 2 * shape.heads * shape.head_dim)
    scoring = 4 * shape.heads * min(SCORING_QUERIES, rows) * length if policy.compresses else 0
    batch = cell.batch_size
    return {"weights": shape.parameters * dtype_bytes, "kv": kv * batch, "activations": activations * batch,
            "scoring": scoring * batch}


def cell_seconds(shape: Shape, device: Device, work: Workload, budget: float, dtype_bytes: int) -> float | None:
    """Estimated seconds of one cell run alone (None where the task's samples are unknown)."""
    prefill = prefill_seconds(shape, device, work)
    return None if prefill is None else prefill + generation_seconds(shape, device, work, budget, dtype_bytes)


def prefill_seconds(shape: Shape, device: Device, work: Workload) -> float | None:
    """Estimated seconds of prefilling every prompt of a cell once (None where the samples are unknown)."""
    if work.samples is None:
        return None
    attention = 4 * shape.layers * shape.heads * shape.head_dim  # FLOPs per (query, key) pair: q·k, then p·v
    return sum(samples * (2 * shape.parameters * length + attention * length * length / 2) / device.flops_per_s
               for length, samples in work.lengths)


def generation_seconds(shape: Shape, device: Device, work: Workload, budget: float, dtype_bytes: int) -> float:
    """Estimated seconds of a cell's generated tokens, each the larger of its FLOPs and the bytes it reads."""
    return together_seconds(shape, device, work, [budget], dtype_bytes)


def together_seconds(shape: Shape, device: Device, work: Workload, budgets: Sequence[float],
                     dtype_bytes: int) -> float:
    """Estimated seconds of generating for cells decoded as one batch, one row each (row ``i`` keeping
    ``budgets[i]`` of its prompt): each step the larger of every row's FLOPs and the bytes it reads, the weights
    once and every row's cache."""
    attention = 4 * shape.layers * shape.heads * shape.head_dim
    seconds = 0.0
    for length, samples in work.lengths:
        flops = sum(2 * shape.parameters + attention * length * budget for budget in budgets)
        read = shape.parameters * dtype_bytes + sum(shape.kv_bytes(length * budget, dtype_bytes) for budget in budgets)
        seconds += samples * work.generated * max(flops / device.flops_per_s, read / device.bandwidth_bytes_per_s)
    return seconds


def capture_bytes(shape: Shape, tokens: int, dtype_bytes: int) -> float:
    """What one prompt's shared prefill holds (:func:`kvpolicies.integrations.shared.capture_bytes`): every layer's
    keys and values and its queries."""
    return tokens * shape.layers * (2 * shape.kv_heads + shape.heads) * shape.head_dim * dtype_bytes


def dry_run(config: SweepConfig, done: set[str] | None = None, device: str | None = None,
            memory_gib: float | None = None, share_prefill: bool = True, decode_together: bool = True) -> str:
    """The plan of ``config``'s sweep as text: cells to run (``done`` keys skipped), then per model and task the
    samples, the estimated peak memory of its worst cell, the prefill chunk that fits the device, how many prefills
    each prompt takes (one for all the cells that share it) and the task's time, with the cells of a prompt
    decoding its answers as one batch (``decode_together``) or one after another."""
    from kvpolicies.experiments.sweep import shared_groups

    from tabulate import tabulate

    from kvpolicies.integrations.models import resolve_device, resolve_dtype

    grid = cells(config)
    todo = [cell for cell in grid if cell.key() not in (done or set())]
    placed = resolve_device(device or config.loading.device)
    dtype = resolve_dtype(config.loading.dtype, placed)
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    measured = measure_device(placed, dtype)
    memory = int(memory_gib * GIB) if memory_gib is not None else measured.memory_bytes
    lines = [f"{len(grid)} cells, {len(grid) - len(todo)} already done, {len(todo)} to run; device: {placed} "
             f"({measured.name}; measured {measured.flops_per_s / 1e12:.2f} TFLOP/s in "
             f"{str(dtype).removeprefix('torch.')}, {measured.bandwidth_bytes_per_s / 1e9:.0f} GB/s; "
             f"{memory / GIB:.3g} GiB"
             + (" as given" if memory_gib is not None else "") + ")"]
    total_s, unknown = 0.0, 0
    rows = []
    for model in dict.fromkeys(cell.model for cell in todo):
        shape = model_shape(model)
        lines.append(f"model {model or 'the embedded model'}: {shape.parameters / 1e9:.2f} B parameters, "
                     f"{shape.layers} layers, {shape.heads} query heads, {shape.kv_heads} KV heads of "
                     f"{shape.head_dim} (from {shape.source})")
        tasks = {cell.task.model_dump_json(): cell.task for cell in todo if cell.model == model}
        for task in tasks.values():
            ran = [cell for cell in todo if cell.model == model and cell.task == task]
            work = workload(ran[0])
            longest = max((length for length, _ in work.lengths), default=None)
            peak, fits = _peak_and_chunk(shape, ran, longest, work.generated, dtype_bytes, memory,
                                         config.prefill_chunk)
            capture = capture_bytes(shape, longest or 0, dtype_bytes)
            # As the sweep decides: generation, one prompt at a time, a capture within half of what is free (the
            # sweep judges each prompt as it comes; this, the longest, beside the worst cell's peak).
            shares = (share_prefill and work.generated > 0 and ran[0].batch_size == 1
                      and capture <= (memory - (peak if peak is not None else shape.parameters * dtype_bytes)) / 2)
            groups = shared_groups(ran) if shares else [[cell] for cell in ran]
            seconds = _task_seconds(shape, measured, work, groups, dtype_bytes, decode_together)
            prefills = [f"{_passes(group)} for {len(group)} cells" if len(group) > 1 else "1 per cell"
                        for group in groups]
            if seconds is None:
                unknown += len(ran)
            else:
                total_s += seconds
            if peak is not None and any(len(group) > 1 for group in groups):
                peak += capture
                if decode_together:  # a protocol's caches, held at once while they decode: at most half the rest
                    caches = max(sum(cell_memory(shape, cell, longest, work.generated, dtype_bytes, None)["kv"]
                                     for cell in group if cell.protocol == protocol)
                                 for group in groups for protocol in {cell.protocol for cell in group})
                    peak += min(caches, max(memory - peak, 0) / 2)
            rows.append([model or "embedded", task.name, len(ran), "?" if work.samples is None else work.samples,
                         "?" if longest is None else longest, "?" if peak is None else f"{peak / GIB:.1f}", fits,
                         ", ".join(sorted(set(prefills))), "?" if seconds is None else _duration(seconds)])
    lines.append(tabulate(rows, headers=["model", "task", "cells", "samples/cell", "longest prompt",
                                         "peak GiB (worst cell)", "prefill chunk that fits",
                                         "prefills of a prompt", "time (all cells)"], tablefmt="simple"))
    lines.append(f"estimated total: {_duration(total_s)}" + (f", plus {unknown} cells of tasks not sized here "
                                                            "(lm-eval's own, a group: list its tasks one by one, or "
                                                            "RULER without max_seq_lengths)" if unknown else "")
                 + "; generation counted at each task's max_gen_toks, the policies' scoring and eviction and "
                   "lm-eval's own work not counted (docs/performance.md compares it with measured sweeps)")
    return "\n".join(lines)


def _task_seconds(shape: Shape, device: Device, work: Workload, groups: Sequence[Sequence[Cell]],
                  dtype_bytes: int, together: bool = True) -> float | None:
    """Estimated seconds of a task's cells run in ``groups``: a group of several prefills each prompt once per
    protocol (the question's own prefill on a compressed context is left out), then generates for its cells, the
    cells of a protocol as one batch (``together``) or one after another. A policy with an after-prefill stage pays
    one more prefill of its own per cell (KVzip's repetition of the context; an upper bound for a stage that runs
    no second pass)."""
    prefill = prefill_seconds(shape, device, work)
    if prefill is None:
        return None
    seconds = 0.0
    for group in groups:
        seconds += _passes(group) * prefill + sum(prefill for cell in group if _has_stage(cell))
        if together and len(group) > 1:
            for protocol in {cell.protocol for cell in group}:
                budgets = [_kept(cell) for cell in group if cell.protocol == protocol]
                seconds += together_seconds(shape, device, work, budgets, dtype_bytes)
        else:
            seconds += sum(generation_seconds(shape, device, work, _kept(cell), dtype_bytes) for cell in group)
    return seconds


def _passes(group: Sequence[Cell]) -> int:
    """Prefills of each prompt for ``group``: one per protocol when its cells share them, one per cell alone."""
    return len({cell.protocol for cell in group}) if len(group) > 1 else 1


def _has_stage(cell: Cell) -> bool:
    from kvpolicies.registry import get_policy

    return get_policy(cell.policy.name, **cell.policy.options).has_stage


def _kept(cell: Cell, policy=None) -> float:
    """The share of the cache ``cell`` keeps (1 for the full cache, or a budget that is no fraction)."""
    from kvpolicies.registry import get_policy

    compresses = (policy or get_policy(cell.policy.name, **cell.policy.options)).compresses
    return cell.budget.value if compresses and cell.budget.unit == "fraction" else 1.0


def _peak_and_chunk(shape: Shape, ran: Sequence[Cell], longest: int | None, generated: int, dtype_bytes: int,
                    memory: int, given: int | None) -> tuple[float | None, str]:
    """The worst cell's peak (at the grid's prefill chunk, ``given``), and the largest prefill chunk with which
    every cell fits."""
    if longest is None:
        return None, "?"

    def peak(chunk: int | None) -> float:
        return max(sum(cell_memory(shape, cell, longest, generated, dtype_bytes, chunk).values()) for cell in ran)

    if given is not None:
        fits = peak(given) <= memory * 0.9
        return peak(given), f"{given} (given): {'fits' if fits else f'over {memory / GIB:.3g} GiB'}"
    for chunk in CHUNKS:
        if chunk is not None and chunk >= longest:
            continue
        if peak(chunk) <= memory * 0.9:  # a tenth kept for the allocator, CUDA's context and lm-eval
            return peak(None), "none needed" if chunk is None else f"--prefill-chunk {chunk}"
    return peak(None), f"none: over {memory / GIB:.3g} GiB even at {CHUNKS[-1]}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def finished_keys(config: SweepConfig, results: Path) -> set[str]:
    """Keys of ``config``'s cells already finished in ``results`` (read only: nothing is claimed or written)."""
    from kvpolicies.experiments.store import ResultsStore

    if not results.is_dir():
        return set()
    with ResultsStore(results) as store:
        return {cell.key() for cell in cells(config) if store.finished(cell) is not None}
