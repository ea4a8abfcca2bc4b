"""Intervals on scores and paired tests on differences, from each sample's outcome kept in the record."""

from __future__ import annotations

import csv
import io
import math
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from kvpolicies.experiments.grid import SweepConfig, cells
from kvpolicies.experiments.outcomes import outcomes, score_of, stderrs
from kvpolicies.experiments.results import Outcomes
from kvpolicies.reports.statistics import compare, interval, mcnemar, newcombe, pooled, wilson


def test_wilson_matches_the_published_interval_and_stays_inside_zero_and_one():
    low, high = wilson(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)  # Newcombe (1998), table I: 0.4902, 0.9433
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and round(wilson(0, 10)[1], 4) == 0.2775
    assert wilson(10, 10)[1] == 1.0 and round(wilson(10, 10)[0], 4) == 0.7225


def test_wilson_covers_the_true_rate_about_95_times_in_100():
    rng = random.Random(1)
    for rate, n in ((0.3, 30), (0.9, 20)):
        covered = 0
        for _ in range(2000):
            successes = sum(rng.random() < rate for _ in range(n))
            low, high = wilson(successes, n)
            covered += low <= rate <= high
        assert 0.92 <= covered / 2000 <= 0.99


def test_mcnemar_counts_only_the_samples_where_two_cells_disagree():
    assert mcnemar(6, 0) == pytest.approx(2 / 64)
    assert mcnemar(9, 1) == pytest.approx(2 * 11 / 1024)
    assert mcnemar(5, 5) == 1.0 and mcnemar(0, 0) == 1.0
    # 20 samples, A right on 10 and B on 9, but they disagree on 19 of them: no evidence of a difference
    a = {i: (float(i < 10), None) for i in range(20)}
    b = {i: (float(i >= 10 and i < 19), None) for i in range(20)}
    result = compare("mean", a, b)
    assert result.method == "mcnemar" and (result.a_only, result.b_only) == (10, 9) and not result.significant
    assert result.difference == pytest.approx(0.05) and result.low < 0 < result.high


def test_a_consistent_difference_is_significant_and_a_tie_is_not():
    a = {i: (1.0, None) for i in range(12)}
    b = {i: (float(i < 2), None) for i in range(12)}
    result = compare("mean", a, b)
    assert result.significant and result.difference == pytest.approx(10 / 12) and result.low > 0
    same = compare("mean", a, dict(a))
    assert same.difference == 0 and same.p_value == 1.0 and same.low < 0 < same.high  # an interval, not a point
    assert compare("mean", a, {100: (1.0, None)}) is None  # no sample in common: nothing to compare


def test_newcombes_paired_interval_keeps_a_width_with_no_discordant_sample():
    low, high = newcombe((5, 0, 0, 5))
    assert low < 0 < high and high - low > 0.2
    low, high = newcombe((0, 10, 0, 0))
    assert 0.5 < low < 1 and high == 1.0


def test_partial_credit_and_perplexity_take_a_bootstrap_interval_around_their_score():
    credit = [0.5, 0.25, 1.0, 0.0, 0.75] * 4
    found = interval("mean", credit)
    assert found.method == "bootstrap" and found.n == 20 and found.low < 0.5 < found.high
    assert interval("mean", credit) == found  # deterministic: one page, one interval
    lls, words = [-100.0, -120.0, -90.0, -300.0], [50.0, 60.0, 40.0, 100.0]
    ppl = interval("weighted_perplexity", lls, words)
    assert ppl.score == pytest.approx(math.exp(610 / 250)) and ppl.low <= ppl.score <= ppl.high
    better = {i: (-100.0 - i, 50.0) for i in range(10)}
    worse = {i: (-110.0 - i, 50.0) for i in range(10)}
    result = compare("weighted_perplexity", better, worse)
    assert result.method == "paired swap test" and result.significant and result.difference < 0  # lower is better
    assert interval("mean", []) is None


