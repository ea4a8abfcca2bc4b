"""Inputs that ran before they failed, or ran something else: empty list flags, task metadata, task names, strict
numbers, an unreachable Ray cluster, grids whose rows read alike on the pages, and a plugin's own exceptions.

Each one is now refused up front (or, for a plugin, reported naming it) as ``kvpolicies: error: ...``; none of these
tests loads the embedded model's weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from pydantic import ValidationError

import kvpolicies
from kvpolicies import Budget, CompressedCache, Policy
from kvpolicies.cli import build_parser, main
from kvpolicies.cli.sweeps import sweep_config
from kvpolicies.errors import PluginError, PolicyConfigError, UsageError
from kvpolicies.experiments.grid import SweepConfig
from tests.helpers import TASKS


def parsed(*argv: str):
    return build_parser().parse_args(["sweep", *argv])


def grid_file(tmp_path, **grid) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(grid))  # JSON is YAML
    return str(path)


# -- 1. an empty list flag is a mistake, not the default -----------------------------------------------------------


@pytest.mark.parametrize("flag", ["--policies", "--budgets", "--tasks", "--models", "--protocols"])
@pytest.mark.parametrize(("value", "problem"), [("", "an empty value"), ("  ", "an empty value"),
                                                ("a,,b", "'a,,b' with an empty item"), ("a,", "an empty item")])
def test_an_empty_list_flag_or_item_is_refused_not_read_as_the_default(capsys, flag, value, problem):
    with pytest.raises(SystemExit) as exit_info:
        parsed("--quick", flag, value)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert f"argument {flag}:" in error and problem in error


@pytest.mark.parametrize("flag", ["--policies", "--budgets"])
def test_bench_refuses_an_empty_list_flag_too(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", flag, ""])
    assert exit_info.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err
    assert build_parser().parse_args(["bench"]).budgets == ["0.5", "0.25", "0.1"]


def test_an_empty_preset_is_refused_not_read_as_the_default_grid():
    with pytest.raises(UsageError, match="no preset named ''"):
        sweep_config(parsed("--preset", ""))

@pytest.mark.parametrize("command", [["sweep", "--results"], ["leaderboard", "results", "--plots"], ["leaderboard"],
                                     ["sweep", "--executor", "ray", "--address"], ["report", "policies", "--results"]])
def test_an_empty_path_or_address_is_refused_not_read_as_the_current_folder(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, ""])
    assert exit_info.value.code == 2
    assert "got an empty value" in capsys.readouterr().err


@pytest.mark.parametrize(("execution", "field"), [({"max_retries": True}, "max_retries"),
                                                  ({"cpus_per_cell": True}, "cpus_per_cell"),
                                                  ({"address": " "}, "address")])
def test_a_grid_files_ray_settings_take_no_booleans_or_empty_addresses(execution, field):
    with pytest.raises(ValidationError, match=field):
        SweepConfig(execution={"executor": "ray", **execution})



# -- 2. task metadata: types, ranges, unknown keys, and lengths against the model ---------------------------------


@pytest.mark.parametrize(("task", "metadata", "named"), [
    ("kvp_passkey", {"lengths": [-100]}, ["lengths.0", "-100", ">= 120"]),
    ("kvp_passkey", {"lengths": [64]}, ["lengths.0", "64"]),
    ("kvp_niah", {"depths": [5.0]}, ["depths.0", "5.0", "[0, 1]"]),
    ("kvp_passkey_text", {"per_cell": -1}, ["per_cell", "-1", ">= 1"]),
    ("kvp_passkey", {"lengths": "2048"}, ["lengths", "'2048'", "a list"]),
    ("kvp_passkey", {"lengths": []}, ["lengths", "[]"]),
    ("kvp_passkey", {"seed": True}, ["seed", "True"]),
    ("kvp_passkey", {"length": [2048]}, ["length", "Extra inputs", "accepts lengths"]),
    ("kvp_ppl", {"per_length": 0}, ["per_length", "0"]),
    ("kvp_ppl", {"depths": [0.5]}, ["depths", "Extra inputs"]),
    ("kvp_ruler_niah_single_1", {"max_seq_lengths": [64]}, ["max_seq_lengths.0", "64", ">= 512"]),
    ("kvp_ruler_niah_single_1", {"max_seq_lengths": [-4096]}, ["max_seq_lengths.0", "-4096"]),
    ("kvp_ruler_niah_single_1", {"max_seq_lengths": 4096}, ["max_seq_lengths", "4096", "a list"]),
    ("kvp_ruler_vt", {"max_seq_lengths": [512]}, ["max_seq_lengths.0", "512", ">= 1024"]),
    ("kvp_ruler", {"max_seq_lengths": [768]}, ["max_seq_lengths.0", "768", ">= 1024"]),
    ("kvp_ruler_cwe", {"lengths": [4096]}, ["lengths", "Extra inputs", "accepts max_seq_lengths"]),
])
def test_bad_task_metadata_in_a_grid_is_refused_naming_the_field_and_value(tmp_path, task, metadata, named):
    path = grid_file(tmp_path, policies=["full"], tasks=[{"name": task, "metadata": metadata}])
    with pytest.raises(UsageError) as error:
        sweep_config(parsed("--config", path))
    message = str(error.value)
    assert message.startswith(f"task {task}: invalid metadata")
    assert all(part in message for part in named), message


def test_valid_metadata_and_the_presets_pass(tmp_path):
    metadata = {"lengths": [200, 1024], "depths": [0, 0.5, 1], "per_cell": 2, "seed": 3}
    path = grid_file(tmp_path, policies=["full"], tasks=[{"name": "kvp_passkey", "metadata": metadata}])
    assert sweep_config(parsed("--config", path)).tasks[0].metadata == metadata
    assert len(sweep_config(parsed("--preset", "ruler")).reference_tasks) == 13
    sweep_config(parsed("--quick"))
    sweep_config(parsed())  # the default grid


@pytest.mark.parametrize(("task", "metadata", "named"), [
    ("kvp_passkey", {"lengths": [8192]}, ["lengths 8192", "8192 positions", "12 tokens it generates", "at most 8180"]),
    ("kvp_niah", {"lengths": [2048, 8185]}, ["lengths 8185 ", "at most 8176"]),
    ("kvp_ppl", {"lengths": [9000]}, ["lengths 9000", "at most 8192"]),
    ("kvp_ruler_vt", {"max_seq_lengths": [10**8]}, ["max_seq_lengths 100000000", "at most 8192"]),
])
def test_lengths_past_the_embedded_models_positions_are_refused_before_it_loads(tmp_path, task, metadata, named):
    path = grid_file(tmp_path, policies=["full"], tasks=[{"name": task, "metadata": metadata}])
    with pytest.raises(UsageError) as error:
        sweep_config(parsed("--config", path))
    assert "smollm2-135m-instruct" in str(error.value)
    assert all(part in str(error.value) for part in named), str(error.value)


def test_lengths_are_checked_against_each_models_config_without_its_weights(tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "short-model"
    LlamaConfig(max_position_embeddings=1024).save_pretrained(folder)  # a config, no weights: none are read
    metadata = {"lengths": [512, 1020]}
    path = grid_file(tmp_path, models=[None, str(folder)], policies=["full"],
                     tasks=[{"name": "kvp_passkey", "metadata": metadata}])
    with pytest.raises(UsageError, match=rf"lengths 1020 do not fit model {folder}, trained for 1024 positions.*"
                                         "at most 1012"):
        sweep_config(parsed("--config", path))


def test_a_model_whose_config_is_not_here_skips_only_the_length_check(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    far = grid_file(tmp_path, models=["kvpolicies-test/not-a-model"], policies=["full"],
                    tasks=[{"name": "kvp_passkey", "metadata": {"lengths": [10**6]}}])
    assert sweep_config(parsed("--config", far)).models == ["kvpolicies-test/not-a-model"]
    bad = grid_file(tmp_path, models=["kvpolicies-test/not-a-model"], policies=["full"],
                    tasks=[{"name": "kvp_passkey", "metadata": {"lengths": [-1]}}])
    with pytest.raises(UsageError, match="lengths.0"):
        sweep_config(parsed("--config", bad))


@pytest.mark.parametrize(("limit", "refused"), [(None, True), (31, True), (30, False), (1, False)])
def test_default_lengths_are_checked_as_far_as_the_limit_reaches(tmp_path, limit, refused):
    # passkey's defaults are 1024..8192, 10 samples each (5 depths x 2); 8192 and its answer overflow 8192 positions
    path = grid_file(tmp_path, policies=["full"], tasks=[{"name": "kvp_passkey", "limit": limit}])
    if not refused:
        assert sweep_config(parsed("--config", path)).tasks[0].limit == limit
        return
    with pytest.raises(UsageError, match=r"its default lengths \(1024, 2048, 4096, 8192\) include 8192, which does "
                                         r"not fit .*at most 8180; or a limit of at most 30 samples"):
        sweep_config(parsed("--config", path))


def test_a_model_config_that_reaches_the_cache_later_is_read_then(monkeypatch):
    import transformers
    from transformers import LlamaConfig

    from kvpolicies_evals.metadata import model_positions

    cached: list = []

    def from_pretrained(source, **options):  # the local hub cache, which a model's first load fills
        if not cached:
            raise OSError("not in the local cache")
        return cached[0]

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    assert model_positions("kvpolicies-test/arrives-later") is None
    cached.append(LlamaConfig(max_position_embeddings=1024))
    assert model_positions("kvpolicies-test/arrives-later") == 1024


def test_the_loaders_check_their_own_keys_and_ignore_what_lm_eval_merges_in():
    from kvpolicies_evals import ruler
    from kvpolicies_evals.metadata import loader_parameters
    from kvpolicies_evals.tasks.task_data import load

    merged = {"lengths": [200], "pretrained": None, "device": "cpu", "batch_size": 1, "version": 1.0}
    assert loader_parameters("kvp_passkey", merged) == {"lengths": [200]}
    with pytest.raises(UsageError, match=r"depths.0: .* \(got 5.0\)"):
        load("kvp_niah", merged | {"depths": [5.0]})
    with pytest.raises(UsageError, match="lengths 9000 do not fit model smollm2-135m-instruct"):
        load("kvp_passkey", merged | {"lengths": [9000]})
    with pytest.raises(UsageError, match=r"max_seq_lengths.0: .*1024 \(got 512\)"):
        ruler.generate("vt", {"max_seq_lengths": [512], "pretrained": None, "version": 1.0})
    with pytest.raises(UsageError, match="max_seq_lengths 100000000 do not fit"):  # built for minutes, or hung
        ruler.generate("niah_single_1", {"max_seq_lengths": [10**8], "pretrained": None})


def test_lm_eval_metadata_errors_end_as_a_kvpolicies_error(capsys):
    argv = ["lm-eval", "--model", "dummy", "--tasks", "kvp_passkey", "--include_path", TASKS,
            "--metadata", json.dumps({"depths": [5.0]}), "--limit", "1"]
    assert main(argv) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("kvpolicies: error: task kvp_passkey: invalid metadata: depths.0") and "5.0" in last


# -- 3. task names and strict numbers, before anything loads ------------------------------------------------------


def test_an_unknown_task_is_refused_with_close_names_before_a_model_loads(monkeypatch):
    from kvpolicies.experiments import runner

    monkeypatch.setattr(runner, "cell_model", lambda cell: pytest.fail("a model was loaded"))
    with pytest.raises(UsageError) as error:
        sweep_config(parsed("--quick", "--tasks", "kvp_passkey,kvp_paskey"))
    assert "unknown task 'kvp_paskey'; did you mean 'kvp_passkey'" in str(error.value)
    with pytest.raises(UsageError, match="unknown task 'kvp_ruler_vtt'; did you mean 'kvp_ruler_vt'"):
        sweep_config(parsed("--quick", "--tasks", "kvp_ruler_vtt"))


def test_lm_evals_own_tasks_are_known_and_suggested():
    assert [task.name for task in sweep_config(parsed("--quick", "--tasks", "hellaswag")).tasks] == ["hellaswag"]
    with pytest.raises(UsageError, match="unknown task 'hellaswagg'; did you mean 'hellaswag'"):
        sweep_config(parsed("--quick", "--tasks", "hellaswagg"))


@pytest.mark.parametrize(("grid", "field"), [
    ({"seed": True}, "seed"), ({"seed": "1"}, "seed"), ({"batch_size": True}, "batch_size"),
    ({"tasks": [{"name": "kvp_passkey", "limit": True}]}, "tasks.0.limit"),
])
def test_seed_batch_size_and_limit_are_whole_numbers_not_booleans(tmp_path, grid, field):
    with pytest.raises(ValidationError) as error:
        SweepConfig.model_validate(grid)
    assert [".".join(map(str, e["loc"])) for e in error.value.errors()] == [field]
    with pytest.raises(UsageError, match=rf"invalid sweep config .*: {field}: Input should be a valid integer"):
        sweep_config(parsed("--config", grid_file(tmp_path, **grid)))


# -- 4. an unreachable Ray cluster is a clean error within seconds -----------------------------------------------


@pytest.fixture
def dead_address():
    """HOST:PORT of a bound socket that does not listen: a connection is refused, and no one else takes the port."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{held.getsockname()[1]}"


