"""Prompt sampling for SAM's interactive training simulation, vectorised over a batch of masks.

All functions take boolean masks ``(B, H, W)`` in the model's input frame and return prompts in
that frame: points as ``(x, y)`` pixel coordinates (column, row) of a pixel, boxes as XYXY pixels
with inclusive ends. Randomness comes only from the ``torch.Generator`` passed in.

Sampling a uniform pixel of each mask uses the "random scores, take the argmax" trick: give every
pixel of the mask an independent uniform score and pick the largest, which is a uniform draw
from the mask, for the whole batch in two tensor ops and without a Python loop.
"""

from __future__ import annotations

import torch

__all__ = [
    "PAD_LABEL",
    "mask_boxes",
    "noisy_boxes",
    "sample_error_points",
    "sample_points_in_masks",
    "sample_several_error_points",
]

#: Point label for "no point" (the prompt encoder's padding token).
PAD_LABEL = -1


def sample_points_in_masks(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One point drawn uniformly inside each mask: ``(B, 2)`` float xy pixels.

    An empty mask gives pixel (0, 0); callers drop empty masks before sampling.
    """
    _check_masks(masks, "masks")
    return _uniform_pixels(masks, generator)[0]


def sample_error_points(
    pred: torch.Tensor, gt: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A corrective click per mask, drawn uniformly from the error region (SAM's recipe).

    Args:
        pred: current predicted masks ``(B, H, W)`` bool.
        gt: ground-truth masks ``(B, H, W)`` bool.
        generator: the random source.

    Returns:
        coords ``(B, 2)`` float xy pixels and labels ``(B,)`` int64: 1 (positive) for a point in a
        false negative (object missed), 0 (negative) for a point in a false positive; a mask
        with no error gets :data:`PAD_LABEL` (the prompt encoder ignores such a point).
    """
    _check_masks(pred, "pred")
    _check_masks(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but gt has {tuple(gt.shape)}")
    error = pred ^ gt
    coords, flat = _uniform_pixels(error, generator)
    in_gt = gt.flatten(1).gather(1, flat[:, None])[:, 0]
    labels = in_gt.long()  # in the error and in gt: a miss (positive); else a false alarm
    labels = torch.where(error.flatten(1).any(1), labels, torch.full_like(labels, PAD_LABEL))
    return coords, labels


def sample_several_error_points(
    pred: torch.Tensor, gt: torch.Tensor, generator: torch.Generator, max_points: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Between 1 and ``max_points`` corrective clicks per mask, each drawn as by
    :func:`sample_error_points` from the same error region.

    Returns:
        coords ``(B, K, 2)`` and labels ``(B, K)`` with ``K = max_points``: mask ``i`` has a
        count drawn uniformly from 1..K, and its points past that count are
        :data:`PAD_LABEL` (as are all of a mask with no error).
    """
    if max_points < 1:
        raise ValueError(f"max_points={max_points}; expected at least 1")
    if max_points == 1:
        coords, labels = sample_error_points(pred, gt, generator)
        return coords[:, None], labels[:, None]
    count = torch.randint(1, max_points + 1, (gt.shape[0],), generator=generator, device=gt.device)
    drawn = [sample_error_points(pred, gt, generator) for _ in range(max_points)]
    coords = torch.stack([c for c, _ in drawn], dim=1)
    labels = torch.stack([lab for _, lab in drawn], dim=1)
    beyond = torch.arange(max_points, device=gt.device)[None, :] >= count[:, None]
    return coords, labels.masked_fill(beyond, PAD_LABEL)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes ``(B, 4)`` float XYXY, inclusive pixel ends; an empty mask gives zeros."""
    _check_masks(masks, "masks")
    rows = masks.any(dim=2)  # (B, H)
    cols = masks.any(dim=1)  # (B, W)
    h, w = masks.shape[1:]
    y0 = rows.float().argmax(dim=1)
    y1 = h - 1 - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = w - 1 - cols.flip(1).float().argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return torch.where(rows.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def noisy_boxes(
    masks: torch.Tensor,
    generator: torch.Generator,
    *,
    noise_fraction: float = 0.1,
    max_noise: float = 20.0,
) -> torch.Tensor:
    """Tight boxes with SAM's noise: ``(B, 4)`` float XYXY pixels, inside the image.

    Each coordinate moves by Gaussian noise with standard deviation ``noise_fraction`` of the
    box's side along that axis, the offset clipped to ``max_noise`` pixels (SAM: 10 %, 20 px).
    """
    boxes = mask_boxes(masks)
    h, w = masks.shape[1:]
    sides = torch.stack(
        [boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], dim=1
    ).repeat(1, 2)  # (B, 4): width, height, width, height
    noise = torch.randn(boxes.shape, generator=generator, device=boxes.device)
    offsets = (noise * noise_fraction * sides).clamp(-max_noise, max_noise)
    noisy = boxes + offsets
    limits = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=noisy.dtype, device=noisy.device)
    noisy = torch.minimum(noisy.clamp(min=0), limits)
    # Keep the corners ordered: noise can push a thin box's two sides past each other.
    lo = torch.minimum(noisy[:, :2], noisy[:, 2:])
    hi = torch.maximum(noisy[:, :2], noisy[:, 2:])
    return torch.cat([lo, hi], dim=1)


def _uniform_pixels(
    masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform pixel of each mask: xy ``(B, 2)`` float and the flat index ``(B,)`` int64."""
    flat = masks.flatten(1)
    scores = torch.rand(flat.shape, generator=generator, device=flat.device)
    index = (scores * flat).argmax(dim=1)  # only mask pixels have a non-zero score
    w = masks.shape[2]
    coords = torch.stack([index % w, torch.div(index, w, rounding_mode="floor")], dim=1)
    return coords.float(), index


def _check_masks(masks: torch.Tensor, name: str) -> None:
    if masks.dtype != torch.bool or masks.dim() != 3:
        raise ValueError(
            f"{name} must be a (B, H, W) bool tensor, got {tuple(masks.shape)} {masks.dtype}"
        )
