"""KFP component: register the checkpoint and run the promotion gate
(`tgrl_lib.steps.register_and_promote`). Its single boolean output is the pipeline's `dsl.If` gate."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Model, Output
from tgrl_lib.kfp_components.images import TGRL_IMAGE


@dsl.component(base_image=TGRL_IMAGE, install_kfp_package=False)
def register_and_promote(
    config: str,
    pipeline_run_id: str,
    checkpoint: Input[Model],
    eval_results: Input[Artifact],
    registered: Output[Model],
    report: Output[HTML],
    baseline_results: Input[Artifact] = None,
    model_name: str = "",
    name_suffix: str = "",
) -> bool:
    """Register `checkpoint` as a model version with its eval metrics; move `champion` if the gate passes.
    Name: `model_name`, else the recipe's `promote.model_name` + `name_suffix`. `registered` carries the
    version and the decision as metadata. `baseline_results`: the start checkpoint's evaluation, the
    reference of a first version. `report`: the run's report.html. Returns whether it was promoted."""
    from tgrl_lib import steps

    out = steps.register_and_promote(
        config,
        pipeline_run_id,
        checkpoint.path,
        eval_results.path,
        registered.path,
        model_name,
        name_suffix,
        baseline_results.path if baseline_results is not None else "",
        report.path,
    )
    registered.metadata.update(out)
    return bool(out["promoted"])
