"""Results lose nothing and never crash a page: one record model, damaged files skipped by name, writability checked
before any compute, one cell per key, budgets parsed once, the reference always run, sweep configs read with clear
errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpolicies.cli import main
from kvpolicies.experiments.grid import SweepConfig, cells
from kvpolicies.experiments.store import ResultsStore
from kvpolicies.registry import get_policy
from kvpolicies.reports.leaderboard import load_rows
from tests.helpers import NOW, make_record


def saved_record(cell, score: float = 0.5) -> dict:
    """A finished cell as sweeps have always written it (plain JSON, no model needed to build it)."""
    return {
        "key": cell.key(), "cell": json.loads(cell.model_dump_json()), "identity": cell.identity(),
        "versions": {"kvpolicies": "0.1.0"}, "started_at": NOW, "finished_at": NOW, "load_average_start": 0.5,
        "status": "ok", "metrics": {"exact_match,first_key": score}, "primary_metric": "exact_match,first_key",
        "score": score, "higher_is_better": True, "samples": 2,
        "kv_memory": {"requests": 2, "resident_bytes_mean": 100.0, "full_bytes_mean": 200.0},
        "speed": {"prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": 20.0}, "peak_memory_bytes": 2**30,
        "peak_memory_growth_bytes": 2**20, "wall_s": 1.0, "device": "cpu", "load_average_end": 0.7,
    }


DAMAGED = {
    "bench.json": json.dumps({"header": "model: x", "results": [{"policy": "full", "budget": "1"}]}),
    "truncated.json": json.dumps({"key": "abc", "status": "ok", "cell": {"task": {"name": "kvp_passkey"}}})[:40],
    "null.json": "null",
    "status-only.json": json.dumps({"status": "ok"}),
}


def write_damaged(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DAMAGED.items():
        (folder / name).write_text(text)
    return [folder / name for name in DAMAGED]


GRID = {"policies": ["full", "random"], "budgets": [0.5],
        "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [200], "per_cell": 1}}]}


def per_cell(cells, together=True):
    """``evaluate_group`` with no model to build: each cell through the (patched) ``run_cell``, in order, as a
    group's cells are run. A sweep still takes a task's cells together; only the computing is stubbed."""
    import kvpolicies.experiments.runner as runner

    return (runner.evaluate(cell) for cell in cells)


def fake_run_cell(calls: list):
    def run_cell(cell, lm=None):
        calls.append(cell)
        return {"metrics": {"exact_match,first_key": 1.0}, "primary_metric": "exact_match,first_key", "score": 1.0,
                "higher_is_better": True, "samples": 1, "kv_memory": {"requests": 1}, "speed": {},
                "peak_memory_bytes": 0, "peak_memory_growth_bytes": 0, "wall_s": 0.0, "device": "cpu"}
    return run_cell


# -- the record model --------------------------------------------------------------------------------------------


def test_an_ok_record_must_carry_its_results_and_an_error_record_its_error():
    from pydantic import ValidationError

    good = make_record("kvp_passkey", "l2norm", 0.5, 0.9)
    data = good.model_dump()
    with pytest.raises(ValidationError, match="an ok record needs score"):
        type(good).model_validate({k: v for k, v in data.items() if k != "score"})
    with pytest.raises(ValidationError, match="an error record needs its error"):
        type(good).model_validate(data | {"status": "error"})
    assert make_record("kvp_passkey", "l2norm", 0.5, 0.0, status="error").error == "RuntimeError: boom"


def test_result_files_of_earlier_versions_still_load(tmp_path):
    from kvpolicies.engine.budget import Budget
    from kvpolicies.experiments.results import load_results

    old = saved_record(cells(SweepConfig(policies=["l2norm"], budgets=[0.5], tasks=["kvp_passkey"]))[0])
    old["cell"]["budget"] = "50%"  # what sweeps wrote before budgets were parsed at the edge
    for name in ("load_average_start", "load_average_end", "peak_memory_growth_bytes"):  # added later
        del old[name]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (record,) = load_results(tmp_path)
    assert record.cell.budget == Budget.parse(0.5) and record.score == 0.5 and record.load is None
    assert record.kv_memory.resident_bytes_mean == 100.0 and not record.is_reference


def test_the_memory_record_is_summed_per_sequence_from_the_caches_counts_and_validates():
    from kvpolicies.engine.cache import CacheStats
    from kvpolicies.experiments.results import KVMemory
    from kvpolicies.integrations.lm_eval import kv_memory_record

    sequences = [CacheStats(kept_entries=100, full_entries=400, resident_bytes=1000, full_bytes=4000,
                            appended_entries=20, auxiliary_bytes=300),
                 CacheStats(kept_entries=50, full_entries=100, resident_bytes=500, full_bytes=1000,
                            auxiliary_bytes=100)]
    memory = KVMemory.model_validate(kv_memory_record(sequences, padding_bytes=64))
    assert not memory.model_extra  # every figure the adapter writes is declared
    assert (memory.sequences, memory.resident_bytes_peak, memory.resident_bytes_mean) == (2, 1000, 750)
    assert (memory.full_bytes_peak, memory.full_bytes_mean, memory.resident_fraction_mean) == (4000, 2500, 0.375)
    assert (memory.context_bytes_peak, memory.context_bytes_mean) == (800, 650)  # 80 of the first's 100 entries
    assert (memory.auxiliary_bytes_peak, memory.auxiliary_bytes_mean, memory.padding_bytes_peak) == (300, 200, 64)
    assert kv_memory_record([]) == {"sequences": 0}


def test_a_written_record_reads_back_equal_as_standard_json_and_leaves_no_staging_file(tmp_path):
    from kvpolicies.experiments.results import read_record, write_record

    record = make_record("kvp_ppl", "l2norm", "64MiB", 12.5, higher=False)
    write_record(tmp_path / "r.json", record)
    assert read_record(tmp_path / "r.json") == record
    json.loads((tmp_path / "r.json").read_text(), parse_constant=pytest.fail)  # no bare NaN or Infinity
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no staging file left behind


@pytest.mark.parametrize("field, value", [
    ("score", float("nan")), ("score", float("inf")), ("metrics", {"word_perplexity": float("inf")}),
    ("samples", -1), ("wall_s", -0.5), ("peak_memory_bytes", -1), ("load_average_end", float("nan")),
    ("kv_memory", {"sequences": 2, "resident_bytes_mean": -100.0}), ("kv_memory", {"context_bytes_mean": float("nan")}),
    ("speed", {"decode_tokens_per_s": float("inf")}), ("speed", {"ttft_s": -1.0}),
])
def test_records_hold_only_finite_numbers_and_never_negative_amounts(field, value):
    from pydantic import ValidationError

    data = make_record("kvp_ppl", "l2norm", 0.5, 12.5, higher=False).model_dump()
    with pytest.raises(ValidationError, match=field.split("_")[0]):
        type(make_record("kvp_ppl", "l2norm", 0.5, 1.0)).model_validate(data | {field: value})


def test_a_negative_score_is_a_score():
    """Some lm-eval metrics (a Matthews correlation) are negative by nature."""
    record = make_record("kvp_passkey", "l2norm", 0.5, -0.25)
    assert type(record).model_validate(record.model_dump()).score == -0.25


# -- damaged files -----------------------------------------------------------------------------------------------


def test_leaderboard_renders_the_valid_records_and_names_every_skipped_file(tmp_path, capsys):
    skipped = write_damaged(tmp_path)
    grid = cells(SweepConfig.model_validate(GRID))
    for cell in grid:
        (tmp_path / f"{cell.key()}.json").write_text(json.dumps(saved_record(cell, score=0.75)))
    assert main(["leaderboard", str(tmp_path), "--provenance"]) == 0
    out, err = capsys.readouterr()
    assert "random" in out and "full (no eviction)" in out and "0.75" in out
    for path in skipped:
        assert f"kvpolicies: warning: skipped {path}: " in err
    assert err.count("kvpolicies: warning: skipped") == len(skipped)  # once each, though provenance reads them too


def _finished(path: Path) -> bool:
    """Whether the store takes ``path`` (named for its cell) as that cell's finished result."""
    store = ResultsStore(path.parent)
    return any(store.finished(cell) is not None for cell in cells(SweepConfig.model_validate(GRID))
               if store.path(cell) == path)


