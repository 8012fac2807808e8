"""`tgrl data validate`: every check a dataset directory can fail, reported one line each.

Stricter than `schema.load_dataset` (which steps use to read): it also reports every listed file that is
missing, not regular or changed, files the manifest does not list, symlinks, an empty dataset, and every
image opened the way training opens it (`data.images`: header, pixel and aspect-ratio caps, decoded unless
`decode_images=False`, i.e. `--fast`).
"""

from __future__ import annotations

from pathlib import Path

from tgrl_lib.data.images import check_image
from tgrl_lib.data.schema import (
    MANIFEST,
    RECORDS,
    Dataset,
    Manifest,
    Problem,
    load_dataset,
    read_manifest,
    resolve_inside,
    sha256_file,
)
from tgrl_lib.errors import TgrlError


def validate_dataset(root: Path | str, *, decode_images: bool = True) -> list[str]:
    """Every problem with a dataset directory, one line each (`file:line: reason`); empty when valid.

    Checks the manifest, every listed file (present, regular, sha256), every row, that a problems or
    trajectories dataset is not empty, and every image the way training reads it (`data.images.load_image`:
    header, size and aspect-ratio caps, decodable; `decode_images=False` reads only the header)."""
    root = Path(root)
    try:
        manifest = read_manifest(root)
        dataset = load_dataset(root, verify_hashes=False)
    except TgrlError as err:
        return [str(err)]
    problems = [
        f"{root / RECORDS}:{e.line}: {e.reason}" if e.line else f"{root / RECORDS}: {e.reason}"
        for e in dataset.errors
    ]
    if manifest.kind != "rejected" and not dataset.records and not dataset.errors:
        problems.append(f"{root / RECORDS}: no records: an empty {manifest.kind} dataset cannot be used")
    problems += _listed_file_problems(root, manifest)
    if decode_images:  # headers were checked by load_dataset
        problems += _decode_problems(dataset)
    listed = set(manifest.files)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            problems.append(f"{path}: symlinks are not allowed in a dataset")
        elif path.is_file() and rel != MANIFEST and rel not in listed:
            problems.append(f"{path}: file is not listed in the manifest")
    return problems


def _listed_file_problems(root: Path, manifest: Manifest) -> list[str]:
    problems = []
    for rel, expected in manifest.files.items():
        try:
            path = resolve_inside(root, rel)
        except TgrlError as err:
            problems.append(f"{root / MANIFEST}: {err}")
            continue
        if not path.exists():
            problems.append(f"{root / rel}: listed in the manifest but missing")
            continue
        try:
            if sha256_file(path, regular=True) != expected:
                problems.append(f"{path}: sha256 does not match the manifest (modified after it was written)")
        except TgrlError as err:
            problems.append(str(err))
    return problems


def _decode_problems(dataset: Dataset) -> list[str]:
    """Each distinct image of a problems dataset opened as training opens it, reported on its first row."""
    problems, seen = [], set()
    for problem, line in zip(dataset.records, dataset.lines, strict=True):
        if not isinstance(problem, Problem) or problem.image in seen:
            continue
        seen.add(problem.image)
        try:
            check_image(dataset.image_path(problem), decode=True)
        except TgrlError as err:
            reason = str(err).removeprefix(f"{err.path}: ")
            problems.append(f"{dataset.root / RECORDS}:{line}: image {problem.image!r}: {reason}")
    return problems
