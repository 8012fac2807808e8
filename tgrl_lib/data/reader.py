"""The bounded reader: how every dataset file is opened and every JSON line parsed, whatever its content.

A dataset comes from anywhere (a benchmark import, an S3 prefix, a user's directory), so nothing it holds
may hang, exhaust memory or raise a traceback. One reader enforces, for every file and line:

- regular files only: a FIFO, a device or a symlink as `records.jsonl`/`manifest.json` is refused before
  a byte is read (opened with `O_NOFOLLOW | O_NONBLOCK`, checked with `fstat`);
- a size cap per line (`MAX_LINE_BYTES`; a longer line is skipped to its end without being held in memory)
  and per string field (`MAX_FIELD_CHARS`);
- strict UTF-8 (an undecodable line is rejected naming its line, never silently "replaced");
- no duplicate keys in an object (the last value would silently win), no NaN/Infinity;
- nesting at most `MAX_DEPTH` levels (no `RecursionError`);
- no unpaired surrogates (`\\ud800`), which UTF-8 cannot write back.

`iter_json_lines` yields `(line, object, None)` or `(line, None, LineError)` and never raises on a bad
line; the whole-file checks (`open_regular`, `read_json_file`) raise `TgrlError`. The checks that need a
walk of the parsed object run only when the line could break them (more brackets than `MAX_DEPTH`, longer
than `MAX_FIELD_CHARS`), so ordinary rows cost one `json.loads`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from tgrl_lib.errors import TgrlError

MAX_LINE_BYTES = 8 << 20  # one JSONL row; a longer line is rejected (a 50 MB question never reaches eval)
MAX_FIELD_CHARS = 1 << 20  # one string value (question, response text, answer ...)
MAX_DEPTH = 32  # nesting of objects and arrays in one row (facts, meta)
MAX_JSON_FILE_BYTES = 256 << 20  # a whole JSON file such as manifest.json
_CHUNK = 1 << 20

LONE_SURROGATE = (
    "invalid Unicode: the row holds an unpaired surrogate (\\ud800-\\udfff), which UTF-8 cannot hold"
)


@dataclass(frozen=True)
class LineError:
    """Why one line was refused, and its text (decoded with escapes, cut to 10,000 characters)."""

    reason: str
    raw: str


def open_regular(path: Path | str) -> BinaryIO:
    """Open `path` for binary reading when it is a regular file; a symlink, FIFO, device or directory is
    a `TgrlError` (opening never blocks and never follows a symlink in the last component)."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise TgrlError("file not found", path=path) from None
    except OSError as err:  # ELOOP: a symlink; EACCES ...
        if path.is_symlink():
            raise TgrlError("is a symlink: dataset files must be regular files", path=path) from None
        raise TgrlError(f"cannot be read ({err.strerror})", path=path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise TgrlError(f"is {_file_kind(mode)}, not a regular file", path=path)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def iter_json_lines(
    path: Path | str, *, allow_constants: bool = False
) -> Iterator[tuple[int, dict[str, Any] | None, LineError | None]]:
    """`(line_number, object, None)` for every good non-empty line, `(line_number, None, LineError)` for
    every bad one. Raises only when the file itself cannot be opened (see `open_regular`).
    `allow_constants` lets NaN/Infinity through (benchmark files exported by pandas hold them)."""
    with open_regular(path) as handle:
        for number, data, complete in _bounded_lines(handle):
            if not complete:
                head = data[:10_000].decode("utf-8", "backslashreplace")
                yield number, None, LineError(f"line longer than {MAX_LINE_BYTES >> 20} MiB", head)
                continue
            if not data.strip():
                continue
            obj, error = parse_json_line(data, allow_constants=allow_constants)
            yield number, obj, error


def _bounded_lines(handle: BinaryIO) -> Iterator[tuple[int, bytes, bool]]:
    """`(number, line, complete)` split on `\\n`; a line over `MAX_LINE_BYTES` comes as its first
    `MAX_LINE_BYTES` bytes with `complete=False`, and its rest is read past in chunks, never held."""
    number = 0
    while data := handle.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
            while (rest := handle.readline(_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield number, data, False
            continue
        yield number, data, True


def parse_json_line(
    data: bytes | str, *, allow_constants: bool = False
) -> tuple[dict[str, Any] | None, LineError | None]:
    """One row: strict UTF-8, a JSON object within the caps, or the reason it is not."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raw = data.decode("utf-8", "backslashreplace").strip()
            return None, LineError(f"invalid UTF-8 (byte {err.start}: {err.reason})", raw[:10_000])
    else:
        text = data.strip()
    if len(text) > MAX_LINE_BYTES:
        return None, LineError(f"line longer than {MAX_LINE_BYTES >> 20} MiB", text[:10_000])
    try:
        obj = loads_strict(text, allow_constants=allow_constants)
    except ValueError as err:
        return None, LineError(f"invalid JSON ({err})", text[:10_000])
    if not isinstance(obj, dict):
        return None, LineError("expected a JSON object", text[:10_000])
    reason = check_bounds(obj, text)
    return (None, LineError(reason, text[:10_000])) if reason else (obj, None)


def loads_strict(text: str, *, allow_constants: bool = False) -> Any:
    """`json.loads` refusing duplicate keys, NaN/Infinity (unless `allow_constants`) and nesting Python
    cannot parse (ValueError)."""
    constant = float if allow_constants else _refuse_constant
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {duplicate!r}")
    return obj


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def check_bounds(obj: Any, text: str) -> str | None:
    """The reason `obj` (parsed from `text`) breaks the depth, field-size or surrogate rules, or None."""
    deep = text.count("[") + text.count("{") > MAX_DEPTH
    long = len(text) > MAX_FIELD_CHARS
    if deep or long:
        reason = check_value(obj)
        if reason:
            return reason
    if "\\u" in text and not utf8_encodable(json.dumps(obj, ensure_ascii=False)):
        return LONE_SURROGATE
    return None


def check_value(obj: Any) -> str | None:
    """Depth and string sizes of a parsed object, iteratively (no recursion on hostile input)."""
    stack: list[tuple[Any, int, str]] = [(obj, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels (at {where or 'the top'})"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, child in items:
                stack.append((child, depth + 1, f"{where}.{key}" if where else str(key)))
                if isinstance(key, str) and len(key) > MAX_FIELD_CHARS:
                    return f"a key longer than {MAX_FIELD_CHARS} characters (at {where or 'the top'})"
        elif isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            return f"field {where} is {len(value)} characters, more than the {MAX_FIELD_CHARS} allowed"
    return None


def read_json_file(path: Path | str, max_bytes: int = MAX_JSON_FILE_BYTES) -> Any:
    """A whole JSON file (manifest.json) under the same rules; any problem is a `TgrlError`."""
    with open_regular(path) as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TgrlError(f"larger than {max_bytes >> 20} MiB", path=path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TgrlError(f"invalid UTF-8 (byte {err.start}: {err.reason})", path=path) from None
    try:
        obj = loads_strict(text)
    except ValueError as err:
        raise TgrlError(f"invalid JSON ({err})", path=path) from None
    reason = check_value(obj) if text.count("[") + text.count("{") > MAX_DEPTH else None
    if reason:
        raise TgrlError(reason, path=path)
    return obj


def read_regular_bytes(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (an image), else a `TgrlError`."""
    with open_regular(path) as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TgrlError(f"file is larger than {max_bytes >> 20} MiB", path=path)
    return data


# ----------------------------------------------------------------------------- paths and hashes
def check_relative_path(value: str) -> PurePosixPath:
    """Refuse absolute paths, backslashes, drive letters, `..` (no escaping the dataset) and control
    characters (a NUL cannot name a file)."""
    if not value or value.startswith(("/", "\\")) or "\\" in value or ":" in value.split("/")[0]:
        raise ValueError(f"path {value!r} must be relative to the dataset directory")
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ValueError(f"path {value!r} holds control characters")
    path = PurePosixPath(value)
    if any(part in ("..", "") for part in path.parts) or str(path) != value.rstrip("/"):
        raise ValueError(f"path {value!r} may not contain '..' or empty parts")
    return path


def resolve_inside(root: Path, relpath: str, *, root_real: Path | None = None) -> Path:
    """`root/relpath`, refusing anything (symlinks included) that resolves outside `root`; `root_real`:
    `root.resolve()` when the caller already has it (a reader resolving many paths)."""
    try:
        check_relative_path(relpath)
    except ValueError as err:
        raise TgrlError(str(err), path=root) from None
    root_real = root_real or root.resolve()
    target = (root / relpath).resolve()
    if target != root_real and root_real not in target.parents:
        raise TgrlError(f"{relpath!r} resolves outside the dataset directory", path=root)
    return target


def sha256_file(path: Path, chunk: int = 1 << 20, *, regular: bool = False) -> str:
    """sha256 of a file; `regular=True` (dataset files) refuses anything but a regular file first."""
    digest = hashlib.sha256()
    with open_regular(path) if regular else open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
