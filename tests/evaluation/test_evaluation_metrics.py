"""Evaluation aggregation on hand-built scores: avg@k, pass@k, format rate, grounding, groups, reports."""

import json
import math

import pytest

from tgrl_lib.evaluation.run import (
    ProblemScore,
    SampleScore,
    aggregate,
    flat_metrics,
    markdown_table,
    pass_at_k,
    summarize,
    write_report,
)


def test_pass_at_k_matches_the_combinatorial_definition():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - math.comb(3, 3) / math.comb(5, 3))


def _scores():
    a = ProblemScore(
        "a",
        "count",
        [
            SampleScore(True, True, 10, stated=2, true_facts=2),
            SampleScore(False, True, 20, stated=2, true_facts=1),
        ],
        has_facts=True,
    )
    b = ProblemScore(
        "b",
        "chart",
        [
            SampleScore(False, False, 30, stated=0, true_facts=0),
            SampleScore(False, True, 40, stated=1, true_facts=0),
        ],
        has_facts=True,
    )
    c = ProblemScore("c", "count", [SampleScore(True, True, 5), SampleScore(True, True, 5)])
    return [a, b, c]


def test_aggregate_hand_computed():
    metrics = aggregate(_scores(), k=2)
    assert metrics["count"] == 3
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["pass@2"] == pytest.approx((1 + 0 + 1) / 3)
    assert metrics["format_rate"] == pytest.approx(5 / 6)
    assert metrics["length_mean"] == pytest.approx(110 / 6)
    # facts only from problems that have them: stated 2+2+0+1 = 5, true 2+1+0+0 = 3
    assert metrics["grounding"] == pytest.approx(3 / 5)
    assert metrics["facts_stated_mean"] == pytest.approx(5 / 4)


def test_summary_groups_and_reports(tmp_path):
    results = {"synthetic": summarize(_scores(), k=2)}
    assert set(results["synthetic"]["groups"]) == {"count", "chart"}
    assert results["synthetic"]["groups"]["chart"]["accuracy"] == 0.0
    table = markdown_table(results)
    assert "| synthetic | (overall) |" in table and "| synthetic | chart |" in table
    paths = write_report(results, tmp_path, {"model": "m", "samples": 2})
    assert json.loads(paths["results"].read_text())["benchmarks"]["synthetic"]["overall"]["count"] == 3
    assert paths["accuracy"].stat().st_size > 1000 and paths["accuracy_vs_grounding"].exists()
    assert flat_metrics(results)["synthetic.accuracy"] == pytest.approx(0.5)


def test_no_grounding_metric_without_facts():
    metrics = aggregate([_scores()[2]], k=2)
    assert "grounding" not in metrics and metrics["accuracy"] == 1.0


def test_evidence_use_per_family_hand_computed():
    count = ProblemScore(
        "a",
        "count",
        [
            SampleScore(True, True, 5, 1, 1, evidence=True),
            SampleScore(True, True, 5, 1, 0, evidence=False),
            SampleScore(False, True, 5, 0, 0, evidence=None),
        ],
        has_facts=True,
        has_task=True,
    )
    chart = ProblemScore("b", "chart", [SampleScore(False, True, 5, 2, 0, evidence=True)], True, True)
    untasked = ProblemScore("c", "chart", [SampleScore(True, True, 5, 1, 1)], has_facts=True)  # imported
    summary = summarize([count, chart], k=1)
    assert "evidence_use" not in aggregate([untasked], k=1)  # facts but no task: not judged
    assert summary["groups"]["count"]["evidence_use"] == pytest.approx(1 / 2)  # not derivable: not counted
    assert summary["groups"]["count"]["evidence_derivable"] == pytest.approx(2 / 3)
    assert summary["groups"]["chart"]["evidence_use"] == 1.0  # wrong facts, wrong answer, but faithful
    assert summary["overall"]["evidence_use"] == pytest.approx(2 / 3)
    assert "evidence_use" in markdown_table({"s": summary})


def test_score_problem_reads_evidence_use():
    from tgrl_lib.data.schema import Problem
    from tgrl_lib.evaluation.run import score_problem

    facts = {
        "kind": "shapes",
        "width": 56,
        "height": 56,
        "bars": [],
        "objects": [
            {
                "shape": "circle",
                "color": "red",
                "size": "small",
                "px": 10,
                "bbox": [0, 0, 10, 10],
                "center": [5, 5],
            }
        ],
    }
    p = Problem(
        id="p",
        image="i.png",
        question="q",
        answer="1",
        answer_type="integer",
        facts=facts,
        meta={"family": "count_color_arith", "task": {"op": "count_color", "color": "red"}},
    )
    texts = [
        "<think>Red shapes: 1.</think><answer>1</answer>",
        "<think>Red shapes: 2.</think><answer>1</answer>",
        "<answer>1</answer>",
    ]
    score = score_problem(p, texts)
    assert [s.evidence for s in score.samples] == [True, False, None]
    assert [s.correct for s in score.samples] == [True, True, True]
