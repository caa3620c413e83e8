"""The simulated annotator of interactive-segmentation benchmarks: where the next click goes.

The standard protocol (Xu et al. 2016, "Deep Interactive Object Selection"; used by RITM and the
SAM paper) clicks at the point farthest from the boundary of the largest error region: the click
lands in the "middle" of the biggest mistake, like a careful human would place it. A click in a
false-negative region is positive (foreground), in a false-positive region negative.

Masks are boolean ``(H, W)`` arrays in one frame; clicks are ``(x, y)`` pixel coordinates (column,
row) in that frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["Click", "next_click"]


@dataclass(frozen=True)
class Click:
    """One simulated click: ``x``/``y`` in pixels (column, row), ``positive`` = foreground."""

    x: int
    y: int
    positive: bool


def next_click(pred: np.ndarray | None, gt: np.ndarray) -> Click | None:
    """The click a careful annotator makes to correct ``pred`` towards ``gt``.

    Args:
        pred: the current predicted mask ``(H, W)`` bool, or None before any click (then the whole
            object is the error region and the first click lands at its centre).
        gt: the ground-truth mask ``(H, W)`` bool.

    Returns:
        The click at the pixel farthest from the boundary of the largest connected error region
        (false negatives and false positives are separate regions; the image border counts as a
        boundary), or None when ``pred`` equals ``gt``.
    """
    gt = np.asarray(gt, dtype=bool)
    pred = np.zeros_like(gt) if pred is None else np.asarray(pred, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"next_click: pred has shape {pred.shape} but gt has {gt.shape}")
    best: tuple[int, float, int, int, bool] | None = None  # (area, depth, x, y, positive)
    for error, positive in ((gt & ~pred, True), (pred & ~gt, False)):
        region = _largest_region(error)
        if region is None:
            continue
        area, component = region
        depth, x, y = _deepest_point(component)
        if best is None or (area, depth) > (best[0], best[1]):
            best = (area, depth, x, y, positive)
    if best is None:
        return None
    return Click(x=best[2], y=best[3], positive=best[4])


def _largest_region(error: np.ndarray) -> tuple[int, np.ndarray] | None:
    """The largest 8-connected component of ``error``: (area in pixels, its mask)."""
    if not error.any():
        return None
    n, labels, stats, _ = cv2.connectedComponentsWithStats(error.astype(np.uint8), connectivity=8)
    areas = stats[1:n, cv2.CC_STAT_AREA]
    k = int(np.argmax(areas)) + 1
    return int(areas[k - 1]), labels == k


def _deepest_point(region: np.ndarray) -> tuple[float, int, int]:
    """(distance to the boundary in pixels, x, y) of the region pixel farthest from its edge."""
    # A zero border makes the image edge a boundary too: otherwise a region touching the edge
    # would pull clicks onto the outermost pixels.
    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    flat = int(np.argmax(dist))
    y, x = divmod(flat, dist.shape[1])
    return float(dist[y, x]), int(x), int(y)
