"""Throughput of the trajectory filters: each rule filter alone, the whole rule chain end to end
(`run_filters`, reading and writing included), and the likelihood filter on the tiny model at batch sizes
1/8/32 (trajectories/s and scored tokens/s). Results go to a markdown note with the machine and command.

    .venv/bin/python benchmarks/perf_filters.py                       # defaults below, ~1-2 min on 2 cores
    .venv/bin/python benchmarks/perf_filters.py --problems 500 --likelihood-trajectories 64

Timings are medians over `--repeats` runs after one warm-up run (cold runs are much slower).
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
RULES = ["parse", "verified", "format", "special_tokens", "repetition", "length", "grounding", "duplicates"]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_data(root: Path, n_problems: int, samples: int) -> tuple[Path, Path]:
    from tgrl_lib.config import GenerateConfig
    from tgrl_lib.data.synthetic import synthesize
    from tgrl_lib.generation.run import generate_trajectories

    synthesize(root / "problems", n=n_problems, seed=0)
    config = GenerateConfig(samples_per_problem=samples, fault_rate=0.4, seed=1)
    generate_trajectories(root / "problems", root / "traj", config)
    return root / "problems", root / "traj"


def bench_rules(problems: Path, traj: Path, repeats: int, model: Path) -> list[tuple[str, int, float]]:
    """(filter, trajectories, seconds) for each rule filter alone on all trajectories, then the chain."""
    from tgrl_lib.config import FilterConfig, FilterSpec
    from tgrl_lib.data.schema import load_dataset
    from tgrl_lib.filters import FilterContext, build_filters
    from tgrl_lib.filters.run import run_filters

    records = load_dataset(traj).records
    context = FilterContext(problems=load_dataset(problems).by_id(), policy_path=str(model))
    rows = []
    for bound in build_filters([FilterSpec(name=n) for n in RULES]):
        if bound.kind == "row":
            seconds = median_time(lambda b=bound: [b(t, context) for t in records], repeats)
        else:
            seconds = median_time(lambda b=bound: b(records, context), repeats)
        rows.append((bound.name, len(records), seconds))
    config = FilterConfig(filters=[FilterSpec(name=n) for n in RULES])
    out = Path(tempfile.mkdtemp(prefix="perf_filters_"))
    run = lambda: run_filters(traj, out / "k", out / "r", config, problems, policy=str(model))  # noqa: E731
    seconds = median_time(run, repeats)
    rows.append(("all rules, end to end (run_filters: read, filter, write, report)", len(records), seconds))
    return rows


def bench_likelihood(
    problems: Path, traj: Path, n: int, batch_sizes: list[int], repeats: int, model: Path
) -> list[tuple[int, int, int, float]]:
    """(batch size, trajectories, scored tokens, seconds) of the likelihood filter's scoring."""
    from tgrl_lib.data.schema import load_dataset
    from tgrl_lib.filters import FilterContext
    from tgrl_lib.filters.likelihood import score_trajectories

    records = load_dataset(traj).records[:n]
    context = FilterContext(load_dataset(problems).by_id(), problems_root=problems, policy_path=str(model))
    context.policy()  # load once, outside the timing
    tokens = sum(count for _, count in score_trajectories(records, context))
    times: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for _ in range(repeats + 1):  # round-robin over batch sizes so load from other processes hits all alike
        for batch_size in batch_sizes:
            context.batch_size = batch_size
            start = time.perf_counter()
            score_trajectories(records, context)
            times[batch_size].append(time.perf_counter() - start)
    # the first round is the warm-up
    return [(b, len(records), tokens, statistics.median(t[1:])) for b, t in times.items()]


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPU cores, {device}; "
        f"1-min load average at start {load:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=1000, help="synthetic problems")
    parser.add_argument("--samples", type=int, default=4, help="oracle trajectories per problem")
    parser.add_argument(
        "--likelihood-trajectories", type=int, default=256, help="scored by the likelihood filter"
    )
    parser.add_argument("--batch-sizes", default="1,8,32", help="likelihood batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median) after one warm-up")
    parser.add_argument("--model", help="policy checkpoint (default: build the tiny model)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "perf_filters.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TGRL_PROGRESS", "0")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    header = machine()
    with tempfile.TemporaryDirectory(prefix="perf_filters_") as tmp:
        root = Path(tmp)
        problems, traj = make_data(root, args.problems, args.samples)
        model = Path(args.model) if args.model else None
        if model is None:
            from tgrl_lib.models.tiny import build_tiny

            model = build_tiny(root / "tiny", seed=0)
        rules = bench_rules(problems, traj, args.repeats, model)
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        likelihood = bench_likelihood(
            problems, traj, args.likelihood_trajectories, sizes, args.repeats, model
        )
    command = shlex.join([".venv/bin/python", "benchmarks/perf_filters.py", *(argv or sys.argv[1:])])
    lines = [
        "# Trajectory filter throughput",
        "",
        f"Machine: {header}; at the end {os.getloadavg()[0]:.1f} (shared cores: expect noise).",
        "",
        f"Command: `{command}`",
        "",
        f"Data: {args.problems} synthetic problems x {args.samples} oracle trajectories (40% with injected "
        f"faults). Median of {args.repeats} runs after a warm-up. `length` counts policy tokens.",
        "",
        "| rule filter | trajectories | seconds | trajectories/s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {n} | {s:.3f} | {n / s:,.0f} |" for name, n, s in rules]
    lines += [
        "",
        f"Likelihood filter (mean token log-prob under {'the tiny model' if not args.model else args.model}, "
        "no grad, prompt + image + response):",
        "",
        "| batch size | trajectories | response tokens | seconds | trajectories/s | response tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {b} | {n} | {t} | {s:.2f} | {n / s:,.1f} | {t / s:,.0f} |" for b, n, t, s in likelihood]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
