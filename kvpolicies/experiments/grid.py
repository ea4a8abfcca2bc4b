"""The grid of a sweep: which models, tasks, policies and budgets, read and validated once, and its cells.

A cell (model × task × policy × budget) is named by a hash of everything that determines its result, code version
included, so a results folder never mixes a stale cell with a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from kvpolicies.engine.budget import Budget
from kvpolicies.engine.policy import Role
from kvpolicies.errors import UsageError, describe
from kvpolicies.experiments.code_version import code_version
from kvpolicies.experiments.execution import Execution
from kvpolicies.integrations.loading import Loading
from kvpolicies.integrations.models import EMBEDDED_MODEL
from kvpolicies.integrations.protocol import Protocol
from kvpolicies.registry import get_policy, list_policies, policy_with_role


class PolicySpec(BaseModel):
    """One policy of the grid: a registered name, its options, the storage codec of what it keeps, and the label
    shown in leaderboards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    codec: str = "full"
    """How the kept entries are stored (:mod:`kvpolicies.engine.codecs`): the budget in bytes buys entries at the
    codec's price."""
    label: str | None = None
    protocols: list[Protocol] | None = Field(None, min_length=1)
    """The protocols this policy runs under, instead of the grid's: kvpress runs the query-aware protocol only for
    the presses that read the question, and so can a grid. A policy that keeps everything has one cell whatever
    the protocols."""

    @property
    def title(self) -> str:
        """The label (or the name), with the codec when it is not full precision: ``snapkv + int4``. A label never
        hides the codec: a preset's labels would otherwise show int4 results under full-precision names."""
        shown = self.label or self.name
        return shown if self.codec == "full" else f"{shown} + {self.codec}"

    @field_validator("protocols", mode="before")
    @classmethod
    def _protocols(cls, value: Any) -> list[Protocol] | None:
        return None if value is None else [Protocol.parse(item) for item in _as_list(value)]


