"""`tgrl model init`: build an offline model: the tiny Qwen2.5-VL (`tgrl_lib.models.tiny.build_tiny`) or a
real-shape Qwen2.5-VL / Qwen2-VL preset (`tgrl_lib.models.presets.build_preset`)."""

from __future__ import annotations

import argparse

# the tiny model and the real-shape presets (tgrl_lib.models.presets.PRESETS; kept here so --help stays light)
PRESET_CHOICES = ("tiny", "qwen2.5-vl-real-shape", "qwen2-vl-real-shape")


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser(
        "model",
        help="build an offline VLM (tiny, or real-shape presets) for tests and the CPU demo",
        description="Models: build the tiny Qwen2.5-VL-shaped model or a real-shape preset offline "
        "(no downloads).",
    )
    sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    init = sub.add_parser(
        "init",
        help="write a freshly initialised tiny model (safetensors, tokenizer, processor)",
        description=(
            "Build the tiny Qwen2.5-VL (2 layers, hidden 128, tiny vision tower, a byte-level BPE tokenizer "
            "trained offline, the Qwen chat template) into --out; or, with --preset qwen2.5-vl-real-shape / "
            "qwen2-vl-real-shape, the released model's config, processor settings (dynamic resolution, "
            "patch 14, merge 2), special tokens and chat template at reduced depth and width, random "
            "weights, in a released checkpoint's file layout. Same seed, byte-identical files. The "
            "directory loads with transformers' from_pretrained and with tgrl_lib.models.policy.load_policy."
        ),
    )
    init.add_argument("--preset", choices=PRESET_CHOICES, default="tiny", help="model preset (default: tiny)")
    init.add_argument("--out", required=True, help="output directory")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    init.add_argument(
        "--image-size", type=int, help="tiny only: image side the processor resizes to (x28; default 56)"
    )
    init.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        help="real-shape presets only: weight dtype (default bfloat16, as released)",
    )
    init.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tgrl_lib.errors import TgrlError

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise TgrlError("refusing to write a model into a non-empty directory that holds no model", path=out)
    if args.preset == "tiny":
        from tgrl_lib.models.tiny import build_tiny

        if args.dtype is not None:
            raise TgrlError("--dtype applies to the real-shape presets; the tiny model is float32")
        build_tiny(out, seed=args.seed, image_size=args.image_size or 56)
    else:
        from tgrl_lib.models.presets import build_preset

        if args.image_size is not None:
            raise TgrlError(
                f"--image-size applies to the tiny model only; {args.preset} resizes each image by its own "
                "min/max pixels (preprocessor_config.json, as released)"
            )
        build_preset(args.preset, out, seed=args.seed, dtype=args.dtype or "bfloat16")
    n_params = _count_params(out)
    print(f"tgrl model init: {args.preset} model ({n_params:,} parameters) in {out}")
    return 0


def _count_params(out) -> int:
    import math

    from safetensors import safe_open

    total = 0
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
    return total
