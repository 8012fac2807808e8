"""Config loading: YAML recipes, --set overrides, unknown keys, invalid YAML, redaction."""

import pytest

from tgrl_lib.config import PipelineConfig, TrainConfig, flatten
from tgrl_lib.env import redact, scrub
from tgrl_lib.errors import TgrlError
from tgrl_lib.recipe import load_config, parse_overrides


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["train.lr=3e-4", "train.loss.clip=false", "name=x"]) == {
        "train": {"lr": 3e-4, "loss": {"clip": False}},
        "name": "x",
    }
    config = load_config(None, overrides=["train.group_size=4", "train.mixing.n_expert=2"])
    assert config.train.group_size == 4 and config.train.mixing.n_expert == 2


def test_section_loading(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  steps: 7\n  algorithm: grpo\n")
    train = load_config(path, TrainConfig, section="train", overrides=["steps=9"])
    assert train.steps == 9 and train.algorithm == "grpo"


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  stepz: 3\n", "train.stepz: Extra inputs"),
        ("train:\n  lr: -1\n", "train.lr"),
        ("train:\n  algorithm: ppo\n", "train.algorithm"),
        ("train: [1, 2\n", "invalid YAML"),
        ("train:\n  lr: 1.0e-4\n  steps: 3\n  lr: 1.0e-3\n", r"key 'lr' given twice \(first on line 2\)"),
        ("train:\n  steps: 3\ntrain:\n  steps: 4\n", "key 'train' given twice"),
        ("- a\n- b\n", "must be a mapping"),
        ("train:\n  mixing:\n    n_expert: 8\n", "n_expert must be smaller"),
        ("train:\n  weighting:\n    normalise: rank\n    w_min: 1.2\n", "rank needs w_min <= 1"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TgrlError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file_and_bad_override():
    with pytest.raises(TgrlError, match="not found"):
        load_config("/nonexistent/recipe.yaml")
    with pytest.raises(TgrlError, match="key=value"):
        parse_overrides(["train.lr"])


def test_redaction_and_scrubbing(monkeypatch):
    data = {
        "aws_secret_access_key": "AKIA-SECRET",
        "nested": {"mlflow_password": "pw"},
        "api_key_env": "OPENAI_API_KEY",
        "lr": 0.1,
    }
    assert redact(data) == {
        "aws_secret_access_key": "***",
        "nested": {"mlflow_password": "***"},
        "api_key_env": "OPENAI_API_KEY",
        "lr": 0.1,
    }
    monkeypatch.setenv("MY_API_TOKEN", "tok-123456789")
    assert scrub("request failed with tok-123456789") == "request failed with ***"


def test_flatten_default_pipeline_config():
    flat = flatten(PipelineConfig().model_dump(mode="json"))
    assert flat["train.loss.shaping_gamma"] == 0.1 and flat["train.group_size"] == 8
    assert all("." in key or key in ("name", "work_dir") for key in flat)


@pytest.mark.parametrize(
    "pair",
    [
        "tracking.tracking_uri=http://bob:hunter22@mlflow:5000",
        "generate.backend.openai.base_url=https://key:sk-abcdef@api.example.com/v1",
        "tracking.artifact_location=s3://AKIAXX:secretkey@bucket/mlflow",
    ],
)
def test_urls_with_passwords_are_refused(pair):
    """A recipe is printed in KFP step logs: a password inside a URL is refused, and not echoed."""
    with pytest.raises(TgrlError, match="holds a URL with a password") as info:
        load_config(None, overrides=[pair])
    secret = pair.split(":")[2].split("@")[0]
    assert secret not in str(info.value)


def test_urls_without_passwords_load():
    cfg = load_config(
        None,
        overrides=[
            "generate.backend.openai.base_url=http://user@host:8000/v1",
            "tracking.tracking_uri=http://mlflow:5000",
        ],
    )
    assert cfg.generate.backend.openai.base_url == "http://user@host:8000/v1"


def test_train_temperature_must_be_positive():
    with pytest.raises(TgrlError, match=r"train\.sampling\.temperature"):
        load_config(
            None, overrides=["train.sampling.temperature=0"]
        )  # greedy rollouts: every group one answer
    assert load_config(None, overrides=["train.sampling.temperature=0.7"]).train.sampling.temperature == 0.7


def test_mixed_precision_no_survives_yaml():
    """YAML 1.1 reads `no` as false: `--set train.mixed_precision=no` still means no mixed precision."""
    assert load_config(None, overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, overrides=["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(TgrlError, match="mixed_precision"):
        load_config(None, overrides=["train.mixed_precision=true"])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("train:\n  steps: " + "9" * 5000 + "\n", "5000 digits"),
        ("train: " + "[" * 20000 + "]" * 20000 + "\n", "nested too deeply"),
    ],
    ids=["5000-digit integer", "20k-deep YAML"],
)
def test_pathological_yaml_is_a_one_line_error_naming_the_file(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TgrlError, match=words) as info:
        load_config(path)
    assert str(path) in str(info.value)
    path.write_text("train:\n  steps: " + "9" * 4 + "\n")  # control: the same key, a sane value
    assert load_config(path).train.steps == 9999


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.steps=" + "9" * 5000, "cannot be read"),
        ("train.steps=" + "[" * 3000 + "]" * 3000, "cannot be read"),
        ("train.steps=true", "valid integer"),  # was 1 step
        ("train.lr=1e30", "less than or equal to 1"),
        ("train.sampling.temperature=1e-300", "at least 0.01"),  # was a torch traceback mid-run
        ("train.sampling.max_new_tokens=100000000", "less than or equal to 32768"),
        (
            "train.mixing.n_expert=8",
            "n_expert must be smaller than train.group_size",
        ),  # tgrl train skipped it
    ],
)
def test_out_of_range_training_values_are_refused_before_anything_runs(override, words):
    with pytest.raises(TgrlError, match=words):
        load_config(None, TrainConfig, [override], section="train")
    sane = load_config(None, TrainConfig, ["steps=3", "lr=0.001", "mixing.n_expert=7"], section="train")
    assert (sane.steps, sane.lr, sane.mixing.n_expert) == (3, 0.001, 7)  # control
