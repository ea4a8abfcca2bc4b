"""The lm-eval tasks of kvpolicies (``--include_path`` this folder), their index by name, and whether a name is a
task at all (ours or lm-eval's), checked before a sweep loads anything."""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any

from kvpolicies.errors import UsageError

TASKS_DIR = Path(__file__).parent


@functools.cache
def task_configs() -> dict[str, dict[str, Any]]:
    """Every task and group of this folder by name, with its YAML config (includes resolved, functions not).

    Read with lm-eval's own indexer, so the names are exactly those lm-eval finds; about 10 ms for this folder, after
    importing ``lm_eval.tasks`` (about 1 s, which every evaluation pays anyway).
    """
    from lm_eval.tasks._index import TaskIndex

    return {name: entry.cfg or {} for name, entry in TaskIndex.build([TASKS_DIR]).items()}


def generated_tokens(task: str) -> int:
    """The most tokens ``task`` generates per sample (its ``max_gen_toks``; 0 for a task that generates none)."""
    kwargs = task_configs().get(task, {}).get("generation_kwargs") or {}
    return int(kwargs.get("max_gen_toks", 0))


def check_task_name(name: str) -> None:
    """A UsageError, with close names, unless ``name`` is a task, group or tag of kvpolicies or of lm-eval."""
    ours = task_configs()
    if name in ours:
        return
    theirs = lm_eval_task_names()  # indexed only for a name that is not ours: it takes seconds
    if name in theirs:
        return
    close = difflib.get_close_matches(name, [*ours, *theirs], n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ";"
    ruler = sorted(task for task in ours if task.startswith("kvp_ruler_"))
    listed = [task for task in sorted(ours) if task not in ruler] + [f"kvp_ruler_* ({len(ruler)} RULER tasks)"]
    raise UsageError(f"unknown task {name!r}{hint} kvpolicies' tasks are {', '.join(listed)}; lm-eval's are listed "
                     "by `kvpolicies lm-eval ls tasks`")


@functools.cache
def lm_eval_task_names() -> frozenset[str]:
    """The tasks, groups and tags of lm-eval's own task folder, indexed as lm-eval indexes it (about 10 s)."""
    from lm_eval.tasks import manager
    from lm_eval.tasks._index import TaskIndex

    return frozenset(TaskIndex.build([Path(manager.__file__).parent]))
