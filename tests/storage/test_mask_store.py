"""MaskStore on local disk and on the moto S3 server: commits, idempotency, snapshots, bad input."""

from __future__ import annotations

import io
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage import rle
from storage.errors import (
    DataEngineError,
    InvalidInputError,
    MaskFormatError,
    NotFoundError,
    RleError,
    StorageError,
    UnsafeKeyError,
)
from storage.images import image_id_for, sha256_hex
from storage.mask_store import ImageRecord, MaskRecord, MaskStore, make_mask_id
from storage.schema import IMAGES_SCHEMA, MASKS_SCHEMA
from tests.fixtures.s3 import StoreRoot

H, W = 24, 32


def _store(root: StoreRoot) -> MaskStore:
    return MaskStore(root.root, endpoint_url=root.endpoint_url)


def _image(i: int, split: str = "pool") -> ImageRecord:
    return ImageRecord(f"img{i}", f"/nowhere/img{i}.png", W, H, f"{i:064x}", split=split)


def _masks(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, H, W), dtype=bool)
    for k in range(n):
        y, x = rng.integers(0, H - 4), rng.integers(0, W - 4)
        masks[k, y : y + rng.integers(2, 8), x : x + rng.integers(2, 8)] = True
    return masks


def _records(image_id: str, n: int, *, stage: int = 1, round: int = 0, run_id: str = "run-a",
             source: str = "manual", seed: int = 0) -> list[MaskRecord]:  # fmt: skip
    return [
        MaskRecord(image_id, r, stage, round, source, run_id) for r in rle.encode(_masks(n, seed))
    ]


def _files(store: MaskStore) -> list[str]:
    return store.location.list("", include_hidden=True)


def test_add_images_is_idempotent_and_keeps_splits_apart(store_root: StoreRoot) -> None:
    store = _store(store_root)
    assert store.add_images([_image(0), _image(1), _image(0)]) == 2
    assert store.add_images([_image(1), _image(2, "holdout")]) == 1
    assert [r.image_id for r in store.images()] == ["img0", "img1", "img2"]
    assert [r.image_id for r in store.images("holdout")] == ["img2"]
    assert store.get_image("img1").width == W
    assert store.get_image("img1").added_at is not None
    with pytest.raises(InvalidInputError, match="already in split 'pool'"):
        store.add_images([_image(0, "holdout")])
    with pytest.raises(NotFoundError, match="img9"):
        store.get_image("img9")
    assert len(_store(store_root).images()) == 3  # a fresh reader sees the same


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"image_id": "../img"}, UnsafeKeyError),
        ({"image_id": "a/b"}, UnsafeKeyError),
        ({"width": 0}, InvalidInputError),
        ({"sha256": "xyz"}, InvalidInputError),
        ({"split": "train"}, InvalidInputError),
    ],
)
def test_add_images_rejects_bad_records_without_writing(
    store_root: StoreRoot, change: dict[str, object], error: type[Exception]
) -> None:
    store = _store(store_root)
    with pytest.raises(error):
        store.add_images([_image(0), replace(_image(1), **change)])
    assert _files(store) == []


def test_write_and_read_back_every_field(store_root: StoreRoot) -> None:
    store = _store(store_root)
    store.add_images([_image(0)])
    seg = rle.encode(_masks(1))[0]
    created = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    record = MaskRecord(
        "img0", seg, 2, 3, "model", "run-x", predicted_iou=0.875, stability_score=0.96,
        point_coords=[[1.5, 2.0], [3.0, 4.0]], crop_box=[0, 0, 16, 12], model_version="m1",
        annotator="ann", lead_time_s=12.5, clicks=4, mask_id="fixed-id", created_at=created,
    )  # fmt: skip
    info = store.write_masks([record], stage=2, round=3, run_id="run-x")
    assert (info.sequence, info.stage, info.round, info.run_id) == (1, 2, 3, "run-x")
    assert info.counts == {"masks": 1, "skipped": 0, "replaced": 0}
    assert info.files[0].startswith("masks/stage=2/")
    table = _store(store_root).masks()
    assert table.schema.equals(MASKS_SCHEMA, check_metadata=True)
    row = table.to_pylist()[0]
    assert row["counts"] == seg["counts"] and row["stage"] == 2 and row["round"] == 3
    assert (row["height"], row["width"]) == (H, W)
    assert row["area"] == rle.area([seg])[0]
    assert row["bbox"] == rle.to_bbox([seg])[0].tolist()
    assert row["point_coords"] == [[1.5, 2.0], [3.0, 4.0]]
    assert row["created_at"] == created
    [back] = _store(store_root).mask_records()
    assert back == replace(record, created_at=back.created_at)
    assert back.area == row["area"] and back.bbox == row["bbox"] and back.height == H


