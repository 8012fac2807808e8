"""The tiny offline VLM: a Qwen2.5-VL built from a config, with a tokenizer trained offline.

The tiny model is a Qwen2.5-VL (arXiv 2502.13923) built from a config, not downloaded: the same
architecture, M-RoPE, vision tower, patch merger, chat format and special tokens as the released models,
at ~0.68M parameters, so every code path (image tokens, 3D positions, generation, checkpoints) is the real
one and runs on a laptop CPU. What we changed for that:

- the vocabulary is a 1,024-entry byte-level BPE trained offline with `tokenizers` on a built-in corpus of
  short visual-reasoning text (plus any `corpus` given), using Qwen2's own pre-tokenizer (digits split one
  by one); the special tokens follow the BPE entries instead of starting at id 151643;
- the processor (`QwenVLImageTextProcessor`) is the Qwen2.5-VL processor without its video processor,
  so neither it nor the PIL image processor needs torchvision;
- min = max pixels = `image_size**2`: every image becomes one fixed grid (56 px -> [1, 4, 4] patches ->
  4 image tokens after the 2x2 merge).

Everything `build_tiny` writes is a function of `seed` and `corpus` only (byte-identical across builds).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tgrl_lib.errors import TgrlError
from tgrl_lib.models.policy import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM,
    SPECIAL_TOKENS,
    QwenVLImageTextProcessor,
    save_policy,
)

TINY_VOCAB = 1024  # at most this many BPE entries + special tokens; the embedding has len(tokenizer) rows


# ----------------------------------------------------------------------------------- tokenizer
def builtin_corpus() -> list[str]:
    """Short visual-reasoning text in the chat and response format: the tiny tokenizer's training data."""
    from tgrl_lib.data.prompts import MC_INSTRUCTION, SYSTEM_PROMPT, format_choices

    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "brown"]
    shapes = ["circle", "square", "triangle", "star", "rectangle", "bar", "object", "shape"]
    places = ["left", "right", "top", "bottom", "above", "below", "next to", "largest", "smallest", "middle"]
    lines = [
        f"system\n{SYSTEM_PROMPT}\nuser\n{DEFAULT_SYSTEM}\nassistant\n",
        f"Choices:\n{format_choices(['A', 'B', 'C', 'D', 'E'])}\n{MC_INSTRUCTION} A. B. C. D. E.",
        "How many shapes are there? Which colour is the largest shape? What is the total? How many more?",
        "Read the value of each bar in the chart, then compare or add them: sum, difference, subtract.",
        "Think step by step. First look at the image, then reason, then answer. The answer is",
        "0 1 2 3 4 5 6 7 8 9 10 20 3.5 0.25 1/2 \\frac{1}{2} \\boxed{} + - * / = < > % , . ; : ! ? ( )",
        "yes no true false is are of in on and or not with to the a an there than so then it they",
        "one two three four five six seven eight nine ten zero first second third last each every only",
        "count number total sum difference product half double twice more fewer less greater smaller",
        "chart bar value height width length area angle line point axis label title legend scale unit",
        "which what where how many much does do can should would could if because therefore since",
        "see look find compare check note remember given shown image picture figure scene panel",
    ]
    for i, (colour, shape, place) in enumerate(itertools.product(colours, shapes, places)):
        n, m, letter = i % 6, (i * 7) % 5, "ABCDE"[i % 5]
        lines += [
            f"<think>I see {n} {colour} {shape}s and {m} {shape}s {place} the {colour} one. "
            f"{n} + {m} = {n + m}, so there are {n + m}.</think><answer>{n + m}</answer>",
            f"Question: What colour is the {place} {shape}? The {shape} {place} is {colour}.",
            f"<think>The {colour} bar is {n + 2}, the {shape} is {place}.</think><answer>{letter}</answer>",
        ]
    return lines


def train_tokenizer(
    corpus: Iterable[str] = (),
    vocab_size: int = TINY_VOCAB,
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    added_tokens: Sequence[str] = (),
    chat_template: str = CHAT_TEMPLATE,
    model_max_length: int = 4096,
):
    """A Qwen2 byte-level BPE tokenizer trained on `builtin_corpus() + corpus` (deterministic).

    `special_tokens` (the first is the pad token, all others are special too) and then `added_tokens`
    (whole tokens, not special, e.g. Qwen2.5's `<tool_call>`) get the ids after the BPE entries, in order."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens) - len(added_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*builtin_corpus(), *corpus], trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    vocab = dict(state["vocab"])
    for token in (*special_tokens, *added_tokens):  # ids follow the BPE entries, in Qwen's order
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token=special_tokens[0],
        unk_token=None,
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens[1:])})
    if added_tokens:
        tokenizer.add_tokens(list(added_tokens))
    tokenizer.chat_template = chat_template
    if len(tokenizer) > vocab_size:
        raise TgrlError(f"tiny tokenizer has {len(tokenizer)} tokens, more than the vocabulary {vocab_size}")
    return tokenizer


# ---------------------------------------------------------------------------------- tiny model
def tiny_config(tokenizer, image_size: int = 56):
    """The tiny Qwen2.5-VL config (text 128 x 2 layers, vision 64 x 2 blocks), ids from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        "tie_word_embeddings": True,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 128,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny(
    out_dir: str | Path, seed: int = 0, image_size: int = 56, corpus: Iterable[str] | None = None
) -> Path:
    """Build the tiny Qwen2.5-VL (weights from `torch.manual_seed(seed)`), its tokenizer and processor, and
    save them to `out_dir` (safetensors); `AutoProcessor`/`load_policy` reload it. Returns `out_dir`."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if image_size % 28:
        raise TgrlError(f"image_size must be a multiple of 28 (patch 14 x merge 2), got {image_size}")
    tokenizer = train_tokenizer(corpus or ())
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=image_size * image_size, max_pixels=image_size * image_size
    )
    processor = QwenVLImageTextProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
    config = tiny_config(tokenizer, image_size)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    end_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config = GenerationConfig(
        eos_token_id=end_ids,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=config.text_config.bos_token_id,
    )
    return save_policy(model, processor, out_dir)
