"""Crash safety of `tgrl generate` and `tgrl filter` (issue 8, item 1): each command is SIGKILLed at several
random points and run again; the final outputs equal an uninterrupted run's (no duplicates, no losses,
counts reconcile), and after every kill the output is either complete or has no manifest (unreadable)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tgrl_lib.config import GenerateConfig
from tgrl_lib.data.schema import MANIFEST, RECORDS, load_dataset, read_manifest
from tgrl_lib.data.synthetic import synthesize
from tgrl_lib.data.validate import validate_dataset
from tgrl_lib.errors import TgrlError
from tgrl_lib.generation.run import generate_trajectories

pytestmark = pytest.mark.slow
ENV = {**os.environ, "TGRL_PROGRESS": "0"}
TGRL = [sys.executable, "-m", "tgrl_lib.cli"]


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_at(
    command: list[str], *, after_s: float | None = None, watch: Path | None = None, lines_at: int = 0
):
    """Start `command`, SIGKILL it after `after_s` seconds or once `watch` has `lines_at` lines; returns
    (killed, lines in `watch` at the kill)."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.monotonic()
    while process.poll() is None:
        due = after_s is not None and time.monotonic() - start >= after_s
        if due or (watch is not None and lines(watch) >= lines_at):
            seen = lines(watch) if watch is not None else 0
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True, seen
        time.sleep(0.002)
    assert process.returncode == 0, process.stderr.read().decode()
    return False, lines(watch) if watch is not None else 0


def unreadable_or_complete(root: Path) -> bool:
    """After a kill: no manifest (never read), or a manifest over a dataset that validates."""
    if not (root / MANIFEST).exists():
        return True
    return validate_dataset(root) == []


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume") / "problems"
    synthesize(root, n=120, seed=11)
    return root


def test_generate_survives_sigkill_at_random_points(problems, tmp_path):
    K, total = 2, 240
    options = ["--samples", str(K), "--fault-rate", "0.3", "--batch-size", "4", "--set", "throttle_s=0.03"]
    baseline = generate_trajectories(
        problems,
        tmp_path / "base",
        GenerateConfig(samples_per_problem=K, fault_rate=0.3, sampling={"batch_size": 4}),
    )
    expected = sorted(
        (t.problem_id, t.meta["sample"], t.text) for t in load_dataset(tmp_path / "base").records
    )
    assert baseline.trajectories == total

    out = tmp_path / "out"
    command = [*TGRL, "generate", "--problems", str(problems), "--out", str(out), *options]
    rng = random.Random(20260)
    targets = sorted(rng.sample(range(8, total - 8), 3))
    kills = [kill_at(command, after_s=rng.uniform(0.2, 1.0), watch=out / RECORDS, lines_at=total)]
    kills += [kill_at(command, watch=out / RECORDS, lines_at=n) for n in targets]
    for killed, seen in kills:
        assert killed and seen < total  # every kill landed before the end
        assert not (out / MANIFEST).exists()  # a killed generation is never readable
    assert all(seen >= n for (_, seen), n in zip(kills[1:], targets, strict=True))  # at the chosen points

    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records = load_dataset(out, "trajectories").records
    got = sorted((t.problem_id, t.meta["sample"], t.text) for t in records)
    assert got == expected  # no duplicate, no loss, same samples as the uninterrupted run
    assert read_manifest(out).count == total and validate_dataset(out) == []
    assert "240 trajectories for 120 problems" in result.stdout


FILTERS_YAML = """
filter:
  batch_size: 2
  filters:
    - name: parse
    - name: verified
    - name: format
    - name: repetition
    - name: grounding
    - name: likelihood
      params: {top_k: 1}
    - name: duplicates
"""


def test_filter_survives_sigkill_at_random_points(tiny_model_dir, tmp_path):
    synthesize(tmp_path / "problems", n=24, seed=12)
    config = GenerateConfig(samples_per_problem=2, fault_rate=0.3, seed=5)
    generate_trajectories(tmp_path / "problems", tmp_path / "traj", config)
    config = tmp_path / "filters.yaml"
    config.write_text(FILTERS_YAML)

    def command(name: str) -> list[str]:
        out, rejected = tmp_path / name, tmp_path / f"{name}.rejected"
        paths = ["--in", str(tmp_path / "traj"), "--out", str(out), "--rejected", str(rejected)]
        return [*TGRL, "filter", *paths, "--config", str(config), "--policy", str(tiny_model_dir)]

    start = time.monotonic()
    subprocess.run(command("base"), env=ENV, check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - start
    base = {p.relative_to(tmp_path).as_posix().replace("base", "X"): p.read_bytes()
            for d in ("base", "base.rejected") for p in sorted((tmp_path / d).iterdir())}  # fmt: skip

    rng = random.Random(7)
    points = sorted(rng.uniform(0.3, 1.0) * duration for _ in range(3))
    for after in points:
        kill_at(command("out"), after_s=after)
        assert unreadable_or_complete(tmp_path / "out")
        assert unreadable_or_complete(tmp_path / "out.rejected")

    subprocess.run(command("out"), env=ENV, check=True, capture_output=True, timeout=300)
    out = {p.relative_to(tmp_path).as_posix().replace("out", "X"): p.read_bytes()
           for d in ("out", "out.rejected") for p in sorted((tmp_path / d).iterdir())}  # fmt: skip
    assert out == base  # byte-identical kept, rejected and report after the kills
    report = load_dataset(tmp_path / "out"), load_dataset(tmp_path / "out.rejected")
    assert len(report[0].records) + len(report[1].records) == 48
    assert len({(t.problem_id, t.meta["sample"]) for t in report[0].records}) == len(report[0].records)


def test_a_killed_output_is_not_readable(problems, tmp_path):
    out = tmp_path / "out"
    command = [*TGRL, "generate", "--problems", str(problems), "--out", str(out), "--set", "throttle_s=0.05"]
    killed, seen = kill_at(command, watch=out / RECORDS, lines_at=20)
    assert killed and seen >= 20
    with pytest.raises(TgrlError, match=r"no manifest\.json"):
        load_dataset(out)
