"""The real-shape presets (`tgrl_lib.models.presets`): Qwen2.5-VL and Qwen2-VL as released, at reduced
depth and width, with the released processor settings (dynamic resolution: patch 14, merge 2, min/max
pixels 3136 / 12845056). Images of different sizes and aspect ratios share a batch; the whole loop runs on
them on CPU: sft, grpo, tgrl with visual-dependency weights, eval, serve; bf16 autocast and fp32."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from tgrl_lib.config import EvalConfig, FilterConfig, TrainConfig
from tgrl_lib.data.images import blank_images
from tgrl_lib.data.prompts import render_prompt
from tgrl_lib.data.schema import Problem, Trajectory, load_dataset, write_dataset
from tgrl_lib.errors import TgrlError
from tgrl_lib.models.collate import check_prompt_tokens, collate_prompts, collate_sequences
from tgrl_lib.models.policy import load_policy
from tgrl_lib.models.presets import PRESETS, QWEN2_VL_SPECIAL, build_preset

PRESET_NAMES = sorted(PRESETS)
SIZES = [(200, 120), (640, 480), (28, 1000)]  # width x height: wide, 4:3, a tall strip
GRIDS = [[1, 8, 14], [1, 34, 46], [1, 72, 2]]  # their patch grids at patch 14 (sides rounded to 28 px)
IMAGE_TOKENS = [28, 391, 36]  # t*h*w / (2*2) after the merge
GOOD = "<think>I see 2 red shapes.</think><answer>2</answer>"


def shapes_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Two red discs on grey, scaled to the image (any size or aspect ratio)."""
    width, height = size
    image = Image.new("RGB", size, (200, 200, 200))
    draw = ImageDraw.Draw(image)
    r = max(3, min(width, height) // 6)
    for k in range(2):
        cx, cy = (k + 1) * width // 3, (k + 1 + seed % 2) * height // 4
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 30, 30))
    return image


@pytest.fixture(scope="module", params=PRESET_NAMES)
def preset_dir(request, tmp_path_factory) -> Path:
    """The preset as `tgrl model init` writes it (bfloat16 weights, as released). Read-only."""
    return build_preset(request.param, tmp_path_factory.mktemp(request.param) / "model", seed=0)


@pytest.fixture(scope="module")
def policy(preset_dir):
    return load_policy(preset_dir, dtype="float32")


