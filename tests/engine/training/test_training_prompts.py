"""engine.training.prompts: the recipe's point and box samplers."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.training.prompts import (
    PAD_LABEL,
    mask_boxes,
    noisy_boxes,
    sample_error_points,
    sample_points_in_masks,
    sample_several_error_points,
)


def _random_masks(seed: int, b: int, h: int, w: int, p: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, h, w), generator=g) < p


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), p_pred=st.floats(0.0, 1.0), p_gt=st.floats(0.0, 1.0))
def test_error_points_lie_in_the_error_region_with_the_right_label(
    seed: int, p_pred: float, p_gt: float
) -> None:
    pred = _random_masks(seed, 6, 9, 13, p_pred)
    gt = _random_masks(seed + 1, 6, 9, 13, p_gt)
    pred[0] = gt[0]  # one mask with no error at all
    coords, labels = sample_error_points(pred, gt, torch.Generator().manual_seed(seed))
    assert coords.shape == (6, 2) and labels.shape == (6,)
    for i in range(6):
        x, y = int(coords[i, 0]), int(coords[i, 1])
        assert float(coords[i, 0]) == x and float(coords[i, 1]) == y  # a pixel
        if bool((pred[i] ^ gt[i]).any()):
            assert bool(pred[i, y, x] ^ gt[i, y, x]), "point outside the error region"
            # Positive exactly in a false negative (object missed), negative in a false positive.
            expected = 1 if bool(gt[i, y, x]) and not bool(pred[i, y, x]) else 0
            assert int(labels[i]) == expected
        else:
            assert int(labels[i]) == PAD_LABEL
    assert int(labels[0]) == PAD_LABEL


def test_error_points_cover_the_error_region_uniformly() -> None:
    gt = torch.zeros((1, 4, 4), dtype=torch.bool)
    gt[0, 0, :2] = True  # two missed pixels: (x=0, y=0), (x=1, y=0)
    pred = torch.zeros_like(gt)
    pred[0, 3, 3] = True  # one false alarm at (3, 3)
    g = torch.Generator().manual_seed(0)
    seen: dict[tuple[int, int, int], int] = {}
    for _ in range(600):
        c, lab = sample_error_points(pred, gt, g)
        key = (int(c[0, 0]), int(c[0, 1]), int(lab[0]))
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) == {(0, 0, 1), (1, 0, 1), (3, 3, 0)}
    assert all(150 < n < 250 for n in seen.values())  # ~200 each


def test_several_error_points_lie_in_the_error_region_with_1_to_k_per_mask() -> None:
    pred = _random_masks(3, 40, 9, 13, 0.4)
    gt = _random_masks(4, 40, 9, 13, 0.5)
    pred[0] = gt[0]  # no error: every point is padding
    coords, labels = sample_several_error_points(pred, gt, torch.Generator().manual_seed(0), 5)
    assert coords.shape == (40, 5, 2) and labels.shape == (40, 5)
    counts = (labels != PAD_LABEL).sum(1)
    assert int(counts[0]) == 0
    assert int(counts[1:].min()) >= 1 and int(counts.max()) <= 5
    assert set(counts[1:].tolist()) == {1, 2, 3, 4, 5}  # 39 masks: every count occurs
    for i in range(40):
        real = labels[i] != PAD_LABEL
        assert bool(real[: int(counts[i])].all())  # the real points come first
        points = coords[i][real].long().tolist()
        for (x, y), label in zip(points, labels[i][real].tolist(), strict=True):
            assert bool(pred[i, y, x] ^ gt[i, y, x])
            assert label == int(gt[i, y, x])


def test_one_error_point_per_round_is_sample_error_points() -> None:
    pred, gt = _random_masks(5, 4, 9, 13, 0.4), _random_masks(6, 4, 9, 13, 0.5)
    coords, labels = sample_several_error_points(pred, gt, torch.Generator().manual_seed(1), 1)
    single = sample_error_points(pred, gt, torch.Generator().manual_seed(1))
    assert torch.equal(coords[:, 0], single[0]) and torch.equal(labels[:, 0], single[1])


def test_points_in_masks_are_inside() -> None:
    masks = _random_masks(3, 16, 20, 30, 0.1)
    masks[:, 5, 7] = True  # never empty
    coords = sample_points_in_masks(masks, torch.Generator().manual_seed(1))
    for i in range(16):
        assert bool(masks[i, int(coords[i, 1]), int(coords[i, 0])])


def test_mask_boxes_are_tight_inclusive_xyxy() -> None:
    masks = torch.zeros((3, 10, 12), dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 9, 11] = True
    boxes = mask_boxes(masks)
    assert boxes.tolist() == [[3, 2, 8, 4], [11, 9, 11, 9], [0, 0, 0, 0]]


def test_noisy_boxes_stay_ordered_inside_the_image_and_within_20_px() -> None:
    masks = torch.zeros((40, 300, 300), dtype=torch.bool)
    masks[:, 20:280, 40:260] = True  # a 220 x 260 box: 10 % of the side is over 20 px
    masks[20:, :, :] = False
    masks[20:, 0:6, 290:300] = True  # small boxes at the corner: noise must be clipped
    tight = mask_boxes(masks)
    noisy = noisy_boxes(masks, torch.Generator().manual_seed(0))
    assert (noisy[:, 0] <= noisy[:, 2]).all() and (noisy[:, 1] <= noisy[:, 3]).all()
    assert (noisy >= 0).all() and (noisy <= 299).all()
    assert ((noisy - tight).abs() <= 20 + 1e-4).all()
    assert (noisy[:20] != tight[:20]).any()  # there is noise
    exact = noisy_boxes(masks, torch.Generator().manual_seed(0), noise_fraction=0.0)
    assert torch.equal(exact, tight)


def test_samplers_are_deterministic_given_the_generator() -> None:
    masks = _random_masks(5, 4, 16, 16, 0.3)
    a = sample_points_in_masks(masks, torch.Generator().manual_seed(9))
    b = sample_points_in_masks(masks, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    np.testing.assert_array_equal(
        noisy_boxes(masks, torch.Generator().manual_seed(2)).numpy(),
        noisy_boxes(masks, torch.Generator().manual_seed(2)).numpy(),
    )
