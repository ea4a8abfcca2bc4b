"""The frontier preset and page: shapes read from what a cell held, the Pareto front, tests over shared samples."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kvpolicies.cli import build_parser, main
from kvpolicies.cli.sweeps import sweep_config
from kvpolicies.experiments.grid import cells
from kvpolicies.experiments.outcomes import score_of
from kvpolicies.experiments.results import Outcomes, load_results
from kvpolicies.integrations.protocol import Protocol
from kvpolicies.reports.frontier import (
    BOTH,
    EVICTION,
    QUANTIZATION,
    REFERENCE,
    Point,
    duels,
    on_front,
    panels,
    plot_frontier,
    render_frontier,
)
from tests.helpers import make_record, write_records

EMBEDDED_ENTRY_BYTES = 2 * 64 * 4
"""One entry of the embedded model at full precision: a key and a value of 64 float32 channels."""


def record(task: str, policy: str, budget: float | None, kept: float, right: list[int] | None = None, *,
           codec: str = "full", protocol: str = "query_aware", docs: list[int] | None = None):
    """A finished cell whose cache held ``kept`` of the full cache's bytes and whose samples ``docs`` (0, 1, ...
    by default) were right where ``right`` holds 1."""
    right = [1] * 8 + [0] * 2 if right is None else right
    docs = list(range(len(right))) if docs is None else docs
    made = make_record(task, policy, 1.0 if budget is None else budget, sum(right) / len(right), protocol=protocol,
                       samples=len(right), outcomes={"statistic": "mean", "doc_ids": docs, "values": right},
                       kv_memory={"sequences": len(right), "resident_fraction_mean": kept,
                                  "resident_bytes_mean": kept * 2**20, "full_bytes_mean": 2**20})
    spec = made.cell.policy.model_copy(update={"codec": codec})
    return made.model_copy(update={"cell": made.cell.model_copy(update={"policy": spec})})


def full(task: str = "kvp_passkey", right: list[int] | None = None):
    return record(task, "full", None, 1.0, [1] * 10 if right is None else right)


def by_point(folder: Path) -> dict[tuple[str, float | None], tuple[Point, bool]]:
    """The one panel of ``folder``: each point and whether it is on the front, by policy and budget."""
    [panel], _ = panels(load_results(folder))
    return {(p.policy, p.budget): (p, front) for p, front in zip(panel.points, panel.front)}


def tenths(n: int) -> list[int]:
    """Ten samples, the first ``n`` right."""
    return [1] * n + [0] * (10 - n)


@pytest.fixture
def frontier(tmp_path) -> Path:
    """One task, one protocol: the full cache, eviction at full precision, and int4 / int8 at several budgets."""
    return write_records(tmp_path / "r", [
        full(),
        record("kvp_passkey", "streaming", 0.5, 0.50, tenths(6)),
        record("kvp_passkey", "keydiff", 0.5, 0.50, tenths(8)),
        record("kvp_passkey", "keydiff", 0.5, 0.16, tenths(8), codec="int4"),
        record("kvp_passkey", "keydiff", 0.25, 0.16, tenths(8), codec="int4"),
        record("kvp_passkey", "keydiff", 0.25, 0.25, tenths(5)),
        record("kvp_passkey", "streaming", 0.0625, 0.07, tenths(2)),
        record("kvp_passkey", "keydiff", 0.5, 0.28, tenths(9), codec="int8"),
        record("kvp_passkey", "keydiff", 0.25, 0.251, tenths(7), codec="int8"),
    ])


# -- the front -----------------------------------------------------------------------------------------------------


def test_the_front_holds_the_points_nothing_beats_in_fewer_or_equal_bytes(frontier):
    found = by_point(frontier)
    front = {key for key, (_, marked) in found.items() if marked}
    assert front == {("streaming", 0.0625), ("keydiff + int4", 0.5), ("keydiff + int4", 0.25),
                     ("keydiff + int8", 0.5), ("full", None)}
    # keydiff at 0.5 is beaten by keydiff + int4, the same score in fewer bytes; streaming at 0.5 by keydiff at the
    # same bytes; keydiff at 0.25 by int4's better score in fewer bytes; int8 at 0.25 by int4 at fewer bytes too.
    assert ("keydiff", 0.5) not in front and ("streaming", 0.5) not in front
    # The two int4 cells held the same bytes with the same score: neither beats the other, both are on the front.
    assert found[("keydiff + int4", 0.5)][1] and found[("keydiff + int4", 0.25)][1]


def point(kept: float, score: float, higher: bool = True, name: str = "p") -> Point:
    return Point(model="m", task="t", protocol=Protocol.QUERY_AWARE, policy=name, codec="full", budget=0.5,
                 kept=kept, score=score, higher_is_better=higher, metric="word_perplexity,none", samples=2)


def test_a_perplexity_front_keeps_the_lowest_and_equal_points_share_it():
    found = [point(0.25, 12.0, False), point(0.25, 11.0, False), point(0.5, 10.0, False), point(0.5, 10.0, False),
             point(0.6, 10.5, False)]
    assert on_front(found) == [False, True, True, True, False]
    # The same score in strictly fewer bytes dominates; in more bytes it never does.
    assert on_front([point(0.2, 0.5), point(0.3, 0.5)]) == [True, False]


# -- shapes --------------------------------------------------------------------------------------------------------


def test_shapes_follow_the_codec_and_whether_the_budget_bound(tmp_path):
    folder = write_records(tmp_path / "r", [
        full(),
        record("kvp_passkey", "keydiff", 0.5, 0.5),
        record("kvp_passkey", "keydiff", 0.5, 0.156, codec="int4"),
        record("kvp_passkey", "keydiff", 0.25, 0.1565, codec="int4"),  # a longer answer: the same bytes, nearly
        record("kvp_passkey", "keydiff", 0.125, 0.126, codec="int4"),  # held less than its codec's most: evicted
        record("kvp_passkey", "kvzip", 0.5, 0.156, codec="int4"),      # another policy, every entry kept too
        record("kvp_passkey", "keydiff", 0.5, 0.281, codec="int8"),    # alone at its bytes, well under 0.5
        record("kvp_passkey", "keydiff", 0.25, 0.252, codec="int8"),
        record("kvp_passkey", "keydiff", 0.125, 0.127, codec="kivi2"),  # its only cell, and it filled its budget
        record("kvp_passkey", "keydiff", 0.25, 0.251, codec="kivi4"),  # the most of its codec, yet it filled its
        record("kvp_passkey", "keydiff", 0.125, 0.126, codec="kivi4"),  # budget, as the other did: both evicted
    ])
    shapes = {key: p.shape for key, (p, _) in by_point(folder).items()}
    assert shapes == {
        ("full", None): REFERENCE, ("keydiff", 0.5): EVICTION,
        ("keydiff + int4", 0.5): QUANTIZATION, ("keydiff + int4", 0.25): QUANTIZATION,
        ("keydiff + int4", 0.125): BOTH, ("kvzip + int4", 0.5): QUANTIZATION,
        ("keydiff + int8", 0.5): QUANTIZATION, ("keydiff + int8", 0.25): BOTH,
        ("keydiff + kivi2", 0.125): BOTH, ("keydiff + kivi4", 0.25): BOTH, ("keydiff + kivi4", 0.125): BOTH,
    }


def test_a_record_that_counts_its_entries_is_classified_by_them_not_by_its_bytes(tmp_path):
    def counted(budget: float, kept: float, entries: float, codec: str):
        made = record("kvp_passkey", "keydiff", budget, kept, codec=codec)
        memory = made.kv_memory.model_copy(update={"kept_fraction_mean": entries})
        return made.model_copy(update={"kv_memory": memory})

    folder = write_records(tmp_path / "r", [
        full(),
        counted(0.0625, 0.0625, 1.0, "kivi2"),    # its residual fills the budget, yet every entry is kept
        counted(0.5, 0.156, 1.0, "int4"),
        counted(0.125, 0.125, 0.79, "int4"),      # a fifth of the entries evicted
    ])
    shapes = {key: p.shape for key, (p, _) in by_point(folder).items()}
    assert shapes[("keydiff + kivi2", 0.0625)] == QUANTIZATION
    assert shapes[("keydiff + int4", 0.5)] == QUANTIZATION
    assert shapes[("keydiff + int4", 0.125)] == BOTH


def test_shapes_are_judged_per_protocol(tmp_path):
    """The question's entries count differently under the two protocols: a query-agnostic cell is compared with
    query-agnostic cells of its codec only."""
    folder = write_records(tmp_path / "r", [
        full(),
        record("kvp_passkey", "keydiff", 0.5, 0.5, protocol="query_agnostic"),
        record("kvp_passkey", "keydiff", 0.5, 0.17, codec="int4", protocol="query_agnostic"),
        record("kvp_passkey", "keydiff", 0.5, 0.156, codec="int4"),
        record("kvp_passkey", "keydiff", 0.25, 0.156, codec="int4"),
    ])
    found, _ = panels(load_results(folder))
    assert [(panel.protocol, {p.policy: p.shape for p in panel.points if p.budget == 0.5}) for panel in found] == [
        (Protocol.QUERY_AGNOSTIC, {"keydiff": EVICTION, "keydiff + int4": QUANTIZATION}),
        (Protocol.QUERY_AWARE, {"keydiff + int4": QUANTIZATION}),
    ]
    assert all(panel.reference is not None for panel in found)  # the full cache joins both protocols' panels


# -- the page ------------------------------------------------------------------------------------------------------


def rows(text: str, starting: str) -> list[list[str]]:
    """The markdown table rows of ``text`` whose first cell is ``starting``, as lists of cells."""
    found = []
    for line in text.splitlines():
        row = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and row[0] == starting:
            found.append(row)
    return found


def test_the_page_prints_bytes_intervals_n_ranks_and_the_front(frontier):
    text = render_frontier(frontier, load_results(frontier), "markdown")
    int4 = [row for row in rows(text, "16.00%") if row[2] == "keydiff + int4"]
    assert [row[1:] for row in int4] == [
        ["quantization only", "keydiff + int4", "0.25", "0.800 [0.490, 0.943]", "10", "3", "front"],
        ["quantization only", "keydiff + int4", "0.5", "0.800 [0.490, 0.943]", "10", "3", "front"],
    ]  # equal scores share rank 3 (after the full cache's 1.0 and int8's 0.9); keydiff's 0.8 is the third of them
    [keydiff] = [row for row in rows(text, "50.00%") if row[2] == "keydiff"]
    assert keydiff[1:] == ["eviction only", "keydiff", "0.5", "0.800 [0.490, 0.943]", "10", "3", ""]
    [reference] = rows(text, "100.00%")
    assert reference[1:] == ["full cache", "full", "-", "1.000 [0.722, 1.000]", "10", "1", "front"]
    assert rows(text, "bytes kept") == [
        ["bytes kept", "shape", "policy", "budget", "score [95% CI]", "n", "rank", "Pareto"]]
    assert "95% interval" in text and "Wilson" in text


def test_each_budget_tests_the_best_quantized_point_against_the_best_eviction_only_one(frontier):
    [panel], _ = panels(load_results(frontier))
    by_budget = {duel.budget: duel for duel in duels(panel)}
    at_half = by_budget[0.5]
    assert at_half.best[EVICTION].policy == "keydiff" and at_half.best[QUANTIZATION].policy == "keydiff + int8"
    assert at_half.quantized is at_half.best[QUANTIZATION]
    assert at_half.test.method == "mcnemar" and at_half.test.n == 10 and not at_half.test.significant
    assert by_budget[0.0625].quantized is None and by_budget[0.0625].test is None  # nothing to test against
    text = render_frontier(frontier, load_results(frontier), "markdown")
    [int8] = [row for row in rows(text, "0.5") if row[1] == "quantization only"]
    assert int8[2:6] == ["keydiff + int8", "28.00%", "0.900 [0.596, 0.982]", "10"] and int8[6].startswith("+0.100 [")
    assert int8[7:] == ["1.000 (mcnemar, n = 10)", "not significant: not told apart at this n"]
    [eviction] = [row for row in rows(text, "0.5") if row[1] == "eviction only"]
    assert eviction[2:] == ["keydiff", "50.00%", "0.800 [0.490, 0.943]", "10", "", "", ""]


def test_the_paired_test_runs_over_the_samples_both_cells_ran(tmp_path):
    """The quantized cell ran 6 of the 10 samples: the test pairs those 6, where it got every one right and eviction
    every one wrong (eviction's 4 right answers are on samples the other never ran)."""
    folder = write_records(tmp_path / "r", [
        full(),
        record("kvp_passkey", "keydiff", 0.25, 0.25, [0] * 6 + [1] * 4),
        record("kvp_passkey", "keydiff", 0.25, 0.16, [1] * 6, codec="int4", docs=list(range(6))),
    ])
    [panel], _ = panels(load_results(folder))
    [duel] = duels(panel)
    assert (duel.test.n, duel.test.a_only, duel.test.b_only) == (6, 6, 0)
    assert math.isclose(duel.test.p_value, 2 / 2**6) and duel.test.difference == 1.0
    text = render_frontier(folder, load_results(folder), "markdown")
    [int4] = [row for row in rows(text, "0.25") if row[1] == "quantization only"]
    assert int4[5] == "6" and int4[6].startswith("+1.000 [")
    assert int4[7:] == ["0.031 (mcnemar, n = 6)", "significant: quantized better"]
    [summary] = rows(text, "kvp_passkey")
    assert summary[1:7] == ["query_aware", "0.25", "none", "none", "none", "6-10"]


def test_a_perplexity_page_tests_with_a_paired_swap_test_and_lower_is_better(tmp_path):
    def perplexity(policy: str, budget: float | None, kept: float, logs: list[float], codec: str = "full"):
        made = record("kvp_ppl", policy, budget, kept, [1] * len(logs), codec=codec)
        weights = [100.0] * len(logs)
        score = score_of("weighted_perplexity", logs, weights)
        return made.model_copy(update={
            "score": score, "higher_is_better": False, "primary_metric": "word_perplexity,none",
            "outcomes": Outcomes(statistic="weighted_perplexity", doc_ids=list(range(len(logs))), values=logs,
                                 weights=weights)})

    # 8 documents: with 5 or fewer no paired test can pass, however large the gap (statistics.swap_p_value)
    folder = write_records(tmp_path / "r", [
        perplexity("full", None, 1.0, [-200.0, -210.0, -190.0, -205.0] * 2),
        perplexity("keydiff", 0.25, 0.25, [-300.0, -320.0, -310.0, -305.0] * 2),
        perplexity("keydiff", 0.25, 0.16, [-220.0, -230.0, -215.0, -225.0] * 2, codec="int4"),
    ])
    [panel], _ = panels(load_results(folder))
    [duel] = duels(panel)
    assert duel.test.method == "paired swap test" and duel.test.difference < 0 and duel.test.significant
    assert panel.front == [True, False, True]  # int4 (fewest bytes, lower perplexity), keydiff beaten, the full cache
    text = render_frontier(folder, load_results(folder), "markdown")
    assert "significant: quantized better" in text and "(lower is better" in text


# -- the command ---------------------------------------------------------------------------------------------------


def test_the_command_renders_the_page_and_skips_a_damaged_file_by_name(frontier, tmp_path, capsys):
    (frontier / "zz-cut-short.json").write_text('{"key": "abc", "cell": ')
    output = tmp_path / "frontier.md"
    assert main(["leaderboard", str(frontier), "--frontier", "--format", "markdown", "--provenance",
                 "--output", str(output)]) == 0
    err = capsys.readouterr().err
    assert f"kvpolicies: warning: skipped {frontier / 'zz-cut-short.json'}: not valid JSON" in err
    text = output.read_text()
    assert text.startswith("# Eviction versus precision") and "kvp_passkey — query_aware — " in text
    assert "more tokens at lower precision?" in text


@pytest.mark.parametrize("extra, named", [
    (["--suite"], "--suite"), (["--compare", "keydiff", "full"], "--compare"),
    (["--suite", "--compare", "a", "b"], "--suite and --compare"),
])
def test_the_frontier_is_a_page_of_its_own(frontier, capsys, extra, named):
    assert main(["leaderboard", str(frontier), "--frontier", *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"kvpolicies: error: --frontier and {named} are pages of their own; give one of them\n"


def test_an_empty_or_eviction_only_folder_says_what_to_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["leaderboard", str(empty), "--frontier"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"no finished results in {empty}: ") and "kvpolicies sweep --preset frontier" in out
    only_full = write_records(tmp_path / "full", [full()])
    assert main(["leaderboard", str(only_full), "--frontier"]) == 0
    assert "no cell compressed the cache with its bytes counted" in capsys.readouterr().out
    eviction = write_records(tmp_path / "eviction", [full(), record("kvp_passkey", "keydiff", 0.5, 0.5)])
    assert main(["leaderboard", str(eviction), "--frontier"]) == 0
    out = capsys.readouterr().out
    assert "None of these cells stored its entries at lower precision" in out and "eviction only" in out


@pytest.fixture
def figure_class():
    """matplotlib's Figure (plots are an extra: their tests skip without it)."""
    return pytest.importorskip("matplotlib.figure").Figure


def test_plots_put_bytes_on_a_log_axis_and_join_the_front(frontier, tmp_path, monkeypatch, figure_class, capsys):
    figures = {}
    monkeypatch.setattr(figure_class, "savefig",
                        lambda figure, path, **kwargs: figures.update({Path(path).name: figure}))
    written = plot_frontier(load_results(frontier), tmp_path / "plots")
    assert [path.name for path in written] == ["frontier_query_aware.png"]
    [axis] = figures["frontier_query_aware.png"].axes
    assert axis.get_xscale() == "log"
    [line] = [line for line in axis.get_lines() if line.get_label() == "Pareto front"]
    assert list(line.get_xdata()) == [0.07, 0.16, 0.16, 0.28, 1.0]
    assert "smollm2-135m-instruct, n = 10 per point" in axis.get_title()
    labels = set(axis.get_legend_handles_labels()[1])
    assert {"eviction only", "quantization only", "eviction × quantization", "full cache"} <= labels
    output = tmp_path / "page" / "frontier.md"
    output.parent.mkdir()
    assert main(["leaderboard", str(frontier), "--frontier", "--format", "markdown", "--plots",
                 str(tmp_path / "plots"), "--output", str(output)]) == 0
    assert "![frontier_query_aware](../plots/frontier_query_aware.png)" in output.read_text()


# -- the preset ----------------------------------------------------------------------------------------------------


def preset(*args: str):
    return sweep_config(build_parser().parse_args(["sweep", "--preset", "frontier", *args]))


def test_the_frontier_preset_meets_the_three_shapes_at_common_budgets():
    from kvpolicies.registry import get_codec

    config = preset()
    grid = cells(config)
    assert len(grid) == 293  # as its comment says
    assert [(t.name, t.metadata, t.limit) for t in config.tasks] == [
        ("kvp_passkey", {"lengths": [2048], "per_cell": 2}, None),
        ("kvp_niah", {"lengths": [2048], "per_cell": 2}, None),
        ("kvp_ruler_niah_single_1", {"max_seq_lengths": [4096]}, 6),
        ("kvp_ruler_niah_single_2", {"max_seq_lengths": [4096]}, 6)]
    assert [t.name for t in config.reference_tasks] == ["kvp_ppl"]
    assert set(config.protocols) == set(Protocol)
    budgets = sorted({c.budget.value for c in grid if c.policy.name != "full"})
    assert budgets == [0.0625, 0.125, 0.25, 0.5]
    price = {codec: get_codec(codec).entry_bytes(64, torch.float32) / EMBEDDED_ENTRY_BYTES
             for codec in ("int8", "int4")}
    assert price["int8"] > 0.25 >= price["int4"]  # at 0.25: 25% in full, every entry in int4, 89% of them in int8
    for budget in budgets:  # every budget holds eviction at full precision and every codec, under both protocols
        here = {(c.policy.codec, c.protocol) for c in grid if c.policy.name != "full" and c.budget.value == budget}
        codecs = ("full", "int8", "int4", "kivi4", "kivi2")
        assert here == {(codec, protocol) for codec in codecs for protocol in Protocol}
    # quantization alone: a codec at a budget its entries do not fill; eviction x quantization: at one they overfill
    for codec, cost in price.items():
        assert any(b >= cost for b in budgets) and any(b < cost for b in budgets)


def test_the_preset_runs_perplexity_query_aware_without_kvzip_in_a_second_command():
    config = preset("--tasks", "kvp_ppl", "--protocols", "query_aware", "--policies", "full,streaming,keydiff,snapkv")
    grid = cells(config)
    assert [(t.name, t.metadata) for t in config.tasks] == [("kvp_ppl", {"lengths": [2048], "per_length": 2})]
    assert {c.protocol for c in grid} == {Protocol.QUERY_AWARE} and not any(c.policy.name == "kvzip" for c in grid)
    assert len(grid) == 29  # 7 policies x 4 budgets and the full cache, whose cell the first command ran
    first = {c.key() for c in cells(preset()) if c.policy.name == "full" and c.task.name == "kvp_ppl"}
    assert first == {c.key() for c in grid if c.policy.name == "full"}
