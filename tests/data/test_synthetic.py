"""Synthetic benchmark: answers recomputed from facts, images drawn as the facts say, splits disjoint."""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import pytest
from PIL import Image

from tgrl_lib.data import render
from tgrl_lib.data.schema import load_dataset
from tgrl_lib.data.synthetic import (
    DIFFICULTIES,
    FAMILIES,
    pair_key,
    scene_key,
    synthesize,
    synthesize_splits,
)
from tgrl_lib.data.validate import validate_dataset
from tgrl_lib.errors import TgrlError


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthesize_splits(root, n_train=240, n_test=80, seed=7)
    return load_dataset(root / "train", "problems", strict=True), load_dataset(
        root / "test", "problems", strict=True
    )


def _expected(task: dict, facts: dict) -> str:
    """The answer recomputed from the facts, written independently of the generator."""
    objs, bars = facts["objects"], facts["bars"]
    count = Counter(o["color"] for o in objs)
    value = {b["color"]: b["value"] for b in bars}
    op = task["op"]
    if op == "count_color":
        return str(count[task["color"]])
    if op == "count_color_plus":
        return str(count[task["color"]] + task["k"])
    if op == "count_not_color":
        return str(len(objs) - count[task["color"]])
    if op == "count_two_colors":
        return str(count[task["colors"][0]] + count[task["colors"][1]])
    if op == "count_color_diff":
        return str(count[task["colors"][0]] - count[task["colors"][1]])
    if op == "count_total_minus":
        return str(len(objs) - task["k"])
    if op == "bar_sum_two":
        return str(value[task["colors"][0]] + value[task["colors"][1]])
    if op == "bar_sum_all":
        return str(sum(value.values()))
    if op == "bar_range":
        return str(max(value.values()) - min(value.values()))
    if op == "bar_tallest":
        return max(value, key=value.get)
    if op == "bar_second":
        return sorted(value, key=value.get)[-2]
    if op == "bar_count_taller":
        return str(sum(v > value[task["color"]] for v in value.values()))

    def find(desc):
        (hit,) = [o for o in objs if o["color"] == desc["color"] and o["shape"] == desc["shape"]]
        return hit

    if op == "count_left_of":
        ref = find(task["ref"])
        return str(sum(o["center"][0] < ref["center"][0] for o in objs))
    if op == "relation":
        (ax, ay), (bx, by) = find(task["a"])["center"], find(task["b"])["center"]
        if abs(ax - bx) > abs(ay - by):
            return "left of" if ax < bx else "right of"
        return "above" if ay < by else "below"
    if op == "extreme_attr":
        pick = {"largest": max, "smallest": min, "leftmost": min, "rightmost": max}[task["extreme"]]
        by = (lambda o: o["px"]) if task["extreme"] in ("largest", "smallest") else (lambda o: o["center"][0])
        best = pick(by(o) for o in objs)
        (target,) = [o for o in objs if by(o) == best]  # the extreme is unique
        return target[task["attr"]]
    raise AssertionError(f"unknown op {op}")


def test_answers_follow_from_facts(splits):
    for problem in splits[0].records + splits[1].records:
        assert problem.answer == _expected(problem.meta["task"], problem.facts), problem.id
        if problem.answer_type == "multiple_choice":
            assert 3 <= len(problem.choices) <= 4 and problem.answer in problem.choices
            assert len(set(problem.choices)) == len(problem.choices)
        else:
            assert problem.answer_type == "integer" and int(problem.answer) >= 0


def test_every_family_and_difficulty_appears(splits):
    train = splits[0].records
    combos = Counter((p.meta["family"], p.meta["difficulty"]) for p in train)
    assert set(combos) == {(f, d) for f in FAMILIES for d in DIFFICULTIES}
    assert max(combos.values()) - min(combos.values()) <= 1  # round robin
    ops = {p.meta["task"]["op"] for p in train}
    assert {"count_color", "bar_sum_two", "relation", "extreme_attr", "count_left_of", "bar_second"} <= ops
    assert {p.answer_type for p in train} == {"integer", "multiple_choice"}


