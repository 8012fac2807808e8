"""The blind prior: the accuracy of answering every question with the train split's most frequent answer
for its question type (`problem_group`: the synthetic family, a benchmark's category), without looking at
the image. A model that reads the image must beat it; one that learnt only the answer distribution
matches it.

>>> from tgrl_lib.data.schema import Problem
>>> p = lambda a, fam: Problem(id=a + fam, image="x.png", question="q", answer=a, answer_type="integer",
...                            meta={"family": fam})
>>> blind_prior([p("2", "count"), p("2", "count"), p("3", "count")], [p("2", "count"), p("3", "count")])
{'accuracy': 0.5, 'groups': {'count': 0.5}}
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tgrl_lib.data.schema import Problem
from tgrl_lib.evaluation.run import problem_group
from tgrl_lib.evaluation.run_report import BLIND_PRIOR


def _key(answer: str) -> str:
    return answer.strip().lower()


def blind_prior(train: Iterable[Problem], test: Iterable[Problem]) -> dict[str, Any]:
    """`{"accuracy": overall, "groups": {group: accuracy}}` of the per-group majority answer of `train`
    on `test`; a group unseen in `train` scores 0."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for problem in train:
        counts[problem_group(problem)][_key(problem.answer)] += 1
    majority = {group: c.most_common(1)[0][0] for group, c in counts.items()}
    hits: dict[str, list[bool]] = defaultdict(list)
    for problem in test:
        group = problem_group(problem)
        hits[group].append(majority.get(group) == _key(problem.answer))
    total = [h for group_hits in hits.values() for h in group_hits]
    return {
        "accuracy": sum(total) / len(total) if total else 0.0,
        "groups": {group: sum(h) / len(h) for group, h in sorted(hits.items())},
    }


def blind_prior_of(train_dir: str | Path, test_dir: str | Path) -> dict[str, Any]:
    """`blind_prior` of two problem dataset directories."""
    from tgrl_lib.data.schema import load_dataset

    train = load_dataset(train_dir, "problems", verify_hashes=False).records
    test = load_dataset(test_dir, "problems", verify_hashes=False).records
    return blind_prior(train, test)


def write_blind_prior(train_dir: str | Path, test_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """`blind_prior_of` the two splits, written to `out_dir/blind_prior.json` (beside results.json)."""
    prior = blind_prior_of(train_dir, test_dir)
    (Path(out_dir) / BLIND_PRIOR).write_text(json.dumps(prior, indent=2) + "\n", encoding="utf-8")
    return prior
