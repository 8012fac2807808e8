"""The step layer: one function per pipeline step, shared by the KFP components and the local runner.

Each function takes plain paths and strings, the recipe (YAML text, or a path to a YAML file; "" means
the defaults) and the pipeline run id, and does the same five things:

1. load its section of the recipe (`tgrl_lib.config`);
2. open the MLflow parent run of the pipeline run (found by tag `tgrl.pipeline_run_id`, created if
   absent) and a child run for the step (`tgrl_lib.mlops.tracking`);
3. call the one library entry point of the step;
4. log the step's config, metrics and report files to the child run, and publish its outputs to
   `$TGRL_ARTIFACT_ROOT/<pipeline run id>/<step>/<output>` when that is an `s3://` (or other) URI
   (`tgrl_lib.store.artifacts`);
5. return a small dict (counts, metrics, version, `promoted`) that the component turns into KFP outputs.

Components are a typed signature and a call to one of these; everything else lives here. Numeric-only
dicts are returned by the steps whose component logs them as KFP metrics.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tgrl_lib.config import PipelineConfig, TrainConfig
from tgrl_lib.env import read_env
from tgrl_lib.errors import TgrlError
from tgrl_lib.evaluation import run_report
from tgrl_lib.mlops.tracking import config_hash, dataset_sha256, numbers
from tgrl_lib.recipe import load_config

MODEL_REF = "model_ref.json"  # an init_model output that points at a model instead of holding it
REGISTERED = "registered.json"


def load_recipe(config: str | Path) -> PipelineConfig:
    """The whole recipe from YAML text or a path to a YAML file ("" = all defaults)."""
    text = str(config)
    if "\n" not in text and text.endswith((".yaml", ".yml")):
        return load_config(text, PipelineConfig)
    return load_config(None, PipelineConfig, text=text)


@contextmanager
def step_run(cfg: PipelineConfig, pipeline_run_id: str, step: str) -> Iterator[Any]:
    """The MLflow child run of `step` under the pipeline run's parent run (see `tgrl_lib.mlops.tracking`)."""
    from tgrl_lib.mlops.tracking import Tracker

    tracker = Tracker(cfg, work_dir=cfg.work_dir)
    with tracker.step_run(pipeline_run_id, step, pipeline=cfg.name) as run:
        yield run


def artifact_root() -> str | None:
    """Where step outputs are published besides KFP's own store (e.g. s3://bucket/tgrl), or None."""
    return read_env("TGRL_ARTIFACT_ROOT")


def publish(
    pipeline_run_id: str, step: str, outputs: dict[str, str | Path], *, checkpoint: bool = False
) -> dict[str, str]:
    """Upload each output directory to the artifact root; returns {name: uri} (empty when not set).
    Datasets go with their manifest last; `checkpoint=True` adds a `COMPLETE` marker (written last), so
    `storage.localize` can fetch them back."""
    root = artifact_root()
    if not root:
        return {}
    from tgrl_lib.store.artifacts import publish_checkpoint, upload_dir

    uris = {}
    for name, path in outputs.items():
        uri = f"{root.rstrip('/')}/{pipeline_run_id}/{step}/{name}"
        (publish_checkpoint if checkpoint else upload_dir)(Path(path), uri)
        uris[name] = uri
    return uris


def resolve_model(model_dir: str | Path) -> str:
    """A model directory, or the path/URI an `init_model` reference output points at."""
    ref = Path(model_dir) / MODEL_REF
    if ref.is_file():
        return str(json.loads(ref.read_text(encoding="utf-8"))["uri"])
    return str(model_dir)


def dataset_count(root: str | Path) -> int:
    from tgrl_lib.data.schema import read_manifest

    return read_manifest(root).count


def ensure_dataset(root: str | Path, kind: str, created_by: str) -> None:
    """An empty, valid dataset at `root` when the step wrote none (KFP expects every output to exist)."""
    from tgrl_lib.data.schema import MANIFEST, write_dataset

    if not (Path(root) / MANIFEST).is_file():
        write_dataset(root, kind, [], created_by=created_by)


def _move_into(src: Path, dst: str | Path) -> None:
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))