def test_easy_is_easy(splits):
    for p in splits[0].records:
        if p.meta["difficulty"] != "easy":
            continue
        objects = p.facts["objects"]
        if p.meta["family"] == "count_color_arith":
            assert 1 <= len(objects) <= 3 and len({o["color"] for o in objects}) <= 2
        if p.meta["family"] == "bar_chart":
            assert len(p.facts["bars"]) == 2 and max(b["value"] for b in p.facts["bars"]) <= 5
        if p.meta["family"] in ("spatial", "largest_attribute"):
            assert 2 <= len(objects) <= 3


def test_splits_share_no_image_and_no_pair(splits):
    train, test = splits
    assert {p.split for p in train.records} == {"train"} and {p.split for p in test.records} == {"test"}
    for keyf in (lambda p: scene_key(p.facts), lambda p: pair_key(p.question, p.facts)):
        assert not {keyf(p) for p in train.records} & {keyf(p) for p in test.records}

    def image_hashes(ds):
        return [hashlib.sha256(ds.image_path(p).read_bytes()).hexdigest() for p in ds.records]

    train_images, test_images = image_hashes(train), image_hashes(test)
    assert len(set(train_images)) == len(train_images)  # not even twice within a split
    assert not set(train_images) & set(test_images)


def test_test_split_avoids_excluded_keys(tmp_path):
    synthesize(tmp_path / "a", n=40, seed=3, split="test")
    first = load_dataset(tmp_path / "a").records
    banned = {scene_key(p.facts) for p in first[:20]}
    synthesize(tmp_path / "b", n=40, seed=3, split="test", exclude=banned)
    second = load_dataset(tmp_path / "b").records
    assert not banned & {scene_key(p.facts) for p in second}
    assert [p.question for p in second[20:]] == [p.question for p in first[20:]]  # others unchanged


