"""Throughput of benchmark evaluation: the batched eval loop (`evaluation.generate_benchmark`, LEFT-padded
batches through `HFBackend`) against a naive loop that calls `model.generate` on one problem at a time,
on the same tiny model, the same synthetic problems, greedy, the same stop tokens and token budget. Both
sides render the prompt, load the image, generate, decode and score; model loading and report writing
are outside the timings. Results go to a markdown note with the machine, the command and every run.

    .venv/bin/python benchmarks/perf_eval.py --threads 1            # defaults below, ~3 min on 2 cores

Runs are interleaved (naive, batch 8, batch 32, batch 64, naive, ...) so that load from other processes
on a shared CPU falls on every variant alike; the first round is a warm-up, the table reports medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def naive_eval(policy, backend, dataset, config) -> list:
    """One problem at a time: render, load the image, `model.generate`, decode, score."""
    import torch

    from tgrl_lib.data.images import load_image
    from tgrl_lib.data.prompts import render_prompt
    from tgrl_lib.evaluation.run import score_problem

    scores = []
    for problem in dataset.records[: config.limit]:
        prompt = render_prompt(policy.processor, problem.question, problem.choices)
        image = load_image(dataset.image_path(problem))
        inputs = policy.processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = policy.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=config.sampling.max_new_tokens,
                eos_token_id=backend.stop_ids,
                pad_token_id=backend.tokenizer.pad_token_id,
                suppress_tokens=backend.suppressed or None,
            )
        ids = out[0, inputs["input_ids"].shape[1] :].tolist()  # [T_new]
        stop = next((i for i, t in enumerate(ids) if t in backend.stop_ids), len(ids) - 1)
        ids = ids[: stop + 1]
        text = policy.processor.tokenizer.decode(ids, skip_special_tokens=True)
        scores.append(score_problem(problem, [text], [len(ids)]))
    return scores


def batched_eval(backend, dataset, config) -> list:
    from tgrl_lib.evaluation.run import generate_benchmark

    backend.batch_size = config.sampling.batch_size
    return generate_benchmark(backend, dataset, config)


def _with_batch_size(config, size: int):
    return config.model_copy(update={"sampling": config.sampling.model_copy(update={"batch_size": size})})


def run(args: argparse.Namespace) -> dict:
    from tgrl_lib.config import EvalConfig, SamplingConfig
    from tgrl_lib.data.schema import load_dataset
    from tgrl_lib.data.synthetic import synthesize
    from tgrl_lib.evaluation.run import evaluate
    from tgrl_lib.generation.hf import HFBackend
    from tgrl_lib.models.policy import load_policy
    from tgrl_lib.models.tiny import build_tiny

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="perf_eval_") as tmp:
        root = Path(tmp)
        model = build_tiny(root / "tiny", seed=0)
        synthesize(root / "test", n=args.problems, seed=0, split="test")
        dataset = load_dataset(root / "test", "problems")
        policy = load_policy(model)
        backend = HFBackend(policy.model, policy.processor)
        base = EvalConfig(
            sampling=SamplingConfig(temperature=0.0, max_new_tokens=args.max_new_tokens), limit=args.problems
        )
        variants = {"naive": lambda: naive_eval(policy, backend, dataset, base)}
        for size in sizes:
            config = _with_batch_size(base, size)
            variants[f"batch {size}"] = lambda c=config: batched_eval(backend, dataset, c)
        times: dict[str, list[float]] = {name: [] for name in variants}
        outputs: dict[str, list] = {}
        round_loads = []
        for _ in range(args.repeats + 1):  # round 0 is the warm-up
            round_loads.append(os.getloadavg()[0])
            for name, fn in variants.items():
                start = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - start)
        texts = {n: [(s.samples[0].text, s.samples[0].length) for s in o] for n, o in outputs.items()}
        tokens = sum(length for _, length in texts["naive"])
        start = time.perf_counter()
        evaluate(model, {"test": root / "test"}, _with_batch_size(base, 32), root / "out",
                 backend=backend)  # fmt: skip
        end_to_end = time.perf_counter() - start
    return {
        "times": times,
        "tokens": tokens,
        "distinct": len(set(texts["naive"])),
        "full": sum(length == args.max_new_tokens for _, length in texts["naive"]),
        "same_as_naive": {n: texts[n] == texts["naive"] for n in texts},
        "end_to_end": end_to_end,
        "round_loads": round_loads,
    }


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (
        f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), {os.cpu_count()} CPU cores (`nproc` "
        f"{len(os.sched_getaffinity(0))}), {device}"
    )


def render(args: argparse.Namespace, argv: list[str], result: dict, header: str, loads: tuple) -> str:
    times, n = result["times"], args.problems
    naive = statistics.median(times["naive"][1:])
    command = shlex.join([".venv/bin/python", "benchmarks/perf_eval.py", *argv])
    lines = [
        "# Evaluation throughput: batched vs one problem at a time",
        "",
        f"Machine: {header}. 1-minute load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end: "
        "the 2 cores are shared with other jobs, so expect noise.",
        "",
        f"Command: `{command}`",
        "",
        f"Data: {n} synthetic test problems (`synthesize(n={n}, seed=0)`, 56 px images, 4 families); "
        f"the tiny Qwen2.5-VL (`build_tiny(seed=0)`, fp32); greedy, max_new_tokens {args.max_new_tokens}, "
        f"stop at <|im_end|>. {result['full']}/{n} responses ran to the full budget "
        f"({result['tokens']} new tokens per run, {result['distinct']} distinct response(s): the untrained "
        "model writes the same newlines for every prompt, so rows never finish early in a batch).",
        "",
        f"Median of {args.repeats} interleaved rounds after a warm-up round; the variants ran in the order "
        "of the table within each round.",
        "",
        "| variant | median s | problems/s | new tokens/s | speed-up vs naive | same outputs as naive |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in times.items():
        seconds = statistics.median(runs[1:])
        lines.append(
            f"| {name} | {seconds:.2f} | {n / seconds:.1f} | {result['tokens'] / seconds:,.0f} | "
            f"{naive / seconds:.2f}x | {'yes' if result['same_as_naive'][name] else 'NO'} |"
        )
    lines += [
        "",
        "Every run (seconds; the first is the warm-up):",
        "",
        "| variant | runs |",
        "|---|---|",
        *(f"| {name} | {', '.join(f'{t:.2f}' for t in runs)} |" for name, runs in times.items()),
        "",
        f"`evaluate()` end to end at batch 32 (generation, scoring, results.json, report.md, two PNG plots, "
        f"model already loaded), once after the rounds: {result['end_to_end']:.2f} s.",
        "",
        "1-minute load average at the start of each round: "
        + ", ".join(f"{load:.1f}" for load in result["round_loads"])
        + ".",
        "",
        "Identical outputs here are weak evidence (one distinct response); batched greedy = one-by-one "
        "greedy on varied outputs (a model with redrawn weights, and an SFT-trained one whose rows stop at "
        "different lengths) is asserted in `tests/evaluation/test_evaluate.py`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=128, help="synthetic test problems")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="response budget in tokens")
    parser.add_argument("--batch-sizes", default="8,32,64", help="batched eval batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median) after a warm-up")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "perf_eval.md"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    os.environ.setdefault("TGRL_PROGRESS", "0")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    header = machine()
    load_start = os.getloadavg()[0]
    result = run(args)
    note = render(args, argv, result, header, (load_start, os.getloadavg()[0]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(note, encoding="utf-8")
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
