"""Sweeps: grid expansion, stable cell keys, resumability after a kill, failures recorded; leaderboards offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from kvpolicies import get_policy
from kvpolicies.engine.budget import Budget
from kvpolicies.errors import UsageError
from kvpolicies.experiments.code_version import code_version
from kvpolicies.experiments.grid import SweepConfig, cells
from kvpolicies.integrations.loading import Loading
from kvpolicies.experiments.sweep import run_sweep
from kvpolicies.experiments.results import ResultRecord, load_results, write_record
from kvpolicies.integrations.protocol import Protocol
from kvpolicies.reports.leaderboard import (
    load_rows,
    overall_table,
    plot,
    render,
    task_tables,
)
from tests.helpers import make_record, write_records


def test_grid_runs_the_full_cache_once_per_task():
    config = SweepConfig(policies=["full", "l2norm", "random"], budgets=[0.25, 0.5], tasks=["kvp_passkey", "kvp_ppl"])
    grid = cells(config)
    assert len(grid) == 2 * (1 + 2 * 2)
    assert [str(c.budget) for c in grid if c.policy.name == "full"] == ["1", "1"]
    assert len({c.key() for c in grid}) == len(grid)


def test_cell_keys_change_with_anything_that_changes_the_result():
    base = cells(SweepConfig(policies=["l2norm"], budgets=[0.5], tasks=["kvp_passkey"]))[0]
    assert base.key() == cells(SweepConfig(policies=["l2norm"], budgets=["50%"], tasks=["kvp_passkey"]))[0].key()
    variants = [
        base.model_copy(update={"budget": Budget.parse(0.25)}),
        base.model_copy(update={"seed": 1}),
        base.model_copy(update={"model": "other/model"}),
        base.model_copy(update={"policy": base.policy.model_copy(update={"options": {"window_tokens": 4}})}),
        base.model_copy(update={"task": base.task.model_copy(update={"limit": 3})}),
        base.model_copy(update={"protocol": Protocol.QUERY_AGNOSTIC}),
        base.model_copy(update={"policy": base.policy.model_copy(update={"codec": "int4"})}),
    ]
    assert len({base.key(), *(v.key() for v in variants)}) == 8


def test_a_codec_in_a_grid_is_part_of_the_cell_its_version_and_its_name_on_the_pages():
    from kvpolicies.experiments import code_version as versions

    config = SweepConfig(policies=["snapkv", {"name": "snapkv", "codec": "int4"}], budgets=[0.25],
                         tasks=["kvp_passkey"])
    grid = cells(config)
    assert sorted(cell.title for cell in grid) == ["full", "snapkv", "snapkv + int4"]
    coded = next(cell for cell in grid if cell.policy.codec == "int4")
    assert coded.identity()["codec"] == "int4" and "codec" not in grid[0].identity()
    before = coded.identity()["code_version"]
    assert before.split("/")[1] != next(c for c in grid if c.title == "snapkv").identity()["code_version"].split("/")[1]
    assert "quantized.py" in {path.name for path in versions.codec_files("int4")}  # an edit reruns its cells
    assert code_version(get_policy("snapkv"), None, "int4") != code_version(get_policy("snapkv"))
    snapkv = get_policy("snapkv")  # full precision: the policy's own files beyond the core, as before codecs
    own = versions.digest(versions.policy_files(snapkv) - versions.core_files())[:8]
    assert code_version(snapkv).split("/")[1] == own
    with_codec = versions.digest((versions.policy_files(snapkv) | versions.codec_files("int4")) - versions.core_files())
    assert code_version(snapkv, None, "int4").split("/")[1] == with_codec[:8]
    with pytest.raises(ValidationError, match="keeps every entry, so codec 'int4' alone sets its bytes"):
        SweepConfig(policies=[{"name": "full", "codec": "int4"}])
    with pytest.raises(ValidationError, match="unknown codec 'int5'"):
        SweepConfig(policies=[{"name": "snapkv", "codec": "int5"}])


def test_the_sweep_command_gives_every_evicting_policy_the_codec_and_the_reference_none():
    from kvpolicies.cli import build_parser
    from kvpolicies.cli.sweeps import sweep_config

    config = sweep_config(build_parser().parse_args(["sweep", "--quick", "--codec", "int8"]))
    codecs = {spec.name: spec.codec for spec in config.resolved_policies()}
    assert codecs == {"l2norm": "int8", "random": "int8", "streaming": "int8", "snapkv": "int8", "full": "full"}



def test_compression_ratios_in_a_grid_or_on_the_command_line_are_the_budgets_they_mean(tmp_path):
    from kvpolicies.cli import build_parser
    from kvpolicies.cli.sweeps import sweep_config

    by_budget = sweep_config(build_parser().parse_args(["sweep", "--quick", "--budgets", "0.75,0.125"]))
    by_ratio = sweep_config(build_parser().parse_args(["sweep", "--quick", "--compression-ratios", "0.25,0.875"]))
    assert [c.key() for c in cells(by_ratio)] == [c.key() for c in cells(by_budget)]  # the same cells
    grid = SweepConfig.model_validate({"compression_ratios": [0.25, 0.875], "policies": ["snapkv"]})
    assert grid.budgets == by_budget.budgets
    with pytest.raises(ValidationError, match="budgets .* or compression_ratios .*not both"):
        SweepConfig.model_validate({"budgets": [0.5], "compression_ratios": [0.5]})
    with pytest.raises(SystemExit):  # one or the other on the command line too
        build_parser().parse_args(["sweep", "--budgets", "0.5", "--compression-ratios", "0.5"])


def test_the_sweep_command_keeps_every_spec_of_a_policy_and_never_merges_two(tmp_path):
    from kvpolicies.cli import build_parser
    from kvpolicies.cli.sweeps import sweep_config

    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"policies": ["snapkv", {"name": "snapkv", "codec": "int4"}, "l2norm"],
                                "budgets": [0.5], "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [1024]}}]}))
    parse = build_parser().parse_args
    config = sweep_config(parse(["sweep", "--config", str(grid), "--policies", "snapkv"]))
    assert [spec.title for spec in config.policies] == ["snapkv", "snapkv + int4"]
    with pytest.raises(UsageError, match="--codec int4 turns two of the grid's policies into one"):
        sweep_config(parse(["sweep", "--config", str(grid), "--codec", "int4"]))


def test_both_protocols_make_two_cells_per_compressing_point_and_are_named_apart():
    config = SweepConfig(policies=["full", "snapkv"], budgets=[0.5], tasks=["kvp_passkey"],
                         protocols=["query_aware", "query_agnostic"])
    grid = cells(config)
    assert sorted(cell.title for cell in grid) == ["full", "snapkv", "snapkv (query-agnostic)"]
    assert {cell.protocol.value for cell in grid if cell.policy.name == "snapkv"} == {"query_aware", "query_agnostic"}
    with pytest.raises(ValidationError, match="unknown protocol 'agnostic'; use query_aware or query_agnostic"):
        SweepConfig(protocols=["agnostic"])


def test_code_version_covers_the_core_and_only_the_plugins_a_policy_is_made_of():
    from kvpolicies import get_policy
    from kvpolicies.experiments.code_version import (
        code_version,
        core_files,
        policy_files,
    )

    def plugins(name: str, **options) -> set[str]:
        return {path.name for path in policy_files(get_policy(name, **options)) - core_files()
                if path.parent.name == "plugins"}

    assert plugins("l2norm") == {"l2norm.py"}
    assert plugins("chunkkv", scorer="tova") == {"chunkkv.py", "tova.py"}
    assert plugins("criticalkv", scorer="headkv", scorer_options={"scorer": "keydiff"}) == {
        "criticalkv.py", "headkv.py", "keydiff.py"
    }
    l2, tova = code_version(get_policy("l2norm")), code_version(get_policy("tova"))
    assert l2 != tova and l2.split("/")[0] == tova.split("/")[0] == code_version()


def test_the_core_version_follows_the_runners_imports_not_a_list_of_file_names():
    """What a cell can execute counts; pages and the command line do not (editing them keeps finished cells)."""
    from kvpolicies.experiments.code_version import core_files, task_files

    core = {f"{path.parent.name}/{path.name}" for path in core_files()}
    assert {"engine/cache.py", "engine/storage.py", "engine/attention.py", "integrations/lm_eval.py",
            "experiments/runner.py", "engine/memory.py", "kvpolicies/registry.py"} <= core
    assert not {name for name in core if name.split("/")[0] in ("reports", "cli")}
    assert "experiments/bench.py" not in core and "experiments/analysis.py" not in core
    assert "experiments/sweep.py" not in core and "experiments/store.py" not in core  # the driver, not the runner
    passkey = {path.name for path in task_files("kvp_passkey")}
    assert {"kvp_passkey.yaml", "utils.py", "data.py"} <= passkey and "kvp_ppl.yaml" not in passkey


def test_a_comment_docstring_or_layout_edit_keeps_the_version_and_a_code_edit_changes_it(tmp_path):
    from kvpolicies.experiments import code_version as versions

    source = Path(versions.__file__).parent.parent / "engine" / "budget.py"  # a core file, as it is
    original = source.read_text()
    assert '"""' in original and "# " in original

    def version_of(text: str, name: str) -> str:
        copy = tmp_path / name / "budget.py"  # same label, another file
        copy.parent.mkdir()
        copy.write_text(text)
        return versions.digest([copy])

    first = version_of(original, "original")
    documented = original.replace('"""One memory budget', '"""Reworded: one memory budget', 1)
    documented = documented.replace("# ", "#  reworded ", 3)
    assert documented != original and version_of(documented, "documented") == first
    assert version_of(original.replace("\n\n\n", "\n\n\n\n"), "spaced") == first
    edited = original.replace('WINDOW_RULES: tuple[WindowRule, ...] = ("share", "keep")',
                              'WINDOW_RULES: tuple[WindowRule, ...] = ("keep", "share")')
    assert edited != original and version_of(edited, "edited") != first
    message = original.replace("cannot read budget", "cannot parse budget", 1)  # what a user reads counts too
    assert message != original and version_of(message, "message") != first


