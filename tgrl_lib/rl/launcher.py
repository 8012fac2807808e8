"""How the train step starts the training loop: in this process, one process per GPU on this node
(`accelerate launch`), or one pod per node through a Kubeflow Trainer `TrainJob` (torch-distributed runtime).

The compiled pipeline decides (`pipelines/placement.py` sets `TGRL_TRAIN_LAUNCH`, the JSON of a `LaunchPlan`,
on the train task: `tgrl pipeline compile --profile gpu --train-gpus 8 --train-nodes 2`); `steps.train`
reads it with `plan_from_env` and calls `launch_training`:

- 1 process: `None` here, the step trains in-process as before.
- 1 node, N GPUs: `accelerate launch --num_processes N ... -m tgrl_lib.cli train --config RECIPE ...` with
  DDP or FSDP (`strategy`); the child writes `metrics.jsonl`, which the step then logs to MLflow.
- several nodes: a `TrainJob` on the `torch-distributed` runtime (the runtime runs `torchrun` with PET_*
  topology variables on every node); FSDP settings travel as accelerate's own environment variables (what
  `accelerate launch` would set). Inputs and outputs go through a ReadWriteMany volume mounted on the train
  task and on every node (`shared_volume`), so checkpoints are visible to all ranks for resume.

Every setting here is a field of `LaunchPlan`; the recipe-dependent ones (mixed precision) come from
`train:`. Imports: stdlib + pydantic at top level; kubernetes lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tgrl_lib.env import read_env
from tgrl_lib.errors import TgrlError

ENV_VAR = "TGRL_TRAIN_LAUNCH"
TRAINJOB_API = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
QWEN_VL_LAYERS = "Qwen2_5_VLDecoderLayer,Qwen2_5_VLVisionBlock"  # the model's _no_split_modules


class LaunchPlan(BaseModel):
    """Where and how the training loop runs (one process per GPU)."""

    model_config = ConfigDict(extra="forbid")

    nodes: int = Field(1, ge=1, description="Machines the train step spans; > 1 runs a Kubeflow TrainJob.")
    gpus_per_node: int = Field(1, ge=1, description="GPUs per machine = training processes per machine.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "fsdp", description="ddp: a full model copy per GPU; fsdp: weights, grads, optimizer sharded (FSDP2)."
    )
    fsdp_layers: str = Field(QWEN_VL_LAYERS, description="Module classes FSDP wraps one by one (comma list).")
    activation_checkpointing: bool = Field(True, description="FSDP: recompute layer activations in backward.")
    image: str = Field("", description="Container image of the TrainJob nodes (the train task's own).")
    runtime: str = Field("torch-distributed", description="Kubeflow Trainer ClusterTrainingRuntime name.")
    shared_volume: str = Field("tgrl-train", description="ReadWriteMany PVC on the train task and nodes.")
    mount_path: str = Field("/mnt/tgrl-train", description="Where the shared volume is mounted.")
    namespace: str = Field("", description="TrainJob namespace ('' = the train task's own).")
    timeout_s: int = Field(7 * 24 * 3600, ge=60, description="Longest the step waits for the TrainJob.")

    @property
    def processes(self) -> int:
        return self.nodes * self.gpus_per_node


def plan_from_env() -> LaunchPlan | None:
    """The compiled launch plan of this task, or None (train in-process)."""
    text = read_env(ENV_VAR)
    if text is None:
        return None
    try:
        return LaunchPlan.model_validate_json(text)
    except ValueError as err:
        raise TgrlError(f"{ENV_VAR} is not a valid launch plan: {err}", hint="recompile it") from err


# ------------------------------------------------------------------------------------- environment
def accelerate_env(plan: LaunchPlan, mixed_precision: str) -> dict[str, str]:
    """The variables `accelerate launch` sets for this plan (read by `Accelerator()` in every rank)."""
    env = {"ACCELERATE_MIXED_PRECISION": mixed_precision, "OMP_NUM_THREADS": "1", "TGRL_PROGRESS": "0"}
    if plan.strategy == "fsdp":
        env |= {
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": "2",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": plan.fsdp_layers,
            "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
            "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
            "FSDP_SYNC_MODULE_STATES": "true",
            "FSDP_ACTIVATION_CHECKPOINTING": str(plan.activation_checkpointing).lower(),
        }
    return env


def train_args(config_path: str, problems: str, experts: str | None, out: str) -> list[str]:
    """`tgrl train` arguments of one launched run."""
    args = ["train", "--config", config_path, "--problems", problems, "--out", out]
    return args + (["--experts", experts] if experts else [])


def accelerate_command(plan: LaunchPlan, mixed_precision: str, args: list[str]) -> list[str]:
    """`accelerate launch` of `tgrl <args>` with one process per GPU on this node (this interpreter's)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(plan.gpus_per_node),
               "--num_machines", "1", "--mixed_precision", mixed_precision,
               "--dynamo_backend", "no"]  # fmt: skip
    if plan.strategy == "fsdp":
        checkpointing = str(plan.activation_checkpointing).lower()
        command += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                    "--fsdp_transformer_layer_cls_to_wrap", plan.fsdp_layers,
                    "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_reshard_after_forward", "true",
                    "--fsdp_activation_checkpointing", checkpointing]  # fmt: skip
    else:
        command += ["--multi_gpu"]
    return [*command, "-m", "tgrl_lib.cli", *args]


