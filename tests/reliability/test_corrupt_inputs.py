"""Corrupt inputs: a truncated JPEG, a 0-byte file, a decompression bomb, an image over the pixel
limit and a text file named ``.jpg`` are quarantined with their reason; the usable images are
imported; ``processed + quarantined == inputs``; a rerun duplicates neither.

Runs the real import (local folder into a local store, S3 prefix into an S3 store on moto), the
flows' registration task, and the ``data-engine stats`` command on the result.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import tracemalloc
import zlib
from datetime import UTC, datetime
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image
from prefect.logging import disable_run_logger
from typer.testing import CliRunner

from flows.cli import build_app
from flows.config import parse_config
from flows.tasks import register_source, round_image_ids, store_for
from storage import rle as rle_codec
from storage.errors import ImageError
from storage.export import import_dataset
from storage.images import decode_image
from storage.mask_store import MaskStore
from storage.quarantine import QUARANTINE_PREFIX, quarantined
from tests.fixtures.s3 import S3Root, StoreRoot


def _encoded(seed: int, fmt: str, size: tuple[int, int] = (20, 28)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` RGB pixels, with one row of data: a
    few hundred bytes that would ask a naive decoder for width * height * 3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


GOOD = {
    "good-1.png": _encoded(1, "PNG"),
    "good-2.jpg": _encoded(2, "JPEG"),
    "sub/good-3.png": _encoded(3, "PNG"),
    "sub/good-4.webp": _encoded(4, "WEBP"),
}
BAD = {
    "truncated.jpg": _encoded(5, "JPEG", (64, 64))[:400],
    "empty.png": b"",
    "bomb.png": _png_claiming(100_000, 100_000),  # 10^10 pixels: Pillow's own bomb guard
    "huge.png": _png_claiming(9_000, 9_000),  # 81 M pixels: over our 64 M limit only
    "not-an-image.jpg": b"%PDF-1.4 this is a document, whatever its name says\n" * 20,
}
EXPECTED_REASONS = {
    "truncated.jpg": "truncated or corrupt",
    "empty.png": "empty file",
    "bomb.png": "too many pixels",
    "huge.png": "too many pixels",
    "not-an-image.jpg": "unknown format",
}


def _source(store_root: StoreRoot, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The inputs as a local folder, or under an S3 prefix for the S3 store."""
    files = {**GOOD, **BAD}
    if store_root.kind == "s3":
        s3: S3Root = request.getfixturevalue("s3_root")
        client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1")
        for name, data in files.items():
            client.put_object(Bucket=s3.bucket, Key=f"incoming/{name}", Body=data)
        return f"s3://{s3.bucket}/incoming"
    folder = tmp_path / "incoming"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return str(folder)


def _objects(store: MaskStore, prefix: str) -> list[str]:
    return store.location.list(prefix, include_hidden=True)


