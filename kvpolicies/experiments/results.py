"""The result record of one sweep cell, defined once: what a sweep writes and every page reads.

A results folder is shared between runs, commands and people, so it can hold anything: a ``bench --json`` output, a
file cut short by a full disk, a hand-edited record. Every reader goes through :func:`load_results`, which keeps the
files that validate as records and skips the others with a warning naming the file: one bad file never costs a page
or the work of a sweep. The field names are those sweeps have always written, so old folders still load.

A record holds only what a strict JSON reader accepts and a page can rank: every number finite, counts, bytes and
times never negative. Scores may be negative (a Matthews correlation is), never NaN or infinite: a metric with no
finite value is no result, and its cell is recorded as a failure saying so.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kvpolicies.engine.budget import Budget
from kvpolicies.errors import UsageError, describe
from kvpolicies.experiments.grid import Cell
from kvpolicies.experiments.outcomes import Statistic
from kvpolicies.files import staged


class ResultsError(UsageError):
    """A results folder that cannot hold results (a file in its place, no permission to write, a full disk, ...)."""


Finite = Annotated[float, Field(allow_inf_nan=False)]
"""A number a page can rank and strict JSON can hold."""
Amount = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""Bytes, rates, seconds: finite and never negative."""
Count = Annotated[int, Field(ge=0)]


