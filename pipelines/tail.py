"""The tail every training pipeline shares: evaluate the trained checkpoint and the start checkpoint (same
evaluation) -> register + gate (given both results) -> (only if promoted) export the champion.

The gate is explicit in the graph: `register_and_promote` returns one boolean (`Output`), and
`export_champion` sits in a `dsl.If(... == True)` group, so the compiled spec carries the condition
`inputs.parameter_values['pipelinechannel--register-and-promote-Output'] == true` (a single-output task:
kfp.local resolves conditions on `Output` only). Imports: stdlib and kfp only.
"""

from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Model
from tgrl_lib.kfp_components.evaluate import evaluate
from tgrl_lib.kfp_components.export_champion import export_champion
from tgrl_lib.kfp_components.register_and_promote import register_and_promote
from tgrl_lib.kfp_pipelines.placement import Placement


class TrainedOutputs(NamedTuple):
    """What a training pipeline returns."""

    checkpoint: Model
    report: HTML
    eval_results: Artifact
    registered: Model
    promoted: bool


def evaluate_and_gate(
    placement: Placement,
    *,
    config: Any,
    run_id: Any,
    checkpoint: Any,
    start_checkpoint: Any,
    train_problems: Any,
    test_problems: Any,
    model_name: Any,
    name_suffix: str = "",
) -> TrainedOutputs:
    """Add the evaluate (trained and start checkpoint) -> register_and_promote -> If(promoted):
    export_champion tasks for `checkpoint`."""
    scored = placement.apply(
        evaluate(
            config=config,
            pipeline_run_id=run_id,
            checkpoint=checkpoint,
            problems=test_problems,
            train_problems=train_problems,
        ),
        "evaluate",
    )
    baseline = placement.apply(
        evaluate(
            config=config,
            pipeline_run_id=run_id,
            checkpoint=start_checkpoint,
            problems=test_problems,
            stage="evaluate_start",
        ),
        "evaluate_start",
    ).set_display_name("evaluate-start")
    gate = placement.apply(
        register_and_promote(
            config=config,
            pipeline_run_id=run_id,
            checkpoint=checkpoint,
            eval_results=scored.outputs["results"],
            baseline_results=baseline.outputs["results"],
            model_name=model_name,
            name_suffix=name_suffix,
        ),
        "register_and_promote",
    )
    with dsl.If(gate.outputs["Output"] == True, name="promoted"):  # noqa: E712 (KFP builds a condition)
        placement.apply(
            export_champion(
                config=config,
                pipeline_run_id=run_id,
                checkpoint=checkpoint,
                registered=gate.outputs["registered"],
            ),
            "export_champion",
        )
    return TrainedOutputs(
        checkpoint=checkpoint,
        report=gate.outputs["report"],
        eval_results=scored.outputs["results"],
        registered=gate.outputs["registered"],
        promoted=gate.outputs["Output"],
    )
