"""The results store loses nothing: sweeps sharing a folder claim cells (a killed one holds none), never replace a
finished result with a failure, resume only on files that hold their own cell, survive a full disk without
tracebacks or staging files, and bring finished records up to the grid's current label."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvpolicies.experiments.results
import kvpolicies.experiments.runner
import kvpolicies.experiments.store
from kvpolicies.cli import main
from kvpolicies.experiments.grid import SweepConfig, cells
from kvpolicies.experiments.results import ResultsError, load_results, read_record, write_record
from kvpolicies.experiments.store import ResultsStore
from kvpolicies.experiments.sweep import run_sweep
from tests.test_results import fake_run_cell, per_cell, saved_record

GRID = {"policies": ["full", "random"], "budgets": [0.25, 0.5, 0.75],
        "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [200], "per_cell": 1}}]}

STAND_IN = """
import json, os, sys, time
from pathlib import Path

import kvpolicies.experiments.runner as runner
import kvpolicies.experiments.sweep as sweep
from kvpolicies.experiments.grid import SweepConfig

folder, log, seconds, outcome, go, grid, share = sys.argv[1:8]

def run_cell(cell, lm=None):
    time.sleep(float(seconds))
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()} {cell.key()}\\n")
    if outcome == "error":
        raise MemoryError("CUDA out of memory (a stand-in)")
    return {"metrics": {"exact_match,first_key": 1.0}, "primary_metric": "exact_match,first_key", "score": 1.0,
            "higher_is_better": True, "samples": 1, "kv_memory": {"sequences": 1}, "speed": {},
            "peak_memory_bytes": 0, "peak_memory_growth_bytes": 0, "wall_s": float(seconds), "device": "cpu"}

runner.run_cell = run_cell
runner.evaluate_group = lambda cells, together=True: (runner.evaluate(cell) for cell in cells)  # no model to build
config = SweepConfig.model_validate(json.loads(grid))
sweep.cells(config)  # keys hashed (and cached) before the start, so both sweeps reach their first claim together
Path(f"{go}.{os.getpid()}.ready").touch()
while not Path(go).exists():
    time.sleep(0.02)
for _ in sweep.run_sweep(config, Path(folder), progress=False, share_prefill=share == "share"):
    pass
"""


def two_sweeps(tmp_path: Path, first: tuple[float, str], second: tuple[float, str], grid: dict = GRID,
               share: bool = False) -> tuple[Path, list[str]]:
    """Two real processes sweeping one folder, started together; each computes a cell in ``seconds`` with the given
    outcome. Returns the folder and the log of computations (``pid key``). Without ``share`` each cell is claimed
    alone, so the two sweeps interleave cell by cell (with it, a task's cells are claimed together)."""
    folder, log, go = tmp_path / "results", tmp_path / "computed.log", tmp_path / "go"
    env = os.environ | {"OMP_NUM_THREADS": "1", "KVPOLICIES_PLUGINS": "full,random"}
    processes = [subprocess.Popen([sys.executable, "-c", STAND_IN, str(folder), str(log), str(seconds), outcome,
                                   str(go), json.dumps(grid), "share" if share else "alone"], env=env, cwd=Path(__file__).parent.parent,
                                  stderr=subprocess.PIPE, text=True)
                 for seconds, outcome in (first, second)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("go.*.ready"))) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "a sweep did not start"
            time.sleep(0.05)
        go.touch()
        for process in processes:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
            assert "Traceback" not in err
    finally:  # a failed assertion must not leave sweeps running past the test
        for process in processes:
            process.kill()
            process.wait()
    return folder, log.read_text().splitlines()


def test_two_sweeps_on_one_folder_share_the_cells_and_compute_each_once(tmp_path):
    folder, computed = two_sweeps(tmp_path, (1.0, "ok"), (1.0, "ok"))
    grid = cells(SweepConfig.model_validate(GRID))
    keys = [line.split()[1] for line in computed]
    assert sorted(keys) == sorted(cell.key() for cell in grid)  # every cell exactly once, across both
    assert all(read_record(folder / f"{cell.key()}.json").status == "ok" for cell in grid)
    assert not list(folder.glob(".*.claim")) and not list(folder.glob("*.tmp"))


