"""The RULER preset and the suite page: per-policy protocols, full-cache-only tasks, kvpress-shaped averages."""

from __future__ import annotations

import csv
import io

import pytest

from kvpolicies.cli import build_parser, main
from kvpolicies.cli.sweeps import presets, sweep_config
from kvpolicies.engine.budget import Budget
from kvpolicies.experiments.grid import SweepConfig, cells
from kvpolicies.experiments.results import load_results
from kvpolicies.integrations.protocol import Protocol
from kvpolicies.reports.suite import plot_suite, render_suite, suites, tables
from tests.helpers import make_record, write_records

RULER_TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multiquery", "niah_multivalue", "vt", "cwe", "fwe", "qa_squad", "qa_hotpot"]


def test_a_policy_can_name_its_own_protocols_and_reference_tasks_run_the_full_cache_alone():
    config = SweepConfig(
        policies=["full", "l2norm", {"name": "snapkv", "protocols": ["query_aware", "query_agnostic"]}],
        budgets=[0.5, 0.25], tasks=["kvp_passkey"], reference_tasks=["kvp_niah", "kvp_passkey"],
        protocols="query_agnostic",
    )
    grid = cells(config)
    by_policy = {name: [c for c in grid if c.policy.name == name] for name in ("full", "l2norm", "snapkv")}
    assert {c.protocol for c in by_policy["l2norm"]} == {Protocol.QUERY_AGNOSTIC} and len(by_policy["l2norm"]) == 2
    assert {(c.protocol, c.budget.value) for c in by_policy["snapkv"]} == {
        (protocol, budget) for protocol in Protocol for budget in (0.5, 0.25)}
    # The full cache: once per task, the reference tasks' passkey being the same cell as the grid's.
    assert sorted(c.task.name for c in by_policy["full"]) == ["kvp_niah", "kvp_passkey"]
    assert {c.task.name for c in grid if c.policy.name != "full"} == {"kvp_passkey"}
    with pytest.raises(ValueError, match="unknown protocol"):
        SweepConfig(policies=[{"name": "snapkv", "protocols": ["both"]}])
    with pytest.raises(ValueError, match="at least 1 item"):  # not a silent fall-back to the grid's protocols
        SweepConfig(policies=[{"name": "snapkv", "protocols": []}])
    with pytest.raises(ValueError, match="reference task kvp_niah differs from the grid's task of that name"):
        SweepConfig(tasks=[{"name": "kvp_niah", "limit": 2}], reference_tasks=["kvp_niah"])


def test_the_ruler_preset_is_kvpress_grid_at_4k_with_the_full_cache_on_all_13_tasks():
    config = sweep_config(build_parser().parse_args(["sweep", "--preset", "ruler"]))
    assert [t.name for t in config.reference_tasks] == [f"kvp_ruler_{name}" for name in RULER_TASKS]
    assert {t.name for t in config.tasks} <= {t.name for t in config.reference_tasks}
    assert all(t.metadata == {"max_seq_lengths": [4096]} for t in config.tasks + config.reference_tasks)
    assert [b.value for b in config.budgets] == [0.75, 0.5, 0.25, 0.125]
    assert config.protocols == [Protocol.QUERY_AGNOSTIC]
    aware = {spec.name for spec in config.policies if Protocol.QUERY_AWARE in (spec.protocols or [])}
    assert {"snapkv", "headkv", "chunkkv"} <= aware and "l2norm" in aware  # and an attention-free control
    grid = cells(config)
    assert {c.protocol for c in grid if c.policy.name == "streaming"} == {Protocol.QUERY_AGNOSTIC}
    assert sum(c.policy.name == "full" for c in grid) == 13


