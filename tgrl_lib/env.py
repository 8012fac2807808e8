"""The environment: the one place that reads environment variables, and secret hygiene.

`read_env` is how every module reads a variable. Secrets (AWS keys, MLflow password, API keys) are only ever
read here: `is_secret_key` names them by rule, `redact` hides their values in dicts before anything is
logged, `scrub` removes the values of secret variables that are set from text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------ environment, secrets
SECRET_MARKERS = (
    "secret",
    "password",
    "passwd",
    "token",
    "api_key",
    "apikey",
    "access_key",
    "credential",
    "private_key",
    "auth",
)


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(marker in lowered for marker in SECRET_MARKERS) and not lowered.endswith("_env")


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
    for value in secret_values():
        text = text.replace(value, "***")
    return text


def default_tracking_uri(work_dir: str | Path = "runs") -> str:
    return read_env("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(work_dir).resolve() / 'mlflow.db'}"
