"""Policies: load one (the tiny model, or a real Qwen2-VL / Qwen2.5-VL checkpoint), save one.

Checkpoints are safetensors only: `load_policy` refuses pickle weights (`*.bin`, `*.pt`, `*.pkl`, ...).
`QwenVLImageTextProcessor` is the Qwen2.5-VL processor without its video processor, so neither it nor the
PIL image processor needs torchvision; it serves the tiny model and real checkpoints alike.
"""

from __future__ import annotations

import json
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
