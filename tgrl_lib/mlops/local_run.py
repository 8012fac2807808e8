"""Run a whole pipeline on this machine: `tgrl pipeline run --local` (the README's main job).

The pipeline is the one a cluster runs (`pipelines/tgrl_pipeline.py`), executed by `kfp.local` with the
`SubprocessRunner(use_venv=False)`: every step is a subprocess of this Python, on CPU; kfp-kubernetes
settings (GPUs, secrets) are ignored. MLflow is a SQLite file in the work dir with artifacts beside it,
unless the recipe names a tracking server.

Layout of `WORK_DIR`: `mlflow.db` and `mlartifacts/` (MLflow), `kfp/<pipeline>-<time>/<task>/...` (every
task's outputs, kept), `results/<pipeline>-<time>/` (a copy of that run's report, eval results, checkpoint
and registered version; `results/latest` points at the newest), `logs/<pipeline>-<time>.log` (everything
the steps and kfp printed). kfp.local deletes its workspace after a run, so it gets a fresh temporary
directory of its own and never a path that holds data.

The console shows one line per step as it starts and ends, the trainer's step lines and the summary; the
executor's JSON, kfp's warnings and library logs go to the log file, whose last lines are shown when a
step fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tgrl_lib.config import PipelineConfig
from tgrl_lib.errors import TgrlError
from tgrl_lib.recipe import dump_config, load_config


@dataclass
class LocalRunResult:
    """Where a local run left its results."""

    results_dir: Path
    report: Path
    checkpoint: Path
    tracking_uri: str
    registered: dict[str, Any]
    wall_s: float
    log: Path | None = None
    scores: dict[str, dict[str, float]] | None = None  # benchmark -> its overall eval metrics
    blind_prior: float | None = None  # the train split's most frequent answer per type, on the held-out split

    def summary(self) -> str:
        reg = self.registered
        alias = "promoted to @champion" if reg.get("promoted") else "not promoted"
        lines = [f"tgrl pipeline finished in {self.wall_s:.0f} s"]
        for name, m in (self.scores or {}).items():
            shown = [f"accuracy {m.get('accuracy', float('nan')):.3f}"]
            shown += [f"{k} {m[k]:.3f}" for k in ("grounding", "evidence_use", "format_rate") if k in m]
            lines.append(f"  {name:<13} {', '.join(shown)} ({int(m.get('count', 0))} held-out problems)")
        if self.blind_prior is not None:
            lines.append(
                f"  blind prior   accuracy {self.blind_prior:.3f} (train split's majority answer per type)"
            )
        if "start_accuracy" in reg and "accuracy" in reg:
            lines.append(
                f"  start model   accuracy {reg['start_accuracy']:.3f} -> {reg['accuracy']:.3f} trained"
            )
        lines += [
            f"  run report    {self.results_dir / 'report.html'}",
            f"  checkpoint    {self.checkpoint}",
            f"  registered    {reg.get('model_uri', '?')} ({alias}: {reg.get('reason', '')})",
            f"  all results   {self.results_dir}",
            f"  MLflow        {self.tracking_uri}",
        ]
        if self.log is not None:
            lines.append(f"  step log      {self.log}")
        if self.tracking_uri.startswith("sqlite:"):
            lines.append(f"  browse        mlflow ui --backend-store-uri {self.tracking_uri}")
        else:
            lines.append(f"  browse        {self.tracking_uri}")
        return "\n".join(lines)


def local_recipe(
    config: str | Path | None, work_dir: Path, overrides: list[str] | None = None
) -> PipelineConfig:
    """The recipe with `--set` overrides, MLflow pointed at `work_dir` unless the recipe names a server.
    Filter parameters are checked here too, so a bad one fails before the first step runs."""
    from tgrl_lib.filters.registry import build_filters

    cfg = load_config(config, PipelineConfig, overrides)
    build_filters(cfg.filter.filters)
    tracking = cfg.tracking
    uri = tracking.tracking_uri or f"sqlite:///{work_dir / 'mlflow.db'}"
    location = tracking.artifact_location or (work_dir / "mlartifacts").as_uri()
    cfg.tracking = tracking.model_copy(update={"tracking_uri": uri, "artifact_location": location})
    cfg.work_dir = str(work_dir)
    return cfg


def run_local(
    config: str | Path | None,
    work_dir: str | Path = "runs",
    overrides: list[str] | None = None,
    pipeline: str = "tgrl_pipeline",
    base_model: str | None = None,
    echo=print,
) -> LocalRunResult:
    """Run `pipeline` locally with the recipe `config`, copy its results to `work_dir/results/<run>/`, print
    where they are."""
    started = time.perf_counter()
    work = Path(work_dir).resolve()
    cfg = local_recipe(config, work, overrides)  # a bad recipe fails here, before kfp is imported
    work.mkdir(parents=True, exist_ok=True)

    from kfp import local

    from tgrl_lib.kfp_pipelines.compile import build

    if base_model is None:
        base_model = cfg.train.model if Path(cfg.train.model).is_dir() else "tiny"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(work / "kfp"))
    pipeline_fn = build(pipeline)
    run_name = f"{pipeline}-{time.strftime('%Y%m%d-%H%M%S')}"
    log = work / "logs" / f"{run_name}.log"
    echo(f"tgrl pipeline {pipeline}: recipe {cfg.name}, steps log to {log}")
    with warnings.catch_warnings(), output_into(log, echo):
        # kfp warns that our image name lacks "python"; the subprocess runs this interpreter, not the image
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        try:
            task = pipeline_fn(config=dump_config(cfg), base_model=base_model)
        except RuntimeError as err:
            raise TgrlError(
                f"local pipeline failed: {err}",
                hint=f"the step log is {log} (its end is above); task outputs so far are in {work / 'kfp'}",
            ) from err
    result = collect_results(task.outputs, work / "results" / run_name, cfg.tracking.tracking_uri, started)
    result.log = log
    echo(result.summary())
    return result


# ------------------------------------------------------------------------------------ console output
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_STEP_LINE = re.compile(r"^\s*((?:cold start|train) step \d+/\d+.*)$")


def progress_line(line: str, started: dict[str, float], now: float) -> str | None:
    """The console's line for one line of the step log, or None: a step starting or ending (with its
    time), or a trainer step line."""
    line = _ANSI.sub("", line.rstrip("\n"))
    if match := _STARTED.search(line):
        started[match.group(1)] = now
        return f"  {match.group(1)} ..."
    if match := _FINISHED.search(line):
        took = now - started.get(match.group(1), now)
        return f"  {match.group(1)} {match.group(2).lower()} ({took:.0f} s)"
    if match := _STEP_LINE.match(line):
        return f"    {match.group(1)}"
    return None


@dataclass
class _Console:
    echo: Callable[[str], None]
    log: Path
    failed: bool = False


@contextmanager
def output_into(log: Path, echo: Callable[[str], Any]) -> Iterator[_Console]:
    """Send this process's stdout/stderr (file descriptors, so the steps' subprocesses too) to `log`; a
    thread follows the log and echoes `progress_line`s to the console. On failure the log's end is shown."""
    log.parent.mkdir(parents=True, exist_ok=True)
    console_out, restore = _console_stream()
    say = echo if echo is not print else (lambda text: print(text, file=console_out, flush=True))
    state, stop = _Console(say, log), threading.Event()
    with open(log, "ab", buffering=0) as sink:
        saved = [os.dup(1), os.dup(2)]
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        streams = sys.stdout, sys.stderr  # Python-level writers that are not fd 1/2 (a test's capture)
        sys.stdout = sys.stderr = text = open(log, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        start = log.stat().st_size  # taken here: a line written before the thread runs is still followed
        follower = threading.Thread(target=_follow, args=(log, start, say, stop), daemon=True)
        follower.start()
        try:
            yield state
        except BaseException:
            state.failed = True
            raise
        finally:
            sys.stdout, sys.stderr = streams
            text.close()
            for stream in streams:
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            stop.set()
            follower.join(timeout=5)
            if state.failed:
                tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
                say("\n".join(["  last lines of the step log:", *(f"  | {_ANSI.sub('', t)}" for t in tail)]))
            restore()


def _console_stream() -> tuple[TextIO, Callable[[], None]]:
    """A stream to the console that survives redirecting fd 1: a duplicate of it when sys.stdout is fd 1,
    else sys.stdout itself (a test's capture)."""
    try:
        if sys.stdout.fileno() == 1:
            stream = os.fdopen(os.dup(1), "w", buffering=1)
            return stream, stream.close
    except (AttributeError, OSError, ValueError):
        pass
    return sys.stdout, lambda: None


def _follow(log: Path, start: int, say: Callable[[str], None], stop: threading.Event) -> None:
    started: dict[str, float] = {}
    with open(log, encoding="utf-8", errors="replace") as source:
        source.seek(start)
        while True:
            line = source.readline()
            if line:
                if shown := progress_line(line, started, time.monotonic()):
                    say(shown)
                continue
            if stop.is_set():
                return
            time.sleep(0.2)


def collect_results(
    outputs: dict[str, Any], results_dir: Path, tracking_uri: str, started: float
) -> LocalRunResult:
    """Copy the pipeline's outputs (report, eval results, checkpoint, registration) to `results_dir` (one
    per run) and point `results_dir.parent / "latest"` at it."""
    if results_dir.exists():
        raise TgrlError("results directory exists already", path=results_dir, hint="wait a second and rerun")
    results_dir.mkdir(parents=True)
    eval_dir = _copy(outputs["eval_results"].path, results_dir / "eval")
    report_html = _copy(outputs["report"].path, results_dir / "report.html")
    checkpoint = _copy(outputs["checkpoint"].path, results_dir / "checkpoint")
    registered = dict(outputs["registered"].metadata)
    if "version" in registered:
        registered["version"] = int(registered["version"])  # kfp.local turns ints into floats
    registered["promoted"] = bool(outputs["promoted"])
    (results_dir / "registered.json").write_text(json.dumps(registered, indent=2, sort_keys=True) + "\n")
    report = eval_dir / "report.md" if (eval_dir / "report.md").is_file() else report_html
    latest = results_dir.parent / "latest"
    staged = results_dir.parent / f".latest-{os.getpid()}"
    staged.unlink(missing_ok=True)
    staged.symlink_to(results_dir.name)
    staged.replace(latest)  # atomic: a reader sees the old run or the new one
    scores = _overall_scores(eval_dir / "results.json")
    prior = eval_dir / "blind_prior.json"
    return LocalRunResult(
        scores=scores,
        blind_prior=json.loads(prior.read_text(encoding="utf-8"))["accuracy"] if prior.is_file() else None,
        results_dir=results_dir,
        report=report,
        checkpoint=checkpoint,
        tracking_uri=tracking_uri,
        registered=registered,
        wall_s=time.perf_counter() - started,
    )


def _overall_scores(results_json: Path) -> dict[str, dict[str, float]]:
    """`{benchmark: overall metrics}` of an evaluation's results.json ({} when there is none)."""
    if not results_json.is_file():
        return {}
    payload = json.loads(results_json.read_text(encoding="utf-8"))
    return {name: dict(b.get("overall", {})) for name, b in payload.get("benchmarks", {}).items()}


def _copy(src: str | Path, dst: Path) -> Path:
    src = Path(src)
    if src.is_dir():
        shutil.copytree(src, dst)
    elif src.is_file():
        shutil.copy2(src, dst)
    else:
        raise TgrlError("pipeline output is missing", path=src, hint="a step did not write its output")
    return dst