def test_an_invalid_finished_file_is_not_finished(tmp_path):
    cell = cells(SweepConfig.model_validate(GRID))[0]
    path = tmp_path / f"{cell.key()}.json"
    for text in ("null", json.dumps({"status": "ok"}), '{"status": "ok", "key":', "\xff"):
        path.write_text(text, encoding="latin-1")
        assert not _finished(path)
    path.write_text(json.dumps(saved_record(cell)))
    assert _finished(path)


def test_sweep_recomputes_invalid_finished_files_and_renders_despite_stray_ones(tmp_path, capsys, monkeypatch):
    import kvpolicies.experiments.runner

    config, results = tmp_path / "grid.json", tmp_path / "results"
    config.write_text(json.dumps(GRID))
    grid = cells(SweepConfig.model_validate(GRID))
    skipped = write_damaged(results)
    (results / f"{grid[0].key()}.json").write_text("null")
    (results / f"{grid[1].key()}.json").write_text(json.dumps({"status": "ok"}))
    calls: list = []
    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", fake_run_cell(calls))
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)
    assert main(["sweep", "--config", str(config), "--results", str(results), "--no-plots"]) == 0
    out, err = capsys.readouterr()
    assert {c.key() for c in calls} == {c.key() for c in grid}  # both invalid files were computed again
    assert all(_finished(results / f"{c.key()}.json") for c in grid)
    assert "full (no eviction)" in out
    assert all(f"skipped {path}: " in err for path in skipped)


