"""A slow, literal implementation of SAM's published automatic mask generation, for tests.

Written from the algorithm's description (SAM paper section 4 / appendix B and the public
generator's documented behaviour), not from ``engine.amg``: full-resolution logits straight from
``SamPredictor.predict_torch(..., return_logits=True)`` for every mask, one mask at a time,
pairwise NMS loops, clean-up on the whole image. It holds every mask of the image at full
resolution, so use it on small images only.

It applies the two choices ``engine.amg`` documents as its own on top of the published code:
masks that are empty are dropped, and the paper's whole-image filter (``max_fraction``) runs on
each mask when it is made and again after clean-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from engine.predictor import SamPredictor

EDGE_TOLERANCE_PX = 20.0


@dataclass
class RefMask:
    mask: np.ndarray  # (H, W) bool, whole image
    box: tuple[int, int, int, int]  # XYXY, end inclusive, image pixels
    predicted_iou: float
    stability_score: float
    point: tuple[float, float]  # image pixels
    crop_box: tuple[int, int, int, int]  # XYXY, end exclusive


def reference_generate(
    model,
    image: np.ndarray,
    *,
    points_per_side: int,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    stability_score_offset: float = 1.0,
    box_nms_thresh: float = 0.7,
    crop_n_layers: int = 0,
    crop_nms_thresh: float = 0.7,
    crop_overlap_ratio: float = 512 / 1500,
    crop_n_points_downscale_factor: int = 1,
    min_mask_region_area: int = 0,
    max_fraction: float | None = None,
) -> list[RefMask]:
    height, width = image.shape[:2]
    predictor = SamPredictor(model)
    crops = _crop_boxes(height, width, crop_n_layers, crop_overlap_ratio)
    everything: list[RefMask] = []
    for crop, layer in crops:
        n = int(points_per_side / crop_n_points_downscale_factor**layer)
        masks = _crop_masks(
            predictor,
            image,
            crop,
            n,
            points_per_batch,
            pred_iou_thresh,
            stability_score_thresh,
            stability_score_offset,
            max_fraction,
        )
        kept = _greedy_nms([m.box for m in masks], [m.predicted_iou for m in masks], box_nms_thresh)
        everything += [masks[i] for i in kept]
    if len(crops) > 1:
        scores = [
            1.0 / ((m.crop_box[2] - m.crop_box[0]) * (m.crop_box[3] - m.crop_box[1]))
            for m in everything
        ]
        kept = _greedy_nms([m.box for m in everything], scores, crop_nms_thresh)
        everything = [everything[i] for i in kept]
    if min_mask_region_area > 0:
        everything = _clean_up(
            everything, min_mask_region_area, max(box_nms_thresh, crop_nms_thresh)
        )
        if max_fraction is not None:
            everything = [m for m in everything if m.mask.sum() < max_fraction * height * width]
    return everything


def _crop_boxes(height, width, n_layers, overlap_ratio):
    crops = [((0, 0, width, height), 0)]
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * min(height, width) * 2 / per_side)
        crop_w = math.ceil((width + overlap * (per_side - 1)) / per_side)
        crop_h = math.ceil((height + overlap * (per_side - 1)) / per_side)
        for i in range(per_side):
            for j in range(per_side):
                x0 = int((crop_w - overlap) * i)
                y0 = int((crop_h - overlap) * j)
                crops.append(((x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)), layer))
    return crops


def _crop_masks(
    predictor, image, crop, n, batch, iou_thresh, stab_thresh, offset, max_fraction
) -> list[RefMask]:
    x0, y0, x1, y1 = crop
    height, width = image.shape[:2]
    predictor.set_image(np.ascontiguousarray(image[y0:y1, x0:x1]))
    crop_h, crop_w = y1 - y0, x1 - x0
    points = [((j + 0.5) / n * crop_w, (i + 0.5) / n * crop_h) for i in range(n) for j in range(n)]
    threshold = predictor.model.mask_threshold
    out = []
    for start in range(0, len(points), batch):
        chunk = np.array(points[start : start + batch], dtype=np.float64)
        coords = predictor.transform.apply_coords(chunk, (crop_h, crop_w))
        coords_t = torch.as_tensor(coords, dtype=torch.float32)[:, None, :]
        labels = torch.ones((len(chunk), 1), dtype=torch.int64)
        logits, iou, _ = predictor.predict_torch(
            coords_t, labels, multimask_output=True, return_logits=True
        )
        for b in range(len(chunk)):
            for k in range(logits.shape[1]):
                score = float(iou[b, k])
                if iou_thresh > 0 and not score > iou_thresh:
                    continue
                lg = logits[b, k].numpy()
                high = int((lg > threshold + offset).sum())
                low = int((lg > threshold - offset).sum())
                stability = float(np.float32(high) / np.float32(low)) if low else float("nan")
                if stab_thresh > 0 and not stability >= stab_thresh:
                    continue
                mask = lg > threshold
                if not mask.any():
                    continue
                ys, xs = np.nonzero(mask)
                box = (
                    int(xs.min()) + x0,
                    int(ys.min()) + y0,
                    int(xs.max()) + x0,
                    int(ys.max()) + y0,
                )
                if _touches_inner_crop_edge(box, crop, (0, 0, width, height)):
                    continue
                if max_fraction is not None and mask.sum() >= max_fraction * height * width:
                    continue
                full = np.zeros((height, width), dtype=bool)
                full[y0:y1, x0:x1] = mask
                point = (chunk[b, 0] + x0, chunk[b, 1] + y0)
                out.append(RefMask(full, box, score, stability, point, crop))
    predictor.reset_image()
    return out


def _touches_inner_crop_edge(box, crop, image_box) -> bool:
    for side in range(4):
        near_crop = abs(box[side] - crop[side]) <= EDGE_TOLERANCE_PX
        near_image = abs(box[side] - image_box[side]) <= EDGE_TOLERANCE_PX
        if near_crop and not near_image:
            return True
    return False


def _box_iou(a, b) -> np.float32:
    f = np.float32
    area_a = (f(a[2]) - f(a[0])) * (f(a[3]) - f(a[1]))
    area_b = (f(b[2]) - f(b[0])) * (f(b[3]) - f(b[1]))
    iw = max(f(0), min(f(a[2]), f(b[2])) - max(f(a[0]), f(b[0])))
    ih = max(f(0), min(f(a[3]), f(b[3])) - max(f(a[1]), f(b[1])))
    inter = f(iw * ih)
    with np.errstate(invalid="ignore", divide="ignore"):
        return f(inter / f(area_a + area_b - inter))


def _greedy_nms(boxes, scores, threshold) -> list[int]:
    """Visit boxes by decreasing score (ties: input order); keep one unless a kept box
    overlaps it with IoU above the threshold."""
    order = sorted(range(len(boxes)), key=lambda i: -np.float32(scores[i]))
    kept: list[int] = []
    for i in order:
        if all(not _box_iou(boxes[i], boxes[j]) > np.float32(threshold) for j in kept):
            kept.append(i)
    return kept


def _remove_small(mask, area, holes: bool):
    work = (~mask if holes else mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(work, connectivity=8)
    sizes = stats[:, cv2.CC_STAT_AREA]
    small = [i for i in range(1, n) if sizes[i] < area]
    if not small:
        return mask, False
    if holes:
        return mask | np.isin(labels, small), True
    keep = [i for i in range(1, n) if i not in small]
    if not keep:
        keep = [1 + int(np.argmax(sizes[1:]))]
    return np.isin(labels, keep), True


def _clean_up(masks: list[RefMask], area: int, threshold: float) -> list[RefMask]:
    cleaned = []
    scores = []
    for m in masks:
        new, changed_holes = _remove_small(m.mask, area, holes=True)
        new, changed_islands = _remove_small(new, area, holes=False)
        ys, xs = np.nonzero(new)
        box = (
            (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
            if len(xs)
            else (0, 0, 0, 0)
        )
        cleaned.append(RefMask(new, box, m.predicted_iou, m.stability_score, m.point, m.crop_box))
        scores.append(0.0 if (changed_holes or changed_islands) else 1.0)
    kept = _greedy_nms([c.box for c in cleaned], scores, threshold)
    return [cleaned[i] for i in kept]
