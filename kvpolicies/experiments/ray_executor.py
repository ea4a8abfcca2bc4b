"""Sweep cells on a Ray cluster (``kvpolicies sweep --executor ray``): one worker per slot, the driver writes.

Why actors and not Ray tasks: a worker keeps the model of its last cell loaded, and the driver hands it the cells of
that model first; Ray runs a task that asks for GPUs in a fresh process each time, which would load an 8B model
per cell. Why the driver writes every file: nodes need not share a folder, a file is written by one process only,
and the results folder works exactly as for a local sweep (atomic files, resumable). Why the driver retries: a
worker that dies (killed, out of memory, its node lost) loses only the cells it held unfinished, which go back to
the queue up to ``max_retries`` times before they are recorded as failed; a cell that raises is recorded at once,
as locally.

A worker is handed a group of cells that share each prompt's prefill
(:func:`~kvpolicies.experiments.runner.evaluate_group`) and streams back each record as its cell finishes (a Ray
streaming generator), so the driver writes it at once. Where fewer groups wait than there are workers, the largest
is split: its cells give the same records apart, and idle workers would share nothing.

The number of workers follows the cluster: each node holds as many as its CPUs and GPUs fit at the requested
resources per cell, counted again every few seconds, so a node that joins late gets workers and cells. A worker is
given a cell only once it has started, so a worker Ray cannot place (its resources held by another job) holds no
cell back, and one that cannot start (kvpolicies missing on its node) costs no cell a retry.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from kvpolicies.errors import ModelUnavailable, UsageError
from kvpolicies.experiments.execution import Execution
from kvpolicies.experiments.grid import Cell
from kvpolicies.experiments.results import ResultRecord
from kvpolicies.registry import PLUGINS_ENV

TICK_S = 2.0
"""How long the driver waits for a cell before it looks for new nodes and refreshes the progress line."""
START_FAILURES = 5
"""Workers that fail to start, in a row, before the sweep stops: none of the cluster's nodes can run a cell."""
PROBE_S = 5.0
"""How long a HOST:PORT address may take to accept a connection before the cluster counts as unreachable: Ray itself
retries for minutes on an address where nothing listens."""


class SweepWorker:
    """One Ray worker: computes cells with :func:`kvpolicies.experiments.runner.evaluate`, keeping the last model
    loaded between them."""

    def __init__(self, threads: int) -> None:
        import torch

        if not ray.get_runtime_context().get_accelerator_ids()["GPU"]:
            # Ray leaves CUDA_VISIBLE_DEVICES alone for a worker that reserved no GPU: without this, every CPU
            # worker of a GPU node would load its model onto cuda:0 (torch reads the variable at its first CUDA call).
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        torch.set_num_threads(threads)  # the CPUs Ray reserved for this worker, not every core of the node

    def node(self) -> str:
        """The node this worker runs on; answering at all says it has started."""
        return ray.get_runtime_context().get_node_id()

    def evaluate(self, cells_json: list[str], together: bool = True) -> Iterator[str]:
        """The record of each cell of the group, in order, as each finishes (called as a streaming generator);
        ``together``: its requests' answers decoded as one batch."""
        from kvpolicies.experiments.runner import evaluate, evaluate_group
        from kvpolicies.integrations.lm_eval_logging import quiet_lm_eval

        quiet_lm_eval()
        group = [Cell.model_validate_json(text) for text in cells_json]
        context = ray.get_runtime_context()
        gpu_ids = [str(i) for i in context.get_accelerator_ids()["GPU"]]
        for record in evaluate_group(group, together) if len(group) > 1 else [evaluate(group[0])]:
            place = record.worker.model_copy(update={"node_id": context.get_node_id(), "gpu_ids": gpu_ids})
            yield record.model_copy(update={"worker": place}).model_dump_json()


_RemoteWorker = ray.remote(SweepWorker)
NOTHING_LOADED = "<no model loaded>"


@dataclass
class _Slot:
    actor: Any
    started: bool = False
    model: str | None = NOTHING_LOADED
    """The model the worker loaded last (its next cells are of that model when there are any); None is the embedded
    model."""
    busy: list[Cell] | None = None
    """The cells of its group not finished yet, in the order their records come."""


