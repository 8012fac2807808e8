"""Datasets and checkpoints at local paths, `file://` and `s3://bucket/prefix` URIs.

The contract (DESIGN.md §3; issue 5 item 4; issue 8 item 2):

- **Marker last.** `publish_*` uploads every data file (its sha256 stored as object metadata), checks that
  every object is there with its size (re-uploading what is missing: a restarted endpoint may have lost
  it), and only then writes the marker: `manifest.json` for a dataset, `COMPLETE` for a checkpoint
  (`{"schema": "tgrl.checkpoint/1", "files": {relpath: sha256}}`). Republishing deletes the old marker
  first. A prefix without its marker is incomplete and `fetch_*`/`localize` refuse it.
- **Checksums.** `fetch_*` verifies every file against the sha256 in the marker; a mismatching file is
  downloaded once more, then the fetch fails naming the key.
- **Safe paths.** Every key under a fetched prefix must stay inside the target directory; one hostile key
  (`..`, absolute, backslash) refuses the whole prefix. Symlinks are never published.
- **Atomic local writes.** Files land as `name.part-*` and are renamed; a fetch fills a sibling temporary
  directory, writes the marker last and then swaps it into place.
- **Transport** (client, retries with backoff, multipart, environment): `tgrl_lib.store.s3`.

`localize(uri)` is what steps call on an input: a local path as is, an `s3://` prefix fetched into the
cache (`TGRL_CACHE_DIR`, default `~/.cache/tgrl`), reused while its marker is unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from tgrl_lib.data.schema import MANIFEST, Manifest, resolve_inside, sha256_file
from tgrl_lib.env import read_env
from tgrl_lib.errors import TgrlError
from tgrl_lib.store.s3 import (
    S3Prefix,
    StorageOptions,
    is_remote,  # noqa: F401  (re-exported: callers ask storage whether a URI is remote)
    parallel,
    parse_uri,
    part_path,
    safe_relpath,
)

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = "COMPLETE"
CHECKPOINT_SCHEMA = "tgrl.checkpoint/1"


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(target)
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _atomic_copy(src: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(target)
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)


def local_files(root: Path, *, exclude: tuple[str, ...] = ()) -> dict[str, Path]:
    """Every regular file under `root` by relative POSIX path; symlinks are refused, `.part-*` skipped."""
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise TgrlError("symlinks are not allowed in a published directory", path=path)
        if path.is_file() and rel not in exclude and ".part-" not in path.name and not rel.endswith(".tmp"):
            files[rel] = path
    return files


# ----------------------------------------------------------------------------- publish / fetch
OnFile = Callable[[str], None]


def _then(_: None, step: Callable[[], None]) -> None:
    step()


def _publish(
    local: Path,
    uri: str,
    files: dict[str, str],
    marker: str | None,
    marker_bytes: bytes,
    opts: StorageOptions | None,
    on_file: OnFile | None,
) -> None:
    """Upload `files` (relpath -> sha256) from `local`, verify them, then write `marker` last."""
    loc, opts = parse_uri(uri), opts or StorageOptions.from_env()
    sources = {rel: resolve_inside(local, safe_relpath(rel, rel)) for rel in files}
    for rel, src in sources.items():
        if not src.is_file():
            raise TgrlError(f"{rel} is listed but missing", path=local, hint="rewrite the directory")
    if not loc.remote:
        _publish_local(sources, files, loc.path, marker, marker_bytes, on_file)  # type: ignore[arg-type]
        return
    remote = S3Prefix(loc, opts)
    if marker:
        remote.delete(marker)  # the prefix is incomplete from here until the new marker lands

    from tgrl_lib.progress import progress_bar

    with progress_bar(f"upload {uri}", len(files)) as advance:

        def send(rel: str) -> None:
            remote.upload(sources[rel], rel, files[rel])
            advance()
            if on_file is not None:
                on_file(rel)

        pending = sorted(files)
        for round_ in range(3):  # a restarted endpoint may have lost objects: re-upload what is missing
            parallel(send, pending, opts.file_concurrency)
            present = remote.listing()
            pending = [rel for rel in sorted(files) if present.get(rel) != sources[rel].stat().st_size]
            if not pending:
                break
            if round_ == 2:
                raise TgrlError(f"objects still missing under {uri} after 3 uploads: {pending[:5]}")
            log.warning("%d object(s) missing under %s after upload; re-uploading", len(pending), uri)
    if marker:
        remote.put_bytes(marker, marker_bytes)


def _publish_local(
    sources: dict[str, Path],
    files: dict[str, str],
    dest: Path,
    marker: str | None,
    marker_bytes: bytes,
    on_file: OnFile | None,
) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if marker:
        (dest / marker).unlink(missing_ok=True)
    for rel, src in sources.items():
        target = resolve_inside(dest, rel)
        if target != src.resolve():
            _atomic_copy(src, target)
        if sha256_file(target) != files[rel]:
            raise TgrlError(f"{rel} changed while it was copied (sha256 differs)", path=target)
        if on_file is not None:
            on_file(rel)
    if marker:
        _atomic_write_bytes(dest / marker, marker_bytes)


def publish_dataset(
    local_dataset_dir: str | Path,
    uri: str,
    *,
    options: StorageOptions | None = None,
    on_file: OnFile | None = None,
) -> Manifest:
    """Upload a dataset directory; `manifest.json` goes last. Local files must match their manifest sha256."""
    local = Path(local_dataset_dir)
    from tgrl_lib.data.schema import read_manifest

    manifest = read_manifest(local)
    for rel, expected in manifest.files.items():
        path = resolve_inside(local, safe_relpath(rel, rel))
        if path.is_file() and sha256_file(path) != expected:
            raise TgrlError(
                f"{rel} does not match its sha256 in the manifest", path=path, hint="rewrite the dataset"
            )
    _publish(local, uri, manifest.files, MANIFEST, (local / MANIFEST).read_bytes(), options, on_file)
    return manifest


def checkpoint_marker(local_dir: str | Path) -> bytes:
    """The `COMPLETE` marker for a checkpoint directory: sha256 of every file in it."""
    files = {
        rel: sha256_file(p) for rel, p in local_files(Path(local_dir), exclude=(CHECKPOINT_MARKER,)).items()
    }
    return (
        json.dumps({"schema": CHECKPOINT_SCHEMA, "files": files}, indent=2, sort_keys=True) + "\n"
    ).encode()


def publish_checkpoint(
    local_dir: str | Path, uri: str, *, options: StorageOptions | None = None, on_file: OnFile | None = None
) -> dict[str, str]:
    """Upload a checkpoint directory with a `COMPLETE` marker (file sha256s) written last."""
    local = Path(local_dir)
    if not local.is_dir():
        raise TgrlError("checkpoint directory does not exist", path=local)
    marker = checkpoint_marker(local)
    files = _marker_files(marker, CHECKPOINT_MARKER, str(local))
    _publish(local, uri, files, CHECKPOINT_MARKER, marker, options, on_file)
    return files


def _marker_files(data: bytes, marker: str, where: str) -> dict[str, str]:
    """`{relpath: sha256}` from a dataset manifest or a checkpoint marker; malformed markers refused."""
    try:
        if marker == MANIFEST:
            files = Manifest.model_validate_json(data).files
        else:
            body = json.loads(data)
            if not isinstance(body, dict) or body.get("schema") != CHECKPOINT_SCHEMA:
                raise ValueError(f"not a {CHECKPOINT_SCHEMA} marker")
            files = body["files"]
        if not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items()):
            raise ValueError("files must map relative paths to sha256 hex digests")
    except (ValidationError, ValueError, KeyError, TypeError) as err:
        raise TgrlError(f"invalid {marker} ({str(err).splitlines()[0]})", path=f"{where}/{marker}") from None
    for rel in files:
        safe_relpath(rel, f"{where}/{rel}")
    return files


def verify_files(root: Path, files: dict[str, str]) -> None:
    """Every listed file exists under `root` with its sha256 (e.g. after a registry download)."""
    for rel, expected in files.items():
        path = resolve_inside(root, safe_relpath(rel, rel))
        if not path.is_file():
            raise TgrlError(f"{rel} is missing", path=root)
        if sha256_file(path) != expected:
            raise TgrlError(f"{rel}: sha256 does not match the marker (corrupted or modified)", path=path)


def verify_checkpoint(root: str | Path) -> dict[str, str]:
    """Check a local checkpoint directory against its `COMPLETE` marker; returns the file map."""
    root = Path(root)
    marker = root / CHECKPOINT_MARKER
    if not marker.is_file():
        raise TgrlError(f"no {CHECKPOINT_MARKER} marker: the checkpoint is incomplete", path=root)
    files = _marker_files(marker.read_bytes(), CHECKPOINT_MARKER, str(root))
    verify_files(root, files)
    return files


def _fetch(uri: str, local: Path, marker: str, opts: StorageOptions | None) -> Path:
    """Download the files a marker lists, verify each sha256, write the marker last, swap into `local`."""
    loc, opts = parse_uri(uri), opts or StorageOptions.from_env()
    if not loc.remote:
        return _fetch_local(loc.path, local, marker)  # type: ignore[arg-type]
    remote = S3Prefix(loc, opts)
    data = remote.get_bytes(marker)
    if data is None:
        raise TgrlError(
            f"{uri} has no {marker}: it is incomplete or not a published tgrl directory",
            hint="publish it again; a prefix without its marker is never read",
        )
    files = _marker_files(data, marker, uri)
    present = remote.listing()  # also refuses any hostile key under the prefix
    absent = sorted(set(files) - set(present))
    if absent:
        raise TgrlError(f"{uri}: {marker} lists {len(absent)} missing object(s), e.g. {absent[0]!r}")
    staging = _staging_dir(local)
    try:

        def get(rel: str) -> None:
            target = resolve_inside(staging, rel)
            for attempt in (1, 2):
                remote.download(rel, target)
                if sha256_file(target) == files[rel]:
                    return
                log.warning("checksum mismatch for %s (download %d); retrying", remote.url(rel), attempt)
            raise TgrlError(
                f"{remote.url(rel)}: sha256 does not match {marker} after 2 downloads (corrupted object)",
                hint="republish the source directory",
            )

        from tgrl_lib.progress import progress_bar

        with progress_bar(f"download {uri}", len(files)) as advance:
            parallel(lambda rel: _then(get(rel), advance), sorted(files), opts.file_concurrency)
        _atomic_write_bytes(staging / marker, data)
        _swap_into(staging, local)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def _fetch_local(src: Path, local: Path, marker: str) -> Path:
    if not (src / marker).is_file():
        raise TgrlError(f"no {marker}: incomplete directory", path=src)
    data = (src / marker).read_bytes()
    files = _marker_files(data, marker, str(src))
    if src.resolve() == local.resolve():
        verify_files(src, files)
        return local
    staging = _staging_dir(local)
    try:
        for rel in files:
            _atomic_copy(resolve_inside(src, rel), resolve_inside(staging, rel))
        verify_files(staging, files)
        _atomic_write_bytes(staging / marker, data)
        _swap_into(staging, local)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def _staging_dir(local: Path) -> Path:
    if local.exists() and not local.is_dir():
        raise TgrlError("target exists and is not a directory", path=local)
    if (
        local.is_dir()
        and any(local.iterdir())
        and not any((local / m).exists() for m in (MANIFEST, CHECKPOINT_MARKER))
    ):
        raise TgrlError("target directory is not empty and holds no earlier download", path=local)
    local.parent.mkdir(parents=True, exist_ok=True)
    staging = local.parent / f".{local.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def _swap_into(staging: Path, local: Path) -> None:
    old = None
    if local.exists():
        old = local.parent / f".{local.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(local, old)
    os.replace(staging, local)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fetch_dataset(uri: str, local: str | Path, *, options: StorageOptions | None = None) -> Path:
    """Download a published dataset into `local`; refuses a prefix without `manifest.json`."""
    return _fetch(uri, Path(local), MANIFEST, options)


# ------------------------------------------------------------------------------ plain copies
def upload_dir(local: str | Path, uri: str, *, options: StorageOptions | None = None) -> dict[str, str]:
    """Copy every file of `local` to `uri` as is (each with its sha256 as metadata). A dataset directory
    goes through `publish_dataset` and a checkpoint (with `COMPLETE`) through `publish_checkpoint`, so
    their marker is written last. Returns `{relpath: sha256}`."""
    local = Path(local)
    if not local.is_dir():
        raise TgrlError("directory to upload does not exist", path=local)
    if (local / MANIFEST).is_file():
        return publish_dataset(local, uri, options=options).files
    if (local / CHECKPOINT_MARKER).is_file():
        return publish_checkpoint(local, uri, options=options)
    files = {rel: sha256_file(p) for rel, p in local_files(local).items()}
    _publish(local, uri, files, None, b"", options, None)
    return files


def download_dir(uri: str, local: str | Path, *, options: StorageOptions | None = None) -> Path:
    """Copy every object under `uri` into `local` (keys that would escape it are refused); files whose
    object metadata carries a sha256 are verified."""
    loc, opts, local = parse_uri(uri), options or StorageOptions.from_env(), Path(local)
    if not loc.remote:
        src = loc.path
        for rel, path in local_files(src).items():  # type: ignore[arg-type]
            _atomic_copy(path, resolve_inside(local, rel))
        return local
    remote = S3Prefix(loc, opts)
    local.mkdir(parents=True, exist_ok=True)

    def get(rel: str) -> None:
        target = resolve_inside(local, rel)
        remote.download(rel, target)
        head = remote._retry(
            lambda: remote.client.head_object(Bucket=loc.bucket, Key=loc.key(rel)), "inspect", rel
        )
        expected = head.get("Metadata", {}).get("sha256")
        if expected and sha256_file(target) != expected:
            target.unlink()
            raise TgrlError(f"{remote.url(rel)}: sha256 does not match its metadata (corrupted object)")

    parallel(get, sorted(remote.listing()), opts.file_concurrency)
    return local


def localize(
    uri: str | Path, cache_dir: str | Path | None = None, *, options: StorageOptions | None = None
) -> Path:
    """A local directory for a dataset or checkpoint: a local path as is, an `s3://` prefix fetched into
    the cache (`TGRL_CACHE_DIR`, default `~/.cache/tgrl`) unless the cached copy has the same marker."""
    loc = parse_uri(uri)
    if not loc.remote:
        return loc.path  # type: ignore[return-value]
    root = Path(cache_dir or read_env("TGRL_CACHE_DIR") or Path.home() / ".cache" / "tgrl")
    target = resolve_inside(root, safe_relpath(f"s3/{loc.bucket}/{loc.prefix or '_root'}", loc.uri))
    remote = S3Prefix(loc, options or StorageOptions.from_env())
    for marker in (MANIFEST, CHECKPOINT_MARKER):
        data = remote.get_bytes(marker)
        if data is None:
            continue
        cached = target / marker
        if cached.is_file() and cached.read_bytes() == data:
            return target
        return _fetch(loc.uri, target, marker, options)
    raise TgrlError(
        f"{loc.uri} has neither {MANIFEST} (dataset) nor {CHECKPOINT_MARKER} (checkpoint)",
        hint="it is incomplete or not a tgrl artifact; publish it again",
    )
