"""What a page shows as one point, and the names that keep different points apart.

A point is a cell without its code version: the model, the task (name, metadata, limit), the policy (name and full
config), the budget (slack included), the seed, the batch size and the protocol. A results folder keeps the cells of
earlier code versions under other keys, so a page shows each point once, as last measured (:func:`newest`); an
option that only one code version has (a plugin gained it) does not tell two versions' records apart
(:func:`same_point`). Points that differ in anything else are different results, even where two grids gave two
policies one label or two runs of a task one name: a page keeps them apart, and :func:`shown` names them apart with
the fewest words that do it (none where nothing collides, so the page of a single grid reads as it always did).

Budgets stay numbers (a plot's x, an area's width), so what tells two budgets of one value apart, their slack, is
said in the policy's name: ``snapkv`` and ``snapkv (slack 0)`` are two lines. Seed, batch size, dtype, model
revision and prefill chunk go with the task, whose full-cache row each policy is compared with.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvpolicies.engine.budget import Budget
from kvpolicies.experiments.results import ResultRecord
from kvpolicies.integrations.protocol import Protocol

DEFAULT_SLACK = Budget.model_fields["slack_tokens"].default

_MISSING = object()

Facet = tuple[str, Any, str | None]
"""One thing a variant may differ in: what it is, its value, and the words that say it (None: left unsaid, as a
default is)."""


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _base(record: ResultRecord) -> str:
    """Everything the record's cell key hashes but the code version and the policy's options, as one comparable
    text: records that differ in it are two points; records that share it are one point or several, by their
    options (:func:`same_point`)."""
    budget = record.identity.budget
    policy = {key: value for key, value in record.identity.policy.items() if key != "config"}
    # The window rule is left out: it changes nothing on a model without windows, and records written before it
    # read as windows held whole, which must not split their rows from today's (a grid compares rules apart).
    return _text({
        "model": record.identity.model, "task": record.cell.task.model_dump(mode="json"),
        "policy": policy, "codec": record.cell.policy.codec,
        "budget": None if budget is None else budget.model_dump(mode="json", exclude={"windows"}),
        "seed": record.cell.seed, "batch_size": record.cell.batch_size, "protocol": record.cell.protocol.value,
        **_run_options(record),
    })


def _run_options(record: ResultRecord) -> dict[str, Any]:
    """The options of a run that its cell key holds where given: the dtype and revision the model was loaded with,
    and the prefill chunk (none of them in records written before they were options)."""
    extra = record.identity.model_extra or {}
    return {name: extra[name] for name in ("dtype", "revision", "prefill_chunk") if extra.get(name) is not None}


def _options(record: ResultRecord) -> dict[str, Any]:
    """The policy's full config as the cell ran it (its options, defaults included)."""
    config = record.identity.policy.get("config")
    return config if isinstance(config, dict) else {}


def same_point(record: ResultRecord, other: ResultRecord) -> bool:
    """Whether two records of one :func:`_base` measured one point.

    Under one code version, only if their options are the same: two configs of one plugin are two policies. Across
    code versions, if their options agree wherever both have one: a plugin that gained an option (with a default)
    in a later version records it, and its earlier records lack it, yet the user sweeps the same policy; were the
    option to count, every new option would split a page's row in two.
    """
    ours, theirs = _options(record), _options(other)
    if record.identity.code_version == other.identity.code_version:
        return _text(ours) == _text(theirs)
    return all(_text(ours[key]) == _text(theirs[key]) for key in ours.keys() & theirs.keys())