def test_default_grid_is_every_policy_at_four_budgets_on_the_offline_tasks():
    config = SweepConfig()
    assert config.budgets == [Budget.parse(b) for b in (0.1, 0.25, 0.5, 0.75)]
    assert [t.name for t in config.tasks] == ["kvp_passkey", "kvp_niah", "kvp_ppl"]
    assert {"l2norm", "h2o", "snapkv", "full"} <= {p.name for p in config.resolved_policies()}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"budgets": [1.5]}, "(0, 1]"),
        ({"policies": [{"name": "l2norm", "colour": 1}]}, "Extra inputs"),
        ({"tasks": [{"name": "kvp_passkey", "limit": 0}]}, "greater than or equal to 1"),
        ({"grid": []}, "Extra inputs"),
    ],
)
def test_bad_sweep_configs_fail_with_a_clear_message(data, message):
    with pytest.raises((ValidationError, ValueError), match=message.replace("(", r"\(").replace("]", r"\]")):
        SweepConfig.model_validate(data)


def test_sweep_config_reads_yaml_and_toml(tmp_path):
    (tmp_path / "grid.yaml").write_text("policies: [l2norm, {name: snapkv, label: snap}]\nbudgets: [0.5]\n")
    (tmp_path / "grid.toml").write_text('budgets = [0.25]\n[[policies]]\nname = "random"\noptions = {seed = 3}\n')
    assert [p.title for p in SweepConfig.load(tmp_path / "grid.yaml").policies] == ["l2norm", "snap"]
    assert SweepConfig.load(tmp_path / "grid.toml").policies[0].options == {"seed": 3}


