"""Sweeps: every model × task × policy × budget cell through lm-eval, one result file per cell, resumable.

A cell's file name is a hash of what determines its result (model, task and its data parameters, policy and its
full config, budget, seed, code version), written atomically (temp file + rename), so a sweep killed at any moment
loses no finished cell and a re-run computes only what is missing. A failing cell is recorded with its error and
the sweep goes on; failed cells are retried on the next run.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import platform
import sys
import time
import tomllib
import traceback
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvpolicies.budget import Budget
from kvpolicies.memory import PeakMemory
from kvpolicies.policy import Policy
from kvpolicies.registry import get_policy, list_policies


class PolicySpec(BaseModel):
    """One policy of the grid: a registered name, its options, and the label shown in leaderboards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @property
    def title(self) -> str:
        return self.label or self.name


class TaskSpec(BaseModel):
    """One lm-eval task: its name, the data parameters passed as metadata, and how many samples to run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    limit: int | None = Field(None, ge=1)


def default_tasks() -> list[TaskSpec]:
    return [
        TaskSpec(name="kvp_passkey", metadata={"lengths": [2048], "per_cell": 2}),
        TaskSpec(name="kvp_niah", metadata={"lengths": [2048], "per_cell": 2}),
        TaskSpec(name="kvp_ppl", metadata={"lengths": [2048], "per_length": 2}),
    ]


class SweepConfig(BaseModel):
    """The grid. Policies and tasks accept plain names; ``full`` runs once, as the reference of every budget."""

    model_config = ConfigDict(extra="forbid")

    models: list[str | None] = Field(default_factory=lambda: [None], description="None = the embedded model")
    policies: list[PolicySpec] = Field(default_factory=list, description="empty = every registered policy")
    budgets: list[float | str] = Field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75])
    tasks: list[TaskSpec] = Field(default_factory=default_tasks)
    seed: int = 0
    batch_size: int = Field(1, ge=1)

    @field_validator("policies", "tasks", mode="before")
    @classmethod
    def _names_to_specs(cls, value):
        return [{"name": item} if isinstance(item, str) else item for item in value]

    @field_validator("budgets")
    @classmethod
    def _valid_budgets(cls, value):
        for budget in value:
            Budget.parse(budget)
        return value

    @classmethod
    def load(cls, path: Path) -> SweepConfig:
        """Read a YAML or TOML sweep file."""
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        return cls.model_validate(data or {})

    def resolved_policies(self) -> list[PolicySpec]:
        return self.policies or [PolicySpec(name=info.name) for info in list_policies()]


QUICK = SweepConfig(
    policies=["l2norm", "random", "streaming", "snapkv", "full"],
    budgets=[0.25, 0.5],
    tasks=[TaskSpec(name="kvp_passkey", metadata={"lengths": [2048], "per_cell": 2})],
)


class Cell(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str | None
    task: TaskSpec
    policy: PolicySpec
    budget: float | str
    seed: int
    batch_size: int

    def identity(self) -> dict[str, Any]:
        policy = get_policy(self.policy.name, **self.policy.options)
        return {
            "model": self.model or "smollm2-135m-instruct",
            "task": self.task.model_dump(),
            "policy": policy.identity(),
            "budget": Budget.parse(self.budget).model_dump() if policy.compresses else None,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "code_version": code_version(policy),
        }

    def key(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def cells(config: SweepConfig) -> list[Cell]:
    """The grid in a stable order; the full cache runs once per model and task, whatever the budgets."""
    grid = []
    for model in config.models:
        for task in config.tasks:
            for spec in config.resolved_policies():
                compresses = get_policy(spec.name, **spec.options).compresses
                for budget in config.budgets if compresses else [1.0]:
                    grid.append(Cell(model=model, task=task, policy=spec, budget=budget, seed=config.seed,
                                     batch_size=config.batch_size))
    return grid


PRESENTATION_ONLY = {"leaderboard.py", "analysis.py", "reports.py", "replication.py", "anchors.py", "bench.py"}
"""Core modules that render results or measure outside sweep cells (and the ``cli`` package): editing them changes
no sweep number."""


@functools.lru_cache(maxsize=1)
def _core_digest() -> str:
    import kvpolicies_evals

    import kvpolicies

    digest = hashlib.sha256()
    for package in (kvpolicies, kvpolicies_evals):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")) + sorted(root.rglob("*.yaml")):
            relative = path.relative_to(root)
            if package is kvpolicies and (path.name in PRESENTATION_ONLY or relative.parts[0] == "cli"):
                continue
            digest.update(relative.as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _policy_sources(policy: Policy) -> set[Path]:
    """Source files outside the core that define ``policy``: its classes' modules and those of wrapped scorers."""
    import kvpolicies

    core = Path(kvpolicies.__file__).parent
    sources = set()
    for cls in type(policy).__mro__:
        try:
            source = Path(inspect.getsourcefile(cls) or "")
        except TypeError:  # builtins such as object
            continue
        if source.is_file() and core not in source.parents:
            sources.add(source)
    inner = getattr(policy, "scorer", None)
    if isinstance(inner, Policy):
        sources |= _policy_sources(inner)
    return sources


