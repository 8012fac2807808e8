"""Storage against a real S3 endpoint (moto server): round trips, marker-last, checksums, hostile keys,
and endpoint faults (stopped and restarted mid-upload; hung for good)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
from servers import free_port

from tgrl_lib.data.schema import MANIFEST, DatasetWriter, Problem, load_dataset
from tgrl_lib.errors import TgrlError
from tgrl_lib.store import artifacts as storage
from tgrl_lib.store.s3 import StorageOptions, s3_client

MIB = 1024 * 1024
# A 1x1 PNG: readers check an image's header, so a test image is this followed by random bytes of any size
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108020000009077"
    "53de0000000c4944415478da63f8cfc0000003010100c9fe92ef0000000049454e44ae426082"
)


def make_dataset(root: Path, n: int = 4, big: int = 0, image_bytes: int = 2048) -> Path:
    """A valid problems dataset; with `big`, one image of that many bytes (to force multipart)."""
    with DatasetWriter(root, "problems", created_by="test") as writer:
        problems = []
        for i in range(n):
            size = big if (big and i == 0) else image_bytes
            writer.add_image(f"images/{i}.png", PNG_1X1 + os.urandom(size))
            problems.append(
                Problem(
                    id=f"p{i}",
                    image=f"images/{i}.png",
                    question="how many?",
                    answer=str(i),
                    answer_type="integer",
                )
            )
        writer.write(problems)
    return root


def keys(bucket: str, prefix: str) -> set[str]:
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {obj["Key"][len(prefix) + 1 :] for page in pages for obj in page.get("Contents", [])}


def test_dataset_round_trip_with_multipart(s3_env, tmp_path):
    src = make_dataset(tmp_path / "src", big=6 * MIB)
    uri = f"s3://{s3_env['bucket']}/roundtrip/ds"
    opts = StorageOptions(multipart_threshold=1 * MIB, multipart_chunksize=5 * MIB)
    manifest = storage.publish_dataset(src, uri, options=opts)

    head = s3_client().head_object(Bucket=s3_env["bucket"], Key="roundtrip/ds/images/0.png")
    assert head["ETag"].strip('"').endswith("-2"), "6 MiB with 5 MiB parts must be a 2-part multipart upload"
    assert head["Metadata"]["sha256"] == manifest.files["images/0.png"]
    assert keys(s3_env["bucket"], "roundtrip/ds") == {*manifest.files, MANIFEST}

    out = storage.fetch_dataset(uri, tmp_path / "out", options=opts)
    for rel in [*manifest.files, MANIFEST]:
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    data = load_dataset(out, "problems")
    assert [p.id for p in data.records] == ["p0", "p1", "p2", "p3"] and not data.errors
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name], "staging directory left behind"


def test_manifest_goes_last_and_republish_hides_the_old_one(s3_env, tmp_path):
    src = make_dataset(tmp_path / "src", n=5)
    bucket, prefix = s3_env["bucket"], "order/ds"
    seen: list[tuple[str, bool]] = []

    def on_file(rel: str) -> None:
        seen.append((rel, MANIFEST in keys(bucket, prefix)))

    storage.publish_dataset(src, f"s3://{bucket}/{prefix}", on_file=on_file)
    assert len(seen) == 6 and not any(present for _, present in seen)
    assert MANIFEST in keys(bucket, prefix)

    seen.clear()  # publishing again: the old manifest is gone before the first new file lands
    storage.publish_dataset(src, f"s3://{bucket}/{prefix}", on_file=on_file)
    assert seen and not any(present for _, present in seen)


def test_prefix_without_manifest_is_refused(s3_env, tmp_path):
    src = make_dataset(tmp_path / "src")
    bucket = s3_env["bucket"]
    storage.publish_dataset(src, f"s3://{bucket}/nomanifest/ds")
    s3_client().delete_object(Bucket=bucket, Key="nomanifest/ds/manifest.json")
    with pytest.raises(TgrlError, match=r"has no manifest\.json"):
        storage.fetch_dataset(f"s3://{bucket}/nomanifest/ds", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TgrlError, match=r"neither manifest\.json"):
        storage.localize(f"s3://{bucket}/nomanifest/ds", tmp_path / "cache")


def test_corrupted_object_is_detected_on_download(s3_env, tmp_path):
    src = make_dataset(tmp_path / "src")
    bucket = s3_env["bucket"]
    storage.publish_dataset(src, f"s3://{bucket}/corrupt/ds")
    s3_client().put_object(
        Bucket=bucket, Key="corrupt/ds/images/2.png", Body=b"not the bytes that were published"
    )
    with pytest.raises(TgrlError, match=r"corrupt/ds/images/2\.png: sha256 does not match manifest\.json"):
        storage.fetch_dataset(f"s3://{bucket}/corrupt/ds", tmp_path / "out")
    assert not (tmp_path / "out").exists(), "a failed fetch must leave nothing readable"


@pytest.mark.parametrize("bad", ["../../evil", "/etc/evil", "images\\..\\..\\evil", "a/../../evil"])
def test_keys_escaping_the_target_are_refused(s3_env, tmp_path, bad):
    src = make_dataset(tmp_path / "src")
    bucket, prefix = s3_env["bucket"], f"hostile/{abs(hash(bad))}"
    storage.publish_dataset(src, f"s3://{bucket}/{prefix}")
    s3_client().put_object(Bucket=bucket, Key=f"{prefix}/{bad}", Body=b"pwned")
    target = tmp_path / "deep" / "out"
    with pytest.raises(TgrlError, match="refusing key") as err:
        storage.fetch_dataset(f"s3://{bucket}/{prefix}", target)
    assert bad in str(err.value) or bad.replace("\\", "\\\\") in str(err.value)
    assert not (tmp_path / "evil").exists() and not target.exists()
    with pytest.raises(TgrlError, match="refusing key"):
        storage.download_dir(f"s3://{bucket}/{prefix}", tmp_path / "plain")


def test_manifest_listing_an_escaping_path_is_refused(s3_env, tmp_path):
    bucket = s3_env["bucket"]
    hostile = b'{"kind": "problems", "count": 0, "files": {"../outside.txt": "' + b"0" * 64 + b'"}}'
    s3_client().put_object(Bucket=bucket, Key="hostile-manifest/ds/manifest.json", Body=hostile)
    with pytest.raises(TgrlError, match=r"refusing key .*\.\./outside\.txt"):
        storage.fetch_dataset(f"s3://{bucket}/hostile-manifest/ds", tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists()


def test_checkpoint_round_trip_and_cache(s3_env, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(os.urandom(4096))
    (ckpt / "config.json").write_text('{"hidden": 128}')
    (ckpt / "sub" / "tokenizer.json").write_text("{}")
    uri = f"s3://{s3_env['bucket']}/ckpt/step-10"
    files = storage.publish_checkpoint(ckpt, uri)
    assert set(files) == {"model.safetensors", "config.json", "sub/tokenizer.json"}

    cached = storage.localize(uri, tmp_path / "cache")
    assert storage.verify_checkpoint(cached) == files
    assert (cached / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    stamp = (cached / "config.json").stat().st_mtime_ns
    assert storage.localize(uri, tmp_path / "cache") == cached  # unchanged marker: no new download
    assert (cached / "config.json").stat().st_mtime_ns == stamp

    (ckpt / "config.json").write_text('{"hidden": 256}')  # republish: the cache follows the new marker
    storage.publish_checkpoint(ckpt, uri)
    assert (storage.localize(uri, tmp_path / "cache") / "config.json").read_text() == '{"hidden": 256}'

    (cached / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(TgrlError, match="sha256 does not match"):
        storage.verify_checkpoint(cached)


def test_local_uris_and_symlinks(tmp_path):
    src = make_dataset(tmp_path / "src")
    dest = tmp_path / "published"
    storage.publish_dataset(src, dest.as_uri())
    assert load_dataset(dest, "problems").records
    assert storage.localize(str(src)) == src and storage.localize(dest.as_uri()) == dest
    copy = storage.fetch_dataset(dest.as_uri(), tmp_path / "copy")
    assert (copy / MANIFEST).read_bytes() == (src / MANIFEST).read_bytes()

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "weights.safetensors").write_bytes(b"w")
    (ckpt / "link").symlink_to("/etc/hostname")
    with pytest.raises(TgrlError, match="symlinks are not allowed"):
        storage.publish_checkpoint(ckpt, (tmp_path / "ckpt-out").as_uri())
    with pytest.raises(TgrlError, match="not empty"):
        storage.fetch_dataset(dest.as_uri(), ckpt)


def test_endpoint_down_fails_fast_and_clearly(monkeypatch, tmp_path):
    src = make_dataset(tmp_path / "src", n=1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    opts = StorageOptions(max_attempts=2, retries=1, backoff_s=0.1)
    start = time.monotonic()
    with pytest.raises(TgrlError, match=r"failed after 2 attempts.*AWS_ENDPOINT_URL"):
        storage.publish_dataset(src, "s3://tgrl-test/down/ds", options=opts)
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------------------------- endpoint faults
@pytest.mark.slow
def test_upload_survives_endpoint_stopped_and_restarted(fault_s3, tmp_path, caplog):
    """The endpoint dies after the 3rd file (moto loses everything it held) and is back 1.5 s later:
    transfers retry with backoff, lost objects are re-uploaded, the manifest lands last, all verifies."""
    src = make_dataset(tmp_path / "src", n=12, big=6 * MIB, image_bytes=64 * 1024)
    opts = StorageOptions(
        multipart_threshold=1 * MIB, multipart_chunksize=5 * MIB, file_concurrency=2, max_attempts=2,
        retries=8, backoff_s=0.3, backoff_max_s=2.0, connect_timeout_s=1.0, read_timeout_s=5.0,
    )  # fmt: skip
    restarter: list[threading.Timer] = []
    done: list[str] = []

    def on_file(rel: str) -> None:
        done.append(rel)
        if len(done) == 3:
            fault_s3.stop()
            restarter.append(threading.Timer(1.5, fault_s3.start))
            restarter[0].start()

    caplog.set_level(logging.WARNING, logger="tgrl_lib.store.artifacts")
    uri = "s3://tgrl-test/fault/restart"
    try:
        manifest = storage.publish_dataset(src, uri, options=opts, on_file=on_file)
    finally:
        for timer in restarter:
            timer.join()
    assert restarter, "the fault was never injected"
    messages = [r.getMessage() for r in caplog.records]
    assert any("retry 1/" in m for m in messages), "transfers during the outage must have been retried"
    assert any("re-uploading" in m for m in messages), "objects the restarted endpoint lost must be re-sent"
    out = storage.fetch_dataset(uri, tmp_path / "out", options=opts)
    assert load_dataset(out, "problems").manifest == manifest


@pytest.mark.slow
def test_permanent_outage_fails_clearly_and_leaves_nothing_readable(fault_s3, tmp_path):
    """The endpoint hangs for good after the 2nd file: the publish fails within a bounded time with a
    clear error, and the prefix (inspected once the endpoint answers again) has no manifest."""
    src = make_dataset(tmp_path / "src", n=8)
    opts = StorageOptions(
        file_concurrency=2,
        max_attempts=2,
        retries=2,
        backoff_s=0.2,
        connect_timeout_s=1.0,
        read_timeout_s=1.0,
    )
    done: list[str] = []

    def on_file(rel: str) -> None:
        done.append(rel)
        if len(done) == 2:
            fault_s3.pause()

    uri = "s3://tgrl-test/fault/permanent"
    start = time.monotonic()
    with pytest.raises(
        TgrlError, match=r"upload to s3://tgrl-test/fault/permanent/.* failed after 3 attempts"
    ):
        storage.publish_dataset(src, uri, options=opts, on_file=on_file)
    assert time.monotonic() - start < 30
    fault_s3.resume()
    present = keys("tgrl-test", "fault/permanent")
    assert present and MANIFEST not in present
    with pytest.raises(TgrlError, match=r"has no manifest\.json"):
        storage.fetch_dataset(uri, tmp_path / "out", options=opts)
