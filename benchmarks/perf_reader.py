"""Reading speed of datasets through the bounded reader (`tgrl_lib/data/reader.py`, issue 17) against the
reader it replaced (`tgrl_lib/data/schema.py` at commit `--before`, loaded from git into a module of its
own), in the same process on the same data: `load_dataset` of a problems dataset (the new reader also
hashes every image against the manifest and checks its header, once per load) and of a trajectories
dataset (rows only). Results go to a markdown note with the machine and command.

    .venv/bin/python benchmarks/perf_reader.py                       # ~1 min on 2 shared cores
    .venv/bin/python benchmarks/perf_reader.py --problems 4096 --samples 4 --repeats 5

Timings are medians over `--repeats` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def old_schema(commit: str, tmp: Path):
    """The `tgrl_lib/data/schema.py` of `commit` as a module of its own (it imports only tgrl_lib.errors)."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{commit}:tgrl_lib/data/schema.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = tmp / "schema_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("schema_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["schema_before"] = module
    spec.loader.exec_module(module)
    return module


def make_data(root: Path, n_problems: int, samples: int) -> tuple[Path, Path]:
    from tgrl_lib.config import GenerateConfig
    from tgrl_lib.data.synthetic import synthesize
    from tgrl_lib.generation.run import generate_trajectories

    synthesize(root / "problems", n=n_problems, seed=0)
    generate_trajectories(
        root / "problems", root / "traj", GenerateConfig(samples_per_problem=samples, seed=1)
    )
    return root / "problems", root / "traj"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=4, help="oracle trajectories per problem")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default="db9e4b0", help="commit of the reader to compare with")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "perf_reader.md"))
    args = parser.parse_args()

    from tgrl_lib.data import schema

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        before = old_schema(args.before, tmp_path)
        problems, traj = make_data(tmp_path, args.problems, args.samples)
        n_traj = len(schema.load_dataset(traj).records)
        n_images = len(list((problems / "images").iterdir()))
        load = os.getloadavg()[0]
        rows = []
        for kind, path, n in (("problems", problems, args.problems), ("trajectories", traj, n_traj)):
            old = median_time(lambda p=path: before.load_dataset(p), args.repeats)
            new = median_time(lambda p=path: schema.load_dataset(p), args.repeats)
            assert len(schema.load_dataset(path).records) == len(before.load_dataset(path).records) == n
            rows.append((kind, n, old, new))
        load_end = os.getloadavg()[0]

    import torch

    lines = [
        "# Dataset reading speed: bounded reader vs the reader it replaced",
        "",
        f"Machine: {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores; 1-min load average at start {load:.1f}, at the end {load_end:.1f} "
        "(shared cores: expect noise).",
        "",
        f"Command: `.venv/bin/python benchmarks/perf_reader.py {shlex.join(sys.argv[1:])}`",
        "",
        f"Data: {args.problems} synthetic problems ({n_images} PNG images, 56x56), {n_traj} oracle "
        f"trajectories. `load_dataset` with hash verification (the default), median of {args.repeats} runs "
        f"after a warm-up. Before: `tgrl_lib/data/schema.py` at `{args.before}` (records.jsonl hashed, rows "
        "parsed with `json.loads`, images only checked to exist). Now: regular-file open, line/field caps, "
        "strict UTF-8, duplicate-key and depth checks; for problems also every image read once, hashed "
        "against the manifest and its header checked (pixel and aspect-ratio caps).",
        "",
        "| dataset | rows | before s | now s | before rows/s | now rows/s | now / before |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, n, old, new in rows:
        lines.append(
            f"| {kind} | {n} | {old:.3f} | {new:.3f} | {n / old:,.0f} | {n / new:,.0f} | {new / old:.2f}x |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
