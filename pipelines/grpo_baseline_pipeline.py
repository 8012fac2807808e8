"""The GRPO baseline: the TGRL pipeline without experts, for comparison at equal budget.

prepare data -> init model -> train (`algorithm="grpo"`, no expert dataset) -> evaluate -> register +
gate -> (only if promoted) export. Same recipe, same components, same MLflow experiment; the model is
registered under its own name (default `<promote.model_name>-grpo`, set by `model_name`) so the baseline
never competes with TGRL for the `champion` alias. Imports: stdlib and kfp only.
"""

from kfp import dsl
from tgrl_lib.kfp_components.init_model import init_model
from tgrl_lib.kfp_components.prepare_data import prepare_data
from tgrl_lib.kfp_components.train import train
from tgrl_lib.kfp_pipelines.placement import Placement
from tgrl_lib.kfp_pipelines.tail import TrainedOutputs, evaluate_and_gate

NAME = "tgrl-grpo-baseline"
BASELINE_SUFFIX = "-grpo"


def build_grpo_baseline_pipeline(placement: Placement | None = None):
    """The GRPO baseline pipeline for `placement` (default: CPU profile)."""
    placement = placement or Placement()
    default_base = "tiny" if placement.profile == "cpu" else ""

    @dsl.pipeline(
        name=NAME,
        description="Baseline for TGRL: plain GRPO on the same data and model, no expert trajectories.",
    )
    def grpo_baseline_pipeline(
        config: str = "", base_model: str = default_base, model_name: str = ""
    ) -> TrainedOutputs:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        data = placement.apply(prepare_data(config=config, pipeline_run_id=run_id), "prepare_data")
        policy = placement.apply(
            init_model(config=config, pipeline_run_id=run_id, base_model=base_model), "init_model"
        ).after(data)
        trained = placement.apply(
            train(
                config=config,
                pipeline_run_id=run_id,
                base_model=policy.outputs["model"],
                problems=data.outputs["train_problems"],
                algorithm="grpo",
            ),
            "train",
        )
        return evaluate_and_gate(
            placement,
            config=config,
            run_id=run_id,
            checkpoint=trained.outputs["checkpoint"],
            start_checkpoint=policy.outputs["model"],
            train_problems=data.outputs["train_problems"],
            test_problems=data.outputs["test_problems"],
            model_name=model_name,
            name_suffix=BASELINE_SUFFIX,
        )

    return grpo_baseline_pipeline


grpo_baseline_pipeline = build_grpo_baseline_pipeline()
