"""Sweep cells on a Ray cluster (``kvpolicies sweep --executor ray``): one worker per slot, the driver writes.

Why actors and not Ray tasks: a worker keeps the model of its last cell loaded, and the driver hands it the cells of
that model first; Ray runs a task that asks for GPUs in a fresh process each time, which would load an 8B model
per cell. Why the driver writes every file: nodes need not share a folder, a file is written by one process only,
and the results folder works exactly as for a local sweep (atomic files, resumable). Why the driver retries: a
worker that dies (killed, out of memory, its node lost) loses only the cell it held, which goes back to the queue
up to ``max_retries`` times before it is recorded as failed; a cell that raises is recorded at once, as locally.

The number of workers follows the cluster: each node holds as many as its CPUs and GPUs fit at the requested
resources per cell, counted again every few seconds, so a node that joins late gets workers and cells.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from kvpolicies.errors import UsageError
from kvpolicies.experiments.execution import Execution
from kvpolicies.experiments.grid import Cell
from kvpolicies.experiments.results import ResultRecord
from kvpolicies.registry import PLUGINS_ENV

TICK_S = 2.0
"""How long the driver waits for a cell before it looks for new nodes and refreshes the progress line."""


class SweepWorker:
    """One Ray worker: computes cells with :func:`kvpolicies.experiments.sweep.evaluate`, keeping the last model
    loaded between them."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this worker, not every core of the node

    def evaluate(self, cell_json: str) -> str:
        from kvpolicies.experiments.sweep import evaluate

        record = evaluate(Cell.model_validate_json(cell_json))
        context = ray.get_runtime_context()
        place = record.worker.model_copy(update={"node_id": context.get_node_id(),
                                                 "gpu_ids": [str(i) for i in context.get_accelerator_ids()["GPU"]]})
        return record.model_copy(update={"worker": place}).model_dump_json()


_RemoteWorker = ray.remote(SweepWorker)


NOTHING_LOADED = "<no model loaded>"


@dataclass
class _Slot:
    actor: Any
    model: str | None = NOTHING_LOADED
    """The model the worker loaded last (its next cells are of that model when there are any); None is the embedded
    model."""
    busy: Cell | None = None


@dataclass
class _State:
    queue: deque[Cell]
    slots: list[_Slot] = field(default_factory=list)
    running: dict[Any, _Slot] = field(default_factory=dict)
    tries: dict[str, int] = field(default_factory=dict)
    first_started: dict[str, datetime] = field(default_factory=dict)
    lost_workers: int = 0
    most_workers: int = 0