def newest(records: Sequence[ResultRecord]) -> list[ResultRecord]:
    """One record per point: the newest finished one, else the newest failure; in the order the points first occur.

    Records are grouped by everything but their options (:func:`_base`), then, best first, each joins the first
    point all of whose records it measured too (:func:`same_point`), else starts one: checking every record, not
    only the newest, keeps two configs of one code version apart even where an older record fits both (it goes
    with the point measured last).
    """
    groups: dict[str, list[tuple[int, ResultRecord]]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[_base(record)].append((index, record))
    found: list[tuple[int, ResultRecord]] = []
    for members in groups.values():
        best_first = sorted(members, key=lambda item: (item[1].status == "ok", item[1].finished_at), reverse=True)
        points: list[list[tuple[int, ResultRecord]]] = []
        for index, record in best_first:
            joined = next((held for held in points if all(same_point(record, r) for _, r in held)), None)
            if joined is None:
                points.append([(index, record)])
            else:
                joined.append((index, record))
        found += [(min(index for index, _ in held), held[0][1]) for held in points]
    return [record for _, record in sorted(found, key=lambda item: item[0])]


@dataclass(frozen=True)
class Shown:
    """A point's record and the names a page gives it."""

    record: ResultRecord
    task: str
    """The task's name, with what tells it apart from other runs of that name (limit, metadata, seed, batch)."""
    base: str
    """The policy's label, or its name."""
    apart: tuple[str, ...] = ()
    """What tells the policy apart from others shown as ``base``: its name, options, budget slack."""

    @property
    def policy(self) -> str:
        """The policy's name on a page that shows protocols apart (the suite page): ``mine (snapkv)``."""
        return _named(self.base, self.apart)

    @property
    def title(self) -> str:
        """The policy's name on a leaderboard row: marked when the context was compressed before the question was
        seen, as :attr:`~kvpolicies.experiments.grid.Cell.title` marks it."""
        agnostic = self.record.cell.protocol is Protocol.QUERY_AGNOSTIC
        return _named(self.base, (*self.apart, "query-agnostic") if agnostic else self.apart)


def _named(base: str, words: Sequence[str]) -> str:
    return f"{base} ({', '.join(words)})" if words else base


def shown(records: Sequence[ResultRecord]) -> list[Shown]:
    """The points of ``records`` (:func:`newest`), each named apart from every other point of the page."""
    chosen = newest(records)
    tasks = _told_apart(chosen, lambda r: r.cell.task.name, _task_facets)
    policies = _told_apart(chosen, lambda r: r.cell.policy.title, _policy_facets)
    return [Shown(record, _named(record.cell.task.name, tasks[id(record)]), record.cell.policy.title,
                  policies[id(record)]) for record in chosen]


def _task_facets(record: ResultRecord) -> list[Facet]:
    """What can tell apart two runs of one task: its spec, then the run's seed, batch size, dtype, model revision and
    prefill chunk (each policy is compared with the full cache of the same run, so they go with the task)."""
    task, cell, run = record.cell.task, record.cell, _run_options(record)
    return [
        _unless(None, "limit", task.limit, f"limit {task.limit}"),
        *((f"metadata.{key}", value, f"{key}={_value(value)}") for key, value in sorted(task.metadata.items())),
        _unless(0, "seed", cell.seed, f"seed {cell.seed}"),
        _unless(1, "batch_size", cell.batch_size, f"batch {cell.batch_size}"),
        _unless(None, "dtype", run.get("dtype"), str(run.get("dtype"))),
        _unless(None, "revision", run.get("revision"), f"revision {run.get('revision')}"),
        _unless(None, "prefill_chunk", run.get("prefill_chunk"), f"prefill chunk {run.get('prefill_chunk')}"),
    ]


def _policy_facets(record: ResultRecord) -> list[Facet]:
    """What can tell apart two policies shown under one label: the policy's name, its options (the full config the
    cell ran with), then the budget's slack (the budget's value is the page's x, not part of a name; the codec is
    in the title)."""
    identity, budget = record.identity.policy, record.identity.budget
    name = identity.get("policy", record.cell.policy.name)
    config = identity.get("config")
    options = sorted(config.items()) if isinstance(config, dict) else []
    slack = [] if budget is None else [_unless(DEFAULT_SLACK, "slack", budget.slack_tokens,
                                               f"slack {budget.slack_tokens}")]
    return [("policy", name, str(name)), *((f"option.{k}", v, f"{k}={_value(v)}") for k, v in options), *slack]


def _unless(default: Any, what: str, value: Any, words: str) -> Facet:
    """A facet left unsaid at its default, the value of a grid that does not mention it."""
    return what, value, None if value == default else words


def _value(value: Any) -> str:
    return value if isinstance(value, str) else _text(value)


def _told_apart(records: list[ResultRecord], base: Callable[[ResultRecord], str],
                facets: Callable[[ResultRecord], list[Facet]]) -> dict[int, tuple[str, ...]]:
    """Per record (by ``id``), the words that tell its variant apart from the other variants shown as its ``base``.

    A variant says a facet where another variant that agrees with it on every earlier facet differs there, so two
    variants always say the first facet they differ in (unless it is a default, which one of them leaves unsaid);
    names that still read alike (``1`` and ``"1"``) get a short hash.
    """
    variant = {}
    for record in records:
        described = facets(record)
        variant[id(record)] = (base(record), _text([(what, value) for what, value, _ in described]), described)
    groups: dict[str, dict[str, list[Facet]]] = defaultdict(dict)
    for name, key, described in variant.values():
        groups[name][key] = described
    words: dict[tuple[str, str], tuple[str, ...]] = {}
    for name, variants in groups.items():
        values = [{what: value for what, value, _ in described} for described in variants.values()]
        found = {key: _said(described, values) for key, described in variants.items()}
        alike = list(found.values())
        for key, said in found.items():
            unique = alike.count(said) == 1
            words[(name, key)] = said if unique else (*said, hashlib.sha256(key.encode()).hexdigest()[:6])
    return {ident: words[(name, key)] for ident, (name, key, _) in variant.items()}


def _said(described: list[Facet], others: list[dict[str, Any]]) -> tuple[str, ...]:
    """The words of the facets where a variant that agrees with ``described`` on every earlier facet differs."""
    said = []
    for depth, (what, value, text) in enumerate(described):
        peers = [other for other in others if all(other.get(w, _MISSING) == v for w, v, _ in described[:depth])]
        if text is not None and any(other.get(what, _MISSING) != value for other in peers):
            said.append(text)
    return tuple(said)