@pytest.fixture(scope="module")
def mixed(policy):
    images = [shapes_image(size, i) for i, size in enumerate(SIZES)]
    prompts = [render_prompt(policy.processor, "How many red shapes are there?") for _ in images]
    return prompts, images


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Problems with the three image sizes, and expert trajectories filtered with the preset's tokenizer:
    one expert per problem plus one that writes `<|image_pad|>`, which the filter step must reject."""
    root = tmp_path_factory.mktemp("data")
    (root / "problems" / "images").mkdir(parents=True)
    problems = []
    for i, size in enumerate(SIZES):
        shapes_image(size, i).save(root / "problems" / "images" / f"p{i}.png")
        question = "How many red shapes are there?"
        problems.append(Problem(id=f"p{i}", image=f"images/p{i}.png", question=question, answer="2",
                                answer_type="integer"))  # fmt: skip
    write_dataset(root / "problems", "problems", problems)
    experts = [Trajectory(problem_id=p.id, source="expert:test", text=GOOD) for p in problems]
    hostile = "<think>I see 2 red shapes.<|image_pad|></think><answer>2</answer>"
    experts.append(Trajectory(problem_id="p1", source="expert:hostile", text=hostile))
    write_dataset(root / "raw", "trajectories", experts, meta={"problems": str(root / "problems")})
    return root


# ------------------------------------------------------------------------------- the preset itself
def test_preset_files_are_the_released_layout_and_load_with_its_settings(preset_dir):
    name = preset_dir.parent.name.rstrip("0123456789")
    preset = PRESETS[name]
    files = {p.name for p in preset_dir.iterdir()}
    assert {"config.json", "preprocessor_config.json", "chat_template.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= files  # fmt: skip
    raw = json.loads((preset_dir / "config.json").read_text())
    assert "text_config" not in raw and raw["rope_scaling"] == {
        "type": "mrope",
        "mrope_section": [16, 24, 24],
    }
    policy = load_policy(preset_dir)
    config, tokenizer = policy.model.config, policy.tokenizer
    assert type(policy.model).__name__ == preset.architecture and policy.model.dtype == torch.bfloat16
    image_processor = policy.processor.image_processor
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (3136, 12845056)
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (
        14, 2, 2)  # fmt: skip
    text = config.text_config
    assert (
        text.hidden_size // text.num_attention_heads == 128
        and text.num_key_value_heads < text.num_attention_heads
    )
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
    vision = config.vision_config
    vision_width = getattr(vision, "embed_dim", None) or vision.hidden_size
    assert (
        vision_width // vision.num_heads == 80 and vision.patch_size == 14 and vision.spatial_merge_size == 2
    )
    # released special tokens in the released order, right after the BPE entries; the embedding is wider
    ids = tokenizer.convert_tokens_to_ids(list(QWEN2_VL_SPECIAL))
    assert ids == list(range(ids[0], ids[0] + len(QWEN2_VL_SPECIAL)))
    assert text.vocab_size % 256 == 0 and text.vocab_size > len(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert "<|image_pad|>" in tokenizer.all_special_tokens and tokenizer.eos_token == "<|im_end|>"
    assert policy.model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(
        ["<|im_end|>", "<|endoftext|>"])  # fmt: skip
    prompt = render_prompt(policy.processor, "How many?")
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    tied = policy.model.lm_head.weight.data_ptr() == policy.model.get_input_embeddings().weight.data_ptr()
    assert tied == preset.text["tie_word_embeddings"]


def test_preset_build_is_deterministic_and_the_cli_writes_it(preset_dir, tmp_path, capsys):
    from tgrl_lib.cli import main

    name = preset_dir.parent.name.rstrip("0123456789")
    assert main(["model", "init", "--preset", name, "--out", str(tmp_path / "cli"), "--seed", "0"]) == 0
    for path in sorted(preset_dir.iterdir()):
        assert (tmp_path / "cli" / path.name).read_bytes() == path.read_bytes(), path.name
    assert main(["model", "init", "--preset", name, "--out", str(tmp_path / "x"), "--image-size", "56"]) == 2
    assert "--image-size applies to the tiny model only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_processor_settings_come_from_the_checkpoints_preprocessor_config(preset_dir, tmp_path):
    copy = Path(shutil.copytree(preset_dir, tmp_path / "copy"))
    settings = json.loads((copy / "preprocessor_config.json").read_text())
    settings["max_pixels"] = 56 * 56  # a checkpoint shipped with a small cap: every image gets fewer tokens
    (copy / "preprocessor_config.json").write_text(json.dumps(settings))
    processor = load_policy(copy).processor
    enc = collate_prompts(processor, [render_prompt(processor, "How many?")], [shapes_image((640, 480), 0)])
    assert int(enc["image_grid_thw"].prod()) * 14 * 14 <= 56 * 56 < 640 * 480


# --------------------------------------------------------------------- image tokens vs vision features
def test_mixed_sizes_image_tokens_match_the_vision_features(policy, mixed):
    prompts, images = mixed
    seq = collate_sequences(policy.processor, prompts, images, [GOOD, "<answer>2</answer>", GOOD])
    assert seq.image_grid_thw.tolist() == GRIDS
    image_pad = policy.model.config.image_token_id
    assert (seq.input_ids == image_pad).sum(-1).tolist() == IMAGE_TOKENS
    with torch.no_grad():
        features = policy.model.model.get_image_features(seq.pixel_values, seq.image_grid_thw)
        pieces = features.pooler_output if hasattr(features, "pooler_output") else features
        assert [len(p) for p in pieces] == IMAGE_TOKENS  # what the vision tower returns per image
        logits = policy.model(**seq.model_inputs()).logits
    assert logits.shape[:2] == seq.input_ids.shape and torch.isfinite(logits).all()
    # a cut prompt (one image token of the 640x480 row lost) is refused before the model sees it ...
    cut = dict(seq.model_inputs())
    cut["input_ids"] = seq.input_ids.clone()
    cut["input_ids"][1, (seq.input_ids[1] == image_pad).nonzero()[-1]] = policy.tokenizer.pad_token_id
    with pytest.raises(TgrlError, match=r"prompt 1 has 390 image tokens but its 640x480 image gives 391"):
        check_prompt_tokens(policy.processor, cut, images, range(3))
    # ... because the model itself fails on it
    with (
        pytest.raises(ValueError, match=r"(?i)image features and image tokens do not match"),
        torch.no_grad(),
    ):
        policy.model(**cut)


def test_prompts_are_refused_not_cut_when_too_long(policy, mixed):
    prompts, images = mixed
    full = collate_prompts(policy.processor, prompts, images)
    longest = int(full["attention_mask"].sum(-1).max())
    fits = collate_prompts(policy.processor, prompts, images, max_prompt_tokens=longest)  # positive control
    assert (fits["input_ids"] == policy.model.config.image_token_id).sum(-1).tolist() == IMAGE_TOKENS
    with pytest.raises(TgrlError, match=r"prompt 1 has \d+ tokens \(391 image tokens.*never truncated"):
        collate_prompts(policy.processor, prompts, images, max_prompt_tokens=longest - 1)
    with pytest.raises(TgrlError, match=r"prompt 1 .*max_prompt_tokens"):
        collate_sequences(policy.processor, prompts, images, [GOOD] * 3, max_prompt_tokens=longest - 1)


def test_prefix_shared_logprobs_equal_the_full_forward_on_mixed_grids(policy, mixed):
    """Each group's prompt encoded once, its KV cache and 3D (M-RoPE) positions continued per row: the
    same log-probs as one full forward per row, for images of different grids in one batch."""
    from tgrl_lib.models.logprobs import response_logprobs, shared_prefix_logprobs

    prompts, images = mixed
    rows = [0, 0, 1, 1, 2, 2]  # G = 2 responses per prompt
    responses = [GOOD, "<answer>3</answer>", "<think>two</think><answer>2</answer>", GOOD, GOOD, "<answer>"]
    seq = collate_sequences(
        policy.processor, [prompts[r] for r in rows], [images[r] for r in rows], responses
    )
    assert seq.image_grid_thw.tolist() == [GRIDS[r] for r in rows]
    with torch.no_grad():
        full, _ = response_logprobs(policy.model, seq)
        shared = shared_prefix_logprobs(policy.model, seq)
    assert shared is not None  # the shared path applies (it returns None when it cannot)
    mask = seq.response_mask.bool()
    assert torch.allclose(shared[0][mask], full[mask], atol=1e-4), (shared[0][mask] - full[mask]).abs().max()


def test_a_response_writing_image_pad_adds_no_image_tokens(policy, mixed):
    prompts, images = mixed
    seq = collate_sequences(policy.processor, prompts, images, ["<|image_pad|><|vision_start|>2"] * 3)
    assert (seq.input_ids == policy.model.config.image_token_id).sum(-1).tolist() == IMAGE_TOKENS


def test_the_blank_image_pass_has_each_images_own_grid(policy, mixed):
    prompts, images = mixed
    real = collate_sequences(policy.processor, prompts, images, [GOOD] * 3)
    blank = collate_sequences(policy.processor, prompts, blank_images(images), [GOOD] * 3)
    assert blank.image_grid_thw.tolist() == GRIDS
    assert (
        torch.equal(blank.input_ids, real.input_ids) and blank.pixel_values.shape == real.pixel_values.shape
    )
    assert not torch.equal(blank.pixel_values, real.pixel_values)


# ------------------------------------------------------------------------------------ the whole loop
def _filtered_experts(datasets, preset_dir) -> Path:
    from tgrl_lib.filters.run import run_filters

    out, rejected = (
        datasets / f"experts-{preset_dir.parent.name}",
        datasets / f"rejected-{preset_dir.parent.name}",
    )
    report = run_filters(datasets / "raw", out, rejected, FilterConfig(policy=str(preset_dir)))
    kept = load_dataset(out, "trajectories").records
    refused = [json.loads(line) for line in (rejected / "records.jsonl").read_text().splitlines()]
    assert len(kept) + len(refused) == 4  # counts reconcile: input = kept + rejected
    assert [(r["stage"], r["reason"], r["line"]) for r in refused] == [
        ("filter:special_tokens", "contains special token <|image_pad|>", 4)]  # fmt: skip
    assert sorted(t.problem_id for t in kept) == ["p0", "p1", "p2"]
    assert (report.input, report.kept, report.rejected, report.length_unit) == (4, 3, 1, "tokens")
    return out


def _train(preset_dir, datasets, out: Path, experts: Path | None, **overrides):
    from tgrl_lib.rl.trainer import train

    settings = dict(
        model=str(preset_dir), output_dir=str(out), steps=2, problems_per_step=3, group_size=2,
        minibatch_size=6, micro_batch_size=3, sampling={"max_new_tokens": 8}, lr=1e-3, checkpoint_every=2,
        keep_checkpoints=1, in_loop_filter={"max_tokens": 64},
    )  # fmt: skip
    config = TrainConfig(**(settings | overrides))
    return train(config, problems_dir=datasets / "problems", experts_dir=experts)


@pytest.mark.slow
def test_the_loop_runs_on_the_preset_sft_grpo_tgrl_eval_serve(preset_dir, datasets, tmp_path):
    from tgrl_lib.evaluation.run import evaluate

    experts = _filtered_experts(datasets, preset_dir)
    sft = _train(preset_dir, datasets, tmp_path / "sft", experts, algorithm="sft")
    assert math.isfinite(sft.metrics["loss/sft"]) and sft.metrics["tokens/sft"] > 0
    grpo = _train(preset_dir, datasets, tmp_path / "grpo", None, algorithm="grpo", weighting={"kind": "none"})
    assert math.isfinite(grpo.metrics["loss/total"]) and grpo.metrics["response/length_mean"] > 0
    tgrl = _train(preset_dir, datasets, tmp_path / "tgrl", experts, algorithm="tgrl",
                  weighting={"kind": "visual_dependency", "apply_to": "both"})  # fmt: skip
    assert tgrl.metrics["expert/injected"] >= 1 and math.isfinite(tgrl.metrics["loss/total"])
    assert tgrl.metrics["weights/std"] > 0  # the blank-image pass changed the log-probs token by token
    start = load_policy(preset_dir, dtype="float32").model.state_dict()
    trained = load_policy(tgrl.final_dir).model.state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    config = EvalConfig(sampling={"max_new_tokens": 8, "batch_size": 3})
    results = evaluate(tgrl.final_dir, {"mixed": datasets / "problems"}, config, tmp_path / "eval")
    overall = results["benchmarks"]["mixed"]["overall"]
    assert overall["count"] == 3.0 and 0.0 <= overall["accuracy"] <= 1.0 and overall["length_mean"] > 0
    _serve_one_request(preset_dir)  # the bf16 weights, as released, generating on CPU


def _serve_one_request(model_dir: Path) -> None:
    from tgrl_lib.generation.serve import make_server

    server = make_server(model_dir, "127.0.0.1", 0, served_name="preset")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
        buffer = io.BytesIO()
        shapes_image((640, 480), 0).save(buffer, format="PNG")
        image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content = [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": "How many?"},
        ]
        body = {
            "model": "preset",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 6,
            "seed": 0,
        }
        answer = _post(url, body)
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= answer["usage"]["completion_tokens"] <= 6
        with pytest.raises(urllib.error.HTTPError) as bad:  # a bad request is a 4xx, not a 500
            _post(url, {**body, "messages": [{"role": "user", "content": [{"type": "video"}]}]})
        assert 400 <= bad.value.code < 500
    finally:
        server.shutdown()
        server.server_close()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _cpu_bf16_autocast() -> bool:
    """Whether torch runs bf16 autocast on this CPU (matmuls then come out in bf16)."""
    if not torch.amp.is_autocast_available("cpu"):
        return False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def _cli_sft(preset_dir, datasets, experts: Path, out: Path, precision: str) -> float:
    """The loss of one sft step through `tgrl train` in its own process (accelerate keeps one
    mixed-precision state per process, so bf16 cannot follow an fp32 run in the test process)."""
    settings = {
        "algorithm": "sft",
        "model": str(preset_dir),
        "steps": 1,
        "problems_per_step": 3,
        "micro_batch_size": 3,
        "sampling.max_new_tokens": 8,
        "in_loop_filter.max_tokens": 64,
        "lr": 1e-3,
        "mixed_precision": f"'{precision}'",
    }  # fmt: skip  (quoted: YAML reads no as false)
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "tgrl_lib.cli", "train", "--problems", str(datasets / "problems"),
               "--experts", str(experts), "--out", str(out), *sets]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss/sft"]


@pytest.mark.slow
@pytest.mark.parametrize("preset_dir", ["qwen2.5-vl-real-shape"], indirect=True)
def test_training_under_bf16_autocast_where_supported_and_fp32(preset_dir, datasets, tmp_path):
    experts = _filtered_experts(datasets, preset_dir)
    fp32 = _train(preset_dir, datasets, tmp_path / "fp32", experts, algorithm="sft", steps=1)
    fp32_loss = fp32.metrics["loss/sft"]
    again = _cli_sft(preset_dir, datasets, experts, tmp_path / "fp32-cli", "no")
    assert math.isfinite(fp32_loss) and again == fp32_loss  # fp32: the CLI run is the same computation
    if not _cpu_bf16_autocast():
        pytest.skip("torch has no bf16 autocast on this CPU: training stays in fp32 (checked above)")
    bf16 = _cli_sft(preset_dir, datasets, experts, tmp_path / "bf16", "bf16")
    assert math.isfinite(bf16) and bf16 != fp32_loss  # autocast really ran: the loss differs by rounding only
    assert abs(bf16 - fp32_loss) < 0.05 * abs(fp32_loss)
