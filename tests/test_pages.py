"""Pages show what was measured, each point apart and safely: different cells are never merged into one row (one
label, one budget value or one task name notwithstanding) and are named apart; each model is plotted apart; names
from a shared results folder cannot put markup into a page or break its tables; a plots folder that cannot take the
figures is a clean error."""

from __future__ import annotations

import errno
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from kvpolicies.cli import main
from kvpolicies.engine.budget import Budget
from kvpolicies.experiments.grid import TaskSpec
from kvpolicies.experiments.results import ResultsError, load_results
from kvpolicies.reports.catalogue import latest_records, policies_page
from kvpolicies.reports.leaderboard import load_rows, overall_table, plot, render, task_tables
from kvpolicies.reports.suite import plot_suite, render_suite, suites, tables
from tests.helpers import make_record, write_records


def cell(task: str = "kvp_passkey", policy: str = "snapkv", budget=0.5, score: float = 0.5, *,
         options: dict | None = None, limit: int | None = None, metadata: dict | None = None, seed: int = 0,
         code: str = "0.1.0+abc/def", finished_at: datetime | None = None, **fields):
    """A record as :func:`make_record` builds it, with the policy's options, the task's spec, the seed, the code
    version and when it finished too."""
    made = make_record(task, policy, budget, score, **fields)
    spec = made.cell.policy.model_copy(update={"options": options or {}})
    task_spec = TaskSpec(name=task, metadata=metadata or {}, limit=limit)
    identity = made.identity.model_copy(update={"policy": {"policy": policy, "config": options or {}},
                                                "code_version": code})
    made_cell = made.cell.model_copy(update={"policy": spec, "task": task_spec, "seed": seed})
    when = {"finished_at": finished_at} if finished_at else {}
    return made.model_copy(update={"cell": made_cell, "identity": identity, **when})


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


def test_rates_of_shared_work_say_the_share_each_cell_was_charged(tmp_path):
    """A prefill shared by 9 cells reads 9 times a prefill of its own, and decoding steps shared with up to 8 rows
    about 8 times: both marked, so that no one reads them as a cell's own speed."""
    shared = {"prefill_tokens_per_s": 9000.0, "decode_tokens_per_s": 160.0, "shared_by": 9, "decoded_together": 8}
    records = [full(), cell(policy="snapkv", speed=shared), cell(policy="l2norm", score=0.3)]
    rows, _ = load_rows(load_results(write_records(tmp_path / "r", records)))
    [(_, headers, body)] = task_tables(rows)
    prefill, decode = headers.index("prefill tok/s"), headers.index("decode tok/s")
    by_policy = {row[1]: row for row in body}
    assert (by_policy["snapkv"][prefill], by_policy["snapkv"][decode]) == ("9000 (1/9)", "160 (1/8)")
    assert (by_policy["l2norm"][prefill], by_policy["l2norm"][decode]) == ("1000", "20.0")


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
    # One column per budget value, as before, with kvpress's compression ratio beside it.
    assert headers == ["policy", "@0.25 (cr 0.75)", "@0.5 (cr 0.5)", "AUC", "n tasks", "model"]
    assert by_policy["snapkv"]["AUC"] == "0.600" and by_policy["snapkv (slack 0)"]["@0.5 (cr 0.5)"] == "0.600"


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
    assert dict(zip(headers, row))["@0.5 (cr 0.5)"] == "0.700"


def test_runs_in_other_dtypes_revisions_or_prefill_chunks_are_points_of_their_own():
    """dtype, revision and prefill chunk are in a cell's key: a page must not fold one run into another's row."""
    def run(record, **extra):
        return record.model_copy(update={"identity": record.identity.model_copy(update=extra)})

    records = [full(), cell(score=0.8), run(full(score=0.5), dtype="bfloat16"), run(cell(score=0.25), dtype="bfloat16"),
               run(full(score=0.9), revision="v2"), run(cell(score=0.45), revision="v2"),
               run(full(score=0.7), prefill_chunk=64), run(cell(score=0.6), prefill_chunk=64)]
    rows, _ = load_rows(records)
    assert scores(rows) == {
        ("kvp_passkey", "full", None): 1.0, ("kvp_passkey", "snapkv", 0.5): 0.8,
        ("kvp_passkey (bfloat16)", "full", None): 0.5, ("kvp_passkey (bfloat16)", "snapkv", 0.5): 0.25,
        ("kvp_passkey (revision v2)", "full", None): 0.9, ("kvp_passkey (revision v2)", "snapkv", 0.5): 0.45,
        ("kvp_passkey (prefill chunk 64)", "full", None): 0.7, ("kvp_passkey (prefill chunk 64)", "snapkv", 0.5): 0.6,
    }


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