def test_a_paired_test_over_a_handful_of_samples_cannot_pass_however_large_the_gap():
    """Was: two perplexity documents that both favoured one cell gave p < 0.001 (a bootstrap over 2 samples: every
    resample kept the sign). A swap test gives 2 / 2**n at best."""
    better = {i: (-100.0 - i, 50.0) for i in range(2)}
    worse = {i: (-150.0 - i, 50.0) for i in range(2)}
    two = compare("weighted_perplexity", better, worse)
    assert two.difference < 0 and two.p_value == 0.5 and not two.significant
    five = compare("weighted_perplexity", {i: (-100.0, 50.0) for i in range(5)}, {i: (-150.0, 50.0) for i in range(5)})
    assert five.p_value == pytest.approx(2 / 32) and not five.significant  # 5 samples: never below 0.0625
    six = compare("weighted_perplexity", {i: (-100.0, 50.0) for i in range(6)}, {i: (-150.0, 50.0) for i in range(6)})
    assert six.p_value == pytest.approx(2 / 64) and six.significant


def test_a_pooled_gap_over_tasks_is_tested_by_its_pairs_that_differ():
    """Was: RULER's mean over 4 tasks of 3 samples, A right on 4 samples where B is wrong and alike on the rest,
    read p = 0.007 from a stratified bootstrap; 4 pairs that differ one way give 2 / 16 at best."""
    from kvpolicies.reports.statistics import compare_pooled

    a = [{i: (1.0, None) for i in range(3)} for _ in range(4)]
    b = [{0: (0.0, None), 1: (1.0, None), 2: (1.0, None)}, {0: (0.0, None), 1: (1.0, None), 2: (1.0, None)},
         {0: (0.0, None), 1: (0.0, None), 2: (1.0, None)}, {i: (1.0, None) for i in range(3)}]
    gap = compare_pooled("mean", list(zip(a, b)))
    assert gap.difference == pytest.approx(4 / 12) and gap.p_value == pytest.approx(2 / 16)
    assert not gap.significant and gap.method == "paired swap test"
    right, wrong = {i: (1.0, None) for i in range(6)}, {i: (0.0, None) for i in range(6)}
    wide = compare_pooled("mean", [(right, wrong)] * 2)  # 12 pairs differ, all one way
    assert wide.p_value == pytest.approx(2 / 4096) and wide.significant


@pytest.mark.parametrize("statistic", ["mean", "weighted_perplexity", "bits_per_byte"])
def test_the_swap_test_equals_swapping_by_hand_with_unequal_weights_and_ties(statistic):
    """Every way of swapping the pairs, each scored by ``score_of`` itself: the p-value is the share whose gap is at
    least the observed one. Two pairs are ties and must change nothing."""
    import itertools

    from kvpolicies.reports.statistics import swap_p_value

    rng = random.Random(7)
    if statistic == "mean":
        a = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(7)]
        b = [rng.choice([0.0, 0.5, 1.0]) for _ in range(7)]
        wa = wb = None
    else:
        a = [-rng.uniform(50, 150) for _ in range(7)]
        b = [x - rng.uniform(-5, 30) for x in a]
        wa = [rng.uniform(20, 80) for _ in range(7)]
        wb = [w + rng.uniform(-3, 3) for w in wa]
    b[2], b[5] = a[2], a[5]  # ties
    if wa is not None:
        wb[2], wb[5] = wa[2], wa[5]
    observed = score_of(statistic, a, wa) - score_of(statistic, b, wb)
    gaps = []
    for swaps in itertools.product([False, True], repeat=7):
        sa = [y if swap else x for x, y, swap in zip(a, b, swaps)]
        sb = [x if swap else y for x, y, swap in zip(a, b, swaps)]
        swa = None if wa is None else [y if swap else x for x, y, swap in zip(wa, wb, swaps)]
        swb = None if wb is None else [x if swap else y for x, y, swap in zip(wa, wb, swaps)]
        gaps.append(abs(score_of(statistic, sa, swa) - score_of(statistic, sb, swb)))
    by_hand = sum(gap >= abs(observed) * (1 - 1e-9) for gap in gaps) / len(gaps)
    assert swap_p_value(statistic, [(a, wa, b, wb)]) == pytest.approx(by_hand)
    assert swap_p_value(statistic, [(a, wa, a, wa)]) == 1.0  # every pair a tie: nothing to swap


