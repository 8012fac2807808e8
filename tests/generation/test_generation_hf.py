"""The transformers rollout backend on the tiny VLM: grouping, seeded determinism, stop and budget, greedy,
suppressed image tokens, and the Protocol."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from tgrl_lib.data.prompts import render_prompt
from tgrl_lib.generation.base import Completion, GenerationBackend, non_response_token_ids, sync_weights
from tgrl_lib.generation.hf import HFBackend
from tgrl_lib.models.policy import load_policy

QUESTIONS = [("How many red shapes are there?", None), ("What colour is the largest shape?", ["red", "blue"])]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir)


@pytest.fixture
def inputs(policy):
    prompts = [render_prompt(policy.processor, q, c) for q, c in QUESTIONS]
    images = [Image.new("RGB", (56, 56), (200, 30, 30)), Image.new("RGB", (56, 56), (30, 30, 200))]
    return prompts, images


def _fresh(policy, **generation_config) -> HFBackend:
    model = copy.deepcopy(policy.model)
    for key, value in generation_config.items():
        setattr(model.generation_config, key, value)
    return HFBackend(model, policy.processor, batch_size=1)


def test_is_a_generation_backend_with_grouped_completions(policy, inputs):
    backend = HFBackend(policy.model, policy.processor)
    assert isinstance(backend, GenerationBackend) and backend.name == "hf"
    out = backend.generate(*inputs, samples=3, temperature=1.0, max_new_tokens=12, seed=0)
    assert [len(group) for group in out] == [3, 3]
    tokenizer = policy.tokenizer
    for completion in (c for group in out for c in group):
        assert isinstance(completion, Completion) and 1 <= completion.num_tokens <= 12
        assert completion.text == tokenizer.decode(list(completion.token_ids), skip_special_tokens=True)
        stops = [t for t in completion.token_ids if t in backend.stop_ids]
        if completion.finish_reason == "stop":
            assert stops == [completion.token_ids[-1]]  # ends at its first stop token, which is kept
        else:
            assert stops == [] and completion.num_tokens == 12
    assert not sync_weights(backend, policy.model.state_dict().items())  # shares the model: nothing to do


def test_same_seed_same_samples_and_global_rng_untouched(policy, inputs):
    backend = HFBackend(policy.model, policy.processor, batch_size=1)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = backend.generate(*inputs, samples=4, temperature=1.0, max_new_tokens=10, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # sampling ran in a forked RNG
    again = backend.generate(*inputs, samples=4, temperature=1.0, max_new_tokens=10, seed=7)
    other = backend.generate(*inputs, samples=4, temperature=1.0, max_new_tokens=10, seed=8)
    assert first == again and first != other
    assert len({c.token_ids for c in first[0]}) > 1  # samples in a group differ


def test_greedy_repeats_one_completion_and_restores_training_mode(policy, inputs):
    backend = _fresh(policy)
    backend.model.train()
    out = backend.generate(*inputs, samples=3, temperature=0.0, max_new_tokens=6)
    assert all(group == [group[0]] * 3 for group in out)
    assert backend.model.training  # eval() only for the call


def test_stops_at_end_of_turn(policy, inputs):
    im_end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    backend = _fresh(policy, sequence_bias={(im_end,): 100.0})  # make <|im_end|> the only likely token
    out = backend.generate(*inputs, samples=2, temperature=1.0, max_new_tokens=8, seed=0)
    assert all((c.text, c.token_ids, c.finish_reason) == ("", (im_end,), "stop") for g in out for c in g)


def test_image_tokens_are_never_sampled(policy, inputs):
    image_pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad in non_response_token_ids(policy.tokenizer)
    backend = _fresh(policy, sequence_bias={(image_pad,): 100.0})  # would be sampled every time
    out = backend.generate(*inputs, samples=2, temperature=1.0, max_new_tokens=8, seed=0)
    suppressed = set(non_response_token_ids(policy.tokenizer))
    assert all(not suppressed & set(c.token_ids) for g in out for c in g)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_checkpoints_repetition_penalty_does_not_change_what_is_sampled(policy, inputs, temperature):
    """The loss scores pure temperature sampling: a released generation_config's repetition penalty (1.05 in
    Qwen2.5-VL's) must not reach `generate`. A strong penalty changes transformers' own output (control)."""
    plain = _fresh(policy).generate(*inputs, samples=2, temperature=temperature, max_new_tokens=24, seed=3)
    penalised = _fresh(policy, repetition_penalty=50.0, no_repeat_ngram_size=1)
    out = penalised.generate(*inputs, samples=2, temperature=temperature, max_new_tokens=24, seed=3)
    assert [[c.token_ids for c in g] for g in out] == [[c.token_ids for c in g] for g in plain]
    prompt = penalised.processor(text=inputs[0][:1], images=inputs[1][:1], return_tensors="pt")
    with torch.no_grad():  # control: transformers applies the checkpoint's penalty when not overridden
        raw = penalised.model.generate(**prompt, do_sample=False, max_new_tokens=24)
        unpenalised = penalised.model.generate(
            **prompt, do_sample=False, max_new_tokens=24, repetition_penalty=1.0, no_repeat_ngram_size=0
        )
    assert not torch.equal(raw, unpenalised)
