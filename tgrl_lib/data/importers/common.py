"""Shared pieces of the benchmark importers: reading rows, checking fields, parsing choices, loading images.

A row that cannot be imported raises `RowReject(reason)`; the driver turns it into a `Rejected` record that
names the file and row. Only problems with the whole input (unreadable file, invalid JSON document, no rows)
raise `TgrlError`.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tgrl_lib.data.reader import (
    MAX_JSON_FILE_BYTES,
    check_value,
    iter_json_lines,
    loads_strict,
    read_regular_bytes,
)
from tgrl_lib.data.schema import check_relative_path, resolve_inside
from tgrl_lib.errors import TgrlError

MAX_IMAGE_BYTES = 64 << 20  # 64 MiB per image file
LETTERS = "ABCDEFGHIJ"
IMAGE_EXT = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp",
             "TIFF": ".tif"}  # fmt: skip


class RowReject(Exception):
    """This row cannot be imported; `category` groups reasons in the report."""

    def __init__(self, reason: str, category: str = "invalid row"):
        super().__init__(reason)
        self.reason = reason
        self.category = category


@dataclass
class SourceRow:
    number: int  # 1-based line (JSONL) or position (JSON array/object, parquet)
    key: str | None  # the object key when the JSON file is keyed by id
    obj: Any = None
    error: str | None = None  # the row did not parse
    raw: str | None = None


@dataclass
class Converted:
    """A benchmark row mapped to `Problem` fields (without id/image/source) and where its image is."""

    key: str
    fields: dict[str, Any]
    image_paths: list[str] = field(default_factory=list)  # candidates, relative to the image directory
    image_bytes: bytes | None = None


# ------------------------------------------------------------------------------------------ reading
def read_rows(path: Path) -> tuple[int | None, Iterator[SourceRow]]:
    """`(row count if known, rows)` of a .json (array, or object keyed by id), .jsonl or .parquet file, or a
    directory of parquet shards."""
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))
        if not shards:
            raise TgrlError(
                "directory holds no .parquet files", path=path, hint="pass a .json/.jsonl/.parquet file"
            )
        return None, (row for shard in shards for row in _parquet_rows(shard))
    if not path.is_file():
        raise TgrlError("input file does not exist", path=path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return None, _jsonl_rows(path)
    if suffix == ".parquet":
        return None, _parquet_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    raise TgrlError(
        f"unsupported input type {suffix or '(none)'}", path=path, hint="use .json, .jsonl or .parquet"
    )


def _json_rows(path: Path) -> tuple[int, Iterator[SourceRow]]:
    """Rows of a whole-file JSON benchmark through the bounded reader (regular file, size cap, strict
    UTF-8, unique keys); a row nested too deep or with an oversized field is a bad row."""
    try:
        text = read_regular_bytes(path, MAX_JSON_FILE_BYTES).decode("utf-8")
    except UnicodeDecodeError as err:
        raise TgrlError(f"not UTF-8 text ({err.reason})", path=path) from None
    try:
        data = loads_strict(text, allow_constants=True)
    except json.JSONDecodeError as err:
        raise TgrlError(
            f"invalid JSON ({err.msg} at line {err.lineno} column {err.colno})", path=path
        ) from None
    except ValueError as err:
        raise TgrlError(f"invalid JSON ({err})", path=path) from None
    if isinstance(data, dict):
        return len(data), (_bounded(i, str(k), v) for i, (k, v) in enumerate(data.items(), start=1))
    if isinstance(data, list):
        return len(data), (_bounded(i, None, v) for i, v in enumerate(data, start=1))
    raise TgrlError(f"expected a JSON array or object of rows, found {type(data).__name__}", path=path)


def _bounded(number: int, key: str | None, obj: Any) -> SourceRow:
    reason = check_value(obj)
    return SourceRow(number, key, obj) if reason is None else SourceRow(number, key, error=reason, raw="")


def _jsonl_rows(path: Path) -> Iterator[SourceRow]:
    """Rows of a JSONL benchmark through the bounded reader (`data.reader`): an undecodable, oversized,
    too deeply nested or duplicate-key line is a bad row naming its line, never silently repaired."""
    for number, obj, error in iter_json_lines(path, allow_constants=True):
        if error is not None:
            yield SourceRow(number, None, error=error.reason, raw=error.raw)
        else:
            yield SourceRow(number, None, obj)


def _parquet_rows(path: Path) -> Iterator[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise TgrlError(f"not a readable parquet file ({err})", path=path) from None
    number = 0
    for batch in handle.iter_batches(batch_size=64):
        for obj in batch.to_pylist():
            number += 1
            yield SourceRow(number, None, obj)


# ------------------------------------------------------------------------------------------- fields
def text_field(
    row: dict[str, Any], *names: str, required: bool = True, allow_empty: bool = False
) -> str | None:
    """The first present field among `names` as a string (numbers are accepted and printed)."""
    for name in names:
        if name in row and row[name] is not None:
            value = row[name]
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise RowReject(f"field {name!r} must be a string, got {type(value).__name__}", "wrong type")
            if isinstance(value, float) and not math.isfinite(value):
                raise RowReject(f"field {name!r} is not a finite number", "wrong type")
            text = value.strip() if isinstance(value, str) else format(value, "g")
            if text or allow_empty:
                return text
            if required:
                raise RowReject(f"field {name!r} is empty", "missing field")
            return None
    if required:
        raise RowReject(f"missing field {' / '.join(map(repr, names))}", "missing field")
    return None


def precision_field(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RowReject(f"precision must be a number, got {value!r}", "wrong type")
    if value < 0 or value != int(value):
        raise RowReject(f"precision must be a whole number >= 0, got {value!r}", "wrong type")
    return int(value)


def string_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str | int | float) for x in value):
        raise RowReject(f"field {name!r} must be a list of strings", "wrong type")
    return [str(x).strip() for x in value]


def infer_numeric(answer: str) -> tuple[str, int | None]:
    """`(answer_type, precision)` from how the answer is written: 12 -> integer, 1.25 -> float, 2 decimals."""
    text = answer.strip()
    if re.fullmatch(r"[-+]?\d+", text):
        return "integer", None
    decimals = re.fullmatch(r"[-+]?\d*\.(\d+)", text)
    if decimals:
        return "float", len(decimals.group(1))
    return "text", None


def strip_image_tokens(question: str) -> str:
    """Drop `<image1>`-style placeholders (the image is shown separately)."""
    return re.sub(r"\s*<image\d*>\s*", " ", question).strip()


# ------------------------------------------------------------------------------------------ choices
_CHOICES_MARKER = re.compile(r"\b(?:choices|choice|options)\s*[:：]", re.IGNORECASE)
_LINE_LABEL = re.compile(r"(?m)^[ \t]*\(?([A-H])\)?[ \t]*[:.)：、][ \t]*")
_PAREN_LABEL = re.compile(r"\(([A-H])\)\s*")
_BARE_LABEL = re.compile(r"(?<![A-Za-z(])([A-H])\)\s*")
_SEMI_LABEL = re.compile(r"(?:^|;)\s*([A-H])\s*[.:：、)]\s*")


def _labelled(text: str, pattern: re.Pattern) -> list[tuple[int, int, str]] | None:
    """Markers `(start, end, letter)` forming A, B, C, ... in order; None unless at least two."""
    marks = [(m.start(), m.end(), m.group(1)) for m in pattern.finditer(text)]
    run: list[tuple[int, int, str]] = []
    for mark in marks:
        if len(run) < len(LETTERS) and mark[2] == LETTERS[len(run)]:
            run.append(mark)
    return run if len(run) >= 2 else None


def parse_choices(text: str) -> tuple[str, list[str], list[str]] | None:
    """`(stem, letters, choice texts)` when `text` lists lettered options, e.g. "Choices:\\nA:40°\\nB:60°",
    "Choices: (A) yes (B) no" or "A) 10 B) 12"; None when it does not."""
    marker = _CHOICES_MARKER.search(text)
    candidates = []
    if marker:
        candidates.append((marker.end(), _LINE_LABEL))
        candidates.append((marker.end(), _PAREN_LABEL))
    candidates += [(0, _PAREN_LABEL), (0, _BARE_LABEL)]
    for offset, pattern in candidates:
        run = _labelled(text[offset:], pattern)
        if not run:
            continue
        ends = [start for start, _, _ in run[1:]] + [len(text) - offset]
        texts = [
            text[offset + end : offset + nxt].strip().rstrip(";,").strip()
            for (_, end, _), nxt in zip(run, ends, strict=True)
        ]
        if not all(texts):
            continue
        stem_end = marker.start() if marker and marker.start() <= offset + run[0][0] else offset + run[0][0]
        return text[:stem_end].strip(), [letter for _, _, letter in run], texts
    return None


def parse_option_string(options: str) -> tuple[list[str], list[str]] | None:
    """WeMath-style "A. 200.96;B. 3215.36;C. 6280" -> (letters, texts)."""
    run = _labelled(options, _SEMI_LABEL)
    if not run:
        return None
    ends = [start for start, _, _ in run[1:]] + [len(options)]
    texts = [options[end:nxt].strip().rstrip(";").strip() for (_, end, _), nxt in zip(run, ends, strict=True)]
    return ([letter for _, _, letter in run], texts) if all(texts) else None


def letter_choices(question: str, answer: str) -> list[str]:
    """Option letters when the options are only in the image: a range like "A-E" / "A to F" in the question,
    else the capital letters it mentions, always including the answer and at least A-D."""
    span = re.search(r"\b([A-J])\s*(?:-|–|to)\s*([A-J])\b", question)
    if span and span.group(1) < span.group(2):
        letters = set(LETTERS[LETTERS.index(span.group(1)) : LETTERS.index(span.group(2)) + 1])
    else:
        letters = set(re.findall(r"\b([A-H])\b", question))
    letters.add(answer)
    last = max(max(letters), "D")
    return list(LETTERS[: LETTERS.index(last) + 1])


def choice_answer(answer: str, letters: list[str], texts: list[str]) -> str:
    """The correct choice's text from a letter ("B", "(B)", "B.") or the text itself."""
    letter = re.fullmatch(r"\(?([A-H])\)?\.?", answer.strip())
    if letter and letter.group(1) in letters:
        return texts[letters.index(letter.group(1))]
    if answer.strip() in texts:
        return answer.strip()
    raise RowReject(
        f"answer {answer!r} is not one of the options {', '.join(letters)}", "answer not in choices"
    )


