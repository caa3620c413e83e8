"""Stability score, NMS and small-region clean-up against brute-force definitions."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.amg.nms import box_iou_xyxy, nms
from engine.amg.regions import clean_mask, clean_up_masks, remove_small_regions
from engine.amg.stability import stability_from_counts, stability_score
from storage import rle
from storage.errors import ConfigError

# --- stability ---------------------------------------------------------------------------


def test_stability_score_is_iou_of_the_two_thresholded_masks() -> None:
    logits = torch.randn(6, 9, 11) * 3
    got = stability_score(logits, 0.0, 1.0)
    for k in range(6):
        high = {(y, x) for y in range(9) for x in range(11) if logits[k, y, x] > 1.0}
        low = {(y, x) for y in range(9) for x in range(11) if logits[k, y, x] > -1.0}
        assert high <= low
        assert got[k].item() == pytest.approx(len(high & low) / len(high | low), abs=1e-6)


def test_stability_of_an_empty_mask_is_nan_and_never_passes() -> None:
    got = stability_score(torch.full((1, 4, 4), -5.0), 0.0, 1.0)
    assert torch.isnan(got).all()
    assert not (stability_from_counts(np.array([0]), np.array([0])) >= 0.5).any()
    np.testing.assert_allclose(stability_from_counts(np.array([3]), np.array([4])), [0.75])


# --- NMS ---------------------------------------------------------------------------------


def _brute_force_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Visit by score (ties: input order); keep a box unless a kept box overlaps it by IoU >
    threshold. IoU in float32 with area (x1 - x0) * (y1 - y0), 0/0 never suppressing."""
    f = np.float32
    order = sorted(range(len(boxes)), key=lambda i: -f(scores[i]))
    kept: list[int] = []
    for i in order:
        suppressed = False
        for j in kept:
            a, b = boxes[i].astype(f), boxes[j].astype(f)
            iw = max(f(0), min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(f(0), min(a[3], b[3]) - max(a[1], b[1]))
            inter = f(iw * ih)
            union = f((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
            with np.errstate(invalid="ignore", divide="ignore"):
                if f(inter / union) > f(threshold):
                    suppressed = True
                    break
        if not suppressed:
            kept.append(i)
    return kept


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 40),
    threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]),
    tied=st.booleans(),
)
def test_nms_matches_brute_force(seed: int, n: int, threshold: float, tied: bool) -> None:
    rng = np.random.default_rng(seed)
    xy = rng.integers(0, 30, size=(n, 2))
    wh = rng.integers(0, 15, size=(n, 2))  # zero-size boxes included
    boxes = np.concatenate([xy, xy + wh], axis=1)
    # Tied scores exercise the stable order (as 1 / crop area does across crops).
    scores = rng.integers(0, 3, size=n).astype(np.float32) if tied else rng.random(n, np.float32)
    got = nms(torch.as_tensor(boxes), torch.as_tensor(scores), threshold)
    assert got.dtype == torch.int64
    assert got.tolist() == _brute_force_nms(boxes, scores, threshold)


def test_box_iou_of_known_boxes() -> None:
    a = torch.tensor([[0, 0, 10, 10]])
    b = torch.tensor([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    np.testing.assert_allclose(box_iou_xyxy(a, b).numpy(), [[50 / 150, 0.0, 1.0]])


# --- small regions -----------------------------------------------------------------------


def _components(pixels: np.ndarray) -> list[set[tuple[int, int]]]:
    """8-connected components of the True pixels, by breadth-first search."""
    h, w = pixels.shape
    seen = np.zeros_like(pixels)
    comps = []
    for y in range(h):
        for x in range(w):
            if pixels[y, x] and not seen[y, x]:
                comp, queue = set(), deque([(y, x)])
                seen[y, x] = True
                while queue:
                    cy, cx = queue.popleft()
                    comp.add((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and pixels[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                queue.append((ny, nx))
                comps.append(comp)
    return comps


def _brute_force_clean(mask: np.ndarray, area: int) -> tuple[np.ndarray, bool]:
    """Fill background components under `area` pixels, then drop foreground components under
    `area` pixels unless all are, in which case keep the largest (first found on ties)."""
    out = mask.copy()
    changed = False
    for comp in _components(~out):
        if len(comp) < area:
            changed = True
            for p in comp:
                out[p] = True
    comps = _components(out)
    small = [c for c in comps if len(c) < area]
    if small:
        changed = True
        big = [c for c in comps if len(c) >= area]
        if not big:
            big = [max(comps, key=len)]
        out = np.zeros_like(out)
        for comp in big:
            for p in comp:
                out[p] = True
    return out, changed


def _blobby_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A mask with blobs, holes and specks: thresholded smoothed noise."""
    noise = rng.random((h, w))
    for _ in range(2):
        noise = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1) + np.roll(noise, -1, 0)) / 4
    mask = noise > np.quantile(noise, rng.uniform(0.3, 0.8))
    if rng.random() < 0.3:  # a small mask away from the borders, for the window path
        small = np.zeros((h, w), dtype=bool)
        y, x = rng.integers(3, h - 8), rng.integers(3, w - 8)
        small[y : y + 5, x : x + 5] = mask[y : y + 5, x : x + 5]
        small[y + 2, x + 2] = False
        mask = small
    return mask


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**31), area=st.sampled_from([1, 3, 8, 20, 60, 2000]))
def test_clean_mask_matches_brute_force(seed: int, area: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(12, 30)), int(rng.integers(12, 30))
    mask = _blobby_mask(rng, h, w)
    expected, expected_changed = _brute_force_clean(mask, area)
    got, changed = clean_mask(mask, area)
    np.testing.assert_array_equal(got, expected)
    assert changed == expected_changed
    # The whole-image routine agrees too.
    filled, c1 = remove_small_regions(mask, area, "holes")
    whole, c2 = remove_small_regions(filled, area, "islands")
    np.testing.assert_array_equal(whole, expected)
    assert (c1 or c2) == expected_changed


def test_clean_mask_fills_a_hole_far_from_the_border() -> None:
    mask = np.zeros((200, 300), dtype=bool)
    mask[50:90, 60:120] = True
    mask[70, 80] = False  # a one-pixel hole
    mask[10, 10] = True  # a speck
    got, changed = clean_mask(mask, 10)
    assert changed
    assert got[70, 80] and not got[10, 10]
    assert got.sum() == 40 * 60


def test_remove_small_regions_refuses_an_unknown_mode() -> None:
    with pytest.raises(ConfigError):
        remove_small_regions(np.zeros((3, 3), dtype=bool), 5, "both")


def test_clean_up_prefers_masks_that_needed_no_change() -> None:
    base = np.zeros((40, 40), dtype=bool)
    base[5:30, 5:30] = True
    speckled = base.copy()
    speckled[35, 35] = True  # an island: the clean-up changes this mask
    far = np.zeros((40, 40), dtype=bool)
    far[0:3, 36:40] = True
    rles = rle.encode(np.stack([speckled, base, far]))
    keep, new_rles, boxes = clean_up_masks(rles, 5, 0.7)
    # speckled and base coincide after clean-up; the unchanged one (base) wins the NMS.
    assert sorted(keep.tolist()) == [1, 2]
    kept = dict(zip(keep.tolist(), new_rles, strict=True))
    np.testing.assert_array_equal(rle.decode([kept[1]])[0], base)
    assert boxes.shape == (2, 4)
    empty_keep, empty_rles, _ = clean_up_masks([], 5, 0.7)
    assert empty_keep.size == 0 and empty_rles == []
