"""Sweeps on a real Ray cluster (``--executor ray``): the same files as the local executor, workers killed by signal,
a killed driver, several nodes with fake GPUs, a node joining late.

Every cluster here is a real local Ray (no mocks) running tiny random-weight models with one thread per process
(``OMP_NUM_THREADS=1``), so the results can be compared number for number with a local run of the same threads.
The fault tests join a cluster of 2 CPUs that this test process starts (Ray's own test cluster), so they run 2
workers whatever the machine, and the worker they kill is one of theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from kvpolicies.errors import UsageError
from kvpolicies.experiments.execution import Execution
from kvpolicies.experiments.grid import SweepConfig, cells
from kvpolicies.experiments.results import read_record
from kvpolicies.experiments.sweep import run_sweep

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

PASSKEY = {"name": "kvp_passkey", "metadata": {"lengths": [200], "depths": [0.5], "per_cell": 2}}


def grid(model: str, policies=("full", "random", "streaming", "snapkv"), budgets=(0.25, 0.5)) -> dict:
    return {"models": [model], "policies": list(policies), "budgets": list(budgets), "tasks": [PASSKEY]}


def env() -> dict[str, str]:
    """One torch thread everywhere (local and Ray runs then compute the same numbers), no usage reporting, and no
    cluster address inherited from a test that joined one."""
    return {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"} | {
        "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def sweep(config: Path, results: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kvpolicies.cli", "sweep", "--config", str(config), "--results", str(results),
               "--no-plots", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env())


@contextlib.contextmanager
def started_sweep(config: Path, results: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """A sweep running in the background, killed when the test leaves it running (a failed assertion)."""
    command = [sys.executable, "-m", "kvpolicies.cli", "sweep", "--config", str(config), "--results", str(results),
               "--no-plots", *extra]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    try:
        yield driver
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()


def records(results: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in results.glob("*.json")}


def outcome(found: dict[str, dict]) -> dict[str, tuple]:
    """What must not depend on where a cell ran: its status, score and every metric."""
    return {key: (r["status"], r["score"], r["metrics"]) for key, r in found.items()}


def write_grid(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def local_reference(tiny_pretrained, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The grid run by the local executor: what every Ray run must reproduce."""
    folder = tmp_path_factory.mktemp("ray-sweeps")
    config = write_grid(folder / "grid.yaml", grid(tiny_pretrained))
    done = sweep(config, folder / "local")
    assert done.returncode == 0, done.stderr[-2000:]
    found = records(folder / "local")
    assert len(found) == 7 and all(r["status"] == "ok" for r in found.values())
    return config, found


@pytest.fixture(scope="module")
def two_cpus() -> Iterator[str]:
    """The address of a one-node Ray cluster of 2 CPUs, started by this process (its workers are our children)."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        yield cluster.address
        cluster.shutdown()


def kill_a_worker_mid_cell(timeout: float = 600) -> None:
    """SIGKILL one of this test's Ray workers while it computes a cell (Ray titles it ``ray::SweepWorker.evaluate``
    meanwhile); workers of any other Ray on the machine are not ours to touch."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for process in psutil.Process().children(recursive=True):
            try:
                if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::SweepWorker.evaluate"):
                    process.send_signal(signal.SIGKILL)
                    return
            except psutil.Error:  # gone between the listing and the look
                continue
        time.sleep(0.05)
    raise AssertionError("no Ray worker started a cell")


def test_a_cluster_that_cannot_be_joined_is_refused_with_the_fix(tiny_pretrained, tmp_path, monkeypatch):
    from kvpolicies.experiments.ray_executor import RayExecutor

    from ray._common.utils import get_ray_address_file

    if any(process.info["name"] == "gcs_server" for process in psutil.process_iter(["name"])):
        pytest.skip("a Ray cluster runs on this machine: --address auto would join it")
    if os.path.exists(get_ray_address_file(None)):
        pytest.skip("a Ray cluster left its address here: --address auto would wait for it")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = SweepConfig.model_validate(grid(tiny_pretrained, policies=("full",)))
    executor = RayExecutor(Execution(executor="ray", address="auto"))
    with pytest.raises(UsageError, match=r"cannot join the Ray cluster at auto: Could not find any running Ray "
                                         r"instance.*; start one with `ray start --head`"):
        list(run_sweep(config, tmp_path / "none", progress=False, executor=executor))


