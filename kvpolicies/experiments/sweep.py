"""Sweeps: every model × task × policy × budget cell through lm-eval, one result file per cell, resumable.

A cell's file name is a hash of what determines its result (model, task and its data parameters, policy and its
full config, budget, seed, code version), written atomically (temp file + rename), so a sweep killed at any moment
loses no finished cell and a re-run computes only what is missing. A failing cell is recorded with its error and
the sweep goes on; failed cells are retried on the next run, and so is any file that is not a valid record. The
results folder is checked for writing before the first cell is computed.

Cells run one after another in this process, or on the workers of a Ray cluster
(:mod:`kvpolicies.experiments.ray_executor`); either way this process writes every file, so the results folder need
not be shared between nodes, and a local run and a cluster run fill one folder interchangeably.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from kvpolicies.experiments.grid import Cell, SweepConfig, cells
from kvpolicies.experiments.memory import PeakMemory

if TYPE_CHECKING:
    from kvpolicies.experiments.results import ResultRecord
    from kvpolicies.experiments.store import ResultsStore


def tasks_dir() -> Path:
    import kvpolicies_evals

    return Path(kvpolicies_evals.__file__).parent / "tasks"


@functools.lru_cache(maxsize=16)
def _task_manager(metadata_json: str):
    """Indexing lm-eval's task folders takes seconds: one manager per distinct task metadata per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir()), metadata=json.loads(metadata_json))


_loaded: dict[str | None, tuple[Any, Any]] = {}
"""The model (and tokenizer) of the last cell, by model name: the next cell of the same model reuses it."""


def cell_model(cell: Cell):
    """The lm-eval model of ``cell``. Weights are loaded once per model, not once per cell (an 8B model takes
    minutes to load on a GPU node); a grid runs model by model, so only the current model is kept in memory. The
    first load is lm-eval's own, so results are those of a fresh process (a resumed sweep checks this)."""
    from kvpolicies.integrations.lm_eval import KVPoliciesLM

    options = dict(policy=cell.policy.name, budget=cell.budget, batch_size=cell.batch_size,
                   protocol=cell.protocol.value, **cell.policy.options)
    if cell.model in _loaded:
        model, tokenizer = _loaded[cell.model]
        return KVPoliciesLM(pretrained=model, tokenizer=tokenizer, **options)
    _loaded.clear()
    lm = KVPoliciesLM(pretrained=cell.model, **options)
    _loaded[cell.model] = (lm.model, lm.tokenizer)
    return lm


def run_cell(cell: Cell) -> dict[str, Any]:
    """Evaluate one cell with lm-eval and return the measured fields of its record (metrics, memory, speed)."""
    import lm_eval

    lm = cell_model(cell)
    started = time.perf_counter()  # the evaluation, not the one cell that happened to load the weights
    with PeakMemory(lm.device) as peak:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[cell.task.name], limit=cell.task.limit, bootstrap_iters=0,
            # Tasks that size their samples in tokens (RULER) need the model's tokenizer: lm-eval's own command
            # passes the model args as metadata, a TaskManager of ours must say it.
            task_manager=_task_manager(json.dumps({"pretrained": cell.model, **cell.task.metadata}, sort_keys=True)),
            random_seed=cell.seed, numpy_random_seed=cell.seed, torch_random_seed=cell.seed,
            fewshot_random_seed=cell.seed,
        )
    task_results = results["results"][cell.task.name]
    metrics = {
        name: float(value) for name, value in task_results.items()
        if isinstance(value, (int, float)) and "stderr" not in name and name != "sample_len"
    }
    broken = [f"{name} = {value}" for name, value in metrics.items() if not math.isfinite(value)]
    if broken:  # no rank, no mean and no strict JSON for it: the cell has no result
        raise ValueError(f"lm-eval reported {', '.join(broken)} for {cell.task.name}: no finite score to rank; the "
                         "policy or the task broke the model's output (see the samples with lm-eval --log_samples)")
    primary = next(iter(metrics))
    higher_is_better = results["higher_is_better"][cell.task.name].get(primary.split(",")[0], True)
    info = results["config"]["kvpolicies"]
    return {
        "metrics": metrics,
        "primary_metric": primary,
        "score": metrics[primary],
        "higher_is_better": bool(higher_is_better),
        "samples": int(task_results.get("sample_len", 0)),
        "kv_memory": info["kv_memory"],
        "speed": info["speed"],
        "peak_memory_bytes": peak.peak_bytes,
        "peak_memory_growth_bytes": peak.growth_bytes,
        "wall_s": time.perf_counter() - started,
        "device": str(lm.device) + (f" ({torch.cuda.get_device_name(lm.device)})" if lm.device.type == "cuda" else ""),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("kvpolicies", "torch", "transformers", "lm_eval")} | {
        "python": platform.python_version()
    }


def evaluate(cell: Cell) -> ResultRecord:
    """The record of ``cell``, computed here: ``ok`` with its measurements, or ``error`` with what it raised (one
    broken cell must not stop a sweep). The key is computed here too, from this machine's code, so a driver can tell
    a worker that runs other code than its own."""
    from kvpolicies.experiments.results import ResultRecord

    provenance = {"key": cell.key(), "cell": cell, "identity": cell.identity(), "versions": versions(),
                  "started_at": datetime.now(timezone.utc), "load_average_start": _load_average(),
                  "worker": {"host": socket.gethostname(), "pid": os.getpid()}}
    try:
        measured = run_cell(cell)
        return ResultRecord(**provenance, status="ok", **measured, finished_at=datetime.now(timezone.utc),
                            load_average_end=_load_average())
    except Exception as error:
        return ResultRecord(**provenance, status="error", error=f"{type(error).__name__}: {error}",
                            traceback=traceback.format_exc(), finished_at=datetime.now(timezone.utc),
                            load_average_end=_load_average())