def prepare_data(config: str, pipeline_run_id: str, train_dir: str, test_dir: str) -> dict[str, float]:
    """Synthesise the train and held-out problem datasets (`tgrl_lib.data.synthetic`)."""
    from tgrl_lib.data.synthetic import synthesize_splits

    cfg = load_recipe(config)
    data = cfg.data
    with step_run(cfg, pipeline_run_id, "prepare_data") as run:
        run.log_config(data, section="data")
        scratch = Path(tempfile.mkdtemp(prefix="tgrl-data-", dir=Path(train_dir).parent))
        try:
            synthesize_splits(
                scratch, n_train=data.n_train, n_test=data.n_test, seed=data.seed,
                image_size=data.image_size, families=data.families, difficulties=data.difficulties,
            )  # fmt: skip
            _move_into(scratch / "train", train_dir)
            _move_into(scratch / "test", test_dir)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        out = {"n_train": float(dataset_count(train_dir)), "n_test": float(dataset_count(test_dir))}
        run.log_metrics(out)
        run.log_dataset_tags({"train": train_dir, "test": test_dir})
        run.parent().log_params({"data.train_sha256": dataset_sha256(train_dir), "recipe": cfg.name})
        publish(pipeline_run_id, "prepare_data", {"train_problems": train_dir, "test_problems": test_dir})
    return out


def init_model(config: str, pipeline_run_id: str, base_model: str, out_dir: str) -> dict[str, Any]:
    """`base_model="tiny"`: build the tiny offline VLM into `out_dir`. Otherwise (a path or URI, or "" for
    the recipe's `train.model`) write a reference to it, so large models are not copied between steps."""
    cfg = load_recipe(config)
    source = base_model or cfg.train.model
    with step_run(cfg, pipeline_run_id, "init_model") as run:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if source == "tiny":
            from tgrl_lib.models.tiny import build_tiny

            build_tiny(out_dir, seed=cfg.train.seed, image_size=cfg.data.image_size)
        else:
            (Path(out_dir) / MODEL_REF).write_text(json.dumps({"uri": source}) + "\n", encoding="utf-8")
        run.log_params({"init_model.source": source})
        run.parent().log_params({"model": source})
    return {"source": source, "built": source == "tiny"}


def generate(
    config: str, pipeline_run_id: str, problems_dir: str, out_dir: str, rejected_dir: str
) -> dict[str, float]:
    """Expert trajectories for every problem with the recipe's backend (`tgrl_lib.generation.run`)."""
    from tgrl_lib.generation.run import generate_trajectories

    cfg = load_recipe(config)
    with step_run(cfg, pipeline_run_id, "generate") as run:
        run.log_config(cfg.generate, section="generate")
        report = generate_trajectories(problems_dir, out_dir, cfg.generate, rejected_dir=rejected_dir)
        ensure_dataset(rejected_dir, "rejected", "tgrl generate")
        out = {"trajectories": float(dataset_count(out_dir)), "rejected": float(dataset_count(rejected_dir))}
        out.update({k: v for k, v in numbers(report).items() if k not in out})
        run.log_metrics(out)
        publish(pipeline_run_id, "generate", {"trajectories": out_dir, "rejected": rejected_dir})
    return out


def filter_trajectories(
    config: str,
    pipeline_run_id: str,
    trajectories_dir: str,
    problems_dir: str,
    policy_dir: str,
    kept_dir: str,
    rejected_dir: str,
    report_path: str,
) -> dict[str, float]:
    """Apply the recipe's filters in order (`tgrl_lib.filters.run.run_filters`); the policy for the tokenizer
    and likelihood filters is the recipe's `filter.policy`, else the pipeline's initial model."""
    from tgrl_lib.filters.run import run_filters

    cfg = load_recipe(config)
    fcfg = cfg.filter
    if fcfg.policy is None:
        fcfg = fcfg.model_copy(update={"policy": resolve_model(policy_dir)})
    with step_run(cfg, pipeline_run_id, "filter") as run:
        run.log_config(fcfg, section="filter")
        report = run_filters(trajectories_dir, kept_dir, rejected_dir, fcfg, problems_dir)
        ensure_dataset(rejected_dir, "rejected", "tgrl filter")
        kept, rejected = dataset_count(kept_dir), dataset_count(rejected_dir)
        out = {"kept": float(kept), "rejected": float(rejected)}
        out.update({k: v for k, v in numbers(report).items() if k not in out})
        run.log_metrics(out)
        files = sorted(Path(kept_dir).glob("report*")) + sorted(Path(rejected_dir).glob("report*"))
        md = next((f for f in files if f.suffix == ".md"), Path(kept_dir) / "report.md")
        run_report.markdown_page(md, [f for f in files if f.suffix == ".png"], report_path, "Filtering")
        run.log_artifacts([*files, Path(report_path)], "filter")
        publish(pipeline_run_id, "filter", {"kept": kept_dir, "rejected": rejected_dir})
        run.parent().log_params({"data.experts_sha256": dataset_sha256(kept_dir)})
    return out