def test_ray_fills_the_same_files_as_the_local_executor_and_shares_a_folder_with_it(local_reference, tmp_path):
    config, expected = local_reference
    shared = tmp_path / "shared"
    first = sweep(config, shared, "--policies", "full,random")  # a local run fills part of the folder
    assert first.returncode == 0, first.stderr[-2000:]

    done = sweep(config, shared, "--executor", "ray")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "7 cells, 3 already done, 4 to run" in done.stderr
    found = records(shared)
    assert set(found) == set(expected)  # same keys, same file names
    assert outcome(found) == outcome(expected)
    by_ray = [r for r in found.values() if r["cell"]["policy"]["name"] in ("streaming", "snapkv")]
    assert len(by_ray) == 4 and all(r["worker"]["node_id"] for r in by_ray)  # computed on Ray workers


def test_a_worker_killed_mid_group_loses_only_its_unfinished_cells_which_are_retried(local_reference, two_cpus,
                                                                                     tmp_path):
    config, expected = local_reference
    with started_sweep(config, tmp_path / "retried", "--executor", "ray", "--address", two_cpus) as driver:
        kill_a_worker_mid_cell()
        _, stderr = driver.communicate(timeout=900)
    assert driver.returncode == 0, stderr[-2000:]
    assert "worker lost during cell" in stderr and "running it again (1/2)" in stderr
    assert outcome(records(tmp_path / "retried")) == outcome(expected)


def test_a_cell_whose_worker_dies_past_the_retries_is_recorded_and_rerun_next_time(local_reference, two_cpus,
                                                                                  tmp_path):
    config, expected = local_reference
    results = tmp_path / "lost"
    with started_sweep(config, results, "--executor", "ray", "--address", two_cpus, "--max-retries", "0") as driver:
        kill_a_worker_mid_cell()
        _, stderr = driver.communicate(timeout=900)
    assert driver.returncode == 1  # failed cells, as locally
    failed = {key: r for key, r in records(results).items() if r["status"] == "error"}
    assert 1 <= len(failed) < 7  # the killed worker's cells; the other worker's half of the task is done
    assert all("worker lost 1 times" in r["error"] for r in failed.values())
    assert len(records(results)) == 7

    rerun = sweep(config, results, "--executor", "ray", "--address", two_cpus)
    assert rerun.returncode == 0 and f"{7 - len(failed)} already done, {len(failed)} to run" in rerun.stderr
    assert outcome(records(results)) == outcome(expected)


def test_a_killed_driver_loses_no_finished_cell_and_the_rerun_resumes(local_reference, two_cpus, tmp_path):
    """Cell by cell (--no-shared-prefill), so that records come one at a time and the driver dies between them."""
    config, expected = local_reference
    results = tmp_path / "resumed"
    alone = ("--executor", "ray", "--address", two_cpus, "--no-shared-prefill")
    with started_sweep(config, results, *alone) as driver:
        deadline = time.time() + 600
        while len(list(results.glob("*.json"))) < 2 and time.time() < deadline and driver.poll() is None:
            time.sleep(0.05)
        driver.kill()  # SIGKILL: no clean-up of any kind
        driver.communicate()
    before = records(results)
    assert 2 <= len(before) < 7 and all(read_record(path) for path in results.glob("*.json"))

    rerun = sweep(config, results, *alone)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(before)} already done" in rerun.stderr
    after = records(results)
    assert outcome(after) == outcome(expected)
    assert all(after[key]["finished_at"] == before[key]["finished_at"] for key in before)  # not recomputed
    rerun_workers = {after[key]["worker"]["pid"] for key in set(after) - set(before)}
    assert len(rerun_workers) <= 2 < len(after) - len(before)  # 2 CPUs, 2 workers, each kept for several cells