def multiple_choice_fields(question: str, answer: str) -> dict[str, Any]:
    """Options written in the question become `choices` (the question keeps its stem, the answer letter
    becomes the option text); otherwise the answer stays a letter and `choices` are option letters."""
    parsed = parse_choices(question)
    if parsed:
        stem, letters, texts = parsed
        answer = choice_answer(answer, letters, texts)
        return {
            "question": stem or question,
            "answer": answer,
            "choices": texts,
            "answer_type": "multiple_choice",
        }
    letter = answer.strip("(). ")
    if len(letter) != 1 or letter not in LETTERS:
        raise RowReject(
            f"multiple-choice answer {answer!r} is not a letter and the question lists no options",
            "answer not in choices",
        )
    choices = letter_choices(question, letter)
    return {"question": question, "answer": letter, "choices": choices, "answer_type": "multiple_choice"}


def image_field(row: dict[str, Any], *names: str) -> tuple[list[str], bytes | None]:
    """`(relative path candidates, embedded bytes)` from the first present image field; HF datasets store an
    image as {"bytes": ..., "path": ...}."""
    for name in names:
        value = row.get(name)
        if isinstance(value, dict):
            if isinstance(value.get("bytes"), bytes | bytearray) and value["bytes"]:
                return [], bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, bytes | bytearray) and value:
            return [], bytes(value)
        if isinstance(value, str) and value.strip():
            return [value.strip()], None
    raise RowReject(f"missing image field {' / '.join(map(repr, names))}", "missing image")


