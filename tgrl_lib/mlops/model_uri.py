"""Model arguments of the CLI: a directory, an `s3://`/`file://` URI, or a registered version
(`models:/NAME/VERSION`, `models:/NAME@ALIAS`), which is downloaded once into the local cache
(`$TGRL_CACHE_DIR`, default `~/.cache/tgrl`, one directory per version) and verified on reuse."""

from __future__ import annotations

import re
from pathlib import Path

from tgrl_lib.env import read_env

MODELS_SCHEME = "models:/"


def is_registered(model: str) -> bool:
    return model.startswith(MODELS_SCHEME)


def local_model(model: str, *, tracking_uri: str | None = None) -> str:
    """`model` itself unless it is a `models:/` URI; then the local checkpoint directory of the version it
    names (an alias is resolved to its version first, so `@champion` moving later does not change it)."""
    if not is_registered(model):
        return model
    from tgrl_lib.mlops.registry import download_model, resolve_version
    from tgrl_lib.store.artifacts import verify_checkpoint

    name, version = resolve_version(model, tracking_uri=tracking_uri)
    root = Path(read_env("TGRL_CACHE_DIR") or Path.home() / ".cache" / "tgrl")
    dest = root / "models" / re.sub(r"[^\w.\-]", "_", name) / f"v{version}"
    if (dest / "COMPLETE").is_file():
        verify_checkpoint(dest)
        return str(dest)
    return str(download_model(f"{MODELS_SCHEME}{name}/{version}", dest, tracking_uri=tracking_uri))