def test_derived_mask_ids_are_deterministic(store_root: StoreRoot) -> None:
    store = _store(store_root)
    store.add_images([_image(0)])
    records = _records("img0", 3)
    store.write_masks(records, stage=1, round=0, run_id="run-a")
    ids = store.masks()["mask_id"].to_pylist()
    expected = [
        make_mask_id("img0", "1", "0", "run-a", "manual", r.segmentation["counts"]) for r in records
    ]
    assert ids == expected


def test_same_batch_twice_leaves_one_copy(store_root: StoreRoot) -> None:
    store = _store(store_root)
    store.add_images([_image(0), _image(1)])
    batch = _records("img0", 5) + _records("img1", 4, seed=1)
    first = store.write_masks(batch, stage=1, round=0, run_id="run-a")
    again = _store(store_root).write_masks(batch, stage=1, round=0, run_id="run-a")
    assert first.counts["masks"] == 9
    assert again.counts == {"masks": 0, "skipped": 9, "replaced": 0}
    assert again.files == () and again.sequence == first.sequence
    overlap = _records("img0", 7)  # the first 5 masks plus 2 new ones
    third = store.write_masks(overlap, stage=1, round=0, run_id="run-a")
    assert third.counts == {"masks": 2, "skipped": 5, "replaced": 0}
    ids = store.masks()["mask_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 11
    assert len(store.commits()) == 2


def test_duplicate_in_one_batch_is_kept_once_but_a_clash_is_an_error(
    store_root: StoreRoot,
) -> None:
    store = _store(store_root)
    store.add_images([_image(0)])
    one = _records("img0", 1)[0]
    info = store.write_masks([one, one], stage=1, round=0, run_id="run-a")
    assert info.counts == {"masks": 1, "skipped": 1, "replaced": 0}
    a, b = _records("img0", 2, run_id="run-b")
    clash = [replace(a, mask_id="same"), replace(b, mask_id="same")]
    with pytest.raises(InvalidInputError, match="repeats in the batch"):
        store.write_masks(clash, stage=1, round=0, run_id="run-b")


def test_snapshots_filters_and_replacements(store_root: StoreRoot) -> None:
    store = _store(store_root)
    store.add_images([_image(0), _image(1), _image(2, "holdout")])
    store.write_masks(_records("img0", 3, run_id="r1"), stage=1, round=0, run_id="r1")
    store.write_masks(_records("img1", 2, round=1, run_id="r2"), stage=1, round=1, run_id="r2")
    auto = _records("img0", 4, stage=3, run_id="r3", source="auto", seed=5)
    store.write_masks(auto, stage=3, round=0, run_id="r3")
    store.write_masks(_records("img2", 2, run_id="gt"), stage=1, round=0, run_id="gt")
    old = store.masks(stage=1, round=0, image_id="img0")["mask_id"].to_pylist()
    edited = _records("img0", 1, run_id="r5", seed=9)
    info = store.write_masks(edited, stage=1, round=0, run_id="r5", replaces=old[:2])
    assert info.counts == {"masks": 1, "skipped": 0, "replaced": 2}

    reader = _store(store_root)
    assert reader.count_masks() == 3 + 2 + 4 + 2 + 1 - 2
    assert reader.count_masks(as_of=0) == 0
    assert reader.count_masks(as_of=1) == 3
    assert reader.count_masks(as_of=4) == 11
    assert reader.count_masks(stage=1) == 6
    assert reader.count_masks(stage=1, round=1) == 2
    assert reader.count_masks(source="auto") == 4
    assert reader.count_masks(image_id=["img0", "img1"]) == 2 + 4 + 2
    assert reader.count_masks(split="holdout") == 2
    assert reader.count_masks(split="pool") == 8
    assert set(old[:2]).isdisjoint(reader.masks()["mask_id"].to_pylist())
    assert set(old[:2]) <= set(reader.masks(as_of=4)["mask_id"].to_pylist())
    assert [c.sequence for c in reader.commits()] == [1, 2, 3, 4, 5]
    assert reader.commits()[-1].replaces == tuple(old[:2])
    with pytest.raises(NotFoundError, match="as_of=6"):
        reader.masks(as_of=6)
    again = store.write_masks(edited, stage=1, round=0, run_id="r5", replaces=old[:2])
    assert again.files == () and reader.count_masks() == 10


def test_iterating_masks_as_arrays(store_root: StoreRoot) -> None:
    store = _store(store_root)
    store.add_images([_image(0), _image(1)])
    store.write_masks(
        _records("img1", 2, seed=1) + _records("img0", 3), stage=1, round=0, run_id="run-a"
    )
    out = list(store.iter_image_masks(stage=1))
    assert [(image_id, len(ids), arr.shape) for image_id, ids, arr in out] == [
        ("img0", 3, (3, H, W)),
        ("img1", 2, (2, H, W)),
    ]
    order = {m: i for i, m in enumerate(store.masks(image_id="img0")["mask_id"].to_pylist())}
    np.testing.assert_array_equal(out[0][2], _masks(3)[[order[m] for m in out[0][1]]])


def test_hive_partitioned_files_read_directly(store_root: StoreRoot) -> None:
    store = _store(store_root)
    store.add_images([_image(0)])
    store.write_masks(_records("img0", 3), stage=1, round=0, run_id="run-a")
    store.write_masks(_records("img0", 2, stage=3, source="auto"), stage=3, round=0, run_id="run-a")
    location = store.location
    path = (
        f"{location.bucket}/{location.prefix}/masks" if location.is_s3 else f"{location.root}/masks"
    )
    dataset = pads.dataset(path, filesystem=location.filesystem, partitioning="hive")
    table = dataset.to_table()
    assert sorted(table["stage"].to_pylist()) == [1, 1, 1, 3, 3]
    assert table.num_rows == store.count_masks()


def test_no_nullable_column_is_a_fixed_size_list() -> None:
    # Arrow's Parquet reader before 25.0 (pandas, DuckDB and Spark through it) fails on a null
    # fixed-size list (apache/arrow#35692): a store of human masks (crop_box null) would be
    # unreadable there. Nested lists count too.
    def fixed_with_nulls(t: pa.DataType, nullable: bool) -> bool:
        if pa.types.is_fixed_size_list(t):
            return nullable or fixed_with_nulls(t.value_type, t.value_field.nullable)
        if pa.types.is_list(t):
            return fixed_with_nulls(t.value_type, t.value_field.nullable)
        return False

    for schema in (MASKS_SCHEMA, IMAGES_SCHEMA):
        bad = [f.name for f in schema if fixed_with_nulls(f.type, f.nullable)]
        assert not bad, f"nullable fixed-size lists: {bad}"


def test_schema_v1_files_still_read(store_root: StoreRoot) -> None:
    # Version 1 stored crop_box as a fixed-size list; rewrite a v2 file in that layout.
    store = _store(store_root)
    store.add_images([_image(0)])
    records = _records("img0", 2, stage=3, source="auto")
    records[0] = replace(records[0], crop_box=[0, 0, 16, 12], predicted_iou=0.5)
    info = store.write_masks(records, stage=3, round=0, run_id="run-a")
    before = store.mask_records()
    [key] = info.files
    table = pq.read_table(pa.BufferReader(store.location.get_bytes(key)))
    v1_type = pa.list_(pa.float32(), 4)
    column = pa.array(table["crop_box"].to_pylist(), type=v1_type)
    table = table.set_column(table.schema.get_field_index("crop_box"), "crop_box", column)
    table = table.replace_schema_metadata({b"schema_version": b"1", b"table": b"masks"})
    out = io.BytesIO()
    pq.write_table(table, out)
    store.location.put_bytes(key, out.getvalue())
    after = _store(store_root).mask_records()
    assert after == before
    assert sorted((r.crop_box is None, r.crop_box or []) for r in after) == [
        (False, [0, 0, 16, 12]),
        (True, []),
    ]


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda r: replace(r, image_id="img-unknown"), InvalidInputError, "not a registered"),
        (lambda r: replace(r, stage=2), InvalidInputError, r"records\[1\].stage is 2"),
        (lambda r: replace(r, source="robot"), InvalidInputError, "source"),
        (lambda r: replace(r, segmentation={"size": [H, W], "counts": "0`"}), RleError, "run"),
        (
            lambda r: replace(
                r, segmentation={"size": [H, W + 1], "counts": r.segmentation["counts"]}
            ),
            RleError,
            "sum to",
        ),
        (
            lambda r: replace(r, segmentation=rle.encode(np.zeros((1, 5, 5), bool))[0]),
            RleError,
            r"image 'img0' is \[24, 32\]",
        ),
        (lambda r: replace(r, predicted_iou=float("nan")), InvalidInputError, "predicted_iou"),
        (lambda r: replace(r, point_coords=[[1, 2, 3]]), InvalidInputError, "point_coords"),
        (lambda r: replace(r, crop_box=[0, 0, -1, 4]), InvalidInputError, "crop_box"),
        (lambda r: replace(r, clicks=-1), InvalidInputError, "clicks"),
        (lambda r: replace(r, lead_time_s=-3.0), InvalidInputError, "lead_time_s"),
        (lambda r: replace(r, mask_id="../../x"), InvalidInputError, "mask_id"),
    ],
)
def test_bad_records_raise_before_anything_is_written(
    store_root: StoreRoot, mutate: object, error: type[Exception], message: str
) -> None:
    store = _store(store_root)
    store.add_images([_image(0)])
    before = _files(store)
    good = _records("img0", 3)
    bad = [good[0], mutate(good[1]), good[2]]  # type: ignore[operator]
    with pytest.raises(error, match=message):
        store.write_masks(bad, stage=1, round=0, run_id="run-a")
    assert _files(store) == before
    assert store.count_masks() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stage": 4, "round": 0, "run_id": "r"},
        {"stage": 1, "round": -1, "run_id": "r"},
        {"stage": 1, "round": 0, "run_id": ""},
        {"stage": 1, "round": 0, "run_id": "r", "replaces": ["never-committed"]},
        {"stage": 1, "round": 0, "run_id": "r", "replaces": "one-id-as-a-str"},
    ],
)
def test_bad_write_arguments(store_root: StoreRoot, kwargs: dict[str, object]) -> None:
    store = _store(store_root)
    store.add_images([_image(0)])
    before = _files(store)
    records = _records("img0", 1, run_id="r")
    with pytest.raises(InvalidInputError):
        store.write_masks(records, **kwargs)  # type: ignore[arg-type]
    assert _files(store) == before