def train(
    config: str,
    pipeline_run_id: str,
    base_model_dir: str,
    problems_dir: str,
    experts_dir: str,
    out_dir: str,
    algorithm: str = "",
) -> dict[str, float]:
    """Train from the initial model (`tgrl_lib.rl.trainer.train`); the final checkpoint lands in `out_dir`.

    `algorithm` ("" = the recipe's) overrides `train.algorithm`; grpo ignores `experts_dir`. When the
    compiled task carries a launch plan of several processes (`tgrl_lib.rl.launcher`: GPU profile,
    `--train-gpus`, `--train-nodes`), the loop runs under `accelerate launch` or as a Kubeflow TrainJob.
    """
    cfg = load_recipe(config)
    updates: dict[str, Any] = {"model": resolve_model(base_model_dir)}
    if algorithm:
        updates["algorithm"] = algorithm
    try:
        tcfg = TrainConfig.model_validate({**cfg.train.model_dump(), **updates})
    except ValueError as err:
        raise TgrlError(f"invalid train override: {err}") from None
    return _train_stage(cfg, tcfg, pipeline_run_id, "train", problems_dir, experts_dir, out_dir)


def cold_start(
    config: str, pipeline_run_id: str, base_model_dir: str, problems_dir: str, experts_dir: str, out_dir: str
) -> dict[str, float]:
    """The SFT stage before RL (recipe `cold_start`): supervised updates on the filtered experts from the
    base model; `cold_start.steps: 0` passes it through (a base model that follows the format already)."""
    cfg = load_recipe(config)
    if cfg.cold_start.steps == 0:  # a copy, not a local path: on a cluster the next step runs elsewhere
        shutil.copytree(base_model_dir, out_dir, dirs_exist_ok=True)
        return {"steps_done": 0.0}
    tcfg = cfg.cold_start.train_config(cfg.train.model_copy(update={"model": resolve_model(base_model_dir)}))
    return _train_stage(cfg, tcfg, pipeline_run_id, "cold_start", problems_dir, experts_dir, out_dir)


def _train_stage(
    cfg: PipelineConfig,
    tcfg: TrainConfig,
    pipeline_run_id: str,
    stage: str,
    problems_dir: str,
    experts_dir: str,
    out_dir: str,
) -> dict[str, float]:
    """Train `stage` (train, cold_start) in its MLflow child run; final checkpoint + metrics -> `out_dir`."""
    from tgrl_lib.progress import step_printer
    from tgrl_lib.rl.launcher import launch_training, launched_result, plan_from_env
    from tgrl_lib.rl.trainer import train as run_training

    with tempfile.TemporaryDirectory(prefix=f"tgrl-{stage}-") as scratch:
        tcfg = tcfg.model_copy(update={"output_dir": scratch})
        experts = experts_dir if experts_dir and tcfg.algorithm != "grpo" else None
        plan = plan_from_env()
        with step_run(cfg, pipeline_run_id, stage) as run:
            logged = tcfg.model_dump(mode="json", exclude={"output_dir"})  # no scratch paths
            run.log_config(logged, section="train")
            if stage == "train":  # the pipeline's algorithm names its parent run
                key = {"algorithm": tcfg.algorithm, "config_hash": config_hash(cfg), "lr": tcfg.lr}
                name = f"{cfg.name}-{tcfg.algorithm}-{pipeline_run_id[:12]}"
                run.describe_parent(name, key, {"tgrl.algorithm": tcfg.algorithm})
            if plan is not None and plan.processes > 1:
                config, work = tcfg.model_dump(mode="json"), Path(scratch)
                launched = launch_training(plan, config, problems_dir, experts, work, pipeline_run_id)
                result = launched_result(launched, tcfg.steps, run.metrics_logger())
                scratch = str(launched)  # where its metrics.jsonl is
            else:
                result = run_training(
                    tcfg,
                    problems_dir=problems_dir,
                    experts_dir=experts,
                    logger=run.metrics_logger(),
                    on_step=step_printer(tcfg.steps, prefix=f"{stage.replace('_', ' ')} step"),
                )
            _move_into(Path(result.final_dir), out_dir)
            if (history := Path(scratch) / "metrics.jsonl").is_file():
                shutil.copy2(history, Path(out_dir) / run_report.TRAIN_HISTORY)
            out = {"steps_done": float(result.steps_done)}
            out.update({k: v for k, v in numbers(result.metrics).items() if k not in out})
            run.log_metrics({f"final/{k}": v for k, v in out.items()})
            run.parent().log_metrics({f"{stage}/steps": out["steps_done"]})
            run.log_artifacts([Path(scratch) / "metrics.jsonl"], stage)  # the per-step table, kept
            publish(pipeline_run_id, stage, {"checkpoint": out_dir}, checkpoint=True)
    return out


