"""Greedy non-maximum suppression by box IoU, without torchvision.

Same decisions as ``torchvision.ops.nms`` (which SAM's generator calls): boxes are XYXY, box
area is ``(x1 - x0) * (y1 - y0)``, a box is dropped when its IoU with a kept, higher-scored box
is **strictly** above the threshold, ties in score keep input order (a stable sort), arithmetic
in float32, and an IoU of 0 / 0 (two zero-area boxes) never suppresses. The kept indices come
back ordered by decreasing score.

The greedy pass visits boxes in score order and compares each kept box with the boxes after it
in one vectorised step, so memory stays O(N) rather than the O(N^2) of a full IoU matrix.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["box_iou_xyxy", "nms"]


def box_iou_xyxy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of XYXY boxes, ``(len(a), len(b))`` float32 (area ``(x1-x0)*(y1-y0)``)."""
    a = a.to(torch.float32)
    b = b.to(torch.float32)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64) of the boxes greedy NMS keeps, highest score first.

    Args:
        boxes_xyxy: ``(N, 4)`` boxes in pixels.
        scores: ``(N,)``; higher wins.
        iou_threshold: a box whose IoU with a kept box is above this is dropped.
    """
    n = int(boxes_xyxy.shape[0])
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    boxes = boxes_xyxy.detach().cpu().to(torch.float32)[order].numpy()
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0) * (y1 - y0)
    suppressed = np.zeros(n, dtype=bool)
    threshold = np.float32(iou_threshold)
    kept = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(n):
            if suppressed[i]:
                continue
            kept.append(i)
            rest = slice(i + 1, n)
            w = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
            h = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
            inter = w * h
            iou = inter / (areas[i] + areas[rest] - inter)
            suppressed[rest] |= iou > threshold
    return order[torch.as_tensor(kept, dtype=torch.int64)]
