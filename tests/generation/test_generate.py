"""Expert generation (`tgrl_lib.generation.run`, `tgrl generate`): scored trajectories with K samples per
problem, counts that reconcile, resume without duplicates or losses, refused problem rows with file and
line, the hf backend on the tiny model (including an undecodable image), and the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tgrl_lib.cli import main
from tgrl_lib.config import GenerateConfig
from tgrl_lib.data.schema import MANIFEST, RECORDS, Manifest, load_dataset, sha256_file
from tgrl_lib.data.synthetic import synthesize
from tgrl_lib.data.validate import validate_dataset
from tgrl_lib.errors import TgrlError
from tgrl_lib.generation.run import generate_trajectories
from tgrl_lib.scoring.rewards import reward


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generate") / "problems"
    synthesize(root, n=40, seed=7)
    return root


def rows(root: Path) -> list[tuple[str, int, str]]:
    return sorted((t.problem_id, t.meta["sample"], t.text) for t in load_dataset(root).records)


def test_oracle_trajectories_are_scored_and_counted(problems, tmp_path):
    config = GenerateConfig(samples_per_problem=3, fault_rate=0.3, sampling={"batch_size": 7})
    report = generate_trajectories(problems, tmp_path / "t", config, rejected_dir=tmp_path / "r")
    written = load_dataset(tmp_path / "t", "trajectories")
    problem_of = load_dataset(problems).by_id()
    assert report.problems == report.readable == 40 and report.generated == 40 and report.skipped == 0
    assert report.trajectories == report.new_trajectories == 120 == len(written.records)
    assert Counter(t.problem_id for t in written.records) == dict.fromkeys(problem_of, 3)
    for t in written.records:
        expected = reward(t.text, problem_of[t.problem_id])
        assert (t.answer, t.correct, t.reward) == (expected.answer, expected.correct, expected.reward)
        assert t.source == "expert:oracle" and t.meta["sample"] in (0, 1, 2)
    faults = Counter(t.meta.get("fault") for t in written.records)
    assert sum(v for k, v in faults.items() if k) == sum(report.faults.values()) > 0
    clean = [t for t in written.records if not t.meta.get("fault")]
    assert all(t.correct for t in clean)  # the oracle is right when it is not told to be wrong
    assert report.correct == sum(t.correct for t in written.records)
    meta = written.manifest.meta
    assert meta["problems"] == str(problems.resolve()) and meta["samples_per_problem"] == 3
    assert load_dataset(tmp_path / "r", "rejected").records == []
    assert validate_dataset(tmp_path / "t") == []


def test_rerun_after_a_torn_write_completes_without_duplicates(problems, tmp_path):
    config = GenerateConfig(samples_per_problem=3, fault_rate=0.3, sampling={"batch_size": 4})
    generate_trajectories(problems, tmp_path / "full", config)
    expected = rows(tmp_path / "full")
    # a crash: no manifest, whole lines, one sample missing (line 51), a torn last line
    part = tmp_path / "part"
    part.mkdir()
    lines = (tmp_path / "full" / RECORDS).read_text().splitlines(keepends=True)
    kept = lines[:50] + lines[51:60]
    (part / RECORDS).write_text("".join(kept) + lines[60][:25])
    report = generate_trajectories(problems, part, config)
    assert rows(part) == expected  # same texts, nothing twice, nothing lost
    assert report.trajectories == 120 and report.new_trajectories == 120 - 59
    done = {pid for pid, n in Counter(json.loads(x)["problem_id"] for x in kept).items() if n == 3}
    assert report.skipped == len(done) and report.generated == 40 - len(done)
    again = generate_trajectories(problems, part, config)  # a complete output: nothing to do
    assert again.skipped == 40 and again.new_trajectories == 0 and rows(part) == expected


def test_an_output_from_another_run_is_refused_untouched(problems, tmp_path, tiny_model_dir):
    generate_trajectories(problems, tmp_path / "t", GenerateConfig(samples_per_problem=3))
    before = {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()}
    with pytest.raises(TgrlError, match="sample 2"):
        generate_trajectories(problems, tmp_path / "t", GenerateConfig(samples_per_problem=2))
    hf = GenerateConfig(samples_per_problem=3, backend={"kind": "hf"}, model=str(tiny_model_dir))
    with pytest.raises(TgrlError, match="holds trajectories from 'expert:oracle'"):
        generate_trajectories(problems, tmp_path / "t", hf)
    assert {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()} == before  # still complete
    with pytest.raises(TgrlError, match="--out must differ"):
        generate_trajectories(problems, problems, GenerateConfig())
    other = tmp_path / "other-problems"
    synthesize(other, n=2, seed=1)
    with pytest.raises(TgrlError, match="holds a problems dataset written by"):
        generate_trajectories(problems, other, GenerateConfig())
    assert validate_dataset(other) == []
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / RECORDS).write_text("my notes\nmore notes\n")
    with pytest.raises(TgrlError, match="not a tgrl generate output"):
        generate_trajectories(problems, tmp_path / "notes", GenerateConfig())
    assert (tmp_path / "notes" / RECORDS).read_text() == "my notes\nmore notes\n"


def broken_problems(problems: Path, root: Path) -> Path:
    """A copy of `problems` with a bad JSON row (line 3), a missing image (line 5) and a duplicate id."""
    import shutil

    shutil.copytree(problems, root)
    lines = (root / RECORDS).read_text().splitlines()[:8]
    lines[2] = lines[2][:40]
    (root / json.loads(lines[4])["image"]).unlink()
    lines.append(lines[0])  # line 9: duplicate id
    (root / RECORDS).write_text("\n".join(lines) + "\n")
    manifest = Manifest.model_validate_json((root / MANIFEST).read_text())
    files = manifest.files | {RECORDS: sha256_file(root / RECORDS)}
    (root / MANIFEST).write_text(manifest.model_copy(update={"count": 9, "files": files}).model_dump_json())
    return root


def test_refused_problem_rows_go_to_rejected_with_line(problems, tmp_path):
    bad = broken_problems(problems, tmp_path / "bad")
    with pytest.raises(TgrlError, match=r"3 problem row\(s\) are unreadable.*pass --rejected DIR"):
        generate_trajectories(bad, tmp_path / "t", GenerateConfig())
    report = generate_trajectories(bad, tmp_path / "t", GenerateConfig(), rejected_dir=tmp_path / "r")
    rejected = load_dataset(tmp_path / "r", "rejected").records
    assert sorted(r.line for r in rejected) == [3, 5, 9]
    assert {r.stage for r in rejected} == {"read"} and all(r.file == RECORDS for r in rejected)
    reasons = {r.line: r.reason for r in rejected}
    assert "invalid JSON" in reasons[3] and "missing" in reasons[5] and "duplicate id" in reasons[9]
    assert report.problems == 9 == report.readable + report.rejected and report.trajectories == 6


def test_hf_backend_on_the_tiny_model_rejects_an_undecodable_image(problems, tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(problems, tmp_path / "p")
    dataset = load_dataset(tmp_path / "p")
    victim = dataset.records[1]
    image = tmp_path / "p" / victim.image  # header intact (the reader's check passes), data cut
    image.write_bytes(image.read_bytes()[:60])
    config = GenerateConfig(
        backend={"kind": "hf"},
        model=str(tiny_model_dir),
        samples_per_problem=2,
        sampling={"max_new_tokens": 6, "temperature": 1.0},
    )
    subset = tmp_path / "subset"
    from tgrl_lib.data.schema import write_dataset

    write_dataset(subset, "problems", dataset.records[:3])
    for problem in dataset.records[:3]:
        (subset / problem.image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "p" / problem.image, subset / problem.image)
    report = generate_trajectories(subset, tmp_path / "t", config, rejected_dir=tmp_path / "r")
    [rejected] = load_dataset(tmp_path / "r").records
    assert rejected.stage == "generate:image" and rejected.record["id"] == victim.id
    assert "corrupt or truncated image" in rejected.reason or "not a readable image" in rejected.reason
    written = load_dataset(tmp_path / "t").records
    assert len(written) == 4 and report.rejected == 1 and report.generated == 2
    assert all(t.source == f"expert:{tiny_model_dir.name}" for t in written)
    assert all(1 <= t.meta["tokens"] <= 6 and t.meta["finish_reason"] in ("stop", "length") for t in written)


def test_cli_generate_writes_the_default_rejected_dataset(problems, tmp_path, capsys):
    base = ["generate", "--problems", str(problems)]
    assert main([*base, "--out", str(tmp_path / "traj"), "--samples", "2", "--fault-rate", "0.5"]) == 0
    assert "80 trajectories for 40 problems" in capsys.readouterr().out
    assert load_dataset(tmp_path / "traj.rejected", "rejected").records == []
    assert main([*base, "--out", str(tmp_path / "t2"), "--samples", "0"]) == 2
    assert "samples_per_problem" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "t3"), "--expert", "openai"]) == 2
    assert "needs base_url" in capsys.readouterr().err
    assert not (tmp_path / "t3" / MANIFEST).exists()


# ------------------------------------------------------------------------------- hostile inputs
def copy_problems(problems: Path, root: Path, n: int = 4) -> Path:
    """The first `n` problems of `problems` as a dataset of their own at `root` (images copied)."""
    import shutil

    from tgrl_lib.data.schema import write_dataset

    records = load_dataset(problems).records[:n]
    write_dataset(root, "problems", records)
    for problem in records:
        (root / problem.image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(problems / problem.image, root / problem.image)
    return root


def rewrite_rows(root: Path, edit) -> None:
    """Apply `edit(list of row dicts)` to records.jsonl and re-hash it in the manifest (a hostile but
    well-formed dataset)."""
    rows_ = [json.loads(x) for x in (root / RECORDS).read_text().splitlines()]
    edit(rows_)
    (root / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in rows_))
    manifest = Manifest.model_validate_json((root / MANIFEST).read_text())
    files = manifest.files | {RECORDS: sha256_file(root / RECORDS)}
    update = {"count": len(rows_), "files": files}
    (root / MANIFEST).write_text(manifest.model_copy(update=update).model_dump_json())


def _set_image(index: int, value: str):
    def edit(rows_):
        rows_[index]["image"] = value

    return edit


def _bomb(root: Path) -> None:
    from PIL import Image

    Image.new("1", (20000, 20000)).save(root / "images" / "bomb.png")  # 400 Mpx, a few KB
    rewrite_rows(root, _set_image(1, "images/bomb.png"))


def _zero_byte(root: Path) -> None:
    image = load_dataset(root).records[1].image
    (root / image).write_bytes(b"")


def _not_an_image(root: Path) -> None:
    image = load_dataset(root).records[1].image
    (root / image).write_text("this is not a png")


def _escaping_symlink(root: Path) -> None:
    (root / "images" / "link.png").symlink_to(Path("/etc/hostname"))
    rewrite_rows(root, _set_image(1, "images/link.png"))


# (name, how to break a 4-problem dataset, line of the refused row, words of the reason)
ROW_CASES = [
    ("traversal", lambda r: rewrite_rows(r, _set_image(1, "../../etc/passwd")), 2, "may not contain '..'"),
    ("absolute", lambda r: rewrite_rows(r, _set_image(1, "/etc/passwd")), 2, "must be relative"),
    ("symlink", _escaping_symlink, 2, "outside the dataset directory"),
    ("zero_byte", _zero_byte, 2, "image"),
    ("not_an_image", _not_an_image, 2, "image"),
    ("bomb", _bomb, 2, "decompression bomb"),
    ("wrong_type", lambda r: rewrite_rows(r, lambda rows_: rows_[1].update(answer=3)), 2, "answer"),
    ("unknown_field", lambda r: rewrite_rows(r, lambda rows_: rows_[1].update(colour="red")), 2, "colour"),
]


@pytest.mark.parametrize(("name", "breaker", "line", "reason"), ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_hostile_problem_rows_are_refused_one_by_one(problems, tmp_path, capsys, name, breaker, line, reason):
    root = copy_problems(problems, tmp_path / "p")
    breaker(root)
    out = tmp_path / "t"
    assert main(["generate", "--problems", str(root), "--out", str(out), "--samples", "2"]) == 0
    [rejected] = load_dataset(tmp_path / "t.rejected", "rejected").records
    assert rejected.line == line and rejected.file == RECORDS and reason in rejected.reason
    assert len(load_dataset(out).records) == 6  # the three good problems, K=2: nothing else lost
    assert "3 generated, 1 rejected" in capsys.readouterr().out


# (name, CLI arguments after --problems P --out O, what the one-line error says)
def _config(tmp_path: Path, text: str) -> str:
    (tmp_path / "c.yaml").write_text(text)
    return str(tmp_path / "c.yaml")


FATAL_CASES = [
    ("missing_dir", lambda t, p: ["--problems", str(t / "nope")], "dataset directory does not exist"),
    ("no_manifest", lambda t, p: ["--problems", str(t)], "no manifest.json"),
    ("unknown_key", lambda t, p: ["--config", _config(t, "generate: {samplez: 2}\n")], "samplez"),
    ("invalid_yaml", lambda t, p: ["--config", _config(t, "generate: [1,\n")], "invalid YAML"),
    ("fault_rate", lambda t, p: ["--fault-rate", "1.5"], "fault_rate"),
    ("bad_url", lambda t, p: ["--expert", "openai", "--model", "m", "--base-url", "ftp://x"], "http://"),
    ("no_model", lambda t, p: ["--expert", "hf"], "needs a model"),
    ("pickle_model", lambda t, p: ["--expert", "hf", "--model", str(_pickle_model(t))], "refusing pickle"),
]


def _pickle_model(root: Path) -> Path:
    model = root / "pickled"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return model


@pytest.mark.parametrize(("name", "extra", "message"), FATAL_CASES, ids=[c[0] for c in FATAL_CASES])
def test_unusable_generate_inputs_fail_in_one_line(problems, tmp_path, capsys, name, extra, message):
    args = ["generate", "--problems", str(problems), "--out", str(tmp_path / "o"), *extra(tmp_path, problems)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
