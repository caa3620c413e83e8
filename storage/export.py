"""Export the store as COCO instances or SA-1B per-image JSON, and import images with COCO masks.

COCO export (one JSON file): ``images`` get integer ids 1..N in ``image_id`` order over all
registered images (stable while no image is added), ``annotations`` ids 1..M in (image_id,
mask_id) order, one category ``{"id": 1, "name": "object"}``, segmentation as compressed RLE
``{"size": [h, w], "counts": str}``, ``bbox`` XYWH pixels, ``iscrowd`` 0. Each entry also carries
the store's own ids and provenance (``store_image_id``, ``mask_id``, ``stage``, ``round``,
``source``, ``predicted_iou``, ...), which COCO tools ignore.

SA-1B export (a folder): one ``<image_id>.json`` per image, ``{"image": {image_id, width, height,
file_name}, "annotations": [{id, segmentation, bbox, area, predicted_iou, stability_score,
crop_box, point_coords}]}`` with the same integer ids as the COCO export; ``file_name`` is the
image file's base name. Human masks have ``predicted_iou``/``stability_score``/``crop_box`` null.

Import: images under a folder or S3 prefix are decoded (a broken file stops the import before
anything is written, or with ``quarantine=True`` is recorded in the store's quarantine,
:mod:`storage.quarantine`, while the others are imported), identified by content hash and
registered in ``split``. COCO annotations
(compressed RLE, uncompressed RLE or polygons; ``iscrowd`` regions skipped) are matched to files
by relative path, else by base name, and stored as stage 1, round 0, source ``manual`` masks with
run id ``coco-import``. For ``split="holdout"`` those masks are the holdout's ground truth: same
stage, round and source, on holdout images (filter with ``MaskStore.masks(split="holdout")``).
Mask ids depend only on image content and mask, so importing again adds nothing.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from storage.errors import ImageError, InvalidInputError, RleError, UnsafeKeyError
from storage.images import decode_image, image_id_for, scan_images, sha256_hex
from storage.location import read_uri, write_uri_atomic
from storage.mask_store import ImageRecord, MaskRecord, MaskStore
from storage.quarantine import UNSAFE_KEY_REASON, QuarantineEntry, quarantine_image
from storage.rle import Rle, validate
from storage.schema import stored_float

__all__ = [
    "IMPORT_RUN_ID",
    "ExportResult",
    "ImportResult",
    "coco_dict",
    "export_coco",
    "export_sa1b",
    "import_dataset",
]

IMPORT_RUN_ID = "coco-import"
_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}

Progress = Callable[[Iterable[Any]], Iterable[Any]]


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: images, annotations (masks) and files."""

    images: int
    annotations: int
    files: int


@dataclass(frozen=True)
class ImportResult:
    """What an import found and added.

    ``images_found`` counts every image file listed; each was either read and registered (new
    or already there) or quarantined, so ``images_processed + images_quarantined ==
    images_found``. ``quarantined`` lists this import's refused files (new entries and entries
    recorded by an earlier import alike).
    """

    images_found: int
    images_added: int
    masks_added: int
    masks_skipped: int
    annotations_unmatched: int
    annotations_crowd: int
    quarantined: tuple[QuarantineEntry, ...] = ()

    @property
    def images_quarantined(self) -> int:
        """Image files refused by this import."""
        return len(self.quarantined)

    @property
    def images_processed(self) -> int:
        """Image files read, decoded and registered (or found registered already)."""
        return self.images_found - self.images_quarantined


def coco_dict(
    store: MaskStore, *, split: str | None = None, stage: int | None = None
) -> dict[str, Any]:
    """The COCO instances dict of the store's committed masks (see the module docstring)."""
    numbers = _image_numbers(store)
    images = store.images(split)
    table = store.masks(stage=stage, split=split)
    rows = sorted(table.to_pylist(), key=lambda r: (r["image_id"], r["mask_id"]))
    return {
        "info": {
            "description": f"sam-data-engine export of {store.location.root}",
            "date_created": datetime.now(UTC).isoformat(),
        },
        "licenses": [],
        "categories": [_CATEGORY],
        "images": [_coco_image(numbers[im.image_id], im) for im in images],
        "annotations": [
            _coco_annotation(n, numbers[row["image_id"]], row) for n, row in enumerate(rows, 1)
        ],
    }


def export_coco(
    store: MaskStore,
    out: str,
    *,
    split: str | None = None,
    stage: int | None = None,
    endpoint_url: str | None = None,
) -> ExportResult:
    """Write the COCO instances JSON to ``out`` (local path or s3:// URI), atomically."""
    data = coco_dict(store, split=split, stage=stage)
    write_uri_atomic(out, json.dumps(data).encode("utf-8"), endpoint_url=endpoint_url)
    return ExportResult(len(data["images"]), len(data["annotations"]), 1)


