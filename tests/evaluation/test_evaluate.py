"""`evaluation.evaluate` and `tgrl eval` end to end.

- Scoring through `evaluate()` with a scripted backend that returns hand-built right, wrong and malformed
  responses: exact accuracy, pass@k, format rate, length, grounding, per family, in every output file.
- The real tiny VLM: report files, groups, k-sample draws, `limit`, batched greedy = one-by-one greedy.
- Refusals (no benchmark, empty dataset, no manifest, unreadable rows) and the CLI.
- Integration (slow): a real `mlflow server` with artifacts on a real S3 endpoint (moto); eval of an
  untrained and an SFT-trained tiny model logged to MLflow, registered, gated; the champion answers like
  the checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tgrl_lib.cli import main as tgrl
from tgrl_lib.config import EvalConfig
from tgrl_lib.data.schema import DatasetWriter, Problem
from tgrl_lib.errors import TgrlError
from tgrl_lib.evaluation.run import evaluate, flat_metrics
from tgrl_lib.generation.base import Completion

PNG = b"\x89PNG\r\n\x1a\n"
SHAPES = {  # 2 small red circles, 1 large blue square
    "kind": "shapes", "width": 56, "height": 56, "bars": [],
    "objects": [
        {"shape": "circle", "color": "red", "size": "small", "center": [10, 10], "bbox": [6, 6, 14, 14],
         "px": 8},
        {"shape": "circle", "color": "red", "size": "small", "center": [30, 10], "bbox": [26, 6, 34, 14],
         "px": 8},
        {"shape": "square", "color": "blue", "size": "large", "center": [30, 40], "bbox": [22, 32, 38, 48],
         "px": 16},
    ],
}  # fmt: skip
BARS = {  # bar A red = 3, bar B blue = 5
    "kind": "bar_chart", "width": 56, "height": 56, "objects": [],
    "axis": {"bottom": 51, "left": 8, "max_value": 5, "unit": 9},
    "bars": [
        {"color": "red", "label": "A", "value": 3, "bbox": [9, 24, 20, 51]},
        {"color": "blue", "label": "B", "value": 5, "bbox": [30, 6, 41, 51]},
    ],
}  # fmt: skip
HAND_BUILT = [
    Problem(id="p1", image="images/p1.png", question="How many red shapes are there?", answer="2",
            answer_type="integer", facts=SHAPES, meta={"family": "count"}),
    Problem(id="p2", image="images/p2.png", question="Which bar is the tallest?", answer="blue",
            answer_type="multiple_choice", choices=["red", "blue"], facts=BARS, meta={"family": "chart"}),
    Problem(id="p3", image="images/p3.png", question="What number is written?", answer="7",
            answer_type="integer", meta={"category": "reading"}),  # no facts, category instead of family
]  # fmt: skip
# question -> k=2 responses as (text, token count; 0 = the backend does not know the tokens)
RESPONSES = {
    "How many red shapes are there?": [
        # right, formatted, states 3 facts, all true
        ("<think>I see 2 red circles, 1 blue square. Red shapes: 2.</think><answer>2</answer>", 20),
        ("<think>I see 3 red circles.</think><answer>3</answer>", 8),  # wrong; 1 fact stated, false
    ],
    "Which bar is the tallest?": [
        ("The answer is blue.", 5),  # right answer, malformed (no tags); states nothing
        ("<think>The bars are: red=3, blue=4.</think><answer>(A)</answer>", 15),  # wrong; 2 stated, 1 true
    ],
    "What number is written?": [
        ("<answer>7</answer>", 0),  # right, malformed (no <think>); lengths fall back to words: 1
        ("<think>7</think><answer>", 0),  # malformed and no answer; 1 word
    ],
}


class ScriptedBackend:
    """A `GenerationBackend` answering each prompt with the scripted responses of its question."""

    name = "scripted"

    def __init__(self, responses: dict[str, list[tuple[str, int]]]):
        self.responses = responses
        self.calls: list[dict] = []

    def generate(self, prompts, images, *, samples, temperature, max_new_tokens, seed=None):
        self.calls.append({"prompts": list(prompts), "images": list(images), "seed": seed})
        out = []
        for prompt in prompts:
            (question,) = [q for q in self.responses if q in prompt]
            scripted = self.responses[question]
            assert len(scripted) == samples
            out.append([Completion(text, token_ids=tuple(range(n))) for text, n in scripted])
        return out


def write_problems(root: Path, problems: list[Problem], *, missing_images: bool = False) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), "white").save(buffer, format="PNG")
    with DatasetWriter(root, "problems") as writer:
        if not missing_images:
            for problem in problems:
                writer.add_image(problem.image, buffer.getvalue())
        writer.write(problems)
    return root


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory) -> Path:
    return write_problems(tmp_path_factory.mktemp("hand") / "bench", HAND_BUILT)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """8 synthetic test problems (2 per family), with facts."""
    from tgrl_lib.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("synthetic") / "test"
    synthesize(root, n=8, seed=3, split="test")
    return root


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------- scoring, hand-built
def test_hand_built_responses_are_scored_exactly(hand_built, tiny_model_dir, tmp_path):
    backend = ScriptedBackend(RESPONSES)
    config = EvalConfig(samples=2, sampling={"batch_size": 2}, seed=10)
    payload = evaluate(tiny_model_dir, {"hand": hand_built}, config, tmp_path / "out", backend=backend)

    overall = payload["benchmarks"]["hand"]["overall"]
    assert overall == pytest.approx({
        "count": 3.0,
        "accuracy": 3 / 6,  # one right sample per problem
        "pass@2": 1.0,  # every problem has a right sample among its 2
        "format_rate": 3 / 6,  # p1 both, p2 the second; p3 neither
        "length_mean": (20 + 8 + 5 + 15 + 1 + 1) / 6,  # tokens for p1, p2; words for p3
        "grounding": (3 + 0 + 0 + 1) / (3 + 1 + 0 + 2),  # true / stated over p1, p2 (p3 has no facts)
        "facts_stated_mean": 6 / 4,
    })  # fmt: skip
    groups = payload["benchmarks"]["hand"]["groups"]
    assert sorted(groups) == ["chart", "count", "reading"]
    assert groups["count"] == pytest.approx({
        "count": 1.0, "accuracy": 0.5, "pass@2": 1.0, "format_rate": 1.0, "length_mean": 14.0,
        "grounding": 3 / 4, "facts_stated_mean": 2.0,
    })  # fmt: skip
    assert groups["chart"]["grounding"] == 0.5 and groups["chart"]["format_rate"] == 0.5
    assert "grounding" not in groups["reading"] and groups["reading"]["accuracy"] == 0.5

    # prompts: the tiny model's chat template, question and image slot; batches of 2; seed + offset
    assert [(len(c["prompts"]), c["seed"]) for c in backend.calls] == [(2, 10), (1, 12)]
    first = backend.calls[0]["prompts"][0]
    assert "How many red shapes are there?" in first and first.count("<|image_pad|>") == 1
    assert first.rstrip().endswith("assistant")
    assert all(image.size == (56, 56) for c in backend.calls for image in c["images"])

    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(payload))
    rows = read_samples(out / "samples_hand.jsonl")
    assert [r["problem_id"] for r in rows] == ["p1", "p2", "p3"]
    assert [[s["correct"] for s in r["samples"]] for r in rows] == [[True, False]] * 3
    assert [s["text"] for s in rows[1]["samples"]] == [t for t, _ in RESPONSES["Which bar is the tallest?"]]
    assert (rows[0]["samples"][0]["stated"], rows[0]["samples"][0]["true_facts"]) == (3, 3)
    report = (out / "report.md").read_text()
    assert "| hand | (overall) | 3 | 0.500 | 1.000 | 0.500 | 8.333 | 0.667 | 1.500 |" in report
    reading = report.split("| hand | reading | ")[1].splitlines()[0]
    assert reading.endswith("| 0.500 | 1.000 | 0.000 | 1.000 | - | - |")  # no grounding without facts
    for plot in ("accuracy.png", "accuracy_vs_grounding.png"):
        assert (out / plot).read_bytes().startswith(PNG)
    assert flat_metrics(payload["benchmarks"])["hand.pass@2"] == 1.0


def test_limit_and_stale_outputs(hand_built, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    config = EvalConfig(samples=2, limit=2)
    backend = ScriptedBackend(RESPONSES)
    payload = evaluate(tiny_model_dir, {"hand": hand_built}, config, out, backend=backend)
    assert payload["benchmarks"]["hand"]["overall"]["count"] == 2 and payload["meta"]["limit"] == 2
    assert sum(len(c["prompts"]) for c in backend.calls) == 2
    assert (out / "accuracy_vs_grounding.png").exists()

    # again into the same directory, a benchmark without facts: the earlier run's files are gone
    plain = write_problems(tmp_path / "plain", HAND_BUILT[2:])
    payload = evaluate(tiny_model_dir, {"plain": plain}, EvalConfig(samples=2), out, backend=backend)
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png", "report.md", "results.json", "samples_plain.jsonl"
    ]  # fmt: skip
    assert list(payload["benchmarks"]) == ["plain"]


def test_refusals_name_the_problem(hand_built, tiny_model_dir, tmp_path):
    config = EvalConfig()
    backend = ScriptedBackend(RESPONSES)
    with pytest.raises(TgrlError, match="nothing to evaluate"):
        evaluate(tiny_model_dir, {}, config, tmp_path / "o", backend=backend)
    empty = write_problems(tmp_path / "empty", [])
    with pytest.raises(TgrlError, match=re.escape(f"{empty}: benchmark 'e' has no problems")):
        evaluate(tiny_model_dir, {"e": empty}, config, tmp_path / "o", backend=backend)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "records.jsonl").write_text("")
    with pytest.raises(TgrlError, match="^" + re.escape(f"{bare}: no manifest.json")):
        evaluate(tiny_model_dir, {"ok": hand_built, "b": bare}, config, tmp_path / "o", backend=backend)
    broken = write_problems(tmp_path / "broken", HAND_BUILT[:1], missing_images=True)
    with pytest.raises(TgrlError, match=r"benchmark 'x': 1 problem row\(s\) are unreadable"):
        evaluate(tiny_model_dir, {"x": broken}, config, tmp_path / "o", backend=backend)
    with pytest.raises(TgrlError, match="would share samples_a_b"):
        evaluate(
            tiny_model_dir, {"a/b": hand_built, "a_b": hand_built}, config, tmp_path / "o", backend=backend
        )
    assert backend.calls == [] and not (tmp_path / "o").exists()  # refused before generating or writing


# --------------------------------------------------------------------------------- tiny model
def test_tiny_model_report_files_and_groups(synthetic, hand_built, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    config = EvalConfig(sampling={"max_new_tokens": 12, "batch_size": 4})
    payload = evaluate(tiny_model_dir, {"synthetic": synthetic, "hand": hand_built}, config, out)

    meta = payload["meta"]
    assert meta["backend"] == "hf" and meta["samples"] == 1 and meta["temperature"] == 0.0
    assert set(meta["seconds"]) == set(meta["datasets"]) == {"synthetic", "hand"}
    assert (
        meta["datasets"]["synthetic"]
        == hashlib.sha256((synthetic / "manifest.json").read_bytes()).hexdigest()
    )
    result = payload["benchmarks"]["synthetic"]
    families = {"bar_chart", "count_color_arith", "largest_attribute", "spatial"}
    assert set(result["groups"]) == families and all(g["count"] == 2 for g in result["groups"].values())
    assert set(result["overall"]) == {
        "count", "accuracy", "pass@1", "format_rate", "length_mean", "grounding", "facts_stated_mean",
        "evidence_use", "evidence_derivable",
    }  # fmt: skip
    assert 0 < result["overall"]["length_mean"] <= 12  # token counts, capped by max_new_tokens
    assert result["overall"]["accuracy"] == result["overall"]["pass@1"]  # greedy, k = 1

    rows = read_samples(out / "samples_synthetic.jsonl")
    assert len(rows) == 8 and all(len(r["samples"]) == 1 for r in rows)
    assert all(1 <= s["length"] <= 12 and isinstance(s["text"], str) for r in rows for s in r["samples"])
    report = (out / "report.md").read_text()
    assert report.startswith(f"# Evaluation of `{tiny_model_dir}`")
    assert all(f"| synthetic | {f} |" in report for f in families) and "| hand | (overall) |" in report
    assert (out / "accuracy.png").read_bytes().startswith(PNG)
    assert (out / "accuracy_vs_grounding.png").read_bytes().startswith(PNG)


@pytest.fixture(scope="module")
def scrambled_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its matrices redrawn at std 0.1: the untrained one answers every prompt with
    the same newlines, this one answers each prompt differently (and amplifies numeric noise)."""
    import torch

    from tgrl_lib.models.policy import load_policy, save_policy

    policy = load_policy(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in policy.model.parameters():
            if weight.dim() >= 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return save_policy(policy, None, tmp_path_factory.mktemp("scrambled") / "model")


def test_batched_greedy_equals_one_by_one(synthetic, scrambled_model, tmp_path):
    """Left padding with the attention mask (Qwen2.5-VL's rope index skips the pads) leaves greedy
    answers unchanged: one batch of 8 prompts of different lengths and 8 batches of 1 give the same
    tokens (fp32, CPU)."""
    runs = {}
    for batch in (8, 1):
        config = EvalConfig(sampling={"max_new_tokens": 32, "batch_size": batch})
        evaluate(scrambled_model, {"s": synthetic}, config, tmp_path / f"b{batch}")
        runs[batch] = [
            [(s["text"], s["length"]) for s in r["samples"]]
            for r in read_samples(tmp_path / f"b{batch}" / "samples_s.jsonl")
        ]
    assert runs[8] == runs[1]
    assert len({texts[0][0] for texts in runs[8]}) == 8  # a different answer to every prompt


def test_k_samples_with_temperature(synthetic, tiny_model_dir, tmp_path):
    config = EvalConfig(
        samples=3, sampling={"temperature": 1.0, "max_new_tokens": 8, "batch_size": 4}, seed=7, limit=4
    )
    first = evaluate(tiny_model_dir, {"s": synthetic}, config, tmp_path / "a")
    rows = read_samples(tmp_path / "a" / "samples_s.jsonl")
    assert len(rows) == 4 and all(len(r["samples"]) == 3 for r in rows)
    assert any(len({s["text"] for s in r["samples"]}) > 1 for r in rows)  # sampled, not greedy copies
    overall = first["benchmarks"]["s"]["overall"]
    assert "pass@3" in overall and overall["pass@3"] >= overall["accuracy"]
    again = evaluate(tiny_model_dir, {"s": synthetic}, config, tmp_path / "b")
    assert read_samples(tmp_path / "b" / "samples_s.jsonl") == rows  # seeded: the same draws
    other = evaluate(tiny_model_dir, {"s": synthetic}, config.model_copy(update={"seed": 8}), tmp_path / "c")
    assert read_samples(tmp_path / "c" / "samples_s.jsonl") != rows
    assert again["benchmarks"] == first["benchmarks"] and other["meta"]["seed"] == 8


# ------------------------------------------------------------------------------------------ CLI
def test_cli_eval(synthetic, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["eval", "--model", str(tiny_model_dir), "--benchmark", f"syn={synthetic}", "--out", str(out),
            "--limit", "3", "--max-new-tokens", "6", "--set", "sampling.batch_size=2"]  # fmt: skip
    assert tgrl(argv) == 0
    printed = capsys.readouterr().out
    assert "| syn | (overall) | 3 |" in printed and f"tgrl eval: report in {out}/report.md" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["max_new_tokens"] == 6 and results["meta"]["batch_size"] == 2

    assert tgrl(["eval", "--model", str(tiny_model_dir), "--benchmark", "foo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("tgrl eval: error: --benchmark 'foo' must be NAME=DIR") and len(err.splitlines()) == 1
    )
    missing = tmp_path / "nowhere"
    assert (
        tgrl(["eval", "--model", str(tiny_model_dir), "--benchmark", f"x={missing}", "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert f"{missing}: dataset directory does not exist" in err and len(err.splitlines()) == 1


# -------------------------------------------------------------------------------- integration
def sft_overfit(model_dir: Path, problems_dir: Path, out: Path) -> Path:
    """The tiny model trained (sft, 60 steps) on oracle answers to the benchmark's own problems: a model
    that is genuinely better on that benchmark, in ~15 s."""
    from tgrl_lib.config import TrainConfig
    from tgrl_lib.data.schema import Trajectory, load_dataset, write_dataset
    from tgrl_lib.generation.oracle import oracle_response
    from tgrl_lib.rl.trainer import train

    problems = load_dataset(problems_dir, "problems").records
    experts = [Trajectory(problem_id=p.id, source="expert:oracle", text=oracle_response(p)) for p in problems]
    write_dataset(out / "experts", "trajectories", experts)
    config = TrainConfig.model_validate({
        "algorithm": "sft", "model": str(model_dir), "output_dir": str(out / "run"), "lr": 3e-3,
        "steps": 60, "problems_per_step": len(problems), "sampling": {"max_new_tokens": 48},
        "weighting": {"kind": "none"}, "checkpoint_every": 1000,
    })  # fmt: skip
    return Path(train(config, problems_dir=problems_dir, experts_dir=out / "experts").final_dir)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_logged_registered_gated_and_champion_answers_like_the_checkpoint(
    mlflow_server, s3_env, tiny_model_dir, tmp_path, monkeypatch
):
    import mlflow
    from mlflow import MlflowClient

    from tgrl_lib.config import TrackingConfig
    from tgrl_lib.data.synthetic import synthesize
    from tgrl_lib.mlops.promotion import promote
    from tgrl_lib.mlops.registry import generate_answers, load_champion, register_checkpoint
    from tgrl_lib.mlops.tracking import Tracker
    from tgrl_lib.models.policy import load_policy
    from tgrl_lib.store.s3 import s3_client

    monkeypatch.setenv("TGRL_CACHE_DIR", str(tmp_path / "cache"))
    bench = tmp_path / "bench"
    synthesize(bench, n=8, seed=1, split="test", difficulties=["easy"])
    trained = sft_overfit(Path(tiny_model_dir), bench, tmp_path / "sft")
    config = EvalConfig(sampling={"max_new_tokens": 64, "batch_size": 8})
    tracker = Tracker(
        TrackingConfig(
            tracking_uri=mlflow_server, experiment=f"eval-{uuid.uuid4().hex[:8]}", system_metrics=False
        )
    )
    name, pipeline_run = f"eval-gate-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex

    def eval_and_register(model: Path, label: str) -> tuple[dict, str, str]:
        out = tmp_path / f"eval-{label}"
        with tracker.step_run(pipeline_run, f"evaluate-{label}") as run:
            results = evaluate(model, {"synthetic": bench}, config, out)
            run.log_metrics(flat_metrics(results["benchmarks"]))
            run.log_artifacts(sorted(out.iterdir()), "eval")
            version = register_checkpoint(model, name, run.run_id, results, tracking_uri=mlflow_server)
        return results, version.version, run.run_id

    untrained, v1, run1 = eval_and_register(Path(tiny_model_dir), "untrained")
    better, v2, run2 = eval_and_register(trained, "trained")
    acc = {
        k: r["benchmarks"]["synthetic"]["overall"]["accuracy"] for k, r in [("u", untrained), ("t", better)]
    }
    assert acc["t"] >= 0.5 and acc["t"] > acc["u"] + 0.05, acc  # max_regression 0.05: a real gap
    # the trained model stops at different lengths: batched greedy (rows finishing early) = one by one
    batched = read_samples(tmp_path / "eval-trained" / "samples_synthetic.jsonl")
    assert len({s["length"] for r in batched for s in r["samples"]}) > 1
    single = config.model_copy(update={"batch_size": 1})
    evaluate(trained, {"synthetic": bench}, single, tmp_path / "eval-single")
    assert read_samples(tmp_path / "eval-single" / "samples_synthetic.jsonl") == batched

    client = MlflowClient(mlflow_server)
    logged = client.get_run(run2).data.metrics
    assert logged["synthetic.accuracy"] == acc["t"] and "synthetic.grounding" in logged
    keys = [
        obj["Key"]
        for page in s3_client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=s3_env["bucket"], Prefix="mlflow/")
        for obj in page.get("Contents", [])
    ]
    for run_id in (run1, run2):
        for artifact in ("results.json", "report.md", "accuracy.png", "samples_synthetic.jsonl"):
            assert any(run_id in k and k.endswith(f"eval/{artifact}") for k in keys), (run_id, artifact)
    assert client.get_model_version(name, v2).tags["eval.synthetic.accuracy"] == repr(acc["t"])

    assert promote(name, v1, tracking_uri=mlflow_server).promoted  # first evaluated version
    decision = promote(name, v2, tracking_uri=mlflow_server)
    assert decision.promoted and decision.previous_champion == v1
    assert decision.evidence["delta"] == pytest.approx(acc["t"] - acc["u"])
    _, v3, _ = eval_and_register(Path(tiny_model_dir), "worse")  # the untrained model again
    worse = promote(name, v3, tracking_uri=mlflow_server)
    assert not worse.promoted and worse.reason.startswith("synthetic regresses by")
    assert client.get_registered_model(name).aliases["champion"] == v2
    assert client.get_model_version(name, v3).tags["promotion.decision"] == "refused"

    # the champion, fetched from the registry (S3 behind the server), evaluates exactly like the checkpoint
    champion = load_champion(name, tracking_uri=mlflow_server)
    again = evaluate(champion, {"synthetic": bench}, config, tmp_path / "eval-champion")
    assert again["benchmarks"] == better["benchmarks"]
    assert read_samples(tmp_path / "eval-champion" / "samples_synthetic.jsonl") == read_samples(
        tmp_path / "eval-trained" / "samples_synthetic.jsonl"
    )
    # and the pyfunc model behind models:/NAME@champion answers like the checkpoint
    from tgrl_lib.data.schema import load_dataset

    dataset = load_dataset(bench, "problems")
    rows = [{"question": p.question, "image": str(dataset.image_path(p))} for p in dataset.records[:2]]
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(rows, params={"max_new_tokens": 24})
    assert served == generate_answers(load_policy(trained), rows, max_new_tokens=24)