def at(day: int) -> datetime:
    """A ``finished_at`` on November ``day``: a later day is a later measurement."""
    return datetime(2026, 11, day, 12, tzinfo=timezone.utc)


# -- a plugin that gained an option is still one policy ------------------------------------------------------------


def test_a_codec_makes_a_row_of_its_own_named_with_it_and_the_window_rule_does_not(tmp_path):
    """``snapkv`` and ``snapkv + int4`` at one budget are two points, whatever their code versions (the codec's
    source joins the policy's); a record written before budgets had a window rule is the same point as today's."""
    coded = cell(score=0.7, code="0.1.0+abc/xyz", finished_at=at(25))
    coded = coded.model_copy(update={"cell": coded.cell.model_copy(
        update={"policy": coded.cell.policy.model_copy(update={"codec": "int4"})})})
    old = cell(score=0.2, finished_at=at(20))
    old = old.model_copy(update={"identity": old.identity.model_copy(
        update={"budget": Budget(value=0.5, windows="keep")})})
    rows, _ = load_rows(load_results(write_records(tmp_path / "r", [full(), old, cell(score=0.4, finished_at=at(24)),
                                                                   coded])))
    assert scores(rows) == {("kvp_passkey", "full", None): 1.0, ("kvp_passkey", "snapkv", 0.5): 0.4,
                            ("kvp_passkey", "snapkv + int4", 0.5): 0.7}
    assert len(rows) == 3  # the record of before the window rule is no row of its own


def test_a_policy_that_gained_an_option_is_one_row_across_code_versions_the_newest():
    rows, _ = load_rows([full(), cell(options={"window_tokens": 8}, code="v1", score=0.5, finished_at=at(24)),
                         cell(options={"window_tokens": 8, "pool": "max"}, code="v2", score=0.7, finished_at=at(25))])
    assert scores(rows) == {("kvp_passkey", "full", None): 1.0, ("kvp_passkey", "snapkv", 0.5): 0.7}


def test_options_of_one_code_version_or_that_disagree_across_versions_stay_rows_of_their_own():
    rows, _ = load_rows([
        cell(options={"window_tokens": 8}, code="v1", score=0.1, finished_at=at(22)),  # joins the newest it fits
        cell(options={"window_tokens": 16}, code="v1", score=0.2, finished_at=at(23)),  # disagrees with all of v2
        cell(options={"window_tokens": 8, "pool": "max"}, code="v2", score=0.3, finished_at=at(24)),
        cell(options={"window_tokens": 8, "pool": "mean"}, code="v2", score=0.4, finished_at=at(25)),
    ])
    assert scores(rows) == {("kvp_passkey", "snapkv (pool=mean)", 0.5): 0.4,
                            ("kvp_passkey", "snapkv (pool=max)", 0.5): 0.3,
                            ("kvp_passkey", "snapkv (window_tokens=16)", 0.5): 0.2}


# -- the catalogue's cells are points too ----------------------------------------------------------------------


def test_catalogue_records_are_one_per_point_named_apart_as_the_leaderboard_names_them():
    records = [cell(policy="keydiff", score=0.9, finished_at=at(22)),
               cell(policy="keydiff", budget=Budget.parse(0.5, slack_tokens=0), score=0.1, finished_at=at(23)),
               cell(policy="keydiff", limit=2, score=0.2, finished_at=at(24)),
               cell(policy="snapkv", label="mine", score=0.3), cell(policy="l2norm", label="mine", score=0.4),
               cell(policy="tova", options={"x": 1}, code="v1", score=0.5, finished_at=at(25)),
               cell(policy="tova", options={"x": 1, "y": 2}, code="v2", score=0.6, finished_at=at(26)),
               cell(policy="tova", budget=0.25, status="error", finished_at=at(27))]
    latest = latest_records(records)
    assert {key: record.score for key, record in latest.items()} == {
        ("kvp_passkey", "keydiff", 0.5): 0.9, ("kvp_passkey", "keydiff (slack 0)", 0.5): 0.1,
        ("kvp_passkey (limit 2)", "keydiff", 0.5): 0.2,
        ("kvp_passkey", "mine (snapkv)", 0.5): 0.3, ("kvp_passkey", "mine (l2norm)", 0.5): 0.4,
        ("kvp_passkey", "tova", 0.5): 0.6}  # one policy across code versions; failures left out
    with pytest.raises(ValueError, match="one model's records"):
        latest_records([cell(), cell(model="org/other")])


