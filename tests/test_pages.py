"""Pages show what was measured, each point apart and safely: different cells are never merged into one row (one
label, one budget value or one task name notwithstanding) and are named apart; each model is plotted apart; names
from a shared results folder cannot put markup into a page or break its tables; a plots folder that cannot take the
figures is a clean error."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from kvpolicies.cli import main
from kvpolicies.engine.budget import Budget
from kvpolicies.experiments.grid import TaskSpec
from kvpolicies.experiments.results import ResultsError, load_results
from kvpolicies.reports.leaderboard import load_rows, overall_table, plot, render, task_tables
from kvpolicies.reports.suite import plot_suite, render_suite, suites, tables
from tests.helpers import make_record, write_records


def cell(task: str = "kvp_passkey", policy: str = "snapkv", budget=0.5, score: float = 0.5, *,
         options: dict | None = None, limit: int | None = None, metadata: dict | None = None, seed: int = 0,
         **fields):
    """A record as :func:`make_record` builds it, with the policy's options, the task's spec and the seed too."""
    made = make_record(task, policy, budget, score, **fields)
    spec = made.cell.policy.model_copy(update={"options": options or {}})
    task_spec = TaskSpec(name=task, metadata=metadata or {}, limit=limit)
    identity = made.identity.model_copy(update={"policy": {"policy": policy, "config": options or {}}})
    made_cell = made.cell.model_copy(update={"policy": spec, "task": task_spec, "seed": seed})
    return made.model_copy(update={"cell": made_cell, "identity": identity})


def full(task: str = "kvp_passkey", score: float = 1.0, **fields):
    return cell(task, "full", 1.0, score, **fields)


def scores(rows) -> dict[tuple[str, str, object], float]:
    return {(row.task, row.policy, row.budget): row.score for row in rows}


# -- different points are different rows, named apart -------------------------------------------------------------


def test_policies_under_one_label_are_rows_of_their_own_named_by_policy_then_option(tmp_path):
    records = [full(), cell(policy="snapkv", label="mine", options={"window_tokens": 8}, score=0.9),
               cell(policy="snapkv", label="mine", options={"window_tokens": 32}, score=0.7),
               cell(policy="l2norm", label="mine", score=0.3)]
    rows, _ = load_rows(load_results(write_records(tmp_path / "r", records)))
    assert scores(rows) == {("kvp_passkey", "full", None): 1.0,
                            ("kvp_passkey", "mine (snapkv, window_tokens=8)", 0.5): 0.9,
                            ("kvp_passkey", "mine (snapkv, window_tokens=32)", 0.5): 0.7,
                            ("kvp_passkey", "mine (l2norm)", 0.5): 0.3}
    [(_, _, body)] = task_tables(rows)
    assert [row[1] for row in body] == ["mine (snapkv, window_tokens=8)", "mine (snapkv, window_tokens=32)",
                                        "mine (l2norm)", "full (no eviction)"]


def test_policies_no_option_tells_apart_are_named_by_a_short_hash():
    rows, _ = load_rows([cell(label="mine", options={"x": 1}, score=0.9),
                         cell(label="mine", options={"x": "1"}, score=0.1)])
    names = sorted(row.policy for row in rows)
    assert len(set(names)) == 2 and all(re.fullmatch(r"mine \(x=1, [0-9a-f]{6}\)", name) for name in names)


def test_budgets_that_differ_only_in_slack_are_two_lines_with_numeric_budgets():
    zero = Budget.parse(0.5, slack_tokens=0)
    rows, _ = load_rows([full(), cell(budget=0.25, score=0.4), cell(budget=0.5, score=0.8),
                         cell(budget=zero, score=0.6)])
    assert scores(rows) == {("kvp_passkey", "full", None): 1.0, ("kvp_passkey", "snapkv", 0.25): 0.4,
                            ("kvp_passkey", "snapkv", 0.5): 0.8, ("kvp_passkey", "snapkv (slack 0)", 0.5): 0.6}
    _, headers, body = overall_table(rows)
    by_policy = {row[0]: dict(zip(headers, row)) for row in body}
    assert headers == ["policy", "@0.25", "@0.5", "AUC", "model"]  # one column per budget value, as before
    assert by_policy["snapkv"]["AUC"] == "0.600" and by_policy["snapkv (slack 0)"]["@0.5"] == "0.600"


def test_runs_of_one_task_name_with_other_data_limits_or_seeds_are_tasks_of_their_own():
    records = [full(), cell(score=0.8), full(limit=2), cell(limit=2, score=0.5),
               full(metadata={"lengths": [4096]}, score=0.5), cell(metadata={"lengths": [4096]}, score=0.25),
               full(seed=1, score=0.5), cell(seed=1, score=0.5)]
    rows, _ = load_rows(records)
    assert scores(rows) == {
        ("kvp_passkey", "full", None): 1.0, ("kvp_passkey", "snapkv", 0.5): 0.8,
        ("kvp_passkey (limit 2)", "full", None): 1.0, ("kvp_passkey (limit 2)", "snapkv", 0.5): 0.5,
        ("kvp_passkey (lengths=[4096])", "full", None): 0.5, ("kvp_passkey (lengths=[4096])", "snapkv", 0.5): 0.25,
        ("kvp_passkey (seed 1)", "full", None): 0.5, ("kvp_passkey (seed 1)", "snapkv", 0.5): 0.5,
    }
    _, headers, [row] = overall_table(rows)  # each run is compared with its own full cache: 0.8, 0.5, 0.5, 1.0
    assert dict(zip(headers, row))["@0.5"] == "0.700"


def test_names_are_unchanged_where_nothing_collides():
    rows, failures = load_rows([full(), cell(label="fast"), cell(protocol="query_agnostic"),
                                cell("kvp_niah", status="error")])
    assert {row.policy for row in rows} == {"full", "fast", "snapkv (query-agnostic)"}
    assert {row.task for row in rows} == {"kvp_passkey"} and [f.task for f in failures] == ["kvp_niah"]
    assert "- kvp_niah / snapkv @ 0.5: RuntimeError: boom" in render(Path("r"), records=[full(), cell(),
                                                                                      cell("kvp_niah", status="error")])


def test_the_suite_page_keeps_policies_under_one_label_apart_under_both_protocols(tmp_path):
    records = [full("kvp_ruler_a")]
    for protocol in ("query_agnostic", "query_aware"):
        records += [cell("kvp_ruler_a", "snapkv", label="mine", score=0.5, protocol=protocol),
                    cell("kvp_ruler_a", "l2norm", label="mine", score=0.25, protocol=protocol)]
    [suite] = suites(load_results(write_records(tmp_path / "r", records)))
    found = {title.split(" — ")[0]: body for title, _, body in tables(suite) if "per task," not in title}
    assert {row[0]: row[1] for row in found["query_agnostic"]} == {
        "mine (snapkv)": "50.0", "mine (l2norm)": "25.0", "full cache (no eviction)": "100.0"}
    assert sorted(row[0] for row in found["query-aware minus query-agnostic"]) == ["mine (l2norm)", "mine (snapkv)"]


# -- one plot set per model --------------------------------------------------------------------------------------


@pytest.fixture
def figure_class():
    """matplotlib's Figure (plots are an extra: their tests skip without it)."""
    return pytest.importorskip("matplotlib.figure").Figure


