"""KFP component: RL training, sft | grpo | tgrl in one loop (`tgrl_lib.steps.train`). Compiled for several
GPUs or nodes, the step launches the loop itself (`accelerate launch`, or a Kubeflow TrainJob): see
`pipelines/placement.py` and `tgrl_lib/rl/launcher.py`."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output
from tgrl_lib.kfp_components.images import TGRL_IMAGE


@dsl.component(base_image=TGRL_IMAGE, install_kfp_package=False)
def train(
    config: str,
    pipeline_run_id: str,
    base_model: Input[Model],
    problems: Input[Dataset],
    checkpoint: Output[Model],
    metrics: Output[Metrics],
    experts: Input[Dataset] = None,
    algorithm: str = "",
) -> int:
    """Train from `base_model` on `problems` (+ `experts` when given); `algorithm` overrides the recipe's.
    Returns the number of optimizer steps done."""
    from tgrl_lib import steps

    experts_dir = experts.path if experts is not None else ""
    out = steps.train(
        config, pipeline_run_id, base_model.path, problems.path, experts_dir, checkpoint.path, algorithm
    )
    for key, value in out.items():
        metrics.log_metric(key, value)
    return int(out["steps_done"])
