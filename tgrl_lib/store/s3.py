"""The S3 transport under `tgrl_lib.store.artifacts`: URIs, the boto3 client, retries, per-object transfers.

- Client: endpoint `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL` or `MLFLOW_S3_ENDPOINT_URL`; region
  `AWS_REGION`/`AWS_DEFAULT_REGION` (default us-east-1); credentials by boto3's own chain
  (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, profiles, instance roles); path-style
  addressing; bounded connect/read timeouts. All variables are read through `env.read_env`.
- Retries, two layers: botocore retries each request (`mode="adaptive"`, `max_attempts`); `with_retries`
  retries a whole-file transfer with exponential backoff (`backoff_s * 2**n`, capped at `backoff_max_s`,
  jittered to 50-100%) on connection errors, timeouts, 5xx, throttling and a multipart upload the server
  lost (`NoSuchUpload`, e.g. after a restart). Access denied, a missing bucket or bad credentials fail at
  once. Either way the failure is a `TgrlError` naming the URI, the attempts and what to check.
- Multipart above `multipart_threshold` through `boto3.s3.transfer.TransferConfig` (parts >= 5 MiB, S3's
  minimum). Tuning from `TGRL_S3_MAX_ATTEMPTS`, `TGRL_S3_RETRIES`, `TGRL_S3_MULTIPART_THRESHOLD_MB`.
- Keys: every key listed under a prefix must be a safe relative path (`schema.check_relative_path`); one
  that is not (`..`, absolute, backslash) is refused with its name.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tgrl_lib.data.schema import check_relative_path
from tgrl_lib.env import read_env
from tgrl_lib.errors import TgrlError

log = logging.getLogger("tgrl_lib.store.artifacts")
T = TypeVar("T")

_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "ServiceUnavailable",
    "NoSuchUpload",  # the server lost an unfinished multipart upload (restart): redo the whole file
}
_MIB = 1024 * 1024


class StorageOptions(BaseModel):
    """Transfer tuning; `from_env()` takes the `TGRL_S3_*` overrides."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="S3 endpoint; None = from the environment.")
    max_attempts: int = Field(5, ge=1, description="botocore attempts per request (adaptive mode).")
    retries: int = Field(4, ge=0, description="Our retries of a whole-file transfer after botocore's.")
    backoff_s: float = Field(0.5, ge=0.0, description="First backoff; doubles per retry.")
    backoff_max_s: float = Field(8.0, ge=0.0, description="Backoff cap.")
    multipart_threshold: int = Field(64 * _MIB, ge=1, description="Bytes above which uploads are multipart.")
    multipart_chunksize: int = Field(16 * _MIB, ge=5 * _MIB, description="Part size (S3 minimum 5 MiB).")
    max_concurrency: int = Field(4, ge=1, description="Threads per multipart transfer.")
    file_concurrency: int = Field(8, ge=1, description="Files transferred at the same time.")
    connect_timeout_s: float = Field(10.0, gt=0, description="Socket connect timeout.")
    read_timeout_s: float = Field(60.0, gt=0, description="Socket read timeout.")

    @classmethod
    def from_env(cls, **overrides: Any) -> StorageOptions:
        values: dict[str, Any] = {}
        for name, field in (("TGRL_S3_MAX_ATTEMPTS", "max_attempts"), ("TGRL_S3_RETRIES", "retries")):
            if (raw := read_env(name)) is not None:
                values[field] = int(raw)
        if (raw := read_env("TGRL_S3_MULTIPART_THRESHOLD_MB")) is not None:
            values["multipart_threshold"] = int(float(raw) * _MIB)
        try:
            return cls(**{**values, **overrides})
        except (ValidationError, ValueError) as err:
            raise TgrlError(
                f"invalid storage settings: {err}", hint="check the TGRL_S3_* variables"
            ) from None


# ------------------------------------------------------------------------------------------ URIs
@dataclass(frozen=True)
class Location:
    """`s3://bucket/prefix` (bucket set) or a local directory (path set)."""

    uri: str
    bucket: str | None = None
    prefix: str = ""
    path: Path | None = None

    @property
    def remote(self) -> bool:
        return self.bucket is not None

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel


def parse_uri(uri: str | Path) -> Location:
    text = str(uri)
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        if not bucket:
            raise TgrlError(f"S3 URI {text!r} has no bucket", hint="use s3://bucket/prefix")
        return Location(text, bucket=bucket, prefix=prefix.strip("/"))
    if text.startswith("file://"):
        return Location(text, path=Path(text[7:]))
    if "://" in text:
        raise TgrlError(f"unsupported URI {text!r}", hint="use a local path, file:// or s3://")
    return Location(text, path=Path(text))


def is_remote(uri: str | Path) -> bool:
    return parse_uri(uri).remote


# ---------------------------------------------------------------------------------------- client
def endpoint_from_env() -> str | None:
    return (
        read_env("AWS_ENDPOINT_URL_S3") or read_env("AWS_ENDPOINT_URL") or read_env("MLFLOW_S3_ENDPOINT_URL")
    )


def s3_client(options: StorageOptions | None = None):
    """A boto3 S3 client: endpoint and region from the environment, adaptive retries, bounded timeouts."""
    import boto3
    from botocore.config import Config

    opts = options or StorageOptions.from_env()
    config = Config(
        retries={"mode": "adaptive", "max_attempts": opts.max_attempts},
        connect_timeout=opts.connect_timeout_s,
        read_timeout=opts.read_timeout_s,
        s3={"addressing_style": "path"},
        max_pool_connections=max(10, opts.file_concurrency * opts.max_concurrency),
    )
    region = read_env("AWS_REGION") or read_env("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client(
        "s3", endpoint_url=opts.endpoint_url or endpoint_from_env(), region_name=region, config=config
    )


