"""Benchmark importers on small files written here in each published format (real PNG bytes, parquet via
pyarrow): mapped problems, copied images, and rejected rows with file, row and reason."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tgrl_lib.data.importers import import_benchmark
from tgrl_lib.data.schema import load_dataset
from tgrl_lib.data.validate import validate_dataset
from tgrl_lib.errors import TgrlError


def png(color=(200, 30, 30), size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header announcing a giant image (a decompression bomb) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()[:300]


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def run(fmt, path, tmp_path, **kwargs):
    report = import_benchmark(fmt, path, tmp_path / "out", **kwargs)
    assert report.input_rows == report.imported + report.rejected
    assert validate_dataset(tmp_path / "out") == [] and validate_dataset(tmp_path / "out-rejected") == []
    problems = {p.id: p for p in load_dataset(tmp_path / "out", "problems", strict=True).records}
    rejected = load_dataset(tmp_path / "out-rejected", "rejected", strict=True).records
    assert len(problems) == report.imported and len(rejected) == report.rejected
    return report, problems, rejected


def reasons(rejected) -> dict[int, str]:
    return {r.line: r.reason for r in rejected}


def mathvista_row(pid, **over):
    row = {
        "pid": pid, "question": "How many?", "image": f"images/{pid}.png", "choices": None, "unit": None,
        "precision": None, "answer": "3", "question_type": "free_form", "answer_type": "integer",
        "metadata": {"split": "testmini", "task": "figure question answering", "skills": ["arithmetic"],
                     "source": "FigureQA", "category": "math-targeted-vqa"},
        "query": "Hint: ...",
    }  # fmt: skip
    row.update(over)
    return row


def test_mathvista_json(tmp_path):
    src = tmp_path / "mathvista"
    images = src / "images"
    images.mkdir(parents=True)
    for pid in "1234":
        (images / f"{pid}.png").write_bytes(png())
    (images / "5.png").write_bytes(b"")
    (images / "6.png").write_bytes(truncated_png())
    (images / "7.png").write_bytes(b"<html>not an image</html>")
    (images / "8.png").write_bytes(huge_png())
    (tmp_path / "secret.png").write_bytes(png())
    rows = {
        "1": mathvista_row("1", question_type="multi_choice", answer_type="text", answer="larger than",
                           choices=["larger than", "equal to", "smaller than"]),
        "2": mathvista_row("2", answer="1.25", answer_type="float", precision=2.0, unit="cm"),
        "3": mathvista_row("3"),
        "4": mathvista_row("4", answer="[1, 2]", answer_type="list"),
        "5": mathvista_row("5"),
        "6": mathvista_row("6"),
        "7": mathvista_row("7"),
        "8": mathvista_row("8"),
        "9": mathvista_row("9", image="../secret.png"),
        "10": mathvista_row("10", image="/etc/passwd"),
        "11": mathvista_row("11", image="images/missing.png"),
        "12": {k: v for k, v in mathvista_row("1").items() if k != "question"} | {"pid": "12"},
        "13": mathvista_row("13", question_type="multi_choice", answer="maybe", choices=["yes", "no"],
                            image="images/1.png"),
        "14": mathvista_row("3", precision=-1, answer_type="float") | {"pid": "14"},
        "15": mathvista_row("3", question=["not", "text"]) | {"pid": "15"},
        "16": mathvista_row("1"),  # duplicate pid
        "17": "not an object",
    }  # fmt: skip
    report, problems, rejected = run("mathvista", write_json(src / "testmini.json", rows), tmp_path)
    assert (report.input_rows, report.imported, report.rejected) == (17, 4, 13)

    mc, flt, num, lst = (problems[f"mathvista-{i}"] for i in "1234")
    assert (mc.answer_type, mc.answer, mc.choices) == (
        "multiple_choice",
        "larger than",
        ["larger than", "equal to", "smaller than"],
    )
    assert (flt.answer_type, flt.answer, flt.precision, flt.unit) == ("float", "1.25", 2, "cm")
    assert (num.answer_type, num.precision, num.unit, num.split, num.source) == (
        "integer",
        None,
        None,
        "testmini",
        "mathvista",
    )
    assert (lst.answer_type, lst.answer) == ("text", "[1, 2]")
    assert num.meta["category"] == "figure question answering" and num.meta["skills"] == ["arithmetic"]
    assert num.image == "images/3.png" and (tmp_path / "out" / num.image).read_bytes() == png()

    why = reasons(rejected)
    assert "empty (0 bytes)" in why[5] and "broken" in why[6] and "not an image" in why[7]
    assert "pixel limit" in why[8] or "decompression bomb" in why[8]
    assert "refused" in why[9] and "refused" in why[10] and "not found" in why[11]
    assert "missing field 'question'" in why[12] and "not one of the choices" in why[13]
    assert "precision" in why[14] and "must be a string" in why[15]
    assert "duplicate id '1'" in why[16] and "expected an object" in why[17]
    assert all(r.file == str(src / "testmini.json") and r.stage == "import:mathvista" for r in rejected)
    assert why[12].startswith("row 12 (12): ") and rejected[0].record["pid"] == "5"
    assert report.reasons["bad image"] == 4 and "unsafe image path" in report.reasons


def test_mathvista_parquet_with_embedded_images(tmp_path):
    rows = [
        mathvista_row("1", image="images/1.jpg", decoded_image={"bytes": png((0, 0, 255)), "path": "1.png"}),
        mathvista_row("2", image="images/2.jpg", decoded_image={"bytes": b"garbage", "path": "2.png"},
                      metadata={"split": "testmini"}),
    ]  # fmt: skip
    path = tmp_path / "testmini-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report, problems, rejected = run("mathvista", path, tmp_path)
    assert (report.imported, report.rejected) == (1, 1)
    problem = problems["mathvista-1"]
    assert problem.image == "images/1.png" and problem.split == "testmini"
    assert Image.open(tmp_path / "out" / problem.image).getpixel((0, 0)) == (0, 0, 255)
    assert (
        "not an image" in rejected[0].reason and rejected[0].record["decoded_image"]["bytes"] == "<7 bytes>"
    )


def test_mathverse(tmp_path):
    (tmp_path / "images_version_1-4").mkdir()
    for i in range(1, 5):
        (tmp_path / "images_version_1-4" / f"image_{i}.png").write_bytes(png())
    base = {"problem_index": "1", "metadata": {"split": "testmini", "subject": "plane geometry"}}
    rows = [
        base | {"sample_index": "1", "problem_version": "Text Dominant", "question_type": "multi-choice",
                "question": "then the size of angle CED is ()\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°",
                "image": "images_version_1-4/image_1.png", "answer": "D"},
        base | {"sample_index": "2", "problem_version": "Vision Only", "question_type": "multi-choice",
                "question": "", "question_for_eval": "", "image": "images_version_1-4/image_2.png",
                "answer": "B"},
        base | {"sample_index": "3", "problem_version": "Text Lite", "question_type": "free-form",
                "question": "Find x.", "image": "images_version_1-4/image_3.png", "answer": "2.5"},
        base | {"sample_index": "4", "problem_version": "Text Lite", "question_type": "multi-choice",
                "question": "Pick one.", "image": "images_version_1-4/image_4.png", "answer": "5 cm"},
    ]  # fmt: skip
    _, problems, rejected = run("mathverse", write_json(tmp_path / "testmini.json", rows), tmp_path)
    text_mc, vision_mc, free = problems["mathverse-1"], problems["mathverse-2"], problems["mathverse-3"]
    assert text_mc.question == "then the size of angle CED is ()"
    assert (text_mc.answer, text_mc.choices) == ("140°", ["40°", "60°", "120°", "140°"])
    assert (vision_mc.answer, vision_mc.choices) == ("B", ["A", "B", "C", "D"])
    assert vision_mc.question and vision_mc.meta["category"] == "Vision Only"
    assert (free.answer_type, free.precision) == ("float", 1)
    assert "is not a letter" in reasons(rejected)[4]


def test_mathvision_jsonl(tmp_path):
    (tmp_path / "images").mkdir()
    for i in (1, 2, 3):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(png())  # PNG bytes under a .jpg name
    lines = [
        json.dumps({"id": "1", "question": "Which shape? <image1>", "options": ["A", "B", "C", "D", "E"],
                    "image": "images/1.jpg", "answer": "C", "solution": None, "level": 2,
                    "subject": "logic"}),
        json.dumps({"id": "2", "question": "<image1> How many dots?", "options": [], "image": "images/2.jpg",
                    "answer": "12", "solution": None, "level": 1, "subject": "counting"}),
        "{not json",
        json.dumps({"id": "3", "question": "Pick", "options": ["1 cm", "2 cm"], "image": "images/3.jpg",
                    "answer": "F", "level": 1, "subject": "metric geometry - length"}),
    ]  # fmt: skip
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    report, problems, rejected = run("mathvision", path, tmp_path)
    assert (report.input_rows, report.imported) == (4, 2)
    mc, free = problems["mathvision-1"], problems["mathvision-2"]
    assert (mc.question, mc.answer, mc.choices[2]) == ("Which shape?", "C", "C")
    assert mc.image == "images/1.png" and mc.meta["level"] == 2 and mc.meta["category"] == "logic"
    assert (free.question, free.answer_type, free.split) == ("How many dots?", "integer", "test")
    why = reasons(rejected)
    assert "invalid JSON" in why[3] and rejected[0].raw == "{not json" and "not one of the options" in why[4]


def test_wemath(tmp_path):
    (tmp_path / "3steps" / "image").mkdir(parents=True)
    (tmp_path / "3steps" / "image" / "165-3.png").write_bytes(png())
    row = {
        "ID": "3steps_165", "split": "testmini", "knowledge concept": "Area of Circles",
        "question": "what is the area of the flower bed (  ) m²?",
        "option": "A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer", "answer": "B",
        "image_path": "3steps/image/165-3.png", "key": "3steps_3", "question number": 1575,
        "knowledge concept description": "Area of ...",
    }  # fmt: skip
    broken = row | {"ID": "3steps_166", "option": "two hundred or three"}
    _, problems, rejected = run("wemath", write_json(tmp_path / "testmini.json", [row, broken]), tmp_path)
    problem = problems["wemath-3steps_165"]
    assert (
        problem.answer == "3215.36"
        and problem.choices[-1] == "No correct answer"
        and len(problem.choices) == 5
    )
    assert problem.meta["category"] == "3steps" and problem.meta["question_number"] == 1575
    assert "lettered options" in rejected[0].reason


def test_dynamath_seed_json_and_variant_jsonl(tmp_path):
    (tmp_path / "image").mkdir()
    for i in (1, 5, 9):
        (tmp_path / "image" / f"image{i}.png").write_bytes(png())
    seeds = {
        "1": {"question": "What is the period of this function?", "answer": "2.0944",
              "image": "image/image1.png", "answer_type": "float", "subject": "analytic geometry",
              "level": "high school"},
        "5": {"question": "Is Dark Magenta greater than Rosy Brown? Choices: (A) yes (B) no", "answer": "B",
              "image": "image/image5.png", "answer_type": "multiple choice", "subject": "statistics",
              "level": "elementary school"},
        "9": {"question": "Find the perimeter of orange square.", "answer": "24", "image": "image/image9.png",
              "answer_type": "float", "subject": "plane geometry", "level": "elementary school"},
    }  # fmt: skip
    _, problems, _ = run("dynamath", write_json(tmp_path / "dataset.json", seeds), tmp_path)
    period, mc, perimeter = problems["dynamath-1"], problems["dynamath-5"], problems["dynamath-9"]
    assert (period.answer_type, period.precision) == ("float", 4)
    assert (mc.question, mc.answer, mc.choices) == (
        "Is Dark Magenta greater than Rosy Brown?",
        "no",
        ["yes", "no"],
    )
    assert (perimeter.answer_type, perimeter.precision, mc.meta["category"]) == ("float", None, "statistics")

    variants = [
        {"id": "5", "varid": 3, "question": "how many zeros? choice: (A) 2 (B) 1 (C) 0", "ground_truth": "C",
         "answer_type": "multiple choice", "image": "image/image5.png", "knowledge_level": "high school"},
        {"id": "9", "varid": 3, "question": "Count.", "ground_truth": "7", "answer_type": "int",
         "image": "image/image9.png"},
        {"id": "9", "varid": 4, "question": "Count.", "ground_truth": "seven", "answer_type": "int",
         "image": "image/image9.png"},
    ]  # fmt: skip
    path = tmp_path / "sample_variant3.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in variants), encoding="utf-8")
    _, problems, rejected = run("dynamath", path, tmp_path / "v")
    assert problems["dynamath-5-v3"].answer == "0" and problems["dynamath-9-v3"].answer_type == "integer"
    assert problems["dynamath-5-v3"].meta["level"] == "high school"
    assert "not an integer" in rejected[0].reason and rejected[0].line == 3


def test_logicvista(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("v1_0", "v1_1", "v1_19", "v1_20"):
        (tmp_path / "images" / f"{name}.png").write_bytes(png())
    rows = {
        "v1_0": {"imagename": "v1_0.png", "question": "What choice (A, B, C, or D) should be in place?",
                 "answer": "C", "reasoning": "...", "skill": ["inductive"], "capability": ["diagram"]},
        "v1_1": {"imagename": "v1_1.png", "question": "Which choices in the image (A-D) belong to green?",
                 "answer": "A, C", "skill": ["inductive"], "capability": ["diagram"]},
        "v1_19": {"imagename": "v1_19.png", "answer": "C", "skill": ["inductive"],
                  "question": "How many triangles will be in the 6th shape? Select answers from A-D. \n "
                              "A) 10 B) 12 C) 14 D) 16"},
        "v1_20": {"imagename": "v1_20.png", "question": "Which is the correct answer? Select from 1-5",
                  "answer": "3", "skill": ["deductive"], "capability": ["ocr"]},
        "v1_21": {"imagename": "v1_21.png", "question": "Missing image", "answer": "A", "skill": []},
    }  # fmt: skip
    report, problems, rejected = run("logicvista", write_json(tmp_path / "dataset.json", rows), tmp_path)
    letters, multi, inline, digits = (problems[f"logicvista-{k}"] for k in ("v1_0", "v1_1", "v1_19", "v1_20"))
    assert (letters.answer_type, letters.answer, letters.choices) == (
        "multiple_choice",
        "C",
        ["A", "B", "C", "D"],
    )
    assert (multi.answer_type, multi.answer) == ("text", "A, C")
    assert (inline.answer, inline.choices) == ("14", ["10", "12", "14", "16"])
    assert inline.question.endswith("Select answers from A-D.")
    assert (digits.answer, digits.choices, digits.meta["category"]) == (
        "3",
        ["1", "2", "3", "4", "5"],
        "deductive",
    )
    assert report.rejected == 1 and "not found" in rejected[0].reason and "(v1_21)" in rejected[0].reason


def test_images_dir_option_and_symlink_escape(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png())
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "a.png").write_bytes(png())
    (pics / "evil.png").symlink_to(outside)
    rows = {"1": mathvista_row("1", image="images/a.png"), "2": mathvista_row("2", image="evil.png")}
    _, problems, rejected = run(
        "mathvista", write_json(tmp_path / "src" / "x.json", rows), tmp_path, images_dir=pics
    )
    assert list(problems) == ["mathvista-1"]  # "images/a.png" found by its file name inside --images
    assert "outside" in rejected[0].reason


def test_whole_input_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": {"pid": "1",', encoding="utf-8")
    with pytest.raises(TgrlError, match=r"bad.json: invalid JSON .* line 1"):
        import_benchmark("mathvista", bad, tmp_path / "o1")
    with pytest.raises(TgrlError, match="unknown benchmark format"):
        import_benchmark("mmmu", bad, tmp_path / "o2")
    with pytest.raises(TgrlError, match="does not exist"):
        import_benchmark("mathvista", tmp_path / "nope.json", tmp_path / "o3")
    with pytest.raises(TgrlError, match="no rows imported"):
        import_benchmark("mathvista", write_json(tmp_path / "empty.json", []), tmp_path / "o4")
    with pytest.raises(TgrlError, match="expected a JSON array or object"):
        import_benchmark("mathvista", write_json(tmp_path / "num.json", 42), tmp_path / "o5")
    bad_parquet = tmp_path / "x.parquet"
    bad_parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(TgrlError, match="not a readable parquet file"):
        import_benchmark("mathvista", bad_parquet, tmp_path / "o6")


def test_all_rows_rejected_leaves_no_readable_dataset(tmp_path):
    rows = {"1": mathvista_row("1", image="images/none.png")}
    with pytest.raises(TgrlError, match=r"no rows imported .* not found"):
        import_benchmark("mathvista", write_json(tmp_path / "x.json", rows), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert load_dataset(tmp_path / "out-rejected", "rejected").manifest.count == 1
