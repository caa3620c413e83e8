"""SAM's training losses: focal + dice on mask logits (20:1), MSE on the IoU head; and the
discriminative loss that shapes a model's instance code (``instance_loss``).

Every function works per mask and per output: logits ``(B, M, H, W)`` against targets
``(B, H, W)`` give losses ``(B, M)``, so the caller can pick, for each prompt, the output with
the lowest loss (SAM backpropagates only that one when the prompt is ambiguous). Targets are
bool, or soft in [0, 1] for the focal and dice terms (pooled onto a coarser grid).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from engine.modeling.instance_embedding import MARGIN

__all__ = ["dice_loss", "focal_loss", "instance_loss", "mask_iou", "mask_loss"]

#: Weights of SAM's mask loss: focal 20, dice 1 (Kirillov et al. 2023, after DETR/MaskFormer).
FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) averaged over pixels: ``(B, M)``.

    ``alpha`` weighs foreground pixels (and ``1 - alpha`` background); ``gamma`` down-weights
    pixels that are already right.
    """
    t = targets[:, None].to(logits.dtype).expand_as(logits)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = prob * t + (1 - prob) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.flatten(2).mean(dim=2)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss ``1 - 2|P∩T| / (|P| + |T|)`` on sigmoid probabilities: ``(B, M)``."""
    prob = logits.sigmoid().flatten(2)
    t = targets[:, None].to(logits.dtype).flatten(2)
    inter = (prob * t).sum(dim=2)
    total = prob.sum(dim=2) + t.sum(dim=2)
    return 1 - (2 * inter + smooth) / (total + smooth)


def mask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    focal_alpha: float = 0.25,
    focal_weight: float = FOCAL_WEIGHT,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """SAM's mask loss, ``20 * focal + dice``: ``(B, M)`` (``focal_alpha < 0``: no weighting)."""
    focal = focal_loss(logits, targets, alpha=focal_alpha, gamma=focal_gamma)
    return focal_weight * focal + DICE_WEIGHT * dice_loss(logits, targets)


@torch.no_grad()
def mask_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU ``(B, M)`` of the masks ``logits > threshold`` with the targets (the IoU head's label).

    Two empty masks have IoU 1 (nothing to get wrong).
    """
    pred = logits > threshold
    t = targets[:, None]
    inter = (pred & t).flatten(2).sum(dim=2).float()
    union = (pred | t).flatten(2).sum(dim=2).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def instance_loss(
    code: torch.Tensor,
    gt: torch.Tensor,
    image_index: torch.Tensor,
    *,
    pull_margin: float = MARGIN / 3,
    push_margin: float = MARGIN,
) -> torch.Tensor:
    """The discriminative loss (De Brabandere et al. 2017) of an instance code: scalar.

    Each mask's pixels are pulled to within ``pull_margin`` of their mean code, and the means of
    two disjoint masks of one image are pushed ``2 * push_margin`` apart; pixels outside every
    given mask are left free (an image's masks need not be all its objects). Nested or
    overlapping masks (a part and its whole, a mask drawn twice) are not pushed apart.

    Args:
        code: ``(B, D, H, W)`` instance code of the step's images.
        gt: ``(M, S, S)`` bool masks at the input size (a multiple of ``H``).
        image_index: ``(M,)`` the image of each mask.
    """
    h, w = code.shape[-2:]
    cover = F.adaptive_avg_pool2d(gt[:, None].to(code.dtype), (h, w))[:, 0]
    inside = (cover >= 0.75).to(code.dtype).flatten(1)  # (M, HW): clearly inside the mask
    count = inside.sum(1)
    valid = count > 0
    if not bool(valid.any()):
        return code.sum() * 0
    inside, count, image_index = inside[valid], count[valid], image_index[valid]
    pixels = code[image_index].flatten(2)  # (M, D, HW)
    means = (pixels * inside[:, None]).sum(2) / count[:, None]  # (M, D)
    spread = (pixels - means[..., None]).norm(dim=1)  # (M, HW)
    pull = ((F.relu(spread - pull_margin) ** 2 * inside).sum(1) / count).mean()
    touching = (inside @ inside.T) > 0  # shares a pixel: nested, overlapping or the same mask
    pairs = (image_index[:, None] == image_index[None, :]) & ~touching
    gaps = torch.cdist(means, means)
    push = (F.relu(2 * push_margin - gaps) ** 2)[pairs]
    push_term = push.mean() if push.numel() else code.sum() * 0
    return pull + push_term
