"""The train step's launcher: `tgrl pipeline compile --profile gpu --train-gpus 8 --train-nodes 2` gives the
train task a launch plan whose TrainJob validates against Kubeflow Trainer's published CRD schema (checked in
under tests/schemas/); one node gets an `accelerate launch` that accelerate's own parser accepts; and the
launched path really trains with `accelerate launch --num_processes 2` (gloo on CPU)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tgrl_lib.cli import main
from tgrl_lib.rl import launcher

SCHEMA = json.loads((Path(__file__).parents[1] / "schemas" / "trainjob.v1alpha1.schema.json").read_text())
CUDA_IMAGE = "ghcr.io/example/tgrl@sha256:" + "cd" * 32


def _train_executor(tmp_path: Path, *flags: str) -> tuple[dict, dict]:
    out = tmp_path / "compiled"
    assert main(["pipeline", "compile", "--out", str(out), "--pipeline", "tgrl_pipeline", *flags]) == 0
    spec, platform = yaml.safe_load_all((out / "tgrl_pipeline.yaml").read_text())
    label = spec["components"]["comp-train"]["executorLabel"]
    container = spec["deploymentSpec"]["executors"][label]["container"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][label]
    return container, k8s


def _plan(container: dict) -> launcher.LaunchPlan | None:
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    text = env.get(launcher.ENV_VAR)
    return None if text is None else launcher.LaunchPlan.model_validate_json(text)


def _errors(manifest: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def test_two_nodes_compile_to_a_trainjob_that_validates_against_the_crd_schema(tmp_path):
    container, k8s = _train_executor(
        tmp_path, "--profile", "gpu", "--train-gpus", "8", "--train-nodes", "2", "--cuda-image", CUDA_IMAGE
    )
    plan = _plan(container)
    assert plan is not None and (plan.nodes, plan.gpus_per_node, plan.strategy) == (2, 8, "fsdp")
    assert plan.image == CUDA_IMAGE  # the nodes run the CUDA image; the task itself only submits and waits
    assert "accelerator" not in container["resources"] and not container["image"].endswith("-cuda")
    assert k8s["pvcMount"][0]["mountPath"] == plan.mount_path

    args = launcher.train_args("/mnt/tgrl-train/j/train.yaml", "/mnt/tgrl-train/j/inputs/problems", None, "o")
    manifest = launcher.trainjob_manifest(plan, launcher.trainjob_name("run-1"), "bf16", args)
    assert _errors(manifest) == []
    trainer = manifest["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert trainer["command"][:4] == ["torchrun", "-m", "tgrl_lib.cli", "train"]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert manifest["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert launcher.trainjob_name("run-1") != launcher.trainjob_name("run-2")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("spec", "trainer", "numNode"), 2, "Additional properties"),  # a typo is refused, not pruned
        (("spec", "trainer", "numNodes"), "2", "is not of type 'integer'"),
        (("spec", "runtimeRef", "name"), "", "should be non-empty"),
    ],
)
def test_the_schema_refuses_broken_trainjobs(path, value, message):
    plan = launcher.LaunchPlan(nodes=2, gpus_per_node=4, image=CUDA_IMAGE)
    manifest = launcher.trainjob_manifest(plan, "tgrl-train-x", "bf16", ["train"])
    assert _errors(manifest) == []  # positive control: the unbroken manifest passes
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(message in e for e in _errors(manifest)), _errors(manifest)


def test_one_node_runs_accelerate_launch_with_one_process_per_gpu(tmp_path):
    import accelerate.commands.launch as accelerate_launch

    container, _ = _train_executor(tmp_path, "--profile", "gpu", "--train-gpus", "8")
    plan = _plan(container)
    assert plan is not None and (plan.nodes, plan.gpus_per_node) == (1, 8)
    assert container["resources"]["accelerator"]["resourceCount"] == "8"
    command = launcher.accelerate_command(plan, "bf16", launcher.train_args("c.yaml", "p", "e", "o"))
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    parsed = accelerate_launch.launch_command_parser().parse_args(command[3:])  # accelerate's own parser
    assert parsed.num_processes == 8 and parsed.use_fsdp and parsed.fsdp_version == "2"
    assert parsed.module and parsed.training_script == "tgrl_lib.cli"
    assert parsed.training_script_args == ["train", "--config", "c.yaml", "--problems", "p", "--out", "o",
                                           "--experts", "e"]  # fmt: skip
    ddp = launcher.accelerate_command(plan.model_copy(update={"strategy": "ddp"}), "no", ["train"])
    assert accelerate_launch.launch_command_parser().parse_args(ddp[3:]).multi_gpu


def test_one_gpu_and_the_cpu_profile_train_in_the_task(tmp_path):
    container, _ = _train_executor(tmp_path / "gpu1", "--profile", "gpu")
    assert _plan(container) is None
    container, _ = _train_executor(tmp_path / "cpu", "--train-gpus", "4")
    assert _plan(container) is None


def test_several_nodes_without_the_gpu_profile_are_refused_in_one_line(tmp_path, capsys):
    assert main(["pipeline", "compile", "--out", str(tmp_path / "x"), "--train-nodes", "2"]) != 0
    assert "train_nodes > 1 needs --profile gpu" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_bad_launch_plan_is_refused_in_one_line(monkeypatch):
    from tgrl_lib.errors import TgrlError

    monkeypatch.setenv(launcher.ENV_VAR, json.dumps({"nodes": 2, "gpus": 8}))
    with pytest.raises(TgrlError, match="not a valid launch plan"):
        launcher.plan_from_env()
    monkeypatch.setenv(launcher.ENV_VAR, json.dumps({"nodes": 1, "gpus_per_node": 2}))
    assert launcher.plan_from_env().processes == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_launched_training_runs_two_ranks_under_accelerate_launch(tiny_model_dir, tmp_path, monkeypatch):
    problems, experts = _tiny_data(tmp_path)
    config = {"algorithm": "tgrl", "model": str(tiny_model_dir), "steps": 2, "problems_per_step": 1,
              "group_size": 2, "sampling": {"max_new_tokens": 8}, "micro_batch_size": 2,
              "in_loop_filter": {"max_tokens": 64}}  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    plan = launcher.LaunchPlan(nodes=1, gpus_per_node=2, strategy="ddp")
    out = launcher.launch_training(plan, config, str(problems), str(experts), tmp_path / "work", "run-1")
    logged: list[tuple[int, dict]] = []
    result = launcher.launched_result(out, 2, type("L", (), {"log": lambda s, m, k: logged.append((k, m))})())
    assert (result.final_dir / "model.safetensors").is_file() and result.steps_done == 2
    assert [k for k, _ in logged] == [0, 1, 2] and "reward/mean" in result.metrics
    assert sorted(p.name for p in (out / "ranks").iterdir()) == ["rank-0.jsonl", "rank-1.jsonl"]
    assert os.environ.get("WORLD_SIZE") is None  # the ranks ran in children, not here


def _tiny_data(root: Path) -> tuple[Path, Path]:
    from tgrl_lib.data.schema import Trajectory, load_dataset, write_dataset
    from tgrl_lib.data.synthetic import synthesize
    from tgrl_lib.generation.oracle import oracle_response

    synthesize(root / "problems", n=4, seed=0, split="train", difficulties=["easy"])
    problems = load_dataset(root / "problems", "problems").records
    experts = [Trajectory(problem_id=p.id, source="expert:oracle", text=oracle_response(p)) for p in problems]
    write_dataset(root / "experts", "trajectories", experts)
    return root / "problems", root / "experts"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_node_trainjob_command_trains_when_each_node_runs_it(tiny_model_dir, tmp_path, monkeypatch):
    """The controller's part played locally: validate the manifest, then start its `trainer.command` once
    per node with the PET_* variables the torch runtime sets (2 nodes x 1 process, gloo on CPU)."""
    import subprocess

    from servers import free_port

    problems, experts = _tiny_data(tmp_path)
    port, repo = free_port(), str(Path(__file__).resolve().parents[2])
    submitted = []

    def controller(manifest: dict, plan: launcher.LaunchPlan) -> None:
        assert _errors(manifest) == []
        trainer = manifest["spec"]["trainer"]
        env = {**os.environ, **{e["name"]: e["value"] for e in trainer["env"]}, "PYTHONPATH": repo}
        env |= {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}  # fmt: skip
        command = [sys.executable, "-m", "torch.distributed.run", *trainer["command"][1:]]
        nodes = [subprocess.Popen(command, env={**env, "PET_NODE_RANK": str(r)}) for r in range(2)]
        assert [n.wait(timeout=600) for n in nodes] == [0, 0]
        submitted.append(manifest)

    monkeypatch.setattr(launcher, "submit_and_wait", controller)
    plan = launcher.LaunchPlan(nodes=2, gpus_per_node=1, strategy="ddp", image=CUDA_IMAGE,
                               mount_path=str(tmp_path / "shared"))  # fmt: skip
    config = {"algorithm": "tgrl", "model": str(tiny_model_dir), "steps": 2, "problems_per_step": 1,
              "group_size": 2, "sampling": {"max_new_tokens": 8}, "micro_batch_size": 2,
              "in_loop_filter": {"max_tokens": 64}}  # fmt: skip
    out = launcher.launch_training(plan, config, str(problems), str(experts), tmp_path / "work", "run-7")
    assert out.parent == tmp_path / "shared" / launcher.trainjob_name("run-7")
    assert (out.parent / "inputs" / "model" / "model.safetensors").is_file()  # inputs copied to the volume
    result = launcher.launched_result(out, 2)
    assert (result.final_dir / "model.safetensors").is_file() and len(submitted) == 1
    assert sorted(p.name for p in (out / "ranks").iterdir()) == ["rank-0.jsonl", "rank-1.jsonl"]
