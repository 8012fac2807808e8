"""Standard benchmark importers: MathVista, MathVerse, MATH-Vision, We-Math, DynaMath, LogicVista -> a tgrl
problems dataset, with every row that cannot be imported kept as a `Rejected` record.

`import_benchmark(fmt, in_path, out_dir)` writes `out_dir` (problems, images copied into `images/`, never
referenced outside) and `<out_dir>-rejected` (rejected rows with file, row and reason), so that
input rows = imported + rejected. Each format's module documents the published layout it expects and how its
answer types, choices, precision and unit map onto `Problem`. Images are checked by decoding them with PIL
(empty, truncated, non-image files and decompression bombs are rejected per row).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tgrl_lib.data.importers import dynamath, logicvista, mathverse, mathvision, mathvista, wemath
from tgrl_lib.data.importers.common import (
    RowReject,
    SourceRow,
    jsonable,
    load_image_bytes,
    read_rows,
    validate_image,
)
from tgrl_lib.data.outdir import prepare_out_dir
from tgrl_lib.data.schema import IMAGES, MANIFEST, DatasetWriter, Problem, Rejected
from tgrl_lib.errors import TgrlError

FORMATS = {
    "mathvista": mathvista,
    "mathverse": mathverse,
    "mathvision": mathvision,
    "wemath": wemath,
    "dynamath": dynamath,
    "logicvista": logicvista,
}


@dataclass
class ImportReport:
    format: str
    input_file: str
    input_rows: int
    imported: int
    rejected: int
    out_dir: str
    rejected_dir: str
    reasons: dict[str, int] = field(default_factory=dict)  # reason category -> rows
    examples: list[str] = field(default_factory=list)  # first rejected rows as `file:row: reason`

    def render(self) -> str:
        text = (
            f"{self.format}: imported {self.imported} of {self.input_rows} rows into {self.out_dir}; "
            f"{self.rejected} rejected into {self.rejected_dir}"
        )
        if self.reasons:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) + ")"
        return text


def default_rejected_dir(out_dir: Path | str) -> Path:
    out = Path(out_dir)
    return out.with_name(out.name + "-rejected")


def _safe_name(key: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:80].strip(".") or "row"
    if name != key:
        name += "-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return name


def _default_split(in_path: Path) -> str:
    name = in_path.name.lower()
    return next((s for s in ("testmini", "test", "train", "val") if s in name), "test")


def _short(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "row"
    return f"{where}: {first['msg']}"


class _Importer:
    """One import run: converts rows, validates images, writes problems and rejected records."""

    def __init__(self, fmt: str, in_path: Path, bases: list[Path], split: str | None):
        self.fmt, self.module, self.in_path, self.bases = fmt, FORMATS[fmt], in_path, bases
        self.split = split or _default_split(in_path)
        self.seen: dict[str, int] = {}
        self.reasons: Counter[str] = Counter()
        self.examples: list[str] = []

    def problem(self, row: SourceRow) -> tuple[Problem, bytes]:
        if row.error is not None:
            raise RowReject(row.error, "invalid JSON")
        if not isinstance(row.obj, dict):
            raise RowReject(f"expected an object, got {type(row.obj).__name__}", "wrong type")
        converted = self.module.convert(row.obj, row.key)
        pid = f"{self.fmt}-{converted.key}"
        if pid in self.seen:
            raise RowReject(f"duplicate id {converted.key!r} (first in row {self.seen[pid]})", "duplicate id")
        data = load_image_bytes(converted, self.bases)
        image = f"{IMAGES}/{_safe_name(converted.key)}{validate_image(data)}"
        fields = dict(converted.fields)
        split = fields.pop("split", None) or self.split
        try:
            problem = Problem(id=pid, image=image, source=self.fmt, split=split, **fields)
        except ValidationError as err:
            raise RowReject(_short(err), "invalid row") from None
        self.seen[pid] = row.number
        return problem, data

    def rejected(self, row: SourceRow, err: RowReject) -> Rejected:
        where = f"row {row.number}" + (f" ({row.key})" if row.key is not None else "")
        reason = f"{where}: {err.reason}"
        self.reasons[err.category] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{self.in_path}:{row.number}: {err.reason}")
        record = jsonable(row.obj) if isinstance(row.obj, dict) else None
        return Rejected(stage=f"import:{self.fmt}", reason=reason, file=str(self.in_path), line=row.number,
                        record=record, raw=row.raw if record is None else None)  # fmt: skip


def import_benchmark(
    fmt: str,
    in_path: Path | str,
    out_dir: Path | str,
    images_dir: Path | str | None = None,
    *,
    rejected_dir: Path | str | None = None,
    split: str | None = None,
) -> ImportReport:
    """Import a benchmark file into `out_dir`; rows that fail go to `rejected_dir` (default `<out>-rejected`).

    `images_dir` is where relative image paths are looked up (default: the input file's folder); `split`
    overrides the split name (default: the row's own, else guessed from the file name, else `test`).
    Raises `TgrlError` when the input as a whole is unusable or when no row could be imported.
    """
    from tgrl_lib.progress import progress_bar

    if fmt not in FORMATS:
        raise TgrlError(f"unknown benchmark format {fmt!r}", hint=f"choose from {', '.join(FORMATS)}")
    in_path, out = Path(in_path), Path(out_dir)
    rejected_out = Path(rejected_dir) if rejected_dir else default_rejected_dir(out)
    if rejected_out.resolve() == out.resolve():
        raise TgrlError("the rejected dataset needs its own directory", path=rejected_out)
    bases = [Path(images_dir)] if images_dir else [in_path if in_path.is_dir() else in_path.parent]
    if images_dir and not bases[0].is_dir():
        raise TgrlError("images directory does not exist", path=images_dir)
    total, rows = read_rows(in_path)  # whole-file problems raise here, before anything is written
    importer = _Importer(fmt, in_path, bases, split)
    meta: dict[str, Any] = {"format": fmt, "input": in_path.name}
    prepare_out_dir(out)
    prepare_out_dir(rejected_out)
    n_in = n_ok = n_bad = 0
    with (
        DatasetWriter(out, "problems", created_by=f"tgrl data import --format {fmt}", meta=meta) as writer,
        DatasetWriter(
            rejected_out, "rejected", created_by=f"tgrl data import --format {fmt}", meta=meta
        ) as bad,
        progress_bar(f"import {fmt}", total) as advance,
    ):
        for row in rows:
            n_in += 1
            try:
                problem, data = importer.problem(row)
            except RowReject as err:
                bad.write([importer.rejected(row, err)], sync=False)
                n_bad += 1
            else:
                writer.add_image(problem.image, data)
                writer.write([problem], sync=False)
                n_ok += 1
            advance()
    report = ImportReport(fmt, str(in_path), n_in, n_ok, n_bad, str(out), str(rejected_out),
                          dict(importer.reasons), importer.examples)  # fmt: skip
    if n_ok == 0:
        (out / MANIFEST).unlink(missing_ok=True)  # an empty import is not a usable dataset
        first = f"; first: {importer.examples[0]}" if importer.examples else ""
        raise TgrlError(f"no rows imported ({n_in} read, {n_bad} rejected into {rejected_out}){first}",
                        path=in_path)  # fmt: skip
    return report
