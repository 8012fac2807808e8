"""RL step time and peak RSS: our trainer against TRL's `GRPOTrainer`, same tiny VLM, same work.

    .venv/bin/pip install -e '.[bench]'                 # TRL (not a runtime dependency)
    .venv/bin/python benchmarks/perf_step.py            # ~10 min on 2 busy cores
    .venv/bin/python benchmarks/perf_step.py --alternating 2 --step-pairs 12 --pairs 5 --threads 1

Both sides run the workload of `perf_common` (tiny Qwen2.5-VL, 8 problems x G=8, exactly 48 new tokens per
response, fp32 CPU, HF `generate`) with the same settings, matched as follows:

| setting | ours (`TrainConfig`) | TRL (`GRPOConfig`) |
|---|---|---|
| problems per step, G | problems_per_step 8, group_size 8 | generation batch 64, num_generations 8 |
| updates per step | ppo_epochs 1, minibatch 64: 1 | steps_per_generation = grad_accum 2, num_iterations 1 |
| micro-batch | micro_batch_size 32 | per_device_train_batch_size 32 |
| response length | min = max new tokens = 48 (gen. config) | max_completion_length = min_new_tokens = 48 |
| sampling | temperature 1, top-k/top-p off | temperature 1, top_k 0, top_p 1 |
| loss | token_mean (DAPO), clip 0.2 / 0.28 | loss_type dapo, epsilon 0.2, epsilon_high 0.28 |
| reference / KL | none (kl_coef 0) | none (beta 0) |
| advantages | r - mean(group) (advantage_scale none) | scale_rewards none |
| token weights | none (TRL has none) | - |
| optimizer | AdamW lr 1e-3, wd 0, constant, clip 1.0 | adamw_torch lr 1e-3, wd 0, constant, clip 1.0 |
| precision, threads | fp32, `--threads` | fp32 (use_cpu), `--threads` |
| reward | `perf_common.bench_reward` | the same function |

What is not the same, by design of each trainer: TRL samples G completions by repeating each prompt G
times (the vision tower and the prompt prefill run per completion), we pass `num_return_sequences=G`;
TRL's training forward also computes the entropy for its logs (`fused_lm_head`); TRL logs through the
`transformers.Trainer` machinery, we write one JSON line per step.

Two measurements, both interleaved so that the load of a shared machine falls on both sides alike:

- alternating steps (the headline): both trainers in one process, TRL's step k then our step k (from
  TRL's step-end callback), `--step-pairs` timed pairs after a warm-up pair, in `--alternating` fresh
  processes; each pair's ratio is our step time over TRL's; with the phase times of both;
- process pairs (and peak RSS): `--pairs` pairs of fresh processes, order AB, BA, ...
  (`perf_common.interleaved`); a run's step time is its median step interval without the first and last.

The headline is the median of the pair ratios.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_common import (
    WORKLOAD,
    Provenance,
    bench_reward,
    entry_point,
    install_bench_reward,
    interleaved,
    intervals,
    ours_config,
    prepare_workdir,
    run_ours,
    save_result,
    spawn,
)

SCRIPT = Path(__file__).resolve()


def run_trl(
    paths: dict[str, Path], steps: int, callbacks: list | None = None, instrument: Any = None
) -> dict[str, Any]:
    """Train `steps` steps with TRL's GRPOTrainer (HF generate) in this process; `callbacks` are added to
    the trainer's (they run after the step stamp)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tgrl_lib.data.images import load_image
    from tgrl_lib.data.prompts import build_messages
    from tgrl_lib.data.schema import load_dataset
    from tgrl_lib.models.policy import load_policy

    w = WORKLOAD
    problems = load_dataset(paths["problems"], "problems")
    by_id = problems.by_id()

    def messages(problem: Any) -> list[dict]:
        out = build_messages(problem.question, problem.choices)  # our prompt: same chat template, same ids
        out[0]["content"] = [{"type": "text", "text": out[0]["content"]}]  # Arrow needs one content type
        return out

    rows = [
        {"prompt": messages(p), "image": load_image(problems.image_path(p)), "problem_id": p.id}
        for p in problems.records
    ]

    def reward_fn(completions: list, problem_id: list[str], **_: Any) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [
            bench_reward(t, by_id[pid], format_weight=w["format_reward"]).reward
            for t, pid in zip(texts, problem_id, strict=True)
        ]

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    policy = load_policy(paths["model"], dtype="float32")
    accumulation = w["minibatch_size"] // w["micro_batch_size"]
    out_dir = tempfile.mkdtemp(prefix="perf_trl_")
    args = GRPOConfig(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=w["micro_batch_size"],
        gradient_accumulation_steps=accumulation,
        num_generations=w["group_size"],
        max_completion_length=w["max_new_tokens"],
        generation_kwargs={"min_new_tokens": w["max_new_tokens"]},
        temperature=w["temperature"],
        top_k=0,
        top_p=1.0,
        num_iterations=1,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        scale_rewards="none",
        learning_rate=w["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=policy.model,
        reward_funcs=reward_fn,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=policy.processor,
        callbacks=[Stamp(), *(callbacks or [])],
    )
    if instrument is not None:
        instrument(trainer)
    start = time.perf_counter()
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    logs = [e for e in trainer.state.log_history if "completions/mean_length" in e]
    rows_per_step = w["problems_per_step"] * w["group_size"]
    return {
        "intervals_s": intervals(start, stamps),
        "generated_tokens": [e["completions/mean_length"] * rows_per_step for e in logs],
        "trained_tokens": [e["completions/mean_length"] * rows_per_step for e in logs],
        "grad_norm": [float(e.get("grad_norm", 0.0)) for e in logs],
        "trl_step_time_s": [float(e.get("step_time", 0.0)) for e in logs],
        "reward_mean": [float(e.get("reward", 0.0)) for e in logs],
    }


def run_alternating(paths: dict[str, Path], pairs: int) -> dict[str, Any]:
    """Both trainers in one process, stepping in turn: TRL step k, then our step k (from TRL's step-end
    callback), `pairs` + 1 times. A TRL step is timed from the end of our previous step to TRL's next
    step end (its logging included), ours around `trainer.train_step`. Phases per step: TRL's HF
    `generate` call, its forward + loss (`compute_loss`) and backward; our rollout and everything after
    it (the trainer's `perf/*` metrics)."""
    from transformers import TrainerCallback

    from tgrl_lib.rl import trainer

    install_bench_reward()
    out = Path(tempfile.mkdtemp(prefix="perf_ours_"))
    run = trainer.setup(ours_config(paths, out, pairs + 1), paths["problems"], None, None)
    times: dict[str, list[float]] = {"ours": [], "trl": []}
    phases: dict[str, list[float]] = {k: [] for k in ("trl_generate", "trl_forward_loss", "trl_backward")}
    phases |= {"ours_rollout": [], "ours_after_rollout": []}
    current = dict.fromkeys(("trl_generate", "trl_forward_loss", "trl_backward"), 0.0)
    clock = {"last": 0.0, "step": 0}

    def timed(key: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                current[key] += time.perf_counter() - start

        return wrapper

    def instrument(trl_trainer: Any) -> None:
        trl_trainer._generate_single_turn = timed("trl_generate", trl_trainer._generate_single_turn)
        trl_trainer.compute_loss = timed("trl_forward_loss", trl_trainer.compute_loss)
        trl_trainer.accelerator.backward = timed("trl_backward", trl_trainer.accelerator.backward)

    class Alternate(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times["trl"].append(time.perf_counter() - clock["last"])
            for key in current:
                phases[key].append(current[key])
                current[key] = 0.0
            clock["step"] += 1
            start = time.perf_counter()
            metrics = trainer.train_step(run, clock["step"])
            times["ours"].append(time.perf_counter() - start)
            phases["ours_rollout"].append(metrics["perf/rollout_time_s"])
            phases["ours_after_rollout"].append(metrics["perf/update_time_s"])
            clock["last"] = time.perf_counter()

    clock["last"] = time.perf_counter()
    trl = run_trl(paths, pairs + 1, callbacks=[Alternate()], instrument=instrument)
    shutil.rmtree(out, ignore_errors=True)
    return {"step_s": times, "phases_s": phases, "trl_generated_tokens": trl["generated_tokens"]}


def run_worker(name: str, paths: dict[str, Path], steps: int, overrides: dict) -> dict[str, Any]:
    if name == "trl":
        return run_trl(paths, steps)
    if name == "alternating":
        return run_alternating(paths, steps)
    return run_ours(paths, steps, **overrides)


def summarise(pairs: list[tuple[dict, dict]], alternating: list[dict]) -> dict[str, Any]:
    ratios = [a["step_s"] / b["step_s"] for a, b in pairs]
    rss = [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pairs]
    ours = [t for r in alternating for t in r["step_s"]["ours"][1:]]  # the warm-up pair left out
    trl = [t for r in alternating for t in r["step_s"]["trl"][1:]]
    step_ratios = [a / b for a, b in zip(ours, trl, strict=True)]
    phases = {
        key: statistics.median(t for r in alternating for t in r["phases_s"][key][1:])
        for key in alternating[0]["phases_s"]
    }
    return {
        "phases_s_median": phases,
        "step_pairs": len(step_ratios),
        "ratio_median": statistics.median(step_ratios),
        "ratio_min": min(step_ratios),
        "ratio_max": max(step_ratios),
        "ours_step_s_median": statistics.median(ours),
        "trl_step_s_median": statistics.median(trl),
        "run_pairs": len(pairs),
        "run_ratio_median": statistics.median(ratios),
        "run_ratio_min": min(ratios),
        "run_ratio_max": max(ratios),
        "ours_run_step_s_median": statistics.median(a["step_s"] for a, _ in pairs),
        "trl_run_step_s_median": statistics.median(b["step_s"] for _, b in pairs),
        "ours_rss_mb_median": statistics.median(a["peak_rss_mb"] for a, _ in pairs),
        "trl_rss_mb_median": statistics.median(b["peak_rss_mb"] for _, b in pairs),
        "rss_ratio_median": statistics.median(rss),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="interleaved (ours, TRL) process pairs")
    parser.add_argument("--steps", type=int, default=7, help="steps per run (first and last not timed)")
    parser.add_argument("--alternating", type=int, default=2, help="processes stepping both trainers in turn")
    parser.add_argument("--step-pairs", type=int, default=12, help="timed step pairs per such process")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each run")
    parser.add_argument("--code", help="directory with the tgrl_lib to measure (default: this checkout)")
    args = parser.parse_args(argv)
    run = Provenance("benchmarks/perf_step.py", argv)
    code = Path(args.code).resolve() if args.code else None
    with tempfile.TemporaryDirectory(prefix="perf_step_") as tmp:
        workdir = Path(tmp)
        prepare_workdir(workdir)
        pairs = interleaved(
            args.pairs,
            lambda: spawn(SCRIPT, "ours", workdir, args.steps, args.threads, code=code),
            lambda: spawn(SCRIPT, "trl", workdir, args.steps, args.threads, code=code),
        )
        alternating = []
        for i in range(args.alternating):
            alternating.append(
                spawn(SCRIPT, "alternating", workdir, args.step_pairs, args.threads, code=code)
            )
            r = alternating[-1]["step_s"]
            ratio = statistics.median(a / b for a, b in zip(r["ours"][1:], r["trl"][1:], strict=True))
            print(f"alternating process {i + 1}/{args.alternating}: median step ratio ours/TRL {ratio:.3f}")
    result = {
        "benchmark": "step",
        **run.fields(args),
        "pairs": [{"ours": a, "trl": b} for a, b in pairs],
        "alternating": alternating,
        "summary": summarise(pairs, alternating),
    }
    path = save_result("step", result)
    print(f"wrote {path}; ours/TRL step time median ratio {result['summary']['ratio_median']:.3f}")
    return 0


if __name__ == "__main__":
    entry_point(main, run_worker)