def _evaluate_into(
    cfg: PipelineConfig, run: Any, model: str, problems_dir: str, results_dir: str, report_path: str
) -> tuple[dict[str, float], float]:
    """Run the evaluation, log it, render the HTML report; returns (flat metrics, primary metric)."""
    from tgrl_lib.evaluation.run import evaluate as run_eval
    from tgrl_lib.evaluation.run import flat_metrics

    run.log_config(cfg.eval, section="eval")
    results = run_eval(model, {"synthetic": problems_dir}, cfg.eval, results_dir)
    benchmarks = results.get("benchmarks", results) if isinstance(results, dict) else results
    metrics = flat_metrics(benchmarks)
    primary_key = cfg.promote.primary_metric
    values = [r["overall"][primary_key] for r in benchmarks.values() if primary_key in r["overall"]]
    if not values:
        raise TgrlError(f"evaluation produced no {primary_key!r}", hint="check promote.primary_metric")
    primary = sum(values) / len(values)
    run.log_metrics({**metrics, f"primary/{primary_key}": primary})
    out = Path(results_dir)
    run_report.markdown_page(out / "report.md", sorted(out.glob("*.png")), report_path, "Evaluation")
    run.log_artifacts(sorted(p for p in out.iterdir() if p.is_file()) + [Path(report_path)], "eval")
    return metrics, primary


def evaluate(
    config: str,
    pipeline_run_id: str,
    model_dir: str,
    problems_dir: str,
    results_dir: str,
    report_path: str,
    stage: str = "evaluate",
    train_dir: str = "",
) -> dict[str, float]:
    """Evaluate a checkpoint on the held-out problems (`tgrl_lib.evaluation.run.evaluate`): the trained one
    (`stage="evaluate"`) or the start model (`"evaluate_start"`). With the train problems (`train_dir`),
    the blind prior (`tgrl_lib.evaluation.blind_prior`) goes beside the results and into the metrics."""
    cfg = load_recipe(config)
    model = resolve_model(model_dir)
    with step_run(cfg, pipeline_run_id, stage) as run:
        metrics, primary = _evaluate_into(cfg, run, model, problems_dir, results_dir, report_path)
        if train_dir:
            from tgrl_lib.evaluation.blind_prior import write_blind_prior

            metrics["blind_prior"] = write_blind_prior(train_dir, problems_dir, results_dir)["accuracy"]
            run.log_metrics({"blind_prior/accuracy": metrics["blind_prior"]})
        publish(pipeline_run_id, stage, {"results": results_dir})
    return {**metrics, "primary": primary}