def test_leaderboard_plots_each_model_apart(tmp_path, monkeypatch, figure_class):
    records = [record for model, score in (("org/model-a", 0.2), ("org/model-b", 0.8))
               for record in (full(model=model), cell(budget=0.25, score=score, model=model),
                              cell(budget=0.5, score=score, model=model))]
    figures = {}
    monkeypatch.setattr(figure_class, "savefig",
                        lambda figure, path, **kwargs: figures.update({Path(path).name: figure}))
    written = plot(Path("unused"), tmp_path / "plots", records=records)
    assert sorted(path.name for path in written) == sorted(figures) == sorted(
        f"org_model-{m}_{name}.png" for m in "ab" for name in ("score_vs_budget", "kv_memory_vs_budget",
                                                                "decode_speed_vs_budget"))
    for model, score in (("a", 0.2), ("b", 0.8)):
        [line] = [line for line in figures[f"org_model-{model}_score_vs_budget.png"].axes[0].get_lines()
                  if line.get_label() == "snapkv"]
        assert list(line.get_ydata()) == [score, score]  # its own model's points only, not a zigzag across both


# -- names from result files are escaped ---------------------------------------------------------------------------


def hostile(tmp_path: Path, task: str = "kvp_<i>x</i>") -> Path:
    model = "org/<script>alert(1)</script>"
    return write_records(tmp_path / "r", [
        full(task, model=model, protocol="query_agnostic"), full("kvp_other", model=model),
        cell(task, label="<b>mine</b>", model=model, protocol="query_agnostic"),
        cell("kvp_other", label="a|b", model="org|m", protocol="query_agnostic"),
        cell(task, "l2norm", model=model, status="error", error="<img src=x onerror=alert(1)>",
             protocol="query_agnostic"),
    ])


