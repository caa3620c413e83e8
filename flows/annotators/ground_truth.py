"""Ground-truth masks per image: what simulated annotators click towards, and the holdout truth.

Stored as one COCO instances JSON object under the storage root (``put_object``), with each
COCO image carrying the store's ``image_id`` in the field ``image_key`` so the file stays valid
COCO and maps back to the store without guessing from file names. Segmentations are COCO RLE
dicts (``counts`` as ``str``), boxes XYWH in pixels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from storage import rle as rle_codec
from storage.errors import InvalidInputError, NotFoundError

if TYPE_CHECKING:
    from storage.mask_store import ImageRecord, MaskStore

__all__ = ["GROUND_TRUTH_KEY", "GroundTruth"]

#: Where the built-in synthetic source keeps its ground truth (an object key under the root).
GROUND_TRUTH_KEY = "sources/synthetic/ground_truth.json"


class GroundTruth:
    """Ground-truth masks keyed by store ``image_id``; each image's masks are COCO RLEs."""

    def __init__(self, masks: Mapping[str, Sequence[rle_codec.Rle]]) -> None:
        self._masks: dict[str, list[rle_codec.Rle]] = {k: list(v) for k, v in masks.items()}

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._masks

    def __len__(self) -> int:
        return len(self._masks)

    @property
    def image_ids(self) -> list[str]:
        """Every image that has ground truth, in insertion order."""
        return list(self._masks)

    def rles(self, image_id: str) -> list[rle_codec.Rle]:
        """The image's ground-truth RLEs; :class:`NotFoundError` if it has none."""
        try:
            return list(self._masks[image_id])
        except KeyError:
            raise NotFoundError(f"image {image_id!r} has no ground truth") from None

    def masks(self, image_id: str) -> np.ndarray:
        """The image's ground-truth masks as bool ``(N, H, W)``."""
        return rle_codec.decode(self.rles(image_id))

    def subset(self, image_ids: Iterable[str]) -> GroundTruth:
        """Ground truth of only these images (each must have some)."""
        return GroundTruth({i: self.rles(i) for i in image_ids})

    def merged(self, other: GroundTruth) -> GroundTruth:
        """This ground truth plus ``other``'s (``other`` wins for shared image ids)."""
        return GroundTruth({**self._masks, **other._masks})

    # ------------------------------------------------------------------------- COCO round trip

    def to_coco(self, images: Sequence[ImageRecord]) -> dict[str, Any]:
        """A COCO instances dict for ``images`` (each must have ground truth)."""
        coco_images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for number, image in enumerate(images, start=1):
            rles = self.rles(image.image_id)
            coco_images.append(
                {
                    "id": number,
                    "image_key": image.image_id,
                    "file_name": image.uri.rsplit("/", 1)[-1],
                    "height": image.height,
                    "width": image.width,
                    "split": image.split,
                }
            )
            if not rles:
                continue
            areas, boxes = rle_codec.area(rles), rle_codec.to_bbox(rles)
            for rle, area, box in zip(rles, areas, boxes, strict=True):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": number,
                        "category_id": 1,
                        "segmentation": dict(rle),
                        "area": int(area),
                        "bbox": [float(v) for v in box],
                        "iscrowd": 0,
                    }
                )
        return {
            "images": coco_images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "object"}],
        }

    @classmethod
    def from_coco(
        cls, coco: Mapping[str, Any], *, image_ids: Mapping[str, str] | None = None
    ) -> GroundTruth:
        """Read a COCO instances dict.

        Args:
            coco: the COCO dict; segmentations must be RLE (``counts`` str or list).
            image_ids: file name -> store image id, for COCO files written by other tools; our
                own files carry ``image_key`` and need no map.

        Raises:
            InvalidInputError: an image that cannot be mapped to a store id, or polygon
                segmentations (not supported here).
        """
        number_to_key: dict[int, str] = {}
        sizes: dict[int, tuple[int, int]] = {}
        for image in coco.get("images", []):
            key = image.get("image_key")
            if key is None and image_ids is not None:
                key = image_ids.get(str(image.get("file_name", "")).rsplit("/", 1)[-1])
            if key is None:
                raise InvalidInputError(
                    f"COCO image {image.get('file_name')!r} has no image_key and is not among "
                    "the registered images"
                )
            number_to_key[int(image["id"])] = str(key)
            sizes[int(image["id"])] = (int(image["height"]), int(image["width"]))
        masks: dict[str, list[rle_codec.Rle]] = {key: [] for key in number_to_key.values()}
        for ann in coco.get("annotations", []):
            number = int(ann["image_id"])
            seg = ann.get("segmentation")
            if not isinstance(seg, Mapping) or "counts" not in seg:
                raise InvalidInputError(
                    f"COCO annotation {ann.get('id')!r}: segmentation must be RLE "
                    "{'size', 'counts'}; polygons are not supported"
                )
            rle = _as_compressed(seg, sizes[number], name=f"annotation {ann.get('id')!r}")
            masks[number_to_key[number]].append(rle)
        return cls(masks)

    def save(self, store: MaskStore, images: Sequence[ImageRecord], key: str) -> None:
        """Write the COCO file for ``images`` under the store's root at ``key``."""
        store.put_object(key, json.dumps(self.to_coco(images)).encode("utf-8"))

    @classmethod
    def load(cls, store: MaskStore, key: str) -> GroundTruth:
        """Read a COCO file written by :meth:`save`; :class:`NotFoundError` if absent."""
        return cls.from_coco(json.loads(store.get_object(key)))


def _as_compressed(seg: Mapping[str, Any], size: tuple[int, int], *, name: str) -> rle_codec.Rle:
    counts = seg["counts"]
    if isinstance(counts, list):  # uncompressed COCO RLE: counts are the runs themselves
        runs = np.asarray(counts, dtype=np.int64)
        h, w = size
        flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)
        if flat.size != h * w:
            raise InvalidInputError(f"{name}: runs sum to {flat.size}, expected {h * w}")
        mask = flat.reshape(w, h).T[None]
        return rle_codec.encode(np.ascontiguousarray(mask))[0]
    return rle_codec.validate({"size": list(seg["size"]), "counts": counts}, name=name)
