"""The cell runner: one sweep cell through lm-eval on the kvpolicies model, into its record.

Why a module of its own: a cell's code version hashes exactly what this module can import (transitively, see
:mod:`kvpolicies.experiments.code_version`), so it holds what computes a result and nothing that only drives a
sweep (claims, progress, checks of a grid's inputs): editing those keeps every finished cell.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import platform
import socket
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from kvpolicies.experiments.grid import Cell
from kvpolicies.experiments.outcomes import outcomes, stderrs

if TYPE_CHECKING:
    from kvpolicies.experiments.results import ResultRecord


def tasks_dir() -> Path:
    import kvpolicies_evals

    return Path(kvpolicies_evals.__file__).parent / "tasks"


@functools.lru_cache(maxsize=16)
def _task_manager(metadata_json: str):
    """Indexing lm-eval's task folders takes seconds: one manager per distinct task metadata per process."""
    from lm_eval.tasks import TaskManager

    return BuiltOnce(TaskManager(include_path=str(tasks_dir()), metadata=json.loads(metadata_json)))


def _manager_of(cell: Cell):
    # Tasks that size their samples in tokens (RULER) need the model's tokenizer: lm-eval's own command passes the
    # model args as metadata, a TaskManager of ours must say it.
    return _task_manager(json.dumps({"pretrained": cell.model, **cell.task.metadata}, sort_keys=True))


class BuiltOnce:
    """A TaskManager that builds the tasks of the last list asked for once, and hands each caller a fresh copy.

    Why: building a task makes its samples (RULER generates 500 per length, seconds on 2 cores), the same for every
    cell of a task. A copy per call, since an evaluation stores its requests and answers in the task. Tasks may draw
    their samples from the global random generators, which ``simple_evaluate`` seeds just before it loads them: the
    generators' states after the build are kept and set again with every copy, so whatever runs next draws what it
    would have drawn after a build of its own."""

    def __init__(self, manager) -> None:
        self._manager = manager
        self._built: tuple[str, Any, tuple] | None = None

    def __getattr__(self, name: str) -> Any:  # everything else is the manager's
        if name == "_manager":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._manager, name)

    def load(self, task_list) -> Any:
        # The generators' states at the call are part of the key: a task built after another seed is another task.
        key = repr(task_list) + _fingerprint(_generator_states())
        if self._built is None or self._built[0] != key:
            self._built = None  # the last list only: a grid runs task by task
            loaded = self._manager.load(task_list)
            self._built = (key, loaded, _generator_states())
            try:
                return copy.deepcopy(loaded)
            except Exception:  # a task holding what cannot be copied (a lock, an open file): built each time
                self._built = None
                return loaded
        _, loaded, states = self._built
        _set_generator_states(states)
        return copy.deepcopy(loaded)


def _generator_states() -> tuple:
    import random

    import numpy

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), numpy.random.get_state(), torch.get_rng_state(), cuda


def _fingerprint(states: tuple) -> str:
    import hashlib
    import pickle

    python, numpy_state, torch_state, cuda = states
    digest = hashlib.sha256(pickle.dumps((python, numpy_state)))
    digest.update(torch_state.numpy().tobytes())
    for state in cuda or []:
        digest.update(state.numpy().tobytes())
    return digest.hexdigest()


def _set_generator_states(states: tuple) -> None:
    import random

    import numpy

    python, numpy_state, torch_state, cuda = states
    random.setstate(python)
    numpy.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@functools.lru_cache(maxsize=1)
def _environment_described_once() -> None:
    """lm-eval describes the environment in every result it returns (``pip list`` and the like in subprocesses:
    half a second a cell on 2 cores, more than a shared cell's decoding); nothing of it changes within a process,
    so it is computed for the first cell and copied for the others."""
    import lm_eval.evaluator

    describe, first = lm_eval.evaluator.add_env_info, {}

    def add_env_info(storage: dict[str, Any]) -> None:
        if not first:
            describe(first)
        storage.update(copy.deepcopy(first))

    lm_eval.evaluator.add_env_info = add_env_info


