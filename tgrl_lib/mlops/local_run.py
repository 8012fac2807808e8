"""Run a whole pipeline on this machine: `tgrl pipeline run --local` (the README's main job).

The pipeline is the one a cluster runs (`pipelines/tgrl_pipeline.py`), executed by `kfp.local` with the
`SubprocessRunner(use_venv=False)`: every step is a subprocess of this Python, on CPU; kfp-kubernetes
settings (GPUs, secrets) are ignored. MLflow is a SQLite file in the work dir with artifacts beside it,
unless the recipe names a tracking server.

Layout of `WORK_DIR`: `mlflow.db` and `mlartifacts/` (MLflow), `kfp/<pipeline>-<time>/<task>/...` (every
task's outputs, kept), `results/` (a copy of the latest run's report, eval results, checkpoint and
registered version). kfp.local deletes its workspace after a run, so it gets a fresh temporary
directory of its own and never a path that holds data.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def summary(self) -> str:
        reg = self.registered
        alias = "promoted to @champion" if reg.get("promoted") else "not promoted"
        lines = [
            f"tgrl pipeline finished in {self.wall_s:.0f} s",
            f"  eval report   {self.report}",
            f"  checkpoint    {self.checkpoint}",
            f"  registered    {reg.get('model_uri', '?')} ({alias}: {reg.get('reason', '')})",
            f"  all results   {self.results_dir}",
            f"  MLflow        {self.tracking_uri}",
        ]
        if self.tracking_uri.startswith("sqlite:"):
            lines.append(f"  browse        mlflow ui --backend-store-uri {self.tracking_uri}")
        else:
            lines.append(f"  browse        {self.tracking_uri}")
        return "\n".join(lines)


def local_recipe(
    config: str | Path | None, work_dir: Path, overrides: list[str] | None = None
) -> PipelineConfig:
    """The recipe with `--set` overrides, MLflow pointed at `work_dir` unless the recipe names a server."""
    cfg = load_config(config, PipelineConfig, overrides)
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
    """Run `pipeline` locally with the recipe `config`, copy its results to `work_dir/results/`, print
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
    with warnings.catch_warnings():
        # kfp warns that our image name lacks "python"; the subprocess runs this interpreter, not the image
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        try:
            task = pipeline_fn(config=dump_config(cfg), base_model=base_model)
        except RuntimeError as err:
            raise TgrlError(
                f"local pipeline failed: {err}",
                hint=f"the failing step's log is above; task outputs so far are under {work / 'kfp'}",
            ) from err
    result = collect_results(task.outputs, work / "results", cfg.tracking.tracking_uri, started)
    echo(result.summary())
    return result


def collect_results(
    outputs: dict[str, Any], results_dir: Path, tracking_uri: str, started: float
) -> LocalRunResult:
    """Copy the pipeline's outputs (report, eval results, checkpoint, registration) to `results_dir`."""
    if results_dir.exists():
        shutil.rmtree(results_dir)
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
    return LocalRunResult(
        results_dir=results_dir,
        report=report,
        checkpoint=checkpoint,
        tracking_uri=tracking_uri,
        registered=registered,
        wall_s=time.perf_counter() - started,
    )


def _copy(src: str | Path, dst: Path) -> Path:
    src = Path(src)
    if src.is_dir():
        shutil.copytree(src, dst)
    elif src.is_file():
        shutil.copy2(src, dst)
    else:
        raise TgrlError("pipeline output is missing", path=src, hint="a step did not write its output")
    return dst
