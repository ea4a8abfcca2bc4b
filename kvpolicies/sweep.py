"""Sweeps: every model × task × policy × budget cell through lm-eval, one result file per cell, resumable.

A cell's file name is a hash of what determines its result (model, task and its data parameters, policy and its
full config, budget, seed, code version), written atomically (temp file + rename), so a sweep killed at any moment
loses no finished cell and a re-run computes only what is missing. A failing cell is recorded with its error and
the sweep goes on; failed cells are retried on the next run, and so is any file that is not a valid record. The
results folder is checked for writing before the first cell is computed.
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
from typing import TYPE_CHECKING, Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvpolicies.budget import Budget
from kvpolicies.errors import UsageError, describe
from kvpolicies.memory import PeakMemory
from kvpolicies.models import EMBEDDED_MODEL
from kvpolicies.policy import Policy
from kvpolicies.registry import get_policy, list_policies

if TYPE_CHECKING:
    from kvpolicies.results import ResultRecord


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


def _budget(value: Any) -> Budget:
    """Budgets are parsed once, where they enter (``0.5``, ``"50%"``, ``"512 tokens"``, ``"64MiB"``, a dict)."""
    return Budget.parse(value)


def _as_list(value: Any) -> Any:
    """A single item where a list is expected is a one-item list (``policies = "l2norm"`` is not six letters)."""
    return [value] if isinstance(value, (str, int, float, dict)) else value


def reference_policy() -> PolicySpec | None:
    """The registered policy that keeps everything (``compresses`` is False): what every budget is read against."""
    return next((PolicySpec(name=info.name) for info in list_policies() if not info.policy_class.compresses), None)


class SweepConfig(BaseModel):
    """The grid. Policies and tasks accept plain names, and a single item where a list is expected; the reference
    (the full cache) is always part of it and runs once per model and task, as the reference of every budget."""

    model_config = ConfigDict(extra="forbid")

    models: list[str | None] = Field(default_factory=lambda: [None], description="None = the embedded model")
    policies: list[PolicySpec] = Field(default_factory=list, description="empty = every registered policy")
    budgets: list[Budget] = Field(default_factory=lambda: [Budget.parse(b) for b in (0.1, 0.25, 0.5, 0.75)])
    tasks: list[TaskSpec] = Field(default_factory=default_tasks)
    seed: int = 0
    batch_size: int = Field(1, ge=1)

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value):
        return _as_list(value)

    @field_validator("policies", "tasks", mode="before")
    @classmethod
    def _names_to_specs(cls, value):
        return [{"name": item} if isinstance(item, str) else item for item in _as_list(value)]

    @field_validator("budgets", mode="before")
    @classmethod
    def _parse_budgets(cls, value):
        return [_budget(item) for item in _as_list(value)]

    @classmethod
    def load(cls, path: Path) -> SweepConfig:
        """Read a YAML or TOML sweep file; any problem is a :class:`UsageError` naming the file."""
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        except UnicodeDecodeError:
            raise UsageError(f"cannot read sweep config {path}: not UTF-8 text") from None
        except OSError as error:
            raise UsageError(f"cannot read sweep config {path}: {(error.strerror or str(error)).lower()}") from None
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
            raise UsageError(f"cannot read sweep config {path}: {' '.join(str(error).split())}") from None
        if not isinstance(data, dict | None):
            raise UsageError(f"cannot read sweep config {path}: expected a mapping of models, policies, budgets and "
                             f"tasks, found a {type(data).__name__}")
        try:
            return cls.model_validate(data or {})
        except ValidationError as error:
            raise UsageError(f"invalid sweep config {path}: {describe(error)}") from None

    def resolved_policies(self) -> list[PolicySpec]:
        """The configured policies (default: every registered one), plus the reference if they lack it: without
        it no budget's score can be compared with keeping everything."""
        specs = self.policies or [PolicySpec(name=info.name) for info in list_policies()]
        if all(get_policy(spec.name, **spec.options).compresses for spec in specs):
            reference = reference_policy()
            specs = specs + [reference] if reference else specs
        return specs


QUICK = SweepConfig(
    policies=["l2norm", "random", "streaming", "snapkv", "full"],
    budgets=[0.25, 0.5],
    tasks=[TaskSpec(name="kvp_passkey", metadata={"lengths": [2048], "per_cell": 2})],
)


