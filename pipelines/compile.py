"""Compile the pipelines to KFP IR YAML: `tgrl pipeline compile --out DIR [--profile gpu] [--image REF]
[--train-gpus N] [--train-nodes M]`.

`PIPELINES` maps each pipeline's Python name to its factory; a factory takes a `Placement` (profile and
images), so the same graph compiles for CPU or GPU node pools and for digest-pinned images. Imports:
stdlib and kfp only.
"""

from pathlib import Path

from kfp import compiler
from tgrl_lib.kfp_components.images import TGRL_CUDA_IMAGE, TGRL_IMAGE, check_image_ref
from tgrl_lib.kfp_pipelines.eval_pipeline import build_eval_pipeline
from tgrl_lib.kfp_pipelines.grpo_baseline_pipeline import build_grpo_baseline_pipeline
from tgrl_lib.kfp_pipelines.placement import Placement
from tgrl_lib.kfp_pipelines.tgrl_pipeline import build_tgrl_pipeline

PIPELINES = {
    "tgrl_pipeline": build_tgrl_pipeline,
    "grpo_baseline_pipeline": build_grpo_baseline_pipeline,
    "eval_pipeline": build_eval_pipeline,
}


def make_placement(
    profile: str = "cpu",
    image: str | None = None,
    cuda_image: str | None = None,
    train_gpus: int = 1,
    require_digest: bool = False,
    train_nodes: int = 1,
    train_strategy: str = "fsdp",
) -> Placement:
    """A validated `Placement`; `image`/`cuda_image` default to `components/images.py`. `train_gpus` is
    per node; more than one GPU or node launches one training process per GPU (`placement.py`)."""
    image = check_image_ref(image or TGRL_IMAGE, require_digest=require_digest)
    cuda_image = check_image_ref(cuda_image or TGRL_CUDA_IMAGE, require_digest=require_digest)
    return Placement(
        profile=profile,
        image=image,
        cuda_image=cuda_image,
        train_gpus=train_gpus,
        train_nodes=train_nodes,
        train_strategy=train_strategy,
    )


def build(name: str, placement: Placement | None = None):
    """The pipeline `name` (a key of `PIPELINES`) built for `placement`."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}: choose one of {', '.join(PIPELINES)}")
    return PIPELINES[name](placement)


def compile_pipeline(name: str, path: Path | str, placement: Placement | None = None) -> Path:
    """Compile one pipeline to `path` (YAML); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(name, placement), str(path))
    return path
