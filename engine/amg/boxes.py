"""Boxes around binary masks, in the convention SAM's generator uses for NMS.

``masks_to_boxes_xyxy`` gives XYXY with the end **inclusive** (x1 is the last foreground column),
so a one-pixel mask has a box of zero width; NMS on these boxes matches the original's choices.
The stored ``bbox`` is the tight COCO box (XYWH, ``w = x1 - x0 + 1``), see
:func:`xyxy_inclusive_to_xywh`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["masks_to_boxes_xyxy", "xyxy_inclusive_to_xywh"]


def masks_to_boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """Boxes around boolean masks ``(N, H, W)``: ``(N, 4)`` int64 XYXY, end inclusive, pixels.

    An empty mask gets ``[0, 0, 0, 0]``.
    """
    n, h, w = masks.shape
    if n == 0:
        return np.zeros((0, 4), dtype=np.int64)
    rows: np.ndarray = np.any(masks, axis=2)  # (N, H)
    cols: np.ndarray = np.any(masks, axis=1)  # (N, W)
    top = rows.argmax(axis=1)
    bottom = h - 1 - rows[:, ::-1].argmax(axis=1)
    left = cols.argmax(axis=1)
    right = w - 1 - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([left, top, right, bottom], axis=1).astype(np.int64)
    boxes[~np.any(rows, axis=1)] = 0
    return boxes


def xyxy_inclusive_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """End-inclusive XYXY ``(N, 4)`` of non-empty masks -> tight XYWH ``(N, 4)`` float64 (w, h
    count pixels). An inclusive box cannot tell an empty mask from one pixel at (0, 0), so
    callers drop empty masks first (the generator never returns them)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = boxes.copy()
    out[:, 2:] = boxes[:, 2:] - boxes[:, :2] + 1
    return out
