"""Real-shape presets: Qwen2.5-VL and Qwen2-VL as released, at reduced depth and width, random weights.

`tgrl model init --preset qwen2.5-vl-real-shape` (or `qwen2-vl-real-shape`) writes a directory laid out
like a downloaded Instruct checkpoint, so it goes through the same `load_policy` path as one:

- `config.json` in the released flat format (text fields at top level, `rope_scaling: {type: mrope,
  mrope_section: [16, 24, 24]}`, `vision_config` nested), which transformers converts on load;
- `preprocessor_config.json` as released: patch 14, temporal patch 2, merge 2, `min_pixels` 3136,
  `max_pixels` 12845056, the CLIP mean/std, `image_processor_type: Qwen2VLImageProcessor`. `load_policy`
  reads the processor settings from this file, as it does for a real checkpoint (dynamic resolution: an
  image of any size and aspect ratio becomes its own grid of 28 x 28 px tokens);
- the released special tokens in the released order (`<|endoftext|>`, `<|im_start|>`, ... `<|image_pad|>`,
  `<|video_pad|>`, and Qwen2.5-VL's `<tool_call>` ... `<|file_sep|>` as plain added tokens), the released
  chat template (`chat_template.json`), `generation_config.json` with the released stop ids (`<|im_end|>`,
  `<|endoftext|>`) and near-greedy sampling defaults (repetition_penalty 1.05, top_k 1, top_p 0.001,
  temperature 0.1 for Qwen2.5-VL; Qwen2-VL's temperature 0.01 is from memory, not checked against the
  file): a backend that samples from such a checkpoint must override every one of them;
- weights in bfloat16 as released (`dtype` switches to float32), safetensors.

What is real: every dimension that fixes an interface or a code path: patch/merge/temporal sizes, the
text head dim 128 with M-RoPE sections [16, 24, 24] and rope_theta 1e6, the vision head dim 80, Qwen2.5-VL's
112 px attention windows with full-attention blocks interleaved (every 8th block as released, every 2nd
here), grouped-query attention, RMSNorm eps, activations (SiLU; Qwen2-VL's vision tower QuickGELU),
tied (Qwen2-VL-2B) and untied (Qwen2.5-VL-7B) output embeddings, an embedding with more rows than the
tokenizer has tokens (released: 151,936 rows for 151,665 tokens).

What is reduced (memory and 2 CPU cores): depth (2 text layers, 4 / 2 vision blocks), width (text hidden
256 = 2 heads x 128, 1 KV head; vision hidden 160 = 2 heads x 80) and the vocabulary: the byte-level BPE is
the tiny model's (`tiny.train_tokenizer`, ~1k entries trained offline), so the special tokens have ids
right after the BPE entries instead of 151643.. (their order, roles and the config's ids for them follow
the release). The point is shapes and code paths, not quality: the weights are random.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tgrl_lib.errors import TgrlError

# The released chat template of the Qwen2-VL and Qwen2.5-VL Instruct checkpoints (chat_template.json).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Released special tokens (ids 151643.. in the release), in order; the first is the pad token.
QWEN2_VL_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN25_ADDED = (  # Qwen2.5-VL's further added tokens: whole tokens, not special
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# preprocessor_config.json of the released checkpoints (both families)
RELEASED_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
}

# shared text fields (released values; widths reduced where marked)
_TEXT = {
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 256,  # released 1536 (2B) .. 3584 (7B); 2 heads of the released head dim 128
    "initializer_range": 0.02,
    "intermediate_size": 512,  # released 8960 .. 18944
    "num_attention_heads": 2,  # released 12 .. 28
    "num_hidden_layers": 2,  # released 28 .. 36
    "num_key_value_heads": 1,  # released 2 .. 4 (grouped-query attention kept)
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "use_cache": True,
}


_NEAR_GREEDY = {"top_k": 1, "top_p": 0.001}  # the Instruct checkpoints' sampling defaults


@dataclass(frozen=True)
class Preset:
    """One real-shape preset: the released checkpoint it follows and the fields that differ per family."""

    name: str
    released: str  # the checkpoint whose files this preset imitates
    model_type: str
    architecture: str
    processor_class: str
    added_tokens: tuple[str, ...]
    text: dict[str, Any]  # top-level config.json fields on top of _TEXT
    vision: dict[str, Any]  # vision_config
    model_max_length: int
    generation: dict[str, Any] = field(default_factory=dict)  # sampling defaults of generation_config.json


PRESETS = {
    "qwen2.5-vl-real-shape": Preset(
        name="qwen2.5-vl-real-shape",
        released="Qwen/Qwen2.5-VL-7B-Instruct",
        model_type="qwen2_5_vl",
        architecture="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        added_tokens=QWEN25_ADDED,
        text={"max_position_embeddings": 128000, "max_window_layers": 28, "tie_word_embeddings": False},
        vision={
            "depth": 4,  # released 32
            "hidden_act": "silu",
            "hidden_size": 160,  # released 1280 (16 heads of 80)
            "intermediate_size": 432,  # released 3420
            "num_heads": 2,  # released 16
            "in_chans": 3,
            "out_hidden_size": 256,  # = text hidden_size (released 3584)
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1, 3],  # released [7, 15, 23, 31]: windowed blocks, then a full one
            "tokens_per_second": 2,
        },
        model_max_length=131072,
        generation={"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, **_NEAR_GREEDY},
    ),
    "qwen2-vl-real-shape": Preset(
        name="qwen2-vl-real-shape",
        released="Qwen/Qwen2-VL-2B-Instruct",
        model_type="qwen2_vl",
        architecture="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        added_tokens=(),
        text={"max_position_embeddings": 32768, "max_window_layers": 28, "tie_word_embeddings": True},
        vision={
            "depth": 2,  # released 32
            "embed_dim": 160,  # released 1280 (16 heads of 80)
            "hidden_size": 256,  # merger output = text hidden_size (released 1536)
            "hidden_act": "quick_gelu",
            "mlp_ratio": 4,
            "num_heads": 2,  # released 16
            "in_chans": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        model_max_length=32768,
        generation={"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.01, **_NEAR_GREEDY},
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise TgrlError(f"unknown model preset {name!r}", hint=f"use one of: tiny, {', '.join(PRESETS)}")
    return PRESETS[name]


# -------------------------------------------------------------------------------------- the files
def preset_tokenizer(preset: Preset, corpus: Any = ()) -> Any:
    """The tiny model's offline BPE with the release's special and added tokens and chat template."""
    from tgrl_lib.models.tiny import train_tokenizer

    return train_tokenizer(
        corpus,
        special_tokens=QWEN2_VL_SPECIAL,
        added_tokens=preset.added_tokens,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
        model_max_length=preset.model_max_length,
    )


def embedding_rows(n_tokens: int) -> int:
    """Rows of the embedding: the tokenizer's size rounded up past the next multiple of 256, as released
    (151,665 tokens -> 151,936 rows), so ids the tokenizer never produces exist, as in the release."""
    return math.ceil((n_tokens + 1) / 256) * 256


def released_config(preset: Preset, tokenizer: Any) -> dict[str, Any]:
    """config.json in the released flat format, the token ids taken from `tokenizer`."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL}
    return {
        "architectures": [preset.architecture],
        "model_type": preset.model_type,
        **_TEXT,
        **preset.text,
        "vocab_size": embedding_rows(len(tokenizer)),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": dict(preset.vision),
        "torch_dtype": "bfloat16",
    }


