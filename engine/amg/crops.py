"""Crop boxes for the zoomed passes, and the geometry that maps crop results back to the image.

Boxes here are XYXY in pixels with the end **exclusive** for crop boxes (``[x0, y0, x1, y1]``,
so the crop is ``image[y0:y1, x0:x1]``). Mask boxes (from :mod:`engine.amg.boxes`) are XYXY with
the end **inclusive** (the last foreground column and row), as in SAM's public generator; NMS
and the crop-edge test use them in that form so that they decide exactly as the original does.

Layer 0 is the whole image; layer ``i >= 1`` tiles it with ``2**i x 2**i`` overlapping crops,
the overlap being ``overlap_ratio`` of the image's short side at layer 1 and halving with each
layer (the SAM paper's 2x2 and 4x4 zoomed crops).
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np

from storage.errors import ConfigError

__all__ = [
    "box_near_crop_edge",
    "crop_box_xywh",
    "generate_crop_boxes",
]


def generate_crop_boxes(
    image_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (XYXY, end exclusive, pixels) of every layer and the layer of each.

    Args:
        image_size: ``(height, width)`` of the image in pixels.
        n_layers: number of zoomed layers beyond the whole image (0: only the whole image).
        overlap_ratio: overlap between neighbouring layer-1 crops as a fraction of the short
            side; deeper layers scale it by ``2 / crops_per_side``.

    Returns:
        ``(boxes, layers)``; the whole image comes first, then each layer's crops ordered by
        x0 and, for one x0, by y0. Crops that would start past the image's edge (deep layers
        on images a few pixels wide) are left out, so every box holds pixels.
    """
    height, width = image_size
    if n_layers < 0:
        raise ConfigError(f"crop_n_layers is {n_layers}; expected 0 or more")
    if not 0.0 <= overlap_ratio < 1.0:
        raise ConfigError(f"crop_overlap_ratio is {overlap_ratio}; expected a value in [0, 1)")
    boxes = [[0, 0, width, height]]
    layers = [0]
    short_side = min(height, width)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w = _crop_length(width, per_side, overlap)
        crop_h = _crop_length(height, per_side, overlap)
        x_starts = [int((crop_w - overlap) * i) for i in range(per_side)]
        y_starts = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(x_starts, y_starts):
            if x0 >= width or y0 >= height:
                # A deep layer on a tiny image: rounding the crop length up can push the last
                # crops past the edge; they would hold no pixel.
                continue
            boxes.append([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)])
            layers.append(layer)
    return boxes, layers


def _crop_length(full: int, n_crops: int, overlap: int) -> int:
    # n crops of length L overlapping by `overlap` cover (n * L - (n - 1) * overlap) pixels.
    return math.ceil((overlap * (n_crops - 1) + full) / n_crops)


def crop_box_xywh(crop_box: list[int]) -> list[int]:
    """``[x0, y0, x1, y1]`` (end exclusive) -> ``[x0, y0, w, h]`` in pixels."""
    x0, y0, x1, y1 = crop_box
    return [x0, y0, x1 - x0, y1 - y0]


def box_near_crop_edge(
    boxes_xyxy: np.ndarray,
    crop_box: list[int],
    image_box: list[int],
    atol: float = 20.0,
) -> np.ndarray:
    """Which mask boxes touch an inner edge of their crop: ``(N,)`` bool.

    ``boxes_xyxy`` are in image pixels (end inclusive, as from :mod:`engine.amg.boxes`). A box
    side within ``atol`` pixels of the crop's matching side counts, unless that side is also
    within ``atol`` of the image's border: a mask cut by the crop's edge is a fragment of an
    object that a larger crop sees whole, while one at the image border is not. The crop box
    and image box are compared as given (end exclusive), as SAM's public generator does.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    crop = np.asarray(crop_box, dtype=np.float32)[None, :]
    image = np.asarray(image_box, dtype=np.float32)[None, :]
    near_crop = np.abs(boxes - crop) <= atol
    near_image = np.abs(boxes - image) <= atol
    return np.any(near_crop & ~near_image, axis=1)
