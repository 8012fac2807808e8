"""KFP component: the cold-start SFT stage before RL (`tgrl_lib.steps.cold_start`); with the recipe's
`cold_start.steps: 0` the base model passes through."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output
from tgrl_lib.kfp_components.images import TGRL_IMAGE


@dsl.component(base_image=TGRL_IMAGE, install_kfp_package=False)
def cold_start(
    config: str,
    pipeline_run_id: str,
    base_model: Input[Model],
    problems: Input[Dataset],
    experts: Input[Dataset],
    checkpoint: Output[Model],
    metrics: Output[Metrics],
) -> int:
    """SFT from `base_model` on the filtered `experts`; returns the updates done (0: passed through)."""
    from tgrl_lib import steps

    out = steps.cold_start(
        config, pipeline_run_id, base_model.path, problems.path, experts.path, checkpoint.path
    )
    for key, value in out.items():
        metrics.log_metric(key, value)
    return int(out["steps_done"])
