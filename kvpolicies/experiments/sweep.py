"""Sweeps: every model × task × policy × budget cell through lm-eval, one result file per cell, resumable.

A cell's file name is a hash of what determines its result (model, task and its data parameters, policy and its
full config, budget, seed, code version), written atomically (temp file + rename), so a sweep killed at any moment
loses no finished cell and a re-run computes only what is missing. A failing cell is recorded with its error and
the sweep goes on; failed cells are retried on the next run, and so is any file that is not a valid record. The
results folder is checked for writing before the first cell is computed.

This module drives a sweep; :mod:`kvpolicies.experiments.runner` computes a cell. Cells run one after another in
this process, or on the workers of a Ray cluster
(:mod:`kvpolicies.experiments.ray_executor`); either way this process writes every file, so the results folder need
not be shared between nodes, and a local run and a cluster run fill one folder interchangeably.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kvpolicies.experiments.grid import Cell, SweepConfig, cells

if TYPE_CHECKING:
    from kvpolicies.experiments.results import ResultRecord
    from kvpolicies.experiments.store import ResultsStore


class Executor(Protocol):
    """Runs groups of cells somewhere and hands back their records as they finish, in any order; the sweep writes them.

    ``todo`` yields groups: the cells of one :meth:`~kvpolicies.experiments.grid.Cell.share_key`, which can share
    each prompt's prefill (:func:`~kvpolicies.experiments.runner.evaluate_group`), or one cell alone. Each group is
    claimed as it is taken (:class:`~kvpolicies.experiments.store.ResultsStore`), so an executor takes a group when
    it is about to run it (or a few ahead), never all at its start: every taken cell holds an open file and keeps
    other sweeps on the folder from it. Cells another sweep holds are never handed out. An executor may split a
    group (its cells give the same records apart) to keep more workers busy.
    ``show`` takes one line on what is running now, for the progress bar. An executor never writes result files:
    the sweep does, one at a time, so the folder needs to be reachable from the driver only.
    """

    def run(self, todo: Iterable[list[Cell]], show: Callable[[str], None]) -> Iterator[tuple[Cell, ResultRecord]]: ...


class LocalExecutor:
    """One group after another in this process: the default, and all a single machine needs. Each record is
    written as soon as its cell is done, so an interrupted group loses none of its finished cells. A group's cells
    decode each request's answers as one batch (``decode_together``), or one cell after another."""

    def __init__(self, decode_together: bool = True) -> None:
        self.decode_together = decode_together

    def run(self, todo: Iterable[list[Cell]], show: Callable[[str], None]) -> Iterator[tuple[Cell, ResultRecord]]:
        from kvpolicies.experiments.runner import evaluate, evaluate_group  # torch and lm-eval
        from kvpolicies.integrations.lm_eval_logging import quiet_lm_eval

        quiet_lm_eval()
        for group in todo:
            if len(group) == 1:
                show(f"{group[0].task.name} {group[0].title} @ {group[0].budget}")
                yield group[0], evaluate(group[0])
                continue
            show(f"{group[0].task.name}: {len(group)} cells sharing each prefill")
            yield from zip(group, evaluate_group(group, together=self.decode_together))


def shared_groups(todo: Iterable[Cell]) -> list[list[Cell]]:
    """The cells of ``todo`` by :meth:`~kvpolicies.experiments.grid.Cell.share_key`, each group where its first
    cell stands; a cell that cannot share (its key is None) alone."""
    groups: dict[str | int, list[Cell]] = {}
    for index, cell in enumerate(todo):
        key = cell.share_key()
        groups.setdefault(index if key is None else key, []).append(cell)
    return list(groups.values())


def check_tasks(config: SweepConfig) -> None:
    """Every task of the grid exists (kvpolicies' or lm-eval's), its metadata is what the task reads, and its lengths
    fit every model of the grid: all found before a model loads, not after the first cell's.

    Here rather than in the grid's validation, which the cell runner imports: a cell's code version covers what the
    runner imports, and the data generators must not become part of every cell's version through this check.
    :func:`run_sweep` calls it, so a grid built in Python is checked as one read from a file is.
    """
    from kvpolicies_evals.metadata import check_fits, validate
    from kvpolicies_evals.tasks import check_task_name

    tasks = {task.name: task for task in config.tasks + config.reference_tasks}
    for name, task in tasks.items():
        check_task_name(name)
        validate(name, task.metadata)
    for model in config.models:  # only a model's config is read, never its weights
        for name, task in tasks.items():
            check_fits(name, task.metadata, model, task.limit)


def check_models(todo: Iterable[Cell]) -> None:
    """Every model of the cells to run can be found (its config read, not its weights), or the sweep stops before
    its first cell with one error naming the model: a model missing here would fail each of its cells alike."""
    from kvpolicies.integrations.models import check_loadable

    for model, revision in dict.fromkeys((cell.model, cell.loading.revision) for cell in todo):
        check_loadable(model, revision)


