"""The promotion gate as a compare-and-set, against a real `mlflow server` (sqlite, artifacts on S3):
concurrent promoter processes serialise on the registry-side lock (the best version ends champion, every
promotion replaces the champion the one before it set), stale locks are broken and live ones waited on,
gate inputs must be finite, and a version whose artifacts are missing or altered is refused (and loading a
champion whose artifacts vanished is a one-line `TgrlError`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_registry import fake_checkpoint

from tgrl_lib.cli import main as tgrl
from tgrl_lib.errors import TgrlError
from tgrl_lib.mlops.promotion import LOCK_SUFFIX, promote
from tgrl_lib.mlops.registry import load_champion, register_checkpoint


@pytest.fixture
def registry_uri(mlflow_server) -> str:
    """Tracking URI of the registry under test: the session's `mlflow server` on sqlite. (A server on
    another backend store, e.g. PostgreSQL, can join by parametrising this fixture.)"""
    return mlflow_server


def new_model(
    registry_uri: str, tmp_path: Path, scores: list[float], prefix: str = "cas"
) -> tuple[str, list]:
    """A fresh registered model, one version per score (`synthetic.accuracy`); returns (name, versions)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    ckpt = fake_checkpoint(tmp_path / f"ckpt-{name}")
    versions = [
        register_checkpoint(ckpt, name, None, {"synthetic.accuracy": s}, tracking_uri=registry_uri).version
        for s in scores
    ]
    return name, versions


def champion_of(registry_uri: str, name: str) -> str | None:
    from mlflow import MlflowClient

    return MlflowClient(registry_uri).get_registered_model(name).aliases.get("champion")


def artifact_repo(registry_uri: str, name: str, version: str):
    """The artifact repository holding `name` v`version`'s files, as stored (through the server)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    mlflow.set_tracking_uri(registry_uri)
    return get_artifact_repository(MlflowClient(registry_uri).get_model_version_download_uri(name, version))


# ------------------------------------------------------------------------- concurrent promoters
PROMOTER = """
import json, sys, time
from pathlib import Path
from tgrl_lib.mlops.promotion import promote  # imported before the start line, so all start together
uri, barrier = sys.argv[1], Path(sys.argv[2])
for trial, job in enumerate(sys.argv[3:]):
    name, version = job.split("=")
    go = barrier.with_name(f"{barrier.name}-{trial}")
    while not go.exists():
        time.sleep(0.002)
    decision = promote(name, version, tracking_uri=uri)
    print(json.dumps({"version": version, "promoted": decision.promoted, "changed": decision.changed,
                      "previous": decision.previous_champion}), flush=True)