_loaded: dict[tuple[str | None, Any], tuple[Any, Any]] = {}
"""The model (and tokenizer) of the last cell, by model name and loading options: the next cell of the same model,
loaded the same way, reuses it."""


def cell_model(cell: Cell):
    """The lm-eval model of ``cell``. Weights are loaded once per model, not once per cell (an 8B model takes
    minutes to load on a GPU node); a grid runs model by model, so only the current model is kept in memory. The
    first load is lm-eval's own, so results are those of a fresh process (a resumed sweep checks this)."""
    from kvpolicies.errors import CalibrationError, KVPoliciesError, ModelLoadError, ModelUnavailable
    from kvpolicies.integrations.lm_eval import KVPoliciesLM
    from kvpolicies.integrations.models import load_failure
    from kvpolicies.registry import get_policy

    options = dict(policy=cell.policy.name, budget=cell.budget, codec=cell.policy.codec, batch_size=cell.batch_size,
                   protocol=cell.protocol.value, prefill_chunk=cell.prefill_chunk,
                   # the policy's options by name: none is mistaken for a model arg
                   **{f"policy.{name}": value for name, value in cell.policy.options.items()})
    loaded = (cell.model, cell.loading)
    if loaded in _loaded:
        model, tokenizer = _loaded[loaded]
        return KVPoliciesLM(pretrained=model, tokenizer=tokenizer, **options)
    _loaded.clear()
    get_policy(cell.policy.name, **cell.policy.options)  # the policy's own errors fail its cell, never the sweep
    try:
        lm = KVPoliciesLM(pretrained=cell.model, **cell.loading.given(), **options)
    except CalibrationError as error:  # the model loaded and the policy failed on it: its cell fails, not the sweep
        _loaded[loaded] = (error.model, error.tokenizer)
        raise
    except ModelLoadError as error:  # a bad path, an architecture refused: no cell of this model can run
        raise ModelUnavailable(str(error)) from None
    except KVPoliciesError:  # an option of ours, named already
        raise
    except Exception as error:  # not found, unreachable, a kernel not installed, out of memory: load fails alike
        raise load_failure(cell.model, error) from None
    _loaded[loaded] = (lm.model, lm.tokenizer)
    return lm


