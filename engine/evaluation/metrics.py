"""Interactive-segmentation metrics: mIoU after k clicks, NoC@t, box-prompt mIoU.

Conventions (those of the RITM / SAM evaluations):

- an object's IoU curve ``ious[k]`` is the IoU after ``k + 1`` clicks;
- NoC@t is the number of clicks after which the IoU first reaches ``t``; an object that never
  gets there within ``max_clicks`` counts as ``max_clicks`` (so NoC is capped, never infinite);
- mIoU@k is the mean over objects of the IoU after ``k`` clicks (objects weigh equally, images
  with many objects weigh more).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["InteractiveMetrics", "mask_iou", "number_of_clicks", "summarize"]


@dataclass(frozen=True)
class InteractiveMetrics:
    """Interactive-segmentation scores of one model on one holdout set.

    Attributes:
        miou_1click: mean IoU after the first click, in [0, 1].
        miou_5click: mean IoU after five clicks, in [0, 1].
        noc85: mean number of clicks to reach IoU 0.85 (at most ``max_clicks``).
        noc90: mean number of clicks to reach IoU 0.90 (at most ``max_clicks``).
        box_miou: mean IoU from the tight ground-truth box as the only prompt, in [0, 1].
        images: number of images evaluated.
        objects: number of ground-truth masks evaluated.
    """

    miou_1click: float
    miou_5click: float
    noc85: float
    noc90: float
    box_miou: float
    images: int
    objects: int

    def to_dict(self) -> dict[str, float | int]:
        """The metrics as a plain dict with the keys above (for JSON and model cards)."""
        return asdict(self)

    def regressions(
        self,
        other: InteractiveMetrics,
        *,
        miou_tolerance: float = 0.0,
        noc_tolerance: float = 0.0,
    ) -> list[str]:
        """The headline metrics on which these scores are worse than ``other``'s.

        Higher is better for the mIoUs, lower for the NoCs. ``miou_tolerance`` (IoU) and
        ``noc_tolerance`` (clicks) are the slack allowed before a difference counts as worse.
        """
        worse = [
            name
            for name in ("miou_1click", "miou_5click", "box_miou")
            if getattr(self, name) < getattr(other, name) - miou_tolerance
        ]
        worse += [
            name
            for name in ("noc85", "noc90")
            if getattr(self, name) > getattr(other, name) + noc_tolerance
        ]
        return worse

    @classmethod
    def from_dict(cls, data: dict[str, float | int]) -> InteractiveMetrics:
        """The inverse of :meth:`to_dict` (extra keys are ignored)."""
        return cls(
            miou_1click=float(data["miou_1click"]),
            miou_5click=float(data["miou_5click"]),
            noc85=float(data["noc85"]),
            noc90=float(data["noc90"]),
            box_miou=float(data["box_miou"]),
            images=int(data["images"]),
            objects=int(data["objects"]),
        )


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two boolean masks of one shape; 1.0 when both are empty."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & gt)) / union


def number_of_clicks(ious: Sequence[float] | np.ndarray, threshold: float, max_clicks: int) -> int:
    """Clicks needed to reach ``threshold`` given the IoU after each click (or ``max_clicks``).

    ``ious`` may be shorter than ``max_clicks`` (the simulation stopped early); a missing tail
    counts as not reached.
    """
    reached = np.flatnonzero(np.asarray(ious[:max_clicks], dtype=np.float64) >= threshold)
    return int(reached[0]) + 1 if reached.size else int(max_clicks)


def summarize(
    click_ious: Sequence[Sequence[float]],
    box_ious: Sequence[float],
    *,
    images: int,
    max_clicks: int = 20,
) -> InteractiveMetrics:
    """Reduce per-object IoU curves and box IoUs to :class:`InteractiveMetrics`.

    Args:
        click_ious: for each object, its IoU after 1, 2, ... clicks; a curve shorter than 5 is
            extended with its last value (the simulation stops once an object is perfect).
        box_ious: for each object, the IoU from the box prompt.
        images: how many images the objects came from.
        max_clicks: the NoC cap.
    """
    if len(click_ious) == 0:
        raise ValueError("summarize: no objects were evaluated; expected at least one mask")
    if len(box_ious) != len(click_ious):
        raise ValueError(
            f"summarize: {len(box_ious)} box IoUs for {len(click_ious)} objects; expected one each"
        )
    at1 = [curve[0] for curve in click_ious]
    at5 = [curve[min(4, len(curve) - 1)] for curve in click_ious]
    return InteractiveMetrics(
        miou_1click=float(np.mean(at1)),
        miou_5click=float(np.mean(at5)),
        noc85=float(np.mean([number_of_clicks(c, 0.85, max_clicks) for c in click_ious])),
        noc90=float(np.mean([number_of_clicks(c, 0.90, max_clicks) for c in click_ious])),
        box_miou=float(np.mean(box_ious)),
        images=int(images),
        objects=len(click_ious),
    )