def test_an_address_where_nothing_listens_is_refused_before_ray_init(monkeypatch, dead_address):
    pytest.importorskip("ray")
    import ray

    from kvpolicies.experiments.execution import Execution
    from kvpolicies.experiments.ray_executor import RayExecutor

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("ray.init retries for minutes here"))
    started = time.perf_counter()
    with pytest.raises(UsageError) as error:
        RayExecutor(Execution(executor="ray", address=dead_address))._connect()
    assert time.perf_counter() - started < 5
    assert f"cannot join the Ray cluster at {dead_address}: nothing accepted a connection there within 5 s" in str(
        error.value)


def test_a_sweep_on_an_unreachable_cluster_ends_within_seconds(tmp_path, dead_address):
    pytest.importorskip("ray")
    argv = [sys.executable, "-m", "kvpolicies.cli", "sweep", "--executor", "ray", "--address", dead_address,
            "--policies", "full", "--tasks", "kvp_passkey", "--limit", "1", "--results", str(tmp_path / "results"), "--no-plots"]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert time.perf_counter() - started < 90  # Python, torch and lm-eval's imports; Ray's retries took minutes
    assert f"kvpolicies: error: cannot join the Ray cluster at {dead_address}" in done.stderr.splitlines()[-1]


# -- 5. grids whose rows would merge on the pages ----------------------------------------------------------------