def run_cell(cell: Cell, lm=None) -> dict[str, Any]:
    """Evaluate one cell with lm-eval and return the measured fields of its record (metrics, memory, speed); ``lm``:
    the cell's lm-eval model if built already (a cell of a group that shares its prefills)."""
    import lm_eval

    lm = lm or cell_model(cell)
    _environment_described_once()
    started = time.perf_counter()  # the evaluation, not the one cell that happened to load the weights
    # Memory is measured request by request inside the model (KVPoliciesLM.request_memory): the cell's own peak,
    # above what the process held at each request's start, whatever ran before it (task set-up, other cells).
    results = lm_eval.simple_evaluate(
        # No bootstrap in lm-eval (a process pool for some metrics): each sample's outcome is kept instead, and
        # the pages compute intervals and paired tests from them (kvpolicies.reports.statistics).
        model=lm, tasks=[cell.task.name], limit=cell.task.limit, bootstrap_iters=0, log_samples=True,
        task_manager=_manager_of(cell),
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
    samples = results.get("samples", {}).get(cell.task.name, [])
    return {
        "metrics": metrics,
        "primary_metric": primary,
        "score": metrics[primary],
        "higher_is_better": bool(higher_is_better),
        "samples": int(task_results.get("sample_len", 0)),
        "outcomes": outcomes(samples, primary, metrics[primary]),
        "stderr": stderrs(samples, metrics),
        "kv_memory": info["kv_memory"],
        "speed": info["speed"],
        "peak_memory_bytes": info["request_memory"]["peak_bytes"],
        "peak_memory_growth_bytes": info["request_memory"]["growth_bytes"],
        "shared_capture_bytes": info["request_memory"]["shared_capture_bytes"] or None,
        "decoded_together_bytes": info["request_memory"]["decoded_together_bytes"] or None,
        "wall_s": time.perf_counter() - started,
        "device": str(lm.device) + (f" ({torch.cuda.get_device_name(lm.device)})" if lm.device.type == "cuda" else ""),
        "loading": loaded_as(lm.model, cell),
    }


def loaded_as(model, cell: Cell) -> dict[str, Any]:
    """How the cell's model was really loaded, the defaults resolved where it ran: its dtype, attention, placement
    (one device, or the devices accelerate spread it over) and revision."""
    return {
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation.removeprefix("kvpolicies-"),  # ours wraps it
        "device_map": cell.loading.device_map,
        "devices": sorted({str(parameter.device) for parameter in model.parameters()}),
        "revision": cell.loading.revision,
        "commit": getattr(model.config, "_commit_hash", None),  # the hub commit the weights came from, if any
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("kvpolicies", "torch", "transformers", "lm_eval")} | {
        "python": platform.python_version()
    }


def evaluate_group(cells: list[Cell], together: bool = True) -> Iterator[ResultRecord]:
    """The records of ``cells`` (one :meth:`~kvpolicies.experiments.grid.Cell.share_key`), in order, each as soon as
    it is finished: every prompt is prefilled once for all of them (:mod:`kvpolicies.integrations.shared`), and
    their answers decoded as one batch (``together``) or one cell after another, each record then being the one
    the cell writes alone. A cell whose model cannot be built (its policy's options) fails alone, as alone."""
    from kvpolicies.errors import ModelUnavailable
    from kvpolicies.integrations.shared import SharedPrefill

    models: dict[int, Any] = {}
    for index, cell in enumerate(cells):
        try:
            models[index] = cell_model(cell)
        except ModelUnavailable:
            raise
        except Exception:  # evaluate() builds it again, and records why it fails
            pass
    shared = SharedPrefill(list(models.values()), together=together) if len(models) > 1 else None
    for index, cell in enumerate(cells):
        yield evaluate(cell, models.get(index))
        if shared is not None and index in models:
            shared.leave(models[index])  # done: nothing more computed for it, nothing kept for it


def evaluate(cell: Cell, lm=None) -> ResultRecord:
    """The record of ``cell``, computed here: ``ok`` with its measurements, or ``error`` with what it raised (one
    broken cell must not stop a sweep). A model that cannot be loaded raises its ModelUnavailable instead: that is
    no cell's result, and every other cell of the model would fail the same way (a policy that cannot run on the
    model fails its own cells only). The key is computed here too, from this machine's code, so a driver can tell
    a worker that runs other code than its own."""
    from kvpolicies.errors import ModelUnavailable
    from kvpolicies.experiments.results import ResultRecord

    provenance = {"key": cell.key(), "cell": cell, "identity": cell.identity(), "versions": versions(),
                  "started_at": datetime.now(timezone.utc), "load_average_start": _load_average(),
                  "worker": {"host": socket.gethostname(), "pid": os.getpid()}, "cpu_count": os.cpu_count()}
    try:
        measured = run_cell(cell, lm)
        return ResultRecord(**provenance, status="ok", **measured, finished_at=datetime.now(timezone.utc),
                            load_average_end=_load_average())
    except ModelUnavailable:  # every cell of the model would fail alike: the sweep stops, with no record of it
        raise
    except Exception as error:
        return ResultRecord(**provenance, status="error", error=f"{type(error).__name__}: {error}",
                            traceback=traceback.format_exc(), finished_at=datetime.now(timezone.utc),
                            load_average_end=_load_average())


def _load_average() -> float | None:
    """The 1-minute load average, so a reader can tell timings taken on a busy machine (None where unsupported)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