class RayExecutor:
    """Runs cells on Ray workers of ``execution.cpus``/``execution.gpus`` each, as many as the cluster fits."""

    def __init__(self, execution: Execution) -> None:
        self.execution = execution

    def run(self, todo: list[Cell], show: Callable[[str], None]) -> Iterator[tuple[Cell, ResultRecord]]:
        if not todo:
            return
        started_here = self._connect()
        state = _State(queue=deque(todo))
        shown = ""
        try:
            self._grow(state, first=True)
            while state.queue or state.running:
                self._dispatch(state)
                if not state.running:  # every node that fitted a cell has left: wait for one to (re)join
                    show(shown := f"waiting for a node that fits a cell ({len(state.queue)} queued)")
                    time.sleep(TICK_S)
                    self._grow(state)
                    continue
                lost = f", {state.lost_workers} lost" if state.lost_workers else ""
                if (line := f"{len(state.running)} running on {len(state.slots)} workers{lost}") != shown:
                    show(shown := line)
                done, _ = ray.wait(list(state.running), num_returns=1, timeout=TICK_S)
                for ref in done:
                    yield from self._collect(state, ref)
                self._grow(state)
        finally:
            for slot in state.slots:
                ray.kill(slot.actor)
            if started_here:
                ray.shutdown()

    # -- the cluster -------------------------------------------------------------------------------------------

    def _connect(self) -> bool:
        """Join the cluster at ``address``, or start one on this machine; True if this process started it."""
        if ray.is_initialized():  # a caller (a test, a notebook) already joined a cluster: use it
            return False
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": "WARNING"}
        if PLUGINS_ENV in os.environ:  # the workers must know the same policies as the driver
            options["runtime_env"] = {"env_vars": {PLUGINS_ENV: os.environ[PLUGINS_ENV]}}
        if self.execution.address is None:
            options["include_dashboard"] = False
        try:
            ray.init(address=self.execution.address, **options)
        except Exception as error:  # Ray's errors for an address it cannot reach vary with the address and version
            raise UsageError(f"cannot join the Ray cluster at {self.execution.address}: {error}; start one with "
                             "`ray start --head`, or leave --address out to start one on this machine") from None
        resources = ray.cluster_resources()
        print(f"kvpolicies: Ray cluster with {len(_alive_nodes())} node(s), {resources.get('CPU', 0):g} CPUs, "
              f"{resources.get('GPU', 0):g} GPUs; {self.execution.cpus:g} CPU(s) and {self.execution.gpus:g} GPU(s) "
              "per cell", file=sys.stderr)
        return self.execution.address is None

    def _capacity(self) -> int:
        """How many workers the live nodes hold at the requested resources per cell (each node apart: two half
        nodes do not make one worker)."""
        total = 0
        for node in _alive_nodes():
            fits = [math.floor(node["Resources"].get("CPU", 0) / self.execution.cpus + 1e-9)]
            if self.execution.gpus:
                fits.append(math.floor(node["Resources"].get("GPU", 0) / self.execution.gpus + 1e-9))
            total += min(fits)
        return total

    def _grow(self, state: _State, first: bool = False) -> None:
        """Start workers while the cluster holds more than are running and cells wait for one."""
        wanted = min(self._capacity(), len(state.queue) + len(state.running))
        if first and wanted == 0:
            resources = ray.cluster_resources()
            raise UsageError(
                f"no node of the Ray cluster fits one cell at {self.execution.cpus:g} CPU(s) and "
                f"{self.execution.gpus:g} GPU(s) (the cluster has {resources.get('CPU', 0):g} CPUs and "
                f"{resources.get('GPU', 0):g} GPUs); lower --cpus-per-cell / --gpus-per-cell or add a node")
        while len(state.slots) < wanted:
            actor = _RemoteWorker.options(
                num_cpus=self.execution.cpus, num_gpus=self.execution.gpus, scheduling_strategy="SPREAD",
            ).remote(max(1, int(self.execution.cpus)))
            state.slots.append(_Slot(actor=actor))
        if len(state.slots) > state.most_workers:  # not a lost worker's replacement
            if state.most_workers:
                print(f"kvpolicies: the cluster grew: {len(state.slots)} workers", file=sys.stderr)
            state.most_workers = len(state.slots)

    # -- cells -------------------------------------------------------------------------------------------------

    def _dispatch(self, state: _State) -> None:
        """Give each idle worker a cell, of the model it holds when one is left."""
        for slot in state.slots:
            if slot.busy is not None or not state.queue:
                continue
            cell = next((c for c in state.queue if c.model == slot.model), state.queue[0])
            state.queue.remove(cell)
            state.first_started.setdefault(cell.key(), datetime.now(timezone.utc))
            slot.busy, slot.model = cell, cell.model
            state.running[slot.actor.evaluate.remote(cell.model_dump_json())] = slot

    def _collect(self, state: _State, ref: Any) -> Iterator[tuple[Cell, ResultRecord]]:
        slot = state.running.pop(ref)
        cell, slot.busy = slot.busy, None
        try:
            yield cell, ResultRecord.model_validate_json(ray.get(ref))
        except RayTaskError as error:  # the worker is alive but the call failed around evaluate(): record it
            yield cell, _failed(cell, f"{type(error.cause).__name__}: {error.cause}", state.first_started[cell.key()])
        except RayError as error:  # the worker died: replace it, and run its cell again (bounded)
            state.slots.remove(slot)
            ray.kill(slot.actor)
            state.lost_workers += 1
            tries = state.tries[cell.key()] = state.tries.get(cell.key(), 0) + 1
            reason = _summary(error)
            where = f"({cell.task.name}, {cell.title}, {cell.budget})"
            if tries <= self.execution.retries:
                print(f"kvpolicies: worker lost during cell {where}, running it again "
                      f"({tries}/{self.execution.retries}): {reason}", file=sys.stderr)
                state.queue.appendleft(cell)
            else:
                yield cell, _failed(cell, f"worker lost {tries} times ({type(error).__name__}): {reason}",
                                    state.first_started[cell.key()])


def _alive_nodes() -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node.get("Alive")]


def _summary(error: Exception) -> str:
    """Ray's message on a lost worker, cut to its first line (what happened) and its last (the cause, where a
    worker failed to start: a module missing on that node, say)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _failed(cell: Cell, error: str, started_at: datetime) -> ResultRecord:
    """The record of a cell that no worker finished (its worker died every time it was tried)."""
    from kvpolicies.experiments.sweep import versions

    return ResultRecord(key=cell.key(), cell=cell, identity=cell.identity(), versions=versions(),
                        started_at=started_at, finished_at=datetime.now(timezone.utc), status="error", error=error)

