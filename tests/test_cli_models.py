"""`models:/NAME/VERSION` and `models:/NAME@ALIAS` wherever the CLI takes a model: `tgrl eval` evaluates
the registered version and `tgrl serve` serves it (a real server subprocess on a free loopback port), from
a real SQLite MLflow registry holding the tiny model. A plain directory keeps working (positive control),
and an alias that does not exist is one clear error."""

from __future__ import annotations

import json
import sys
import urllib.request

import pytest
from servers import ServerProcess

from tgrl_lib.cli import main as tgrl
from tgrl_lib.mlops.model_uri import local_model


@pytest.fixture
def registry(tmp_path, tiny_model_dir, monkeypatch):
    """A SQLite MLflow with the tiny model registered as `tiny-cli` v1 (alias candidate, then champion)."""
    from mlflow import MlflowClient

    from tgrl_lib.mlops.registry import register_checkpoint
    from tgrl_lib.mlops.tracking_uri import use_tracking_uri

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TGRL_CACHE_DIR", str(tmp_path / "cache"))
    use_tracking_uri(uri)
    version = register_checkpoint(tiny_model_dir, "tiny-cli", None, {"synthetic.accuracy": 0.0})
    MlflowClient().set_registered_model_alias("tiny-cli", "champion", version.version)
    return uri


@pytest.fixture
def problems(tmp_path):
    from tgrl_lib.data.synthetic import synthesize

    root = tmp_path / "test"
    synthesize(root, n=4, seed=3, split="test")
    return root


def test_local_model_passes_paths_and_downloads_versions_once(registry, tiny_model_dir, tmp_path):
    assert local_model(str(tiny_model_dir)) == str(tiny_model_dir)  # a directory stays itself
    by_alias = local_model("models:/tiny-cli@champion", tracking_uri=registry)
    by_version = local_model("models:/tiny-cli/1", tracking_uri=registry)
    assert by_alias == by_version and by_alias.startswith(str(tmp_path / "cache"))  # cached per version
    assert (tmp_path / "cache" / "models" / "tiny-cli" / "v1" / "model.safetensors").is_file()


@pytest.mark.parametrize("uri", ["models:/tiny-cli@champion", "models:/tiny-cli/1"])
def test_eval_takes_a_registered_model(registry, problems, tmp_path, capsys, uri):
    out = tmp_path / f"eval-{uri[-1]}"
    argv = ["eval", "--model", uri, "--tracking-uri", registry, "--benchmark", f"synthetic={problems}"]
    assert tgrl([*argv, "--out", str(out), "--max-new-tokens", "8", "--limit", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["benchmarks"]["synthetic"]["overall"]["count"] == 2
    assert "/cache/models/tiny-cli/v1" in results["meta"]["model"]
    from mlflow import MlflowClient  # a tracking URI is set: the evaluation is an MLflow run

    client = MlflowClient(tracking_uri=registry)
    experiment = client.get_experiment_by_name("tgrl-eval").experiment_id
    (run,) = client.search_runs([experiment], f"params.`eval.model` = '{uri}'")
    assert run.data.metrics["synthetic.count"] == 2 and "synthetic.accuracy" in run.data.metrics
    assert run.data.params["eval.sampling.max_new_tokens"] == "8"


def test_an_unknown_alias_is_one_clear_error(registry, problems, tmp_path, capsys):
    argv = ["eval", "--model", "models:/tiny-cli@nope", "--tracking-uri", registry]
    code = tgrl([*argv, "--benchmark", f"synthetic={problems}", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code != 0 and "models:/tiny-cli@nope" in err and len(err.strip().splitlines()) == 1


def test_serve_takes_a_registered_model(registry, tmp_path):
    argv = lambda port: [  # noqa: E731
        sys.executable, "-m", "tgrl_lib.cli", "serve", "--model", "models:/tiny-cli@champion",
        "--tracking-uri", registry, "--port", str(port), "--served-model-name", "tiny",
    ]  # fmt: skip
    server = ServerProcess("tgrl-serve", argv, health_path="/v1/models", log_dir=tmp_path, start_timeout=180)
    server.start()
    try:
        with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as response:
            served = json.loads(response.read())
        assert [m["id"] for m in served["data"]] == ["tiny"]
    finally:
        server.stop()


def test_cli_defaults_are_the_recipes(tmp_path, monkeypatch):
    """Run from a checkout, `tgrl eval` and `tgrl train` read configs/tiny-cpu.yaml as `pipeline run` does
    (eval answered with 64 new tokens where the pipeline used 48); elsewhere the model defaults hold."""
    from pathlib import Path

    from tgrl_lib.commands.eval import default_recipe
    from tgrl_lib.config import EvalConfig, TrainConfig
    from tgrl_lib.recipe import load_config

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    recipe = load_config("configs/tiny-cpu.yaml")
    assert load_config(default_recipe(None), EvalConfig, section="eval") == recipe.eval
    assert load_config(default_recipe(None), TrainConfig, section="train") == recipe.train
    assert default_recipe("other.yaml") == "other.yaml"
    monkeypatch.chdir(tmp_path)  # positive control: no checkout, no recipe
    assert default_recipe(None) is None