def released_generation_config(preset: Preset, tokenizer: Any) -> dict[str, Any]:
    end, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    return {"bos_token_id": pad, "pad_token_id": pad, "eos_token_id": [end, pad], **preset.generation}


def build_preset(
    name: str, out_dir: str | Path, seed: int = 0, dtype: str = "bfloat16", corpus: Any = ()
) -> Path:
    """Write preset `name` (random weights from `torch.manual_seed(seed)`) into `out_dir` in the released
    file layout; `load_policy(out_dir)` loads it like a downloaded checkpoint. Returns `out_dir`."""
    import torch
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    preset = get_preset(name)
    if dtype not in ("bfloat16", "float32"):
        raise TgrlError(f"preset dtype must be bfloat16 or float32, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = preset_tokenizer(preset, corpus)
    config_json = released_config(preset, tokenizer) | {"torch_dtype": dtype}
    _write_json(out / "config.json", config_json)
    config = AutoConfig.from_pretrained(out)  # the released format, converted as for a download
    model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_class(config).to(getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(**released_generation_config(preset, tokenizer))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _released_layout(out, preset, config_json)
    return out


def _released_layout(out: Path, preset: Preset, config_json: dict[str, Any]) -> None:
    """Replace what transformers wrote in its own format by the files a released checkpoint carries."""
    _write_json(out / "config.json", config_json)
    preprocessor = RELEASED_PREPROCESSOR | {"processor_class": preset.processor_class}
    _write_json(out / "preprocessor_config.json", preprocessor)
    _write_json(out / "chat_template.json", {"chat_template": QWEN_VL_CHAT_TEMPLATE})
    for written in ("processor_config.json", "chat_template.jinja"):
        if (out / written).is_file():
            (out / written).unlink()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config.update(processor_class=preset.processor_class, split_special_tokens=False)
    _write_json(out / "tokenizer_config.json", tokenizer_config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