def test_preset_overrides_apply_to_the_full_cache_tasks_too():
    def preset(*args: str) -> SweepConfig:
        return sweep_config(build_parser().parse_args(["sweep", "--preset", "ruler", *args]))

    config = preset("--limit", "2")
    assert {t.limit for t in config.tasks + config.reference_tasks} == {2}
    narrowed = preset("--policies", "snapkv,streaming")  # the preset's own protocols of snapkv stay
    assert {c.protocol for c in cells(narrowed) if c.policy.name == "snapkv"} == set(Protocol)
    assert {c.protocol for c in cells(narrowed) if c.policy.name == "streaming"} == {Protocol.QUERY_AGNOSTIC}
    aware = preset("--protocols", "query_aware")  # for every policy, the per-policy choices included
    assert {c.protocol for c in cells(aware)} == {Protocol.QUERY_AWARE}
    narrowed = sweep_config(build_parser().parse_args(["sweep", "--preset", "ruler", "--tasks", "kvp_ruler_vt"]))
    assert [t.name for t in narrowed.tasks] == ["kvp_ruler_vt"] and narrowed.reference_tasks == []
    assert narrowed.tasks[0].metadata == {"max_seq_lengths": [4096]}  # the preset's data parameters are kept


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "no preset named 'nope'; choose one of: frontier, ruler, ruler-gpu"),
    (["--preset", "ruler", "--quick"], "use one of --quick and --preset: each names a whole grid"),
])
def test_preset_mistakes_are_clear_errors(capsys, args, message):
    assert main(["sweep", *args]) == 2
    assert f"kvpolicies: error: {message}" in capsys.readouterr().err
    assert "ruler" in presets()


def _record(task, policy, keep, score, protocol="query_agnostic", samples=4):
    return make_record(task, policy, 1.0 if policy == "full" else keep, score, protocol=protocol, samples=samples)


@pytest.fixture
def suite_results(tmp_path):
    records = [
        _record("kvp_ruler_a", "full", None, 1.0, "query_aware"), _record("kvp_ruler_b", "full", None, 0.5, "query_aware"),
        _record("kvp_ruler_c", "full", None, 0.0, "query_aware"),  # a task the full cache alone ran on
    ]
    for task, scores in (("kvp_ruler_a", (1.0, 0.5)), ("kvp_ruler_b", (0.5, 0.0))):
        for keep, score in zip((0.5, 0.25), scores):
            records += [_record(task, "snapkv", keep, score / 2), _record(task, "snapkv", keep, score, "query_aware"),
                        _record(task, "streaming", keep, score / 4)]
    records.append(_record("kvp_ruler_a", "keydiff", 0.5, 0.75))  # keydiff misses task b and keep 0.25
    return write_records(tmp_path / "results", records)


def test_suite_page_averages_over_the_policies_tasks_per_protocol_and_keep(suite_results):
    [suite] = suites(load_results(suite_results))
    assert suite.tasks == ["kvp_ruler_a", "kvp_ruler_b"] and suite.keeps == [0.5, 0.25]
    found = {title.split(" — ")[0]: (headers, body) for title, headers, body in tables(suite) if "per task," not in title}
    headers, body = found["full cache per task"]
    assert [row[:2] for row in body] == [["a", "100.0"], ["b", "50.0"], ["c", "0.0"], ["mean of 3 tasks", "50.0"]]
    assert body[2][3] == "no (full cache only)"
    headers, body = found["query_agnostic"]
    assert headers == ["policy", "keep 0.5 (ratio 0.5)", "keep 0.25 (ratio 0.75)"]
    rows = {row[0]: row[1:] for row in body}
    # best mean first; keydiff misses cells, so it cannot rank on the one task it has
    assert list(rows) == ["snapkv", "streaming", "keydiff", "full cache (no eviction)"]
    assert rows["snapkv"] == ["37.5", "12.5"] and rows["streaming"] == ["18.8", "6.2"]
    assert rows["keydiff"] == ["75.0 (1/2 tasks)", ""]  # a missing cell is never averaged as if complete
    assert rows["full cache (no eviction)"] == ["75.0", "75.0"]  # over the policies' tasks, not task c
    headers, body = found["query_aware"]
    assert {row[0]: row[1:] for row in body}["snapkv"] == ["75.0", "25.0"]
    headers, body = found["query-aware minus query-agnostic"]
    assert body == [["snapkv", "+37.5", "+12.5", "+25.0"]]


