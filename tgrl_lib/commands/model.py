"""`tgrl model init`: build the tiny offline Qwen2.5-VL-shaped model (`tgrl_lib.models.policy.build_tiny`)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser(
        "model",
        help="build the tiny offline VLM used by tests and the CPU demo",
        description="Models: build the tiny Qwen2.5-VL-shaped model offline (no downloads).",
    )
    sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    init = sub.add_parser(
        "init",
        help="write a freshly initialised tiny model (safetensors, tokenizer, processor)",
        description=(
            "Build the tiny Qwen2.5-VL (2 layers, hidden 128, tiny vision tower, a byte-level BPE tokenizer "
            "trained offline, the Qwen chat template) into --out. Same seed, byte-identical files. The "
            "directory loads with transformers' from_pretrained and with tgrl_lib.models.policy.load_policy."
        ),
    )
    init.add_argument("--preset", choices=("tiny",), default="tiny", help="model preset (default: tiny)")
    init.add_argument("--out", required=True, help="output directory")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    init.add_argument(
        "--image-size", type=int, default=56, help="image side the processor resizes to (multiple of 28)"
    )
    init.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tgrl_lib.errors import TgrlError
    from tgrl_lib.models.tiny import build_tiny

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise TgrlError("refusing to write a model into a non-empty directory that holds no model", path=out)
    build_tiny(out, seed=args.seed, image_size=args.image_size)
    n_params = _count_params(out)
    print(f"tgrl model init: tiny model ({n_params:,} parameters) in {out}")
    return 0


def _count_params(out) -> int:
    import math

    from safetensors import safe_open

    total = 0
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
    return total