def test_the_catalogue_shows_its_own_cell_not_a_newer_variant_or_another_models(tmp_path):
    results = write_records(tmp_path / "r", [
        cell(policy="random", score=0.4), cell(policy="keydiff", score=0.9, finished_at=at(22)),
        cell(policy="keydiff", budget=Budget.parse(0.5, slack_tokens=0), score=0.1, finished_at=at(23)),
        cell(policy="keydiff", model="org/other", score=0.2, finished_at=at(24))])
    rows = {line.split("|")[1].strip(): line for line in policies_page(results).splitlines() if line.startswith("| `")}
    assert "0.90 △" in rows["`keydiff`"] and "0.10" not in rows["`keydiff`"] and "0.20" not in rows["`keydiff`"]


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


# -- a figure appears whole under its name, or not at all ----------------------------------------------------------


def two_models() -> list:
    return [record for model in ("org/model-a", "org/model-b")
            for record in (full(model=model), cell(budget=0.25, model=model), cell(budget=0.5, model=model))]


def test_a_figure_that_fails_halfway_leaves_the_old_figure_and_nothing_else(tmp_path, monkeypatch, figure_class):
    plots = tmp_path / "plots"
    plots.mkdir()
    names = [f"org_model-{m}_{name}.png" for m in "ab"
             for name in ("score_vs_budget", "kv_memory_vs_budget", "decode_speed_vs_budget")]
    for name in names:
        (plots / name).write_bytes(b"old figure")

    def half(figure, path, **kwargs):
        Path(path).write_bytes(b"half a")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(figure_class, "savefig", half)
    with pytest.raises(ResultsError, match="no space left on device") as raised:
        plot(Path("unused"), plots, records=two_models())
    assert sorted(os.listdir(plots)) == sorted(names)  # no staging file left behind
    assert all((plots / name).read_bytes() == b"old figure" for name in names)
    [named] = re.findall(r"\((\S+)\)", str(raised.value))
    assert Path(named).parent == plots and Path(named).name in names  # the figure, not its staging file


def test_two_writers_of_one_figure_never_write_into_one_file(tmp_path, monkeypatch, figure_class):
    from kvpolicies.reports.figures import save

    target = tmp_path / "score.png"
    drawn = []

    def draw(figure, path, **kwargs):
        """Writer A writes half its figure, writer B draws the same one meanwhile, then A finishes."""
        drawn.append(Path(path))
        with open(path, "wb") as file:
            file.write(b"A" if len(drawn) == 1 else b"BB")
            file.flush()
            if len(drawn) == 1:
                save(figure_class(), tmp_path, "score", "m", ["m"])
                assert target.read_bytes() == b"BB"  # B's whole figure, not A's half
                file.write(b"A")

    monkeypatch.setattr(figure_class, "savefig", draw)
    assert save(figure_class(), tmp_path, "score", "m", ["m"]) == target
    assert target.read_bytes() == b"AA" and sorted(os.listdir(tmp_path)) == ["score.png"]
    assert len(set(drawn)) == 2 and target not in drawn


def test_a_figure_has_the_permissions_of_any_file_the_user_writes(tmp_path, figure_class):
    previous = os.umask(0o027)
    try:
        written = plot(Path("unused"), tmp_path / "plots", records=two_models())
    finally:
        os.umask(previous)
    assert sorted(os.listdir(tmp_path / "plots")) == sorted(path.name for path in written)
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o640 and path.read_bytes().startswith(b"\x89PNG")