def export_sa1b(
    store: MaskStore,
    out_dir: str,
    *,
    split: str | None = None,
    stage: int | None = None,
    endpoint_url: str | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write one SA-1B JSON per image to ``out_dir`` (folder or s3:// prefix)."""
    coco = coco_dict(store, split=split, stage=stage)
    by_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    images: Iterable[dict[str, Any]] = coco["images"]
    if progress is not None:
        images = progress(images)
    for image in images:
        doc = {
            "image": {
                "image_id": image["id"],
                "width": image["width"],
                "height": image["height"],
                "file_name": image["file_name"],
            },
            "annotations": [_sa1b_annotation(a) for a in by_image[image["id"]]],
        }
        target = _join(out_dir, f"{image['store_image_id']}.json")
        write_uri_atomic(target, json.dumps(doc).encode("utf-8"), endpoint_url=endpoint_url)
    return ExportResult(len(coco["images"]), len(coco["annotations"]), len(coco["images"]))


def import_dataset(
    store: MaskStore,
    images: str,
    *,
    coco: str | None = None,
    split: str = "pool",
    endpoint_url: str | None = None,
    progress: Progress | None = None,
    quarantine: bool = False,
    max_pixels: int = 64_000_000,
) -> ImportResult:
    """Register the images under ``images`` and, with ``coco``, their masks (idempotent).

    Raises :class:`ImageError` for an unreadable image (:class:`UnsafeKeyError` for an image
    listed under an unsafe key) and :class:`InvalidInputError` for a COCO file that does not
    fit the images, before anything is written. With ``quarantine``, such images are recorded
    in the store's quarantine instead (never twice) and the others are imported; their COCO
    annotations count as unmatched.
    """
    scan = scan_images(images, endpoint_url=endpoint_url)
    if scan.rejected and not quarantine:
        raise UnsafeKeyError(f"image source {images!r}: {scan.rejected[0].message}")
    now = datetime.now(UTC)
    refused = [
        QuarantineEntry(r.key, UNSAFE_KEY_REASON, r.message, None, now) for r in scan.rejected
    ]
    uris: list[str] = []
    records: list[ImageRecord] = []
    loop: Iterable[str] = progress(scan.uris) if progress is not None else scan.uris
    for uri in loop:
        data = read_uri(uri, endpoint_url=endpoint_url)
        try:
            pixels = decode_image(data, name=uri, max_pixels=max_pixels)
        except ImageError as err:
            if not quarantine:
                raise
            refused.append(QuarantineEntry(uri, err.reason, str(err), sha256_hex(data), now))
            continue
        height, width = pixels.shape[:2]
        uris.append(uri)
        records.append(
            ImageRecord(image_id_for(data), uri, width, height, sha256_hex(data), split=split)
        )
    masks: list[MaskRecord] = []
    unmatched = crowd = 0
    if coco is not None:
        document = _load_coco(coco, endpoint_url)
        masks, unmatched, crowd = _coco_masks(document, coco, images, uris, records)
    for entry in refused:
        quarantine_image(
            store, entry.key, reason=entry.reason, message=entry.message, sha256=entry.sha256
        )
    added = store.add_images(records)
    masks_added = skipped = 0
    if masks:
        info = store.write_masks(masks, stage=1, round=0, run_id=IMPORT_RUN_ID)
        masks_added, skipped = info.counts["masks"], info.counts["skipped"]
    found = len(scan.uris) + len(scan.rejected)
    return ImportResult(found, added, masks_added, skipped, unmatched, crowd, tuple(refused))


def _image_numbers(store: MaskStore) -> dict[str, int]:
    return {image_id: n for n, image_id in enumerate(sorted(r.image_id for r in store.images()), 1)}


def _coco_image(number: int, image: ImageRecord) -> dict[str, Any]:
    return {
        "id": number,
        "file_name": _basename(image.uri),
        "width": image.width,
        "height": image.height,
        "store_image_id": image.image_id,
        "uri": image.uri,
        "split": image.split,
    }


def _coco_annotation(number: int, image_number: int, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": number,
        "image_id": image_number,
        "category_id": _CATEGORY["id"],
        "segmentation": {"size": [row["height"], row["width"]], "counts": row["counts"]},
        "area": row["area"],
        "bbox": row["bbox"],
        "iscrowd": 0,
        "mask_id": row["mask_id"],
        "store_image_id": row["image_id"],
        "stage": row["stage"],
        "round": row["round"],
        "source": row["source"],
        "predicted_iou": stored_float(row["predicted_iou"]),
        "stability_score": stored_float(row["stability_score"]),
        "point_coords": row["point_coords"],
        "crop_box": row["crop_box"],
        "model_version": row["model_version"],
        "annotator": row["annotator"],
        "run_id": row["run_id"],
    }


def _sa1b_annotation(ann: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "segmentation", "bbox", "area", "predicted_iou", "stability_score")
    out = {k: ann[k] for k in keys}
    out["crop_box"] = ann["crop_box"]
    out["point_coords"] = ann["point_coords"] if ann["point_coords"] is not None else []
    return out


def _load_coco(uri: str, endpoint_url: str | None) -> dict[str, Any]:
    try:
        document = json.loads(read_uri(uri, endpoint_url=endpoint_url))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"COCO file {uri!r} is not valid JSON: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise InvalidInputError(f"COCO file {uri!r} has no 'images' list")
    if not isinstance(document.get("annotations", []), list):
        raise InvalidInputError(f"COCO file {uri!r}: 'annotations' is not a list")
    return document


def _coco_masks(
    document: dict[str, Any],
    coco_uri: str,
    images_root: str,
    uris: list[str],
    records: list[ImageRecord],
) -> tuple[list[MaskRecord], int, int]:
    """Masks of the COCO annotations whose image is among ``records``; also unmatched, crowd."""
    by_relative, by_name = _file_index(images_root, uris, records)
    matched: dict[Any, ImageRecord] = {}
    for i, entry in enumerate(document["images"]):
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise InvalidInputError(f"{coco_uri}: images[{i}] needs 'id' and 'file_name'")
        name = str(entry["file_name"]).replace("\\", "/").lstrip("/")
        while name.startswith("./"):
            name = name[2:]
        record = by_relative.get(name)
        if record is None:
            candidates = by_name.get(posixpath.basename(name), [])
            record = candidates[0] if len(candidates) == 1 else None
        if record is None:
            continue
        if (entry.get("width"), entry.get("height")) != (record.width, record.height):
            raise InvalidInputError(
                f"{coco_uri}: images[{i}] {name!r} says {entry.get('width')}x"
                f"{entry.get('height')} but {record.uri} is {record.width}x{record.height}"
            )
        matched[entry["id"]] = record
    masks: list[MaskRecord] = []
    unmatched = crowd = 0
    for i, ann in enumerate(document.get("annotations", [])):
        name = f"{coco_uri}: annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "segmentation" not in ann:
            raise InvalidInputError(f"{name} needs 'image_id' and 'segmentation'")
        record = matched.get(ann["image_id"])
        if record is None:
            unmatched += 1
            continue
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        segmentation = _segmentation_to_rle(ann["segmentation"], record, name)
        masks.append(MaskRecord(record.image_id, segmentation, 1, 0, "manual", IMPORT_RUN_ID))
    return masks, unmatched, crowd


def _file_index(
    images_root: str, uris: list[str], records: list[ImageRecord]
) -> tuple[dict[str, ImageRecord], dict[str, list[ImageRecord]]]:
    root = images_root.rstrip("/")
    if not root.startswith("s3://"):
        root = os.path.abspath(os.path.expanduser(root))
    by_relative: dict[str, ImageRecord] = {}
    by_name: dict[str, list[ImageRecord]] = {}
    for uri, record in zip(uris, records, strict=True):
        relative = uri[len(root) + 1 :] if uri.startswith(root + "/") else _basename(uri)
        by_relative[relative] = record
        by_name.setdefault(_basename(uri), []).append(record)
    return by_relative, by_name


def _segmentation_to_rle(segmentation: Any, image: ImageRecord, name: str) -> Rle:
    from pycocotools import mask as coco_mask

    h, w = image.height, image.width
    if isinstance(segmentation, dict):
        rle = validate(segmentation, name=f"{name}.segmentation")
        if rle["size"] != [h, w]:
            raise RleError(f"{name}.segmentation has size {rle['size']}; the image is [{h}, {w}]")
        return rle
    if isinstance(segmentation, list) and segmentation:
        polygons = []
        for j, poly in enumerate(segmentation):
            ok = isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
            if not ok or not all(isinstance(v, int | float) for v in poly):
                raise InvalidInputError(
                    f"{name}.segmentation[{j}]: expected a polygon [x1, y1, x2, y2, ...] "
                    "with at least 3 points"
                )
            polygons.append([float(v) for v in poly])
        merged = coco_mask.merge(coco_mask.frPyObjects(polygons, h, w))
        return {"size": [h, w], "counts": merged["counts"].decode("ascii")}
    raise InvalidInputError(
        f"{name}.segmentation is {type(segmentation).__name__}; expected an RLE dict or polygons"
    )


def _basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _join(folder: str, name: str) -> str:
    if folder.startswith("s3://"):
        return folder.rstrip("/") + "/" + name
    return os.path.join(folder, name)