def test_suite_page_per_task_columns_and_formats(suite_results, tmp_path):
    records = load_results(suite_results)
    text = render_suite(suite_results, records, "markdown", with_provenance=True, images=["p/mean_vs_keep.png"])
    assert text.startswith("# RULER leaderboard") and "![mean_vs_keep](p/mean_vs_keep.png)" in text
    [suite] = suites(records)
    [agnostic] = [body for title, _, body in tables(suite) if title.startswith("query_agnostic — per task")]
    assert agnostic[0] == ["snapkv", "0.5", "37.5", "50.0", "25.0"]
    assert ["keydiff", "0.5", "75.0 (1/2 tasks)", "75.0", ""] in agnostic
    assert agnostic[-1][:3] == ["full cache", "1", "75.0"]
    for fmt in ("terminal", "html"):
        assert "keep 0.25 (ratio 0.75)" in render_suite(suite_results, records, fmt)
    rows = list(csv.reader(io.StringIO(render_suite(suite_results, records, "csv"))))
    assert ["keydiff", "75.0 (1/2 tasks)", ""] in rows and ["snapkv", "37.5", "12.5"] in rows
    names = sorted(path.name for path in plot_suite(records, tmp_path / "plots"))
    assert names == ["mean_vs_keep.png", "tasks_query_agnostic.png", "tasks_query_aware.png"]


def test_suite_command_writes_the_page_and_its_plots(suite_results, tmp_path, capsys):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    assert main(["leaderboard", str(suite_results), "--suite", "--format", "markdown", "--provenance",
                 "--plots", str(tmp_path / "docs" / "figs"), "--output", str(page)]) == 0
    text = page.read_text()
    assert "![mean_vs_keep](figs/mean_vs_keep.png)" in text and "query-aware minus query-agnostic" in text
    assert main(["leaderboard", str(tmp_path / "empty"), "--suite"]) == 2


def test_budgets_that_are_not_fractions_are_left_off_the_suite_page(tmp_path):
    results = write_records(tmp_path / "r", [_record("kvp_ruler_a", "full", None, 1.0, "query_aware"),
                                             make_record("kvp_ruler_a", "snapkv", Budget.parse("512 tokens"), 0.5,
                                                         protocol="query_agnostic")])
    assert "no finished results" not in render_suite(results, load_results(results))
    [suite] = suites(load_results(results))
    assert suite.compressed == [] and list(suite.full) == ["kvp_ruler_a"]


def test_gaps_compare_the_same_tasks_and_mixed_sample_counts_are_shown(tmp_path):
    records = [_record(t, "full", None, 1.0, "query_aware") for t in ("kvp_ruler_a", "kvp_ruler_b")] + [
        _record("kvp_ruler_a", "snapkv", 0.5, 1.0, "query_aware"), _record("kvp_ruler_b", "snapkv", 0.5, 0.0),
        _record("kvp_ruler_a", "l2norm", 0.5, 0.5, "query_aware", samples=2),
        _record("kvp_ruler_a", "l2norm", 0.5, 0.25, samples=8),
    ]
    [suite] = suites(load_results(write_records(tmp_path / "r", records)))
    titles = {title.split(" — ")[0]: (title, body) for title, _, body in tables(suite) if "per task," not in title}
    gaps = {row[0]: row[1:] for row in titles["query-aware minus query-agnostic"][1]}
    assert gaps == {"l2norm": ["+25.0", "+25.0"], "snapkv": ["", ""]}  # snapkv's two runs cover different tasks
    assert "n = 4-8 per task" in titles["query_agnostic"][0]  # snapkv's 4 samples, l2norm's 8
    assert "n = 2-4 per task" in titles["query_aware"][0]


def test_failed_cells_are_listed_even_when_nothing_finished_and_models_plot_apart(tmp_path):
    failed = write_records(tmp_path / "f", [make_record("kvp_ruler_a", "snapkv", 0.5, 0.0, status="error")])
    text = render_suite(failed, load_results(failed))
    assert "no finished results" in text and "kvp_ruler_a / snapkv @ 0.5: RuntimeError: boom" in text
    records = [make_record("kvp_ruler_a", policy, keep, 0.5, model=model, protocol="query_agnostic")
               for model in ("org/model-a", "org/model-b") for policy, keep in (("full", 1.0), ("snapkv", 0.5))]
    names = sorted(path.name for path in plot_suite(load_results(write_records(tmp_path / "m", records)), tmp_path / "p"))
    assert names == ["org_model-a_mean_vs_keep.png", "org_model-a_tasks_query_agnostic.png",
                     "org_model-b_mean_vs_keep.png", "org_model-b_tasks_query_agnostic.png"]
