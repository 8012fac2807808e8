"""Builders of hostile inputs: images (empty, truncated, not an image, decompression bomb), symlinks that
escape, benchmark files with bad rows among good ones, and datasets whose manifest is valid (hashes
recomputed) over bad rows, so that only the row-level check can catch them."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

from PIL import Image

from tgrl_lib.data.schema import MANIFEST, RECORDS, Manifest, load_dataset, sha256_file

CONFIGS = Path(__file__).parent / "configs"


# ------------------------------------------------------------------------------------------- images
def png(color=(200, 30, 30), size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()[:300]


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header announcing 10^10 pixels, with almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


# -------------------------------------------------------------- benchmark file (tgrl data import)
def mathvision_row(pid: str, **over) -> dict:
    row = {"id": pid, "question": "<image1> How many dots?", "options": [], "image": f"images/{pid}.png",
           "answer": "12", "solution": None, "level": 1, "subject": "counting"}  # fmt: skip
    row.update(over)
    return row


# (line in the JSONL file, what is wrong, words of the rejection reason); lines 1 and 2 are good rows
IMPORT_ROWS = [
    (3, "malformed JSON", "invalid JSON"),
    (4, "missing field", "question"),
    (5, "wrong type", "question"),
    (6, "zero-byte image", "empty (0 bytes)"),
    (7, "truncated image", "broken"),
    (8, "not an image", "not an image"),
    (9, "decompression bomb", "decompression bomb"),
    (10, "path traversal", "refused"),
    (11, "absolute path", "refused"),
    (12, "symlink escaping the images folder", "outside"),
    (13, "duplicate id", "duplicate id"),
    (14, "JSON array instead of an object", "expected a JSON object"),
    (15, "unpaired surrogate in the question", "unicode"),
    (16, "image path with a NUL byte", "control characters"),
    (17, "invalid UTF-8 in the question", "invalid UTF-8"),  # was silently replaced (U+FFFD) and kept
    (18, "duplicate key", "duplicate key 'answer'"),  # the last value silently won
    (19, "nested 100,000 levels deep", "nested deeper than 32"),  # was a RecursionError traceback
]


def benchmark_file(root: Path) -> Path:
    """`root/bench/test.jsonl` (MATH-Vision format): 2 good rows, then one bad row per `IMPORT_ROWS`."""
    bench, images = root / "bench", root / "bench" / "images"
    images.mkdir(parents=True)
    for pid in ("1", "2", "x"):
        (images / f"{pid}.png").write_bytes(png())
    (images / "6.png").write_bytes(b"")
    (images / "7.png").write_bytes(truncated_png())
    (images / "8.png").write_text("<html>not an image</html>")
    (images / "9.png").write_bytes(bomb_png())
    (root / "secret.png").write_bytes(png(color=(1, 2, 3)))
    (images / "12.png").symlink_to(root / "secret.png")
    rows = [
        json.dumps(mathvision_row("1")),
        json.dumps(mathvision_row("2")),
        '{"id": "3", "question": "How many?", "image": ',
        json.dumps({k: v for k, v in mathvision_row("4").items() if k != "question"}),
        json.dumps(mathvision_row("5", question=["not", "text"])),
        *(json.dumps(mathvision_row(pid)) for pid in ("6", "7", "8", "9")),
        json.dumps(mathvision_row("10", image="../secret.png")),
        json.dumps(mathvision_row("11", image="/etc/passwd")),
        json.dumps(mathvision_row("12")),
        json.dumps(mathvision_row("1", image="images/x.png")),
        "[1, 2, 3]",
        json.dumps(mathvision_row("15", question="How many \ud800 dots?", image="images/x.png")),
        json.dumps(mathvision_row("16", image="images/x\u0000.png")),
        json.dumps(mathvision_row("17", question="QUESTION", image="images/x.png")),
        duplicate_key(json.dumps(mathvision_row("18", image="images/x.png")), "answer", "13"),
        json.dumps(mathvision_row("19", image="images/x.png"))[:-1]
        + ', "meta": '
        + "[" * 100_000
        + "]" * 100_000
        + "}",
    ]
    data = "\n".join(rows).encode("utf-8", "surrogatepass") + b"\n\n"
    path = bench / "test.jsonl"
    path.write_bytes(data.replace(b"QUESTION", b"How many \xff\xfe dots?"))
    return path


# ------------------------------------------------------------------ datasets with a valid manifest
def rehash(root: Path) -> None:
    """Recompute the manifest's hashes and count after `records.jsonl` was edited: a well-formed
    dataset whose bad rows only the row checks can catch."""
    manifest = Manifest.model_validate_json((root / MANIFEST).read_text())
    files = {rel: sha256_file(root / rel) for rel in manifest.files if (root / rel).is_file()}
    lines = [x for x in (root / RECORDS).read_bytes().split(b"\n") if x.strip()]
    update = {"files": files, "count": len(lines)}
    (root / MANIFEST).write_text(manifest.model_copy(update=update).model_dump_json())


def copy_with_lines(src: Path, dst: Path, edits: dict[int, str | bytes]) -> Path:
    """A copy of dataset `src` with the given 1-based lines of records.jsonl replaced (hashes recomputed);
    a `bytes` replacement is written as is (invalid UTF-8 survives)."""
    shutil.copytree(src, dst)
    lines = (dst / RECORDS).read_bytes().split(b"\n")[:-1]
    for number, text in edits.items():
        lines[number - 1] = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    (dst / RECORDS).write_bytes(b"\n".join(lines) + b"\n")
    rehash(dst)
    return dst


def nested(line: str, depth: int) -> str:
    """`line` (a JSON object) with its `meta` replaced by one nested `depth` arrays deep, as raw text."""
    data = json.loads(line)
    data.pop("meta", None)
    return json.dumps(data)[:-1] + ', "meta": {"deep": ' + "[" * depth + "]" * depth + "}}"


def duplicate_key(line: str, key: str, value: object) -> str:
    """`line` with `key` given a second time (JSON parsers silently keep the last one)."""
    return line[:-1] + f", {json.dumps(key)}: {json.dumps(value)}}}"


def invalid_utf8(line: str) -> bytes:
    """`line` with two bytes that are not UTF-8 inside its first string value."""
    head, sep, tail = line.partition('": "')
    return (head + sep).encode() + b"\xff\xfe" + tail.encode()


def row(src: Path, number: int, **changes) -> str:
    """Line `number` of `src`'s records.jsonl as JSON with `changes` applied (None deletes a key)."""
    data = json.loads((src / RECORDS).read_text(encoding="utf-8").splitlines()[number - 1])
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data)


