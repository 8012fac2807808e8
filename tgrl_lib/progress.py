"""Progress bars for long work (rich), quiet when stderr is not a terminal unless forced."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def _enabled() -> bool:
    forced = os.environ.get("TGRL_PROGRESS")
    if forced is not None:
        return forced not in ("0", "false", "no")
    return sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: int | None):
    """Yield `advance(n=1)`; renders a rich bar with rate and ETA on a terminal, nothing otherwise."""
    if not _enabled():
        yield lambda n=1: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


TRAIN_SHOWN = ("reward/mean", "reward/accuracy", "loss/total", "loss/sft", "perf/step_time_s")


def step_printer(
    total: int, lines: int = 10, prefix: str = "step"
) -> Callable[[int, dict[str, float]], None]:
    """A trainer `on_step` that prints about `lines` summary lines per run (and always the last step)."""
    every = max(1, total // lines)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % every == 0 or step == total:
            parts = "  ".join(f"{k} {metrics[k]:.3f}" for k in TRAIN_SHOWN if k in metrics)
            print(f"{prefix} {step}/{total}  {parts}", flush=True)

    return on_step