def test_leaderboard_says_why_a_task_is_missing_from_the_overall_table(tmp_path, capsys):
    for cell in cells(SweepConfig.model_validate(GRID)):
        if get_policy(cell.policy.name).compresses:  # a folder from before every sweep ran the reference
            (tmp_path / f"{cell.key()}.json").write_text(json.dumps(saved_record(cell)))
    assert main(["leaderboard", str(tmp_path), "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    overall = out.split("### ")[1]
    assert "no reference (full cache) result for task kvp_passkey" in overall and "`kvpolicies sweep`" in overall


# -- the results folder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unwritable_results_folder_fails_before_any_cell_runs(tmp_path, capsys, monkeypatch, where):
    import kvpolicies.experiments.runner

    (tmp_path / "file").write_text("not a folder")
    results = tmp_path / "file" if where == "a file" else tmp_path / "file" / "results"
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(GRID))
    calls: list = []
    monkeypatch.setattr(kvpolicies.experiments.runner, "run_cell", fake_run_cell(calls))
    monkeypatch.setattr(kvpolicies.experiments.runner, "evaluate_group", per_cell)
    assert main(["sweep", "--config", str(config), "--results", str(results), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "kvpolicies: error: " in err and str(results) in err and "--results" in err
    assert calls == []


def test_writability_is_checked_by_writing_not_by_permission_bits(tmp_path, monkeypatch):
    import tempfile

    from kvpolicies.experiments.results import ResultsError, check_writable

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(ResultsError, match="cannot write results to .*permission denied"):
        check_writable(tmp_path)


# -- the grid ----------------------------------------------------------------------------------------------------


def test_two_spellings_of_one_budget_are_one_cell():
    grid = cells(SweepConfig(policies=["l2norm", "full"], budgets=[0.5, "50%"], tasks=["kvp_passkey"]))
    assert [c.policy.name for c in grid] == ["l2norm", "full"]


def test_budgets_are_parsed_once_where_they_enter():
    from kvpolicies.engine.budget import Budget

    config = SweepConfig(policies=["l2norm"], budgets=["50%", 0.25, "512 tokens", "64MiB",
                                                        {"value": 0.1, "slack_tokens": 0}], tasks=["kvp_passkey"])
    assert config.budgets == [Budget.parse(0.5), Budget.parse(0.25), Budget.parse("512 tokens"),
                              Budget.parse("64MiB"), Budget(value=0.1, slack_tokens=0)]
    assert all(isinstance(c.budget, Budget) for c in cells(config))


def test_every_grid_runs_the_reference_even_when_not_asked_for():
    grid = cells(SweepConfig(policies=["l2norm"], budgets=[0.25, 0.5], tasks=["kvp_passkey", "kvp_ppl"]))
    references = [c for c in grid if not get_policy(c.policy.name, **c.policy.options).compresses]
    assert len(references) == 2 and len(grid) == 6


# -- sweep configs and options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("grid.yaml", b"policies: [l2norm\n", "while parsing"),
        ("grid.toml", b"budgets = [\n", "invalid value"),
        ("grid.yaml", b"- l2norm\n", "expected a mapping"),
        ("grid.yaml", b"budgets: [0.5]\xff\xfe\n", "not UTF-8"),
        ("folder.yaml", None, "is a directory"),
        ("missing.yaml", "missing", "no such file"),
        ("grid.yaml", b"budgets: [7]\n", "invalid sweep config"),
        ("grid.yaml", b"budgets:\npolicies: [l2norm]\n", "budgets: is empty; list at least one item"),
    ],
)
def test_unreadable_sweep_configs_fail_with_the_file_named(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    assert main(["sweep", "--config", str(path), "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvpolicies: error: ") and str(path) in err and message.lower() in err.lower()
    assert "Traceback" not in err and not (tmp_path / "results").exists()


def test_a_single_item_where_a_list_is_expected_is_a_one_item_list(tmp_path):
    (tmp_path / "grid.toml").write_text('policies = "l2norm"\nbudgets = "50%"\ntasks = "kvp_niah"\n')
    config = SweepConfig.load(tmp_path / "grid.toml")
    assert [p.name for p in config.policies] == ["l2norm"] and [t.name for t in config.tasks] == ["kvp_niah"]
    assert [str(b) for b in config.budgets] == ["0.5"]


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_sweep_limit_must_be_a_positive_number_of_samples(limit):
    from kvpolicies.cli import build_parser
    from kvpolicies.cli.sweeps import sweep_config

    with pytest.raises(ValueError, match="--limit must be at least 1"):
        sweep_config(build_parser().parse_args(["sweep", "--quick", "--limit", limit]))
    config = sweep_config(build_parser().parse_args(["sweep", "--quick", "--limit", "3"]))
    assert [t.limit for t in config.tasks] == [3]


def test_sweep_help_points_to_the_grid_format(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "README.md, 'Sweeps and leaderboards'" in out and "docs/leaderboard.md" not in out


def test_pages_show_each_point_once_as_last_measured(tmp_path):
    """Cells of an earlier code version stay in the folder under other keys; the leaderboard must not rank both."""
    from datetime import datetime

    def at(record, hour: int):
        return record.model_copy(update={"finished_at": datetime.fromisoformat(f"2026-11-25T{hour:02d}:00:00+00:00")})

    old = at(make_record("acc", "a", 0.5, 0.2, key="old"), 12)
    new = at(make_record("acc", "a", 0.5, 0.9, key="new"), 13)
    failed_later = at(make_record("acc", "a", 0.5, 0.0, key="failed", status="error"), 14)
    rows, failures = load_rows([old, failed_later, new, make_record("acc", "full", 1.0, 1.0)])
    assert [(row.policy, row.score) for row in rows if row.budget is not None] == [("a", 0.9)] and failures == []


def test_code_version_labels_files_by_package_not_by_checkout_folder():
    """An editable checkout (plugins/l2norm.py) and a wheel (kvpolicies_plugins/l2norm.py) hash the same sources."""
    import kvpolicies
    from kvpolicies.experiments.code_version import _label, policy_files

    labels = {_label(path) for path in policy_files(kvpolicies.get_policy("l2norm"))}
    assert "kvpolicies_plugins/l2norm.py" in labels and "kvpolicies/engine/policy.py" in labels