class _Measured(BaseModel):
    """Figures a record carries, declared or not (``extra="allow"`` keeps what newer lm-eval models add): all of them
    finite and never negative."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="after")
    def _extras_are_amounts(self) -> _Measured:
        for name, value in (self.model_extra or {}).items():
            if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} is {value}; a measured amount is a finite number, never negative")
        return self


class KVMemory(_Measured):
    """Resident KV bytes per sequence at the end of each request, next to the full cache's, as the lm-eval model
    writes them (``kvpolicies.integrations.lm_eval.kv_memory_record``, from the cache's ``CacheStats``).

    Files written before the figures were counted per sequence say ``requests`` (batches) instead of ``sequences``.
    """

    sequences: Count = 0
    resident_bytes_peak: Amount | None = None
    resident_bytes_mean: Amount | None = None
    full_bytes_peak: Amount | None = None
    full_bytes_mean: Amount | None = None
    resident_fraction_mean: Amount | None = None
    kept_fraction_mean: Amount | None = None
    """Entries kept as a share of the full cache's, whatever their codec: 1.0 where a codec alone made the bytes
    (absent from files written before it was recorded)."""
    padding_bytes_peak: Amount | None = None
    """Largest padding a batch stored next to its sequences' entries (reported apart, never as resident bytes)."""
    context_bytes_peak: Amount | None = None
    """The context's own entries (what the budget is a fraction of when a question was appended after it)."""
    context_bytes_mean: Amount | None = None
    auxiliary_bytes_peak: Amount | None = None
    """What the policy held besides keys and values, per sequence (its share of its batch's): recent-query buffers,
    attention tracks, the padding mask of a dense layer. Equal memory is equal KV bytes; this is reported next to
    it, since a policy's buffers can outweigh a small cache (expected_attention's query buffer on a Llama-3-8B shape
    is 32 MiB against 16 MiB of KV at 128 tokens per head). Absent in files written before it was counted."""
    auxiliary_bytes_mean: Amount | None = None


class Speed(_Measured):
    """Prefill and decode throughput measured inside lm-eval's requests."""

    prefill_tokens_per_s: Amount | None = None
    decode_tokens_per_s: Amount | None = None
    prefill_s: Amount | None = None
    decode_s: Amount | None = None


class Outcomes(BaseModel):
    """Each sample's outcome of the primary metric: what a page's intervals and paired tests are computed from (see
    :mod:`kvpolicies.reports.statistics`), since a score alone cannot be bootstrapped afterwards. ``doc_ids`` pair
    the samples of two cells of one task (same docs, same seed); ``weights`` are a perplexity's words or bytes per
    document. The runner keeps them only where they give back the score exactly as lm-eval aggregated it."""

    model_config = ConfigDict(frozen=True)

    statistic: Statistic
    doc_ids: list[Count]
    values: list[Finite]
    weights: list[Amount] | None = None

    @model_validator(mode="after")
    def _aligned(self) -> Outcomes:
        lengths = {len(self.doc_ids), len(self.values)} | ({len(self.weights)} if self.weights is not None else set())
        if len(lengths) != 1:
            raise ValueError("outcomes need one doc id, value (and weight) per sample")
        if (self.weights is None) != (self.statistic == "mean"):
            raise ValueError(f"outcomes of a {self.statistic} {'need' if self.weights is None else 'take no'} weights")
        return self

    def by_doc(self) -> dict[int, tuple[float, float | None]]:
        """``{doc_id: (value, weight or None)}``, as :func:`kvpolicies.reports.statistics.compare` pairs them."""
        weights = self.weights or [None] * len(self.values)
        return {doc: (value, weight) for doc, value, weight in zip(self.doc_ids, self.values, weights)}


class Identity(BaseModel):
    """A copy of what the cell's key hashes (``Cell.identity()``), kept for provenance; ``budget`` is None for a
    policy that does not compress, which is how pages find the reference row without knowing its name."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: str
    policy: dict[str, Any]
    budget: Budget | None
    code_version: str

    @field_validator("budget", mode="before")
    @classmethod
    def _stored_budget(cls, value):
        return Budget.stored(value)  # written before the window rule: windows were held whole


class Worker(BaseModel):
    """Where a cell was computed: the machine and process, and on a Ray cluster the node and the GPUs Ray gave it.
    Files written before sweeps could run on a cluster have none."""

    model_config = ConfigDict(extra="allow", frozen=True)

    host: str
    pid: int
    node_id: str | None = None
    gpu_ids: list[str] = []


RESULT_FIELDS = ("metrics", "primary_metric", "score", "higher_is_better", "kv_memory", "speed")
"""What an ``ok`` record cannot be without: a record that lacks one is no result, whatever its status says."""


class ResultRecord(BaseModel):
    """One cell's outcome: provenance always, then either its measurements (``ok``) or its error (``error``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: str
    cell: Cell
    identity: Identity
    versions: dict[str, str] = {}
    started_at: AwareDatetime
    finished_at: AwareDatetime
    load_average_start: Amount | None = None
    load_average_end: Amount | None = None
    status: Literal["ok", "error"]

    metrics: dict[str, Finite] | None = None
    primary_metric: str | None = None
    score: Finite | None = None
    higher_is_better: bool | None = None
    samples: Count = 0
    outcomes: Outcomes | None = None
    """Each sample's outcome of the primary metric (absent in files written before they were kept, and where they
    do not give back the score: a metric lm-eval aggregates in another way)."""
    stderr: dict[str, Amount] = {}
    """lm-eval's standard error of each metric that has one in closed form (the mean's), by metric name."""
    kv_memory: KVMemory | None = None
    speed: Speed | None = None
    peak_memory_bytes: Count | None = None
    peak_memory_growth_bytes: Count | None = None
    """Peak memory the cell needed: the largest of its requests' peaks above what the process held when each
    request began (files written before 2026-12-06 measured it over the whole evaluation, so it swung with what
    ran before the cell: the first cell of a task paid lm-eval's set-up)."""
    shared_capture_bytes: Count | None = None
    """The largest captured prefill the cell's caches were replayed from (held once for all the cells of its task
    that shared it: every layer's keys, values and queries); None for a cell that prefilled its own prompts."""
    decoded_together_bytes: Count | None = None
    """The most memory a decoding run the cell's answers shared with its task's other cells took (one batch, each
    row on its own cache): every row's cache, held as the batch began, and the run's growth above that. Outside
    ``peak_memory_*``, which then covers the cell's replay, question and first token (and, absolute, whatever the
    process held then, other cells' caches waiting for the batch included); None for a cell that decoded its
    answers alone."""
    cpu_count: Count | None = None
    """Cores of the machine that ran the cell: a load average above it says the timings shared the CPU."""
    wall_s: Amount | None = None
    device: str | None = None
    loading: dict[str, Any] | None = None
    """How the model was loaded where the cell ran (``runner.loaded_as``): dtype, attention, devices, revision."""
    worker: Worker | None = None

    error: str | None = None
    traceback: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> ResultRecord:
        if self.status == "ok":
            missing = [name for name in RESULT_FIELDS if getattr(self, name) is None]
            if missing:
                raise ValueError(f"an ok record needs {', '.join(missing)}")
        elif not self.error:
            raise ValueError("an error record needs its error")
        return self

    @property
    def is_reference(self) -> bool:
        """Whether this is the full cache's row (a policy that keeps everything, so no budget applies)."""
        return self.identity.budget is None

    @property
    def busy(self) -> bool:
        """Whether the machine was busier than its cores during the cell, so its timings are not comparable."""
        return self.load is not None and self.cpu_count is not None and self.load > self.cpu_count

    @property
    def load(self) -> float | None:
        """Highest 1-minute load average seen at the cell's start or end: timings from a busy machine show it."""
        loads = [x for x in (self.load_average_start, self.load_average_end) if x is not None]
        return max(loads, default=None)


def budget_key(budget: Budget) -> float | str:
    """How pages place and label budgets: a fraction by its value (``0.5`` and ``"50%"`` are one budget), any other
    unit by its text; a slack that tells two budgets apart is said in the policy's name (kvpolicies.reports.points)."""
    return budget.value if budget.unit == "fraction" else str(budget)


def read_record(path: Path) -> ResultRecord:
    """The record in ``path``; ``OSError`` if it cannot be read, ``ValueError`` if it is not a valid record."""
    return ResultRecord.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))


