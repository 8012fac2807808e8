"""Secret hygiene (`tgrl_lib/env.py`): which keys are secrets, URL passwords scrubbed from text, and the
config hash that tells configs apart (secrets included) without carrying them."""

from __future__ import annotations

import pytest

from tgrl_lib.config import PipelineConfig
from tgrl_lib.env import is_secret_key, redact, scrub
from tgrl_lib.mlops.tracking import clean_params, config_hash

SECRET = ["OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "hf_token", "apiKey", "secretKey",
          "MLFLOW_TRACKING_PASSWORD", "password", "auth", "db.passwd", "Authorization"]  # fmt: skip
NOT_SECRET = ["max_new_tokens", "tokenizer", "author", "api_key_env", "tracking_uri", "TGRL_ARTIFACT_ROOT",
              "MLFLOW_TRACKING_USERNAME", "keep_checkpoints", "monkey", "PWD", "OLDPWD"]  # fmt: skip


@pytest.mark.parametrize("key", SECRET)
def test_secret_keys_are_named_by_their_words(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", NOT_SECRET)
def test_ordinary_keys_are_not_secrets(key):  # max_new_tokens was redacted as *** (a "token" substring)
    assert not is_secret_key(key)


def test_redact_hides_secret_values_and_keeps_the_rest():
    data = {"train": {"max_new_tokens": 48, "hf_token": "hf_abcdefgh"}, "api_key_env": "OPENAI_API_KEY"}
    assert redact(data) == {
        "train": {"max_new_tokens": 48, "hf_token": "***"},
        "api_key_env": "OPENAI_API_KEY",
    }


def test_scrub_removes_url_passwords_and_keeps_urls_without_one():
    text = "store postgresql://tgrl:s3cretpw@db:5432/mlflow, server http://mlflow:5000/api, s3://b/k"
    assert (
        scrub(text) == "store postgresql://tgrl:***@db:5432/mlflow, server http://mlflow:5000/api, s3://b/k"
    )
    params = clean_params({"tracking": {"tracking_uri": "postgresql://tgrl:s3cretpw@db/mlflow"}}, "cfg")
    assert params == {"cfg.tracking.tracking_uri": "postgresql://tgrl:***@db/mlflow"}


def test_params_show_max_new_tokens_and_the_hash_tells_budgets_apart():
    small = PipelineConfig.model_validate({"train": {"sampling": {"max_new_tokens": 48}}})
    large = PipelineConfig.model_validate({"train": {"sampling": {"max_new_tokens": 1024}}})
    assert clean_params(small)["train.sampling.max_new_tokens"] == "48"
    assert config_hash(small) != config_hash(large)  # was equal: the hash was taken after redaction
    assert config_hash(small) == config_hash(PipelineConfig.model_validate(small.model_dump()))


def test_the_hash_is_of_the_config_itself_not_its_redacted_copy():
    one = PipelineConfig.model_validate({"generate": {"backend": {"openai": {"api_key_env": "KEY_A"}}}})
    other = PipelineConfig.model_validate({"generate": {"backend": {"openai": {"api_key_env": "KEY_B"}}}})
    assert config_hash(one) != config_hash(other)
    secret = {"db": {"password": "one"}}
    assert config_hash(secret) != config_hash({"db": {"password": "two"}})  # redacted, both were '***'