@pytest.mark.parametrize("suite", [False, True])
def test_html_pages_escape_every_name_note_and_error_from_the_results(tmp_path, suite):
    results = hostile(tmp_path)
    records = load_results(results)
    text = (render_suite(results, records, "html", with_provenance=True) if suite
            else render(results, "html", with_provenance=True, records=records))
    for raw in ("<script>", "<b>", "<i>", "<img"):
        assert raw not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "<h3>" in text and "<table>" in text  # the page's own markup stays


@pytest.mark.parametrize("suite", [False, True])
def test_markdown_tables_escape_pipes_in_names(tmp_path, suite):
    results = hostile(tmp_path, task="kvp_a|b")
    records = load_results(results)
    text = render_suite(results, records, "markdown") if suite else render(results, "markdown", records=records)
    assert "a\\|b" in text
    tables_found = re.findall(r"(?:^\|.*\n?)+", text, flags=re.MULTILINE)
    assert tables_found
    for table in tables_found:
        columns = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
        assert len(columns) == 1, table


# -- a plots folder that cannot take the figures -----------------------------------------------------------------


@pytest.mark.parametrize("suite", [[], ["--suite"]])
@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_plots_into_a_folder_that_cannot_be_one_is_a_clean_error(tmp_path, capsys, figure_class, suite, where):
    results = write_records(tmp_path / "r", [full("kvp_ruler_a"), cell("kvp_ruler_a", protocol="query_agnostic")])
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    plots = blocker / "plots" if where == "under a file" else blocker
    assert main(["leaderboard", str(results), "--plots", str(plots), *suite]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvpolicies: error: cannot write plots to {plots}: ")
    assert "choose a plots folder you can write to, or leave the plots out" in err and "Traceback" not in err


@pytest.mark.parametrize("suite", [[], ["--suite"]])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_plots_that_cannot_be_written_are_a_clean_error(tmp_path, capsys, monkeypatch, figure_class, suite, code):
    def refuse(figure, path, **kwargs):
        raise OSError(code, {errno.ENOSPC: "No space left on device", errno.EACCES: "Permission denied"}[code], path)

    monkeypatch.setattr(figure_class, "savefig", refuse)
    results = write_records(tmp_path / "r", [full("kvp_ruler_a"), cell("kvp_ruler_a", protocol="query_agnostic")])
    assert main(["leaderboard", str(results), "--plots", str(tmp_path / "plots"), *suite]) == 2
    err = capsys.readouterr().err
    why = "no space left on device" if code == errno.ENOSPC else "permission denied"
    assert err.startswith(f"kvpolicies: error: cannot write plots to {tmp_path / 'plots'}: {why} (")
    with pytest.raises(ResultsError, match="leave the plots out"):
        plot_suite(load_results(results), tmp_path / "plots") if suite else plot(results, tmp_path / "plots")
