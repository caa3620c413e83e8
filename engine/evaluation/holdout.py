"""Holdout images with ground truth, as :class:`EvalSample` iterators, from three places.

- :func:`store_holdout`: the ``holdout`` split of a mask store (images and their masks);
- :func:`coco_holdout`: a COCO instances file (RLE or polygon segmentations) and an image folder;
- :func:`synthetic_holdout`: scenes from :mod:`engine.synthetic` on a seed of its own.

Each is lazy: an image is read only when the evaluation reaches it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.evaluation.interactive import EvalSample
from storage.errors import ImageError, InvalidInputError, NotFoundError

__all__ = ["coco_holdout", "store_holdout", "synthetic_holdout"]


def store_holdout(
    store: Any, *, as_of: int | None = None, limit: int | None = None
) -> Iterator[EvalSample]:
    """The holdout split of ``store`` (a ``MaskStore``): every holdout image with masks.

    Raises:
        NotFoundError: the store has no masks on holdout images (at ``as_of``).
    """
    if store.count_masks(split="holdout", as_of=as_of) == 0:
        raise NotFoundError(
            f"no masks on holdout images in {store}; register holdout images "
            "(split='holdout') and their ground-truth masks first"
        )
    for n, (image_id, _ids, masks) in enumerate(
        store.iter_image_masks(split="holdout", as_of=as_of)
    ):
        if limit is not None and n >= limit:
            return
        yield EvalSample(image=store.load_image(image_id), masks=masks, image_id=image_id)


def coco_holdout(
    images_dir: str | Path, coco_json: str | Path, *, limit: int | None = None
) -> Iterator[EvalSample]:
    """Images of a COCO instances file, read from ``images_dir`` by their ``file_name``.

    Segmentations may be RLE (compressed or not) or polygons; crowd annotations are skipped, as
    the interactive benchmarks do.

    Raises:
        InvalidInputError: the file is not COCO instances JSON or has no annotations.
        ImageError: an image file is missing or unreadable.
    """
    from storage.images import decode_image
    from storage.rle import decode, validate

    path = Path(coco_json)
    try:
        coco = json.loads(path.read_text())
        images = {int(im["id"]): im for im in coco["images"]}
        annotations = coco["annotations"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InvalidInputError(
            f"{path} is not a COCO instances file (images, annotations): {err}"
        ) from None
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in annotations:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
    if not by_image:
        raise InvalidInputError(f"{path} has no non-crowd annotations to evaluate on")
    for n, image_id in enumerate(sorted(by_image)):
        if limit is not None and n >= limit:
            return
        info = images.get(image_id)
        if info is None:
            raise InvalidInputError(f"{path}: annotations name image id {image_id} not in images")
        file = Path(images_dir) / str(info["file_name"])
        try:
            pixels = decode_image(file.read_bytes(), name=str(file))
        except OSError as err:
            raise ImageError(f"cannot read holdout image {file}: {err}") from None
        h, w = pixels.shape[:2]
        rles = [
            validate(_to_rle(a["segmentation"], h, w), name=f"{path} annotation {a.get('id')}")
            for a in by_image[image_id]
        ]
        yield EvalSample(image=pixels, masks=decode(rles), image_id=str(image_id))


def synthetic_holdout(
    n_images: int, *, seed: int, size: tuple[int, int] = (256, 256)
) -> Iterator[EvalSample]:
    """``n_images`` synthetic scenes of the dataset ``seed`` (keep it apart from training seeds)."""
    from engine.synthetic import generate_scene, scene_rng

    for i in range(n_images):
        scene = generate_scene(scene_rng(seed, i), size)
        yield EvalSample(image=scene.image, masks=scene.masks, image_id=f"synthetic-{seed}-{i}")


def _to_rle(segmentation: Any, h: int, w: int) -> dict[str, Any]:
    """A COCO segmentation (RLE dict or polygon list) as an RLE dict of size ``[h, w]``."""
    if isinstance(segmentation, dict):
        return segmentation
    from pycocotools import mask as coco_mask

    if not isinstance(segmentation, list) or not segmentation:
        raise InvalidInputError(f"segmentation {str(segmentation)[:60]!r} is not RLE or polygons")
    polygons = [np.asarray(p, dtype=np.float64).tolist() for p in segmentation]
    merged = coco_mask.merge(coco_mask.frPyObjects(polygons, h, w))
    return {"size": [h, w], "counts": merged["counts"].decode("ascii")}