# ------------------------------------------------------------------------------------------- images
def load_image_bytes(converted: Converted, bases: list[Path]) -> bytes:
    """The row's image bytes: embedded, or read from a path that must stay inside the image directory."""
    if converted.image_bytes is not None:
        return converted.image_bytes
    tried = []
    for rel in converted.image_paths:
        try:
            check_relative_path(rel)
        except ValueError as err:
            raise RowReject(f"image path refused: {err}", "unsafe image path") from None
        names = [rel] if PurePosixPath(rel).name == rel else [rel, PurePosixPath(rel).name]
        for base in bases:
            for name in names:
                try:
                    target = resolve_inside(base, name)
                except TgrlError:
                    raise RowReject(f"image {rel!r} resolves outside {base}", "unsafe image path") from None
                tried.append(str(target))
                if target.is_file():
                    if target.stat().st_size > MAX_IMAGE_BYTES:
                        raise RowReject(
                            f"image {rel!r} is larger than {MAX_IMAGE_BYTES >> 20} MiB", "bad image"
                        )
                    return target.read_bytes()
    raise RowReject(f"image {converted.image_paths[0]!r} not found (looked in {', '.join(map(str, bases))})",
                    "missing image")  # fmt: skip


def validate_image(data: bytes) -> str:
    """The file extension of a readable image; rejects empty, truncated, non-image and oversized images
    (decompression-bomb guard: more pixels than PIL's `Image.MAX_IMAGE_PIXELS`)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RowReject("image file is empty (0 bytes)", "bad image")
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > limit:
                    raise RowReject(
                        f"image is {width}x{height} pixels, over the {limit} pixel limit", "bad image"
                    )
                image.load()  # decodes the pixels: a truncated file fails here
                kind = image.format or ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RowReject(f"image refused as a decompression bomb ({err})", "bad image") from None
    except UnidentifiedImageError:
        raise RowReject("image file is not an image PIL can read", "bad image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise RowReject(f"image file is broken ({err})", "bad image") from None
    return IMAGE_EXT.get(kind, f".{kind.lower() or 'img'}")


def jsonable(obj: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of a raw row for a rejected record (bytes summarised, non-finite numbers as text)."""
    if depth > 20:
        return "..."
    if isinstance(obj, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v, depth + 1) for v in obj]
    if isinstance(obj, bytes | bytearray):
        return f"<{len(obj)} bytes>"
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)
