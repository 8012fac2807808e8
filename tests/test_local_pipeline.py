"""The README's main job at a smaller size: `tgrl pipeline run --local` runs the whole TGRL pipeline with
kfp.local, registers a model version in the local MLflow and leaves the eval report in `results/latest/`.
The full run happens twice: `[sqlite]` on the embedded default (a SQLite file in the work dir) and
`[postgres]` as deployed (a fresh `mlflow server` on a fresh PostgreSQL database, conftest
`fresh_mlflow_server`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tgrl_lib.cli import main
from tgrl_lib.mlops.local_run import local_recipe

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "data.n_train=16",
    "data.n_test=8",
    "cold_start.steps=2",
    "cold_start.problems_per_step=2",
    "train.steps=2",
    "train.problems_per_step=2",
    "train.group_size=2",
    "train.minibatch_size=4",
    "train.micro_batch_size=4",
    "train.sampling.max_new_tokens=16",
    "eval.sampling.max_new_tokens=16",
    "eval.limit=8",
    "promote.margin=-1.0",  # 2 updates learn nothing: accept anything not worse than the start by 1.0
    "tracking.system_metrics=false",
]


def test_local_recipe_points_mlflow_into_the_work_dir(tmp_path):
    cfg = local_recipe(None, tmp_path, ["train.steps=3"])
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cfg.tracking.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert cfg.train.steps == 3 and cfg.work_dir == str(tmp_path)
    server = local_recipe(None, tmp_path, ["tracking.tracking_uri=http://mlflow:5000"])
    assert server.tracking.tracking_uri == "http://mlflow:5000"  # a recipe naming a server keeps it


@pytest.fixture
def pipeline_tracking(mlflow_backend, request) -> tuple[list[str], str | None]:
    """(`--set` overrides, server URL): none on SQLite (the embedded default); on PostgreSQL the recipe
    names a fresh MLflow server, as a cluster's recipe names the chart's server."""
    if mlflow_backend == "sqlite":
        return [], None
    server = request.getfixturevalue("fresh_mlflow_server")
    return [f"tracking.tracking_uri={server}"], server


@pytest.mark.slow
@pytest.mark.mlflow_backends
@pytest.mark.timeout(900)
def test_local_pipeline_registers_a_version_and_writes_the_report(
    tmp_path, capsys, monkeypatch, pipeline_tracking
):
    overrides, server = pipeline_tracking
    monkeypatch.chdir(tmp_path)  # relative paths of the recipe resolve here, not in the repo
    work = tmp_path / "runs"
    config = REPO / "configs" / "tiny-cpu.yaml"
    argv = ["pipeline", "run", "--local", "--work-dir", str(work)]
    if config.is_file():
        argv += ["--config", str(config)]
    for pair in [*SMALL, *overrides]:
        argv += ["--set", pair]
    assert main(argv) == 0
    out = capsys.readouterr().out

    results = work / "results" / "latest"
    registered = json.loads((results / "registered.json").read_text())
    assert registered["version"] >= 1 and registered["model_uri"].startswith("models:/")
    assert (results / "eval" / "results.json").is_file() and (results / "eval" / "report.md").is_file()
    page = (results / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "start -&gt; final" in page
    assert "start_accuracy" in registered  # the start checkpoint went through the same evaluation
    assert "cold start step 2/2" in out and "blind prior   accuracy" in out
    assert any((results / "checkpoint").iterdir())
    uri = server or f"sqlite:///{work / 'mlflow.db'}"
    assert (f"browse        {uri}" if server else f"mlflow ui --backend-store-uri {uri}") in out

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    version = client.get_model_version(registered["model_name"], str(registered["version"]))
    assert version.status == "READY"
    # first version, no champion yet: the gate compares it with the start model (within the -1.0 margin),
    # promotes it, and the branch behind dsl.If ran
    assert registered["promoted"] is True and "the start model" in registered["reason"]
    champion = client.get_model_version_by_alias(registered["model_name"], "champion")
    assert int(champion.version) == registered["version"]
    runs = client.search_runs(
        [client.get_experiment_by_name(mlflow_experiment(registered)).experiment_id],
        "tags.`tgrl.step` = 'export_champion'",
    )
    assert len(runs) == 1


def mlflow_experiment(registered: dict) -> str:
    from tgrl_lib.recipe import load_config

    config = REPO / "configs" / "tiny-cpu.yaml"
    return load_config(config if config.is_file() else None).tracking.experiment


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_pipeline_runs_compare_by_algorithm_and_accuracy_on_their_parents(tmp_path, monkeypatch):
    """A TGRL and a GRPO pipeline run into one work dir: their parent runs carry the algorithm, the
    recipe's key params and the final metrics (what MLflow's "compare" reads), are named by algorithm,
    log no scratch paths, and the registered version's source run is the train run."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    work = tmp_path / "runs"
    for pipeline in ("tgrl_pipeline", "grpo_baseline_pipeline"):
        argv = ["pipeline", "run", "--local", "--work-dir", str(work), "--pipeline", pipeline]
        argv += ["--config", str(REPO / "configs" / "tiny-cpu.yaml")]
        for pair in SMALL:
            argv += ["--set", pair]
        assert main(argv) == 0

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(mlflow_experiment({})).experiment_id
    parents = client.search_runs([experiment], "tags.`tgrl.role` = 'pipeline'")
    assert sorted(p.data.params["algorithm"] for p in parents) == ["grpo", "tgrl"]
    for parent in parents:
        algorithm = parent.data.params["algorithm"]
        assert parent.info.run_name.startswith(f"tiny-cpu-{algorithm}-")
        assert parent.data.tags["tgrl.algorithm"] == algorithm
        assert {"model", "recipe", "config_hash", "data.train_sha256"} <= set(parent.data.params)
        assert {"accuracy", "train/steps", "start_accuracy"} <= set(parent.data.metrics)
        assert parent.data.metrics["train/steps"] == 2
    assert (
        "data.experts_sha256" in next(p for p in parents if p.data.params["algorithm"] == "tgrl").data.params
    )
    children = client.search_runs([experiment], "tags.`tgrl.role` = 'step'")
    scratch = [
        (r.info.run_name, k, v) for r in children for k, v in r.data.params.items() if "tgrl-train-" in v
    ]
    assert scratch == [] and not any("output_dir" in k for r in children for k in r.data.params)
    version = client.get_model_version("tgrl-tiny", "1")
    train_runs = {r.info.run_id for r in children if r.data.tags.get("tgrl.step") == "train"}
    assert version.run_id in train_runs  # the version's source run has the training params
    assert version.tags["tgrl.eval_run_id"] in {r.info.run_id for r in children}
