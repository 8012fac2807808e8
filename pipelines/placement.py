"""Where each task runs: image, CPU/memory, GPUs, shared memory, caching and credentials.

One profile per kind of cluster node pool, chosen at compile time (`tgrl pipeline compile --profile`):

- `cpu`: every step on the CPU image with modest requests (the tiny recipe, CI-sized runs).
- `gpu`: generate (vLLM), filter (policy likelihood), train and evaluate run on the CUDA image with an
  accelerator, a large memory request and a memory-backed `/dev/shm` (vLLM and NCCL need more than the
  64 MiB a container gets by default); data preparation and registry steps stay on CPU.

Training on several GPUs (`--train-gpus N`, gpu profile) puts a launch plan on the train task
(`TGRL_TRAIN_LAUNCH`, read by `tgrl_lib.rl.launcher`): one node runs `accelerate launch` with one process per
GPU inside the task; several nodes (`--train-nodes M`) make the task a light CPU pod that submits a Kubeflow
Trainer `TrainJob` (torch-distributed runtime, the CUDA image, N GPUs per node) and waits for it, with the
ReadWriteMany volume `TRAIN_VOLUME` mounted on the task and every node for inputs and checkpoints.

Credentials never enter the pipeline spec: every task reads them from Kubernetes Secrets as environment
variables (kfp-kubernetes `use_secret_as_env`). `MLFLOW_SECRET` is required (every step logs to MLflow);
`S3_SECRET` is optional (without it, outputs stay in KFP's own artifact store). Caching is off: a cached
task would skip its MLflow child run and a cached registration would register nothing.

Locally (`kfp.local`) the kfp-kubernetes settings are ignored and the environment is the caller's.
Imports: stdlib and kfp only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kfp import dsl, kubernetes
from tgrl_lib.kfp_components.images import TGRL_CUDA_IMAGE, TGRL_IMAGE

PROFILES = ("cpu", "gpu")
STRATEGIES = ("fsdp", "ddp")
ACCELERATOR = "nvidia.com/gpu"
LAUNCH_ENV = "TGRL_TRAIN_LAUNCH"  # the launch plan (JSON of tgrl_lib.rl.launcher.LaunchPlan)
TRAIN_VOLUME = "tgrl-train"  # ReadWriteMany PVC shared by the train task and the TrainJob nodes
TRAIN_MOUNT = "/mnt/tgrl-train"

MLFLOW_SECRET = "tgrl-mlflow"
MLFLOW_KEYS = {  # Secret data key -> env var of the task
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
S3_SECRET = "tgrl-s3"
S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
    "TGRL_ARTIFACT_ROOT": "TGRL_ARTIFACT_ROOT",
}


@dataclass(frozen=True)
class Resources:
    """Requests of one task; `gpus > 0` also selects the CUDA image."""

    cpu: str
    memory: str
    gpus: int = 0
    shm: str | None = None


_CPU = {
    "prepare_data": Resources("1", "2Gi"),
    "init_model": Resources("1", "2Gi"),
    "generate": Resources("2", "8Gi"),
    "filter_trajectories": Resources("2", "8Gi"),
    "cold_start": Resources("4", "16Gi"),
    "train": Resources("4", "16Gi"),
    "evaluate": Resources("2", "8Gi"),
    "evaluate_start": Resources("2", "8Gi"),
    "register_and_promote": Resources("1", "2Gi"),
    "export_champion": Resources("1", "2Gi"),
    "evaluate_registered": Resources("2", "8Gi"),
}
_GPU = {
    **_CPU,
    "generate": Resources("8", "64Gi", gpus=1, shm="16Gi"),
    "filter_trajectories": Resources("8", "48Gi", gpus=1, shm="8Gi"),
    "cold_start": Resources("16", "128Gi", gpus=1, shm="32Gi"),
    "train": Resources("16", "128Gi", gpus=1, shm="32Gi"),
    "evaluate": Resources("8", "64Gi", gpus=1, shm="16Gi"),
    "evaluate_start": Resources("8", "64Gi", gpus=1, shm="16Gi"),
    "evaluate_registered": Resources("8", "64Gi", gpus=1, shm="16Gi"),
}


# Steps that may simply run again after a pod loss: they rewrite their outputs from their inputs (train
# resumes from its newest checkpoint). register_and_promote is not among them: a rerun would register a
# second version.
RETRYABLE = {
    "prepare_data", "init_model", "generate", "filter_trajectories", "cold_start", "train", "evaluate",
    "evaluate_start", "export_champion", "evaluate_registered",
}  # fmt: skip
RETRIES = 2


@dataclass(frozen=True)
class Placement:
    """A compile-time choice of profile and images, applied to every task of a pipeline."""

    profile: str = "cpu"
    image: str = TGRL_IMAGE
    cuda_image: str = TGRL_CUDA_IMAGE
    train_gpus: int = 1  # per node
    train_nodes: int = 1
    train_strategy: str = "fsdp"

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}: choose one of {', '.join(PROFILES)}")
        if self.train_gpus < 1 or self.train_nodes < 1:
            raise ValueError("train_gpus and train_nodes must be at least 1")
        if self.train_nodes > 1 and self.profile != "gpu":
            raise ValueError("train_nodes > 1 needs --profile gpu (the nodes train on GPUs)")
        if self.train_strategy not in STRATEGIES:
            raise ValueError(f"unknown train strategy {self.train_strategy!r}: use {', '.join(STRATEGIES)}")

    def resources(self, step: str) -> Resources:
        table = _GPU if self.profile == "gpu" else _CPU
        res = table[step]
        if step == "train" and self.train_nodes > 1:  # the task only submits the TrainJob and waits
            return Resources("1", "4Gi")
        if step == "train" and res.gpus:
            res = Resources(res.cpu, res.memory, gpus=self.train_gpus, shm=res.shm)
        return res

    def launch_plan(self) -> dict | None:
        """The train task's launch plan (None: one process, trained in the task itself)."""
        if self.profile != "gpu" or self.train_gpus * self.train_nodes == 1:
            return None
        return {
            "nodes": self.train_nodes,
            "gpus_per_node": self.train_gpus,
            "strategy": self.train_strategy,
            "image": self.cuda_image,
            "shared_volume": TRAIN_VOLUME,
            "mount_path": TRAIN_MOUNT,
        }

    def apply(self, task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
        """Set image, requests, accelerator, /dev/shm, caching and secrets of `task` (step `step`)."""
        res = self.resources(step)
        task.set_container_image(self.cuda_image if res.gpus else self.image)
        task.set_cpu_request(res.cpu).set_memory_request(res.memory).set_memory_limit(res.memory)
        if res.gpus:
            task.set_accelerator_type(ACCELERATOR).set_accelerator_limit(res.gpus)
        if res.shm:
            kubernetes.empty_dir_mount(
                task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=res.shm
            )
        plan = self.launch_plan() if step == "train" else None
        if plan is not None:
            task.set_env_variable(LAUNCH_ENV, json.dumps(plan, sort_keys=True))
        if plan is not None and plan["nodes"] > 1:
            kubernetes.mount_pvc(task, pvc_name=TRAIN_VOLUME, mount_path=TRAIN_MOUNT)
        task.set_caching_options(enable_caching=False)
        if step in RETRYABLE:
            task.set_retry(num_retries=RETRIES, backoff_duration="30s", backoff_factor=2.0)
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, MLFLOW_KEYS, optional=False)
        kubernetes.use_secret_as_env(task, S3_SECRET, S3_KEYS, optional=True)
        return task
