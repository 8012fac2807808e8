"""The TGRL pipeline: prepare data -> init model -> generate experts -> filter -> cold start (SFT on the
kept experts; `cold_start.steps: 0` passes the base model through) -> train (TGRL from that checkpoint) ->
evaluate the start and the trained checkpoint -> register + gate -> (only if promoted) export the champion.

The evaluate-and-gate tail is `tail.evaluate_and_gate`, shared with the GRPO baseline. Built by a factory
so a profile (`cpu`/`gpu`) and images are chosen at compile time; `tgrl_pipeline` is the CPU build.
Imports: stdlib and kfp only.
"""

from kfp import dsl
from tgrl_lib.kfp_components.cold_start import cold_start
from tgrl_lib.kfp_components.filter_trajectories import filter_trajectories
from tgrl_lib.kfp_components.generate import generate
from tgrl_lib.kfp_components.init_model import init_model
from tgrl_lib.kfp_components.prepare_data import prepare_data
from tgrl_lib.kfp_components.train import train
from tgrl_lib.kfp_pipelines.placement import Placement
from tgrl_lib.kfp_pipelines.tail import TrainedOutputs, evaluate_and_gate

NAME = "tgrl-pipeline"


def build_tgrl_pipeline(placement: Placement | None = None):
    """The TGRL pipeline for `placement` (default: CPU profile, images from `components/images.py`)."""
    placement = placement or Placement()
    default_base = "tiny" if placement.profile == "cpu" else ""

    @dsl.pipeline(
        name=NAME,
        description="TGRL: data, expert trajectories, filtering, cold-start SFT, RL with expert guidance, "
        "evaluation and gated promotion in the MLflow registry.",
    )
    def tgrl_pipeline(
        config: str = "", base_model: str = default_base, model_name: str = ""
    ) -> TrainedOutputs:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        data = placement.apply(prepare_data(config=config, pipeline_run_id=run_id), "prepare_data")
        policy = placement.apply(
            init_model(config=config, pipeline_run_id=run_id, base_model=base_model), "init_model"
        ).after(data)  # after: the first step creates the MLflow parent run, the others find it
        experts = placement.apply(
            generate(config=config, pipeline_run_id=run_id, problems=data.outputs["train_problems"]),
            "generate",
        )
        kept = placement.apply(
            filter_trajectories(
                config=config,
                pipeline_run_id=run_id,
                trajectories=experts.outputs["trajectories"],
                problems=data.outputs["train_problems"],
                policy=policy.outputs["model"],
            ),
            "filter_trajectories",
        )
        start = placement.apply(
            cold_start(
                config=config,
                pipeline_run_id=run_id,
                base_model=policy.outputs["model"],
                problems=data.outputs["train_problems"],
                experts=kept.outputs["kept"],
            ),
            "cold_start",
        )
        trained = placement.apply(
            train(
                config=config,
                pipeline_run_id=run_id,
                base_model=start.outputs["checkpoint"],
                problems=data.outputs["train_problems"],
                experts=kept.outputs["kept"],
            ),
            "train",
        )
        return evaluate_and_gate(
            placement,
            config=config,
            run_id=run_id,
            checkpoint=trained.outputs["checkpoint"],
            start_checkpoint=start.outputs["checkpoint"],
            train_problems=data.outputs["train_problems"],
            test_problems=data.outputs["test_problems"],
            model_name=model_name,
        )

    return tgrl_pipeline


tgrl_pipeline = build_tgrl_pipeline()
