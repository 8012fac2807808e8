"""Data contracts: records, dataset directories, manifest-last, row-level errors, safe paths."""

import io
import json

import pytest
from PIL import Image

from tgrl_lib.data.schema import (
    DatasetWriter,
    Problem,
    Rejected,
    Trajectory,
    check_relative_path,
    load_dataset,
    resolve_inside,
    write_dataset,
)
from tgrl_lib.data.validate import validate_dataset
from tgrl_lib.errors import TgrlError


def _problem(i: int, **extra) -> Problem:
    fields = dict(
        id=f"p{i}", image=f"images/{i}.png", question="How many?", answer="3", answer_type="integer"
    )
    fields.update(extra)
    return Problem(**fields)


def _png(shade: int, size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(root, n=3):
    with DatasetWriter(root, "problems") as writer:
        for i in range(n):
            writer.add_image(f"images/{i}.png", _png(i))
        writer.write([_problem(i) for i in range(n)])
    return root


def test_round_trip_and_manifest_hashes(tmp_path):
    root = _write(tmp_path / "ds")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["kind"] == "problems" and manifest["count"] == 3
    assert set(manifest["files"]) == {"records.jsonl", "images/0.png", "images/1.png", "images/2.png"}
    dataset = load_dataset(root, "problems")
    assert [p.id for p in dataset.records] == ["p0", "p1", "p2"] and dataset.errors == []
    assert validate_dataset(root) == []


def test_writes_are_byte_identical(tmp_path):
    a, b = _write(tmp_path / "a"), _write(tmp_path / "b")
    for name in ("manifest.json", "records.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_directory_without_manifest_is_refused(tmp_path):
    root = tmp_path / "partial"
    writer = DatasetWriter(root, "problems")
    writer.write([_problem(0)])
    with pytest.raises(TgrlError, match=r"no manifest\.json"):
        load_dataset(root)
    writer.close()
    assert load_dataset(root).manifest.count == 1


def test_exception_inside_writer_leaves_no_manifest(tmp_path):
    root = tmp_path / "ds"
    with pytest.raises(RuntimeError), DatasetWriter(root, "problems") as writer:
        writer.write([_problem(0)])
        raise RuntimeError("killed")
    assert not (root / "manifest.json").exists()


def test_validate_names_the_bad_line(tmp_path):
    root = _write(tmp_path / "ds")
    lines = (root / "records.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"answer_type": "integer"', '"answer_type": "integr"')
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    problems = validate_dataset(root)
    assert any("records.jsonl:2:" in p and "answer_type" in p for p in problems)
    assert any("sha256" in p for p in problems)
    with pytest.raises(TgrlError, match="sha256"):
        load_dataset(root)


def test_missing_image_and_traversal_are_row_errors(tmp_path):
    root = _write(tmp_path / "ds")
    (root / "images" / "1.png").unlink()
    text = (root / "records.jsonl").read_text().replace("images/2.png", "../2.png")
    (root / "records.jsonl").write_text(text)
    problems = "\n".join(validate_dataset(root))
    assert "records.jsonl:2: image 'images/1.png' is missing" in problems
    assert "records.jsonl:3:" in problems and ".." in problems


def test_symlink_escaping_the_dataset_is_refused(tmp_path):
    root = _write(tmp_path / "ds")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    (root / "images" / "0.png").unlink()
    (root / "images" / "0.png").symlink_to(outside)
    with pytest.raises(TgrlError, match="outside"):
        resolve_inside(root, "images/0.png")
    assert any("outside" in p for p in validate_dataset(root))


def test_duplicate_ids_and_bad_json(tmp_path):
    root = tmp_path / "ds"
    with DatasetWriter(root, "problems") as writer:
        writer.add_image("images/0.png", _png(0))
        writer.write([_problem(0, image="images/0.png"), _problem(0, image="images/0.png")])
    dataset = load_dataset(root)
    assert len(dataset.records) == 1 and "duplicate id" in dataset.errors[0].reason
    assert dataset.errors[0].line == 2


@pytest.mark.parametrize("bad", ["../x.png", "/etc/passwd", "a/../../b", "C:/x.png", "a\\b.png", ""])
def test_relative_paths_only(bad):
    with pytest.raises(ValueError):
        check_relative_path(bad)


def test_record_rules():
    with pytest.raises(ValueError, match="not one of the choices"):
        Problem(
            id="x",
            image="i.png",
            question="q",
            answer="green",
            answer_type="multiple_choice",
            choices=["red", "blue"],
        )
    with pytest.raises(ValueError):
        Trajectory(problem_id="x", source="someone", text="t")
    with pytest.raises(ValueError):
        Trajectory(problem_id="x", source="expert:oracle", text="t", reward=float("nan"))
    with pytest.raises(ValueError, match="Extra inputs"):
        Problem(id="x", image="i.png", question="q", answer="1", answer_type="integer", bogus=1)


def test_nan_in_jsonl_is_a_row_error(tmp_path):
    root = tmp_path / "t"
    write_dataset(root, "trajectories", [Trajectory(problem_id="p", source="expert:o", text="t")])
    (root / "records.jsonl").write_text(
        '{"problem_id": "p", "source": "expert:o", "text": "t", "reward": NaN}\n'
    )
    errors = load_dataset(root, verify_hashes=False).errors
    assert errors and errors[0].line == 1 and "NaN" in errors[0].reason


def test_resume_keeps_complete_rows_and_drops_torn_tail(tmp_path):
    root = tmp_path / "t"
    writer = DatasetWriter(root, "trajectories")
    writer.write([Trajectory(problem_id=f"p{i}", source="expert:o", text="t") for i in range(2)])
    with open(root / "records.jsonl", "a") as handle:
        handle.write('{"problem_id": "p2", "sour')  # killed mid-write
    resumed = DatasetWriter(root, "trajectories", resume=True)
    assert [t.problem_id for t in resumed.existing()] == ["p0", "p1"]
    resumed.write([Trajectory(problem_id="p2", source="expert:o", text="t")])
    resumed.close()
    assert [t.problem_id for t in load_dataset(root).records] == ["p0", "p1", "p2"]


def test_rejected_from_row_error(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, "problems", [])
    (root / "records.jsonl").write_text("{not json\n")
    error = load_dataset(root, verify_hashes=False).errors[0]
    rejected = error.to_rejected()
    assert isinstance(rejected, Rejected) and rejected.raw == "{not json" and rejected.line == 1
