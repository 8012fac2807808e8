"""Output directories of the data commands: new, empty, or a previous tgrl dataset that is replaced.

A dataset writer hashes every file under its directory into the manifest, so stale files from an earlier,
larger run would leak into the new dataset; and a directory that holds anything else is refused rather
than overwritten.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tgrl_lib.data.schema import IMAGES, MANIFEST, RECORDS
from tgrl_lib.errors import TgrlError

DATASET_ENTRIES = frozenset({MANIFEST, MANIFEST + ".tmp", RECORDS, RECORDS + ".tmp", IMAGES})


def prepare_out_dir(root: Path | str) -> Path:
    """Make `root` ready for a `DatasetWriter`: create it, or empty a previous dataset written there."""
    root = Path(root)
    if not root.exists():
        return root
    if not root.is_dir():
        raise TgrlError("output path exists and is not a directory", path=root)
    foreign = sorted(p.name for p in root.iterdir() if p.name not in DATASET_ENTRIES)
    if foreign:
        raise TgrlError(
            f"output directory holds files that are not part of a tgrl dataset ({', '.join(foreign[:3])})",
            path=root,
            hint="choose an empty or new directory",
        )
    for name in DATASET_ENTRIES - {IMAGES}:
        (root / name).unlink(missing_ok=True)
    if (root / IMAGES).is_symlink():
        (root / IMAGES).unlink()
    shutil.rmtree(root / IMAGES, ignore_errors=True)
    return root
