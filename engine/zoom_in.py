"""Zoom-in: decode an object's clicks again on a crop around it, re-encoded at the model's full
input size (Sofiiuk et al. 2021, "Reviving Iterative Training with Mask Guidance for Interactive
Segmentation", the ZoomIn of RITM; FocalClick's focus crop is the same idea).

Why: an object of 150 px in a 256-px image spans under two cells of the ``tiny`` model's 32x32
embedding, and its boundary must be right to the pixel for IoU 0.90. Cropping a square of about
twice its size and resizing it to the model's input shows the model the same object at 3-5x the
scale, where its masks are as good as on large objects.

Per click: the crop is the square around the current mask and every click, ``expansion`` times
the larger side of their tight box (``first_expansion`` for the first click, whose mask comes from
the whole image and may be far off), at least ``min_fraction`` of the image's longer side, moved
inside the image. When that square would cover ``max_fraction`` or more of the longer side, the
whole image is decoded as usual. The previous answer goes into the new frame as the mask prompt.

Coordinates are original-image pixels; a crop is ``(top, left, side)``. Importing this module
does not import torch (the flows' settings name :class:`ZoomIn`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_ZOOM_IN", "Crop", "ZoomIn", "logits_in_frame"]

#: ``(top, left, side)`` of a square crop, original-image pixels.
Crop = tuple[int, int, int]


@dataclass(frozen=True)
class ZoomIn:
    """When and how far to zoom in on an object.

    Attributes:
        first_expansion: crop side over the tight box's larger side, first click.
        expansion: the same for every later click (tighter: the mask is close by then).
        min_fraction: smallest crop side, as a fraction of the image's longer side (caps the
            magnification at ``1 / min_fraction``).
        max_fraction: no zoom when the crop would be at least this fraction of the longer side.
    """

    first_expansion: float = 2.0
    expansion: float = 1.6
    min_fraction: float = 0.1875
    max_fraction: float = 0.75

    def __post_init__(self) -> None:
        if not (self.first_expansion >= 1 and self.expansion >= 1):
            raise ValueError(
                f"ZoomIn expansions must be >= 1, got first_expansion={self.first_expansion}, "
                f"expansion={self.expansion}"
            )
        if not 0 < self.min_fraction <= self.max_fraction:
            raise ValueError(
                f"ZoomIn needs 0 < min_fraction <= max_fraction, got {self.min_fraction} and "
                f"{self.max_fraction}"
            )

    def crop(
        self,
        mask: np.ndarray,
        points: np.ndarray,
        *,
        first: bool,
    ) -> Crop | None:
        """The square to decode the object in, or None for the whole image.

        Args:
            mask: ``(H, W)`` bool, the object's current mask (may be empty).
            points: ``(N, 2)`` xy pixels of the clicks so far (and a box's corners).
            first: whether this is the first click (``first_expansion`` applies).
        """
        h, w = mask.shape
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        xs = [float(v) for v in points[:, 0]]
        ys = [float(v) for v in points[:, 1]]
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size:
            xs += [float(cols[0]), float(cols[-1])]
            ys += [float(rows[0]), float(rows[-1])]
        if not xs:  # no click and no mask: nothing to zoom on
            return None
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        expansion = self.first_expansion if first else self.expansion
        longer = max(h, w)
        side = max(max(x1 - x0, y1 - y0) + 1.0, 1.0) * expansion
        side = max(side, self.min_fraction * longer)
        if side >= self.max_fraction * longer:
            return None
        size = min(round(side), h, w)
        left = int(np.clip(round((x0 + x1 + 1) / 2 - size / 2), 0, w - size))
        top = int(np.clip(round((y0 + y1 + 1) / 2 - size / 2), 0, h - size))
        return (top, left, size)


#: The settings evaluation uses unless told otherwise.
DEFAULT_ZOOM_IN = ZoomIn()


def logits_in_frame(
    logits: torch.Tensor,
    input_size: tuple[int, int],
    img_size: int,
    low_res: tuple[int, int],
) -> torch.Tensor:
    """Original-frame logits ``(H, W)`` of an image (or of a crop) -> the mask prompt ``(1, 1,
    h, w)`` of a model that sees that image resized to ``input_size`` inside its ``img_size``
    square (the padding gets a confident "outside")."""
    from torch.nn import functional as F  # torch only where tensors are made

    resized = F.interpolate(
        logits[None, None].float(), size=input_size, mode="bilinear", align_corners=False
    )
    padded = F.pad(resized, (0, img_size - input_size[1], 0, img_size - input_size[0]), value=-20.0)
    return F.interpolate(padded, size=low_res, mode="bilinear", align_corners=False)
