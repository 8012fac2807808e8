"""The compact sampler (`generation.decode`) against transformers `generate` and the training kernel.

Greedy tokens equal HF `generate`'s (tiny model and both real-shape presets, variable image grids); the
log-prob of every sampled token equals `response_logprobs` at the same temperature; the draw follows the
model's distribution; suppressed ids are never drawn (a control without suppression draws them); rows
stop at <|im_end|>; models or generation configs it does not handle fall back to `generate`."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image, ImageDraw

from tgrl_lib.data.prompts import render_prompt
from tgrl_lib.errors import TgrlError
from tgrl_lib.generation import decode
from tgrl_lib.generation.hf import HFBackend
from tgrl_lib.models.collate import collate_prompts, collate_sequences
from tgrl_lib.models.logprobs import response_logprobs
from tgrl_lib.models.policy import load_policy
from tgrl_lib.models.presets import PRESETS, build_preset

QUESTIONS = ["How many red shapes are there?", "What colour is the largest shape? Answer with one word."]


def scene(size: tuple[int, int], seed: int) -> Image.Image:
    image = Image.new("RGB", size, (200, 200, 200))
    w, h = size
    r = max(3, min(w, h) // 6)
    ImageDraw.Draw(image).ellipse([w // 3 - r, h // 3 - r, w // 3 + r, h // 3 + r], fill=(40 * seed, 30, 200))
    return image


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """The tiny model with its weights scaled up, so that greedy decoding does not repeat one token."""
    policy = load_policy(tiny_model_dir)
    model = copy.deepcopy(policy.model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    policy.model = model.eval()
    return policy


@pytest.fixture
def inputs(policy):
    prompts = [render_prompt(policy.processor, q) for q in QUESTIONS]
    return prompts, [scene((56, 56), i) for i in range(len(prompts))]


def _hf_greedy(backend: HFBackend, prompts, images, max_new: int) -> list[tuple[int, ...]]:
    reference = HFBackend(backend.model, backend.processor, sampler="generate")
    out = reference.generate(prompts, images, samples=1, temperature=0.0, max_new_tokens=max_new)
    return [g[0].token_ids for g in out]


def test_greedy_tokens_equal_hf_generate(policy, inputs):
    backend = HFBackend(policy.model, policy.processor, sampler="decode")
    assert backend.uses_decode()
    out = backend.generate(*inputs, samples=3, temperature=0.0, max_new_tokens=32)
    ours = [g[0].token_ids for g in out]
    assert ours == _hf_greedy(backend, *inputs, 32)
    assert len(set(ours[0])) > 5  # not a degenerate repetition: the comparison has content
    assert all(g == [g[0]] * 3 for g in out)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_real_shape_presets_greedy_equal_hf_generate(name, tmp_path):
    """Released shapes: variable image grids (three sizes, left-padded prompts of different lengths),
    M-RoPE sections [16, 24, 24], grouped-query attention, head dim 128."""
    policy = load_policy(build_preset(name, tmp_path / "model", seed=0), dtype="float32")
    backend = HFBackend(policy.model, policy.processor)
    assert backend.uses_decode()  # auto picks the compact loop on both presets
    images = [scene(size, i) for i, size in enumerate([(200, 120), (28, 300), (84, 84)])]
    prompts = [render_prompt(policy.processor, q) for q in [*QUESTIONS, "Count them."]]
    out = backend.generate(prompts, images, samples=2, temperature=0.0, max_new_tokens=16)
    assert [g[0].token_ids for g in out] == _hf_greedy(backend, prompts, images, 16)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_the_training_kernel(policy, inputs, temperature):
    backend = HFBackend(policy.model, policy.processor)
    out = backend.generate(*inputs, samples=4, temperature=temperature, max_new_tokens=20, seed=0)
    rows = [(p, im, c) for (p, im), g in zip(zip(*inputs, strict=True), out, strict=True) for c in g]
    seq = collate_sequences(
        policy.processor, [r[0] for r in rows], [r[1] for r in rows], [list(r[2].token_ids) for r in rows]
    )
    with torch.no_grad():
        kernel, _ = response_logprobs(policy.model, seq, temperature=temperature)  # [B, T]
    mask = seq.response_mask.bool()
    sampled = torch.cat([torch.tensor(r[2].logprobs) for r in rows])
    assert sampled.shape == kernel[mask].shape and sampled.numel() > 40
    torch.testing.assert_close(sampled, kernel[mask], atol=1e-4, rtol=1e-4)
    assert len({c.token_ids for c in out[0]}) > 1  # the samples of a group differ


def test_draws_follow_the_model_distribution(policy, inputs):
    """20,000 first tokens of one prompt at T = 0.5 against softmax(logits / 0.5) of the prefill."""
    prompt = collate_prompts(policy.processor, inputs[0][:1], inputs[1][:1])
    logits, _, _ = decode.prefill(policy.model, dict(prompt))
    probs = torch.softmax(logits[0] / 0.5, -1)
    torch.manual_seed(0)
    out = decode.decode(
        policy.model, dict(prompt), samples=20000, temperature=0.5, max_new_tokens=1, stop_ids=[]
    )
    freq = torch.bincount(out.tokens[:, 0], minlength=probs.numel()).float() / 20000
    assert 0.5 * (freq - probs).abs().sum() < 0.04  # total variation; sampling noise here is ~0.02
    assert probs.max() < 0.9  # a spread distribution: the check has room to fail


def test_suppressed_ids_are_never_drawn_and_a_control_draws_them(policy, inputs):
    prompt = dict(collate_prompts(policy.processor, *inputs))
    backend = HFBackend(policy.model, policy.processor)
    run = {"samples": 64, "temperature": 50.0, "max_new_tokens": 24, "stop_ids": []}  # near uniform
    torch.manual_seed(0)
    suppressed = set(
        decode.decode(policy.model, prompt, suppressed=backend.suppressed, **run).tokens.flatten().tolist()
    )
    torch.manual_seed(0)
    control = set(decode.decode(policy.model, prompt, **run).tokens.flatten().tolist())
    assert not suppressed & set(backend.suppressed)
    assert control & set(backend.suppressed)  # without suppression they do come up


def test_rows_stop_at_end_of_turn_and_min_new_tokens_holds_them(policy, inputs):
    backend = HFBackend(policy.model, policy.processor)
    im_end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    policy.model.generation_config.sequence_bias = {(im_end,): 6.0}  # a stop every few tokens
    try:
        out = backend.generate(*inputs, samples=16, temperature=1.0, max_new_tokens=24, seed=0)
        policy.model.generation_config.min_new_tokens = 24
        held = backend.generate(*inputs, samples=16, temperature=1.0, max_new_tokens=24, seed=0)
    finally:
        policy.model.generation_config.sequence_bias = None
        policy.model.generation_config.min_new_tokens = None
    completions = [c for g in out for c in g]
    stopped = [c for c in completions if c.finish_reason == "stop"]
    assert len(stopped) > len(completions) // 2
    for c in stopped:  # ends at its first stop token, which is kept
        assert c.token_ids[-1] in backend.stop_ids and not set(c.token_ids[:-1]) & set(backend.stop_ids)
        assert len(c.logprobs) == c.num_tokens
    assert all(c.finish_reason == "length" and c.num_tokens == 24 for g in held for c in g)


def test_falls_back_to_generate_where_decode_does_not_apply(policy, inputs):
    model = copy.deepcopy(policy.model)
    model.model.language_model.rotary_emb.rope_type = "linear"  # a rope decode does not implement
    assert not decode.supports(model)
    auto = HFBackend(model, policy.processor)
    assert not auto.uses_decode()
    out = auto.generate(*inputs, samples=2, temperature=0.0, max_new_tokens=12)
    assert [g[0].token_ids for g in out] == _hf_greedy(auto, *inputs, 12) and out[0][0].logprobs is None
    with pytest.raises(TgrlError, match="decode sampler cannot run"):
        HFBackend(model, policy.processor, sampler="decode").generate(
            *inputs, samples=1, temperature=0.0, max_new_tokens=4
        )
    policy.model.generation_config.bad_words_ids = [[5]]  # a processor decode does not apply
    try:
        assert not HFBackend(policy.model, policy.processor).uses_decode()
    finally:
        policy.model.generation_config.bad_words_ids = None