@pytest.mark.parametrize(("policies", "named"), [
    ([{"name": "snapkv", "label": "fast"}, {"name": "l2norm", "label": "fast"}],
     ["{name: snapkv, label: fast}", "{name: l2norm, label: fast}", "'fast'"]),
    ([{"name": "snapkv", "label": "l2norm"}, "l2norm"], ["{name: snapkv, label: l2norm}", "{name: l2norm}"]),
    (["l2norm", {"name": "l2norm", "options": {"window_tokens": 4}}],
     ["{name: l2norm}", "{name: l2norm, options: {'window_tokens': 4}}"]),
    ([{"name": "l2norm", "label": "full"}], ["{name: full}", "{name: l2norm, label: full}"]),
])
def test_two_policies_under_one_title_are_refused_naming_both(policies, named):
    with pytest.raises(ValidationError) as error:
        SweepConfig(policies=policies)
    message = str(error.value)
    assert all(part in message for part in named) and "give each a distinct label" in message, message


def test_distinct_labels_and_equal_budget_spellings_are_fine():
    config = SweepConfig(policies=["l2norm", {"name": "l2norm", "options": {"window_tokens": 4}, "label": "l2+w"}],
                         budgets=[0.5, "50%"])
    assert [spec.title for spec in config.policies] == ["l2norm", "l2+w"]


