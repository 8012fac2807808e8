"""Oracle expert: clean responses verify and are fully grounded; each injected fault does what it says."""

from __future__ import annotations

import random
import re

import pytest

from tgrl_lib.data.schema import Problem, load_dataset
from tgrl_lib.data.synthetic import synthesize
from tgrl_lib.errors import TgrlError
from tgrl_lib.generation.oracle import FAULT_KINDS, OracleExpert, oracle_response
from tgrl_lib.scoring.grounding import check_claims, extract_claims

FORMAT = re.compile(r"<think>(?:(?!</?think>|</?answer>).)+</think><answer>([^<]+)</answer>", re.DOTALL)

try:  # the project's verifiable reward, when it is installed
    from tgrl_lib.scoring.rewards import verify
except ImportError:

    def verify(response: str, problem: Problem) -> bool:
        """Exact match of the `<answer>` tag (the oracle writes the choice text or the integer)."""
        found = re.search(r"<answer>(.*?)</answer>", response, re.DOTALL)
        return found is not None and found.group(1).strip() == problem.answer


def well_formed(text: str) -> bool:
    return FORMAT.fullmatch(text) is not None


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> list[Problem]:
    root = tmp_path_factory.mktemp("oracle")
    synthesize(root / "d", n=160, seed=11)
    return load_dataset(root / "d", strict=True).records


def test_clean_responses_verify_and_are_grounded(problems):
    for problem in problems:
        text = oracle_response(problem)
        assert well_formed(text), text
        assert verify(text, problem), (problem.question, problem.answer, text)
        result = check_claims(extract_claims(text), problem.facts)
        assert result.stated >= 1 and result.false == 0 and result.unknown == 0, text
        assert len(text.split()) <= 45, text


def test_clean_response_example(problems):
    problem = next(p for p in problems if p.meta["task"]["op"] == "count_color_plus")
    color, k = problem.meta["task"]["color"], problem.meta["task"]["k"]
    red = sum(o["color"] == color for o in problem.facts["objects"])
    text = oracle_response(problem)
    assert text.startswith("<think>I see ") and f"{color.capitalize()} shapes: {red}." in text
    assert text.endswith(f"{red} + {k} = {red + k}.</think><answer>{red + k}</answer>")


def test_wrong_fact_keeps_the_answer_and_fails_grounding(problems):
    for i, problem in enumerate(problems):
        text = oracle_response(problem, random.Random(i), "wrong_fact")
        assert well_formed(text) and verify(text, problem), text
        assert check_claims(extract_claims(text), problem.facts).false >= 1, text


def test_wrong_arithmetic_gives_a_wrong_answer(problems):
    for i, problem in enumerate(problems):
        text = oracle_response(problem, random.Random(i), "wrong_arithmetic")
        assert well_formed(text) and not verify(text, problem), text
        if problem.answer_type == "multiple_choice":
            assert FORMAT.fullmatch(text).group(1) in problem.choices


def test_bad_format_breaks_the_tags(problems):
    shapes = set()
    for i, problem in enumerate(problems):
        text = oracle_response(problem, random.Random(i), "bad_format")
        assert not well_formed(text), text
        shapes.add((text.startswith("<think>"), "</think>" in text, "<answer>" in text))
    assert len(shapes) >= 3  # several kinds of breakage


def test_repetition_repeats_a_phrase(problems):
    for i, problem in enumerate(problems[:20]):
        text = oracle_response(problem, random.Random(i), "repetition")
        first = re.match(r"<think>([^.]+\.)", text).group(1)
        assert text.count(first) >= 10 and verify(text, problem)


def test_expert_rates_meta_and_determinism(problems):
    clean = OracleExpert(fault_rate=0.0)
    assert clean.name == "oracle"
    rows = clean.generate_with_meta(problems, None, samples=2)
    assert len(rows) == len(problems) and all(len(r) == 2 for r in rows)
    assert all(meta["fault"] is None for row in rows for _, meta in row)
    assert [m["sample"] for _, m in rows[0]] == [0, 1]

    noisy = OracleExpert(fault_rate=0.5, seed=3)
    metas = [meta for row in noisy.generate_with_meta(problems, samples=1) for _, meta in row]
    faults = [m["fault"] for m in metas if m["fault"]]
    assert 0.3 * len(metas) < len(faults) < 0.7 * len(metas)
    assert set(faults) == set(FAULT_KINDS)
    again = OracleExpert(fault_rate=0.5, seed=3).generate(problems, samples=1)
    assert again == noisy.generate(problems, samples=1)  # same seed, same texts and faults
    assert OracleExpert(fault_rate=0.5, seed=4).generate(problems, samples=1) != again

    only = OracleExpert(fault_rate=1.0, fault_kinds=["wrong_arithmetic"])
    texts = only.generate(problems[:30], samples=1)
    assert not any(verify(t[0], p) for t, p in zip(texts, problems[:30], strict=True))


def test_expert_refuses_bad_settings():
    with pytest.raises(TgrlError, match="fault_rate"):
        OracleExpert(fault_rate=1.5)
    with pytest.raises(TgrlError, match="fault kinds"):
        OracleExpert(fault_rate=0.1, fault_kinds=["typo"])
    with pytest.raises(TgrlError, match="unknown oracle fault"):
        oracle_response(
            Problem(id="x", image="i.png", question="q", answer="1", answer_type="integer"), fault="x"
        )


def test_problem_without_facts_gets_an_answer_only_trajectory():
    problem = Problem(
        id="mv-1",
        image="i.png",
        question="Which?",
        answer="blue",
        answer_type="multiple_choice",
        choices=["red", "blue", "green"],
        source="mathvista",
    )
    text, meta = OracleExpert(fault_rate=1.0, fault_kinds=["wrong_fact"]).generate_with_meta([problem])[0][0]
    assert well_formed(text) and verify(text, problem) and meta["fault"] is None
    wrong = oracle_response(problem, random.Random(0), "wrong_arithmetic")
    assert not verify(wrong, problem)