def code_version(policy: Policy | None = None) -> str:
    """``VERSION+CORE/PLUGIN``: hashes of the sources that compute a result, the core and evals, then the plugin
    module(s) of ``policy``, so adding or editing one plugin leaves every other policy's finished cells valid."""
    from importlib.metadata import version

    core = f"{version('kvpolicies')}+{_core_digest()[:10]}"
    if policy is None:
        return core
    digest = hashlib.sha256()
    for source in sorted(_policy_sources(policy)):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return f"{core}/{digest.hexdigest()[:8]}"


def tasks_dir() -> Path:
    import kvpolicies_evals

    return Path(kvpolicies_evals.__file__).parent / "tasks"


@functools.lru_cache(maxsize=16)
def _task_manager(metadata_json: str):
    """Indexing lm-eval's task folders takes seconds: one manager per distinct task metadata per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir()), metadata=json.loads(metadata_json))


def run_cell(cell: Cell) -> dict[str, Any]:
    """Evaluate one cell with lm-eval and return its record (metrics, memory, speed, provenance)."""
    import lm_eval

    from kvpolicies.lm_eval import KVPoliciesLM

    started = time.perf_counter()
    lm = KVPoliciesLM(
        pretrained=cell.model, policy=cell.policy.name, budget=cell.budget, batch_size=cell.batch_size,
        **cell.policy.options,
    )
    with PeakMemory(lm.device) as peak:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[cell.task.name], limit=cell.task.limit, bootstrap_iters=0,
            task_manager=_task_manager(json.dumps(cell.task.metadata, sort_keys=True)),
            random_seed=cell.seed, numpy_random_seed=cell.seed, torch_random_seed=cell.seed,
            fewshot_random_seed=cell.seed,
        )
    task_results = results["results"][cell.task.name]
    metrics = {
        name: float(value) for name, value in task_results.items()
        if isinstance(value, (int, float)) and "stderr" not in name and name != "sample_len"
    }
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


def result_path(results_dir: Path, cell: Cell) -> Path:
    return results_dir / f"{cell.key()}.json"


def write_atomic(path: Path, record: dict[str, Any]) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(record, indent=1, default=str))
    os.replace(staging, path)  # a reader sees the old file or the whole new one, never half of it


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("kvpolicies", "torch", "transformers", "lm_eval")} | {
        "python": platform.python_version()
    }


def run_sweep(config: SweepConfig, results_dir: Path, progress: bool = True) -> Iterator[dict[str, Any]]:
    """Run every missing cell, yielding each record as it is written. Finished cells are skipped."""
    from tqdm import tqdm

    results_dir.mkdir(parents=True, exist_ok=True)
    grid = cells(config)
    todo = [cell for cell in grid if not _finished(result_path(results_dir, cell))]
    print(f"kvpolicies: {len(grid)} cells, {len(grid) - len(todo)} already done, {len(todo)} to run "
          f"-> {results_dir}", file=sys.stderr)
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), disable=not progress, unit="cell", file=sys.stderr)
    for cell in todo:
        bar.set_description(f"{cell.task.name} {cell.policy.title} @ {cell.budget}")
        record = {
            "key": cell.key(),
            "cell": cell.model_dump(),
            "identity": cell.identity(),
            "versions": versions(),
            "started_at": datetime.now(timezone.utc).isoformat(),
            "load_average_start": _load_average(),
        }
        try:
            record |= {"status": "ok", **run_cell(cell)}
        except Exception as error:  # one broken cell must not stop the sweep
            record |= {"status": "error", "error": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc()}
            print(f"kvpolicies: cell failed ({cell.task.name}, {cell.policy.title}, {cell.budget}): "
                  f"{record['error']}", file=sys.stderr)
        record["finished_at"] = datetime.now(timezone.utc).isoformat()
        record["load_average_end"] = _load_average()
        write_atomic(result_path(results_dir, cell), record)
        bar.update(1)
        yield record
    bar.close()


def _load_average() -> float | None:
    """The 1-minute load average, so a reader can tell timings taken on a busy machine (None where unsupported)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _finished(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False