def test_a_swap_test_beyond_its_exact_range_draws_its_swaps_and_agrees():
    from kvpolicies.reports import statistics

    better = {i: (-100.0 - (i % 3), 50.0) for i in range(18)}
    worse = {i: (-100.5 - (i % 3) + (1.0 if i % 4 == 0 else 0.0), 50.0) for i in range(18)}
    drawn = compare("weighted_perplexity", better, worse)
    assert 0 < drawn.p_value < 1 and drawn.p_value >= 1 / (1 + statistics.SWAPS)
    exact = statistics.EXACT_SWAPS_UP_TO
    try:
        statistics.EXACT_SWAPS_UP_TO = 18  # the same test, every one of its 2**18 swaps
        assert compare("weighted_perplexity", better, worse).p_value == pytest.approx(drawn.p_value, abs=0.02)
    finally:
        statistics.EXACT_SWAPS_UP_TO = exact


def logged(metric: str, items: list, filter_name: str = "none") -> list[dict]:
    return [{"doc_id": i, "filter": filter_name, metric: item} for i, item in enumerate(items)]


def test_outcomes_are_kept_only_where_they_give_back_the_score():
    samples = logged("exact_match", [1.0, 0.0, 1.0, 1.0]) + logged("exact_match", [0.0] * 4, "other")
    kept = outcomes(samples, "exact_match,none", 0.75)
    assert kept == {"statistic": "mean", "doc_ids": [0, 1, 2, 3], "values": [1.0, 0.0, 1.0, 1.0]}
    assert outcomes(samples, "exact_match,none", 0.5) is None  # another aggregation: no interval on the wrong score
    ruler = logged("4096", [1.0, 0.5, -1.0, 0.0])  # RULER: -1 marks a sample of another length
    assert outcomes(ruler, "4096,none", 0.5)["doc_ids"] == [0, 1, 3]
    rolling = logged("word_perplexity", [(-100.0, 50), (-120.0, 60)])
    kept = outcomes(rolling, "word_perplexity,none", math.exp(220 / 110))
    assert kept["statistic"] == "weighted_perplexity" and kept["weights"] == [50.0, 60.0]
    assert outcomes(logged("bleu", [("a", "b")]), "bleu,none", 1.0) is None
    assert stderrs(samples, {"exact_match,none": 0.75}) == {"exact_match,none": pytest.approx(0.25)}  # lm-eval's


def test_a_record_refuses_outcomes_that_do_not_line_up():
    with pytest.raises(ValidationError, match="one doc id, value"):
        Outcomes(statistic="mean", doc_ids=[0, 1], values=[1.0])
    with pytest.raises(ValidationError, match="need weights"):
        Outcomes(statistic="weighted_perplexity", doc_ids=[0], values=[-1.0])
    with pytest.raises(ValidationError):
        Outcomes(statistic="mean", doc_ids=[0], values=[float("nan")])


@pytest.mark.slow
def test_a_cells_record_keeps_each_samples_outcome_and_they_give_back_its_score(tiny_pretrained):
    from kvpolicies.experiments.runner import evaluate

    grid = cells(SweepConfig.model_validate({
        "models": [tiny_pretrained], "policies": ["snapkv"], "budgets": [0.5],
        "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [120], "depths": [0.5], "per_cell": 3}},
                  {"name": "kvp_ppl", "limit": 2, "metadata": {"lengths": [200], "per_length": 2}}]}))
    for cell in grid:
        record = evaluate(cell)
        assert record.status == "ok", record.error
        kept = record.outcomes
        assert kept is not None and len(kept.doc_ids) == record.samples
        assert score_of(kept.statistic, kept.values, kept.weights) == pytest.approx(record.score, rel=1e-9)
        if cell.task.name == "kvp_passkey":
            assert kept.statistic == "mean" and set(record.stderr) == {record.primary_metric}
        else:
            assert kept.statistic == "weighted_perplexity" and record.stderr == {}


