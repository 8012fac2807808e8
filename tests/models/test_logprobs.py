"""`models.logprobs.shared_prefix_logprobs` (no-grad log-probs with each distinct prompt encoded once)
against the plain forward `models.logprobs.response_logprobs`, on the tiny Qwen2.5-VL, and its fall-backs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tgrl_lib.data.images import blank_images
from tgrl_lib.data.prompts import render_prompt
from tgrl_lib.models.collate import collate_sequences
from tgrl_lib.models.logprobs import response_logprobs, shared_prefix_logprobs
from tgrl_lib.models.policy import load_policy
from tgrl_lib.rl.update import batched_logprobs


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir)


def _groups(policy, sizes: list[int], seed: int = 0):
    """Rows of groups (same prompt and image object within a group), responses of varied lengths: random
    ids (one cut short, one empty) and one text response, as the update's batches have them."""
    rng = np.random.default_rng(seed)
    questions = ["How many red shapes are there?", "Which bar is the tallest one in the chart?"]
    prompts, images, responses = [], [], []
    plain = len(policy.tokenizer) - 8  # the BPE entries; the special tokens follow them
    for k, size in enumerate(sizes):
        image = Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
        prompt = render_prompt(policy.processor, questions[k % 2], None)
        for i in range(size):
            prompts.append(prompt)
            images.append(image)
            n = [0, 3, 17, 30][(i + k) % 4]
            responses.append(tuple(int(t) for t in rng.integers(0, plain, n)))
    responses[1] = "<think>I see two red circles.</think><answer>2</answer>"
    return prompts, images, responses


@pytest.mark.parametrize(("blank", "temperature"), [(False, 1.0), (True, 1.0), (False, 0.6)])
def test_equals_the_plain_forward(policy, blank, temperature):
    prompts, images, responses = _groups(policy, [4, 3, 5])
    images = blank_images(images) if blank else images
    seq = collate_sequences(policy.processor, prompts, images, responses, 24)
    with torch.no_grad():
        expected, expected_entropy = response_logprobs(
            policy.model, seq, with_entropy=True, temperature=temperature
        )
    shared = shared_prefix_logprobs(policy.model, seq, with_entropy=True, temperature=temperature)
    assert shared is not None
    logprobs, entropy = shared
    assert logprobs.shape == expected.shape and entropy.shape == expected.shape
    assert bool((logprobs[seq.response_mask == 0] == 0).all())
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    assert shared_prefix_logprobs(policy.model, seq)[1] is None  # entropy only when asked


def test_batched_logprobs_micro_batches_split_groups(policy):
    prompts, images, responses = _groups(policy, [4, 4, 4], seed=1)
    seq = collate_sequences(policy.processor, prompts, images, responses, 24)
    with torch.no_grad():
        expected, _ = response_logprobs(policy.model, seq)
    for micro in (3, 5, 12):  # groups cut across micro-batches; one micro-batch holds a single row
        got, _ = batched_logprobs(policy.model, seq, micro)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_falls_back_when_nothing_is_shared(policy):
    prompts, images, responses = _groups(policy, [1, 1, 1])  # distinct prompts and images
    seq = collate_sequences(policy.processor, prompts, images, responses, 24)
    assert shared_prefix_logprobs(policy.model, seq) is None
    same_prompt_other_images = collate_sequences(
        policy.processor, [prompts[0]] * 2, [images[0], images[1]], responses[:2], 24
    )  # equal tokens, different pixels: not a shared prefix
    assert shared_prefix_logprobs(policy.model, same_prompt_other_images) is None
    text = render_prompt(policy.processor, "How many?", None, with_image=False)
    text_only = collate_sequences(policy.processor, [text] * 3, None, responses[:3], 24)
    assert shared_prefix_logprobs(policy.model, text_only) is None


def test_gradients_equal_the_plain_forward(policy):
    import copy

    prompts, images, responses = _groups(policy, [4, 3], seed=2)
    seq = collate_sequences(policy.processor, prompts, images, responses, 24)
    weights = torch.randn(seq.input_ids.shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for shared in (False, True):
        model = copy.deepcopy(policy.model).train()
        out = shared_prefix_logprobs(model, seq, with_entropy=True) if shared else None
        logprobs, entropy = out if out is not None else response_logprobs(model, seq, with_entropy=True)
        ((logprobs + 0.1 * entropy) * weights).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert shared is False or out is not None
    assert grads[0].keys() == grads[1].keys() and any("visual" in n for n in grads[0])
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, atol=1e-5, rtol=1e-4, msg=name)