def test_images_show_the_facts(splits):
    """The pixel at each object's centre has its colour; bars are as tall as value x unit."""
    train = splits[0]
    for p in train.records[:80]:
        image = Image.open(io.BytesIO(train.image_path(p).read_bytes())).convert("RGB")
        assert image.size == (56, 56)
        for obj in p.facts["objects"]:
            assert obj["px"] >= 10 and image.getpixel(tuple(obj["center"])) == render.COLORS[obj["color"]]
        for bar in p.facts["bars"]:
            x0, y0, x1, y1 = bar["bbox"]
            assert y1 - y0 == bar["value"] * p.facts["axis"]["unit"] and x1 - x0 >= 4
            assert image.getpixel(((x0 + x1) // 2, y0)) == render.COLORS[bar["color"]]
            assert image.getpixel(((x0 + x1) // 2, y0 - 2)) != render.COLORS[bar["color"]]


def test_larger_images_and_bad_sizes(tmp_path):
    synthesize(tmp_path / "big", n=8, seed=0, image_size=112)
    ds = load_dataset(tmp_path / "big")
    assert Image.open(ds.image_path(ds.records[0])).size == (112, 112)
    assert min(o["px"] for p in ds.records for o in p.facts["objects"]) >= 20
    for bad in (50, 28):
        with pytest.raises(TgrlError, match="multiple of 28"):
            synthesize(tmp_path / f"bad{bad}", n=1, seed=0, image_size=bad)


def test_family_selection_and_unknown_names(tmp_path):
    synthesize(tmp_path / "bars", n=6, seed=0, families=["bar_chart"], difficulties=["hard"])
    records = load_dataset(tmp_path / "bars").records
    assert {(p.meta["family"], p.meta["difficulty"]) for p in records} == {("bar_chart", "hard")}
    with pytest.raises(TgrlError, match="unknown family 'pie'"):
        synthesize(tmp_path / "x", n=1, seed=0, families=["pie"])
    with pytest.raises(TgrlError, match="difficulty"):
        synthesize(tmp_path / "y", n=1, seed=0, difficulties=["medium"])


def test_rerun_replaces_a_dataset_but_not_other_files(tmp_path):
    out = tmp_path / "d"
    synthesize(out, n=12, seed=0)
    synthesize(out, n=4, seed=0)  # fewer problems: stale images must go
    assert len(list((out / "images").iterdir())) == 4 and validate_dataset(out) == []
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TgrlError, match="not part of a tgrl dataset"):
        synthesize(out, n=4, seed=0)
    assert (out / "notes.txt").read_text() == "mine"


def test_an_empty_split_is_written_but_validate_refuses_it(tmp_path):
    manifests = synthesize_splits(tmp_path, n_train=3, n_test=0, seed=1)
    assert manifests["test"].count == 0 and load_dataset(tmp_path / "test").records == []
    [problem] = validate_dataset(tmp_path / "test")
    assert "no records" in problem and validate_dataset(tmp_path / "train") == []


# ------------------------------------------------------------------- warm / rl / test / ood / stress
@pytest.fixture(scope="module")
def v4_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4")
    kwargs = {"difficulties": ["easy"], "n_warm": 120, "n_ood": 80, "n_stress": 40, "ood_color": "yellow"}
    manifests = synthesize_splits(root / "a", 240, 60, 5, **kwargs)
    again = synthesize_splits(root / "b", 240, 60, 5, **kwargs)
    loaded = {name: load_dataset(root / "a" / name, "problems", strict=True) for name in manifests}
    return root, manifests, again, loaded


def test_v4_splits_are_disjoint_and_deterministic(v4_splits):
    root, manifests, again, loaded = v4_splits
    assert {k: m.count for k, m in manifests.items()} == {"warm": 120, "rl": 120, "test": 60, "ood": 80,
                                                          "stress": 40}  # fmt: skip
    assert not (root / "a" / "train").exists()  # the train problems are warm + rl
    scenes = {name: {scene_key(p.facts) for p in ds.records} for name, ds in loaded.items()}
    names = list(scenes)
    for i, a in enumerate(names):
        assert len(scenes[a]) == len(loaded[a].records)  # one image per problem
        for b in names[i + 1 :]:
            assert not scenes[a] & scenes[b], (a, b)  # no image shared between any two splits
    for name in names:  # same seed, byte-identical
        assert manifests[name].files == again[name].files


def test_ood_split_asks_what_training_never_asks(v4_splits):
    from tgrl_lib.data.synthetic import queried_colors

    _, _, _, loaded = v4_splits

    def size(p):
        return len(p.facts["objects"]) or len(p.facts["bars"])

    train = [p for name in ("warm", "rl", "test", "stress") for p in loaded[name].records]
    assert all("yellow" not in queried_colors(p.meta["task"]) for p in train)
    assert any("yellow" in [o["color"] for o in p.facts["objects"]] for p in train)  # seen, never asked
    most = {}
    for p in loaded["warm"].records + loaded["rl"].records:
        most[p.meta["family"]] = max(most.get(p.meta["family"], 0), size(p))
    ood = loaded["ood"].records
    assert {p.meta["family"] for p in ood} == set(FAMILIES)
    for p in ood:
        named = queried_colors(p.meta["task"])
        assert not named or "yellow" in named, p.question
        assert size(p) > most[p.meta["family"]], p.question  # more shapes than any training scene
        assert p.answer == _expected(p.meta["task"], p.facts)  # answers still follow from the facts
    assert sum("yellow" in p.question for p in ood) >= len(ood) // 3
    assert {p.meta["difficulty"] for p in loaded["stress"].records} == {"hard"}


def test_split_arguments_are_checked(tmp_path):
    with pytest.raises(TgrlError, match="ood colour"):
        synthesize_splits(tmp_path / "a", 10, 2, 0, n_ood=2, ood_color="purple")
    with pytest.raises(TgrlError, match="ood split needs"):
        synthesize_splits(tmp_path / "b", 10, 2, 0, n_ood=2)
    with pytest.raises(TgrlError, match="n_warm"):
        synthesize_splits(tmp_path / "c", 10, 2, 0, n_warm=10)
