"""Tensor plumbing shared by the trainer, the likelihood filter, visual-dependency weighting and evaluation.

- `collate_prompts`: prompts + images -> LEFT-padded model inputs for `generate`.
- `collate_sequences`: prompt + response pairs -> a RIGHT-padded `SequenceBatch` with a `response_mask`.
  Responses are tokenized on their own (never merged with the prompt's last token), with special-token
  text such as "<|image_pad|>" split into plain bytes, so a response can never add image tokens; a text
  response gets the closing <|im_end|>, token ids from `generate` are used as generated.
- `response_logprobs`: log p(token) of every response token, and optionally the policy entropy there.
  Only the positions that predict response tokens get logits (`logits_to_keep`), and the log-softmax is
  never materialised: `token_logprob_entropy` computes `z[y] - logsumexp(z)` in fp32 chunks and its
  backward recomputes the softmax chunk by chunk, so the only [N, V] tensors are the logits themselves and
  their gradient (TRL's `selective_log_softmax` has the same goal; the custom backward is ours).
- `shared_prefix_logprobs`: the same log-probs with each group's shared prompt encoded once (prefix KV
  cache copied to its rows): the update's passes at about half the work.
- `blank_images`, `load_image`: images for the visual-dependency forward, and safe image loading.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from tgrl_lib.errors import TgrlError

DEFAULT_MAX_PIXELS = 6000 * 6000  # refuse bigger images (decompression bombs) before decoding them
END_OF_TURN = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"


@dataclass
class SequenceBatch:
    """Prompt + response token sequences (right padded) with their images; one image per row, or none."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]  1 on real tokens
    response_mask: Tensor  # [B, T]  1 on response tokens (incl. the closing <|im_end|>)
    pixel_values: Tensor | None = None  # [P, C*t*p*p]  image patches of all rows, row after row
    image_grid_thw: Tensor | None = None  # [B, 3]  patch grid of each row's image
    mm_token_type_ids: Tensor | None = None  # [B, T]  1 on image tokens (Qwen-VL 3D positions need it)

    def to(self, device: Any) -> SequenceBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if v is not None})

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for the model's forward."""
        names = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(-1)  # [B]

    def select(self, rows: Sequence[int] | Tensor) -> SequenceBatch:
        """The sub-batch of `rows` (e.g. a micro-batch), padding columns no selected row uses dropped."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)  # [b]
        width = int(self.attention_mask[idx].sum(-1).max()) if len(idx) else 0
        pick = {n: getattr(self, n)[idx, :width] for n in ("input_ids", "attention_mask", "response_mask")}
        if self.mm_token_type_ids is not None:
            pick["mm_token_type_ids"] = self.mm_token_type_ids[idx, :width]
        if self.pixel_values is not None and self.image_grid_thw is not None:
            patches = self.image_grid_thw.prod(-1)  # [B]  patches per row's image
            starts = torch.cumsum(patches, 0) - patches  # [B]
            pieces = [self.pixel_values[int(starts[i]) : int(starts[i] + patches[i])] for i in idx.tolist()]
            pick["pixel_values"] = torch.cat(pieces) if pieces else self.pixel_values[:0]
            pick["image_grid_thw"] = self.image_grid_thw[idx]
        return SequenceBatch(**pick)


# -------------------------------------------------------------------------------------- collation
def _check_images(processor: Any, prompts: Sequence[str], images: Sequence[Image.Image] | None) -> None:
    token = getattr(processor, "image_token", IMAGE_TOKEN)
    if images is not None and len(images) != len(prompts):
        raise TgrlError(f"{len(prompts)} prompts but {len(images)} images", hint="pass one image per prompt")
    for i, prompt in enumerate(prompts):
        expected = 0 if images is None else 1
        if prompt.count(token) != expected:
            raise TgrlError(
                f"prompt {i} has {prompt.count(token)} image placeholders, expected {expected}",
                hint=(
                    "render prompts with tgrl_lib.data.prompts.render_prompt (with_image matches the images)"
                ),
            )


def collate_prompts(processor: Any, prompts: Sequence[str], images: Sequence[Image.Image] | None) -> Any:
    """LEFT-padded model inputs (a `BatchFeature`) for `model.generate(**inputs)`; one image per prompt."""
    _check_images(processor, prompts, images)
    return processor(
        text=list(prompts),
        images=list(images) if images is not None else None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )


def _end_ids(tokenizer: Any) -> tuple[int, set[int]]:
    """The id closing an assistant turn (<|im_end|>, else EOS) and every id that ends a generation."""
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end is None or end == tokenizer.unk_token_id:
        end = tokenizer.eos_token_id
    stops = {end, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    return end, stops


def response_token_ids(
    tokenizer: Any, responses: Sequence[str | Sequence[int]], max_tokens: int | None = None
) -> list[list[int]]:
    """Token ids of each response. Text: tokenized alone (special-token text split into bytes) plus the
    closing <|im_end|>. Ids (from `generate`): kept up to and including the first end token, nothing
    added. Then cut to `max_tokens` (a cut response has no closing token)."""
    end, stops = _end_ids(tokenizer)
    texts = [r for r in responses if isinstance(r, str)]
    encoded = iter(
        tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
    )
    out = []
    for response in responses:
        if isinstance(response, str):
            ids = [*next(encoded), end]
        else:
            ids = [int(t) for t in response]
            stop_at = next((i for i, t in enumerate(ids) if t in stops), None)
            ids = ids if stop_at is None else ids[: stop_at + 1]
        out.append(ids[:max_tokens] if max_tokens is not None else ids)
    return out


def collate_sequences(
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image] | None,
    responses: Sequence[str | Sequence[int]],
    max_response_tokens: int | None = None,
) -> SequenceBatch:
    """RIGHT-padded prompt + response sequences with `response_mask`, for log-probs and losses.

    `responses[i]` is text or token ids (see `response_token_ids`); `max_response_tokens` caps each
    response's tokens, closing token included."""
    if len(responses) != len(prompts):
        raise TgrlError(f"{len(prompts)} prompts but {len(responses)} responses")
    _check_images(processor, prompts, images)
    source, firsts = _distinct_prompts(prompts, images)  # [B] -> row of `firsts`; a group's G rows share one
    enc = processor(
        text=[prompts[i] for i in firsts],
        images=[images[i] for i in firsts] if images is not None else None,
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    response_ids = response_token_ids(tokenizer, responses, max_response_tokens)
    prompt_len = enc["attention_mask"].sum(-1)[source].tolist()  # [B]
    width = max(p + len(r) for p, r in zip(prompt_len, response_ids, strict=True))
    B = len(prompts)
    input_ids = torch.full((B, width), tokenizer.pad_token_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((B, width), dtype=torch.long)  # [B, T]
    response_mask = torch.zeros((B, width), dtype=torch.long)  # [B, T]
    mm_types = torch.zeros((B, width), dtype=torch.long) if "mm_token_type_ids" in enc else None  # [B, T]
    for b, (p, ids, u) in enumerate(zip(prompt_len, response_ids, source, strict=True)):
        input_ids[b, :p] = enc["input_ids"][u, :p]
        input_ids[b, p : p + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, : p + len(ids)] = 1
        response_mask[b, p : p + len(ids)] = 1
        if mm_types is not None:
            mm_types[b, :p] = enc["mm_token_type_ids"][u, :p]
    pixel_values, grid = enc.get("pixel_values"), enc.get("image_grid_thw")
    if pixel_values is not None and grid is not None and len(firsts) < B:
        patches = grid.prod(-1)  # [U]  patches per distinct image
        starts = torch.cumsum(patches, 0) - patches  # [U]
        pixel_values = torch.cat([pixel_values[int(starts[u]) : int(starts[u] + patches[u])] for u in source])
        grid = grid[source]  # [B, 3]
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        pixel_values=pixel_values,
        image_grid_thw=grid,
        mm_token_type_ids=mm_types,
    )


def _distinct_prompts(
    prompts: Sequence[str], images: Sequence[Image.Image] | None
) -> tuple[list[int], list[int]]:
    """Rows with the same prompt and the same image object are processed once: (for each row the index of
    its distinct pair, the first row of each distinct pair). The processor's output for a row does not
    depend on the other rows (padding is cut off), so the collated tensors are the same either way."""
    seen: dict[tuple[str, int], int] = {}
    source, firsts = [], []
    for i, prompt in enumerate(prompts):
        key = (prompt, id(images[i]) if images is not None else 0)
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(i)
        source.append(seen[key])
    return source, firsts


# ------------------------------------------------------------------------------------- log-probs
class _TokenLogProbEntropy(torch.autograd.Function):
    """logp[n] = z[n, y_n] - logsumexp(z[n]) and H[n] = -sum_v p log p, in chunks of rows; the backward
    recomputes softmax per chunk: dlogp/dz = onehot(y) - p, dH/dz = -p * (log p + H)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, with_entropy: bool, chunk: int):  # [N, V], [N]
        compute = torch.promote_types(logits.dtype, torch.float32)
        N = logits.shape[0]
        lse = logits.new_empty(N, dtype=compute)  # [N]
        logp = logits.new_empty(N, dtype=compute)  # [N]
        entropy = logits.new_zeros(N, dtype=compute)  # [N]
        for s in range(0, N, chunk):
            z = logits[s : s + chunk].to(compute)  # [n, V]
            lse[s : s + chunk] = torch.logsumexp(z, dim=-1)
            logp[s : s + chunk] = z.gather(-1, target[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
            if with_entropy:
                p = torch.exp(z - lse[s : s + chunk, None])  # [n, V]
                entropy[s : s + chunk] = lse[s : s + chunk] - (p * z).sum(-1)
        ctx.save_for_backward(logits, target, lse, entropy)
        ctx.chunk = chunk
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):
        logits, target, lse, entropy = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # [N, V]
        for s in range(0, logits.shape[0], ctx.chunk):
            rows = slice(s, s + ctx.chunk)
            log_p = logits[rows].to(lse.dtype) - lse[rows, None]  # [n, V]
            p = torch.exp(log_p)
            g = torch.zeros_like(p)
            if grad_logp is not None:
                g -= p * grad_logp[rows, None]
                g.scatter_add_(-1, target[rows, None], grad_logp[rows, None].to(g.dtype))
            if grad_entropy is not None:
                g -= p * (log_p + entropy[rows, None]) * grad_entropy[rows, None]
            grad[rows] = g.to(grad.dtype)
        return grad, None, None, None


def token_logprob_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    with_entropy: bool = False,
    temperature: float = 1.0,
    chunk_elements: int = 2**25,
) -> tuple[Tensor, Tensor]:
    """Per-row log-prob of `target` and entropy of softmax(`logits` / `temperature`), both fp32 (fp64 for
    fp64 logits). logits [N, V], target [N] -> ([N], [N]); entropy is zeros unless `with_entropy`.
    A temperature other than 1 scores under the distribution a rollout at that temperature samples from
    (pure temperature sampling: no top-k / top-p), at the cost of one scaled copy of the logits."""
    if temperature <= 0:
        raise TgrlError(f"log-probs need a temperature > 0, got {temperature}")
    if temperature != 1.0:
        logits = logits / temperature
    chunk = max(1, chunk_elements // max(1, logits.shape[-1]))
    return _TokenLogProbEntropy.apply(logits, target, with_entropy, chunk)


def response_logprobs(
    model: Any, batch: SequenceBatch, *, with_entropy: bool = False, temperature: float = 1.0
) -> tuple[Tensor, Tensor | None]:
    """log p(token | prefix, image) on every response token, [B, T] aligned with `response_mask` (0
    elsewhere), and the policy entropy at those tokens ([B, T], or None), both of the policy at
    `temperature` (logits / temperature). Differentiable when grad is on."""
    mask = batch.response_mask.bool()  # [B, T]
    B, T = mask.shape
    logprobs = torch.zeros((B, T), dtype=torch.float32, device=mask.device)
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    if not mask.any():
        return logprobs, entropy
    first = int(mask.float().argmax(-1)[mask.any(-1)].min())  # first response column of any row
    if first == 0:
        raise TgrlError("a response starts at position 0: every sequence needs a prompt before its response")
    out = model(**batch.model_inputs(), use_cache=False, logits_to_keep=T - first + 1)
    logits = out.logits[:, :-1]  # [B, T - first, V]  position t predicts token t + 1
    predicted = mask[:, first:]  # [B, T - first]
    lp, ent = token_logprob_entropy(
        logits[predicted],
        batch.input_ids[:, first:][predicted],
        with_entropy=with_entropy,
        temperature=temperature,
    )  # [N], [N]
    logprobs = logprobs.to(lp.dtype).masked_scatter(mask, lp)
    if entropy is not None:
        entropy = entropy.to(ent.dtype).masked_scatter(mask, ent)
    return logprobs, entropy


def shared_prefix_logprobs(
    model: Any, batch: SequenceBatch, *, with_entropy: bool = False, temperature: float = 1.0
) -> tuple[Tensor, Tensor | None] | None:
    """`response_logprobs` with each distinct prompt (tokens and image) encoded once.

    The G rows of a group share their prompt, which is most of a sequence, so this runs the distinct
    prompts (minus their last token) once with a KV cache, copies the cache to the rows, and continues
    every row from its last prompt token through its response, with the 3D (M-RoPE) positions the full
    forward would use. Same values as `response_logprobs` up to float rounding (~1e-6 on the tiny
    model), about half its work at G=8; differentiable when grad is on (the copied cache sums its rows'
    gradients into the shared prompt). Two forwards per call: pass an unwrapped model (DDP wants one
    forward per backward). Returns None when this does not apply (no shared prompt, no image, a model
    without `get_rope_index`, image tokens after the prompt): use `response_logprobs`."""
    core = getattr(model, "model", None)
    if batch.pixel_values is None or batch.image_grid_thw is None or batch.mm_token_type_ids is None:
        return None
    if not hasattr(core, "get_rope_index"):
        return None
    mask = batch.response_mask.bool()  # [B, T]
    B, T = mask.shape
    starts = torch.where(mask.any(-1), mask.float().argmax(-1), batch.attention_mask.sum(-1)).long()  # [B]
    if int(starts.min()) < 2:
        return None
    source, firsts = _distinct_prefixes(batch, starts - 1)
    if len(firsts) == B:
        return None
    ends = batch.attention_mask.sum(-1)  # [B]
    steps = torch.arange(T, device=mask.device)
    if bool((batch.mm_token_type_ids * (steps[None] >= (starts - 1)[:, None])).any()):
        return None  # image tokens after the prefix: the continuation cannot carry them
    positions, _ = core.get_rope_index(
        input_ids=batch.input_ids,
        mm_token_type_ids=batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw,
        attention_mask=batch.attention_mask,
    )  # [3, B, T]
    # 1. the distinct prefixes (prompt minus its last token), right padded, with their images
    rows = torch.tensor(firsts, device=mask.device)  # [U]
    lengths = starts[rows] - 1  # [U]
    P = int(lengths.max())
    prefix_mask = (steps[None, :P] < lengths[:, None]).long()  # [U, P]
    prefix = batch.select(rows)
    out = model(
        input_ids=batch.input_ids[rows, :P] * prefix_mask,
        attention_mask=prefix_mask,
        position_ids=positions[:, rows, :P],
        pixel_values=prefix.pixel_values,
        image_grid_thw=prefix.image_grid_thw,
        mm_token_type_ids=batch.mm_token_type_ids[rows, :P],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    index = torch.tensor(source, device=mask.device)  # [B]  row -> its prefix
    cache.batch_select_indices(index)
    # 2. every row from its last prompt token on: columns starts-1 .. ends-1 of the batch
    C = int((ends - starts + 1).max())
    valid = steps[None, :C] < (ends - starts + 1)[:, None]  # [B, C]
    columns = torch.where(valid, (starts - 1)[:, None] + steps[None, :C], 0)  # [B, C]
    input_ids = batch.input_ids.gather(1, columns) * valid  # [B, C]
    out = model(
        input_ids=input_ids,
        attention_mask=torch.cat([prefix_mask[index], valid.long()], dim=1),  # [B, P + C]
        position_ids=positions.gather(2, columns[None].expand(3, -1, -1)),  # [3, B, C]
        past_key_values=cache,
        use_cache=True,
    )
    predicted = mask.gather(1, columns[:, 1:]) & valid[:, 1:]  # [B, C - 1]  column c predicts c + 1
    lp, ent = token_logprob_entropy(
        out.logits[:, :-1][predicted],
        input_ids[:, 1:][predicted],
        with_entropy=with_entropy,
        temperature=temperature,
    )  # [N], [N]
    logprobs = torch.zeros((B, T), dtype=lp.dtype, device=mask.device).masked_scatter(mask, lp)
    entropy = torch.zeros_like(logprobs).masked_scatter(mask, ent) if with_entropy else None
    return logprobs, entropy


def _distinct_prefixes(batch: SequenceBatch, lengths: Tensor) -> tuple[list[int], list[int]]:
    """Rows whose first `lengths[b]` tokens and image pixels are equal share a prefix: (for each row the
    index of its prefix, the first row of each prefix)."""
    patches = batch.image_grid_thw.prod(-1)  # [B]
    offsets = (torch.cumsum(patches, 0) - patches).tolist()  # [B]
    seen: dict[tuple, int] = {}
    source, firsts = [], []
    for b, (n, start, size) in enumerate(zip(lengths.tolist(), offsets, patches.tolist(), strict=True)):
        pixels = batch.pixel_values[start : start + size]
        key = (tuple(batch.input_ids[b, :n].tolist()), pixels.shape, pixels.cpu().numpy().tobytes())
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(b)
        source.append(seen[key])
    return source, firsts


# ----------------------------------------------------------------------------------------- images
def blank_images(images: Sequence[Image.Image], fill: int = 0) -> list[Image.Image]:
    """Uniform images (black by default, as VPPO blackens patches) of the same sizes, so a blanked
    forward has exactly the same image-token layout as the real one. Images of one size share one blank
    image object (collation then processes it once per prompt); treat them as read-only."""
    blanks: dict[tuple[int, int], Image.Image] = {}
    for image in images:
        if image.size not in blanks:
            blanks[image.size] = Image.new("RGB", image.size, (fill, fill, fill))
    return [blanks[image.size] for image in images]


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels are composited over white instead of showing their hidden colour."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as RGB, refusing missing, truncated, non-image and oversized (> `max_pixels`) files
    with a `TgrlError` naming the file. The size is checked from the header, before decoding."""
    path = Path(path)
    if not path.is_file():
        raise TgrlError("image file not found", path=path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise TgrlError(
                        f"image is {width}x{height} pixels, more than max_pixels={max_pixels}",
                        path=path,
                        hint="downscale it, or raise max_pixels if the file is trusted",
                    )
                image.load()
                return _to_rgb(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise TgrlError(f"not a readable image: {err}", path=path) from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise TgrlError(f"corrupt or truncated image: {err}", path=path) from err
