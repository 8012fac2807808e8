"""Collation: prompts and prompt + response pairs -> padded model inputs.

- `collate_prompts`: prompts + images -> LEFT-padded model inputs for `generate`.
- `collate_sequences`: prompt + response pairs -> a RIGHT-padded `SequenceBatch` with a `response_mask`.
  Responses are tokenized on their own (never merged with the prompt's last token), with special-token
  text such as "<|image_pad|>" split into plain bytes, so a response can never add image tokens; a text
  response gets the closing <|im_end|>, token ids from `generate` are used as generated.

Prompts are never truncated: image tokens can only be kept whole, and cutting the text of a chat prompt
breaks its template. Both collations check each row's image tokens against its image's vision grid
(`t*h*w / merge**2`, the features the vision tower returns for it), so a mismatch is a `TgrlError` naming
the row instead of the model's "image features and image tokens do not match"; with `max_prompt_tokens`
a longer prompt is refused with its count of image and text tokens (lower the processor's max_pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from tgrl_lib.errors import TgrlError

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


def image_token_counts(processor: Any, input_ids: Tensor) -> Tensor:
    """Image tokens in each row of `input_ids` [B, T] (the processor's image token id). [B]"""
    tokenizer = getattr(processor, "tokenizer", processor)
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE_TOKEN))
    return (input_ids == token_id).sum(-1)


def check_prompt_tokens(
    processor: Any,
    enc: Any,
    images: Sequence[Image.Image] | None,
    rows: Sequence[int],
    max_prompt_tokens: int | None = None,
) -> None:
    """Refuse collated prompts whose image tokens disagree with their images' vision grids, or that are
    longer than `max_prompt_tokens` (image tokens are never cut). `rows[i]`: the caller's row of `enc`'s
    row i (named in errors). One image per prompt, so grid row i belongs to prompt row i."""
    counts = image_token_counts(processor, enc["input_ids"])  # [U]
    grid = enc.get("image_grid_thw")
    if grid is not None and images is not None:
        merge = int(getattr(getattr(processor, "image_processor", None), "merge_size", 2))
        expected = grid.prod(-1) // (merge * merge)  # [U]  vision features per image after the merge
        for i in torch.nonzero(counts != expected).flatten().tolist():
            width, height = images[rows[i]].size
            raise TgrlError(
                f"prompt {rows[i]} has {int(counts[i])} image tokens but its {width}x{height} image gives "
                f"{int(expected[i])} vision features (grid {grid[i].tolist()}, merge {merge})",
                hint="render the prompt with data.prompts.render_prompt and never truncate prompts",
            )
    if max_prompt_tokens is None:
        return
    lengths = enc["attention_mask"].sum(-1)  # [U]
    for i in torch.nonzero(lengths > max_prompt_tokens).flatten().tolist():
        n_image = int(counts[i])
        raise TgrlError(
            f"prompt {rows[i]} has {int(lengths[i])} tokens ({n_image} image tokens + "
            f"{int(lengths[i]) - n_image} text), more than max_prompt_tokens={max_prompt_tokens}; prompts "
            "are never truncated (a cut would drop image tokens or the chat template)",
            hint="lower max_pixels in the model's preprocessor_config.json, shorten the question, or raise "
            "max_prompt_tokens",
        )


def collate_prompts(
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image] | None,
    max_prompt_tokens: int | None = None,
) -> Any:
    """LEFT-padded model inputs (a `BatchFeature`) for `model.generate(**inputs)`; one image per prompt.
    Prompts longer than `max_prompt_tokens` are refused, never cut (see `check_prompt_tokens`)."""
    _check_images(processor, prompts, images)
    enc = processor(
        text=list(prompts),
        images=list(images) if images is not None else None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    check_prompt_tokens(processor, enc, images, range(len(prompts)), max_prompt_tokens)
    return enc


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
    max_prompt_tokens: int | None = None,
) -> SequenceBatch:
    """RIGHT-padded prompt + response sequences with `response_mask`, for log-probs and losses.

    `responses[i]` is text or token ids (see `response_token_ids`); `max_response_tokens` caps each
    response's tokens, closing token included. Prompts are never cut (see `check_prompt_tokens`)."""
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
    check_prompt_tokens(processor, enc, images, firsts, max_prompt_tokens)
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