class TaskSpec(BaseModel):
    """One lm-eval task: its name, the data parameters passed as metadata, and how many samples to run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    limit: StrictInt | None = Field(None, ge=1)


def _shown(spec: PolicySpec) -> str:
    """A policy spec as a grid file would write it: ``{name: snapkv, label: fast}``."""
    fields = spec.model_dump(exclude_defaults=True, include={"name", "options", "codec", "label"})
    return "{" + ", ".join(f"{key}: {value}" for key, value in fields.items()) + "}"


def default_tasks() -> list[TaskSpec]:
    return [
        TaskSpec(name="kvp_passkey", metadata={"lengths": [2048], "per_cell": 2}),
        TaskSpec(name="kvp_niah", metadata={"lengths": [2048], "per_cell": 2}),
        TaskSpec(name="kvp_ppl", metadata={"lengths": [2048], "per_length": 2}),
    ]


def _as_list(value: Any) -> list:
    """A single item where a list is expected is a one-item list (``policies = "l2norm"`` is not six letters)."""
    if value is None:
        raise ValueError("is empty; list at least one item, or leave the key out for the default")
    return list(value) if isinstance(value, (list, tuple)) else [value]


def reference_policy() -> PolicySpec | None:
    """The registered policy that keeps everything (:attr:`Role.REFERENCE`): what every budget is read against."""
    name = policy_with_role(Role.REFERENCE)
    return None if name is None else PolicySpec(name=name)


class SweepConfig(BaseModel):
    """The grid. Policies and tasks accept plain names, and a single item where a list is expected; the reference
    (the full cache) is always part of it and runs once per model and task, as the reference of every budget."""

    model_config = ConfigDict(extra="forbid")

    models: list[str | None] = Field(default_factory=lambda: [None], description="None = the embedded model")
    policies: list[PolicySpec] = Field(default_factory=list, description="empty = every registered policy")
    budgets: list[Budget] = Field(default_factory=lambda: [Budget.parse(b) for b in (0.1, 0.25, 0.5, 0.75)])
    tasks: list[TaskSpec] = Field(default_factory=default_tasks)
    reference_tasks: list[TaskSpec] = Field(
        default_factory=list, description="tasks the full cache alone runs on: what the model can do on tasks "
        "where no policy is run (a small model that scores nothing on a task leaves nothing to compress)")
    seed: StrictInt = 0
    batch_size: StrictInt = Field(1, ge=1)
    """Strict whole numbers, as ``limit``: ``seed: true`` is a mistake, not seed 1."""
    protocols: list[Protocol] = Field(default_factory=lambda: [Protocol.QUERY_AWARE],
                                      description="query_aware and/or query_agnostic (kvpolicies.integrations.protocol)")
    execution: Execution = Field(default_factory=Execution, description="where cells run (local or Ray); never "
                                 "part of a cell's key")
    loading: Loading = Field(default_factory=Loading, description="how every model of the grid is loaded: dtype "
                             "and revision are part of each cell's key, the rest recorded with its result")
    prefill_chunk: StrictInt | None = Field(None, ge=2, description="prefill generation prompts this many tokens "
                                            "at a time, evicting between chunks (memory follows the budget, and "
                                            "results may change: part of each cell's key)")

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value):
        return _as_list(value)

    @field_validator("protocols", mode="before")
    @classmethod
    def _protocols(cls, value):
        return [Protocol.parse(item) for item in _as_list(value)]

    @field_validator("policies", "tasks", "reference_tasks", mode="before")
    @classmethod
    def _names_to_specs(cls, value):
        return [{"name": item} if isinstance(item, str) else item for item in _as_list(value)]

    @field_validator("execution", mode="before")
    @classmethod
    def _executor_name(cls, value):
        return {"executor": value} if isinstance(value, str) else value  # `execution: ray` is the Ray defaults

    @model_validator(mode="before")
    @classmethod
    def _compression_ratios(cls, data):
        """``compression_ratios: [0.25, 0.5]``, kvpress's way to write budgets (the fraction removed), becomes the
        budgets they mean (0.75, 0.5): a cell is the same cell however its budget was written."""
        if not isinstance(data, dict) or data.get("compression_ratios") is None:
            return data
        if data.get("budgets") is not None:
            raise ValueError("give budgets (the kept fraction) or compression_ratios (kvpress's: the fraction "
                             "removed), not both")
        ratios = data["compression_ratios"]
        rest = {name: value for name, value in data.items() if name != "compression_ratios"}
        return rest | {"budgets": [Budget.from_compression_ratio(ratio) for ratio in _as_list(ratios)]}

    @field_validator("budgets", mode="before")
    @classmethod
    def _parse_budgets(cls, value):
        return [Budget.parse(item) for item in _as_list(value)]  # parsed once, where budgets enter

    @model_validator(mode="after")
    def _one_spec_per_task(self) -> SweepConfig:
        """A reference task named like a grid task must be that task: two specs of one name would be two full-cache
        cells, and pages (which know tasks by name) would show whichever finished last."""
        grid = {task.name: task for task in self.tasks}
        for task in self.reference_tasks:
            if task.name in grid and task != grid[task.name]:
                raise ValueError(f"reference task {task.name} differs from the grid's task of that name (limit or "
                                 "metadata); give it once, or give both the same limit and metadata")
        return self

    @model_validator(mode="after")
    def _one_title_per_policy(self) -> SweepConfig:
        """Two different policies (name and options) under one title (label or name) are one line to a reader:
        pages keep them apart only under generated names. The reference, added to every grid that lacks it, holds
        its name (looked up only when a label could take it: the registry loads every plugin)."""
        reference = reference_policy() if any(spec.label for spec in self.policies) else None
        holders: dict[str, PolicySpec] = {reference.title: reference} if reference else {}
        for spec in self.policies:
            held = holders.setdefault(spec.title, spec)
            if (held.name, held.options, held.codec) != (spec.name, spec.options, spec.codec):
                raise ValueError(f"policies {_shown(held)} and {_shown(spec)} would both show as {spec.title!r} on "
                                 "the pages; give each a distinct label")
        return self

    @model_validator(mode="after")
    def _codecs_with_policies_that_evict(self) -> SweepConfig:
        """A lossy codec with a policy that keeps everything is quantization alone: its bytes are the codec's, not
        a budget's, so no budget of the grid places it, and it is not the full cache every budget is read
        against. Looked up only when a codec is named (the registry loads every plugin)."""
        from kvpolicies.errors import UnknownCodecError
        from kvpolicies.registry import get_codec

        for spec in self.policies:
            if spec.codec == "full":
                continue
            try:
                lossless = get_codec(spec.codec).lossless
            except UnknownCodecError as error:
                raise ValueError(str(error)) from None
            if not lossless:
                if not get_policy(spec.name, **spec.options).compresses:
                    raise ValueError(
                        f"policy {_shown(spec)} keeps every entry, so codec {spec.codec!r} alone sets its bytes and "
                        "no budget of the grid applies to it; pair the codec with a policy that evicts (e.g. "
                        f"{{name: streaming, codec: {spec.codec}}} at a budget the codec's entries fill), and leave "
                        "the full cache at full precision: it is the reference every budget is read against")
        return self

    @model_validator(mode="after")
    def _one_budget_per_value(self) -> SweepConfig:
        """Two budgets that differ only in ``slack_tokens`` (or ``windows``) read as one budget on the pages (which
        name them in the policy's row only to keep such cells apart): a grid compares them one sweep per value."""
        seen: dict[tuple[str, float], Budget] = {}
        for budget in self.budgets:
            first = seen.setdefault((budget.unit, budget.value), budget)
            if first.slack_tokens != budget.slack_tokens:
                raise ValueError(f"budgets {first} (slack_tokens {first.slack_tokens}) and {budget} (slack_tokens "
                                 f"{budget.slack_tokens}) differ only in slack_tokens, and read as one budget on the pages; "
                                 "keep one of them (a sweep per slack compares them)")
            if first.windows != budget.windows:
                raise ValueError(f"budgets {first} (windows {first.windows}) and {budget} (windows {budget.windows}) "
                                 "differ only in how sliding windows take part, and read as one budget on the pages; "
                                 "keep one of them (a sweep per rule compares them)")
        return self

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
    protocol: Protocol = Protocol.QUERY_AWARE
    loading: Loading = Field(default_factory=Loading)
    prefill_chunk: int | None = None

    @property
    def title(self) -> str:
        """The policy's name on pages, marked when its context was compressed before the question was seen."""
        agnostic = self.protocol is Protocol.QUERY_AGNOSTIC
        return f"{self.policy.title} (query-agnostic)" if agnostic else self.policy.title

    @field_validator("budget", mode="before")
    @classmethod
    def _parse_budget(cls, value):
        return Budget.parse(Budget.stored(value))  # result files of earlier versions hold 0.5 or "50%"

    def identity(self) -> dict[str, Any]:
        """Everything that determines the cell's result; its hash is the key (the budget only for a policy that
        compresses, so the full cache is one cell whatever the budgets)."""
        policy = get_policy(self.policy.name, **self.policy.options)
        codec = None if self.policy.codec == "full" else self.policy.codec  # full precision: the keys of before
        return {
            "model": self.model or EMBEDDED_MODEL,
            "task": self.task.model_dump(),
            "policy": policy.identity(),
            "budget": self.budget.model_dump() if policy.compresses else None,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "protocol": self.protocol.value,
            "code_version": code_version(policy, self.task.name, codec),
        } | ({"codec": codec} if codec else {}) | self.loading.identity() | (
            {"prefill_chunk": self.prefill_chunk} if self.prefill_chunk else {})

    def key(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def share_key(self) -> str | None:
        """What cells must have in common to share each prompt's prefill (the model as loaded, the task's samples and
        their batching); None for a cell that prefills in chunks, which cannot share."""
        if self.prefill_chunk:
            return None
        return json.dumps([self.model, self.loading.model_dump(mode="json"), self.task.model_dump(mode="json"),
                           self.seed, self.batch_size], sort_keys=True, default=str)


def cells(config: SweepConfig) -> list[Cell]:
    """The grid in a stable order, one cell per key (``0.5`` and ``50%`` are one cell); the full cache runs once
    per model and task, whatever the budgets, and alone on the reference tasks. A prefill chunk applies to every
    cell, the full cache's too: it keeps the reference within the same memory."""
    grid: dict[str, Cell] = {}
    reference = [spec for spec in config.resolved_policies() if not get_policy(spec.name, **spec.options).compresses]
    for model in config.models:
        for task in config.reference_tasks:
            for spec in reference:
                cell = Cell(model=model, task=task, policy=spec, budget=1.0, seed=config.seed,
                            batch_size=config.batch_size, loading=config.loading, prefill_chunk=config.prefill_chunk)
                grid.setdefault(cell.key(), cell)
        for task in config.tasks:
            for spec in config.resolved_policies():
                compresses = get_policy(spec.name, **spec.options).compresses
                for budget in config.budgets if compresses else [Budget.parse(1.0)]:
                    # The full cache compresses nothing: one cell, whatever the protocols.
                    protocols = spec.protocols or config.protocols
                    for protocol in protocols if compresses else [Protocol.QUERY_AWARE]:
                        cell = Cell(model=model, task=task, policy=spec, budget=budget, seed=config.seed,
                                    batch_size=config.batch_size, protocol=protocol, loading=config.loading,
                                    prefill_chunk=config.prefill_chunk)
                        grid.setdefault(cell.key(), cell)
    return list(grid.values())