def test_two_sharing_sweeps_on_one_folder_compute_each_cell_once(tmp_path):
    """A sweep that shares prefills claims a task's cells when it reaches the task; two such sweeps reaching it
    together may split its cells between them (each shares what it holds), and still compute every cell once."""
    tasks = [{"name": "kvp_passkey", "metadata": {"lengths": [length], "per_cell": 1}} for length in (200, 300)]
    grid = GRID | {"tasks": tasks}
    folder, computed = two_sweeps(tmp_path, (0.5, "ok"), (0.5, "ok"), grid=grid, share=True)
    keys = [cell.key() for cell in cells(SweepConfig.model_validate(grid))]
    assert len(keys) == 8 and sorted(line.split()[1] for line in computed) == sorted(keys)
    assert all(read_record(folder / f"{key}.json").status == "ok" for key in keys)
    assert not list(folder.glob(".*.claim")) and not list(folder.glob("*.tmp"))


def test_a_failing_sweep_never_replaces_a_result_another_sweep_finished(tmp_path):
    """The reproduction: one sweep finishes cells in 1 s, another fails them (out of memory) after 4 s. Before
    claims, both computed every cell and the failures replaced every result."""
    folder, computed = two_sweeps(tmp_path, (1.0, "ok"), (4.0, "error"))
    by_pid: dict[str, set[str]] = {}
    for line in computed:
        pid, key = line.split()
        by_pid.setdefault(pid, set()).add(key)
    assert len(computed) == len(cells(SweepConfig.model_validate(GRID)))  # nothing computed twice
    for keys in by_pid.values():
        statuses = {read_record(folder / f"{key}.json").status for key in keys}
        assert len(statuses) == 1  # each file holds the result of the sweep that computed it
    assert sum(read_record(path).status == "ok" for path in folder.glob("*.json")) >= 1


def test_a_failure_never_replaces_a_finished_result_of_the_same_cell(tmp_path):
    cell = cells(SweepConfig.model_validate(GRID))[0]
    (tmp_path / f"{cell.key()}.json").write_text(json.dumps(saved_record(cell, score=0.75)))
    ok = read_record(tmp_path / f"{cell.key()}.json")
    failure = ok.model_copy(update={"status": "error", "error": "OutOfMemoryError: boom", "score": None})
    with ResultsStore(tmp_path) as store:
        assert store.claim(cell)
        assert store.write(cell, failure) == ok
    assert read_record(tmp_path / f"{cell.key()}.json") == ok


def test_a_claimed_cell_is_left_to_its_holder_and_one_finished_meanwhile_is_not_computed(tmp_path, monkeypatch, capsys):
    grid = cells(SweepConfig.model_validate(GRID))
    held, finished_meanwhile = grid[0], grid[-1]
    calls: list = []
    compute = fake_run_cell(calls)

    def run_cell(cell, lm=None):  # while computing its first cell, "another sweep" finishes one this sweep has not reached
        if not calls:
            write_record(tmp_path / f"{finished_meanwhile.key()}.json",
                         kvpolicies.experiments.results.ResultRecord.model_validate(saved_record(finished_meanwhile)))
        return compute(cell)

    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", run_cell)
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)
    other = ResultsStore(tmp_path)  # another open file description: a flock held elsewhere
    assert other.claim(held)
    with ResultsStore(tmp_path) as store:
        assert not store.claim(held)
    # One cell at a time (a sweep that shares prefills claims a task's cells together, when it reaches them).
    records = list(run_sweep(SweepConfig.model_validate(GRID), tmp_path, progress=False,
                             share_prefill=False))
    assert {c.key() for c in calls} == {c.key() for c in grid} - {held.key(), finished_meanwhile.key()}
    assert len(records) == len(grid) - 2 and not (tmp_path / f"{held.key()}.json").exists()
    assert "1 cells were being computed by another sweep" in capsys.readouterr().err
    other.release(held.key())
    list(run_sweep(SweepConfig.model_validate(GRID), tmp_path, progress=False))  # the rerun fills it
    assert read_record(tmp_path / f"{held.key()}.json").status == "ok"


def test_a_killed_sweep_leaves_no_cell_claimed(tmp_path):
    cell = cells(SweepConfig.model_validate(GRID))[0]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom kvpolicies.experiments.store import ResultsStore\n"
        "from kvpolicies.experiments.grid import SweepConfig, cells\nimport json\n"
        f"cell = cells(SweepConfig.model_validate(json.loads({json.dumps(json.dumps(GRID))})))[0]\n"
        f"assert ResultsStore(Path({str(tmp_path)!r})).claim(cell)\nprint('held', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, env=os.environ | {"KVPOLICIES_PLUGINS": "full,random"})
    try:
        assert holder.stdout.readline().strip() == "held"
        with ResultsStore(tmp_path) as store:
            assert not store.claim(cell)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with ResultsStore(tmp_path) as store:
        assert store.claim(cell)


