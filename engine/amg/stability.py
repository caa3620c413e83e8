"""The stability score of a predicted mask (SAM paper, section 5 and appendix).

A mask is stable when thresholding its logits a little higher or lower barely changes it:
``stability = |logits > t + offset| / |logits > t - offset|`` with ``t`` the model's mask
threshold (0.0, a logit) and ``offset`` 1.0 in SAM. The high-threshold mask always lies inside
the low-threshold one, so that ratio is their IoU. A mask with an empty low-threshold mask has
no defined score (NaN), which never passes a threshold.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["stability_from_counts", "stability_score"]


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """Stability of each mask from its logits ``(..., H, W)``: float32 ``(...)``."""
    high = (logits > mask_threshold + offset).flatten(-2).sum(-1)
    low = (logits > mask_threshold - offset).flatten(-2).sum(-1)
    return high.to(torch.float32) / low.to(torch.float32)


def stability_from_counts(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Stability from pixel counts above ``t + offset`` (``high``) and above ``t - offset``
    (``low``): float32, NaN where ``low`` is 0."""
    high = np.asarray(high, dtype=np.float32)
    low = np.asarray(low, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return high / low
