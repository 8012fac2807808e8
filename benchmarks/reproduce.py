"""Reproduction benchmark: TGRL against its baselines and ablations on the synthetic visual benchmark.

One command regenerates the whole table (resumable: every arm x seed result is its own JSON file, a rerun
skips finished ones and a half-trained run continues from its newest checkpoint):

    .venv/bin/python benchmarks/reproduce.py --jobs 2                      # the tiny CPU recipe, 3 seeds
    .venv/bin/python benchmarks/reproduce.py --quick                       # 1 seed, few steps (development)
    .venv/bin/python benchmarks/reproduce.py --recipe benchmarks/configs/repro-qwen2.5-vl-3b.yaml --jobs 1

Protocol: the synthetic benchmark's train split for training and its test split (unseen images) for the
held-out numbers; the oracle expert with injected faults writes the raw expert trajectories, the recipe's
filter list turns them into the filtered ones. Per seed, every arm starts from the same model (the tiny
model initialised with that seed, optionally after a short SFT warm start shared by all arms) and gets the
same number of optimizer updates (`reproduce.steps`; SFT-then-GRPO splits it). Held-out accuracy, grounding
and format rate come from `tgrl_lib.evaluation.run.evaluate` (greedy), at the end and every `curve_every`
updates (the learning curves). The arms and the one switch each changes are `ARMS` below.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from reproduce_arms import ARMS, NO_WEIGHTS, V3_ARMS, Stage  # noqa: E402  (after the path above)

DEFAULT_RECIPE = REPO / "benchmarks" / "configs" / "repro-tiny-cpu.yaml"
TRAIN_KEYS = ("reward/mean", "reward/accuracy", "reward/format", "expert/prob_mean", "loss/sft")
TRAIN_KEYS += ("response/length_mean", "perf/step_time_s")
EVAL_KEYS = ("accuracy", "format_rate", "grounding", "facts_stated_mean", "length_mean", "evidence_use",
             "evidence_derivable")  # fmt: skip
SPLITS = ("test", "ood", "stress")  # evaluated when the data has them; "test" is reported as "synthetic"


# ----------------------------------------------------------------------------------------- recipe
class WarmStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(ge=1, description="SFT updates on the filtered experts before any arm (not budgeted).")
    problems_per_step: int | None = Field(None, ge=1, description="None = the recipe's train value.")
    lr: float | None = Field(None, gt=0, description="None = the recipe's train.lr.")


class Splits(BaseModel):
    """Extra synthetic splits (`tgrl_lib.data.synthetic.synthesize_splits`); all 0 = table v3's data."""

    model_config = ConfigDict(extra="forbid")
    n_warm: int = Field(
        0, ge=0, description="Of data.n_train, problems for the warm start (warm/); rest: rl/."
    )
    n_ood: int = Field(0, ge=0, description="Out-of-distribution test problems (ood/); needs ood_color.")
    n_stress: int = Field(0, ge=0, description="Hard-level test problems (stress/).")
    ood_color: str | None = Field(None, description="Colour no train/test question names; ood/ questions do.")
    ood_extra_objects: int = Field(1, ge=1, le=3, description="ood/ scenes: up to this many more shapes.")


class SampledEval(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(4, ge=1, description="k samples per problem: avg@k of the final models.")
    temperature: float | None = Field(None, gt=0, description="None = the training temperature.")


class ReproduceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        "tiny", description="'tiny' = build_tiny(seed) per seed; else a model dir for all seeds."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2], description="Seeds (init, sampling, data order)."
    )
    steps: int = Field(ge=2, description="Optimizer updates of every trained arm.")
    curve_every: int = Field(ge=1, description="Held-out evaluation every N updates (learning curves).")
    warm_start: WarmStart | None = Field(None, description="Shared SFT warm start per seed, or none.")
    sft_sequences: Literal["group", "problems"] = Field(
        "group",
        description="Expert trajectories per SFT update in the arms: 'group' = problems_per_step x "
        "group_size (as many sequences as an RL update trains on), 'problems' = problems_per_step.",
    )
    arms: list[str] = Field(default_factory=lambda: list(V3_ARMS), description="Arms to run.")
    splits: Splits = Field(
        default_factory=Splits, description="Warm-start / RL parts, OOD and stress splits."
    )
    start_min_accuracy: float | None = Field(
        None, ge=0, le=1, description="Seeds whose start model is below this greedy test accuracy are "
        "dropped from the arms (and reported); None = keep every seed."
    )  # fmt: skip
    sampled_eval: SampledEval | None = Field(
        None, description="Also evaluate final models with k samples at the training temperature."
    )