def sweep_command(config: Path, results: Path) -> list[str]:
    return [sys.executable, "-m", "kvpolicies.cli", "sweep", "--config", str(config), "--results", str(results),
            "--no-plots"]


def finished(results: Path) -> dict[str, dict]:
    records = (json.loads(p.read_text()) for p in results.glob("*.json"))
    return {r["key"]: r for r in records if r["status"] == "ok"}


def test_a_killed_sweep_resumes_and_ends_with_identical_results(tiny_pretrained, tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text(json.dumps({
        "models": [tiny_pretrained],
        "policies": ["full", "random", "streaming"],
        "budgets": [0.25, 0.5],
        "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [200], "depths": [0.5], "per_cell": 2}}],
    }))
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    process = subprocess.Popen(sweep_command(config, interrupted), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list(interrupted.glob("*.json"))) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # mid-run: some cells done, one in flight
    process.wait()
    done_before = finished(interrupted)
    assert 1 <= len(done_before) < 5

    resumed = subprocess.run(sweep_command(config, interrupted), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(done_before)} already done" in resumed.stderr
    # lm-eval's wrong --metadata hint is corrected, once, and HFLM's warnings on the model a sweep reuses are gone.
    assert "Custom kwargs" not in resumed.stderr and "not of type `str`" not in resumed.stderr
    assert resumed.stderr.count("kvp_passkey: its data parameters go in --metadata") <= 1
    subprocess.run(sweep_command(config, reference), capture_output=True, text=True, timeout=300, check=True)

    after, expected = finished(interrupted), finished(reference)
    assert set(after) == set(expected) and len(after) == 5
    for key in done_before:  # finished cells were not recomputed
        assert after[key]["finished_at"] == done_before[key]["finished_at"]
    assert {k: r["metrics"] for k, r in after.items()} == {k: r["metrics"] for k, r in expected.items()}
    ranking = lambda rows: [(t, [(r[1], r[2]) for r in body]) for t, _, body in task_tables(rows)]  # noqa: E731
    assert ranking(load_rows(load_results(interrupted))[0]) == ranking(load_rows(load_results(reference))[0])


def weightless(tiny_pretrained: str, folder: Path) -> str:
    """A copy of the tiny model without its weights: its config reads, its load fails."""
    import shutil

    shutil.copytree(tiny_pretrained, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return str(folder)


def tiny_grid(*models: str) -> SweepConfig:
    return SweepConfig.model_validate({
        "models": list(models), "policies": ["full", "random"], "budgets": [0.5],
        "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [200], "depths": [0.5], "per_cell": 1}}]})


def test_a_model_missing_offline_stops_the_sweep_before_its_first_cell(tiny_pretrained, tmp_path, monkeypatch,
                                                                      capsys):
    """Was: one failure line and one failure file per cell (237 for the RULER preset), then 'no finished results'.
    The grid's good model comes first: the missing one must stop the sweep before any cell, not after hours."""
    from kvpolicies.cli import main

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what the message reads
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what the hub client read at import
    config = tmp_path / "grid.json"
    config.write_text(tiny_grid(tiny_pretrained, "nobody/no-such-model").model_dump_json())
    assert main(["sweep", "--config", str(config), "--results", str(tmp_path / "out"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kvpolicies: error:")]
    assert len(errors) == 1 and "cannot load model 'nobody/no-such-model'" in errors[0]
    assert "HF_HUB_OFFLINE is set" in errors[0] and "hf download nobody/no-such-model" in errors[0]
    assert not list((tmp_path / "out").glob("*.json"))


def test_a_policy_that_cannot_run_on_a_model_fails_its_cells_and_the_sweep_goes_on(tiny_pretrained, monkeypatch):
    """A plain ModelLoadError mid-cell (expected_attention on interleaved RoPE, say) is that policy's failure; only a
    model that cannot be loaded at all (ModelUnavailable) stops the sweep."""
    from kvpolicies.errors import ModelLoadError, ModelUnavailable
    from kvpolicies.experiments import runner

    [cell] = [c for c in cells(tiny_grid(tiny_pretrained)) if c.policy.name == "random"]

    def refuse(what):
        def run_cell(cell, lm=None):
            raise what("nothing here")
        return run_cell

    monkeypatch.setattr(runner, "run_cell", refuse(ModelLoadError))
    record = runner.evaluate(cell)
    assert record.status == "error" and record.error == "ModelLoadError: nothing here"
    monkeypatch.setattr(runner, "run_cell", refuse(ModelUnavailable))
    with pytest.raises(ModelUnavailable):
        runner.evaluate(cell)


def test_a_calibration_out_of_memory_on_a_models_first_cell_fails_that_cell_and_keeps_the_model(tiny_pretrained,
                                                                                                  monkeypatch):
    """Was: Q-Filters out of memory while calibrating on the first cell of a model read as 'cannot load model' and
    stopped the sweep. The model loaded; only the policy failed on it."""
    from kvpolicies.engine import calibration
    from kvpolicies.experiments import runner

    grid = SweepConfig.model_validate({
        "models": [tiny_pretrained], "policies": ["qfilters", "random"], "budgets": [0.5],
        "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [200], "depths": [0.5], "per_cell": 1}}]})
    by_policy = {c.policy.name: c for c in cells(grid)}

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(calibration, "_queries", out_of_memory)
    monkeypatch.setattr(runner, "_loaded", {})
    record = runner.evaluate(by_policy["qfilters"])
    assert record.status == "error" and record.error.startswith("CalibrationError: policy 'qfilters' could not "
                                                                "calibrate on this model: CUDA out of memory")
    [(model, _)] = runner._loaded.values()  # kept for the next cell, not loaded again
    assert runner.cell_model(by_policy["random"]).model is model


def test_a_model_that_fails_to_load_stops_the_sweep_at_its_first_cell_and_keeps_the_finished_ones(
        tiny_pretrained, tmp_path):
    """Its config reads, so the check before the first cell passes; loading its weights fails: the first cell of
    that model ends the sweep, with no record for it, and the good model's cells stay saved."""
    from kvpolicies.errors import ModelLoadError

    broken = weightless(tiny_pretrained, tmp_path / "no-weights")
    done = []
    with pytest.raises(ModelLoadError, match=rf"cannot load model '{broken}': ") as raised:
        for record in run_sweep(tiny_grid(tiny_pretrained, broken), tmp_path / "out", progress=False):
            done.append(record)
    assert "\n" not in str(raised.value)  # one line, not transformers' whole message
    assert len(done) == 2 and all(r.status == "ok" and r.cell.model == tiny_pretrained for r in done)
    assert len(list((tmp_path / "out").glob("*.json"))) == 2


def fake_record(task, policy, budget, score, higher=True, resident=100.0, full=200.0, status="ok") -> ResultRecord:
    return make_record(task, policy, budget, score, model="m", higher=higher, status=status,
                       key=f"{task}-{policy}-{budget}",
                       kv_memory={"resident_bytes_mean": resident, "full_bytes_mean": full})


@pytest.fixture
def saved_results(tmp_path):
    records = [
        fake_record("acc", "full", 1.0, 0.8, resident=200.0),
        fake_record("acc", "a", 0.25, 0.4), fake_record("acc", "a", 0.5, 0.8),
        fake_record("acc", "b", 0.25, 0.6), fake_record("acc", "b", 0.5, 0.6),
        fake_record("ppl", "full", 1.0, 10.0, higher=False, resident=200.0),
        fake_record("ppl", "a", 0.25, 20.0, higher=False), fake_record("ppl", "a", 0.5, 10.0, higher=False),
        fake_record("ppl", "b", 0.25, 12.5, higher=False), fake_record("ppl", "b", 0.5, 12.5, higher=False),
        fake_record("acc", "c", 0.5, 0.0, status="error"),
    ]
    for record in records:
        write_record(tmp_path / f"{record.key}.json", record)
    return tmp_path


def test_leaderboard_ranks_each_task_and_budget_with_the_right_direction(saved_results):
    rows, failures = load_rows(load_results(saved_results))
    assert len(rows) == 10 and len(failures) == 1
    tables = {title.split(" — ")[0] + "@" + title.split(" — ")[1]: body for title, _, body in task_tables(rows)}
    assert [r[1] for r in tables["acc@budget 0.25 (compression ratio 0.75)"]] == ["b", "a", "full (no eviction)"]
    # lower perplexity first
    assert [r[1] for r in tables["ppl@budget 0.25 (compression ratio 0.75)"]] == ["b", "a", "full (no eviction)"]
    assert [r[1] for r in tables["ppl@budget 0.5 (compression ratio 0.5)"]][:2] == ["a", "b"]


def test_overall_table_compares_with_the_full_cache_and_integrates_over_budgets(saved_results):
    _, headers, body = overall_table(load_rows(load_results(saved_results))[0])
    by_policy = {row[0]: dict(zip(headers, row)) for row in body}
    # a: acc 0.5 and 1.0 of full; ppl 10/20 = 0.5 and 1.0 -> means 0.5 @0.25 and 1.0 @0.5, AUC 0.75
    a = by_policy["a"]
    assert a["@0.25 (cr 0.75)"] == "0.500" and a["@0.5 (cr 0.5)"] == "1.000" and a["AUC"] == "0.750"
    # b: acc 0.75, ppl 0.8 at both budgets
    assert by_policy["b"]["@0.25 (cr 0.75)"] == "0.775" and by_policy["b"]["AUC"] == "0.775"
    assert [row[0] for row in body] == ["b", "a"]


@pytest.mark.parametrize("fmt", ["terminal", "markdown", "csv", "html"])
def test_leaderboard_renders_every_format_and_reports_failures(saved_results, fmt):
    text = render(saved_results, fmt)
    assert "full (no eviction)" in text and "0.775" in text
    if fmt == "html":
        assert "<table>" in text
    if fmt == "csv":
        assert "policy,@0.25 (cr 0.75),@0.5 (cr 0.5),AUC,n tasks,model" in text
    if fmt != "csv":
        assert "RuntimeError: boom" in text


def test_leaderboard_plots_are_written_without_a_model(saved_results, tmp_path):
    pytest.importorskip("matplotlib")
    written = plot(saved_results, tmp_path / "plots")
    assert {p.name for p in written} == {"score_vs_budget.png", "kv_memory_vs_budget.png", "decode_speed_vs_budget.png"}
    assert all(p.stat().st_size > 10_000 for p in written)


def test_the_sweep_command_logs_plot_paths_to_stderr_as_leaderboard_does(saved_results, monkeypatch, capsys):
    """stdout holds the tables (to pipe or redirect), stderr the log lines, ``plot: PATH`` among them."""
    from kvpolicies.cli import main
    from kvpolicies.experiments import sweep
    from kvpolicies.reports import leaderboard

    monkeypatch.setattr(sweep, "run_sweep", lambda config, results, executor=None, share_prefill=True: [])  # the cells are saved
    monkeypatch.setattr(leaderboard, "plot", lambda results, folder, records=None: [folder / "score.png"])
    assert main(["sweep", "--quick", "--results", str(saved_results)]) == 0
    out, err = capsys.readouterr()
    assert f"plot: {saved_results / 'plots' / 'score.png'}" in err
    assert "plot:" not in out and "acc" in out


def test_leaderboard_command_on_a_missing_folder_names_the_fix(capsys, tmp_path):
    from kvpolicies.cli import main

    assert main(["leaderboard", str(tmp_path / "nope")]) == 2
    assert "run `kvpolicies sweep` first" in capsys.readouterr().err


def test_leaderboard_command_writes_markdown_with_provenance_and_plots(saved_results, tmp_path):
    pytest.importorskip("matplotlib")
    from kvpolicies.cli import main

    output = tmp_path / "docs" / "board.md"
    output.parent.mkdir()
    assert main(["leaderboard", str(saved_results), "--format", "markdown", "--provenance",
                 "--plots", str(tmp_path / "docs" / "plots"), "--output", str(output)]) == 0
    text = output.read_text()
    assert text.startswith("# Leaderboard") and "- budgets: 0.25, 0.5" in text
    assert "![score_vs_budget](plots/score_vs_budget.png)" in text
    assert (tmp_path / "docs" / "plots" / "score_vs_budget.png").exists()


def test_plots_keep_equal_lines_apart_and_speed_and_memory_from_zero(tmp_path, monkeypatch):
    """Two policies with equal results must not hide each other, and a 13 vs 14 tok/s difference must not fill
    the whole axis (it was drawn as a 65% speed-up)."""
    import matplotlib.figure

    records = [make_record("acc", "full", 1.0, 0.8)]
    for policy in ("a", "b"):
        records += [make_record("acc", policy, budget, 0.5, speed={"decode_tokens_per_s": 13.0 + budget})
                    for budget in (0.25, 0.5)]
    figures = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda figure, path, **kwargs: figures.update({Path(path).stem: figure}))
    plot(write_records(tmp_path / "results", records), tmp_path / "plots")
    lines = {line.get_label(): line for line in figures["score_vs_budget"].axes[0].get_lines()}
    a, b = lines["a"], lines["b"]
    assert list(a.get_ydata()) == list(b.get_ydata())  # equal results ...
    assert list(a.get_xdata()) != list(b.get_xdata()) and a.get_linestyle() != b.get_linestyle()  # ... both visible
    assert max(abs(x - budget) for x, budget in zip(a.get_xdata(), (0.25, 0.5))) < 0.25 / 3
    said = " ".join(text.get_text() for text in figures["score_vs_budget"].texts)
    assert "shifted sideways" in said and "intervals" not in said  # the figure says where its points sit
    assert figures["score_vs_budget"].axes[0].get_title() == "acc\nsmollm2-135m-instruct, n = 10 per cell"
    for name in ("decode_speed_vs_budget", "kv_memory_vs_budget"):
        assert figures[name].axes[0].get_ylim()[0] == 0
        memory = {line.get_label(): line for line in figures[name].axes[0].get_lines()}
        assert list(memory["a"].get_xdata()) == [0.25, 0.5]  # no shift where no bar is drawn: on its budget
    assert figures["decode_speed_vs_budget"].axes[0].get_ylabel() == "decode tokens/s"


def test_cells_of_one_model_share_its_loaded_weights(tiny_pretrained, tmp_path, monkeypatch):
    import shutil

    from kvpolicies.experiments import runner

    monkeypatch.setattr(runner, "_loaded", {})
    grid = cells(SweepConfig(models=[tiny_pretrained], policies=["snapkv"], budgets=[0.25, 0.5], tasks=["kvp_passkey"]))
    first, second = (runner.cell_model(cell) for cell in grid[:2])
    assert second.model is first.model and second.tokenizer is first.tokenizer
    assert str(first.kv_budget) == "0.25" and str(second.kv_budget) == "0.5"
    copy = str(shutil.copytree(tiny_pretrained, tmp_path / "copy"))
    other = runner.cell_model(grid[0].model_copy(update={"model": copy}))
    assert other.model is not first.model and [model for model, _ in runner._loaded] == [copy]  # one at a time
    recast = runner.cell_model(grid[0].model_copy(update={"model": copy, "loading": Loading(dtype="bfloat16")}))
    assert recast.model is not other.model and recast.model.dtype == torch.bfloat16  # loaded as its cell says


def test_ray_options_without_the_ray_executor_are_refused(capsys):
    from kvpolicies.cli import main

    assert main(["sweep", "--quick", "--address", "auto", "--gpus-per-cell", "1"]) == 2
    assert ("--address, --gpus-per-cell apply only to the Ray executor; add --executor ray"
            in capsys.readouterr().err)


def test_a_sweep_file_names_where_its_cells_run_and_flags_override_it(tmp_path):
    import argparse

    from kvpolicies.cli.sweeps import sweep_config

    path = tmp_path / "grid.yaml"
    path.write_text("policies: [full]\nexecution: {executor: ray, address: auto, gpus_per_cell: 1}\n")
    assert SweepConfig.load(path).execution.model_dump(exclude_none=True) == {
        "executor": "ray", "address": "auto", "gpus_per_cell": 1}
    path.write_text("policies: [full]\nexecution: ray\n")
    assert SweepConfig.load(path).execution.executor == "ray"
    args = argparse.Namespace(config=path, quick=False, preset=None, policies=None, budgets=None, tasks=None,
                              models=None, protocols=None, limit=None, executor=None, address="10.0.0.1:6379",
                              cpus_per_cell=4.0, gpus_per_cell=None, max_retries=None)
    execution = sweep_config(args).execution
    assert (execution.executor, execution.address, execution.cpus, execution.gpus, execution.retries) == (
        "ray", "10.0.0.1:6379", 4.0, 0.0, 2)


def test_the_ray_executor_without_ray_names_the_extra_to_install(monkeypatch):
    from kvpolicies.cli.sweeps import executor
    from kvpolicies.errors import UsageError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where the extra is not installed
    monkeypatch.delitem(sys.modules, "kvpolicies.experiments.ray_executor", raising=False)
    with pytest.raises(UsageError, match=r"needs Ray .*pip install 'kvpolicies\[ray\]'"):
        executor(SweepConfig(execution="ray"))
    from kvpolicies.experiments.sweep import LocalExecutor

    assert isinstance(executor(SweepConfig()), LocalExecutor)  # the local executor needs nothing


def test_a_record_computed_by_other_code_is_written_as_a_failure_saying_so(tmp_path):
    from kvpolicies.experiments.sweep import run_sweep

    class OtherCode:  # a worker whose kvpolicies computes another key for the cell
        def run(self, todo, show):
            for cell in (cell for group in todo for cell in group):
                yield cell, make_record("kvp_passkey", cell.policy.name, cell.budget, 1.0, key="0" * 20,
                                        worker={"host": "node-7", "pid": 1})

    config = SweepConfig(policies=["full"], tasks=[{"name": "kvp_passkey", "limit": 1}])
    (record,) = run_sweep(config, tmp_path, progress=False, executor=OtherCode())
    (cell,) = cells(config)
    assert record.status == "error" and record.key == cell.key()
    assert f"the worker on node-7 computed key {'0' * 20} for this cell, this machine {cell.key()}" in record.error
    assert load_results(tmp_path)[0].status == "error"  # written, and retried by the next run


@pytest.mark.parametrize(("execution", "message"), [
    ({"executor": "ray", "gpus_per_cell": 1.5}, "above 1 must be a whole number of GPUs"),
    ({"executor": "ray", "cpus_per_cell": 0.00001}, "steps of 0.0001"),
    ({"executor": "ray", "cpus_per_cell": 0}, "greater than 0"),
    ({"executor": "local", "max_retries": 3}, "--max-retries applies only to the Ray executor"),
])
def test_execution_settings_ray_cannot_honour_are_refused(execution, message):
    with pytest.raises(ValidationError, match=message):
        SweepConfig(execution=execution)


def test_executor_local_on_the_command_line_drops_a_files_ray_settings(tmp_path):
    import argparse

    from kvpolicies.cli.sweeps import sweep_config

    path = tmp_path / "grid.yaml"
    path.write_text("policies: [full]\nexecution: {executor: ray, address: auto, gpus_per_cell: 1}\n")
    args = argparse.Namespace(config=path, quick=False, preset=None, policies=None, budgets=None, tasks=None,
                              models=None, protocols=None, limit=None, executor="local", address=None,
                              cpus_per_cell=None, gpus_per_cell=None, max_retries=None)
    assert sweep_config(args).execution.model_dump(exclude_none=True) == {"executor": "local"}


def test_where_cells_run_never_reaches_their_code_version():
    from kvpolicies.experiments.code_version import core_files

    names = {path.name for path in core_files()}
    assert "runner.py" in names and "ray_executor.py" not in names  # the command line picks the executor
