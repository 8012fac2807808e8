"""KFP component: evaluate a checkpoint on the held-out problems (`tgrl_lib.steps.evaluate`)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output
from tgrl_lib.kfp_components.images import TGRL_IMAGE


@dsl.component(base_image=TGRL_IMAGE, install_kfp_package=False)
def evaluate(
    config: str,
    pipeline_run_id: str,
    checkpoint: Input[Model],
    problems: Input[Dataset],
    results: Output[Artifact],
    report: Output[HTML],
    metrics: Output[Metrics],
    stage: str = "evaluate",
    train_problems: Input[Dataset] = None,
) -> float:
    """Write results.json, report.md and plots to `results`, the report to `report`; returns the primary
    metric (mean over benchmarks). `stage` names the MLflow child run (`evaluate_start`: the start model);
    with `train_problems` the blind prior is written beside the results."""
    from tgrl_lib import steps

    train_dir = train_problems.path if train_problems is not None else ""
    out = steps.evaluate(
        config, pipeline_run_id, checkpoint.path, problems.path, results.path, report.path, stage, train_dir
    )
    for key, value in out.items():
        metrics.log_metric(key, value)
    return float(out["primary"])
