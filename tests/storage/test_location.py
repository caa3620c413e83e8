"""StorageLocation on local disk and the moto S3 server: safe keys, atomic and exclusive puts."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest

from storage.errors import CommitConflictError, NotFoundError, UnsafeKeyError
from storage.location import StorageLocation, read_uri, write_uri_atomic
from tests.fixtures.s3 import S3Root, StoreRoot

UNSAFE_KEYS = [
    "../escape.txt",
    "a/../../escape.txt",
    "a/./b",
    "/etc/passwd",
    "a\\..\\b",
    "a\x00b",
    "a\nb",
    "%2e%2e/escape.txt",
    "a/%2E%2e/b",
    "%2fetc",
    "s3://other-bucket/key",
    "file:///etc/passwd",
]


def _all_objects(location: StorageLocation) -> list[str]:
    return location.list("", include_hidden=True)


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_raise_before_any_io(store_root: StoreRoot, key: str) -> None:
    location = StorageLocation(store_root.root, endpoint_url=store_root.endpoint_url)
    location.put_bytes("keep.txt", b"x")
    before = _all_objects(location)
    with pytest.raises(UnsafeKeyError):
        location.put_bytes(key, b"evil")
    with pytest.raises(UnsafeKeyError):
        location.key("ok", key)
    with pytest.raises(UnsafeKeyError):
        location.get_bytes(key)
    with pytest.raises(UnsafeKeyError):
        location.delete(key)
    assert _all_objects(location) == before


def test_unsafe_keys_write_nothing_outside_a_local_root(tmp_path: Path) -> None:
    location = StorageLocation(str(tmp_path / "root"))
    for key in UNSAFE_KEYS:
        with pytest.raises(UnsafeKeyError):
            location.put_bytes(key, b"evil")
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_put_get_list_delete(store_root: StoreRoot) -> None:
    location = StorageLocation(store_root.root, endpoint_url=store_root.endpoint_url)
    assert location.list("") == []
    location.put_bytes("b/2.bin", b"two")
    location.put_bytes(location.key("a", "1.bin"), b"one")
    location.put_bytes("a/1.bin", b"one again")  # overwrite is allowed without exclusive
    assert location.get_bytes("a/1.bin") == b"one again"
    assert location.list("") == ["a/1.bin", "b/2.bin"]
    assert location.list("a") == ["a/1.bin"]
    assert location.list("missing") == []
    assert location.exists("b/2.bin") and not location.exists("b/3.bin")
    assert not location.exists("b")  # a folder is not a file
    location.delete("b/2.bin")
    location.delete("b/2.bin")  # idempotent
    assert location.list("") == ["a/1.bin"]
    with pytest.raises(NotFoundError, match=r"2\.bin"):
        location.get_bytes("b/2.bin")
    uri = location.uri("a/1.bin")
    assert uri.endswith("/a/1.bin")
    assert uri.startswith("s3://") == (store_root.kind == "s3")


def test_exclusive_put_creates_only_once(store_root: StoreRoot) -> None:
    location = StorageLocation(store_root.root, endpoint_url=store_root.endpoint_url)
    location.put_bytes("_commits/0000000001.json", b"first", exclusive=True)
    with pytest.raises(CommitConflictError, match="already exists"):
        location.put_bytes("_commits/0000000001.json", b"second", exclusive=True)
    assert location.get_bytes("_commits/0000000001.json") == b"first"
    assert location.list("", include_hidden=True) == ["_commits/0000000001.json"]


def test_local_put_leaves_no_temporary_files(tmp_path: Path) -> None:
    location = StorageLocation(str(tmp_path))
    location.put_bytes("x/y.bin", b"data")
    assert sorted(os.listdir(tmp_path / "x")) == ["y.bin"]


def test_listing_hides_dot_files(tmp_path: Path) -> None:
    location = StorageLocation(str(tmp_path))
    location.put_bytes("x/y.bin", b"data")
    (tmp_path / "x" / ".y.bin.tmp-123").write_bytes(b"half")
    assert location.list("x") == ["x/y.bin"]
    assert location.list("x", include_hidden=True) == ["x/.y.bin.tmp-123", "x/y.bin"]


def test_s3_keys_stay_under_the_prefix(s3_root: S3Root) -> None:
    location = StorageLocation(s3_root.root, endpoint_url=s3_root.endpoint_url)
    location.put_bytes("a/b.txt", b"x")
    client = boto3.client("s3", endpoint_url=s3_root.endpoint_url)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_root.bucket)["Contents"]]
    assert keys == [f"{s3_root.prefix}/a/b.txt"]


@pytest.mark.parametrize("root", ["s3://Bad_Bucket/x", "s3://ab/x", "s3://bucket/../x", "a\x00b"])
def test_bad_roots_are_rejected(root: str) -> None:
    with pytest.raises(UnsafeKeyError):
        StorageLocation(root)


def test_read_and_write_uri_local(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "ckpt.pt"
    write_uri_atomic(str(target), b"weights")
    assert read_uri(str(target)) == b"weights"
    assert read_uri(f"file://{target}") == b"weights"
    with pytest.raises(NotFoundError):
        read_uri(str(tmp_path / "missing.pt"))
    with pytest.raises(UnsafeKeyError):
        write_uri_atomic(str(tmp_path) + "/", b"x")


def test_read_and_write_uri_s3(s3_root: S3Root) -> None:
    uri = f"s3://{s3_root.bucket}/models/v1/model.pt"
    write_uri_atomic(uri, b"weights", endpoint_url=s3_root.endpoint_url)
    assert read_uri(uri, endpoint_url=s3_root.endpoint_url) == b"weights"
    with pytest.raises(NotFoundError):
        read_uri(uri + ".missing", endpoint_url=s3_root.endpoint_url)
    with pytest.raises(UnsafeKeyError):
        write_uri_atomic(f"s3://{s3_root.bucket}/../other/x", b"x")