def register_and_promote(
    config: str,
    pipeline_run_id: str,
    model_dir: str,
    eval_dir: str,
    registered_dir: str,
    model_name: str = "",
    name_suffix: str = "",
    baseline_dir: str = "",
    report_path: str = "",
) -> dict[str, Any]:
    """Register the checkpoint with its eval metrics and run the promotion gate (`tgrl_lib.mlops.promotion`).

    Name: `model_name`, else `promote.model_name + name_suffix`. `baseline_dir`: the start checkpoint's eval,
    the gate's reference while there is no champion. Writes `registered.json` (name, version, URI,
    decision, reason) to `registered_dir`, returns the same dict, and the run report to `report_path`.
    """
    from tgrl_lib.evaluation.run import flat_metrics
    from tgrl_lib.mlops.promotion import promote
    from tgrl_lib.mlops.registry import register_checkpoint

    cfg = load_recipe(config)
    name = model_name or cfg.promote.model_name + name_suffix
    if (results := run_report.read_results(eval_dir)) is None:
        raise TgrlError("no results.json in the evaluation output", path=eval_dir)
    eval_metrics = flat_metrics(results["benchmarks"])
    primary_key = cfg.promote.primary_metric
    baseline = run_report.read_results(baseline_dir) if baseline_dir else None  # the start model's eval
    start = run_report.overall(baseline, primary_key) if baseline else None
    with step_run(cfg, pipeline_run_id, "register_and_promote") as run:
        run.log_config(cfg.promote, section="promote")
        links = {"tgrl.eval_run_id": run.sibling_run_id("evaluate"), "tgrl.register_run_id": run.run_id}
        train_run = run.sibling_run_id("train") or run.run_id  # the version's source run: the train run
        version = register_checkpoint(model_dir, name, train_run, eval_metrics, tags=links)
        decision = promote(
            name, version.version, primary=cfg.promote.primary_metric, margin=cfg.promote.margin,
            max_regression=cfg.promote.max_regression, floor=cfg.promote.floor, baseline=baseline,
        )  # fmt: skip
        out = {
            "model_name": name,
            "version": int(version.version),
            "model_uri": f"models:/{name}/{version.version}",
            "promoted": bool(decision.promoted),
            "reason": str(decision.reason),
            primary_key: run_report.overall(results, primary_key),
        }
        out |= {f"start_{primary_key}": start} if start is not None else {}
        run.log_metrics({f"promote/{k}": float(v) for k, v in out.items() if isinstance(v, int | float)})
        run.set_parent_tags({"tgrl.model_version": out["model_uri"], "tgrl.promoted": str(out["promoted"])})
        keys = ("accuracy", "grounding", "evidence_use", "format_rate")
        final = {k: v for k in keys if (v := run_report.overall(results, k)) is not None}
        run.parent().log_metrics(final | ({f"start_{primary_key}": start} if start is not None else {}))
    Path(registered_dir).mkdir(parents=True, exist_ok=True)
    (Path(registered_dir) / REGISTERED).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    if report_path:
        name = f"{cfg.name} {{algorithm}} {pipeline_run_id}"
        summary = run_report.summary_from_dirs(
            name, model_dir, eval_dir, baseline_dir or None, out, default_algorithm=cfg.train.algorithm
        )
        run_report.write_run_report(summary, report_path)
    return out


def export_champion(
    config: str, pipeline_run_id: str, model_dir: str, registered_dir: str, champion_dir: str
) -> dict[str, Any]:
    """Publish the just-promoted checkpoint: copy it to `champion_dir` and, with an artifact root, to
    `<root>/champion/<model name>/`; tag the pipeline's parent run. Runs only behind the gate."""
    cfg = load_recipe(config)
    registered = json.loads((Path(registered_dir) / REGISTERED).read_text(encoding="utf-8"))
    if not registered.get("promoted"):
        raise TgrlError("export_champion ran for a version that was not promoted", path=registered_dir)
    name, version = registered["model_name"], int(registered["version"])
    with step_run(cfg, pipeline_run_id, "export_champion") as run:
        shutil.copytree(model_dir, champion_dir, dirs_exist_ok=True)
        (Path(champion_dir) / "champion.json").write_text(json.dumps(registered, indent=2) + "\n")
        published = ""
        root = artifact_root()
        if root:
            from tgrl_lib.store.artifacts import publish_checkpoint

            published = f"{root.rstrip('/')}/champion/{name}"
            publish_checkpoint(champion_dir, published)
        run.set_parent_tags({"tgrl.champion": f"models:/{name}/{version}"})
    return {"model_uri": f"models:/{name}@champion", "version": version, "published": published}


def evaluate_registered(
    config: str, pipeline_run_id: str, model_uri: str, problems_dir: str, results_dir: str, report_path: str
) -> dict[str, float]:
    """Evaluate a registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`) and tag the version
    with the metrics (`tgrl_lib.mlops.registry`)."""
    from tgrl_lib.mlops.registry import download_model, eval_tags, tag_version

    if not model_uri.startswith("models:/"):
        raise TgrlError(f"model_uri must be models:/NAME/VERSION or models:/NAME@ALIAS, got {model_uri!r}")
    cfg = load_recipe(config)
    with step_run(cfg, pipeline_run_id, "evaluate_registered") as run, tempfile.TemporaryDirectory() as tmp:
        run.log_params({"eval.model_uri": model_uri})
        local_model = download_model(model_uri, Path(tmp) / "model")
        metrics, primary = _evaluate_into(cfg, run, str(local_model), problems_dir, results_dir, report_path)
        tag_version(model_uri, eval_tags(metrics))
        publish(pipeline_run_id, "evaluate_registered", {"results": results_dir})
    return {**metrics, "primary": primary}
