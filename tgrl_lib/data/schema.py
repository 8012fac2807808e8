"""Data contracts: the records that cross pipeline steps, and the dataset directory that holds them.

A dataset is a directory (DESIGN.md §3)::

    manifest.json    {"schema_version", "kind", "count", "files": {relpath: sha256}, "created_by", "meta"}
    records.jsonl    one JSON object per line
    images/          image files referenced by records with a relative path

The manifest is written last (atomically, by rename): a directory without a valid manifest is incomplete
and is never read. Every file is read through the bounded reader (`data.reader`: regular files, size caps,
strict UTF-8, unique keys, bounded nesting); `load_dataset` validates every row, checks each problem image
once (sha256 against the manifest, header caps) and reports `records.jsonl:LINE: reason`. The stricter
whole-directory check of `tgrl data validate` is `data.validate`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tgrl_lib.data.reader import (
    LONE_SURROGATE,
    check_relative_path,
    iter_json_lines,
    parse_json_line,
    read_json_file,
    resolve_inside,
    sha256_file,
    utf8_encodable,
)
from tgrl_lib.errors import TgrlError

SCHEMA_VERSION = "1"
MANIFEST = "manifest.json"
RECORDS = "records.jsonl"
IMAGES = "images"

DatasetKind = Literal["problems", "trajectories", "rejected"]
AnswerType = Literal["multiple_choice", "integer", "float", "text"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Problem(_Record):
    """One visual question with a verifiable answer."""

    id: str = Field(min_length=1, description="Unique id within the dataset.")
    image: str = Field(min_length=1, description="Image path relative to the dataset directory.")
    question: str = Field(min_length=1, description="The question shown to the model (without choices).")
    answer: str = Field(description="Ground truth; for multiple choice the correct choice's text.")
    answer_type: AnswerType = Field(description="How `answer` is compared.")
    choices: list[str] | None = Field(default=None, description="Options for multiple choice, in order.")
    precision: int | None = Field(default=None, ge=0, description="Decimals that count for float answers.")
    unit: str | None = Field(default=None, description="Unit of a numeric answer, if any.")
    source: str = Field(default="synthetic", description="Benchmark or generator name.")
    split: str = Field(default="train", description="train / test / testmini ...")
    facts: dict[str, Any] | None = Field(default=None, description="Ground-truth visual facts, if known.")
    meta: dict[str, Any] = Field(default_factory=dict, description="Free-form extras (family, difficulty).")

    @field_validator("image")
    @classmethod
    def _relative_image(cls, value: str) -> str:
        check_relative_path(value)
        return value

    @model_validator(mode="after")
    def _choices_match(self) -> Problem:
        if self.answer_type == "multiple_choice":
            if not self.choices or len(self.choices) < 2:
                raise ValueError("multiple_choice needs at least two `choices`")
            if self.answer not in self.choices:
                raise ValueError(f"answer {self.answer!r} is not one of the choices {self.choices!r}")
        return self


class FilterVerdict(_Record):
    """Why a trajectory was kept or rejected, and by which filter."""

    kept: bool
    filter: str | None = Field(default=None, description="Name of the deciding filter (None when kept).")
    reason: str | None = Field(default=None, description="Human-readable reason.")


class Trajectory(_Record):
    """One reasoning response to a problem, by an expert model or by the policy."""

    problem_id: str = Field(min_length=1)
    source: str = Field(pattern=r"^(expert|policy):.+", description="`expert:<model>` or `policy:<run>`.")
    text: str = Field(description="The full response text.")
    answer: str | None = Field(default=None, description="Extracted answer (None when none was found).")
    correct: bool = Field(default=False, description="Whether `answer` verifies against the problem.")
    reward: float = Field(default=0.0, description="Verifiable reward (finite).")
    filter: FilterVerdict | None = None
    meta: dict[str, Any] = Field(default_factory=dict, description="token count, mean log-prob, sample ...")


class Rejected(_Record):
    """A record that a step could not use, kept with its reason so that counts reconcile."""

    stage: str = Field(description="Step and check that rejected it, e.g. `read`, `filter:format`.")
    reason: str
    file: str | None = Field(default=None, description="Input file it came from.")
    line: int | None = Field(default=None, description="1-based line in that file.")
    record: dict[str, Any] | None = Field(default=None, description="The parsed record, when it parsed.")
    raw: str | None = Field(default=None, description="The raw line, when it did not parse.")


class Manifest(_Record):
    schema_version: str = SCHEMA_VERSION
    kind: DatasetKind
    count: int = Field(ge=0)
    files: dict[str, str] = Field(description="relative path -> sha256 of every file in the dataset.")
    created_by: str = "tgrl"
    meta: dict[str, Any] = Field(default_factory=dict)


RECORD_TYPES: dict[str, type[_Record]] = {
    "problems": Problem,
    "trajectories": Trajectory,
    "rejected": Rejected,
}


def dumps_record(record: BaseModel) -> str:
    """One canonical JSONL line (sorted keys, no NaN) so identical data gives identical bytes."""
    return json.dumps(record.model_dump(mode="json"), sort_keys=True, ensure_ascii=False, allow_nan=False)


def _short(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "record"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


@dataclass
class RowError:
    file: str
    line: int
    reason: str
    raw: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"

    def to_rejected(self, stage: str = "read") -> Rejected:
        record, _ = parse_json_line(self.raw)  # None when the raw line breaks any rule of the reader
        return Rejected(
            stage=stage,
            reason=self.reason,
            file=self.file,
            line=self.line,
            record=record,
            raw=None if record is not None else self.raw[:10_000],
        )


def iter_jsonl(path: Path, model: type[_Record]) -> Iterator[tuple[int, _Record | RowError]]:
    """Yield `(line_number, record_or_error)` for every non-empty line through the bounded reader
    (`data.reader`: regular file, size caps, strict UTF-8, unique keys, depth); never raises on a bad row."""
    name = path.name
    for number, obj, error in iter_json_lines(path):
        if error is not None:
            yield number, RowError(name, number, error.reason, error.raw)
            continue
        try:
            yield number, model.model_validate(obj)
        except ValidationError as err:
            yield number, RowError(name, number, _short(err), json.dumps(obj, ensure_ascii=False))


def writable_rejected(rejected: Rejected) -> Rejected:
    """`rejected`, or (when its record or reason holds unpaired surrogates, which UTF-8 cannot write) the
    same with the record kept as ASCII-escaped raw JSON, so a hostile row is still written, not lost."""
    if utf8_encodable(dumps_record(rejected)):
        return rejected
    raw = rejected.raw if rejected.record is None else json.dumps(rejected.record, ensure_ascii=True)
    escaped = {
        "record": None,
        "raw": (raw or "").encode("utf-8", "backslashreplace").decode("utf-8"),
        "reason": rejected.reason.encode("utf-8", "backslashreplace").decode("utf-8"),
    }
    return rejected.model_copy(update=escaped)


def _writable_line(record: _Record) -> str:
    """`dumps_record(record)`; a `Rejected` holding unpaired surrogates is escaped (`writable_rejected`);
    any other such record is refused with a clear error."""
    if isinstance(record, Rejected):
        record = writable_rejected(record)
    line = dumps_record(record)
    if utf8_encodable(line):
        return line
    raise TgrlError(f"cannot write a {type(record).__name__} record: {LONE_SURROGATE}")


@dataclass
class Dataset:
    """A validated dataset directory: its manifest, its good records and the rows it refused."""

    root: Path
    manifest: Manifest
    records: list[Any]
    errors: list[RowError] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # line in records.jsonl of each of `records`

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def image_path(self, problem: Problem) -> Path:
        return resolve_inside(self.root, problem.image)

    def by_id(self) -> dict[str, Problem]:
        return {p.id: p for p in self.records}


def read_manifest(root: Path | str) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise TgrlError("dataset directory does not exist", path=root)
    if not path.exists() and not path.is_symlink():
        raise TgrlError(
            "no manifest.json: the dataset is incomplete or not a tgrl dataset",
            path=root,
            hint="rerun the step that writes it",
        )
    try:
        return Manifest.model_validate(read_json_file(path))
    except ValidationError as err:
        raise TgrlError(f"invalid manifest ({_short(err)})", path=path) from None
    except TgrlError as err:
        raise TgrlError(f"invalid manifest: {str(err).removeprefix(f'{path}: ')}", path=path) from None


def load_dataset(
    root: Path | str, kind: DatasetKind | None = None, *, verify_hashes: bool = True, strict: bool = False
) -> Dataset:
    """Read and validate a dataset directory through the bounded reader (`data.reader`).

    Every row is validated (schema, duplicate ids, image inside the directory and present); bad rows land in
    `Dataset.errors`, or raise when `strict`. With `verify_hashes`, a records.jsonl whose sha256 differs from
    the manifest is refused, and a problem whose image differs from its sha256 in the manifest (swapped after
    the dataset was written) is a bad row; each image is hashed once per call.
    """
    root = Path(root)
    manifest = read_manifest(root)
    if kind is not None and manifest.kind != kind:
        raise TgrlError(f"expected a {kind} dataset, found kind {manifest.kind!r}", path=root / MANIFEST)
    if verify_hashes:
        _verify_records(root, manifest)
    try:
        rows = list(iter_jsonl(root / RECORDS, RECORD_TYPES[manifest.kind]))
    except TgrlError as err:
        raise TgrlError(str(err), hint=f"run `tgrl data validate {root}`") from None
    checks = _RowChecks(root, manifest.files if verify_hashes else None)
    records: list[Any] = []
    lines: list[int] = []
    errors: list[RowError] = []
    for number, item in rows:
        error = item if isinstance(item, RowError) else checks.row_error(item, number)
        if error is not None:
            errors.append(error)
        else:
            records.append(item)
            lines.append(number)
    if strict and errors:
        raise TgrlError(
            errors[0].reason,
            path=root / RECORDS,
            line=errors[0].line,
            hint=f"{len(errors)} bad row(s); run `tgrl data validate {root}`",
        )
    if len(records) + len(errors) != manifest.count:
        errors.append(
            RowError(
                RECORDS, 0, f"manifest count {manifest.count} but {len(records) + len(errors)} rows found", ""
            )
        )
    return Dataset(root=root, manifest=manifest, records=records, errors=errors, lines=lines)


class _RowChecks:
    """The checks of a problem row beyond its schema: unique id, image inside the directory and present,
    and (given the manifest's `files`) the image's sha256, computed once per image."""

    def __init__(self, root: Path, files: dict[str, str] | None):
        self.root, self.files, self.root_real = root, files, root.resolve()
        self.seen: dict[str, int] = {}
        self.image_reasons: dict[str, str | None] = {}

    def row_error(self, item: Any, number: int) -> RowError | None:
        from tgrl_lib.data.images import image_problem  # PIL: only when problems are read

        if not isinstance(item, Problem):
            return None
        if item.id in self.seen:
            reason = f"duplicate id {item.id!r} (first on line {self.seen[item.id]})"
            return RowError(RECORDS, number, reason, dumps_record(item))
        self.seen[item.id] = number
        if item.image not in self.image_reasons:
            expected = None if self.files is None else self.files.get(item.image)
            self.image_reasons[item.image] = image_problem(
                self.root, item.image, expected, root_real=self.root_real
            )
        reason = self.image_reasons[item.image]
        return None if reason is None else RowError(RECORDS, number, reason, dumps_record(item))


def _verify_records(root: Path, manifest: Manifest) -> None:
    """Refuse records.jsonl when it is missing, not a regular file or differs from the manifest."""
    if RECORDS not in manifest.files:
        raise TgrlError("manifest does not list records.jsonl", path=root / MANIFEST)
    path = root / RECORDS
    if not path.exists() and not path.is_symlink():
        raise TgrlError("records.jsonl is missing", path=root)
    if sha256_file(path, regular=True) != manifest.files[RECORDS]:
        raise TgrlError(
            "records.jsonl does not match its sha256 in the manifest "
            "(modified after the dataset was written)",
            path=path,
            hint=f"run `tgrl data validate {root}`",
        )


class DatasetWriter:
    """Write a dataset: records appended (and flushed) as they come, the manifest last.

    `resume=True` keeps the records already in an unfinished directory (a torn last line is dropped) so a
    killed step can continue; `existing()` returns them.
    """

    def __init__(
        self,
        root: Path | str,
        kind: DatasetKind,
        *,
        created_by: str = "tgrl",
        meta: dict[str, Any] | None = None,
        resume: bool = False,
    ):
        self.root = Path(root)
        self.kind = kind
        self.created_by = created_by
        self.meta = dict(meta or {})
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / MANIFEST
        if manifest.exists():
            manifest.unlink()  # the directory is being rewritten: it is incomplete until close()
        self._records_path = self.root / RECORDS
        self._existing: list[Any] = []
        if resume and self._records_path.exists():
            self._existing = self._recover()
        else:
            self._records_path.write_text("", encoding="utf-8")
        self.count = len(self._existing)
        self._handle = open(self._records_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _recover(self) -> list[Any]:
        """Keep complete, valid lines; truncate a torn tail so appends start on a fresh line."""
        model = RECORD_TYPES[self.kind]
        good: list[str] = []
        kept: list[Any] = []
        for _, item in iter_jsonl(self._records_path, model):
            if not isinstance(item, RowError):
                kept.append(item)
                good.append(dumps_record(item))
        tmp = self._records_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in good), encoding="utf-8")
        os.replace(tmp, self._records_path)
        return kept

    def existing(self) -> list[Any]:
        return list(self._existing)

    def add_image(self, relpath: str, data: bytes) -> None:
        target = self.root / check_relative_path(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def write(self, records: Iterable[_Record], *, sync: bool = True) -> None:
        expected = RECORD_TYPES[self.kind]
        lines = []
        for record in records:
            if not isinstance(record, expected):
                raise TgrlError(f"cannot write {type(record).__name__} into a {self.kind} dataset")
            lines.append(_writable_line(record) + "\n")
        self._handle.write("".join(lines))
        self._handle.flush()
        if sync:
            os.fsync(self._handle.fileno())
        self.count += len(lines)

    def close(self) -> Manifest:
        """Hash every file and write the manifest atomically: from here on the dataset is readable."""
        self._handle.close()
        files = {}
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and rel != MANIFEST and not rel.endswith(".tmp"):
                files[rel] = sha256_file(path)
        manifest = Manifest(
            kind=self.kind, count=self.count, files=files, created_by=self.created_by, meta=self.meta
        )
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(
            json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        os.replace(tmp, self.root / MANIFEST)
        return manifest

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._handle.close()  # no manifest: the partial directory stays unreadable


def write_dataset(
    root: Path | str,
    kind: DatasetKind,
    records: Iterable[_Record],
    *,
    created_by: str = "tgrl",
    meta: dict[str, Any] | None = None,
) -> Manifest:
    with DatasetWriter(root, kind, created_by=created_by, meta=meta) as writer:
        writer.write(records)
    return read_manifest(root)
