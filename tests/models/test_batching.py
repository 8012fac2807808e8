"""Collation, response masks, log-probs/entropy against naive computations, and safe image loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tgrl_lib.data.images import blank_images, load_image
from tgrl_lib.data.prompts import render_prompt
from tgrl_lib.errors import TgrlError
from tgrl_lib.models.collate import collate_prompts, collate_sequences, response_token_ids
from tgrl_lib.models.logprobs import response_logprobs, token_logprob_entropy
from tgrl_lib.models.policy import load_policy

QUESTIONS = [
    ("How many?", None),
    ("What colour is the largest shape in the picture?", ["red", "blue", "green"]),
    ("Sum of the two bars?", None),
]
RESPONSES = [
    "<think>I see 2 red circles.</think><answer>2</answer>",
    "<think>The largest is blue.</think><answer>B</answer>",
    "<answer>7</answer>",
]


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(policy) -> list[str]:
    return [render_prompt(policy.processor, q, c) for q, c in QUESTIONS]


def naive_logprobs_entropy(model, batch, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Full log_softmax of logits / temperature at every position, shifted by one, masked to the response."""
    logits = model(**batch.model_inputs(), use_cache=False).logits.double() / temperature  # [B, T, V]
    log_p = torch.log_softmax(logits, dim=-1)[:, :-1]  # [B, T-1, V]
    logprobs = torch.zeros(batch.input_ids.shape, dtype=torch.float64)
    entropy = torch.zeros_like(logprobs)
    logprobs[:, 1:] = log_p.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    entropy[:, 1:] = -(log_p.exp() * log_p).sum(-1)
    mask = batch.response_mask.double()
    return logprobs * mask, entropy * mask


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_response_logprobs_match_naive_log_softmax(policy, prompts, temperature):
    batch = collate_sequences(policy.processor, prompts, random_images(3), RESPONSES)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(policy.model, batch, with_entropy=True, temperature=temperature)
        expected_lp, expected_h = naive_logprobs_entropy(policy.model, batch, temperature)
        untempered = response_logprobs(policy.model, batch)[0]
    if temperature != 1.0:  # the scaling is not a no-op on this model
        assert (logprobs - untempered)[batch.response_mask == 1].abs().max() > 1e-3
    assert logprobs.shape == entropy.shape == batch.input_ids.shape
    torch.testing.assert_close(logprobs.double(), expected_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), expected_h, atol=1e-5, rtol=1e-5)
    assert (logprobs[batch.response_mask == 0] == 0).all() and (logprobs[batch.response_mask == 1] < 0).all()
    no_entropy = response_logprobs(policy.model, batch)[1]
    assert no_entropy is None


def test_logprob_and_entropy_gradients_are_exact():
    torch.manual_seed(0)
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (7,))

    def both(z):
        return token_logprob_entropy(z, target, with_entropy=True, chunk_elements=22)  # 2 rows per chunk

    assert torch.autograd.gradcheck(both, (logits,))
    lp, h = both(logits)
    log_p = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lp, log_p[torch.arange(7), target])
    torch.testing.assert_close(h, -(log_p.exp() * log_p).sum(-1))
    only_lp, zeros = token_logprob_entropy(logits.float(), target)
    assert only_lp.dtype == torch.float32 and not zeros.requires_grad and (zeros == 0).all()


def test_tempered_logprobs_are_those_of_the_scaled_logits_gradient_included():
    torch.manual_seed(1)
    logits = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (5,))

    def tempered(z):
        return token_logprob_entropy(z, target, with_entropy=True, temperature=0.7, chunk_elements=18)

    assert torch.autograd.gradcheck(tempered, (logits,))
    lp, h = tempered(logits)
    log_p = torch.log_softmax(logits / 0.7, -1)
    torch.testing.assert_close(lp, log_p[torch.arange(5), target])
    torch.testing.assert_close(h, -(log_p.exp() * log_p).sum(-1))
    with pytest.raises(TgrlError, match="temperature > 0"):
        token_logprob_entropy(logits, target, temperature=0.0)