"""


def test_concurrent_promoter_processes_serialise(registry_uri, tmp_path):
    """4 promoter processes start at once on one registry, 3 trials: the best candidate ends champion and the
    promotions form one chain (each replaced the champion the previous one set). Without the lock, two
    promoters both compare with v1 and the last writer wins, whatever its score."""
    scores = [0.50, 0.70, 0.88, 0.60, 0.80]  # v1 champion, then four candidates
    trials = []
    for _ in range(3):
        name, versions = new_model(registry_uri, tmp_path, scores)
        assert promote(name, versions[0], tracking_uri=registry_uri).promoted
        trials.append((name, versions))
    script, barrier = tmp_path / "promoter.py", tmp_path / "go"
    script.write_text(PROMOTER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), registry_uri, str(barrier)]
            + [f"{name}={versions[i]}" for name, versions in trials],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(1, 5)
    ]
    time.sleep(1.0)
    try:
        for trial, (name, versions) in enumerate(trials):
            barrier.with_name(f"go-{trial}").touch()
            lines = [proc.stdout.readline() for proc in procs]
            assert all(lines), "a promoter process ended early (its stderr is checked below)"
            decisions = [json.loads(line) for line in lines]
            best = versions[scores.index(max(scores))]
            assert champion_of(registry_uri, name) == best, decisions
            promoted = [d for d in decisions if d["changed"]]
            previous = [d["previous"] for d in promoted]
            assert len(set(previous)) == len(previous), (
                f"two promotions replaced the same champion: {promoted}"
            )
            # one chain from v1: every replaced champion is v1 or a version promoted in this trial
            assert set(previous) <= {versions[0]} | {d["version"] for d in promoted}, promoted
            score = dict(zip(versions, scores, strict=True))
            assert all(score[d["version"]] > score[d["previous"]] for d in promoted), promoted
    finally:
        for trial in range(len(trials)):  # a failed trial must not leave promoters waiting for their start
            barrier.with_name(f"go-{trial}").touch()
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
    from mlflow import MlflowClient

    client = MlflowClient(registry_uri)
    for name, _ in trials:  # every lock released
        assert not client.search_registered_models(filter_string=f"name = '{name}{LOCK_SUFFIX}'")


def test_a_stale_lock_is_broken_and_a_live_one_waited_for(registry_uri, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(registry_uri)
    name, (v1, v2, v3) = new_model(registry_uri, tmp_path, [0.5, 0.6, 0.7], prefix="lock")
    lock = name + LOCK_SUFFIX
    stale = {"tgrl.lock.owner": "dead-host:1:gone", "tgrl.lock.expires": f"{time.time() - 1:.3f}"}
    client.create_registered_model(lock, tags=stale)  # a promoter that crashed holding the lock
    assert promote(name, v1, tracking_uri=registry_uri, lock_wait_s=5).promoted
    assert not client.search_registered_models(filter_string=f"name = '{lock}'")

    live = {"tgrl.lock.owner": "busy-host:2:alive", "tgrl.lock.expires": f"{time.time() + 60:.3f}"}
    client.create_registered_model(lock, tags=live)
    started = time.monotonic()
    with pytest.raises(TgrlError, match="locked by busy-host:2:alive") as err:
        promote(name, v2, tracking_uri=registry_uri, lock_wait_s=1)
    assert time.monotonic() - started < 15 and len(str(err.value).splitlines()) == 1
    assert champion_of(registry_uri, name) == v1  # nothing moved
    client.delete_registered_model(lock)  # the holder releases: the same call now goes through
    assert promote(name, v3, tracking_uri=registry_uri, lock_wait_s=5).promoted
    assert champion_of(registry_uri, name) == v3


# ------------------------------------------------------------------------------ gate inputs
BAD_GATE_INPUTS = [
    (["--margin", "nan"], "margin must be a finite number, got 'nan'"),
    (["--margin", "inf"], "margin must be a finite number"),
    (["--margin=-inf"], "margin must be a finite number"),
    (["--margin", "abc"], "margin must be a finite number, got 'abc'"),
    (["--max-regression", "nan"], "max_regression must be a finite number"),
    (["--max-regression=-0.1"], "max_regression must be >= 0"),
]


def test_gate_inputs_must_be_finite(registry_uri, tmp_path, capsys):
    """`--margin nan` once promoted a 0.40 candidate over a 0.88 champion (every comparison with NaN is
    false). Now a one-line error and the champion stays; the positive control is the same call with 0.01."""
    name, (champion, worse) = new_model(registry_uri, tmp_path, [0.88, 0.40], prefix="nan")
    assert promote(name, champion, tracking_uri=registry_uri).promoted
    base = ["promote", "--model", name, "--version", worse, "--tracking-uri", registry_uri]
    for flags, message in BAD_GATE_INPUTS:
        capsys.readouterr()
        assert tgrl(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert champion_of(registry_uri, name) == champion
    with pytest.raises(TgrlError, match="margin must be a finite number"):
        promote(name, worse, margin=float("nan"), tracking_uri=registry_uri)
    assert tgrl(base + ["--margin", "0.01"]) == 0  # positive control: a finite margin runs the gate
    assert "NOT PROMOTED" in capsys.readouterr().out
    assert champion_of(registry_uri, name) == champion
    assert promote(name, champion, margin=-0.5, tracking_uri=registry_uri).promoted  # negative is finite


# ------------------------------------------------------------------------------ artifacts
def test_versions_with_missing_or_altered_artifacts_are_refused(registry_uri, tmp_path):
    name, (v1, gone, partial, altered, intact) = new_model(
        registry_uri, tmp_path, [0.5, 0.9, 0.9, 0.9, 0.6], prefix="art"
    )
    assert promote(name, v1, tracking_uri=registry_uri).promoted
    artifact_repo(registry_uri, name, gone).delete_artifacts()
    artifact_repo(registry_uri, name, partial).delete_artifacts("artifacts/checkpoint/model.safetensors")
    swapped = tmp_path / "swap" / "config.json"
    swapped.parent.mkdir()
    swapped.write_text('{"model_type": "swapped"}')
    artifact_repo(registry_uri, name, altered).log_artifact(str(swapped), "artifacts/checkpoint")

    expected = {
        gone: "has no MLmodel in its artifacts",
        partial: "1 checkpoint file(s) missing from the registry: ['model.safetensors']",
        altered: "config.json: sha256 does not match",
    }
    for version, reason in expected.items():
        decision = promote(name, version, tracking_uri=registry_uri)
        assert not decision.promoted and reason in decision.reason, decision.reason
        assert decision.reason.startswith("artifacts failed verification")
        assert champion_of(registry_uri, name) == v1
    # the listing alone cannot see a swapped file; the checksum download can (above)
    assert promote(name, altered, tracking_uri=registry_uri, checksums=False).promoted
    assert promote(name, intact, tracking_uri=registry_uri).promoted is False  # 0.6 < 0.9: judged, not broken
    assert champion_of(registry_uri, name) == altered


def test_loading_a_champion_whose_artifacts_vanished_is_one_clear_error(registry_uri, tmp_path):
    name, (v1,) = new_model(registry_uri, tmp_path, [0.5], prefix="vanish")
    assert promote(name, v1, tracking_uri=registry_uri).promoted
    first = load_champion(name, tmp_path / "ok", tracking_uri=registry_uri)  # positive control
    assert (first / "model.safetensors").is_file()
    artifact_repo(registry_uri, name, v1).delete_artifacts()
    with pytest.raises(TgrlError, match=rf"models:/{name}/{v1} has no MLmodel in its artifacts") as err:
        load_champion(name, tmp_path / "after", tracking_uri=registry_uri)
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "after").exists() or not any((tmp_path / "after").iterdir())


# ------------------------------------------------------------------------------- the reference
def test_a_first_version_must_beat_its_start_model_and_the_floor(registry_uri, tmp_path):
    """With no champion the reference is the start model (its metrics from the same evaluation): a version
    that learned nothing is refused, one that beats it by the margin promoted; both numbers are tags."""
    from mlflow import MlflowClient

    name, (worse, better) = new_model(registry_uri, tmp_path, [0.30, 0.48], prefix="start")
    start = {"benchmarks": {"synthetic": {"overall": {"accuracy": 0.31, "count": 64}}}}  # a results.json
    refused = promote(name, worse, margin=0.02, baseline=start, tracking_uri=registry_uri)
    assert not refused.promoted and "vs the start model 0.3100" in refused.reason
    tags = MlflowClient(registry_uri).get_model_version(name, worse).tags
    assert tags["promotion.compared_to"] == "start model" and tags["promotion.decision"] == "refused"
    assert float(tags["promotion.candidate_mean"]) == 0.30 and float(tags["promotion.reference_mean"]) == 0.31
    below = promote(name, better, margin=0.02, baseline=start, floor=0.5, tracking_uri=registry_uri)
    assert (
        not below.promoted
        and "below the floor 0.5" in below.reason
        and champion_of(registry_uri, name) is None
    )
    promoted = promote(name, better, margin=0.02, baseline=start, floor=0.45, tracking_uri=registry_uri)
    assert promoted.promoted and "beats the margin" in promoted.reason  # control: the same version, passing
    assert champion_of(registry_uri, name) == better


def test_the_champion_not_the_start_model_is_the_reference_once_there_is_one(registry_uri, tmp_path):
    name, (champion, candidate) = new_model(registry_uri, tmp_path, [0.60, 0.55], prefix="ref")
    assert promote(name, champion, tracking_uri=registry_uri).promoted  # no champion, no baseline: first wins
    weak_start = {"synthetic.accuracy": 0.10}
    decision = promote(name, candidate, baseline=weak_start, tracking_uri=registry_uri)
    assert not decision.promoted and f"vs champion v{champion}" in decision.reason  # beats the start, not v1
    with pytest.raises(TgrlError, match="finite"):
        promote(name, candidate, floor=float("nan"), tracking_uri=registry_uri)