def test_budgets_that_differ_only_in_slack_are_refused():
    with pytest.raises(ValidationError) as error:
        SweepConfig(budgets=[0.5, {"value": 0.5, "slack_tokens": 0}])
    message = str(error.value)
    assert "budgets 0.5 (slack_tokens 16) and 0.5 (slack_tokens 0)" in message and "keep one of them" in message


# -- 6. a plugin's own exception names the plugin ----------------------------------------------------------------


class Flaky(Policy):
    """Keeps the newest entries; the hook named by ``broken`` raises, as a plugin's bug would."""

    name = "flaky"
    broken = "score"

    def __init__(self, **options) -> None:
        if self.broken == "__init__":
            raise FileNotFoundError("scores.json")
        super().__init__(**options)

    def score(self, inputs):
        if self.broken == "score":
            raise ZeroDivisionError("division by zero")
        return inputs.order.float()

    def allocate(self, allocation):
        if self.broken == "allocate":
            raise KeyError("layer_weights")
        return allocation

    def reallocate_heads(self, scores, valid, keep):
        if self.broken == "reallocate_heads":
            raise IndexError("head 7")
        return keep


HOOKS = {"score": ZeroDivisionError, "allocate": KeyError, "reallocate_heads": IndexError,
         "__init__": FileNotFoundError}
FLAKY = {hook: type(f"Flaky_{hook.strip('_')}", (Flaky,), {"name": f"flaky-{hook.strip('_')}", "broken": hook})
         for hook in HOOKS}


@pytest.fixture
def flaky_plugin(fresh_registry):
    class Plugin:
        @kvpolicies.hookimpl
        def register_policies(self, register):
            for policy_class in FLAKY.values():
                register(policy_class)

    kvpolicies.registry.registry().register_plugin(Plugin(), name="flaky-plugin")


def prefill(model, policy: Policy) -> None:
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 20)), cache=CompressedCache(model, policy, Budget(value=0.5, slack_tokens=0)))


