"""Small-region clean-up: fill small holes and drop small islands of a mask (SAM paper,
"we remove holes and islands smaller than 100 pixels"), then NMS again.

Regions are 8-connected components (OpenCV). ``holes`` fills every background component with
fewer than ``area_thresh`` pixels; ``islands`` drops every foreground component with fewer than
``area_thresh`` pixels, keeping the largest one if all are small. Both report whether they
changed the mask, because the second NMS prefers masks that needed no clean-up.

:func:`clean_mask` gives the same result as running both on the whole image but labels only the
mask's bounding box plus a one-pixel ring when that is provably the same (see its docstring),
which is most of the time and much cheaper for small masks on large images.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from engine.amg.boxes import masks_to_boxes_xyxy
from engine.amg.nms import nms
from storage import rle as rle_codec
from storage.errors import ConfigError
from storage.rle import Rle

__all__ = ["clean_mask", "clean_up_masks", "remove_small_regions"]


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Fill small holes (``mode="holes"``) or drop small islands (``mode="islands"``) of a
    boolean ``(H, W)`` mask; returns the new mask and whether it changed."""
    if mode not in ("holes", "islands"):
        raise ConfigError(f"mode is {mode!r}; expected 'holes' or 'islands'")
    fill_holes = mode == "holes"
    working = (mask ^ fill_holes).astype(np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the other class
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    if fill_holes:
        # Label 0 is the mask itself; small background components join it.
        return np.isin(labels, np.concatenate(([0], small))), True
    keep = np.setdiff1d(np.arange(1, n_labels), small)
    if keep.size == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, keep), True


def clean_mask(mask: np.ndarray, area_thresh: float) -> tuple[np.ndarray, bool]:
    """Fill holes, then drop islands, smaller than ``area_thresh`` pixels; returns the mask
    (a new array when changed) and whether it changed.

    Works on the mask's bounding box B plus a one-pixel ring when every background slab
    outside B (above, below, left, right of it) has at least ``area_thresh`` pixels: then any
    background component that leaves B contains a ring pixel and a whole slab, so it is never a
    small hole, and every other component lies inside B with the same pixels as in the image.
    Islands lie inside B by definition. Otherwise (a mask spanning nearly the whole image, an
    empty mask) it labels the whole image.
    """
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0 or area_thresh <= 0:
        return _clean_whole(mask, area_thresh)
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    slabs = [y0 * w, (h - y1) * w, x0 * (y1 - y0), (w - x1) * (y1 - y0)]
    if any(0 < s < area_thresh for s in slabs):
        return _clean_whole(mask, area_thresh)
    py0, py1, px0, px1 = max(y0 - 1, 0), min(y1 + 1, h), max(x0 - 1, 0), min(x1 + 1, w)
    window = mask[py0:py1, px0:px1]
    padded = (py0 < y0, py1 > y1, px0 < x0, px1 > x1)  # top, bottom, left, right
    filled, holes_changed = _fill_inner_holes(window, area_thresh, padded)
    cleaned, islands_changed = remove_small_regions(filled, area_thresh, "islands")
    if not (holes_changed or islands_changed):
        return mask, False
    out = mask.copy()
    out[py0:py1, px0:px1] = cleaned
    return out, True


def _fill_inner_holes(
    window: np.ndarray, area_thresh: float, padded: tuple[bool, bool, bool, bool]
) -> tuple[np.ndarray, bool]:
    """Fill small background components of ``window`` that touch none of its padded sides
    (the ring outside the mask's box, whose components are never small)."""
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(
        (~window).astype(np.uint8), connectivity=8
    )
    top, bottom, left, right = padded
    ring = [
        line
        for line, is_ring in (
            (labels[0, :], top),
            (labels[-1, :], bottom),
            (labels[:, 0], left),
            (labels[:, -1], right),
        )
        if is_ring
    ]
    outer = np.zeros(n_labels, dtype=bool)
    for line in ring:
        outer[line] = True
    outer[0] = True  # label 0 is the mask itself
    small = np.flatnonzero((stats[:, cv2.CC_STAT_AREA] < area_thresh) & ~outer)
    if small.size == 0:
        return window, False
    return np.isin(labels, np.concatenate(([0], small))), True


def _clean_whole(mask: np.ndarray, area_thresh: float) -> tuple[np.ndarray, bool]:
    filled, holes_changed = remove_small_regions(mask, area_thresh, "holes")
    cleaned, islands_changed = remove_small_regions(filled, area_thresh, "islands")
    return cleaned, holes_changed or islands_changed


def clean_up_masks(
    rles: Sequence[Rle], min_area: float, nms_thresh: float
) -> tuple[np.ndarray, list[Rle], np.ndarray]:
    """Clean every mask, then NMS preferring masks the clean-up left unchanged.

    Masks are decoded one at a time, so memory holds one full-resolution mask. Returns the kept
    indices into ``rles`` (in NMS order), their RLEs after clean-up, and their boxes (XYXY, end
    inclusive, pixels).
    """
    n = len(rles)
    if n == 0:
        return np.zeros(0, dtype=np.int64), [], np.zeros((0, 4), dtype=np.int64)
    new_rles: list[Rle] = []
    boxes = np.zeros((n, 4), dtype=np.int64)
    unchanged = np.zeros(n, dtype=np.float32)
    for i, rle in enumerate(rles):
        mask = rle_codec.decode([rle])[0]
        cleaned, changed = clean_mask(mask, min_area)
        boxes[i] = masks_to_boxes_xyxy(cleaned[None])[0]
        unchanged[i] = 0.0 if changed else 1.0
        new_rles.append(rle_codec.encode(cleaned[None])[0] if changed else rle)
    keep = nms(torch.from_numpy(boxes), torch.from_numpy(unchanged), nms_thresh).numpy()
    return keep, [new_rles[i] for i in keep], boxes[keep]