# ---------------------------------------------------------------------------------------- TrainJob
def trainjob_name(pipeline_run_id: str) -> str:
    """A DNS-1123 name, stable per pipeline run (a retried task finds its own job)."""
    return "tgrl-train-" + hashlib.sha256(pipeline_run_id.encode()).hexdigest()[:12]


def trainjob_manifest(plan: LaunchPlan, name: str, mixed_precision: str, args: list[str]) -> dict[str, Any]:
    """The `TrainJob` of a multi-node run (validated against the CRD schema in tests/test_launch.py)."""
    if not plan.image:
        raise TgrlError("a multi-node launch needs the node image", hint="recompile with --cuda-image")
    env = [{"name": k, "value": v} for k, v in sorted(accelerate_env(plan, mixed_precision).items())]
    volume = {"name": "shared", "persistentVolumeClaim": {"claimName": plan.shared_volume}}
    node_pod = {
        "volumes": [volume, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}}],
        "containers": [{"name": "node", "volumeMounts": [
            {"name": "shared", "mountPath": plan.mount_path}, {"name": "dshm", "mountPath": "/dev/shm"}]}],
    }  # fmt: skip
    jobs = [{"name": "node", "template": {"spec": {"template": {"spec": node_pod}}}}]
    runtime_patch = {"template": {"spec": {"replicatedJobs": jobs}}}
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "tgrl"}},
        "spec": {
            "runtimeRef": {
                "name": plan.runtime,
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
            },
            "trainer": {
                "image": plan.image,
                "command": ["torchrun", "-m", "tgrl_lib.cli", *args],  # nnodes, nproc, rdzv from PET_*
                "numNodes": plan.nodes,
                "numProcPerNode": plan.gpus_per_node,
                "resourcesPerNode": {"limits": {"nvidia.com/gpu": str(plan.gpus_per_node)}},
                "env": env,
            },
            "runtimePatches": [{"manager": "tgrl.dev/train-step", "trainingRuntimeSpec": runtime_patch}],
        },
    }


