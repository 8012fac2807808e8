"""Policy models: build the tiny offline VLM, load a policy (tiny or real Qwen2-VL / Qwen2.5-VL), save one.

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
Checkpoints are safetensors only: `load_policy` refuses pickle weights (`*.bin`, `*.pt`, `*.pkl`, ...).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from tgrl_lib.errors import TgrlError

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
TINY_VOCAB = 1024  # at most this many BPE entries + special tokens; the embedding has len(tokenizer) rows
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")

# Qwen-style ChatML; content is a string or a list of {"type": "image"} / {"type": "text", "text": ...}.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}" + IMAGE_PLACEHOLDER + ""
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class QwenVLImageTextProcessor(Qwen2_5_VLProcessor):
    """The Qwen2.5-VL processor for images and text only (no video processor, so no torchvision).
    Works for the tiny model and for real Qwen2-VL / Qwen2.5-VL checkpoints."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        super(Qwen2_5_VLProcessor, self).__init__(image_processor, tokenizer, chat_template=chat_template)


def _register_processor() -> None:
    """Make `AutoProcessor` find `QwenVLImageTextProcessor` by the name saved in `processor_config.json`.
    Also the fallback for a Qwen2.5-VL directory that names no processor class (images + text suffice)."""
    from transformers import AutoProcessor, Qwen2_5_VLConfig

    AutoProcessor.register(Qwen2_5_VLConfig, QwenVLImageTextProcessor, exist_ok=True)


_register_processor()


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


def train_tokenizer(corpus: Iterable[str] = (), vocab_size: int = TINY_VOCAB):
    """A Qwen2 byte-level BPE tokenizer trained on `builtin_corpus() + corpus` (deterministic)."""
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
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*builtin_corpus(), *corpus], trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    vocab = dict(state["vocab"])
    for token in SPECIAL_TOKENS:  # special ids follow the BPE entries, in Qwen's order
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=4096,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
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


# --------------------------------------------------------------------------------- load / save
@dataclass
class Policy:
    """A loaded policy: the HF model, its processor (tokenizer + image processor) and where it came from."""

    model: Any
    processor: Any
    path: Path

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)


def check_checkpoint_dir(path: Path) -> None:
    """Refuse what `load_policy` must not read: no directory, no config.json, pickle-only weights."""
    if not path.is_dir():
        raise TgrlError("model directory does not exist", path=path, hint="pass a directory or s3:// URI")
    if not (path / "config.json").is_file():
        raise TgrlError("not a model directory: config.json is missing", path=path)
    if any(path.glob("*.safetensors")):
        return
    for pattern in PICKLE_WEIGHTS:
        for found in sorted(path.glob(pattern)):
            raise TgrlError(
                "refusing pickle weights (they can run code when loaded); only safetensors are accepted",
                path=found,
                hint="convert the checkpoint to safetensors (save_pretrained(safe_serialization=True))",
            )
    raise TgrlError("no *.safetensors weights in the model directory", path=path)


def _resolve_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise TgrlError(f"unknown dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16")


def _load_processor(path: Path, trust_remote_code: bool) -> Any:
    """`AutoProcessor`, except for a Qwen-VL checkpoint when torchvision (its video processor) is missing."""
    import importlib.util

    from transformers import AutoProcessor

    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type in ("qwen2_vl", "qwen2_5_vl") and importlib.util.find_spec("torchvision") is None:
        return QwenVLImageTextProcessor.from_pretrained(path)
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_policy(
    path_or_uri: str | Path, *, dtype: Any = None, device: Any = None, trust_remote_code: bool = False
) -> Policy:
    """Load a policy from a local directory, `file://` or `s3://` URI (fetched via `storage.localize`).

    Safetensors only; `trust_remote_code` only when asked. `dtype`: None/"auto" (as saved), a torch dtype
    or its name. Image-text models load with `AutoModelForImageTextToText`, text-only ones with
    `AutoModelForCausalLM`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    text = str(path_or_uri)
    if "://" in text:
        from tgrl_lib.store.artifacts import localize

        path = Path(localize(text))
    else:
        path = Path(text)
    check_checkpoint_dir(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    auto = (
        AutoModelForImageTextToText
        if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
        else AutoModelForCausalLM
    )
    try:
        model = auto.from_pretrained(
            path, dtype=_resolve_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
        processor = _load_processor(path, trust_remote_code)
    except (OSError, ValueError) as err:
        raise TgrlError(f"cannot load the model: {err}", path=path) from err
    if device is not None:
        model = model.to(device)
    return Policy(model=model.eval(), processor=processor, path=path)


def save_policy(policy_or_model: Any, processor: Any | None, out_dir: str | Path) -> Path:
    """Save weights (safetensors), config, generation config and processor into `out_dir`; `processor`
    may be None when a `Policy` is given (its own processor is saved)."""
    model = policy_or_model.model if isinstance(policy_or_model, Policy) else policy_or_model
    processor = processor if processor is not None else getattr(policy_or_model, "processor", None)
    if processor is None:
        raise TgrlError(
            "save_policy needs the processor (tokenizer + image processor) to save with the model"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
