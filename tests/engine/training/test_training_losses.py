"""engine.training.losses: focal, dice, their 20:1 sum and the IoU label."""

from __future__ import annotations

import pytest
import torch

from engine.training.losses import dice_loss, focal_loss, mask_iou, mask_loss


def _target() -> torch.Tensor:
    t = torch.zeros((1, 8, 8), dtype=torch.bool)
    t[0, 2:6, 2:6] = True
    return t


def test_confident_right_logits_cost_almost_nothing_and_wrong_ones_a_lot() -> None:
    t = _target()
    right = torch.where(t, 20.0, -20.0)[:, None]  # (B, M=1, H, W)
    wrong = -right
    assert focal_loss(right, t).item() < 1e-6 and dice_loss(right, t).item() < 1e-3
    assert focal_loss(wrong, t).item() > 1.0 and dice_loss(wrong, t).item() > 0.9
    assert mask_loss(wrong, t).item() == pytest.approx(
        20 * focal_loss(wrong, t).item() + dice_loss(wrong, t).item()
    )


def test_losses_are_per_output_so_the_best_output_can_be_picked() -> None:
    t = _target()
    good = torch.where(t, 5.0, -5.0)
    logits = torch.stack([torch.zeros_like(good[0]), good[0], -good[0]])[None]  # (1, 3, H, W)
    losses = mask_loss(logits, t)
    assert losses.shape == (1, 3) and int(losses.argmin()) == 1
    assert mask_iou(logits, t).tolist() == [[0.0, 1.0, 0.0]]


def test_focal_alpha_weighs_foreground_against_background() -> None:
    t = _target()
    zeros = torch.zeros((1, 1, 8, 8))  # p = 0.5 everywhere
    unweighted = focal_loss(zeros, t, alpha=-1)
    # With alpha, the 16 foreground pixels weigh 0.25 and the 48 background pixels 0.75.
    assert focal_loss(zeros, t, alpha=0.25).item() == pytest.approx(
        unweighted.item() * (16 * 0.25 + 48 * 0.75) / 64
    )


def test_iou_of_two_empty_masks_is_one() -> None:
    empty = torch.zeros((1, 4, 4), dtype=torch.bool)
    assert mask_iou(torch.full((1, 1, 4, 4), -1.0), empty).item() == 1.0


def test_focal_with_no_focusing_and_no_alpha_is_binary_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8) * 4
    targets = torch.rand(2, 8, 8) > 0.7  # one target per row, shared by its 3 outputs
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets[:, None].float().expand_as(logits), reduction="none"
    ).mean(dim=(2, 3))
    torch.testing.assert_close(focal_loss(logits, targets, alpha=-1, gamma=0.0), bce)
    combined = mask_loss(logits, targets, focal_alpha=-1, focal_weight=3.0, focal_gamma=0.0)
    torch.testing.assert_close(combined, 3.0 * bce + dice_loss(logits, targets))
