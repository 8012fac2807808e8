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


# ----------------------------------------------------------------------------------- varied phrasing
def test_varied_phrasings_verify_are_grounded_and_use_their_evidence(problems):
    from tgrl_lib.scoring.evidence import evidence_use

    rows = OracleExpert(phrasing="varied", seed=2).generate(problems, samples=4)
    for problem, row in zip(problems, rows, strict=True):
        for text in row:
            assert well_formed(text) and verify(text, problem), text
            result = check_claims(extract_claims(text), problem.facts)
            assert result.stated >= 1 and result.false == 0 and result.unknown == 0, (
                text
            )  # every phrasing read
            assert evidence_use(text, problem).follows is True, text
            assert len(text.split()) <= 45, text
    openings = {t.split(">", 1)[1].split(" ", 2)[:2][0] for row in rows for t in row}
    assert len(openings) >= 5  # evidence sentences in several orders and wordings


def test_varied_wrong_fact_is_still_caught(problems):
    expert = OracleExpert(phrasing="varied", fault_rate=1.0, fault_kinds=["wrong_fact"], seed=1)
    for problem, row in zip(problems, expert.generate(problems, samples=2), strict=True):
        for text in row:
            assert verify(text, problem) and check_claims(extract_claims(text), problem.facts).false >= 1, (
                text
            )


def test_fixed_phrasing_is_the_default_and_unchanged(problems):
    fixed = OracleExpert(seed=2).generate(problems[:20], samples=3)
    assert all(len(set(row)) == 1 for row in fixed)  # no faults: K identical texts, as before
    assert fixed[0][0] == oracle_response(problems[0])
    with pytest.raises(TgrlError, match="phrasing"):
        OracleExpert(phrasing="poetic")


def test_diverse_experts_survive_the_real_filters(tmp_path):
    """>= 2 distinct filtered experts per problem on average through the recipe's filters (duplicates
    included), so n_expert 2-4 has something to inject; the duplicates filter still removes true repeats."""
    from tgrl_lib.config import FilterConfig, GenerateConfig
    from tgrl_lib.filters.run import run_filters
    from tgrl_lib.generation.run import generate_trajectories

    synthesize(tmp_path / "p", n=60, seed=4, difficulties=["easy"])
    filters = [{"name": n} for n in ("parse", "verified", "format", "special_tokens", "repetition")]
    filters += [{"name": "grounding", "params": {"min_precision": 1.0}},
                {"name": "duplicates", "params": {"threshold": 0.9, "ngram": 3}}]  # fmt: skip
    config = FilterConfig(filters=filters)
    kept = {}
    for phrasing in ("varied", "fixed"):
        gen = GenerateConfig(samples_per_problem=4, fault_rate=0.3, oracle_phrasing=phrasing, seed=0)
        generate_trajectories(tmp_path / "p", tmp_path / f"raw-{phrasing}", gen)
        report = run_filters(tmp_path / f"raw-{phrasing}", tmp_path / f"ok-{phrasing}",
                             tmp_path / f"no-{phrasing}", config)  # fmt: skip
        assert report.input == report.kept + report.rejected  # counts reconcile
        records = load_dataset(tmp_path / f"ok-{phrasing}", "trajectories").records
        per_problem: dict[str, set[str]] = {}
        for t in records:
            per_problem.setdefault(t.problem_id, set()).add(t.text)
        assert all(
            len(texts) == sum(r.problem_id == pid for r in records) for pid, texts in per_problem.items()
        )
        kept[phrasing] = sum(len(v) for v in per_problem.values()) / 60
    assert kept["varied"] >= 2.0, kept
    assert kept["fixed"] <= 1.05, kept  # the fixed oracle's clean samples are repeats: one survives
