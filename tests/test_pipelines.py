"""Compile every pipeline and check the spec a KFP backend would get: the DAG (tasks and their
dependencies), resources per profile, secrets as env, images, caching and the promotion gate."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from tgrl_lib.kfp_pipelines.compile import PIPELINES, compile_pipeline, make_placement

from tgrl_lib.cli import main

GATE = "inputs.parameter_values['pipelinechannel--register-and-promote-Output'] == true"
DIGEST = "sha256:" + "ab" * 32

# task -> the tasks it depends on (the DAG of each pipeline, root level)
TGRL_DAG = {
    "prepare-data": set(),
    "init-model": {"prepare-data"},
    "generate": {"prepare-data"},
    "filter-trajectories": {"generate", "init-model", "prepare-data"},
    "cold-start": {"filter-trajectories", "init-model", "prepare-data"},
    "train": {"cold-start", "filter-trajectories", "prepare-data"},
    "evaluate": {"prepare-data", "train"},
    "evaluate-2": {"cold-start", "prepare-data"},  # the start checkpoint, same evaluation
    "register-and-promote": {"evaluate", "evaluate-2", "train"},
    "condition-1": {"register-and-promote", "train"},
}
BASELINE_DAG = {
    "prepare-data": set(),
    "init-model": {"prepare-data"},
    "train": {"init-model", "prepare-data"},
    "evaluate": {"prepare-data", "train"},
    "evaluate-2": {"init-model", "prepare-data"},
    "register-and-promote": {"evaluate", "evaluate-2", "train"},
    "condition-1": {"register-and-promote", "train"},
}
EVAL_DAG = {"prepare-data": set(), "evaluate-registered": {"prepare-data"}}
DAGS = {"tgrl_pipeline": TGRL_DAG, "grpo_baseline_pipeline": BASELINE_DAG, "eval_pipeline": EVAL_DAG}
GPU_EXECUTORS = {
    "exec-cold-start",
    "exec-evaluate-2",
    "exec-generate",
    "exec-filter-trajectories",
    "exec-train",
    "exec-evaluate",
    "exec-evaluate-registered",
}


def _compiled(tmp_path, name, placement=None):
    path = compile_pipeline(name, tmp_path / f"{name}.yaml", placement)
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], path.read_text()


def _executor_of(spec, task_name, dag=None):
    dag = dag or spec["root"]["dag"]
    component = dag["tasks"][task_name]["componentRef"]["name"]
    return spec["components"][component]["executorLabel"]


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_dag_tasks_and_dependencies(tmp_path, name):
    spec, _, _ = _compiled(tmp_path, name)
    tasks = spec["root"]["dag"]["tasks"]
    got = {task: set(body.get("dependentTasks", [])) for task, body in tasks.items()}
    assert got == DAGS[name]


def test_tgrl_pipeline_runs_steps_in_the_paper_order(tmp_path):
    spec, _, _ = _compiled(tmp_path, "tgrl_pipeline")
    tasks = spec["root"]["dag"]["tasks"]
    order, done = [], set()
    while len(order) < len(tasks):  # Kahn's algorithm, ties broken by name
        ready = sorted(t for t in tasks if t not in done and set(tasks[t].get("dependentTasks", [])) <= done)
        assert ready, "cycle in the DAG"
        order.append(ready[0])
        done.add(ready[0])
    main_path = [t for t in order if t not in ("init-model", "evaluate-2")]
    assert main_path == [
        "prepare-data",
        "generate",
        "filter-trajectories",
        "cold-start",
        "train",
        "evaluate",
        "register-and-promote",
        "condition-1",
    ]


@pytest.mark.parametrize("name", ["tgrl_pipeline", "grpo_baseline_pipeline"])
def test_gate_condition_guards_export_champion(tmp_path, name):
    spec, _, _ = _compiled(tmp_path, name)
    gate = spec["root"]["dag"]["tasks"]["condition-1"]
    assert gate["taskInfo"]["name"] == "promoted"
    assert gate["triggerPolicy"]["condition"] == GATE
    branch = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert list(branch) == ["export-champion"]
    # the gate reads the boolean the register step returns
    params = gate["inputs"]["parameters"]["pipelinechannel--register-and-promote-Output"]
    assert params["taskOutputParameter"] == {
        "outputParameterKey": "Output",
        "producerTask": "register-and-promote",
    }
    register = spec["components"]["comp-register-and-promote"]
    assert register["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "BOOLEAN"


def test_baseline_trains_grpo_without_experts(tmp_path):
    spec, _, _ = _compiled(tmp_path, "grpo_baseline_pipeline")
    train = spec["root"]["dag"]["tasks"]["train"]
    assert train["inputs"]["parameters"]["algorithm"]["runtimeValue"]["constant"] == "grpo"
    assert "experts" not in train["inputs"].get("artifacts", {})
    assert spec["components"]["comp-train"]["inputDefinitions"]["artifacts"]["experts"]["isOptional"] is True
    reg = spec["root"]["dag"]["tasks"]["register-and-promote"]["inputs"]["parameters"]
    assert reg["name_suffix"]["runtimeValue"]["constant"] == "-grpo"


def test_tgrl_trains_from_the_cold_start_and_the_gate_sees_the_start_model(tmp_path):
    spec, _, _ = _compiled(tmp_path, "tgrl_pipeline")
    tasks = spec["root"]["dag"]["tasks"]
    cold = tasks["cold-start"]["inputs"]["artifacts"]
    assert cold["experts"]["taskOutputArtifact"]["producerTask"] == "filter-trajectories"
    assert cold["base_model"]["taskOutputArtifact"]["producerTask"] == "init-model"
    train = tasks["train"]["inputs"]["artifacts"]["base_model"]["taskOutputArtifact"]
    assert train == {"outputArtifactKey": "checkpoint", "producerTask": "cold-start"}
    start_eval = tasks["evaluate-2"]["inputs"]
    assert start_eval["artifacts"]["checkpoint"]["taskOutputArtifact"]["producerTask"] == "cold-start"
    assert start_eval["parameters"]["stage"]["runtimeValue"]["constant"] == "evaluate_start"
    baseline = tasks["register-and-promote"]["inputs"]["artifacts"]["baseline_results"]
    assert baseline["taskOutputArtifact"] == {"outputArtifactKey": "results", "producerTask": "evaluate-2"}
    trained_eval = tasks["evaluate"]["inputs"]["artifacts"]["train_problems"]["taskOutputArtifact"]
    assert trained_eval["producerTask"] == "prepare-data"  # for the blind prior


@pytest.mark.parametrize("name", ["tgrl_pipeline", "grpo_baseline_pipeline"])
def test_retries_on_the_steps_that_can_rerun_and_not_on_registration(tmp_path, name):
    spec, _, _ = _compiled(tmp_path, name)
    tasks = spec["root"]["dag"]["tasks"]
    retried = {t for t, body in tasks.items() if body.get("retryPolicy", {}).get("maxRetryCount")}
    assert {"prepare-data", "init-model", "train", "evaluate", "evaluate-2"} <= retried
    assert "register-and-promote" not in retried  # a rerun would register a second version
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_cpu_profile_has_no_gpu_and_one_image(tmp_path, name):
    spec, k8s, _ = _compiled(tmp_path, name)
    for label, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] == make_placement().image, label
        assert "accelerator" not in container["resources"], label
        assert container["resources"]["resourceMemoryRequest"], label
        assert "emptyDirMounts" not in k8s[label], label


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_gpu_profile_requests_accelerators_memory_and_shm(tmp_path, name):
    placement = make_placement("gpu", train_gpus=2)
    spec, k8s, _ = _compiled(tmp_path, name, placement)
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) & GPU_EXECUTORS, "every pipeline has at least one GPU step"
    for label, executor in executors.items():
        container = executor["container"]
        res = container["resources"]
        if label in GPU_EXECUTORS:
            assert container["image"] == placement.cuda_image
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert res["accelerator"]["resourceCount"] == ("2" if label == "exec-train" else "1")
            assert (
                res["resourceMemoryRequest"].endswith("Gi") and int(res["resourceMemoryRequest"][:-2]) >= 48
            )
            (shm,) = k8s[label]["emptyDirMounts"]
            assert shm["medium"] == "Memory" and shm["mountPath"] == "/dev/shm"
        else:
            assert container["image"] == placement.image
            assert "accelerator" not in res


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_task_gets_credentials_from_secrets_only(tmp_path, name, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    spec, k8s, text = _compiled(tmp_path, name)
    assert set(k8s) == set(spec["deploymentSpec"]["executors"])
    for label, cfg in k8s.items():
        by_name = {s["secretName"]: s for s in cfg["secretAsEnv"]}
        mlflow, s3 = by_name["tgrl-mlflow"], by_name["tgrl-s3"]
        assert mlflow["optional"] is False and s3["optional"] is True, label
        assert {m["envVar"] for m in mlflow["keyToEnv"]} == {
            "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
        }
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= {m["envVar"] for m in s3["keyToEnv"]}
        assert "env" not in spec["deploymentSpec"]["executors"][label]["container"]  # no plain env values
    assert "very-secret-value-123" not in text


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_caching_is_off_and_kfp_is_not_pip_installed(tmp_path, name):
    spec, _, _ = _compiled(tmp_path, name)
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    for dag in dags:
        for task in dag["tasks"].values():
            if "componentRef" in task and not task["componentRef"]["name"].startswith("comp-condition"):
                assert task.get("cachingOptions", {}).get("enableCache") is not True
    for executor in spec["deploymentSpec"]["executors"].values():
        assert "pip install" not in " ".join(executor["container"]["command"])


def test_digest_pinned_images_and_bad_references(tmp_path):
    image, cuda = f"ghcr.io/acme/tgrl@{DIGEST}", f"ghcr.io/acme/tgrl-cuda:1.0@{DIGEST}"
    placement = make_placement("gpu", image=image, cuda_image=cuda, require_digest=True)
    spec, _, _ = _compiled(tmp_path, "tgrl_pipeline", placement)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {image, cuda}
    with pytest.raises(ValueError, match="not pinned"):
        make_placement(image="ghcr.io/acme/tgrl:1.0", require_digest=True)
    with pytest.raises(ValueError, match="invalid image reference"):
        make_placement(image="ghcr.io/acme/tgrl@sha256:xyz")
    with pytest.raises(ValueError, match="unknown profile"):
        make_placement("tpu")


def test_cli_compile_writes_every_pipeline(tmp_path, capsys):
    assert main(["pipeline", "compile", "--out", str(tmp_path), "--profile", "gpu"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.yaml" for n in PIPELINES)
    assert main(["pipeline", "compile", "--out", str(tmp_path), "--image", "nope@sha256:1"]) == 2
    assert "invalid image reference" in capsys.readouterr().err


def test_pipeline_modules_import_only_kfp_and_stdlib():
    code = (
        "import sys; import tgrl_lib.kfp_pipelines.compile; "
        "heavy = ('torch', 'transformers', 'mlflow', 'boto3', 'pydantic', 'numpy', 'tgrl_lib.steps', "
        "'tgrl_lib.config'); print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