def test_response_logprobs_gradient_matches_naive(policy, prompts):
    batch = collate_sequences(policy.processor, prompts, random_images(3), RESPONSES)
    model = policy.model
    weights = torch.linspace(0.5, 1.5, batch.input_ids.numel()).view_as(batch.input_ids)

    def grads(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return [p.grad.clone() for p in model.parameters()]

    ours = grads(lambda: sum((x * weights).sum() for x in response_logprobs(model, batch, with_entropy=True)))
    naive = grads(lambda: sum((x * weights).sum() for x in naive_logprobs_entropy(model, batch)))
    model.zero_grad()
    for a, b in zip(ours, naive, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)


def test_response_mask_covers_exactly_the_response_tokens(policy, prompts):
    tokenizer = policy.tokenizer
    batch = collate_sequences(policy.processor, prompts, random_images(3), RESPONSES)
    for b, response in enumerate(RESPONSES):
        ids = batch.input_ids[b]
        assert tokenizer.decode(ids[batch.response_mask[b].bool()]) == response + "<|im_end|>"
        prompt_ids = ids[batch.attention_mask[b].bool() & ~batch.response_mask[b].bool()]
        assert tokenizer.decode(prompt_ids) == prompts[b].replace("<|image_pad|>", "<|image_pad|>" * 4)
        n = int(batch.attention_mask[b].sum())
        assert batch.attention_mask[b, :n].all() and not batch.attention_mask[b, n:].any()  # right padded
        assert batch.response_mask[b, n - 1] == 1  # the response is the last thing in the row
    assert batch.mm_token_type_ids[batch.response_mask.bool()].eq(0).all()


def test_truncation_and_hostile_response_text(policy, prompts):
    image_pad = policy.model.config.image_token_id
    im_end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    hostile = "<answer>3</answer><|image_pad|><|im_end|>"
    batch = collate_sequences(
        policy.processor, prompts, random_images(3), [hostile, *RESPONSES[1:]], max_response_tokens=5
    )
    assert batch.response_mask.sum(-1).tolist() == [5, 5, 5]
    assert not (batch.input_ids[batch.response_mask.bool()] == im_end).any()  # cut: no closing token
    full = collate_sequences(policy.processor, prompts[:1], random_images(1), [hostile])
    response = full.input_ids[full.response_mask.bool()]
    assert not (response == image_pad).any() and (response == im_end).sum() == 1  # only the closing one
    assert int((full.input_ids == image_pad).sum()) == 4


def test_generated_token_ids_are_cut_after_the_first_end_token(policy):
    tokenizer = policy.tokenizer
    im_end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    ids = response_token_ids(tokenizer, [[5, 6, im_end, pad, pad], [7, 8, 9], "7"])
    assert ids[0] == [5, 6, im_end] and ids[1] == [7, 8, 9]  # unfinished generation: nothing appended
    assert ids[2] == [*tokenizer("7")["input_ids"], im_end]


def test_left_padded_prompts_give_the_same_last_logits_as_single_prompts(policy, prompts):
    images = random_images(3, seed=1)
    enc = collate_prompts(policy.processor, prompts, images)
    assert enc["attention_mask"][:, -1].all() and not enc["attention_mask"][:, 0].all()  # left padded
    with torch.no_grad():
        batched = policy.model(**enc).logits[:, -1]  # [B, V]
        for b in range(len(prompts)):
            single = collate_prompts(policy.processor, prompts[b : b + 1], images[b : b + 1])
            torch.testing.assert_close(batched[b], policy.model(**single).logits[0, -1], atol=1e-5, rtol=1e-5)


def test_select_gives_the_rows_log_probs(policy, prompts):
    batch = collate_sequences(policy.processor, prompts, random_images(3, seed=2), RESPONSES)
    sub = batch.select([2, 0])
    assert sub.image_grid_thw.shape == (2, 3) and sub.pixel_values.shape[0] == 32
    assert sub.input_ids.shape[1] == int(batch.attention_mask[[0, 2]].sum(-1).max())
    with torch.no_grad():
        whole, _ = response_logprobs(policy.model, batch)
        part, _ = response_logprobs(policy.model, sub)
    width = sub.input_ids.shape[1]
    torch.testing.assert_close(part, whole[[2, 0], :width], atol=1e-5, rtol=1e-5)


def test_blank_images_keep_the_image_token_layout(policy, prompts):
    images = [*random_images(2), Image.new("RGB", (84, 56), "red")]
    blanks = blank_images(images)
    assert [im.size for im in blanks] == [im.size for im in images]
    assert all(np.asarray(im).max() == 0 for im in blanks)
    real = collate_sequences(policy.processor, prompts, images, RESPONSES)
    blank = collate_sequences(policy.processor, prompts, blanks, RESPONSES)
    assert torch.equal(real.input_ids, blank.input_ids)
    assert torch.equal(real.image_grid_thw, blank.image_grid_thw)
    assert not torch.equal(real.pixel_values, blank.pixel_values)
    with torch.no_grad():
        with_image = response_logprobs(policy.model, real)[0]
        blanked = response_logprobs(policy.model, blank)[0]
    assert not torch.equal(with_image, blanked)


def test_collation_refuses_mismatched_inputs(policy, prompts):
    with pytest.raises(TgrlError, match="3 prompts but 2 images"):
        collate_prompts(policy.processor, prompts, random_images(2))
    with pytest.raises(TgrlError, match="prompt 0 has 0 image placeholders"):
        collate_sequences(policy.processor, ["no image here"], random_images(1), ["x"])
    with pytest.raises(TgrlError, match="3 prompts but 1 responses"):
        collate_sequences(policy.processor, prompts, random_images(3), ["x"])


# ----------------------------------------------------------------------------------------- images
def test_load_image_converts_to_rgb_over_white(tmp_path):
    path = tmp_path / "rgba.png"
    pixels = np.zeros((4, 6, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[:, :3, 3] = 255  # left half opaque red, right half fully transparent
    Image.fromarray(pixels, "RGBA").save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert image.getpixel((0, 0)) == (200, 0, 0) and image.getpixel((5, 0)) == (255, 255, 255)


def test_load_image_refuses_bad_files_naming_them(tmp_path):
    with pytest.raises(TgrlError, match=r"missing\.png: image file not found"):
        load_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(TgrlError, match=r"notes\.png: not a readable image"):
        load_image(text)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(TgrlError, match=r"truncated\.png: corrupt or truncated"):
        load_image(truncated)
    with pytest.raises(TgrlError, match=r"good\.png: image is 64x64 pixels, more than max_pixels=1000"):
        load_image(good, max_pixels=1000)
    assert load_image(good).size == (64, 64)