def load_results(results_dir: Path) -> list[ResultRecord]:
    """Every valid record of a results folder, by file name; each other ``*.json`` is skipped with a warning on
    stderr naming it (``kvpolicies: warning: skipped <path>: <why>``)."""
    records = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            records.append(read_record(path))
        except (OSError, ValueError) as error:
            print(f"kvpolicies: warning: skipped {path}: {_why(error)}", file=sys.stderr)
    return records


def _why(error: Exception) -> str:
    """One line on why a file is not a record: the first validation problems, or what stopped the reading."""
    if isinstance(error, ValidationError):
        problems = describe(error).split("; ")
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return "not a result record: " + "; ".join(problems[:3]) + more
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON ({error})"
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8 text"
    return getattr(error, "strerror", None) or str(error)


def write_record(path: Path, record: ResultRecord) -> None:
    """Write ``record`` atomically: a reader (or a sweep killed mid-write) sees the old file or the whole new one.

    The staging file is unique to this call (two sweeps writing one cell never share it) and removed when the write
    fails; a write that fails (a full disk, a folder gone read-only) is a :class:`ResultsError` naming the folder,
    and, for a full disk, the space the record needs.
    """
    text = record.model_dump_json(indent=1, fallback=str)
    write_atomically(path, text.encode("utf-8"), what="results")


def write_atomically(path: Path, data: bytes, what: str) -> None:
    """``data`` into ``path`` through a staging file of its own (:func:`kvpolicies.files.staged`); ``what`` names
    the folder's role in the error (``results``)."""
    try:
        with staged(path) as file:
            file.write(data)
    except OSError as error:
        raise ResultsError(cannot_write(path, len(data), error, what)) from error


def cannot_write(path: Path, size: int, error: OSError, what: str) -> str:
    """Why ``path`` could not be written and what to do: on a full disk, how much room there is and is needed."""
    folder = path.parent
    reason = (error.strerror or str(error)).lower()
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        room = "" if free is None else f", {free:,} bytes free"
        return (f"cannot write {what} to {folder}: {reason} ({path.name} needs {size:,} bytes{room}); free some "
                f"space there, or give --results another folder, and run the same command again")
    return f"cannot write {what} to {folder}: {reason} ({path.name}); give --results a folder you can write to"


PROBE_BYTES = 64 * 1024
"""What the write check writes (and removes): more than a record takes, so a disk too full for one fails at once."""


def check_writable(results_dir: Path) -> None:
    """Create ``results_dir`` and write (then remove) a scratch file as large as a record in it, so a folder that
    cannot hold results, read-only or full, fails before the first cell is computed, not after (permission bits
    alone cannot tell: root ignores them; and an empty file fits on a full disk)."""
    if results_dir.exists() and not results_dir.is_dir():
        raise ResultsError(f"results folder {results_dir} is a file; give --results a folder")
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        where = f" ({error.filename})" if error.filename and Path(error.filename) != results_dir else ""
        raise ResultsError(f"cannot write results to {results_dir}: {(error.strerror or str(error)).lower()}{where}; "
                           "give --results a folder you can write to") from None
    try:
        with tempfile.NamedTemporaryFile(dir=results_dir, prefix=".write-check-") as file:
            file.write(bytes(PROBE_BYTES))
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise ResultsError(cannot_write(results_dir / "a result", PROBE_BYTES, error, "results")) from None
