"""COCO import, COCO and SA-1B export: round trips through pycocotools, idempotent re-import."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from storage import rle
from storage.errors import ImageError, InvalidInputError
from storage.export import IMPORT_RUN_ID, coco_dict, export_coco, export_sa1b, import_dataset
from storage.images import image_id_for
from storage.location import StorageLocation
from storage.mask_store import MaskRecord, MaskStore
from tests.fixtures.s3 import StoreRoot

H, W = 20, 30


def _png(seed: int, h: int = H, w: int = W) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


class Source:
    """Images (and a COCO file) under a folder or S3 prefix, written for one test."""

    def __init__(self, root: StoreRoot, tmp_path: Path) -> None:
        self.endpoint_url = root.endpoint_url
        if root.kind == "s3":
            self.base = root.root.rsplit("/", 1)[0] + "/source"
        else:
            self.base = str(tmp_path / "source")
        self.location = StorageLocation(self.base, endpoint_url=self.endpoint_url)

    def put(self, key: str, data: bytes) -> str:
        self.location.put_bytes(key, data)
        return self.location.uri(key)


@pytest.fixture
def source(store_root: StoreRoot, tmp_path: Path) -> Source:
    return Source(store_root, tmp_path)


def _coco_file(source: Source) -> dict[str, object]:
    source.put("images/a.png", _png(1))
    source.put("images/sub/b.png", _png(2))
    source.put("images/c.png", _png(3, h=H + 1))
    rle_a = rle.encode(_mask(2, 8, 3, 9)[None])[0]
    uncompressed_b = {"size": [H, W], "counts": [0, 5, H * W - 5]}
    coco = {
        "images": [
            {"id": 10, "file_name": "a.png", "width": W, "height": H},
            {"id": 11, "file_name": "b.png", "width": W, "height": H},  # by base name
            {"id": 12, "file_name": "missing.png", "width": W, "height": H},
            {"id": 13, "file_name": "c.png", "width": W, "height": H + 1},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "segmentation": rle_a, "iscrowd": 0},
            {"id": 2, "image_id": 10, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]], "iscrowd": 0},
            {"id": 3, "image_id": 11, "segmentation": uncompressed_b, "iscrowd": 0},
            {"id": 4, "image_id": 11, "segmentation": rle_a, "iscrowd": 1},
            {"id": 5, "image_id": 12, "segmentation": rle_a, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    source.put("coco.json", json.dumps(coco).encode())
    return coco


def test_import_registers_images_and_masks_once(store_root: StoreRoot, source: Source) -> None:
    _coco_file(source)
    store = MaskStore(store_root.root, endpoint_url=store_root.endpoint_url)
    images, coco = f"{source.base}/images", f"{source.base}/coco.json"
    result = import_dataset(store, images, coco=coco, endpoint_url=source.endpoint_url)
    assert (result.images_found, result.images_added) == (3, 3)
    assert (result.masks_added, result.masks_skipped) == (3, 0)
    assert (result.annotations_unmatched, result.annotations_crowd) == (1, 1)
    again = import_dataset(store, images, coco=coco, endpoint_url=source.endpoint_url)
    assert (again.images_added, again.masks_added, again.masks_skipped) == (0, 0, 3)
    assert store.count_masks() == 3 and len(store.commits()) == 1

    id_a = image_id_for(_png(1))
    assert store.get_image(id_a).uri == f"{images}/a.png" and store.get_image(id_a).width == W
    records = store.mask_records(image_id=id_a)
    assert {(r.stage, r.round, r.source, r.run_id) for r in records} == {
        (1, 0, "manual", IMPORT_RUN_ID)
    }
    masks = {r.area: rle.decode([r.segmentation])[0] for r in records}
    np.testing.assert_array_equal(masks[36], _mask(2, 8, 3, 9))  # the RLE, 6x6
    assert set(masks) == {36, 25}  # the polygon covers a 5x5 block of pixel centres
    [b_mask] = store.mask_records(image_id=image_id_for(_png(2)))
    assert b_mask.area == 5 and b_mask.bbox == [0.0, 0.0, 1.0, 5.0]


def test_import_into_the_holdout(store_root: StoreRoot, source: Source) -> None:
    _coco_file(source)
    store = MaskStore(store_root.root, endpoint_url=store_root.endpoint_url)
    import_dataset(
        store,
        f"{source.base}/images",
        coco=f"{source.base}/coco.json",
        split="holdout",
        endpoint_url=source.endpoint_url,
    )
    assert len(store.images("holdout")) == 3 and store.images("pool") == []
    assert store.count_masks(split="holdout") == 3
    with pytest.raises(InvalidInputError, match="already in split 'holdout'"):
        import_dataset(store, f"{source.base}/images", endpoint_url=source.endpoint_url)


def test_import_rejects_bad_files_before_writing(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(1))
    (folder / "broken.png").write_bytes(_png(2)[:50])
    store = MaskStore(str(tmp_path / "store"))
    with pytest.raises(ImageError, match=r"broken\.png"):
        import_dataset(store, str(folder))
    assert store.images() == []
    (folder / "broken.png").unlink()
    wrong_size = {"images": [{"id": 1, "file_name": "a.png", "width": 99, "height": H}]}
    (tmp_path / "c.json").write_text(json.dumps(wrong_size))
    with pytest.raises(InvalidInputError, match="99x20"):
        import_dataset(store, str(folder), coco=str(tmp_path / "c.json"))
    bad_rle = {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
        "annotations": [{"image_id": 1, "segmentation": {"size": [H, W], "counts": "0`"}}],
    }
    (tmp_path / "c.json").write_text(json.dumps(bad_rle))
    with pytest.raises(InvalidInputError, match=r"annotations\[0\]"):
        import_dataset(store, str(folder), coco=str(tmp_path / "c.json"))
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        import_dataset(store, str(folder), coco=str(tmp_path / "c.json"))
    assert store.images() == [] and store.count_masks() == 0


def _filled_store(root: StoreRoot, source: Source) -> MaskStore:
    _coco_file(source)
    store = MaskStore(root.root, endpoint_url=root.endpoint_url)
    import_dataset(
        store,
        f"{source.base}/images",
        coco=f"{source.base}/coco.json",
        endpoint_url=source.endpoint_url,
    )
    id_a = image_id_for(_png(1))
    auto = MaskRecord(
        id_a,
        rle.encode(_mask(10, 15, 20, 28)[None])[0],
        3,
        0,
        "auto",
        "amg-1",
        predicted_iou=0.93,
        stability_score=0.97,
        point_coords=[[24.0, 12.0]],
        crop_box=[0, 0, W, H],
        model_version="tiny-r1",
    )
    store.write_masks([auto], stage=3, round=0, run_id="amg-1")
    return store


def test_coco_export_loads_in_pycocotools(
    store_root: StoreRoot, source: Source, tmp_path: Path
) -> None:
    store = _filled_store(store_root, source)
    out = tmp_path / "coco.json"
    result = export_coco(store, str(out))
    assert (result.images, result.annotations) == (3, 4)
    coco = COCO(str(out))
    assert coco.loadCats(coco.getCatIds()) == [
        {"id": 1, "name": "object", "supercategory": "object"}
    ]
    table = store.masks()
    by_mask = {row["mask_id"]: row for row in table.to_pylist()}
    for ann in coco.loadAnns(coco.getAnnIds()):
        row = by_mask[ann["mask_id"]]
        expected = rle.decode([{"size": [row["height"], row["width"]], "counts": row["counts"]}])
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), expected[0])
        assert ann["area"] == row["area"] and ann["bbox"] == row["bbox"]
        image = coco.loadImgs(ann["image_id"])[0]
        assert image["store_image_id"] == row["image_id"]
    auto = [a for a in coco.dataset["annotations"] if a["source"] == "auto"]
    assert auto[0]["predicted_iou"] == 0.93 and auto[0]["stage"] == 3
    only_auto = coco_dict(store, stage=3)
    assert len(only_auto["annotations"]) == 1 and len(only_auto["images"]) == 3


def test_sa1b_export_one_file_per_image(
    store_root: StoreRoot, source: Source, tmp_path: Path
) -> None:
    store = _filled_store(store_root, source)
    out = tmp_path / "sa1b"
    result = export_sa1b(store, str(out))
    assert result.files == 3
    id_a = image_id_for(_png(1))
    doc = json.loads((out / f"{id_a}.json").read_text())
    assert set(doc) == {"image", "annotations"}
    assert doc["image"]["file_name"] == "a.png"
    assert (doc["image"]["width"], doc["image"]["height"]) == (W, H)
    assert isinstance(doc["image"]["image_id"], int)
    keys = {
        "id",
        "segmentation",
        "bbox",
        "area",
        "predicted_iou",
        "stability_score",
        "crop_box",
        "point_coords",
    }
    assert all(set(a) == keys for a in doc["annotations"])
    auto = [a for a in doc["annotations"] if a["predicted_iou"] is not None]
    assert auto[0]["point_coords"] == [[24.0, 12.0]] and auto[0]["crop_box"] == [0, 0, W, H]
    assert auto[0]["bbox"] == [20.0, 10.0, 8.0, 5.0]
    decoded = rle.decode([auto[0]["segmentation"]])[0]
    np.testing.assert_array_equal(decoded, _mask(10, 15, 20, 28))
    manual = [a for a in doc["annotations"] if a["predicted_iou"] is None]
    assert len(manual) == 2 and all(a["point_coords"] == [] for a in manual)
