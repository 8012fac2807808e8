"""Where MLflow is: the tracking URI this process uses, probed before the first call.

Tracking URI: `tracking.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<work_dir>/mlflow.db`
(embedded, no server; artifacts next to it in `mlartifacts/`). Basic auth for a server comes from
`MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`, which MLflow reads itself; we never log them.

A server that is down fails fast: before the first call we GET `<uri>/health` with a 3 s timeout, 3
attempts, waiting 1 s then 2 s (about 12 s at most), then raise a `TgrlError` naming the server. MLflow's
own HTTP retries are bounded unless already set in the environment: `MLFLOW_HTTP_REQUEST_MAX_RETRIES=3`,
`MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`, `MLFLOW_HTTP_REQUEST_TIMEOUT=60` (MLflow's defaults, 7 retries
with factor 2 and 120 s, can hang a step for minutes); large artifacts go through the server with
`MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD=true`.
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tgrl_lib.config import PipelineConfig, TrackingConfig
from tgrl_lib.env import default_tracking_uri, read_env
from tgrl_lib.errors import TgrlError

PROBE_ATTEMPTS = 3


PROBE_TIMEOUT_S = 3.0


PROBE_BACKOFF_S = 1.0  # waits 1 s, then 2 s


HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
}


_CURRENT_URI: list[str] = []  # the URI this process set, so the registry uses the same one


# --------------------------------------------------------------------------------------- the URI
def resolve_tracking_uri(
    cfg: TrackingConfig | PipelineConfig | None = None, work_dir: str | Path | None = None
) -> str:
    """`tracking.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<work_dir>/mlflow.db`."""
    if isinstance(cfg, PipelineConfig):
        work_dir = work_dir or cfg.work_dir
        cfg = cfg.tracking
    if cfg is not None and cfg.tracking_uri:
        return cfg.tracking_uri
    return default_tracking_uri(work_dir or "runs")


def display_uri(uri: str) -> str:
    """`uri` without `user:password@` (for messages)."""
    return re.sub(r"//[^/@]*@", "//", uri)


def probe_tracking_server(
    uri: str,
    attempts: int = PROBE_ATTEMPTS,
    timeout_s: float = PROBE_TIMEOUT_S,
    backoff_s: float = PROBE_BACKOFF_S,
) -> None:
    """Raise a `TgrlError` unless the HTTP tracking server at `uri` answers `/health` (any status < 500:
    a 401 from an auth-enabled server still means it is up). Non-HTTP URIs are not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    url = display_uri(uri).rstrip("/") + "/health"  # /health needs no credentials
    start, reason = time.monotonic(), ""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status < 500:
                    return
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return
            reason = f"HTTP {err.code}"
        except (OSError, ValueError) as err:  # URLError is an OSError; a malformed URL a ValueError
            reason = str(getattr(err, "reason", err))
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    raise TgrlError(
        f"MLflow tracking server {display_uri(uri)} is not reachable ({reason}; {attempts} attempts over "
        f"{time.monotonic() - start:.0f}s)",
        hint="start it, or set tracking.tracking_uri / MLFLOW_TRACKING_URI (unset both: local sqlite store)",
    )


def use_tracking_uri(uri: str) -> str:
    """Probe `uri`, bound MLflow's HTTP retries, and make it this process's tracking (and registry) URI."""
    import mlflow

    for name, value in HTTP_DEFAULTS.items():
        if read_env(name) is None:
            os.environ[name] = value
    probe_tracking_server(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    _CURRENT_URI[:] = [uri]
    return uri


def current_tracking_uri(uri: str | None = None) -> str:
    """`uri` if given (and then used), else the one this process already uses, else the default."""
    if uri:
        return use_tracking_uri(uri)
    if _CURRENT_URI:
        return _CURRENT_URI[0]
    return use_tracking_uri(resolve_tracking_uri())