class Executor(Protocol):
    """Runs cells somewhere and hands back their records as they finish, in any order; the sweep writes them.

    ``todo`` claims each cell as it is taken (:class:`~kvpolicies.experiments.store.ResultsStore`), so an executor
    takes a cell when it is about to run it, or all at its start; cells another sweep holds are never handed out.
    ``show`` takes one line on what is running now, for the progress bar. An executor never writes result files:
    the sweep does, one at a time, so the folder needs to be reachable from the driver only.
    """

    def run(self, todo: Iterable[Cell], show: Callable[[str], None]) -> Iterator[tuple[Cell, ResultRecord]]: ...


class LocalExecutor:
    """One cell after another in this process: the default, and all a single machine needs."""

    def run(self, todo: Iterable[Cell], show: Callable[[str], None]) -> Iterator[tuple[Cell, ResultRecord]]:
        for cell in todo:
            show(f"{cell.task.name} {cell.title} @ {cell.budget}")
            yield cell, evaluate(cell)


def run_sweep(config: SweepConfig, results_dir: Path, progress: bool = True,
              executor: Executor | None = None) -> Iterator[ResultRecord]:
    """Run every missing cell (on ``executor``, default :class:`LocalExecutor`), yielding each record as it is
    written. Finished cells are skipped, and so are cells another sweep on the same folder is computing (it writes
    them). A results folder that cannot be written raises
    :class:`~kvpolicies.experiments.results.ResultsError` before any cell runs.

    A record that cannot be written (a full disk) is kept and written as soon as the folder takes a file again;
    once a second record cannot be written either, the sweep stops with a ResultsError naming the folder and the
    space needed, since every further cell would be computed for nothing.
    """
    from tqdm import tqdm

    from kvpolicies.experiments.results import ResultsError, check_writable
    from kvpolicies.experiments.store import ResultsStore

    check_writable(results_dir)
    grid = cells(config)
    with ResultsStore(results_dir) as store:
        todo = [cell for cell in grid if not _current(store, cell)]
        print(f"kvpolicies: {len(grid)} cells, {len(grid) - len(todo)} already done, {len(todo)} to run "
              f"-> {results_dir}", file=sys.stderr)
        bar = tqdm(total=len(grid), initial=len(grid) - len(todo), disable=not progress, unit="cell", file=sys.stderr)
        elsewhere: list[Cell] = []
        unsaved: list[tuple[Cell, ResultRecord]] = []
        failed = 0

        def claimed() -> Iterator[Cell]:
            for cell in todo:
                if not store.claim(cell):
                    elsewhere.append(cell)
                elif store.finished(cell) is not None:  # another sweep finished it since this one started
                    store.release(cell.key())
                else:
                    yield cell
                    continue
                bar.update(1)

        with bar:  # closed before an error or an interruption is reported
            for cell, record in (executor or LocalExecutor()).run(claimed(), bar.set_description):
                if record.key != cell.key():
                    record = _other_code(cell, record)
                unsaved.append((cell, record))
                written, error = _write_all(store, unsaved)
                if error is not None and len(unsaved) > 1:
                    raise ResultsError(f"{error}; {len(unsaved)} computed cells are not saved") from None
                for saved_cell, saved in written:
                    if saved.status != "ok":
                        failed += 1
                        bar.set_postfix(failed=failed)
                        print(f"kvpolicies: cell failed ({saved_cell.task.name}, {saved_cell.title}, "
                              f"{saved_cell.budget}): {saved.error}", file=sys.stderr)
                    bar.update(1)
                    yield saved
        if unsaved:
            _, error = _write_all(store, unsaved)
            if error is not None:
                raise ResultsError(f"{error}; {len(unsaved)} computed cell(s) are not saved") from None
        if elsewhere:
            print(f"kvpolicies: {len(elsewhere)} cells were being computed by another sweep on {results_dir} and are "
                  "left to it; run this command again once it has ended to fill any it did not", file=sys.stderr)


def _current(store: ResultsStore, cell: Cell) -> bool:
    """Whether ``cell`` is finished in ``store``; a finished record is brought up to the grid's current label (the
    label is no part of a cell's key, so renaming it in the grid must not recompute the cell, but pages must show
    the new name)."""
    record = store.finished(cell)
    if record is None:
        return False
    if record.cell.model_dump(mode="json") != cell.model_dump(mode="json") and store.claim(cell):
        store.write(cell, record.model_copy(update={"cell": cell}))
    return True


def _write_all(store: ResultsStore, unsaved: list[tuple[Cell, ResultRecord]]) -> tuple[list[tuple[Cell, ResultRecord]], str | None]:
    """Write the records of ``unsaved`` in order, removing each written one; returns what was written (as the files
    now hold it) and why the first that failed could not be written."""
    from kvpolicies.experiments.results import ResultsError

    written = []
    while unsaved:
        cell, record = unsaved[0]
        try:
            written.append((cell, store.write(cell, record)))
        except ResultsError as error:
            return written, str(error)
        unsaved.pop(0)
    return written, None


def _other_code(cell: Cell, record: ResultRecord) -> ResultRecord:
    """A record computed by a worker whose code gives the cell another key: not this cell's result (its file would
    be taken for a result of this code), so it is written as a failure saying why."""
    where = f" on {record.worker.host}" if record.worker else ""
    return record.model_copy(update={
        "key": cell.key(), "status": "error", "traceback": None,
        "error": f"the worker{where} computed key {record.key} for this cell, this machine {cell.key()}: its "
                 "kvpolicies, plugins or tasks differ from this machine's; install the same version on every node",
    })


def _load_average() -> float | None:
    """The 1-minute load average, so a reader can tell timings taken on a busy machine (None where unsupported)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