def test_masks_of_the_wrong_dtype_never_reach_the_store() -> None:
    with pytest.raises(MaskFormatError):
        rle.encode(np.zeros((1, H, W), dtype=np.uint8))


def test_concurrent_writer_conflict_is_retried_without_duplicates(store_root: StoreRoot) -> None:
    writer_a, writer_b = _store(store_root), _store(store_root)
    writer_a.add_images([_image(0)])
    shared = _records("img0", 4)
    original_put = writer_a.location.put_bytes
    interleaved = []

    def put_after_b_commits(key: str, data: bytes, *, exclusive: bool = False) -> None:
        # Writer B commits an overlapping batch just before A's first commit attempt.
        if key.startswith("_commits/") and not interleaved:
            interleaved.append(writer_b.write_masks(shared[:3], stage=1, round=0, run_id="run-a"))
        original_put(key, data, exclusive=exclusive)

    writer_a.location.put_bytes = put_after_b_commits  # type: ignore[method-assign]
    info = writer_a.write_masks(shared, stage=1, round=0, run_id="run-a")
    assert interleaved[0].sequence == 1 and info.sequence == 2
    assert info.counts == {"masks": 1, "skipped": 3, "replaced": 0}
    reader = _store(store_root)
    ids = reader.masks()["mask_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 4
    assert reader.gc() == []  # A deleted the data file of its failed attempt


def test_gc_deletes_only_unreferenced_mask_files(store_root: StoreRoot) -> None:
    store = _store(store_root)
    store.add_images([_image(0)])
    store.write_masks(_records("img0", 2), stage=1, round=0, run_id="run-a")
    store.location.put_bytes("masks/stage=1/orphan.parquet", b"half a write")
    store.location.put_bytes("models/.ckpt.tmp-dead", b"stale temp")
    store.put_object("models/v1/model.pt", b"keep")
    assert store.gc(older_than_s=3600) == []
    assert store.gc() == ["masks/stage=1/orphan.parquet", "models/.ckpt.tmp-dead"]
    assert store.count_masks() == 2 and store.get_object("models/v1/model.pt") == b"keep"


def test_embeddings_round_trip(store_root: StoreRoot) -> None:
    store = _store(store_root)
    embedding = np.random.default_rng(0).standard_normal((8, 4, 4)).astype(np.float16)
    assert store.load_embedding("img0", "vit_b-r1") is None
    store.save_embedding("img0", "vit_b-r1", embedding, (480, 640), (768, 1024))
    loaded, original, resized = _store(store_root).load_embedding("img0", "vit_b-r1")  # type: ignore[misc]
    np.testing.assert_array_equal(loaded, embedding)
    assert loaded.dtype == np.float16 and original == (480, 640) and resized == (768, 1024)
    with pytest.raises(UnsafeKeyError):
        store.save_embedding("../x", "v", embedding, (1, 1), (1, 1))
    with pytest.raises(InvalidInputError):
        store.save_embedding("img0", "v", embedding[0], (1, 1), (1, 1))
    with pytest.raises(InvalidInputError):
        store.save_embedding("img0", "v", embedding.astype(np.int32), (1, 1), (1, 1))


def test_objects_of_other_subsystems(store_root: StoreRoot) -> None:
    store = _store(store_root)
    store.put_object("models/v1/card.json", b"{}")
    store.put_object("models/v2/card.json", b"[]")
    assert store.list_objects("models") == ["models/v1/card.json", "models/v2/card.json"]
    assert store.get_object("models/v2/card.json") == b"[]"
    with pytest.raises(NotFoundError):
        store.get_object("models/v3/card.json")
    for key in ["masks/stage=1/x.parquet", "_commits/0000000001.json", "images/x", "../x"]:
        with pytest.raises(UnsafeKeyError):
            store.put_object(key, b"x")


def test_load_image_reads_and_checks_the_file(tmp_path: Path, store_root: StoreRoot) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    if store_root.kind == "s3":
        uri = f"{store_root.root}/source/a.png"
        MaskStore(store_root.root, endpoint_url=store_root.endpoint_url).location.put_bytes(
            "source/a.png", data
        )
    else:
        uri = str(tmp_path / "a.png")
        Path(uri).write_bytes(data)
    store = _store(store_root)
    store.add_images([ImageRecord(image_id_for(data), uri, W, H, sha256_hex(data))])
    np.testing.assert_array_equal(store.load_image(image_id_for(data)), pixels)
    store.add_images([ImageRecord("changed", uri, W, H, "0" * 64)])
    with pytest.raises(StorageError, match="changed since it was registered"):
        store.load_image("changed")


def test_a_custom_pyarrow_filesystem_is_used(tmp_path: Path) -> None:
    filesystem = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    store = MaskStore("data", filesystem=filesystem)
    store.add_images([_image(0)])
    store.write_masks(_records("img0", 2), stage=1, round=0, run_id="run-a")
    assert sorted(os.listdir(tmp_path)) == ["data"]
    assert MaskStore("data", filesystem=filesystem).count_masks() == 2


def test_errors_share_one_root() -> None:
    assert issubclass(RleError, DataEngineError) and issubclass(NotFoundError, KeyError)
