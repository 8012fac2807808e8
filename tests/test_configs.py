"""Every shipped recipe in configs/ parses and validates; the GPU recipes ask for what a GPU run needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tgrl_lib.config import PipelineConfig, TrainConfig
from tgrl_lib.errors import TgrlError
from tgrl_lib.recipe import load_config, read_yaml


def load_train_config(path, overrides=None):
    """What `tgrl train --config PATH --set ...` loads."""
    return load_config(path, TrainConfig, overrides, section="train")


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in CONFIGS}
    assert {"tiny-cpu.yaml", "qwen2.5-vl-3b.yaml", "qwen2.5-vl-7b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_validates(path):
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    # every key written in the file is a real field (extra="forbid" would have refused a typo) and the
    # train section round-trips through the CLI's loader
    raw = read_yaml(path)
    if "train" in raw:
        assert load_train_config(path) == config.train


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b.yaml", "qwen2.5-vl-7b.yaml"])
def test_gpu_recipes_use_vllm_bf16_and_realistic_rl_settings(name):
    config = load_config(next(p for p in CONFIGS if p.name == name))
    train = config.train
    assert (train.backend.kind, train.mixed_precision, config.eval.backend.kind) == ("vllm", "bf16", "vllm")
    assert train.lr == pytest.approx(1e-6) and train.group_size == 8 and train.sampling.max_new_tokens == 1024
    assert train.algorithm == "tgrl" and 0 < train.mixing.n_expert < train.group_size


def test_tiny_recipe_runs_on_cpu_without_downloads():
    config = load_config(next(p for p in CONFIGS if p.name == "tiny-cpu.yaml"))
    assert config.train.backend.kind == "hf" and config.train.mixed_precision == "no"
    assert config.generate.backend.kind == "oracle" and "://" not in config.train.model


def test_train_overrides_accept_both_spellings(tmp_path):
    path = next(p for p in CONFIGS if p.name == "tiny-cpu.yaml")
    config = load_train_config(path, ["lr=0.5", "train.loss.clip=false", "mixing.n_expert=2"])
    assert (config.lr, config.loss.clip, config.mixing.n_expert) == (0.5, False, 2)
    flat = tmp_path / "train-only.yaml"
    flat.write_text("algorithm: grpo\nsteps: 3\n")
    assert load_train_config(flat) == TrainConfig(algorithm="grpo", steps=3)
    with pytest.raises(TgrlError, match="stepz"):
        load_train_config(path, ["stepz=3"])
