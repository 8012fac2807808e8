"""Synthetic visual-reasoning benchmark: small images of coloured shapes and bar charts with questions whose
answer needs visual evidence plus one reasoning step, and the ground-truth `facts` of every image. The
families are drawn in `tgrl_lib.data.families`; this module owns identity keys, splits and the writer.

Families (each with an `easy` and a `hard` level; `meta["task"]` holds the machine-readable question):

- `count_color_arith`: count the shapes of a colour, then add or subtract (integer).
  easy: 1-3 shapes in 2 colours; hard: 4-6 shapes in 3-4 colours, two counts or total minus a count.
- `bar_chart`: read bar heights (bars named by colour), then sum, compare or rank.
  easy: 2 bars, values 1-5; hard: 3-4 bars, values 1-8 (integer or multiple choice).
- `spatial`: where one shape is relative to another (multiple choice: left of / right of / above / below),
  or how many shapes lie left of a reference. easy: 2 shapes; hard: 3-5 shapes.
- `largest_attribute`: colour or shape of the largest / smallest / leftmost / rightmost shape (multiple
  choice). easy: 2-3 shapes, one clearly larger; hard: 4-5 shapes in three sizes or by position.

Multiple-choice answers hold the correct choice's text (MathVista convention). Generation is deterministic:
problem i of split s draws from its own RNG seeded by sha256(seed, s, i, attempt), images are drawn from
the facts (`render.draw_png`), so the same arguments give byte-identical directories. The same image
(facts) never appears twice in a split, and `exclude` keys keep a test split disjoint from a train split.

Splits (`synthesize_splits`): train (or a warm-start part and an RL part), an in-distribution test split,
an out-of-distribution split (a colour no training question names, more shapes than training scenes hold)
and the hard level as a stress split; each split is disjoint from the ones written before it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgrl_lib.data import render
from tgrl_lib.data.families import COLOR_NAMES, GENERATORS, Drawn
from tgrl_lib.data.outdir import prepare_out_dir
from tgrl_lib.data.render import LayoutError
from tgrl_lib.data.schema import IMAGES, DatasetWriter, Manifest, Problem, read_manifest
from tgrl_lib.errors import TgrlError

FAMILIES = ("count_color_arith", "bar_chart", "spatial", "largest_attribute")
DIFFICULTIES = ("easy", "hard")
GENERATOR = "tgrl.synthetic/1"
MAX_ATTEMPTS = 1000


# ------------------------------------------------------------------------------------------- keys
def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def scene_key(facts: dict[str, Any]) -> str:
    """Identity of an image: equal facts draw equal images."""
    return "scene:" + hashlib.sha256(canonical(facts).encode()).hexdigest()


def pair_key(question: str, facts: dict[str, Any]) -> str:
    """Identity of a (question, facts) pair."""
    return "pair:" + hashlib.sha256(canonical({"q": question, "facts": facts}).encode()).hexdigest()


def problem_rng(seed: int, split: str, index: int, attempt: int) -> random.Random:
    digest = hashlib.sha256(f"{GENERATOR}|{seed}|{split}|{index}|{attempt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ------------------------------------------------------------------------------------------ driver
@dataclass(frozen=True)
class Regime:
    """Which questions a split may hold: `forbid_color` is never named by a question, `require_color` is
    named by every question that names a colour, `extra` shapes (bars) beyond the family's range."""

    forbid_color: str | None = None
    require_color: str | None = None
    extra: int = 0


IN_DISTRIBUTION = Regime()


def queried_colors(task: dict[str, Any]) -> set[str]:
    """The colours a question names (from its machine-readable task)."""
    named = [task.get("color"), *task.get("colors", [])]
    named += [task[k]["color"] for k in ("a", "b", "ref") if isinstance(task.get(k), dict)]
    return {c for c in named if c}


def admits(regime: Regime, task: dict[str, Any]) -> bool:
    colors = queried_colors(task)
    if regime.forbid_color in colors:
        return False
    return regime.require_color is None or not colors or regime.require_color in colors


def _check_choice(
    names: list[str] | tuple[str, ...] | None, known: tuple[str, ...], what: str
) -> tuple[str, ...]:
    chosen = tuple(names) if names else known
    unknown = [x for x in chosen if x not in known]
    if unknown:
        raise TgrlError(
            f"unknown {what} {', '.join(map(repr, unknown))}", hint=f"choose from {', '.join(known)}"
        )
    return chosen


def draw_problem(
    seed: int,
    split: str,
    index: int,
    family: str,
    difficulty: str,
    image_size: int,
    exclude: set[str],
    regime: Regime = IN_DISTRIBUTION,
) -> tuple[Drawn, str, str]:
    """Problem `index` of a split: the first attempt whose image and (question, facts) are not excluded
    and whose question the `regime` admits."""
    for attempt in range(MAX_ATTEMPTS):
        rng = problem_rng(seed, split, index, attempt)
        try:
            drawn = GENERATORS[family](rng, difficulty, image_size, regime.extra)
        except LayoutError:
            continue
        if not admits(regime, drawn.task):
            continue
        skey, pkey = scene_key(drawn.facts), pair_key(drawn.question, drawn.facts)
        if skey not in exclude and pkey not in exclude:
            return drawn, skey, pkey
    raise TgrlError(f"could not draw a new {family}/{difficulty} problem after {MAX_ATTEMPTS} attempts")