def binary(*right: int, n: int = 20) -> dict:
    """Outcomes of an accuracy over ``n`` samples, right on the docs listed."""
    return {"statistic": "mean", "doc_ids": list(range(n)), "values": [float(i in right) for i in range(n)]}


def test_the_leaderboard_shows_intervals_paired_tests_and_shared_ranks(tmp_path):
    from kvpolicies.experiments.results import load_results
    from kvpolicies.reports.leaderboard import load_rows, render, task_tables
    from tests.helpers import make_record, write_records

    everything = range(20)
    records = [
        make_record("acc", "full", 1.0, 1.0, outcomes=binary(*everything), samples=20),
        make_record("acc", "near", 0.5, 0.9, outcomes=binary(*range(18)), samples=20),  # 2 lost: not significant
        make_record("acc", "far", 0.5, 0.3, outcomes=binary(*range(6)), samples=20),    # 14 lost: significant
        make_record("acc", "twin", 0.5, 0.9, outcomes=binary(*range(2, 20)), samples=20),
        make_record("acc", "old", 0.5, 0.5, samples=20),  # written before outcomes were kept
    ]
    folder = write_records(tmp_path / "results", records)
    rows, _ = load_rows(load_results(folder))
    (title, headers, body), = task_tables(rows)
    table = {row[1]: dict(zip(headers, row)) for row in body}
    assert table["near"]["#"] == table["twin"]["#"] == 1 and table["old"]["#"] == 3 and table["far"]["#"] == 4
    assert table["near"]["score [95% CI]"] == "0.900 [0.699, 0.972]"  # Wilson, 18 of 20
    assert table["near"]["vs full"] == "-0.100, p 0.500" and table["far"]["vs full"] == "-0.700, p < 0.001 *"
    assert table["old"]["score [95% CI]"] == "0.500" and table["old"]["vs full"] == ""  # no samples: no interval
    assert table["full (no eviction)"]["score [95% CI]"] == "1.000 [0.839, 1.000]"
    page = render(folder, "markdown", with_provenance=True)
    assert "marked * where p < 0.05" in page and "| n" in page


def test_leaderboard_compare_pairs_two_policies_or_one_policy_at_two_budgets(tmp_path, capsys):
    from kvpolicies.cli import main
    from tests.helpers import make_record, write_records

    folder = write_records(tmp_path / "results", [
        make_record("acc", "full", 1.0, 1.0, outcomes=binary(*range(20)), samples=20),
        make_record("acc", "a", 0.25, 0.3, outcomes=binary(*range(6)), samples=20),
        make_record("acc", "a", 0.5, 0.9, outcomes=binary(*range(18)), samples=20),
        make_record("acc", "b", 0.25, 0.35, outcomes=binary(*range(1, 8)), samples=20),
        make_record("acc", "b", 0.5, 0.85, outcomes=binary(*range(17)), samples=20),
    ])
    def compared(*specs: str) -> list[list[str]]:
        assert main(["leaderboard", str(folder), "--compare", *specs, "--format", "csv"]) == 0
        return [row for row in csv.reader(io.StringIO(capsys.readouterr().out)) if row][2:]

    rows = compared("a", "b")
    assert [(row[0], row[1], row[7]) for row in rows] == [("acc", "0.25", "20"), ("acc", "0.5", "20")]
    assert all(row[8] == "not significant" for row in rows)  # a sample or two apart: no verdict
    (row,) = compared("a@0.25", "a@0.5")
    assert row[1] == "0.25 vs 0.5" and row[4].startswith("-0.600 [") and row[5] == "< 0.001"
    assert row[6] == "mcnemar" and row[8] == "significant (a@0.5 better)"
    rows = compared("full", "a")  # the full cache against a at each budget a ran
    assert [row[1] for row in rows] == ["full vs 0.25", "full vs 0.5"]
    assert [row[8] for row in rows] == ["significant (full better)", "not significant"]
    assert main(["leaderboard", str(folder), "--compare", "c", "a"]) == 2
    assert "no policy 'c' in these results; the tables name a, b, full" in capsys.readouterr().err
    assert main(["leaderboard", str(folder), "--compare", "a@0.1", "b"]) == 2
    assert "a ran at budget 0.25, 0.5, not 0.1" in capsys.readouterr().err


