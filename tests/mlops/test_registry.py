"""Model registry and the promotion gate against a real MLflow server (artifacts in a real S3 endpoint),
plus the embedded sqlite store; `models:/NAME@champion` loads and answers like the checkpoint.
Tests that use the server run once on SQLite and once on PostgreSQL (conftest `mlflow_backends`)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from tgrl_lib.cli import main as tgrl
from tgrl_lib.errors import TgrlError
from tgrl_lib.mlops.promotion import promote
from tgrl_lib.mlops.registry import download_model, load_champion, register_checkpoint

pytestmark = pytest.mark.mlflow_backends  # server tests: [sqlite] and [postgres]


def fake_checkpoint(root: Path, seed: int = 0) -> Path:
    """A checkpoint-shaped directory (real safetensors file, config, tokenizer, training state)."""
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    save_file(
        {"w": np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32)},
        root / "model.safetensors",
    )
    (root / "config.json").write_text('{"model_type": "fake"}')
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    (root / "optimizer.pt").write_bytes(b"pickled optimizer state")  # training state: never registered
    return root


def tags_of(client, name: str, version: str) -> dict[str, str]:
    return client.get_model_version(name, version).tags


def test_gate_promotes_the_better_version_and_refuses_worse_ones(mlflow_server, s3_env, tmp_path):
    from mlflow import MlflowClient

    from tgrl_lib.store.s3 import s3_client

    client, name = MlflowClient(mlflow_server), f"gate-{uuid.uuid4().hex[:8]}"
    ckpt = fake_checkpoint(tmp_path / "ckpt")

    def register(metrics: dict) -> str:
        return register_checkpoint(ckpt, name, None, metrics, tracking_uri=mlflow_server).version

    v1 = register({"synthetic": {"accuracy": 0.50}, "mathvista": {"accuracy": 0.40, "pass@4": 0.7}})
    assert tags_of(client, name, v1)["eval.mathvista.pass_at_4"] == "0.7"
    assert client.get_registered_model(name).aliases == {"candidate": v1}
    stored = [
        obj["Key"]
        for page in s3_client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=s3_env["bucket"], Prefix="mlflow/")
        for obj in page.get("Contents", [])
    ]
    registered = client.get_model_version(name, v1)
    model_id = registered.source.removeprefix("models:/")  # the logged model (m-...) holding the files
    assert any(model_id in k and k.endswith("checkpoint/model.safetensors") for k in stored)
    assert not any(model_id in k and k.endswith("optimizer.pt") for k in stored)
    first = promote(name, v1, tracking_uri=mlflow_server)
    assert first.promoted and first.reason.startswith("first evaluated version")
    assert tags_of(client, name, v1)["promotion.compared_to"] == "none"

    stamp = tags_of(client, name, v1)["promotion.time"]
    again = promote(name, v1, tracking_uri=mlflow_server)
    assert again.promoted and not again.changed and again.reason.startswith("already champion")
    assert tags_of(client, name, v1)["promotion.time"] == stamp

    v2 = register({"synthetic.accuracy": 0.60, "mathvista.accuracy": 0.45})  # flat form, as flat_metrics
    better = promote(name, v2, tracking_uri=mlflow_server)
    assert better.promoted and better.previous_champion == v1
    assert better.evidence["delta"] == pytest.approx(0.075)
    assert client.get_registered_model(name).aliases["champion"] == v2
    assert tags_of(client, name, v2)["promotion.compared_to"] == f"v{v1}"
    assert tags_of(client, name, v1)["promotion.replaced_by"] == v2

    v3 = register({"synthetic": {"accuracy": 0.55}, "mathvista": {"accuracy": 0.40}})
    worse = promote(name, v3, tracking_uri=mlflow_server)
    assert not worse.promoted and "does not beat the margin" in worse.reason
    recorded = tags_of(client, name, v3)
    assert recorded["promotion.decision"] == "refused" and recorded["promotion.compared_to"] == f"v{v2}"
    assert json.loads(recorded["promotion.evidence"])["delta"] == pytest.approx(-0.05)

    v4 = register({"synthetic": {"accuracy": 0.90}, "mathvista": {"accuracy": 0.35}})  # mean up, one drops
    regress = promote(name, v4, tracking_uri=mlflow_server)
    assert not regress.promoted and regress.reason.startswith("mathvista regresses by 0.1000")

    v5 = register({"synthetic": {"accuracy": 0.61}, "mathvista": {"accuracy": 0.46}})  # +0.01
    assert not promote(name, v5, margin=0.02, tracking_uri=mlflow_server).promoted
    assert promote(name, v5, margin=0.0, tracking_uri=mlflow_server).promoted

    v6 = register({})
    unevaluated = promote(name, v6, tracking_uri=mlflow_server)
    assert not unevaluated.promoted and unevaluated.reason.startswith("not evaluated")
    assert client.get_registered_model(name).aliases["champion"] == v5


def test_cli_register_and_promote(mlflow_server, tmp_path, capsys):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    ckpt = fake_checkpoint(tmp_path / "ckpt")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"meta": {}, "benchmarks": {"synthetic": {"overall": {"accuracy": 0.3}}}}))
    assert tgrl(["register", "--checkpoint", str(ckpt), "--model", name, "--metrics", str(results),
                 "--tracking-uri", mlflow_server]) == 0  # fmt: skip
    assert f"models:/{name}/1" in capsys.readouterr().out
    assert (
        tgrl(["promote", "--model", name, "--version", "1", "--tracking-uri", mlflow_server, "--json"]) == 0
    )
    decision = json.loads(capsys.readouterr().out)
    assert decision["promoted"] is True and decision["evidence"]["candidate"]["mean"] == 0.3
    assert (
        tgrl(["promote", "--model", f"{name}-missing", "--version", "1", "--tracking-uri", mlflow_server])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("tgrl promote: error: MLflow: reading") and len(err.strip().splitlines()) == 1


def test_register_download_and_cache_on_local_sqlite(tmp_path, monkeypatch):
    monkeypatch.setenv("TGRL_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = fake_checkpoint(tmp_path / "ckpt")
    version = register_checkpoint(ckpt, "local-model", None, {"synthetic.accuracy": 0.5}, tracking_uri=uri)
    assert promote("local-model", version.version, tracking_uri=uri).promoted

    champion = load_champion("local-model", tracking_uri=uri)
    assert champion == tmp_path / "cache" / "models" / "local-model" / "v1"
    files = sorted(p.relative_to(champion).as_posix() for p in champion.rglob("*") if p.is_file())
    assert files == ["COMPLETE", "config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    assert (champion / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert load_champion("local-model", tracking_uri=uri) == champion  # cached, verified again

    (champion / "config.json").write_text("{}")
    with pytest.raises(TgrlError, match="sha256 does not match"):
        load_champion("local-model", tracking_uri=uri)
    with pytest.raises(TgrlError, match="not empty"):
        download_model("models:/local-model@champion", champion, tracking_uri=uri)
    with pytest.raises(TgrlError, match="must be models:/NAME/VERSION"):
        download_model("runs:/abc/model", tmp_path / "x", tracking_uri=uri)
    with pytest.raises(TgrlError, match="safetensors"):
        empty = tmp_path / "no-weights"
        empty.mkdir()
        (empty / "pytorch_model.bin").write_bytes(b"pickle")
        register_checkpoint(empty, "local-model", None, {}, tracking_uri=uri)


@pytest.mark.slow
def test_champion_loads_and_answers_like_the_checkpoint(mlflow_server, tmp_path, tiny_model_dir):
    """The real tiny VLM: `models:/NAME@champion` through pyfunc gives the checkpoint's own answers."""
    tiny_model_dir = Path(tiny_model_dir)
    import mlflow
    import torch
    from PIL import Image

    from tgrl_lib.mlops.registry import generate_answers
    from tgrl_lib.models.policy import load_policy

    name = f"tiny-{uuid.uuid4().hex[:8]}"
    version = register_checkpoint(
        tiny_model_dir, name, None, {"synthetic.accuracy": 0.1}, tracking_uri=mlflow_server
    )
    assert promote(name, version.version, tracking_uri=mlflow_server).promoted
    images = []
    for i, color in enumerate(["red", "blue"]):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (56, 56), color).save(images[-1])
    rows = [
        {"question": "How many shapes?", "image": str(images[0])},
        {"question": "Colour?", "image": str(images[1])},
    ]

    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    served = loaded.predict(rows, params={"max_new_tokens": 12})
    reference = load_policy(tiny_model_dir)
    assert served == generate_answers(reference, rows, max_new_tokens=12)
    registered_weights = loaded.unwrap_python_model().policy.model.state_dict()
    for key, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, registered_weights[key]), key