@dataclass
class Recipe:
    path: Path
    pipeline: Any  # tgrl_lib.config.PipelineConfig (data, generate, filter, train, eval)
    repro: ReproduceConfig

    @property
    def fingerprint(self) -> str:
        """What a result depends on (seeds and the arm list excluded): results of another recipe never mix."""
        import hashlib

        keys = self.pipeline.model_dump(mode="json", include={"data", "generate", "filter", "train", "eval"})
        repro = self.repro.model_dump(mode="json", exclude={"seeds", "arms"})
        blob = json.dumps({"pipeline": keys, "reproduce": repro}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_recipe(path: Path, quick: bool) -> Recipe:
    from tgrl_lib.config import PipelineConfig
    from tgrl_lib.recipe import deep_merge, read_yaml

    data = read_yaml(path)
    section = data.pop("reproduce")
    quick_section = section.pop("quick", {}) or {}
    if quick:  # reproduce keys, and `pipeline:` overrides of the other sections
        data = deep_merge(data, quick_section.get("pipeline", {}))
        section = deep_merge(section, {k: v for k, v in quick_section.items() if k != "pipeline"})
    repro = ReproduceConfig.model_validate(section)
    unknown = [a for a in repro.arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    return Recipe(path, PipelineConfig.model_validate(data), repro)


def load_unchanged(recipe_path: str, quick: bool, work: str) -> Recipe:
    """The recipe as a worker reads it, refused if it is not the one the invocation started with (whose
    fingerprint `check_fingerprint` stamped into the work directory): an edit mid-run would mix recipes."""
    recipe = load_recipe(Path(recipe_path), quick)
    started = (Path(work) / "fingerprint.txt").read_text().strip()
    if recipe.fingerprint != started:
        raise RuntimeError(
            f"{recipe_path} changed while this invocation ran (fingerprint {started} at the start, "
            f"{recipe.fingerprint} now): restore it, or start again with a new --work and --results"
        )
    return recipe


# ------------------------------------------------------------------------------------- data + start
def prepare_data(recipe: Recipe, work: Path) -> dict[str, Path]:
    """Splits, raw oracle trajectories (faults injected) and the filtered ones; skipped when present.
    With `data.n_warm` the warm start has its own problems and experts (warm/), the arms the rest (rl/)."""
    from tgrl_lib.data.synthetic import synthesize_splits

    d, x = recipe.pipeline.data, recipe.repro.splits
    splits = {"test": d.n_test, "ood": x.n_ood, "stress": x.n_stress, "warm": x.n_warm}
    wanted = [name for name, n in splits.items() if n]
    if not all((work / "data" / name / "manifest.json").exists() for name in wanted):
        shutil.rmtree(work / "data", ignore_errors=True)
        synthesize_splits(work / "data", d.n_train, d.n_test, d.seed, image_size=d.image_size,
                          families=d.families, difficulties=d.difficulties, **x.model_dump())  # fmt: skip
    paths = data_paths(work)
    _experts(recipe, work, paths["train"], paths["raw"], paths["filtered"], "")
    if paths["warm"] != paths["train"]:
        _experts(recipe, work, paths["warm"], paths["warm_raw"], paths["warm_filtered"], "warm_")
    return paths


def _experts(recipe: Recipe, work: Path, problems: Path, raw: Path, filtered: Path, prefix: str) -> None:
    from tgrl_lib.filters.run import run_filters
    from tgrl_lib.generation.run import generate_trajectories

    if not (raw / "manifest.json").exists():
        generate_trajectories(problems, raw, recipe.pipeline.generate)
    if not (filtered / "manifest.json").exists():
        report = run_filters(raw, filtered, work / f"{prefix}experts_rejected", recipe.pipeline.filter)
        print(f"filtered {prefix}experts: {report.kept} kept of {report.input}", flush=True)


def start_model(recipe: Recipe, work: Path, seed: int, paths: dict[str, Path]) -> dict[str, Any]:
    """The model every arm of `seed` starts from: the seeded init, then the warm start if configured."""
    from tgrl_lib.models.tiny import build_tiny

    seed_dir = work / f"seed{seed}"
    init = seed_dir / "init"
    if recipe.repro.model == "tiny":
        if not (init / "model.safetensors").exists():
            build_tiny(init, seed=seed, image_size=recipe.pipeline.data.image_size)
    else:
        init = Path(recipe.repro.model)
    info: dict[str, Any] = {"init": str(init), "start": str(init), "warm_start_s": 0.0}
    warm = recipe.repro.warm_start
    if warm is not None:
        t0 = time.perf_counter()
        changes = {"problems_per_step": warm.problems_per_step, "lr": warm.lr} | NO_WEIGHTS
        changes = {k: v for k, v in changes.items() if v is not None}
        stage = Stage("sft", 1.0, "warm_filtered", changes)
        out = seed_dir / "warm_start"
        result = run_stage(recipe, stage, init, out, seed, warm.steps, paths, warm=True)
        info |= {"start": str(result), "warm_start_s": time.perf_counter() - t0}
    return info


# ------------------------------------------------------------------------------------------ training
def stage_config(
    recipe: Recipe, stage: Stage, model: Path, out: Path, seed: int, steps: int, warm: bool = False
) -> Any:
    from tgrl_lib.config import TrainConfig
    from tgrl_lib.recipe import deep_merge

    base = recipe.pipeline.train.model_dump(mode="json")
    fixed = {
        "algorithm": stage.algorithm,
        "model": str(model),
        "output_dir": str(out),
        "seed": seed,
        "steps": steps,
        "checkpoint_every": min(recipe.repro.curve_every, steps),
        "keep_checkpoints": 10_000,  # every curve point stays until it is evaluated
        "resume": "auto",
    }
    data = deep_merge(deep_merge(base, stage.changes), fixed)
    if stage.algorithm == "sft" and (warm or stage.batch == "group"):  # one expert per problem
        data["mixing"] = {**data["mixing"], "n_expert": 1}
    group_batch = recipe.repro.sft_sequences == "group" and stage.batch == "group"
    if stage.algorithm == "sft" and group_batch and not warm:  # as many sequences as an RL update
        data["problems_per_step"] = data["problems_per_step"] * data["group_size"]
    if stage.algorithm == "grpo":
        data["mixing"] = {**data["mixing"], "n_expert": 0}
    return TrainConfig.model_validate(data)


def run_stage(
    recipe: Recipe,
    stage: Stage,
    model: Path,
    out: Path,
    seed: int,
    steps: int,
    paths: dict[str, Path],
    warm: bool = False,
) -> Path:
    from tgrl_lib.rl.trainer import train

    config = stage_config(recipe, stage, model, out, seed, steps, warm)
    experts = paths[stage.experts] if stage.experts else None
    problems = paths["warm"] if warm else paths["train"]
    return train(config, problems_dir=problems, experts_dir=experts).final_dir


def held_out(recipe: Recipe, model: Path, paths: dict[str, Path], out: Path, sampled: bool = False) -> dict:
    """Greedy metrics of `model` on every test split (cached in `out/summary.json`): the in-distribution
    split's at the top level (as table v3 had them) and each split's under `splits`; with `sampled` and
    `reproduce.sampled_eval` also avg@k at the training temperature under `sampled`."""
    cached = out / "summary.json"
    summary = json.loads(cached.read_text()) if cached.exists() else None
    spec = recipe.repro.sampled_eval
    if summary is not None and not (sampled and spec is not None and "sampled" not in summary):
        return summary
    if summary is None:
        splits = _evaluate(recipe, model, paths, out, recipe.pipeline.eval)
        summary = dict(splits["test"]) | {"splits": splits}
    if sampled and spec is not None:
        train_t = recipe.pipeline.train.sampling.temperature
        sampling = {"temperature": spec.temperature or train_t}
        config = recipe.pipeline.eval.model_copy(update={"samples": spec.samples})
        config = config.model_copy(update={"sampling": config.sampling.model_copy(update=sampling)})
        summary["sampled"] = _evaluate(recipe, model, paths, out / "sampled", config)
        summary["sampled"]["spec"] = {"samples": spec.samples, "temperature": sampling["temperature"]}
    out.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")  # other arms of the seed may read it meanwhile
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(cached)
    return summary


def _evaluate(recipe: Recipe, model: Path, paths: dict[str, Path], out: Path, config: Any) -> dict[str, Any]:
    from tgrl_lib.evaluation.run import evaluate

    benchmarks = {("synthetic" if s == "test" else s): paths[s] for s in SPLITS if s in paths}
    result = evaluate(model, benchmarks, config, out)["benchmarks"]
    splits = {}
    for split in SPLITS:
        name = "synthetic" if split == "test" else split
        if name in result:
            metrics = result[name]
            splits[split] = {k: metrics["overall"].get(k) for k in EVAL_KEYS}
            splits[split]["families"] = {g: m["accuracy"] for g, m in metrics["groups"].items()}
            splits[split]["family_evidence"] = {
                g: m.get("evidence_use") for g, m in metrics["groups"].items()
            }
    return splits


def train_metrics(out: Path, offset: int) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [
        {"step": r["step"] + offset} | {k: r[k] for k in TRAIN_KEYS if k in r} for r in rows if r["step"] > 0
    ]


def run_arm(recipe_path: str, quick: bool, work: str, results: str, arm_name: str, seed: int) -> str:
    """Train (all stages) and evaluate one arm for one seed; writes and returns its result JSON path."""
    import torch
    from reproduce_report import rl_update_stats

    revision()  # the code this worker is about to load
    torch.set_num_threads(int(os.environ.get("REPRO_THREADS", "1")))
    recipe, work_dir, arm = load_unchanged(recipe_path, quick, work), Path(work), ARMS[arm_name]
    target = Path(results) / f"{arm_name}-seed{seed}.json"
    paths = data_paths(work_dir)
    start = json.loads((work_dir / f"seed{seed}" / "start.json").read_text())
    t0 = time.perf_counter()
    run_dir = work_dir / f"seed{seed}" / arm_name
    model, offset = Path(start["start"]), 0
    sampled_start = not arm.stages  # the start model's own row: also avg@k
    curve = [
        {"step": 0} | held_out(recipe, model, paths, work_dir / f"seed{seed}" / "eval_start", sampled_start)
    ]
    train_rows: list[dict[str, float]] = []
    stages = []
    budget = recipe.repro.steps
    for i, stage in enumerate(arm.stages):
        steps = round(budget * stage.share) if i < len(arm.stages) - 1 else budget - offset
        out = run_dir / f"stage{i}-{stage.algorithm}"
        final = run_stage(recipe, stage, model, out, seed, steps, paths)
        train_rows += train_metrics(out, offset)
        checkpoints = sorted(out.glob("step-*"))
        for ckpt in checkpoints:
            step = int(ckpt.name.split("-")[1])
            last = i == len(arm.stages) - 1 and ckpt == checkpoints[-1]  # the final model: also avg@k
            held = held_out(recipe, ckpt, paths, out / f"eval-{ckpt.name}", sampled=last)
            curve.append({"step": offset + step} | held)
        stages.append({"algorithm": stage.algorithm, "steps": steps, "experts": stage.experts,
                       "changes": stage.changes})  # fmt: skip
        model, offset = final, offset + steps
    final_metrics = curve[-1]
    extra = {}
    if not arm.stages and start["init"] != start["start"]:  # also the random init, for reference
        extra["random_init"] = held_out(recipe, Path(start["init"]), paths, run_dir / "eval_init")
    payload = {
        "arm": arm_name,
        "seed": seed,
        "recipe": recipe.path.name,
        "fingerprint": recipe.fingerprint,
        "quick": quick,
        "updates": offset,
        "start": {k: start[k] for k in ("init", "start")},
        "stages": stages,
        "final": {k: v for k, v in final_metrics.items() if k != "step"},
        "curve": curve,
        "train": train_rows,
        "rl_updates": rl_update_stats(sorted(run_dir.glob("stage*-*"))),
        "wall_s": round(time.perf_counter() - t0, 1),
        "revision": revision(),
    } | extra
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(target)
    for stage_dir in run_dir.glob("stage*"):  # keep metrics, evals and the final model; drop checkpoints
        for ckpt in stage_dir.glob("step-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    return str(target)


@functools.cache
def revision() -> str:
    """The library's git commit when this process first asks (a worker asks before it imports tgrl_lib),
    '+dirty' when tracked files under tgrl_lib/ or benchmarks/ differ from it."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "tgrl_lib", "benchmarks")
    return commit + ("+dirty" if dirty else "")


def default_work(name: str) -> Path:
    """Outside the checkout, so that cleaning the repo (`make clean`, `rm -rf runs`) cannot pull the data
    away from a running table: $XDG_CACHE_HOME/tgrl/reproduce-NAME (~/.cache by default)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tgrl" / f"reproduce-{name}"


def data_paths(work: Path) -> dict[str, Path]:
    """Problems and experts in `work`: `train` is what the arms train on (rl/ when the data has a warm-start
    part, else train/), `warm` what the warm start trains on; ood/ and stress/ only when present."""
    data = work / "data"
    split = (data / "warm").is_dir()
    paths = {
        "train": data / ("rl" if split else "train"),
        "warm": data / ("warm" if split else "train"),
        "test": data / "test",
        "raw": work / "experts_raw",
        "filtered": work / "experts_filtered",
        "warm_raw": work / ("warm_experts_raw" if split else "experts_raw"),
        "warm_filtered": work / ("warm_experts_filtered" if split else "experts_filtered"),
    }
    paths |= {s: data / s for s in ("ood", "stress") if (data / s).is_dir()}
    return paths


def prepare_seed(recipe_path: str, quick: bool, work: str, seed: int) -> dict[str, Any]:
    import torch

    revision()
    torch.set_num_threads(int(os.environ.get("REPRO_THREADS", "1")))
    recipe, work_dir = load_unchanged(recipe_path, quick, work), Path(work)
    marker = work_dir / f"seed{seed}" / "start.json"
    if marker.exists():
        return json.loads(marker.read_text())
    paths = data_paths(work_dir)
    info = start_model(recipe, work_dir, seed, paths) | {"revision": revision()}
    start = held_out(recipe, Path(info["start"]), paths, work_dir / f"seed{seed}" / "eval_start")
    info["start_accuracy"] = start["accuracy"]  # greedy, in distribution: the start gate reads it
    marker.write_text(json.dumps(info, indent=1))
    return info


def start_gate(recipe: Recipe, infos: list[dict[str, Any]], runs_dir: Path) -> list[int]:
    """The seeds whose start model passes `reproduce.start_min_accuracy` (all when it is None); every
    seed's start accuracy and the dropped ones go to `runs_dir/start_gate.json` for the report."""
    floor = recipe.repro.start_min_accuracy
    accuracy = {s: info.get("start_accuracy") for s, info in zip(recipe.repro.seeds, infos, strict=True)}
    kept = [s for s, a in accuracy.items() if floor is None or (a is not None and a >= floor)]
    dropped = [s for s in accuracy if s not in kept]
    runs_dir.mkdir(parents=True, exist_ok=True)
    gate = {"min_accuracy": floor, "start_accuracy": accuracy, "dropped": dropped}
    (runs_dir / "start_gate.json").write_text(json.dumps(gate, indent=1) + "\n")
    if dropped:
        print(
            f"start gate: dropping seed(s) {dropped} (start accuracy below {floor}): {accuracy}", flush=True
        )
    return kept


# ---------------------------------------------------------------------------------------------- main
def machine() -> dict[str, str]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="Benchmark recipe (YAML).")
    p.add_argument("--quick", action="store_true", help="The recipe's quick settings (1 seed, few steps).")
    p.add_argument("--jobs", type=int, default=2, help="Arms trained in parallel processes.")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="Data, experts and checkpoints (default ~/.cache/tgrl/reproduce-RECIPE[-quick]).",
    )
    p.add_argument("--results", type=Path, default=None,
                   help="Results directory (default benchmarks/results; --quick: WORK/results).")  # fmt: skip
    p.add_argument("--arms", nargs="*", default=None, help="Subset of arms (default: the recipe's).")
    p.add_argument(
        "--seeds", nargs="*", type=int, default=None, help="Subset of seeds (default: the recipe's)."
    )
    p.add_argument("--report-only", action="store_true", help="Rewrite the report from the finished runs.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from reproduce_report import write_report

    args = parse_args(argv)
    revision()  # before any work, so later edits to the checkout do not relabel this invocation
    signal.signal(signal.SIGTERM, _interrupted)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TGRL_PROGRESS", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # inherited by the spawned workers
    recipe = load_recipe(args.recipe, args.quick)
    name = args.recipe.stem + ("-quick" if args.quick else "")
    work = (args.work or default_work(name)).resolve()
    results = (
        args.results or (work / "results" if args.quick else REPO / "benchmarks" / "results")
    ).resolve()
    runs_dir = results / f"reproduction_runs-{name}" if args.quick else results / "reproduction_runs"
    arms = args.arms or recipe.repro.arms
    if args.seeds:
        recipe.repro.seeds = args.seeds
    check_fingerprint(recipe, work, runs_dir)
    command = " ".join(["python", *map(shlex.quote, [os.path.relpath(__file__, REPO), *sys.argv[1:]])])
    t0 = time.time()
    load_start = os.getloadavg()[0]
    done = 0
    try:
        if not args.report_only:
            work.mkdir(parents=True, exist_ok=True)
            paths = prepare_data(recipe, work)
            common = (str(args.recipe), args.quick, str(work))
            pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=_spawn())
            try:
                starts = pool.map(
                    prepare_seed, *zip(*[(*common, s) for s in recipe.repro.seeds], strict=True)
                )
                seeds = start_gate(recipe, list(starts), runs_dir)
                todo = [
                    (arm, seed)
                    for seed in seeds
                    for arm in arms
                    if not (runs_dir / f"{arm}-seed{seed}.json").exists()
                ]
                print(f"{len(todo)} arm/seed runs to do: {todo}", flush=True)
                futures = {
                    pool.submit(run_arm, *common, str(runs_dir), arm, seed): (arm, seed) for arm, seed in todo
                }
                for future, (arm, seed) in futures.items():
                    path = future.result()
                    done += 1
                    print(f"[{time.time() - t0:7.0f}s] done {arm} seed {seed} -> {path}", flush=True)
            except BaseException:  # Ctrl-C / SIGTERM: stop the workers now; a rerun resumes
                pool.shutdown(wait=False, cancel_futures=True)
                for child in multiprocessing.active_children():
                    child.terminate()
                raise
            pool.shutdown()
            del paths
    finally:
        _log_invocation(runs_dir, command, time.time() - t0, done, args, (load_start, os.getloadavg()[0]))
        md = write_report(recipe, runs_dir, results, name, machine(), ARMS, work)
        print(f"report: {md}", flush=True)
    return 0


def check_fingerprint(recipe: Recipe, work: Path, runs_dir: Path) -> None:
    """Refuse to continue a work or results directory that another recipe (version) wrote."""
    stamp = work / "fingerprint.txt"
    if stamp.exists() and stamp.read_text().strip() != recipe.fingerprint:
        raise SystemExit(
            f"{work} was made by another version of the recipe (fingerprint {stamp.read_text().strip()}, "
            f"now {recipe.fingerprint}): delete it and {runs_dir}, or pass --work/--results elsewhere"
        )
    for path in sorted(runs_dir.glob("*-seed*.json")):
        if json.loads(path.read_text()).get("fingerprint") != recipe.fingerprint:
            raise SystemExit(
                f"{path} comes from another version of the recipe: delete {runs_dir} to start over"
            )
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(recipe.fingerprint + "\n")


def _spawn() -> Any:
    return multiprocessing.get_context("spawn")


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _log_invocation(
    runs_dir: Path, command: str, seconds: float, done: int, args: Any, load: tuple[float, float]
) -> None:
    if args.report_only:
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    began = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - seconds))
    entry = {"command": command, "started": began,
             "wall_s": round(seconds, 1), "runs_finished": done, "jobs": args.jobs,
             "load": [round(x, 2) for x in load], "revision": revision()}  # fmt: skip
    with open(runs_dir / "invocations.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