def test_pooled_means_resample_each_task_apart_and_a_paired_gap_is_tested(tmp_path):
    from kvpolicies.experiments.results import load_results
    from kvpolicies.reports.statistics import compare_pooled, pooled
    from kvpolicies.reports.suite import suites, tables
    from tests.helpers import make_record, write_records

    found = pooled("mean", [([1.0] * 4, None), ([0.0, 1.0] * 50, None)])
    assert found.score == pytest.approx(0.75) and found.n == 104 and found.low < 0.75 < found.high
    assert found.method == "mover-wilson" and found.high - found.low > 0.2  # four of four right is not certainty
    credit = pooled("mean", [([1.0] * 4, None), ([0.0, 0.5, 1.0] * 30, None)])  # partial credit: a bootstrap,
    assert credit.method == "bootstrap" and credit.high - credit.low < 0.2  # resampling each task apart
    same = {i: (float(i % 2), None) for i in range(40)}
    better = {i: (1.0, None) for i in range(40)}
    assert compare_pooled("mean", [(better, same), (better, same)]).significant
    assert compare_pooled("mean", [(better, {100: (1.0, None)})]) is None

    def partial(task, policy, keep, protocol, values):
        statistic = {"statistic": "mean", "doc_ids": list(range(len(values))), "values": values}
        return make_record(task, policy, 1.0 if policy == "full" else keep, sum(values) / len(values),
                           protocol=protocol, samples=len(values), outcomes=statistic)

    records = [partial(t, "full", None, "query_aware", [1.0] * 20) for t in ("kvp_ruler_a", "kvp_ruler_b")]
    for task in ("kvp_ruler_a", "kvp_ruler_b"):
        records += [partial(task, "snapkv", 0.5, "query_aware", [1.0, 0.5] * 10),
                    partial(task, "snapkv", 0.5, "query_agnostic", [0.0, 0.5] * 10),
                    partial(task, "keydiff", 0.5, "query_aware", [0.5, 0.5] * 10),
                    partial(task, "keydiff", 0.5, "query_agnostic", [0.0, 1.0, 0.5, 0.5] * 5)]
    [suite] = suites(load_results(write_records(tmp_path / "r", records)))
    found = {title.split(" — ")[0]: body for title, _, body in tables(suite) if "per task," not in title}
    aware = {row[0]: row[1] for row in found["query_aware"]}
    assert aware["snapkv"].startswith("75.0 [")
    assert aware["full cache (no eviction)"] == "100.0 [88.6, 100.0]"  # 40 of 40 right: not a point
    gaps = {row[0]: row[1] for row in found["query-aware minus query-agnostic"]}
    assert gaps["snapkv"] == "+50.0 (p < 0.001) *"
    assert gaps["keydiff"] == "+0.0 (p 1.000)"  # its samples move both ways: no gap


