"""`tgrl data synth | import | validate`: make, import and check problem datasets.

Exit codes: 0 on success; 1 when `validate` finds problems (one `file:line: reason` per problem on stderr);
2 on errors (bad arguments, unusable input, nothing imported).
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="make, import and validate problem datasets",
        description="Problem datasets: synthesise the visual-reasoning benchmark, import standard "
        "benchmarks, validate a dataset directory.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _add_synth(sub)
    _add_import(sub)
    _add_validate(sub)


def _add_synth(sub: argparse._SubParsersAction) -> None:
    synth = sub.add_parser(
        "synth",
        help="synthesise visual-reasoning problems (images + ground-truth facts)",
        description=(
            "Write N synthetic problems (count-and-arithmetic, bar charts, spatial relations, "
            "largest/leftmost attribute; easy and hard) into the dataset directory --out. Same arguments, "
            "byte-identical output. With --n-test M, --out gets two datasets instead: --out/train (N "
            "problems) and --out/test (M problems) that share no image and no (question, facts) pair with "
            "train. A previous dataset in the output directory is replaced; a directory holding other files "
            "is refused."
        ),
    )
    synth.add_argument("--out", required=True, help="output dataset directory (or root of train/ and test/)")
    synth.add_argument(
        "--n", type=int, required=True, help="number of problems (train problems with --n-test)"
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    synth.add_argument(
        "--split", choices=("train", "test"), help="split name written into the records (default: train); "
        "not with --n-test",
    )  # fmt: skip
    synth.add_argument(
        "--n-test", type=int, help="also write a disjoint held-out split: --out/train and --out/test"
    )
    synth.add_argument(
        "--image-size", type=int, default=56, help="image side in pixels, a multiple of 28 >= 56"
    )
    synth.add_argument(
        "--families", nargs="+", metavar="FAMILY",
        help="task families (default: all): count_color_arith bar_chart spatial largest_attribute",
    )  # fmt: skip
    synth.add_argument(
        "--difficulties",
        nargs="+",
        metavar="LEVEL",
        default=["easy", "hard"],
        help="levels (default: easy hard)",
    )
    synth.set_defaults(func=_synth)


def _add_import(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser(
        "import",
        help="import a standard benchmark (MathVista, MathVerse, MathVision, WeMath, DynaMath, LogicVista)",
        description=(
            "Convert a published benchmark file (.json, .jsonl, .parquet or a folder of parquet shards) into "
            "a problems dataset at --out, copying its images into --out/images. Rows that cannot be imported "
            "(missing fields, wrong types, missing/broken/oversized images, unsafe paths, duplicates) go to "
            "a rejected dataset (default: <out>-rejected) with file, row and reason; input rows = imported + "
            "rejected. Exit 2 when the input is unusable as a whole or no row could be imported."
        ),
    )
    imp.add_argument(
        "--format",
        required=True,
        choices=("mathvista", "mathverse", "mathvision", "wemath", "dynamath", "logicvista"),
    )
    imp.add_argument("--in", dest="in_path", required=True, help="benchmark file or folder of parquet shards")
    imp.add_argument("--images", help="folder that image paths are relative to (default: the input's folder)")
    imp.add_argument("--out", required=True, help="output problems dataset directory")
    imp.add_argument("--rejected", help="rejected rows dataset directory (default: <out>-rejected)")
    imp.add_argument(
        "--split", help="split name for every row (default: the row's own, else from the file name)"
    )
    imp.set_defaults(func=_import)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    val = sub.add_parser(
        "validate",
        help="check a dataset directory (manifest, hashes, every row, every image)",
        description="Exit 0 when DIR is a valid dataset; otherwise print one line per problem "
        "(`.../records.jsonl:LINE: reason`) on stderr and exit 1. Every file the manifest lists must be "
        "present and match its sha256; every image is opened the way training opens it (header, pixel "
        "and aspect-ratio caps, decoded); a problems or trajectories dataset without records is refused.",
    )
    val.add_argument("dir", help="dataset directory")
    val.add_argument(
        "--fast", action="store_true", help="read only the image headers (format, size), do not decode them"
    )
    val.set_defaults(func=_validate)


def _synth(args: argparse.Namespace) -> int:
    from tgrl_lib.data.synthetic import synthesize, synthesize_splits
    from tgrl_lib.errors import TgrlError

    common = {
        "seed": args.seed,
        "image_size": args.image_size,
        "families": args.families,
        "difficulties": args.difficulties,
    }
    if args.n_test is not None:
        if args.split is not None:
            raise TgrlError("--split and --n-test cannot be combined", hint="--n-test writes both splits")
        manifests = synthesize_splits(args.out, args.n, args.n_test, **common)
        print(
            f"wrote {manifests['train'].count} train problems to {args.out}/train and "
            f"{manifests['test'].count} test problems to {args.out}/test"
        )
        return 0
    manifest = synthesize(args.out, n=args.n, split=args.split or "train", **common)
    print(f"wrote {manifest.count} {args.split or 'train'} problems to {args.out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from tgrl_lib.data.importers import import_benchmark

    report = import_benchmark(
        args.format, args.in_path, args.out, args.images, rejected_dir=args.rejected, split=args.split
    )
    print(report.render())
    for line in report.examples[:10]:
        print(f"rejected {line}", file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from tgrl_lib.data.schema import read_manifest
    from tgrl_lib.data.validate import validate_dataset

    problems = validate_dataset(args.dir, decode_images=not args.fast)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    manifest = read_manifest(args.dir)
    print(f"{args.dir}: valid {manifest.kind} dataset, {manifest.count} records")
    return 0
