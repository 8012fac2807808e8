"""The tiny offline VLM (build, train step, sampling, reload), `load_policy` safety, and the shared prompt."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tgrl_lib.data.prompts import SYSTEM_PROMPT, build_messages, render_prompt
from tgrl_lib.errors import TgrlError
from tgrl_lib.models.collate import collate_prompts, collate_sequences
from tgrl_lib.models.logprobs import response_logprobs
from tgrl_lib.models.policy import (
    IMAGE_PLACEHOLDER,
    SPECIAL_TOKENS,
    Policy,
    QwenVLImageTextProcessor,
    load_policy,
    save_policy,
)
from tgrl_lib.models.tiny import build_tiny, train_tokenizer

QUESTIONS = [
    ("How many red circles are there?", None, "<think>I see 2 red circles.</think><answer>2</answer>"),
    ("Colour of the largest shape?", ["red", "blue", "green"], "<think>Blue.</think><answer>B</answer>"),
    ("What is the sum of the bars?", None, "<think>3 + 4 = 7.</think><answer>7</answer>"),
    ("Is the square left of the star?", ["yes", "no"], "<answer>A</answer>"),
]


def random_images(n: int, size: int = 56, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def policy(tiny_model_dir) -> Policy:
    return load_policy(tiny_model_dir)


def test_tiny_model_has_the_documented_shape(policy, tiny_model_dir):
    config = policy.model.config
    n_params = sum(p.numel() for p in policy.model.parameters())
    n_vision = sum(p.numel() for p in policy.model.model.visual.parameters())
    assert 0.5e6 < n_params < 0.8e6 and 0.2e6 < n_vision < 0.3e6
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (128, 2)
    assert config.text_config.rope_parameters["mrope_section"] == [4, 6, 6]
    assert config.text_config.vocab_size == len(policy.tokenizer) <= 1024
    ids = policy.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert config.image_token_id == ids[SPECIAL_TOKENS.index("<|image_pad|>")]
    assert sorted(ids) == ids and len(set(ids)) == len(SPECIAL_TOKENS)
    files = {p.name for p in Path(tiny_model_dir).iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    # a 56x56 image is one [1, 4, 4] patch grid -> 4 image tokens after the 2x2 merge
    enc = collate_prompts(policy.processor, [render_prompt(policy.processor, "How many?")], random_images(1))
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert int((enc["input_ids"] == config.image_token_id).sum()) == 4


def test_autoprocessor_loads_the_processor_without_torchvision(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert isinstance(processor, QwenVLImageTextProcessor)
    assert not hasattr(processor, "video_processor")
    out = processor(text=[f"hi {IMAGE_PLACEHOLDER}"], images=random_images(1), return_tensors="pt")
    assert out["pixel_values"].shape == (16, 3 * 2 * 14 * 14)


def test_batched_forward_backward_reaches_every_part(policy):
    model, processor = policy.model, policy.processor
    prompts = [render_prompt(processor, q, c) for q, c, _ in QUESTIONS]
    batch = collate_sequences(processor, prompts, random_images(len(QUESTIONS)), [r for _, _, r in QUESTIONS])
    model.train()
    model.zero_grad()
    logprobs, _ = response_logprobs(model, batch)
    loss = -(logprobs.sum() / batch.response_mask.sum())  # [] token-mean NLL
    loss.backward()
    model.eval()
    assert torch.isfinite(loss) and loss.item() > 0
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    vision = [g for name, g in grads.items() if ".visual." in name]
    text = [g for name, g in grads.items() if ".language_model." in name]
    assert vision and all(g.abs().sum() > 0 for g in vision)  # the image reaches the loss
    assert text and all(g.abs().sum() > 0 for g in text)
    model.zero_grad()


def test_generate_with_sampling_and_stop_at_end_of_turn(policy):
    model, processor = policy.model, policy.processor
    tokenizer = policy.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    prompts = [render_prompt(processor, q, c) for q, c, _ in QUESTIONS]
    enc = collate_prompts(processor, prompts, random_images(len(prompts)))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, max_new_tokens=16)
    new = out[:, enc["input_ids"].shape[1] :]  # [B, <=16]
    assert new.shape[0] == len(prompts) and 1 <= new.shape[1] <= 16
    assert int(new.max()) < len(tokenizer)  # every sampled id decodes
    assert all(isinstance(t, str) for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    # with <|im_end|> made overwhelmingly likely, sampling stops after one token
    with torch.no_grad():
        stopped = model.generate(
            **enc, do_sample=True, temperature=1.0, max_new_tokens=16, sequence_bias={(im_end,): 100.0}
        )
    assert stopped[:, enc["input_ids"].shape[1] :].tolist() == [[im_end]] * len(prompts)


def test_reload_gives_identical_logits(policy, tmp_path):
    from transformers import AutoModelForImageTextToText

    processor = policy.processor
    prompts = [render_prompt(processor, q, c) for q, c, _ in QUESTIONS]
    enc = collate_prompts(processor, prompts, random_images(len(prompts), seed=3))
    saved = save_policy(policy, None, tmp_path / "copy")
    reloaded = AutoModelForImageTextToText.from_pretrained(saved).eval()
    with torch.no_grad():
        before = policy.model(**enc).logits
        after = reloaded(**enc).logits
    assert torch.equal(before, after)
    assert load_policy(f"file://{saved}").processor.tokenizer.get_vocab() == policy.tokenizer.get_vocab()


def test_same_seed_builds_byte_identical_directories(tmp_path, tiny_model_dir):
    first = build_tiny(tmp_path / "a", seed=0)
    other_seed = build_tiny(tmp_path / "b", seed=1)
    for reference in (first, Path(tiny_model_dir)):
        names = sorted(p.name for p in reference.iterdir())
        assert names == sorted(p.name for p in first.iterdir())
        for name in names:
            assert (first / name).read_bytes() == (reference / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other_seed / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other_seed / "tokenizer.json").read_bytes()


def test_extra_corpus_teaches_the_tokenizer_new_words():
    word = " zebracorn"
    plain = train_tokenizer()
    taught = train_tokenizer([f"a{word}{word} and{word}"] * 50)
    assert len(taught(word)["input_ids"]) < len(plain(word)["input_ids"])
    assert len(taught) <= 1024


def test_load_policy_fetches_a_published_s3_checkpoint(tiny_model_dir, s3_env, tmp_path, monkeypatch):
    from tgrl_lib.store.artifacts import publish_checkpoint

    monkeypatch.setenv("TGRL_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{s3_env['bucket']}/models/tiny-{uuid.uuid4().hex[:8]}"
    publish_checkpoint(tiny_model_dir, uri)
    fetched = load_policy(uri)
    assert fetched.path.is_relative_to(tmp_path / "cache")
    reference = load_policy(tiny_model_dir).model.state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in fetched.model.state_dict().items())


def _fake_checkpoint(path: Path, weights: list[str]) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    for name in weights:
        (path / name).write_bytes(b"not really weights")
    return path


def test_load_policy_refuses_pickle_only_checkpoints(tmp_path):
    pickled = _fake_checkpoint(tmp_path / "pickled", ["pytorch_model.bin"])
    with pytest.raises(TgrlError, match=r"pytorch_model\.bin.*refusing pickle"):
        load_policy(pickled)
    with pytest.raises(TgrlError, match=r"training_args\.pkl"):
        load_policy(_fake_checkpoint(tmp_path / "pkl", ["training_args.pkl"]))
    with pytest.raises(TgrlError, match=r"no \*\.safetensors"):
        load_policy(_fake_checkpoint(tmp_path / "empty", []))


def test_load_policy_names_missing_directory_and_config(tmp_path):
    with pytest.raises(TgrlError, match="does not exist"):
        load_policy(tmp_path / "nowhere")
    (tmp_path / "no_config").mkdir()
    with pytest.raises(TgrlError, match=r"config\.json is missing"):
        load_policy(tmp_path / "no_config")
    with pytest.raises(TgrlError, match="unsupported URI"):
        load_policy("ftp://host/model")


def test_load_policy_reads_a_stock_qwen_vl_processor_without_torchvision(tiny_model_dir, tmp_path):
    """A real Qwen2.5-VL checkpoint names `Qwen2_5_VLProcessor`, whose video processor needs torchvision."""
    import importlib.util
    import shutil

    stock = Path(shutil.copytree(tiny_model_dir, tmp_path / "stock"))
    for name in ("processor_config.json", "tokenizer_config.json"):
        config = json.loads((stock / name).read_text())
        (stock / name).write_text(json.dumps({**config, "processor_class": "Qwen2_5_VLProcessor"}))
    processor = load_policy(stock).processor
    if importlib.util.find_spec("torchvision") is None:
        assert isinstance(processor, QwenVLImageTextProcessor)
    out = processor(text=[f"x {IMAGE_PLACEHOLDER}"], images=random_images(1), return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_load_policy_casts_dtype(tiny_model_dir):
    assert load_policy(tiny_model_dir, dtype="bfloat16").model.dtype == torch.bfloat16
    with pytest.raises(TgrlError, match="unknown dtype"):
        load_policy(tiny_model_dir, dtype="float7")


# ---------------------------------------------------------------------------------------- prompts
def test_prompt_renders_system_image_question_and_lettered_choices(policy):
    text = render_prompt(policy.processor, "What colour is the largest shape?", ["red", "blue"])
    assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert text.count(IMAGE_PLACEHOLDER) == 1
    assert "What colour is the largest shape?\nChoices:\n(A) red\n(B) blue\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    numeric = render_prompt(policy.processor, "How many?", None)
    assert "Choices" not in numeric and "(A)" not in numeric
    assert IMAGE_PLACEHOLDER not in render_prompt(policy.processor, "Hi", None, with_image=False)


def test_build_messages_puts_the_image_before_the_question():
    messages = build_messages("Q?", ["x", "y", "z"])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"][0] == {"type": "image"}
    assert messages[1]["content"][1]["text"].splitlines()[:5] == ["Q?", "Choices:", "(A) x", "(B) y", "(C) z"]
    with pytest.raises(TgrlError, match="27 options"):
        build_messages("Q?", [str(i) for i in range(27)])