def test_corrupt_images_are_quarantined_and_the_rest_imported_once(
    store_root: StoreRoot, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = _source(store_root, tmp_path, request)
    store = MaskStore(store_root.root, endpoint_url=store_root.endpoint_url)
    start = datetime.now(UTC)

    result = import_dataset(store, source, quarantine=True, endpoint_url=store_root.endpoint_url)

    inputs = len(GOOD) + len(BAD)
    assert (result.images_found, result.images_processed, result.images_quarantined) == (9, 4, 5)
    assert result.images_processed + result.images_quarantined == inputs
    assert result.images_added == len(store.images()) == len(GOOD)
    reasons = {e.key.split("/incoming/", 1)[1]: e.reason for e in result.quarantined}
    assert reasons == EXPECTED_REASONS
    stored = {e.key.split("/incoming/", 1)[1]: e for e in quarantined(store)}
    assert {name: e.reason for name, e in stored.items()} == EXPECTED_REASONS
    for name, entry in stored.items():
        assert entry.sha256 == hashlib.sha256(BAD[name]).hexdigest()
        assert name in entry.message  # the message names the file
        assert start <= entry.quarantined_at <= datetime.now(UTC)
    image_files = _objects(store, "images")
    quarantine_files = _objects(store, QUARANTINE_PREFIX)

    again = import_dataset(store, source, quarantine=True, endpoint_url=store_root.endpoint_url)

    assert (again.images_found, again.images_processed, again.images_quarantined) == (9, 4, 5)
    assert again.images_added == 0
    assert len(store.images()) == 4
    assert _objects(store, "images") == image_files  # no second images file
    assert _objects(store, QUARANTINE_PREFIX) == quarantine_files  # no second entry
    assert len(quarantine_files) == 5
    # The first quarantine time is kept.
    assert {e.key: e.quarantined_at for e in quarantined(store)} == {
        e.key: e.quarantined_at for e in stored.values()
    }


def test_without_quarantine_the_first_bad_image_stops_the_import_before_any_write(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    for name, data in {**GOOD, "empty.png": b""}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    store = MaskStore(str(tmp_path / "store"))
    with pytest.raises(ImageError, match=r"empty\.png.*empty \(0 bytes\)") as caught:
        import_dataset(store, str(folder))
    assert caught.value.reason == "empty file"
    assert store.location.list("", include_hidden=True) == []


def test_a_bomb_is_refused_from_its_header_without_allocating_its_pixels() -> None:
    bomb, huge = BAD["bomb.png"], BAD["huge.png"]
    tracemalloc.start()
    try:
        for data, name in ((bomb, "bomb.png"), (huge, "huge.png")):
            with pytest.raises(ImageError, match=name) as caught:
                decode_image(data, name=name)
            assert caught.value.reason == "too many pixels"
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 10^10 and 8.1 * 10^7 RGB pixels would be 30 GB and 243 MB; the refusal takes under 2 MB.
    assert peak < 2 * 1024 * 1024, peak


def _holdout(folder: Path) -> str:
    folder.mkdir(parents=True)
    (folder / "h.png").write_bytes(_encoded(9, "PNG"))
    mask = np.zeros((1, 20, 28), bool)
    mask[0, 4:12, 6:14] = True
    coco = {
        "images": [{"id": 1, "file_name": "h.png", "width": 28, "height": 20}],
        "annotations": [{"id": 1, "image_id": 1, "segmentation": rle_codec.encode(mask)[0]}],
    }
    (folder / "annotations.json").write_text(json.dumps(coco))
    return str(folder)


def test_a_stage_run_registers_the_good_images_and_reports_the_quarantined(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "incoming"
    for name, data in {**GOOD, **BAD}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    holdout = _holdout(tmp_path / "holdout")
    config = parse_config(
        {
            "root": str(tmp_path / "store"),
            "source": {
                "images": str(folder),
                "holdout": holdout,
                "holdout_coco": f"{holdout}/annotations.json",
                "pool_coco": str(folder / "annotations.json"),  # not read by registration
            },
            "stage1": {"rounds": 2, "images_per_round": 1},
            "stage2": {"rounds": 1, "images_per_round": 1},
            "stage3": {"rounds": 1, "images_per_round": 1},
        }
    )
    with disable_run_logger():
        first = register_source.fn(config, "dataset")
        second = register_source.fn(config, "dataset")  # the next run registers again
        rounds = ((1, 0), (1, 1), (2, 0), (3, 0))
        batches = [round_image_ids.fn(config, stage, r) for stage, r in rounds]

    assert first == second
    assert (first["pool_images"], first["quarantined"]) == (4, 5)
    store = store_for(config)
    good_ids = {r.image_id for r in store.images("pool")}
    # Every round gets its image, and only usable ones: 4 rounds x 1 image = the 4 good images.
    assert [len(b) for b in batches] == [1, 1, 1, 1]
    assert {i for b in batches for i in b} == good_ids
    assert len(quarantined(store)) == 5

    stats = CliRunner().invoke(build_app(), ["stats", "--root", config.root])
    assert stats.exit_code == 0, stats.output
    assert "images: 5 (holdout 1, pool 4)" in stats.output
    line = next(x for x in stats.output.splitlines() if x.startswith("quarantined: "))
    total, _, reasons = line[len("quarantined: ") :].partition(" ")
    counts = dict(r.rsplit(" ", 1) for r in reasons.strip("()").split(", "))
    assert int(total) == 5
    assert {k: int(v) for k, v in counts.items()} == {
        "too many pixels": 2,
        "empty file": 1,
        "truncated or corrupt": 1,
        "unknown format": 1,
    }


def test_the_import_command_quarantines_and_names_each_file(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    for name, data in {**GOOD, **BAD}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    root = str(tmp_path / "store")
    runner = CliRunner()
    args = ["import", "--root", root, "--images", str(folder), "--quarantine"]

    first = runner.invoke(build_app(), args)
    second = runner.invoke(build_app(), args)

    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    # (tqdm's progress bar shares the first line)
    found = re.findall(r"quarantined '([^']+)': ([a-z ]+)", first.output)
    named = {key.rsplit("/incoming/", 1)[1]: reason for key, reason in found}
    assert named == EXPECTED_REASONS
    assert "images: 9 found, 4 new (pool)" in first.output and "quarantined: 5" in first.output
    assert "images: 9 found, 0 new (pool)" in second.output
    assert len(quarantined(MaskStore(root))) == 5
    strict = runner.invoke(
        build_app(), ["import", "--root", str(tmp_path / "s"), "--images", str(folder)]
    )
    assert strict.exit_code != 0 and isinstance(strict.exception, ImageError)
