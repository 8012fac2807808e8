"""`tgrl pipeline run --local | submit --host | compile`: run the TGRL pipeline on this machine, start one
run on a KFP backend, or write the KFP YAMLs.

Argument translation only: `run --local` calls `tgrl_lib.mlops.local_run.run_local`, `compile` calls
`tgrl_lib.kfp_pipelines.compile`. Stdlib-only imports at top level.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tgrl_lib.commands import add_overrides

PIPELINE_NAMES = ("tgrl_pipeline", "grpo_baseline_pipeline", "eval_pipeline")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pipeline",
        help="Run the whole pipeline locally (kfp.local, CPU, SQLite MLflow) or compile the KFP YAMLs.",
        description="Kubeflow pipelines of tgrl: tgrl_pipeline (data -> experts -> filter -> train -> eval "
        "-> gated promotion), grpo_baseline_pipeline, eval_pipeline.",
    )
    sub = parser.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)

    run = sub.add_parser(
        "run",
        help="Run a pipeline on this machine with kfp.local (every step a subprocess, CPU).",
        description="Run tgrl_pipeline (or the GRPO baseline) locally: kfp.local SubprocessRunner, MLflow on "
        "sqlite:///WORK_DIR/mlflow.db, artifacts in WORK_DIR/mlartifacts, results copied to "
        "WORK_DIR/results/. Prints where everything is and the `mlflow ui` command at the end.",
    )
    run.add_argument(
        "--local", action="store_true", required=True, help="Run here (the only mode of this command)."
    )
    run.add_argument(
        "--config", default=None, help="Recipe YAML (default: configs/tiny-cpu.yaml if present)."
    )
    run.add_argument("--work-dir", default="runs", help="Where MLflow, KFP outputs and results go.")
    add_overrides(run, "--set train.steps=2")
    run.add_argument(
        "--pipeline",
        default="tgrl_pipeline",
        choices=("tgrl_pipeline", "grpo_baseline_pipeline"),
        help="Which pipeline to run.",
    )
    run.add_argument(
        "--base-model",
        default=None,
        help="Initial policy: 'tiny' builds the tiny offline VLM (default unless the recipe's train.model "
        "is an existing directory), or a path/URI.",
    )
    run.set_defaults(func=_run)

    _register_submit(sub)

    comp = sub.add_parser(
        "compile",
        help="Write the KFP IR YAML of every pipeline.",
        description="Compile pipelines to KFP v2 YAML. --profile gpu puts generate/filter/train/eval on the "
        "CUDA image with GPUs and a memory-backed /dev/shm. Images are digest-pinnable: "
        "--image ghcr.io/ORG/tgrl@sha256:... (or TGRL_IMAGE / TGRL_CUDA_IMAGE in the environment).",
    )
    comp.add_argument("--out", required=True, help="Output directory (one <pipeline>.yaml each).")
    comp.add_argument("--profile", choices=("cpu", "gpu"), default="cpu", help="Resource profile.")
    comp.add_argument("--image", help="CPU image reference for every CPU task.")
    comp.add_argument("--cuda-image", help="CUDA image reference for GPU tasks (gpu profile).")
    comp.add_argument(
        "--train-gpus",
        type=int,
        default=1,
        help="GPUs per train node (gpu profile); more than 1 runs one training process per GPU.",
    )
    comp.add_argument(
        "--train-nodes",
        type=int,
        default=1,
        help="Train nodes (gpu profile); more than 1 runs a Kubeflow Trainer TrainJob (torch-distributed "
        "runtime) with a ReadWriteMany PVC 'tgrl-train' shared by the nodes.",
    )
    comp.add_argument(
        "--train-strategy",
        choices=("fsdp", "ddp"),
        default="fsdp",
        help="Multi-GPU training: fsdp (FSDP2: weights and optimizer sharded) or ddp (a copy per GPU).",
    )
    comp.add_argument("--require-digest", action="store_true", help="Refuse images not pinned by digest.")
    comp.add_argument(
        "--pipeline", action="append", choices=PIPELINE_NAMES, help="Compile only this one (repeatable)."
    )
    comp.set_defaults(func=_compile)


def _register_submit(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser(
        "submit",
        help="Start one run of a pipeline on a Kubeflow Pipelines backend now (see `tgrl schedule`).",
        description="Compile the pipeline (--profile, images) and start one run with the recipe's YAML as "
        "its config parameter, in an experiment. For recurring runs use `tgrl schedule create`.",
    )
    submit.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow:8888"
    )
    submit.add_argument("--namespace", help="Kubernetes namespace (multi-user KFP only).")
    submit.add_argument("--config", help="Recipe YAML passed as the config parameter (validated first).")
    submit.add_argument("--pipeline", default="tgrl_pipeline", choices=PIPELINE_NAMES, help="Which pipeline.")
    submit.add_argument("--name", help="Run name (default: <pipeline>-<recipe name>).")
    submit.add_argument("--experiment", default="tgrl", help="KFP experiment (created if absent).")
    submit.add_argument("--profile", choices=("cpu", "gpu"), default="cpu", help="Resource profile.")
    submit.add_argument("--image", help="CPU image reference.")
    submit.add_argument("--cuda-image", help="CUDA image reference (gpu profile).")
    submit.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="Pipeline parameter (repeatable)."
    )
    submit.set_defaults(func=_submit)


def _run(args: argparse.Namespace) -> int:
    from tgrl_lib.mlops.local_run import run_local

    config = args.config
    if config is None and Path("configs/tiny-cpu.yaml").is_file():
        config = "configs/tiny-cpu.yaml"
    run_local(
        config,
        work_dir=args.work_dir,
        overrides=args.overrides,
        pipeline=args.pipeline,
        base_model=args.base_model,
    )
    return 0


def _submit(args: argparse.Namespace) -> int:
    from tgrl_lib.commands.schedule import _params
    from tgrl_lib.mlops import scheduling
    from tgrl_lib.mlops.submission import submit_run

    name = args.name or f"{args.pipeline}-{Path(args.config).stem if args.config else 'defaults'}"
    spec = scheduling.ScheduleSpec(
        name=name, cron="", pipeline=args.pipeline, config_path=args.config, experiment=args.experiment,
        profile=args.profile, image=args.image, cuda_image=args.cuda_image, params=_params(args.param),
    )  # fmt: skip
    with scheduling.api_errors(args.host):
        client = scheduling.connect(args.host, args.namespace)
        run = submit_run(client, spec, args.namespace)
    print(f"started run {run.run_id} ({name!r}) of {args.pipeline} on {args.host}")
    return 0


def _compile(args: argparse.Namespace) -> int:
    from tgrl_lib.errors import TgrlError
    from tgrl_lib.kfp_pipelines.compile import compile_pipeline, make_placement

    try:
        placement = make_placement(
            args.profile,
            args.image,
            args.cuda_image,
            args.train_gpus,
            require_digest=args.require_digest,
            train_nodes=args.train_nodes,
            train_strategy=args.train_strategy,
        )
    except ValueError as err:
        raise TgrlError(str(err)) from None
    out = Path(args.out)
    for name in args.pipeline or PIPELINE_NAMES:
        path = compile_pipeline(name, out / f"{name}.yaml", placement)
        print(f"wrote {path}")
    return 0
