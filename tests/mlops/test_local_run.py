"""The local pipeline's console and results (`mlops/local_run.py`): one line per step on the console while
everything else goes to the step log, a results directory per run with `latest` pointing at the newest."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tgrl_lib.errors import TgrlError
from tgrl_lib.mlops.local_run import collect_results, output_into, progress_line

KFP_START = "19:37:04.220 - INFO - Executing task \x1b[96m'prepare-data'\x1b[0m"
KFP_END = (
    "19:37:14.391 - INFO - Task \x1b[96m'prepare-data'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m"
)


def test_progress_lines_are_steps_and_trainer_lines_only():
    started: dict[str, float] = {}
    assert progress_line(KFP_START, started, now=100.0) == "  prepare-data ..."
    assert progress_line(KFP_END, started, now=110.4) == "  prepare-data success (10 s)"
    assert (
        progress_line("    train step 3/30  reward/mean 0.100", started, 0)
        == "    train step 3/30  reward/mean 0.100"
    )
    for noise in ['            "outputFile": "/tmp/x"', "UserWarning: Task 'train': settings [...]", ""]:
        assert progress_line(noise, started, 0) is None


def test_output_goes_to_the_log_and_the_console_sees_progress(tmp_path):
    shown: list[str] = []
    log = tmp_path / "logs" / "run.log"
    with output_into(log, shown.append):
        print("executor json blob", flush=True)
        print(KFP_START, flush=True)  # kfp.local logs from this process ...
        subprocess.run([sys.executable, "-c", f"print({KFP_END!r}); import sys; sys.stderr.write('warn\\n')"])
    text = log.read_text()  # ... its steps from subprocesses: both land in the log
    assert "executor json blob" in text and "warn" in text and "finished with status" in text
    assert shown == ["  prepare-data ...", shown[1]] and shown[1].startswith("  prepare-data success (")
    print("after")  # the process's stdout is back


def test_a_failure_shows_the_end_of_the_log(tmp_path):
    shown: list[str] = []
    with pytest.raises(RuntimeError), output_into(tmp_path / "run.log", shown.append):
        print("the step's traceback line", flush=True)
        raise RuntimeError("step failed")
    assert "last lines of the step log" in shown[-1] and "the step's traceback line" in shown[-1]


def _outputs(root):
    for name in ("eval", "ckpt"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "eval" / "results.json").write_text(
        json.dumps(
            {"benchmarks": {"synthetic": {"overall": {"accuracy": 0.5, "grounding": 0.25, "count": 8}}}}
        )
    )
    (root / "eval" / "blind_prior.json").write_text(json.dumps({"accuracy": 0.3125, "groups": {}}))
    (root / "ckpt" / "model.safetensors").write_bytes(b"x")
    (root / "report.html").write_text("<!doctype html>")
    art = lambda path, **meta: SimpleNamespace(path=str(path), metadata=meta)  # noqa: E731
    reg = {"version": 1.0, "model_uri": "models:/m/1", "accuracy": 0.5, "start_accuracy": 0.25}
    return {"eval_results": art(root / "eval"), "report": art(root / "report.html"),
            "checkpoint": art(root / "ckpt"), "registered": art(root, **reg),
            "promoted": True}  # fmt: skip


def test_each_run_keeps_its_results_and_latest_follows(tmp_path):
    outputs = _outputs(tmp_path / "kfp")
    first = collect_results(outputs, tmp_path / "results" / "run-1", "sqlite:///x.db", started=0.0)
    second = collect_results(outputs, tmp_path / "results" / "run-2", "sqlite:///x.db", started=0.0)
    assert first.results_dir.is_dir() and second.results_dir.is_dir()  # the first was not overwritten
    latest = tmp_path / "results" / "latest"
    assert latest.is_symlink() and latest.resolve() == second.results_dir.resolve()
    assert json.loads((latest / "registered.json").read_text())["version"] == 1
    summary = second.summary()
    assert "synthetic     accuracy 0.500, grounding 0.250 (8 held-out problems)" in summary
    assert "blind prior   accuracy 0.312" in summary and "start model   accuracy 0.250 -> 0.500" in summary
    with pytest.raises(TgrlError, match="exists already"):
        collect_results(outputs, tmp_path / "results" / "run-2", "sqlite:///x.db", started=0.0)


def test_a_bad_filter_parameter_fails_before_any_step(tmp_path):
    from tgrl_lib.mlops.local_run import local_recipe

    good = local_recipe(None, tmp_path, ["filter.filters=[{name: duplicates, params: {threshold: 0.8}}]"])
    assert good.filter.filters[0].params == {"threshold": 0.8}  # control
    with pytest.raises(TgrlError, match="filter 'duplicates' parameter 'threshold'"):
        local_recipe(None, tmp_path, ["filter.filters=[{name: duplicates, params: {threshold: .nan}}]"])
