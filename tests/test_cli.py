"""The `tgrl` entry point itself: --version, --help without heavy imports, one-line errors."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tgrl_lib.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_version_is_the_packaged_one(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"tgrl {version}"


def test_an_unknown_set_key_names_the_nearest_valid_one(tmp_path, capsys):
    code = main(["train", "--problems", str(tmp_path), "--set", "stpes=5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "stpes" in err and "did you mean steps?" in err and "--set" in err


def test_help_starts_without_torch_or_mlflow():
    probe = "import sys; from tgrl_lib.cli import build_parser; build_parser(); print(sorted(m for m in ('torch', 'mlflow', 'transformers', 'kfp') if m in sys.modules))"  # noqa: E501
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