@pytest.mark.parametrize("hook", HOOKS)
def test_a_plugins_exception_in_a_hook_is_a_plugin_error_naming_it(tiny_model, flaky_plugin, hook):
    with pytest.raises(PluginError) as error:
        prefill(tiny_model, kvpolicies.get_policy(FLAKY[hook].name))
    message = str(error.value)
    for part in (f"policy {FLAKY[hook].name!r}", "plugin 'flaky-plugin' of package tests.test_inputs",
                 f"raised {HOOKS[hook].__name__} in {hook}()"):
        assert part in message, message
    assert type(error.value.__cause__) is HOOKS[hook]  # chained: --debug shows the plugin's traceback


def test_an_unregistered_policy_is_named_by_its_class_and_our_own_errors_pass_unchanged(tiny_model):
    with pytest.raises(PluginError, match="class Flaky of module tests.test_inputs, not a registered plugin"):
        prefill(tiny_model, Flaky())

    ours = PolicyConfigError("policy 'checked': a framework helper refused what it was given")

    class Checked(Flaky):
        name, broken = "checked", None

        def score(self, inputs):  # an error of ours, raised by code the plugin called, is clear already
            raise ours

    with pytest.raises(PolicyConfigError) as error:
        prefill(tiny_model, Checked())
    assert error.value is ours


@pytest.mark.parametrize("error", [MemoryError("host"), torch.OutOfMemoryError("CUDA out of memory")])
def test_running_out_of_memory_in_a_hook_is_the_machines_error_not_the_plugins(tiny_model, error):
    class Hungry(Flaky):
        name, broken = "hungry", None

        def score(self, inputs):  # a big score tensor: the machine's limit, which a caller may catch to retry
            raise error

    with pytest.raises(type(error)) as raised:
        prefill(tiny_model, Hungry())
    assert raised.value is error


def test_the_package_of_an_installed_plugin_is_its_distribution():
    assert {info.package for info in kvpolicies.list_policies() if info.name in ("l2norm", "full")} == {"kvpolicies"}


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_plugins_traceback_before_the_error(capsys, flaky_plugin, tiny_pretrained, where):
    command = ["generate", "--model", tiny_pretrained, "--policy", "flaky-score", "--raw", "--max-new-tokens", "1",
               "a longer prompt than its budget " * 4]
    assert main(command) == 2
    plain = capsys.readouterr().err
    assert "Traceback" not in plain
    assert plain.splitlines()[-1].startswith("kvpolicies: error: policy 'flaky-score' (plugin 'flaky-plugin'")
    assert main(["--debug", *command] if where == "before" else [*command, "--debug"]) == 2
    shown = capsys.readouterr().err
    assert shown.index("Traceback") < shown.index("ZeroDivisionError: division by zero") < shown.index(
        "kvpolicies: error: policy 'flaky-score'")


def test_kvpolicies_debug_shows_the_traceback_for_lm_eval_too(capsys, monkeypatch, flaky_plugin, tiny_pretrained):
    monkeypatch.setenv("KVPOLICIES_DEBUG", "1")
    argv = ["lm-eval", "--model", "kvpolicies", "--model_args", f"pretrained={tiny_pretrained},policy=flaky-init",
            "--tasks", "kvp_passkey", "--include_path", TASKS, "--limit", "1"]
    assert main(argv) == 2
    shown = capsys.readouterr().err
    assert shown.index("Traceback") < shown.index("FileNotFoundError: scores.json") < shown.index(
        "kvpolicies: error: policy 'flaky-init' (plugin 'flaky-plugin' of package tests.test_inputs) raised "
        "FileNotFoundError in __init__(): scores.json")


def test_a_sweep_cell_records_which_plugin_failed(flaky_plugin, tiny_pretrained):
    from kvpolicies.experiments.grid import cells
    from kvpolicies.experiments.runner import evaluate

    config = SweepConfig(models=[tiny_pretrained], policies=["flaky-score"], budgets=[0.5], tasks=[
        {"name": "kvp_passkey", "metadata": {"lengths": [200], "depths": [0.5], "per_cell": 1}, "limit": 1}])
    (cell,) = [cell for cell in cells(config) if cell.policy.name == "flaky-score"]
    record = evaluate(cell)
    assert record.status == "error"
    assert record.error.startswith("PluginError: policy 'flaky-score' (plugin 'flaky-plugin' of package "
                                   "tests.test_inputs) raised ZeroDivisionError in score(): division by zero")