def _synthesize(
    out_dir: Path | str,
    *,
    n: int,
    seed: int,
    split: str,
    image_size: int,
    families: list[str] | tuple[str, ...] | None,
    difficulties: list[str] | tuple[str, ...] | None,
    exclude: set[str] | None,
    regime: Regime = IN_DISTRIBUTION,
) -> tuple[Manifest, set[str]]:
    from tgrl_lib.progress import progress_bar

    if n < 0:
        raise TgrlError(f"--n must be >= 0, got {n}")
    render.check_image_size(image_size)
    fams = _check_choice(families, FAMILIES, "family")
    levels = _check_choice(difficulties, DIFFICULTIES, "difficulty")
    combos = [(f, d) for f in fams for d in levels]
    root = Path(out_dir)
    prepare_out_dir(root)
    meta = {"generator": GENERATOR, "seed": seed, "split": split, "n": n, "image_size": image_size,
            "families": list(fams), "difficulties": list(levels)}  # fmt: skip
    if regime != IN_DISTRIBUTION:
        meta["regime"] = {"forbid_color": regime.forbid_color, "require_color": regime.require_color,
                          "extra_objects": regime.extra}  # fmt: skip
    taken = set(exclude or ())
    keys: set[str] = set()
    with (
        DatasetWriter(root, "problems", created_by="tgrl data synth", meta=meta) as writer,
        progress_bar(f"synth {split}", n) as advance,
    ):
        for index in range(n):
            family, difficulty = combos[index % len(combos)]  # round robin: every combination appears
            drawn, skey, pkey = draw_problem(
                seed, split, index, family, difficulty, image_size, taken, regime
            )
            taken.add(skey)  # one image per problem: never twice in a split
            keys.update((skey, pkey))
            pid = f"synth-{split}-{index:06d}"
            image = f"{IMAGES}/{pid}.png"
            writer.add_image(image, render.draw_png(drawn.facts))
            problem = Problem(
                id=pid,
                image=image,
                question=drawn.question,
                answer=drawn.answer,
                answer_type=drawn.answer_type,
                choices=drawn.choices,
                source="synthetic",
                split=split,
                facts=drawn.facts,
                meta={"family": family, "difficulty": difficulty, "task": drawn.task},
            )
            writer.write([problem], sync=False)
            advance()
    return read_manifest(root), keys  # the writer wrote the manifest on leaving the block


def synthesize(
    out_dir: Path | str,
    *,
    n: int,
    seed: int,
    split: str = "train",
    image_size: int = 56,
    families: list[str] | tuple[str, ...] | None = None,
    difficulties: list[str] | tuple[str, ...] | None = DIFFICULTIES,
    exclude: set[str] | None = None,
) -> Manifest:
    """Write `n` problems into the dataset directory `out_dir` (replacing a previous synthetic dataset there).

    `exclude` holds `scene_key`/`pair_key` values that may not be produced (keeps test away from train).
    """
    manifest, _ = _synthesize(out_dir, n=n, seed=seed, split=split, image_size=image_size, families=families,
                              difficulties=difficulties, exclude=exclude)  # fmt: skip
    return manifest


def synthesize_splits(
    out_root: Path | str,
    n_train: int,
    n_test: int,
    seed: int,
    *,
    image_size: int = 56,
    families: list[str] | tuple[str, ...] | None = None,
    difficulties: list[str] | tuple[str, ...] | None = DIFFICULTIES,
    n_warm: int = 0,
    n_ood: int = 0,
    n_stress: int = 0,
    ood_color: str | None = None,
    ood_extra_objects: int = 1,
) -> dict[str, Manifest]:
    """The train and test splits under `out_root`; every split shares no image and no (question, facts)
    pair with any split written before it.

    - `train/` (n_train), or with `n_warm` > 0 `warm/` (n_warm) and `rl/` (the other n_train - n_warm):
      a warm-start part and an RL part with disjoint problems and images;
    - `test/` (n_test): in distribution (same families, levels and questions as training);
    - `ood/` (n_ood): out of distribution: every question that names a colour names `ood_color`, which no
      train or test question names, and every scene holds 1..`ood_extra_objects` more shapes (bars) than
      the family's training range;
    - `stress/` (n_stress): the `hard` level (no `ood_color` in its questions either).
    """
    root = Path(out_root)
    if (root / "manifest.json").exists():
        raise TgrlError("is a dataset itself; train/ and test/ go into a plain directory", path=root)
    if ood_color is not None and ood_color not in COLOR_NAMES:
        raise TgrlError(f"unknown ood colour {ood_color!r}", hint=f"choose from {', '.join(COLOR_NAMES)}")
    if n_ood and (ood_color is None or ood_extra_objects < 1):
        raise TgrlError("an ood split needs ood_color and ood_extra_objects >= 1")
    if not 0 <= n_warm < max(n_train, 1):
        raise TgrlError(f"n_warm must be in [0, n_train), got {n_warm} of {n_train}")
    common = {"seed": seed, "image_size": image_size, "families": families}
    inside = Regime(forbid_color=ood_color)
    plan = [("warm", n_warm), ("rl", n_train - n_warm)] if n_warm else [("train", n_train)]
    plan += [("test", n_test)]
    plan += [("ood", n_ood)] if n_ood else []
    plan += [("stress", n_stress)] if n_stress else []
    out: dict[str, Manifest] = {}
    taken: set[str] = set()
    for split, n in plan:
        regime = Regime(require_color=ood_color, extra=ood_extra_objects) if split == "ood" else inside
        levels = ("hard",) if split == "stress" else difficulties
        out[split], keys = _synthesize(root / split, n=n, split=split, exclude=set(taken), regime=regime,
                                       difficulties=levels, **common)  # fmt: skip
        taken |= keys
    return out