def run_sweep(config: SweepConfig, results_dir: Path, progress: bool = True, executor: Executor | None = None,
              share_prefill: bool = True) -> Iterator[ResultRecord]:
    """Run every missing cell (on ``executor``, default :class:`LocalExecutor`), yielding each record as it is
    written. Finished cells are skipped, and so are cells another sweep on the same folder is computing (it writes
    them). With ``share_prefill`` (the default) the cells of one model and task are handed out together, each
    prompt prefilled once for all of them; without, one by one. A results folder that cannot be written, or is too full for a record, raises
    :class:`~kvpolicies.experiments.results.ResultsError` before any cell runs.

    A model that cannot be loaded stops the sweep with its :class:`~kvpolicies.errors.ModelUnavailable`: run here,
    before the first cell (its config is read); on Ray, at the first cell a worker cannot load it. The cells
    finished before are saved; none is written for that model.

    A record that cannot be written (a full disk) is kept and written as soon as the folder takes a file again;
    once a second record cannot be written either, or the last one at the end, the sweep stops with a ResultsError
    naming the folder and the space needed, since every further cell would be computed for nothing.
    """
    from tqdm import tqdm

    from kvpolicies.experiments.results import ResultsError, check_writable
    from kvpolicies.experiments.store import ResultsStore

    check_tasks(config)
    check_writable(results_dir)
    grid = cells(config)
    with ResultsStore(results_dir) as store:
        todo = [cell for cell in grid if not _current(store, cell)]
        if executor is None or isinstance(executor, LocalExecutor):  # Ray's workers load models on their nodes
            check_models(todo)
        print(f"kvpolicies: {len(grid)} cells, {len(grid) - len(todo)} already done, {len(todo)} to run "
              f"-> {results_dir}", file=sys.stderr)
        bar = tqdm(total=len(grid), initial=len(grid) - len(todo), disable=not progress, unit="cell", file=sys.stderr)
        elsewhere: list[Cell] = []
        unsaved: list[tuple[Cell, ResultRecord]] = []
        failed = 0

        def claimed() -> Iterator[list[Cell]]:
            """Each group as it is taken, claimed then, less the cells another sweep holds or has finished."""
            for group in shared_groups(todo) if share_prefill else ([cell] for cell in todo):
                taken = []
                for cell in group:
                    if not store.claim(cell):
                        elsewhere.append(cell)
                        bar.total -= 1  # neither done nor this sweep's to do
                        bar.refresh()
                    elif store.finished(cell) is not None:  # another sweep finished it since this one started
                        store.release(cell.key())
                        bar.update(1)
                    else:
                        taken.append(cell)
                if taken:
                    yield taken

        def save(at_end: bool = False) -> Iterator[ResultRecord]:
            nonlocal failed
            written, error = _write_all(store, unsaved)
            for cell, record in written:
                if record.status != "ok":
                    failed += 1
                    bar.set_postfix(failed=failed)
                    print(f"kvpolicies: cell failed ({cell.task.name}, {cell.title}, {cell.budget}): {record.error}",
                          file=sys.stderr)
                bar.update(1)
                yield record
            if error is None:
                return
            if at_end or len(unsaved) > 1:
                lost = "1 computed cell is" if len(unsaved) == 1 else f"{len(unsaved)} computed cells are"
                raise ResultsError(f"{error}; {lost} not saved") from None
            print(f"kvpolicies: warning: {error}; its record is kept and written as soon as the folder takes a file "
                  "again (the sweep stops if the next one cannot be written either)", file=sys.stderr)

        try:
            with bar:  # closed before an error or an interruption is reported
                for cell, record in (executor or LocalExecutor()).run(claimed(), bar.set_description):
                    if record.key != cell.key():
                        record = _other_code(cell, record)
                    unsaved.append((cell, record))
                    yield from save()
                if unsaved:
                    yield from save(at_end=True)
        finally:
            if elsewhere:  # however the sweep ended: these cells are not missing, another sweep holds them
                print(f"kvpolicies: {len(elsewhere)} cells were being computed by another sweep on {results_dir} "
                      "and are left to it; run this command again once it has ended to fill any it did not",
                      file=sys.stderr)


def _current(store: ResultsStore, cell: Cell) -> bool:
    """Whether ``cell`` is finished in ``store``; a finished record is brought up to the grid's current label (the
    label is no part of a cell's key, so renaming it in the grid must not recompute the cell, but pages must show
    the new name). Only a new label is written: other differences outside the key (``model: null`` against the
    embedded model's id) change nothing on a page. The label is cosmetic, so a write that fails is a warning."""
    from kvpolicies.experiments.results import ResultsError

    record = store.finished(cell)
    if record is None:
        return False
    if record.cell.title == cell.title:
        return True
    try:
        if store.claim(cell):
            record = store.finished(cell)  # what the file holds now that no one else may write it
            if record is not None and record.cell.title != cell.title:
                store.write(cell, record.model_copy(update={"cell": cell}))
    except ResultsError as error:
        print(f"kvpolicies: warning: the label of {cell.title!r} stays {record.cell.title!r} on the pages: {error}",
              file=sys.stderr)
    finally:
        store.release(cell.key())
    return record is not None


def _write_all(store: ResultsStore,
               unsaved: list[tuple[Cell, ResultRecord]]) -> tuple[list[tuple[Cell, ResultRecord]], str | None]:
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