@dataclass
class _State:
    todo: Iterator[list[Cell]]
    """The groups not taken yet: taking one claims its cells, so the driver takes them only as workers need them."""
    queue: deque[list[Cell]] = field(default_factory=deque)
    """Taken groups waiting for a worker: a few taken ahead (so a worker can be given its model's next group), the
    halves of split groups and the unfinished cells of lost workers, run again."""
    taken_all: bool = False
    slots: list[_Slot] = field(default_factory=list)
    starting: dict[Any, _Slot] = field(default_factory=dict)
    running: dict[Any, _Slot] = field(default_factory=dict)
    tries: dict[str, int] = field(default_factory=dict)
    first_started: dict[str, datetime] = field(default_factory=dict)
    lost_workers: int = 0
    start_failures: int = 0
    most_workers: int = 0


class RayExecutor:
    """Runs cells on Ray workers of ``execution.cpus``/``execution.gpus`` each, as many as the cluster fits; a
    worker's group decodes each request's answers as one batch (``decode_together``), or one cell after another."""

    def __init__(self, execution: Execution, decode_together: bool = True) -> None:
        self.execution = execution
        self.decode_together = decode_together

    def run(self, todo: Iterable[list[Cell]], show: Callable[[str], None]) -> Iterator[tuple[Cell, ResultRecord]]:
        state = _State(todo=iter(todo))
        self._take(state, 1)
        if not state.queue:  # nothing to run: no cluster to start
            return
        started_here = self._connect()
        shown = ""
        try:
            self._grow(state, first=True)
            while state.queue or state.running or not state.taken_all:
                self._dispatch(state)
                waiting = list(state.running) + list(state.starting)
                if (line := self._status(state)) != shown:
                    show(shown := line)
                if not waiting:  # every node that fitted a cell has left: wait for one to (re)join
                    time.sleep(TICK_S)
                else:
                    done, _ = ray.wait(waiting, num_returns=1, timeout=TICK_S)
                    for ref in done:
                        if ref in state.starting:
                            self._started(state, ref)
                        else:
                            yield from self._collect(state, ref)
                self._grow(state)
        finally:
            for slot in state.slots:
                try:
                    ray.kill(slot.actor)
                except Exception:  # the cluster is gone already: nothing left to stop
                    pass
            if started_here:
                ray.shutdown()

    @staticmethod
    def _status(state: _State) -> str:
        if not state.slots:
            return f"waiting for a node that fits a cell ({len(state.queue)} queued)"
        starting = sum(not slot.started for slot in state.slots)
        cells = sum(len(slot.busy) for slot in state.running.values() if slot.busy)
        parts = [f"{cells} cells running on {len(state.slots) - starting} workers"]
        parts += [f"{starting} starting"] if starting else []
        parts += [f"{state.lost_workers} lost"] if state.lost_workers else []
        return ", ".join(parts)

    # -- the cluster -------------------------------------------------------------------------------------------

    def _connect(self) -> bool:
        """Join the cluster at ``address``, or start one on this machine; True if this process started it."""
        if ray.is_initialized():  # a caller (a test, a notebook) already joined a cluster: use it
            return False
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": "WARNING"}
        if PLUGINS_ENV in os.environ:  # the workers must know the same policies as the driver
            options["runtime_env"] = {"env_vars": {PLUGINS_ENV: os.environ[PLUGINS_ENV]}}
        address = self.execution.address
        if address is None:  # "local": a new instance, never a cluster that RAY_ADDRESS or `ray start` left around
            options["include_dashboard"] = False
        else:
            probe(address)
        try:
            ray.init(address=address or "local", **options)
        except Exception as error:  # Ray's errors for an address it cannot reach vary with the address and version
            reason = " ".join(str(error).split()) or type(error).__name__
            if address is None:
                raise UsageError(f"cannot start Ray on this machine: {reason}; see Ray's logs under /tmp/ray, or "
                                 "start a cluster with `ray start --head` and pass --address auto") from None
            raise UsageError(f"cannot join the Ray cluster at {address}: {reason}; start one with `ray start "
                             "--head`, or leave --address out to start one on this machine") from None
        resources = ray.cluster_resources()
        print(f"kvpolicies: Ray cluster with {len(_alive_nodes())} node(s), {resources.get('CPU', 0):g} CPUs, "
              f"{resources.get('GPU', 0):g} GPUs; {self.execution.cpus:g} CPU(s) and {self.execution.gpus:g} GPU(s) "
              "per cell", file=sys.stderr)
        return address is None

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
        """Start workers while the cluster holds more than there are and cells wait for one; stop workers that have
        not started when the cluster no longer holds them (their node left)."""
        capacity = self._capacity()
        if first and capacity == 0:
            resources = ray.cluster_resources()
            raise UsageError(
                f"no node of the Ray cluster fits one cell at {self.execution.cpus:g} CPU(s) and "
                f"{self.execution.gpus:g} GPU(s) (the cluster has {resources.get('CPU', 0):g} CPUs and "
                f"{resources.get('GPU', 0):g} GPUs); lower --cpus-per-cell / --gpus-per-cell or add a node")
        for slot in [slot for slot in state.slots if not slot.started][:max(0, len(state.slots) - capacity)]:
            self._drop(state, slot)
        self._take(state, capacity - len(state.running))  # as many as the cluster runs at once, no more: a 1-cell
        queued = sum(len(group) for group in state.queue)  # sweep reserves one worker, not every GPU
        wanted = min(capacity, queued + len(state.running))
        while len(state.slots) < wanted:
            actor = _RemoteWorker.options(
                num_cpus=self.execution.cpus, num_gpus=self.execution.gpus, scheduling_strategy="SPREAD",
            ).remote(max(1, int(self.execution.cpus)))
            slot = _Slot(actor=actor)
            state.slots.append(slot)
            state.starting[actor.node.remote()] = slot
        if len(state.slots) > state.most_workers:  # not a lost worker's replacement
            if state.most_workers:
                print(f"kvpolicies: the cluster grew: {len(state.slots)} workers", file=sys.stderr)
            state.most_workers = len(state.slots)

    def _started(self, state: _State, ref: Any) -> None:
        slot = state.starting.pop(ref)
        try:
            ray.get(ref)
        except RayError as error:  # it never ran a cell: no cell is charged, but a cluster where none starts stops
            self._drop(state, slot)
            state.start_failures += 1
            print(f"kvpolicies: a Ray worker failed to start: {_summary(error)}", file=sys.stderr)
            if state.start_failures >= START_FAILURES:
                raise UsageError(f"{START_FAILURES} Ray workers in a row failed to start, the last with: "
                                 f"{_summary(error)}; install the same kvpolicies on every node") from None
            return
        slot.started = True
        state.start_failures = 0

    def _drop(self, state: _State, slot: _Slot) -> None:
        state.slots.remove(slot)
        for refs in (state.starting, state.running):
            for ref in [ref for ref, held in refs.items() if held is slot]:
                del refs[ref]
        try:
            ray.kill(slot.actor)
        except Exception:  # already gone
            pass

    # -- cells -------------------------------------------------------------------------------------------------

    @staticmethod
    def _take(state: _State, wanted: int) -> None:
        """Take groups until ``wanted`` wait in the queue, or none is left. Why not all at the start: each taken cell
        holds a claim (an open file), so a grid of thousands of cells would hold thousands of files, and keep
        another sweep on the same folder from sharing the work."""
        while len(state.queue) < wanted and not state.taken_all:
            group = next(state.todo, None)
            if group is None:
                state.taken_all = True
            else:
                state.queue.append(group)

    @staticmethod
    def _spread(state: _State) -> None:
        """Split the largest queued group in two while fewer groups wait than workers are free or starting."""
        free = sum(slot.busy is None for slot in state.slots)
        while len(state.queue) < free:
            largest = max(state.queue, key=len, default=[])
            if len(largest) < 2:
                return
            at = state.queue.index(largest)
            half = (len(largest) + 1) // 2
            state.queue[at] = largest[:half]
            state.queue.insert(at + 1, largest[half:])

    def _dispatch(self, state: _State) -> None:
        """Give each idle started worker a group, of the model it holds when one is queued."""
        idle = [slot for slot in state.slots if slot.started and slot.busy is None]
        if idle:  # a few ahead, so that a worker most often gets the next group of the model it holds
            self._take(state, len(idle) + len(state.slots))
        self._spread(state)
        for slot in idle:
            if not state.queue:
                break
            group = next((g for g in state.queue if g[0].model == slot.model), state.queue[0])
            state.queue.remove(group)
            now = datetime.now(timezone.utc)
            for cell in group:
                state.first_started.setdefault(cell.key(), now)
            slot.busy, slot.model = list(group), group[0].model
            call = slot.actor.evaluate.options(num_returns="streaming")
            state.running[call.remote([cell.model_dump_json() for cell in group], self.decode_together)] = slot

    def _collect(self, state: _State, stream: Any) -> Iterator[tuple[Cell, ResultRecord]]:
        """The next record of a worker's group, or the group's end; a worker lost or a call that failed ends it."""
        slot = state.running[stream]
        try:
            text = ray.get(next(stream))
        except StopIteration:  # every record of the group came
            del state.running[stream]
            slot.busy = None
            return
        except RayTaskError as error:  # the worker is alive but the call failed around evaluate(): record it
            if isinstance(error.cause, ModelUnavailable):  # no cell of that model can run: the sweep stops
                raise ModelUnavailable(f"{error.cause} (on a Ray worker)") from None
            del state.running[stream]
            unfinished, slot.busy = slot.busy or [], None
            for cell in unfinished:  # the call has ended: none of them will come
                yield cell, _failed(cell, f"{type(error.cause).__name__}: {error.cause}",
                                    state.first_started[cell.key()])
            return
        except RayError as error:  # the worker died: replace it, and run its unfinished cells again (bounded)
            unfinished = slot.busy or []
            self._drop(state, slot)
            state.lost_workers += 1
            reason = _summary(error)
            again = []
            for cell in unfinished:
                tries = state.tries[cell.key()] = state.tries.get(cell.key(), 0) + 1
                if tries <= self.execution.retries:
                    print(f"kvpolicies: worker lost during cell ({cell.task.name}, {cell.title}, {cell.budget}), "
                          f"running it again ({tries}/{self.execution.retries}): {reason}", file=sys.stderr)
                    again.append(cell)
                else:
                    yield cell, _failed(cell, f"worker lost {tries} times ({type(error).__name__}): {reason}",
                                        state.first_started[cell.key()])
            if again:
                state.queue.appendleft(again)
            return
        cell = slot.busy.pop(0) if slot.busy else None
        if cell is None:  # more records than cells: not this code's worker
            raise UsageError("a Ray worker returned more records than it was given cells; install the same "
                             "kvpolicies on every node")
        try:
            yield cell, ResultRecord.model_validate_json(text)
        except ValueError as error:  # a worker whose kvpolicies writes other records
            yield cell, _failed(cell, f"the worker's record does not validate here ({' '.join(str(error).split())}"
                                      "); install the same kvpolicies on every node", state.first_started[cell.key()])


def probe(address: str, timeout_s: float = PROBE_S) -> None:
    """A UsageError unless something accepts a TCP connection at ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``)
    within ``timeout_s``; other forms (``auto``) are left to Ray, which answers them at once."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit()):
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else (error.strerror or str(error)).lower()
        raise UsageError(f"cannot join the Ray cluster at {address}: nothing accepted a connection there within "
                         f"{timeout_s:g} s ({reason}); start one with `ray start --head --port {port}` on {host}, "
                         "or leave --address out to start one on this machine") from None


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
    from kvpolicies.experiments.runner import versions

    return ResultRecord(key=cell.key(), cell=cell, identity=cell.identity(), versions=versions(),
                        started_at=started_at, finished_at=datetime.now(timezone.utc), status="error", error=error)