def trajectories(root: Path, problems: Path, lines: list[str]) -> Path:
    """A trajectories dataset of raw `lines` (hashed into a valid manifest) over `problems`."""
    root.mkdir(parents=True)
    (root / RECORDS).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    manifest = Manifest(
        kind="trajectories", count=len(lines), files={RECORDS: sha256_file(root / RECORDS)},
        meta={"problems": str(problems.resolve())},
    )  # fmt: skip
    (root / MANIFEST).write_text(manifest.model_dump_json())
    return root


def trajectory_line(problem_id: str, **fields) -> str:
    """One trajectory row; `fields` are pasted as raw JSON text so that NaN / Infinity tokens survive."""
    text = json.dumps("<think>1</think><answer>1</answer>")
    head = f'"problem_id": {json.dumps(problem_id)}, "source": "expert:x", "text": {text}'
    return "{" + head + "".join(f", {json.dumps(k)}: {v}" for k, v in fields.items()) + "}"


def first_image(root: Path) -> Path:
    return root / load_dataset(root).records[0].image


def image_of_line(root: Path, number: int) -> Path:
    """The image file of line `number` of `root`'s records.jsonl (read raw: the row may be refused)."""
    return root / json.loads((root / RECORDS).read_text(encoding="utf-8").splitlines()[number - 1])["image"]
