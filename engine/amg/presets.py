"""Named argument sets for :class:`engine.amg.AutomaticMaskGenerator`."""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "paper_preset"]


def paper_preset() -> dict[str, Any]:
    """The SAM paper's stage-3 run (section 4, appendix B): a 32x32 grid on the image plus 2x2
    and 4x4 zoomed crops with 16x16 and 8x8 grids, holes and islands under 100 px removed, and
    masks covering 95% or more of the image dropped. A fresh dict on every call."""
    return {
        "points_per_side": 32,
        "pred_iou_thresh": 0.88,
        "stability_score_thresh": 0.95,
        "stability_score_offset": 1.0,
        "box_nms_thresh": 0.7,
        "crop_n_layers": 2,
        "crop_nms_thresh": 0.7,
        "crop_overlap_ratio": 512 / 1500,
        "crop_n_points_downscale_factor": 2,
        "min_mask_region_area": 100,
        "max_mask_region_fraction": 0.95,
    }


def _default_preset() -> dict[str, Any]:
    """The public generator's defaults (whole image only, no clean-up)."""
    return {}


#: Preset name -> function returning the generator keyword arguments.
PRESETS = {"paper": paper_preset, "default": _default_preset}
