"""Hostile keys: ``../``, absolute paths, other buckets, ``%2e%2e``, NUL and odd Unicode are refused
before any I/O with an error naming the key, and nothing is written outside the store's root.

Covers every door a key comes in by: :class:`StorageLocation` (local disk and the moto S3
server), the :class:`MaskStore` (objects, embeddings, image ids, roots) and image sources
(:func:`storage.images.scan_images`, and ``flows.sources.prepare_source`` registering a folder or
an S3 prefix whose listing holds such keys).

"No I/O" is observed, not assumed: the location runs over a pyarrow filesystem that records every
call before handing it to the real local or S3 filesystem (a seam in ``StorageLocation``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from flows.config import parse_config
from flows.sources import prepare_source
from storage.errors import DataEngineError, InvalidInputError, UnsafeKeyError
from storage.images import list_images, scan_images
from storage.location import StorageLocation
from storage.mask_store import ImageRecord, MaskStore
from storage.quarantine import UNSAFE_KEY_REASON, quarantined
from tests.fixtures.s3 import S3Root, StoreRoot

HOSTILE_KEYS: dict[str, str] = {
    "parent": "../escape.bin",
    "nested-parent": "a/b/../../../escape.bin",
    "dot-segment": "a/./b.bin",
    "absolute": "/etc/passwd",
    "other-bucket": "s3://victim-bucket/stolen.bin",
    "file-uri": "file:///etc/passwd",
    "percent-dotdot": "%2e%2e/escape.bin",
    "percent-mixed-case": "a/%2E%2e/escape.bin",
    "nul": "a\x00.bin",
    "newline": "a\nb.bin",
    "backslash": "..\\escape.bin",
    "rtl-override": "photo\u202egnp.exe",
    "zero-width-space": "a\u200b/b.bin",
    "fullwidth-solidus": "..\uff0fescape.bin",
    "fullwidth-full-stops": "\uff0e\uff0e/escape.bin",
    "fraction-slash": "..\u2044escape.bin",
    "nfd-lookalike": "cafe\u0301.bin",
    "no-break-space": "a\u00a0b.bin",
    "line-separator": "a\u2028b.bin",
    "overlong-segment": "x" * 256,
}


class _RecordingHandler(pafs.FileSystemHandler):
    """Every call of a pyarrow filesystem, recorded, then done by the real filesystem."""

    def __init__(self, inner: pafs.FileSystem) -> None:
        self.inner = inner
        self.calls: list[tuple[str, Any]] = []

    def _log(self, name: str, arg: Any) -> None:
        self.calls.append((name, arg))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RecordingHandler) and other.inner.equals(self.inner)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"recording+{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return str(self.inner.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        self._log("get_file_info", paths)
        return list(self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        self._log("get_file_info_selector", selector.base_dir)
        return list(self.inner.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._log("create_dir", path)
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._log("delete_dir", path)
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._log("delete_dir_contents", path)
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self._log("delete_root_dir_contents", None)
        raise OSError("refusing to empty the root in a test")

    def delete_file(self, path: str) -> None:
        self._log("delete_file", path)
        self.inner.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._log("move", (src, dest))
        self.inner.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._log("copy_file", (src, dest))
        self.inner.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        self._log("open_input_stream", path)
        return self.inner.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        self._log("open_input_file", path)
        return self.inner.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        self._log("open_output_stream", path)
        return self.inner.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        self._log("open_append_stream", path)
        return self.inner.open_append_stream(path, metadata=metadata)


def _recording_location(store_root: StoreRoot) -> tuple[StorageLocation, _RecordingHandler]:
    if store_root.kind == "s3":
        assert store_root.endpoint_url is not None
        inner: pafs.FileSystem = pafs.S3FileSystem(
            endpoint_override=store_root.endpoint_url, scheme="http", region="us-east-1"
        )
    else:
        os.makedirs(store_root.root, exist_ok=True)
        inner = pafs.LocalFileSystem()
    handler = _RecordingHandler(inner)
    location = StorageLocation(
        store_root.root,
        filesystem=pafs.PyFileSystem(handler),
        endpoint_url=store_root.endpoint_url,
    )
    return location, handler


def _surfaces(location: StorageLocation) -> dict[str, Any]:
    """Every StorageLocation method that takes a key, as a one-argument call."""
    return {
        "key": lambda k: location.key(k),
        "key(ok, k)": lambda k: location.key("ok", k),
        "uri": lambda k: location.uri(k),
        "put_bytes": lambda k: location.put_bytes(k, b"evil"),
        "put_bytes exclusive": lambda k: location.put_bytes(k, b"evil", exclusive=True),
        "get_bytes": lambda k: location.get_bytes(k),
        "exists": lambda k: location.exists(k),
        "list": lambda k: location.list(k),
        "list_info": lambda k: location.list_info(k),
        "delete": lambda k: location.delete(k),
    }


def _names_the_key(message: str, key: str) -> bool:
    # Messages quote the key with repr() (NUL, bidi and zero-width characters shown escaped);
    # an overlong one is cut to its first 80 characters.
    return repr(key)[1:30] in message


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _bucket_keys(endpoint_url: str, bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _png(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --- StorageLocation ---------------------------------------------------------------------------


def test_every_location_method_refuses_every_hostile_key_before_any_io(
    store_root: StoreRoot,
) -> None:
    location, recorder = _recording_location(store_root)
    location.put_bytes("keep.bin", b"kept")
    before = location.list("", include_hidden=True)
    recorder.calls.clear()

    refused: list[tuple[str, str]] = []
    for label, key in HOSTILE_KEYS.items():
        for surface, call in _surfaces(location).items():
            with pytest.raises(UnsafeKeyError) as caught:
                call(key)
            assert _names_the_key(str(caught.value), key), (label, surface, str(caught.value))
            refused.append((label, surface))

    # 20 keys x 10 methods, every one refused, and not one filesystem call made for them.
    assert len(refused) == len(HOSTILE_KEYS) * 10 == 200
    assert recorder.calls == []
    assert location.list("", include_hidden=True) == before == ["keep.bin"]


def test_hostile_keys_write_nothing_outside_a_local_root(tmp_path: Path) -> None:
    location = StorageLocation(str(tmp_path / "root"))
    location.put_bytes("keep.bin", b"kept")
    for key in HOSTILE_KEYS.values():
        for call in _surfaces(location).values():
            with pytest.raises(UnsafeKeyError):
                call(key)
    assert _tree(tmp_path) == {"root", "root/keep.bin"}


def test_hostile_keys_write_nothing_outside_an_s3_prefix(s3_root: S3Root) -> None:
    client = boto3.client("s3", endpoint_url=s3_root.endpoint_url, region_name="us-east-1")
    client.create_bucket(Bucket="victim-bucket")
    location = StorageLocation(s3_root.root, endpoint_url=s3_root.endpoint_url)
    for key in HOSTILE_KEYS.values():
        for call in _surfaces(location).values():
            with pytest.raises(UnsafeKeyError):
                call(key)
    assert _bucket_keys(s3_root.endpoint_url, s3_root.bucket) == []
    assert _bucket_keys(s3_root.endpoint_url, "victim-bucket") == []


@pytest.mark.parametrize(
    "root",
    [
        "s3://bucket/data/../other",
        "s3://bucket/%2e%2e/data",
        "s3://bucket/da\u202eta",
        "s3://bucket/data\x00",
        "s3://Bad_Bucket/data",
        "s3://bucket/..\uff0fdata",
    ],
)
def test_hostile_roots_are_refused_naming_them(root: str) -> None:
    with pytest.raises(UnsafeKeyError) as caught:
        MaskStore(root, endpoint_url="http://127.0.0.1:9")  # never contacted
    assert repr(root) in str(caught.value)


# --- MaskStore ---------------------------------------------------------------------------------


def test_mask_store_refuses_hostile_object_keys_and_ids(
    store_root: StoreRoot, tmp_path: Path
) -> None:
    store = MaskStore(store_root.root, endpoint_url=store_root.endpoint_url)
    store.put_object("engine/keep.json", b"{}")
    before = store.location.list("", include_hidden=True)
    local_before = _tree(tmp_path)
    embedding = np.zeros((4, 2, 2), np.float32)
    calls = {
        "put_object": lambda k: store.put_object(k, b"evil"),
        "put_object exclusive": lambda k: store.put_object(k, b"evil", exclusive=True),
        "get_object": lambda k: store.get_object(k),
        "list_objects": lambda k: store.list_objects(k),
        "save_embedding image_id": lambda k: store.save_embedding(
            k, "v0001", embedding, (2, 2), (2, 2)
        ),
        "save_embedding model_version": lambda k: store.save_embedding(
            "img", k, embedding, (2, 2), (2, 2)
        ),
        "load_embedding": lambda k: store.load_embedding(k, "v0001"),
        "add_images": lambda k: store.add_images([ImageRecord(k, "/x.png", 2, 2, "0" * 64)]),
    }
    refused = 0
    for key in HOSTILE_KEYS.values():
        for name, call in calls.items():
            with pytest.raises(DataEngineError) as caught:
                call(key)
            assert isinstance(caught.value, UnsafeKeyError | InvalidInputError), name
            assert _names_the_key(str(caught.value), key), (name, str(caught.value))
            refused += 1

    assert refused == len(HOSTILE_KEYS) * len(calls) == 160
    assert store.location.list("", include_hidden=True) == before
    assert store.images() == []
    if store_root.kind == "local":
        assert _tree(tmp_path) == local_before


# --- image sources -----------------------------------------------------------------------------

#: Image files whose names are hostile; each holds a valid PNG, so a read would register it.
HOSTILE_IMAGE_NAMES_LOCAL = [
    "photo\u202egnp.png",
    "up..\uff0fescape.png",
    "\uff0e\uff0e.png",
    "cafe\u0301.png",
    "%2e%2e.png",
    "back\\slash.png",
    "new\nline.png",
    "zero\u200bwidth.png",
]
#: Keys only S3 can hold (a local folder cannot name a file ``..``).
HOSTILE_IMAGE_KEYS_S3 = [
    "../escape.png",
    "a/../../escape.png",
    "./dot.png",
    "/double-slash.png",
    "%2e%2e/escape.png",
    "photo\u202egnp.png",
    "up..\uff0fescape.png",
    "cafe\u0301.png",
]
GOOD_IMAGE_NAMES = ["good-1.png", "good-2.png", "nested/good-3.png"]


def _local_source(folder: Path) -> str:
    for i, name in enumerate([*GOOD_IMAGE_NAMES, *HOSTILE_IMAGE_NAMES_LOCAL]):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(i))
    return str(folder)


def _s3_source(s3: S3Root, prefix: str) -> str:
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1")
    for i, name in enumerate([*GOOD_IMAGE_NAMES, *HOSTILE_IMAGE_KEYS_S3]):
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{name}", Body=_png(i))
    return f"s3://{s3.bucket}/{prefix}"


def test_scan_images_keeps_hostile_keys_out_local(tmp_path: Path) -> None:
    source = _local_source(tmp_path / "images")
    scan = scan_images(source)
    assert sorted(Path(u).name for u in scan.uris) == ["good-1.png", "good-2.png", "good-3.png"]
    assert len(scan.rejected) == len(HOSTILE_IMAGE_NAMES_LOCAL) == 8
    for rejected in scan.rejected:
        name = rejected.key.rsplit("/", 1)[-1]
        assert name in HOSTILE_IMAGE_NAMES_LOCAL and _names_the_key(rejected.message, name)
    with pytest.raises(UnsafeKeyError, match="image source"):
        list_images(source)


def test_scan_images_keeps_hostile_keys_out_s3(s3_root: S3Root) -> None:
    source = _s3_source(s3_root, "src")
    scan = scan_images(source, endpoint_url=s3_root.endpoint_url)
    assert [u.rsplit("/", 1)[-1] for u in scan.uris] == ["good-1.png", "good-2.png", "good-3.png"]
    assert all(u.startswith(f"s3://{s3_root.bucket}/src/") for u in scan.uris)
    assert len(scan.rejected) == len(HOSTILE_IMAGE_KEYS_S3) == 8
    listed = {r.key[len(f"s3://{s3_root.bucket}/src/") :] for r in scan.rejected}
    # S3 lists "src//double-slash.png" relative to "src/" as "/double-slash.png".
    assert listed == set(HOSTILE_IMAGE_KEYS_S3)


def _folder_config(root: str, pool: str, holdout: str, endpoint_url: str | None) -> Any:
    return parse_config(
        {
            "root": root,
            "endpoint_url": endpoint_url,
            "source": {
                "images": pool,
                "holdout": holdout,
                "holdout_coco": f"{holdout}/annotations.json",
                "pool_coco": f"{pool}/annotations.json",  # not read by registration
            },
            "stage1": {"rounds": 1, "images_per_round": 1},
            "stage2": {"rounds": 1, "images_per_round": 1},
            "stage3": {"rounds": 1, "images_per_round": 1},
        }
    )


def _holdout(folder: Path) -> str:
    """A holdout folder of one image with one COCO mask."""
    from storage import rle as rle_codec

    folder.mkdir(parents=True)
    (folder / "h.png").write_bytes(_png(99))
    mask = np.zeros((1, 24, 24), bool)
    mask[0, 4:12, 6:14] = True
    coco = {
        "images": [{"id": 1, "file_name": "h.png", "width": 24, "height": 24}],
        "annotations": [{"id": 1, "image_id": 1, "segmentation": rle_codec.encode(mask)[0]}],
    }
    import json

    (folder / "annotations.json").write_text(json.dumps(coco))
    return str(folder)


def test_registering_a_source_quarantines_hostile_keys_unread(
    store_root: StoreRoot, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    holdout = _holdout(tmp_path / "holdout")
    if store_root.kind == "s3":
        s3: S3Root = request.getfixturevalue("s3_root")
        pool = _s3_source(s3, "pool")
        hostile = HOSTILE_IMAGE_KEYS_S3
    else:
        pool = _local_source(tmp_path / "pool")
        hostile = HOSTILE_IMAGE_NAMES_LOCAL
    config = _folder_config(store_root.root, pool, holdout, store_root.endpoint_url)
    store = MaskStore(store_root.root, endpoint_url=store_root.endpoint_url)
    local_before = _tree(tmp_path)

    summary = prepare_source(store, config)
    again = prepare_source(store, config)  # a rerun neither duplicates images nor entries

    assert summary.pool_images == again.pool_images == len(GOOD_IMAGE_NAMES) == 3
    assert summary.quarantined == again.quarantined == len(hostile) == 8
    entries = quarantined(store)
    assert len(entries) == 8
    assert {e.reason for e in entries} == {UNSAFE_KEY_REASON}
    # Never read: no content hash, and none of them (valid PNGs all) was registered.
    assert all(e.sha256 is None for e in entries)
    assert len(store.images("pool")) == 3
    # Registered + quarantined = every image file of the pool.
    assert summary.pool_images + summary.quarantined == len(GOOD_IMAGE_NAMES) + len(hostile)
    if store_root.kind == "local":
        # Everything written went under the store root.
        new = _tree(tmp_path) - local_before
        assert new and all(p.startswith("store") for p in new), sorted(new)
    else:
        keys = _bucket_keys(store_root.endpoint_url or "", s3.bucket)
        outside = [k for k in keys if not k.startswith(("data/", "pool/"))]
        assert outside == []