def test_a_model_no_worker_can_load_stops_the_sweep_with_one_error(tiny_pretrained, two_cpus, tmp_path):
    """The driver does not load models on Ray (its workers may see other files): the first worker that cannot load
    the model stops the sweep with that error, and no failure file is written for any of its cells."""
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_pretrained, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = write_grid(tmp_path / "grid.yaml", grid(str(broken), policies=("full", "random")))
    done = sweep(config, tmp_path / "out", "--executor", "ray", "--address", two_cpus)
    errors = [line for line in done.stderr.splitlines() if line.startswith("kvpolicies: error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert f"cannot load model '{broken}'" in errors[0] and errors[0].endswith("(on a Ray worker)")
    assert not list((tmp_path / "out").glob("*.json"))


@pytest.fixture
def cluster(monkeypatch):
    """A Ray cluster of several simulated nodes on this machine (Ray's own test cluster): a head without GPUs, and
    nodes added by the test with fake GPU resources."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    yield head
    ray.shutdown()
    head.shutdown()


def test_cells_spread_over_gpu_nodes_one_gpu_each_and_a_late_node_gets_work(tiny_pretrained, cluster, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # One GPU on the first node: its one worker is still busy with the grid when the late node's workers have
    # started (a new node's worker takes seconds to start, a tiny model's cell less than one).
    first_node = cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    config = SweepConfig.model_validate(grid(tiny_pretrained, policies=("full", "random", "streaming", "snapkv"),
                                             budgets=[i / 10 for i in range(1, 10)]))
    from kvpolicies.experiments.ray_executor import RayExecutor

    executor = RayExecutor(Execution(executor="ray", gpus_per_cell=1, cpus_per_cell=0.5))
    late_node = None
    done = []
    # Cell by cell: a task's cells shared as one group would all go to the first node's worker before the late
    # node joins, leaving it nothing to take.
    for record in run_sweep(config, tmp_path / "cluster", progress=False, executor=executor, share_prefill=False):
        done.append(record)
        if late_node is None:  # the sweep is under way: a second node joins
            late_node = cluster.add_node(num_cpus=2, num_gpus=2)

    assert len(done) == len(cells(config)) == 28 and all(r.status == "ok" for r in done)
    nodes = {r.worker.node_id for r in done}
    assert nodes == {first_node.node_id, late_node.node_id}  # the late node ran cells; the GPU-less head none
    assert all(len(r.worker.gpu_ids) == 1 for r in done)  # --gpus-per-cell 1
    for node in nodes:  # at most as many cells at once on a node as it has GPUs, each on its own GPU
        ran = [r for r in done if r.worker.node_id == node]
        gpus = 1 if node == first_node.node_id else 2
        assert {gpu for r in ran for gpu in r.worker.gpu_ids} <= {str(gpu) for gpu in range(gpus)}
        for moment in (r.started_at for r in ran):
            running = [r for r in ran if r.started_at <= moment < r.finished_at]
            assert len(running) <= gpus and len({r.worker.gpu_ids[0] for r in running}) == len(running)


def test_a_cluster_that_fits_no_cell_is_refused_with_the_fix(tiny_pretrained, cluster, tmp_path):
    cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    from kvpolicies.experiments.ray_executor import RayExecutor

    config = SweepConfig.model_validate(grid(tiny_pretrained, policies=("full",)))
    executor = RayExecutor(Execution(executor="ray", gpus_per_cell=2))
    with pytest.raises(UsageError, match=r"no node of the Ray cluster fits one cell at 1 CPU\(s\) and 2 GPU\(s\) "
                                         r"\(the cluster has 3 CPUs and 1 GPUs\); lower --cpus-per-cell"):
        list(run_sweep(config, tmp_path / "none", progress=False, executor=executor))
    assert not list((tmp_path / "none").glob("*.json"))


@pytest.mark.slow  # the real embedded model, 9 cells twice: about 2 minutes
def test_the_quick_grid_through_ray_gives_the_local_executors_files(tmp_path):
    local = subprocess.run([sys.executable, "-m", "kvpolicies.cli", "sweep", "--quick", "--limit", "1", "--no-plots",
                            "--results", str(tmp_path / "local")], capture_output=True, text=True, env=env())
    assert local.returncode == 0, local.stderr[-2000:]
    on_ray = subprocess.run([sys.executable, "-m", "kvpolicies.cli", "sweep", "--quick", "--limit", "1", "--no-plots",
                             "--results", str(tmp_path / "ray"), "--executor", "ray"],
                            capture_output=True, text=True, env=env())
    assert on_ray.returncode == 0, on_ray.stderr[-2000:]
    expected, found = records(tmp_path / "local"), records(tmp_path / "ray")
    assert len(expected) == 9 and set(found) == set(expected)
    assert outcome(found) == outcome(expected)



def stand_in_slots(count: int) -> list:
    """Started workers whose calls go nowhere: the driver's dispatch without a cluster."""
    from types import SimpleNamespace

    from kvpolicies.experiments.ray_executor import _Slot

    call = SimpleNamespace(remote=lambda cells_json, together=True: object())
    worker = SimpleNamespace(evaluate=SimpleNamespace(options=lambda **options: call))
    return [_Slot(actor=worker, started=True) for _ in range(count)]


def test_the_driver_claims_cells_as_workers_take_them_not_all_at_the_start():
    """Each taken cell holds a claim (an open file): a grid of thousands must not hold thousands, nor keep a second
    sweep on the folder from sharing the work. No cluster needed: the driver's dispatch with two stand-in workers."""
    from kvpolicies.experiments.ray_executor import RayExecutor, _State

    grid_cells = cells(SweepConfig.model_validate(grid("m", policies=("random",), budgets=[i / 20 for i in range(1, 20)])))
    taken: list = []

    def todo():
        for cell in grid_cells:  # one cell at a time, as with --no-shared-prefill
            taken.append(cell)  # taking a cell is claiming it (run_sweep's generator)
            yield [cell]

    state = _State(todo=todo())
    state.slots = stand_in_slots(2)
    RayExecutor(Execution(executor="ray"))._dispatch(state)
    assert [len(slot.busy) for slot in state.slots] == [1, 1]  # each worker got a cell
    assert len(taken) <= 4 < len(grid_cells)  # and at most a worker's worth more is held ahead


def test_a_task_shared_by_fewer_groups_than_workers_is_split_between_them():
    """One task's cells share each prefill as one group; with two free workers it is split in two halves (the
    records are the same apart), never left to one worker while the other idles. Groups enough for every worker
    are left whole."""
    from kvpolicies.experiments.ray_executor import RayExecutor, _State

    config = SweepConfig.model_validate(grid("m", policies=("random",), budgets=[i / 20 for i in range(1, 20)]))
    one_task = cells(config)
    state = _State(todo=iter([one_task]))
    state.slots = stand_in_slots(2)
    RayExecutor(Execution(executor="ray"))._dispatch(state)
    halves = [slot.busy for slot in state.slots]
    assert len(one_task) == 20 and [len(half) for half in halves] == [10, 10] and halves[0] + halves[1] == one_task

    state = _State(todo=iter([one_task[:5], one_task[5:12], one_task[12:]]))
    state.slots = stand_in_slots(2)
    RayExecutor(Execution(executor="ray"))._dispatch(state)
    assert [slot.busy for slot in state.slots] == [one_task[:5], one_task[5:12]]
    assert list(state.queue) == [one_task[12:]]