# ------------------------------------------------------------------------------------------ launch
def launch_training(
    plan: LaunchPlan,
    train_config: dict[str, Any],
    problems: str,
    experts: str | None,
    work: Path,
    run_id: str,
) -> Path:
    """Run `tgrl train` as the plan says; returns its output_dir (final/, metrics.jsonl).

    `work` is a scratch directory for one node; several nodes work in `mount_path/<job name>/` (inputs are
    copied there first, so every node reads the same files)."""
    mixed_precision = str(train_config.get("mixed_precision", "no"))
    if plan.nodes == 1:
        config = _write_config(work / "train.yaml", train_config)
        out = work / "run"
        args = train_args(str(config), problems, experts, str(out))
        _run(accelerate_command(plan, mixed_precision, args), accelerate_env(plan, mixed_precision))
        return out
    name = trainjob_name(run_id)
    shared = Path(plan.mount_path) / name
    inputs = {"problems": problems, "experts": experts, "model": str(train_config["model"])}
    local = {k: _copy_in(v, shared / "inputs" / k) for k, v in inputs.items() if v}
    config = _write_config(shared / "train.yaml", {**train_config, "model": local["model"]})
    out = shared / "run"
    args = train_args(str(config), local["problems"], local.get("experts"), str(out))
    submit_and_wait(trainjob_manifest(plan, name, mixed_precision, args), plan)
    return out


def launched_result(out: Path, steps: int, logger: Any | None = None) -> Any:
    """The `TrainResult` of a launched run from its output_dir; its per-step metrics go to `logger`."""
    from tgrl_lib.rl.trainer import TrainResult

    rows: dict[int, dict[str, float]] = {}
    path = out / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        row = json.loads(line)
        step = int(row.pop("step"))
        row.pop("time", None)
        rows[step] = {k: float(v) for k, v in row.items() if isinstance(v, int | float)}
    for step in sorted(rows):
        if logger is not None:
            logger.log(rows[step], step)
    final = out / "final"
    if not final.is_dir():
        raise TgrlError("the launched training left no final model", path=out, hint="see its log above")
    metrics = rows[max(rows)] if rows else {}
    return TrainResult(final, steps, metrics, message=f"trained {steps} steps on launched ranks")


def _write_config(path: Path, train_config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": train_config}, indent=1), encoding="utf-8")  # JSON is YAML
    return path


def _copy_in(source: str, target: Path) -> str:
    """A copy of an input directory on the shared volume (an s3:// one fetched first: the nodes get no
    credentials); kept across retries of the task."""
    import shutil

    from tgrl_lib.store.artifacts import localize

    if not target.exists():
        shutil.copytree(localize(source), target.with_name(target.name + ".tmp"), dirs_exist_ok=True)
        os.replace(target.with_name(target.name + ".tmp"), target)  # whole or absent
    return str(target)


def _run(command: list[str], extra_env: dict[str, str]) -> None:
    env = {**os.environ, **extra_env}
    print("launch:", shlex.join(command), flush=True)
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0:
        raise TgrlError(f"the launched training exited with status {done.returncode}", hint="see its log")


def submit_and_wait(manifest: dict[str, Any], plan: LaunchPlan) -> None:
    """Create the TrainJob (or find it after a retry) and wait until it completes or fails."""
    from kubernetes import client, config

    config.load_incluster_config()
    namespace = plan.namespace or _own_namespace()
    api = client.CustomObjectsApi()
    group, version, plural = TRAINJOB_API
    name = manifest["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(group, version, namespace, plural, manifest)
    except client.ApiException as err:
        if err.status != 409:  # 409: created by an earlier try of this task: wait for it
            raise TgrlError(f"cannot create TrainJob {name}: {err.reason}", hint="check the RBAC") from None
    deadline = time.monotonic() + plan.timeout_s
    while time.monotonic() < deadline:
        job = api.get_namespaced_custom_object(group, version, namespace, plural, name)
        state = {c["type"]: c["status"] for c in job.get("status", {}).get("conditions", [])}
        if state.get("Complete") == "True":
            return
        if state.get("Failed") == "True":
            hint = f"kubectl -n {namespace} describe trainjob {name}"
            raise TgrlError(f"TrainJob {name} failed", hint=hint)
        time.sleep(30)
    raise TgrlError(f"TrainJob {name} did not finish within {plan.timeout_s} s", hint="raise timeout_s")


def _own_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else "default"