def test_score_plots_draw_each_points_interval_and_say_so(tmp_path, monkeypatch):
    import matplotlib.figure

    from kvpolicies.reports.leaderboard import plot
    from kvpolicies.reports.suite import plot_suite
    from kvpolicies.experiments.results import load_results
    from tests.helpers import make_record, write_records

    figures = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda figure, path, **kwargs: figures.update({Path(path).stem: figure}))
    records = [make_record("kvp_ruler_a", "full", 1.0, 1.0, outcomes=binary(*range(20)), samples=20,
                           protocol="query_agnostic"),
               make_record("kvp_ruler_a", "a", 0.5, 0.5, outcomes=binary(*range(10)), samples=20,
                           protocol="query_agnostic")]
    folder = write_records(tmp_path / "results", records)
    plot(folder, tmp_path / "plots")
    axis = figures["score_vs_budget"].axes[0]
    (bars,) = [c for c in axis.containers if type(c).__name__ == "ErrorbarContainer"]
    low, high = wilson(10, 20)
    segment = bars.lines[2][0].get_segments()[0]
    assert [round(y, 6) for _, y in segment] == [round(low, 6), round(high, 6)]
    assert "95% intervals." in " ".join(t.get_text() for t in figures["score_vs_budget"].texts)
    plot_suite(load_results(folder), tmp_path / "suite")
    axis = figures["mean_vs_keep"].axes[0]
    assert any(type(c).__name__ == "ErrorbarContainer" for c in axis.containers)
    assert "n = 20 per task" in axis.get_title() and "smollm2-135m-instruct" in axis.get_title()
    assert "shifted sideways" in " ".join(t.get_text() for t in figures["mean_vs_keep"].texts)


def test_an_interval_always_holds_its_score_even_at_zero_and_one():
    """Wilson's bounds at 0 and 1 round a hair inside; a plot's error bar below zero length is an error."""
    for n in range(1, 80):
        for values in ([1.0] * n, [0.0] * n):
            found = interval("mean", values)
            assert found.low <= found.score <= found.high


def test_timings_from_a_machine_busier_than_its_cores_are_marked_and_scores_keep_their_digits(tmp_path):
    from kvpolicies.reports.leaderboard import render
    from tests.helpers import make_record, write_records

    folder = write_records(tmp_path / "results", [
        make_record("acc", "full", 1.0, 1.0, cpu_count=2, load_average_start=1.0),
        make_record("acc", "a", 0.5, 0.5, cpu_count=2, load_average_start=3.2),  # shared the CPU
        make_record("acc", "b", 0.5, 0.25, load_average_start=3.2),  # cores unknown: not judged
    ])
    page = render(folder, "csv")
    rows = {row[1]: row for row in csv.reader(io.StringIO(page)) if len(row) > 2}
    assert rows["a"][7] == "20.0 †" and rows["b"][7] == "20.0" and rows["full (no eviction)"][7] == "20.0"
    overall = render(folder, "terminal").split("— budget")[0]  # the overall table, before the task tables
    (line,) = [line for line in overall.splitlines() if line.startswith("│ a ")]
    assert "│ 0.500 " in line  # a's ratio to the full cache with its digits, never "0.5"


def test_a_mean_of_accuracies_over_tasks_keeps_a_width_where_each_task_s_samples_agree():
    """3 of 3 right on one task and 0 of 3 on three others: a bootstrap over samples would draw 0.25 every time
    (no sample varies within its task), a point; the tasks' Wilson intervals combined keep the width that three
    samples per task leave, and narrow with more samples."""
    few = pooled("mean", [([1.0] * 3, None)] + [([0.0] * 3, None)] * 3)
    assert few.method == "mover-wilson" and few.score == 0.25 and few.n == 12
    assert few.low < 0.15 and few.high > 0.45
    many = pooled("mean", [([1.0] * 30, None)] + [([0.0] * 30, None)] * 3)
    assert few.low < many.low < 0.25 < many.high < few.high
    assert pooled("mean", [([0.5, 1.0], None), ([0.0, 1.0], None)]).method == "bootstrap"  # partial credit
