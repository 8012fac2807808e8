"""The environment: the one place that reads environment variables, and secret hygiene.

`read_env` is how every module reads a variable. Secrets (AWS keys, MLflow password, API keys) are only ever
read here: `is_secret_key` names them by rule, `redact` hides their values in dicts before anything is
logged, `scrub` removes from text the values of secret variables that are set and URL passwords.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

# A key is secret when one of its words (split on _ - . and camelCase) is a secret word, or two adjacent
# words are a secret pair: `AWS_SECRET_ACCESS_KEY`, `hf_token`, `apiKey`, but not `max_new_tokens`,
# `tokenizer`, `author`. A key naming where a secret is (`api_key_env`) is no secret itself.
SECRET_WORDS = frozenset(
    {
        "secret",
        "password",
        "passwd",
        "token",
        "apikey",
        "credential",
        "credentials",
        "auth",
        "authorization",
    }
)
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")})
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_URL_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*):[^/@\s]*@")


def is_secret_key(key: str) -> bool:
    words = [w.lower() for w in _WORD.findall(str(key))]
    if words and words[-1] == "env":
        return False
    return any(w in SECRET_WORDS for w in words) or any(
        pair in SECRET_PAIRS for pair in itertools.pairwise(words)
    )


def redact(data: Any) -> Any:
    """Copy of `data` with values of secret-looking keys replaced by '***' (recursively)."""
    if isinstance(data, dict):
        return {
            k: ("***" if is_secret_key(str(k)) and v not in (None, "") else redact(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def read_env(name: str, default: str | None = None) -> str | None:
    """The one place that reads environment variables (secrets included: never log the value)."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def secret_values() -> list[str]:
    """Values of secret env vars currently set, for scrubbing text before it is logged."""
    return [v for k, v in os.environ.items() if is_secret_key(k) and v and len(v) >= 6]


def scrub(text: str) -> str:
    """`text` without the values of secret env vars that are set, nor the password of a URL in it
    (`postgresql://user:pw@host` -> `postgresql://user:***@host`)."""
    for value in secret_values():
        text = text.replace(value, "***")
    return _URL_CREDENTIALS.sub(r"\g<head>:***@", text)


def default_tracking_uri(work_dir: str | Path = "runs") -> str:
    return read_env("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(work_dir).resolve() / 'mlflow.db'}"