def _transfer_config(opts: StorageOptions):
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=opts.multipart_threshold,
        multipart_chunksize=opts.multipart_chunksize,
        max_concurrency=opts.max_concurrency,
        use_threads=True,
    )


def error_code(err: BaseException) -> str:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _causes(err: BaseException):
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "last_exception", None) or current.__cause__ or current.__context__


class MalformedResponse(Exception):
    """A 2xx answer without a field the S3 API requires (seen from an endpoint that was restarting)."""


def _transient(err: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    for cause in _causes(err):
        if isinstance(cause, HTTPClientError | ConnectionError | IncompleteReadError | MalformedResponse):
            return True
        if isinstance(cause, ClientError):
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return error_code(cause) in _TRANSIENT_CODES or int(status or 0) >= 500
    return False


def failure_hint(err: BaseException) -> str:
    codes = {error_code(c) for c in _causes(err)}
    if codes & {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}:
        return "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
    if "NoSuchBucket" in codes:
        return "create the bucket or fix the URI"
    return f"is the S3 endpoint {endpoint_from_env() or 'AWS'} reachable? (AWS_ENDPOINT_URL)"


def with_retries(fn: Callable[[], T], what: str, uri: str, opts: StorageOptions) -> T:
    """`fn()` with our whole-operation retries on transient errors; anything else fails at once."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    attempt = 0
    while True:
        try:
            return fn()
        except (BotoCoreError, ClientError, Boto3Error, MalformedResponse) as err:
            brief = str(err).splitlines()[0][:300]
            if not _transient(err) or attempt >= opts.retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise TgrlError(f"{what} {uri} failed{tries}: {brief}", hint=failure_hint(err)) from err
            delay = min(opts.backoff_max_s, opts.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            log.warning(
                "%s %s failed (%s); retry %d/%d in %.1fs", what, uri, brief, attempt, opts.retries, delay
            )
            time.sleep(delay)


def part_path(target: Path) -> Path:
    return target.with_name(f"{target.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def safe_relpath(rel: str, key: str) -> str:
    """`rel` if it stays inside a target directory, else a `TgrlError` naming the offending key."""
    try:
        check_relative_path(rel)
    except ValueError as err:
        raise TgrlError(
            f"refusing key {key!r}: {err}",
            hint="the source holds a key that would escape the target directory",
        ) from None
    return rel


# ------------------------------------------------------------------------------------ transfers
class S3Prefix:
    """One S3 prefix with a client, options and per-file retried transfers."""

    def __init__(self, loc: Location, opts: StorageOptions):
        self.loc, self.opts = loc, opts
        self.client = s3_client(opts)

    def url(self, rel: str) -> str:
        return f"s3://{self.loc.bucket}/{self.loc.key(rel)}"

    def upload(self, src: Path, rel: str, sha256: str) -> None:
        extra = {"Metadata": {"sha256": sha256}}
        key, config = self.loc.key(rel), _transfer_config(self.opts)

        def send() -> None:
            try:
                self.client.upload_file(str(src), self.loc.bucket, key, ExtraArgs=extra, Config=config)
            except KeyError as err:  # s3transfer reads response fields (UploadId) without checking
                raise MalformedResponse(f"the endpoint's response had no {err}") from err

        self._retry(send, "upload to", rel)

    def download(self, rel: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = part_path(target)
        key, config = self.loc.key(rel), _transfer_config(self.opts)
        try:
            self._retry(
                lambda: self.client.download_file(self.loc.bucket, key, str(tmp), Config=config),
                "download",
                rel,
            )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, rel: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        from botocore.exceptions import ClientError

        def get() -> bytes | None:
            try:
                return self.client.get_object(Bucket=self.loc.bucket, Key=self.loc.key(rel))["Body"].read()
            except ClientError as err:
                if error_code(err) in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise

        return self._retry(get, "read", rel)

    def put_bytes(self, rel: str, data: bytes) -> None:
        key = self.loc.key(rel)
        self._retry(lambda: self.client.put_object(Bucket=self.loc.bucket, Key=key, Body=data), "write", rel)

    def delete(self, rel: str) -> None:
        key = self.loc.key(rel)
        self._retry(lambda: self.client.delete_object(Bucket=self.loc.bucket, Key=key), "delete", rel)

    def listing(self) -> dict[str, int]:
        """`{relative key: size}` of every object under the prefix (hostile keys refused)."""

        def scan() -> dict[str, int]:
            found: dict[str, int] = {}
            base = f"{self.loc.prefix}/" if self.loc.prefix else ""
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.loc.bucket, Prefix=base
            ):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(base) :]
                    if rel.endswith("/") and obj["Size"] == 0:
                        continue  # a "directory" placeholder
                    found[safe_relpath(rel, obj["Key"])] = int(obj["Size"])
            return found

        return self._retry(scan, "list", "")

    def _retry(self, fn: Callable[[], T], what: str, rel: str) -> T:
        return with_retries(fn, what, self.url(rel), self.opts)


def parallel(fn: Callable[[str], None], items: list[str], workers: int) -> None:
    """Run `fn` over `items` on a thread pool. After the first error no new item starts (those in flight
    finish their own retries), and that first error is re-raised."""
    if not items:
        return
    failed = threading.Event()

    def guarded(item: str) -> None:
        if failed.is_set():
            return
        try:
            fn(item)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = [pool.submit(guarded, item) for item in items]
        errors = [f.exception() for f in futures]  # waits for all; skipped items return at once
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