def test_resume_reruns_a_cell_whose_file_holds_another_cells_record(tmp_path, monkeypatch):
    grid = cells(SweepConfig.model_validate(GRID))
    misplaced, owner = grid[0], grid[1]
    (tmp_path / f"{misplaced.key()}.json").write_text(json.dumps(saved_record(owner)))  # copied over by hand
    calls: list = []
    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", fake_run_cell(calls))
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)
    list(run_sweep(SweepConfig.model_validate(GRID), tmp_path, progress=False))
    assert misplaced.key() in {c.key() for c in calls}
    assert read_record(tmp_path / f"{misplaced.key()}.json").key == misplaced.key()


def test_renaming_a_label_reaches_the_page_without_recomputing(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", fake_run_cell(calls))
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)
    grid = GRID | {"policies": ["full", {"name": "random", "label": "coin"}]}
    list(run_sweep(SweepConfig.model_validate(grid), tmp_path, progress=False))
    computed = len(calls)
    renamed = GRID | {"policies": ["full", {"name": "random", "label": "dice"}]}
    list(run_sweep(SweepConfig.model_validate(renamed), tmp_path, progress=False))
    assert len(calls) == computed  # the label is no part of a cell's key
    assert main(["leaderboard", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dice" in out and "coin" not in out


def full_disk(monkeypatch, failures: int) -> list[int]:
    """The next ``failures`` renames into a results folder fail as on a full disk (the staging file is written)."""
    left = [failures]
    real = os.replace

    def replace(source, target):
        if left[0] > 0:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real(source, target)

    monkeypatch.setattr(kvpolicies.experiments.results.os, "replace", replace)
    return left


def test_a_full_disk_is_a_clean_error_naming_the_folder_and_leaves_no_staging_file(tmp_path, monkeypatch):
    record = kvpolicies.experiments.results.ResultRecord.model_validate(saved_record(cells(SweepConfig.model_validate(GRID))[0]))
    full_disk(monkeypatch, 1)
    with pytest.raises(ResultsError, match=rf"cannot write results to {tmp_path}: no space left on device \(r.json "
                                           r"needs [\d,]+ bytes, [\d,]+ bytes free\)"):
        write_record(tmp_path / "r.json", record)
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_keeps_a_record_it_could_not_write_and_writes_it_once_there_is_room(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", fake_run_cell(calls))
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)
    full_disk(monkeypatch, 1)  # the first write fails, then room is made
    records = list(run_sweep(SweepConfig.model_validate(GRID), tmp_path, progress=False))
    assert len(records) == len(calls) == len(cells(SweepConfig.model_validate(GRID)))
    assert len(load_results(tmp_path)) == len(calls) and not list(tmp_path.glob(".*"))


def test_a_sweep_on_a_disk_that_stays_full_stops_with_a_clean_error(tmp_path, monkeypatch, capsys):
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(GRID))
    calls: list = []
    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", fake_run_cell(calls))
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)
    full_disk(monkeypatch, 10**6)
    results = tmp_path / "results"
    assert main(["sweep", "--config", str(config), "--results", str(results), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"kvpolicies: error: cannot write results to {results}: no space left on device" in err
    assert "2 computed cells are not saved" in err and "Traceback" not in err
    assert len(calls) == 2  # it stopped once a second record could not be saved
    assert [p.name for p in results.iterdir()] == []  # no staging file, no claim left


def test_task_data_staging_files_are_unique_to_each_writer(tmp_path):
    from kvpolicies_evals.data import write_jsonl

    path = tmp_path / "task.jsonl"
    (tmp_path / "task.jsonl.tmp").mkdir()  # another writer's staging name in the way
    write_jsonl(path, [{"a": 1}, {"a": 2}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"a": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.jsonl", "task.jsonl.tmp"]


def test_a_folder_without_file_locks_still_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    calls: list = []
    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", fake_run_cell(calls))
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)
    records = list(run_sweep(SweepConfig.model_validate(GRID), tmp_path, progress=False))
    assert len(records) == len(calls) == len(cells(SweepConfig.model_validate(GRID)))
    assert capsys.readouterr().err.count("does not support file locks") == 1
    assert not list(tmp_path.glob(".*"))


def test_result_files_are_as_readable_as_any_file_the_user_writes(tmp_path):
    record = kvpolicies.experiments.results.ResultRecord.model_validate(saved_record(cells(SweepConfig.model_validate(GRID))[0]))
    write_record(tmp_path / "r.json", record)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~mask


def failing_renames(monkeypatch, which: set[int]) -> None:
    """The renames into a results folder numbered in ``which`` (1 the first) fail as on a full disk."""
    count = [0]
    real = os.replace

    def replace(source, target):
        count[0] += 1
        if count[0] in which:
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real(source, target)

    monkeypatch.setattr(kvpolicies.experiments.results.os, "replace", replace)


def test_a_last_record_saved_only_at_the_end_is_reported_like_every_other(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", fake_run_cell(calls))
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)
    grid = cells(SweepConfig.model_validate(GRID))
    failing_renames(monkeypatch, {len(grid)})  # the last cell's write fails; the retry at the end succeeds
    records = list(run_sweep(SweepConfig.model_validate(GRID), tmp_path, progress=False))
    assert len(records) == len(calls) == len(grid) == len(load_results(tmp_path))
    err = capsys.readouterr().err
    assert "kvpolicies: warning: cannot write results to" in err  # said when it happened, not only at the end
    assert "kept and written as soon as the folder takes a file again" in err


def test_a_folder_too_full_for_one_record_stops_before_any_cell_is_computed(tmp_path, monkeypatch, capsys):
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(GRID))
    calls: list = []
    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", fake_run_cell(calls))
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)

    def full(handle):  # an empty file fits on a full disk; its data does not
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kvpolicies.experiments.results.os, "fsync", full)
    results = tmp_path / "results"
    assert main(["sweep", "--config", str(config), "--results", str(results), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"kvpolicies: error: cannot write results to {results}: no space left on device" in err
    assert "Traceback" not in err and calls == [] and list(results.iterdir()) == []


def claim_files_fail(monkeypatch, error: int, times: int) -> None:
    left = [times]
    real = os.open

    def open_(path, flags, mode=0o777, **kwargs):
        if str(path).endswith(".claim") and left[0] > 0:
            left[0] -= 1
            raise OSError(error, os.strerror(error), str(path))
        return real(path, flags, mode, **kwargs)

    monkeypatch.setattr(kvpolicies.experiments.store.os, "open", open_)


def test_a_claim_that_cannot_be_created_is_a_clean_error(tmp_path, monkeypatch, capsys):
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(GRID))
    calls: list = []
    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", fake_run_cell(calls))
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)
    claim_files_fail(monkeypatch, errno.ENOSPC, 10**6)
    results = tmp_path / "results"
    assert main(["sweep", "--config", str(config), "--results", str(results), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"kvpolicies: error: cannot write results to {results}: no space left on device" in err
    assert "Traceback" not in err and calls == []


def test_a_stale_network_file_handle_on_a_claim_is_tried_again(tmp_path, monkeypatch):
    claim_files_fail(monkeypatch, errno.ESTALE, 2)
    cell = cells(SweepConfig.model_validate(GRID))[0]
    with ResultsStore(tmp_path) as store:
        assert store.claim(cell)


def test_only_a_new_label_rewrites_a_finished_record_and_a_failed_rewrite_is_a_warning(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", fake_run_cell(calls))
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)
    list(run_sweep(SweepConfig.model_validate(GRID), tmp_path, progress=False))
    before = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.json")}
    from kvpolicies.integrations.models import EMBEDDED_MODEL

    same = GRID | {"models": [EMBEDDED_MODEL]}  # the embedded model by its id: the same cells, the same labels
    list(run_sweep(SweepConfig.model_validate(same), tmp_path, progress=False))
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.json")} == before
    failing_renames(monkeypatch, set(range(1, 100)))  # a full disk: the cells are finished, only labels change
    renamed = GRID | {"policies": ["full", {"name": "random", "label": "dice"}]}
    assert list(run_sweep(SweepConfig.model_validate(renamed), tmp_path, progress=False)) == []
    err = capsys.readouterr().err
    assert "kvpolicies: warning: the label of 'dice' stays 'random' on the pages: cannot write results" in err
    assert len(calls) == len(cells(SweepConfig.model_validate(GRID)))  # nothing computed again
    assert not list(tmp_path.glob(".*.claim"))
