"""Components: thin by construction, callable directly (`component.python_func`) and through kfp.local,
with the step layer doing the real work (datasets written, MLflow parent/child runs, S3 publication)."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import pytest
import tgrl_lib.kfp_components as components_pkg
import yaml
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model
from tgrl_lib.kfp_components.prepare_data import prepare_data

from tgrl_lib import steps
from tgrl_lib.data.schema import load_dataset
from tgrl_lib.data.validate import validate_dataset
from tgrl_lib.evaluation.run_report import markdown_page

N_TRAIN, N_TEST = 12, 6


def _components():
    for info in pkgutil.iter_modules(components_pkg.__path__):
        if info.name == "images":
            continue
        module = importlib.import_module(f"tgrl_lib.kfp_components.{info.name}")
        yield info.name, getattr(module, info.name)


@pytest.fixture()
def recipe(tmp_path) -> str:
    """A tiny recipe as YAML text, MLflow on a SQLite file in tmp_path."""
    text = {
        "data": {"n_train": N_TRAIN, "n_test": N_TEST, "seed": 3},
        "generate": {"backend": {"kind": "oracle"}, "fault_rate": 0.5},
        "tracking": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "artifact_location": (tmp_path / "mlartifacts").as_uri(),
            "experiment": "components-test",
            "system_metrics": False,
        },
    }
    return yaml.safe_dump(text)


def _runs(recipe: str, run_id: str):
    import mlflow

    cfg = steps.load_recipe(recipe)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.`tgrl.pipeline_run_id` = '{run_id}'")
    return client, runs


@pytest.mark.parametrize(("name", "component"), list(_components()))
def test_component_is_a_thin_forwarder(name, component):
    func = component.python_func
    tree = ast.parse(inspect.getsource(func))
    (fn,) = tree.body
    body = [
        node for node in fn.body if not isinstance(node, ast.Expr) or not isinstance(node.value, ast.Constant)
    ]
    source_lines = sum(n.end_lineno - n.lineno + 1 for n in body)
    assert source_lines <= 15, f"{name}: {source_lines} lines of body; logic belongs in tgrl_lib.steps"
    imports = [n for n in body if isinstance(n, ast.ImportFrom)]
    assert [(i.module, [a.name for a in i.names]) for i in imports] == [("tgrl_lib", ["steps"])]
    calls = {
        c.func.attr
        for c in ast.walk(fn)
        if isinstance(c, ast.Call)
        and isinstance(c.func, ast.Attribute)
        and isinstance(c.func.value, ast.Name)
        and c.func.value.id == "steps"
    }
    assert calls == {name}, f"{name} must forward to steps.{name}"
    assert hasattr(steps, name)
    spec = component.component_spec.implementation.container
    assert spec.image.startswith(("ghcr.io/", "docker.io/")) and "tgrl" in spec.image
    assert "pip install" not in " ".join(spec.command)


def test_load_recipe_from_text_path_and_empty(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  steps: 7\n")
    assert steps.load_recipe(str(path)).train.steps == 7
    assert steps.load_recipe("train:\n  steps: 5\n").train.steps == 5
    assert steps.load_recipe("").train.steps == steps.PipelineConfig().train.steps


def test_numbers_flattens_numeric_leaves():
    report = {"kept": 3, "per_filter": {"format": 2, "name": "x"}, "ok": True, "list": [1]}
    assert steps.numbers(report) == {"kept": 3.0, "per_filter/format": 2.0, "ok": 1.0}


def test_report_html_renders_tables_and_inlines_plots(tmp_path):
    md = tmp_path / "report.md"
    md.write_text("# Eval <x>\n\nsome text\n\n| a | b |\n|---|---|\n| 1 | 0.5 |\n")
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG fake")
    markdown_page(md, [png], tmp_path / "out.html", "T")
    page = (tmp_path / "out.html").read_text()
    assert "<h1>Eval &lt;x&gt;</h1>" in page and "<th>a</th>" in page and "<td>0.5</td>" in page
    assert "data:image/png;base64," in page and "---" not in page


def test_prepare_and_init_components_called_directly(tmp_path, recipe):
    train, test = Dataset(uri=str(tmp_path / "train")), Dataset(uri=str(tmp_path / "test"))
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    n = prepare_data.python_func(
        config=recipe, pipeline_run_id="direct-1", train_problems=train, test_problems=test, metrics=metrics
    )
    assert n == N_TRAIN and metrics.metadata == {"n_train": N_TRAIN, "n_test": N_TEST}
    assert validate_dataset(train.path) == [] and validate_dataset(test.path) == []
    train_images = {p.image for p in load_dataset(train.path, "problems").records}
    assert len(train_images) == N_TRAIN

    from tgrl_lib.kfp_components.init_model import init_model

    model = Model(uri=str(tmp_path / "model"))
    source = init_model.python_func(
        config=recipe, pipeline_run_id="direct-1", base_model="s3://b/qwen", model=model
    )
    assert source == "s3://b/qwen" and steps.resolve_model(model.path) == "s3://b/qwen"

    _, runs = _runs(recipe, "direct-1")
    parents = [r for r in runs if r.data.tags.get("tgrl.step") in (None, "pipeline")]
    children = {r.data.tags.get("tgrl.step") for r in runs} - {None, "pipeline"}
    assert len(parents) == 1, "one parent run per pipeline run, found by its tag"
    assert {"prepare_data", "init_model"} <= children


def test_generate_and_filter_reconcile_and_publish_to_s3(tmp_path, recipe, s3_env, monkeypatch):
    from tgrl_lib.kfp_components.filter_trajectories import filter_trajectories
    from tgrl_lib.kfp_components.generate import generate

    root = f"s3://{s3_env['bucket']}/components-test"
    monkeypatch.setenv("TGRL_ARTIFACT_ROOT", root)
    train, test = tmp_path / "train", tmp_path / "test"
    steps.prepare_data(recipe, "gf-1", str(train), str(test))
    problems = Dataset(uri=str(train))
    trajectories, rejected = Dataset(uri=str(tmp_path / "traj")), Dataset(uri=str(tmp_path / "gen-rej"))
    written = generate.python_func(
        config=recipe,
        pipeline_run_id="gf-1",
        problems=problems,
        trajectories=trajectories,
        rejected=rejected,
        metrics=Metrics(uri=str(tmp_path / "m1")),
    )
    assert written == N_TRAIN  # oracle: one trajectory per problem

    policy = Model(uri=str(tmp_path / "policy"))
    steps.init_model(recipe, "gf-1", "tiny", policy.path)
    kept, dropped = Dataset(uri=str(tmp_path / "kept")), Dataset(uri=str(tmp_path / "dropped"))
    report = HTML(uri=str(tmp_path / "report.html"))
    n_kept = filter_trajectories.python_func(
        config=recipe,
        pipeline_run_id="gf-1",
        trajectories=trajectories,
        problems=problems,
        policy=policy,
        kept=kept,
        rejected=dropped,
        report=report,
        metrics=Metrics(uri=str(tmp_path / "m2")),
    )
    n_rejected = len(load_dataset(dropped.path, "rejected").records)
    assert n_kept + n_rejected == written and n_rejected > 0  # half the oracle's answers carry a fault
    assert Path(report.path).read_text().startswith("<!doctype html>")

    from tgrl_lib.store.artifacts import localize

    fetched = localize(f"{root}/gf-1/filter/kept", tmp_path / "cache")
    assert len(load_dataset(fetched, "trajectories").records) == n_kept


def test_component_runs_through_the_local_runner(tmp_path, recipe):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    with pytest.warns(RuntimeWarning, match="non-Python base image"):  # our image runs tgrl, not bare python
        task = prepare_data(config=recipe, pipeline_run_id="local-1")
    assert task.outputs["Output"] == N_TRAIN
    assert validate_dataset(task.outputs["test_problems"].path) == []
    assert task.outputs["metrics"].metadata["n_test"] == N_TEST


def test_register_step_writes_what_the_gate_reads(tmp_path, recipe, tiny_model_dir):
    results = tmp_path / "eval"
    results.mkdir()
    payload = {
        "meta": {},
        "benchmarks": {"synthetic": {"overall": {"accuracy": 0.25, "count": 6.0}, "groups": {}}},
    }
    (results / "results.json").write_text(json.dumps(payload))
    out = steps.register_and_promote(
        recipe, "reg-1", str(tiny_model_dir), str(results), str(tmp_path / "reg")
    )
    assert out["version"] == 1 and out["promoted"] is True  # no champion yet: the first version wins
    assert json.loads((tmp_path / "reg" / "registered.json").read_text()) == out

    from tgrl_lib.kfp_components.register_and_promote import register_and_promote

    registered = Model(uri=str(tmp_path / "reg2"))
    payload["benchmarks"]["synthetic"]["overall"]["accuracy"] = 0.05
    (results / "results.json").write_text(json.dumps(payload))
    start = tmp_path / "start-eval"  # the start checkpoint's evaluation, handed to the gate
    start.mkdir()
    start_payload = json.loads(json.dumps(payload))
    start_payload["benchmarks"]["synthetic"]["overall"]["accuracy"] = 0.125
    (start / "results.json").write_text(json.dumps(start_payload))
    report = HTML(uri=str(tmp_path / "report.html"))
    promoted = register_and_promote.python_func(
        config=recipe,
        pipeline_run_id="reg-1",
        checkpoint=Model(uri=str(tiny_model_dir)),
        eval_results=Artifact(uri=str(results)),
        registered=registered,
        report=report,
        baseline_results=Artifact(uri=str(start)),
    )
    assert promoted is False and registered.metadata["version"] == 2
    assert registered.metadata["start_accuracy"] == 0.125 and registered.metadata["accuracy"] == 0.05
    page = (tmp_path / "report.html").read_text()
    assert "0.125 -&gt; 0.050" in page and "not promoted" in page


def test_export_champion_publishes_the_checkpoint_and_tags_the_pipeline_run(
    tmp_path, recipe, tiny_model_dir, s3_env, monkeypatch
):
    from tgrl_lib.kfp_components.export_champion import export_champion

    from tgrl_lib.store.artifacts import localize

    monkeypatch.setenv("TGRL_ARTIFACT_ROOT", f"s3://{s3_env['bucket']}/export-test")
    results = tmp_path / "eval"
    results.mkdir()
    payload = {"benchmarks": {"synthetic": {"overall": {"accuracy": 0.5}, "groups": {}}}}
    (results / "results.json").write_text(json.dumps(payload))
    registered = Model(uri=str(tmp_path / "reg"))
    steps.register_and_promote(recipe, "exp-1", str(tiny_model_dir), str(results), registered.path)
    champion = Model(uri=str(tmp_path / "champion"))
    uri = export_champion.python_func(
        config=recipe,
        pipeline_run_id="exp-1",
        checkpoint=Model(uri=str(tiny_model_dir)),
        registered=registered,
        champion=champion,
    )
    assert uri == "models:/tgrl-policy@champion" and champion.metadata["version"] == 1
    fetched = localize(champion.metadata["published"], tmp_path / "cache")
    assert (fetched / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    _, runs = _runs(recipe, "exp-1")
    parent = next(r for r in runs if r.data.tags.get("tgrl.role") == "pipeline")
    assert parent.data.tags["tgrl.champion"] == "models:/tgrl-policy/1"


def test_export_champion_refuses_a_version_that_was_not_promoted(tmp_path, recipe):
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "registered.json").write_text(json.dumps({"model_name": "m", "version": 3, "promoted": False}))
    with pytest.raises(steps.TgrlError, match="not promoted"):
        steps.export_champion(recipe, "x-1", str(tmp_path), str(reg), str(tmp_path / "champion"))