class Cell(BaseModel):
    """One model × task × policy × budget point of a grid."""

    model_config = ConfigDict(frozen=True)

    model: str | None
    task: TaskSpec
    policy: PolicySpec
    budget: Budget
    seed: int
    batch_size: int = 1

    @field_validator("budget", mode="before")
    @classmethod
    def _parse_budget(cls, value):
        return _budget(value)  # result files of earlier versions hold 0.5 or "50%"

    def identity(self) -> dict[str, Any]:
        """Everything that determines the cell's result; its hash is the key (the budget only for a policy that
        compresses, so the full cache is one cell whatever the budgets)."""
        policy = get_policy(self.policy.name, **self.policy.options)
        return {
            "model": self.model or EMBEDDED_MODEL,
            "task": self.task.model_dump(),
            "policy": policy.identity(),
            "budget": self.budget.model_dump() if policy.compresses else None,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "code_version": code_version(policy),
        }

    def key(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def cells(config: SweepConfig) -> list[Cell]:
    """The grid in a stable order, one cell per key (``0.5`` and ``50%`` are one cell); the full cache runs once
    per model and task, whatever the budgets."""
    grid: dict[str, Cell] = {}
    for model in config.models:
        for task in config.tasks:
            for spec in config.resolved_policies():
                compresses = get_policy(spec.name, **spec.options).compresses
                for budget in config.budgets if compresses else [Budget.parse(1.0)]:
                    cell = Cell(model=model, task=task, policy=spec, budget=budget, seed=config.seed,
                                batch_size=config.batch_size)
                    grid.setdefault(cell.key(), cell)
    return list(grid.values())


PRESENTATION_ONLY = {"leaderboard.py", "analysis.py", "reports.py", "replication.py", "anchors.py", "bench.py",
                     "results.py", "errors.py"}
"""Core modules that render, store or report results or measure outside sweep cells (and the ``cli`` package):
editing them changes no sweep number."""


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
    """Evaluate one cell with lm-eval and return the measured fields of its record (metrics, memory, speed)."""
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


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("kvpolicies", "torch", "transformers", "lm_eval")} | {
        "python": platform.python_version()
    }


def run_sweep(config: SweepConfig, results_dir: Path, progress: bool = True) -> Iterator[ResultRecord]:
    """Run every missing cell, yielding each record as it is written. Finished cells are skipped; a results folder
    that cannot be written raises :class:`~kvpolicies.results.ResultsError` before any cell runs."""
    from tqdm import tqdm

    from kvpolicies.results import ResultRecord, check_writable, write_record

    check_writable(results_dir)
    grid = cells(config)
    todo = [cell for cell in grid if not _finished(result_path(results_dir, cell))]
    print(f"kvpolicies: {len(grid)} cells, {len(grid) - len(todo)} already done, {len(todo)} to run "
          f"-> {results_dir}", file=sys.stderr)
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), disable=not progress, unit="cell", file=sys.stderr)
    for cell in todo:
        bar.set_description(f"{cell.task.name} {cell.policy.title} @ {cell.budget}")
        provenance = {"key": cell.key(), "cell": cell, "identity": cell.identity(), "versions": versions(),
                      "started_at": datetime.now(timezone.utc), "load_average_start": _load_average()}
        try:
            measured = run_cell(cell)
            record = ResultRecord(**provenance, status="ok", **measured, finished_at=datetime.now(timezone.utc),
                                  load_average_end=_load_average())
        except Exception as error:  # one broken cell must not stop the sweep
            record = ResultRecord(**provenance, status="error", error=f"{type(error).__name__}: {error}",
                                  traceback=traceback.format_exc(), finished_at=datetime.now(timezone.utc),
                                  load_average_end=_load_average())
            print(f"kvpolicies: cell failed ({cell.task.name}, {cell.policy.title}, {cell.budget}): "
                  f"{record.error}", file=sys.stderr)
        write_record(result_path(results_dir, cell), record)
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
    """Whether ``path`` holds a valid ``ok`` record; anything else (missing, damaged, failed) is computed again."""
    from kvpolicies.results import read_record

    try:
        return read_record(path).status == "ok"
    except (OSError, ValueError):
        return False
