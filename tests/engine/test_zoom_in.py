"""engine.zoom_in: the crop around an object and the mask prompt carried into a new frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.zoom_in import ZoomIn, logits_in_frame


def _mask(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def test_first_click_crop_is_twice_the_object_and_centred_on_it() -> None:
    zoom = ZoomIn(first_expansion=2.0, expansion=1.5, min_fraction=0.1, max_fraction=0.75)
    mask = _mask(256, 256, 100, 90, 130, 110)  # 30 rows x 20 columns
    click = np.array([[100.0, 115.0]])
    assert zoom.crop(mask, click, first=True) == (85, 70, 60)  # side 2 x 30, same centre
    assert zoom.crop(mask, click, first=False) == (92, 78, 45)  # 1.5 x 30
    # A click outside the mask widens the box the crop must hold.
    _, left, side = zoom.crop(mask, np.array([[100.0, 115.0], [60.0, 115.0]]), first=True)
    assert left <= 60 and left + side > 109 and side == 100  # 2 x (50 columns)


def test_crop_has_a_minimum_side_stays_inside_the_image_and_skips_large_objects() -> None:
    zoom = ZoomIn(min_fraction=0.25, max_fraction=0.75)
    tiny = _mask(200, 300, 0, 295, 3, 300)  # a corner speck
    top, left, side = zoom.crop(tiny, np.array([[297.0, 1.0]]), first=True)
    assert side == 75  # a quarter of the longer side
    assert (top, left) == (0, 300 - 75)  # moved inside
    # No mask yet: the crop is around the click alone.
    assert zoom.crop(np.zeros((200, 300), bool), np.array([[150.0, 100.0]]), first=False) == (
        63,
        113,
        75,
    )
    big = _mask(200, 300, 20, 20, 170, 170)  # 150 px x 1.6 >= 0.75 x 300
    assert zoom.crop(big, np.array([[80.0, 80.0]]), first=False) is None
    # Under that, but wider than the image is tall: the crop is as tall as the image.
    tall = _mask(200, 300, 20, 20, 160, 160)  # 140 px x 1.6 = 224 > 200 rows
    assert zoom.crop(tall, np.array([[80.0, 80.0]]), first=False) == (0, 0, 200)


def test_zoom_in_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="expansions must be >= 1"):
        ZoomIn(expansion=0.5)
    with pytest.raises(ValueError, match="min_fraction <= max_fraction"):
        ZoomIn(min_fraction=0.8, max_fraction=0.5)


def test_logits_in_frame_resizes_and_pads_with_outside() -> None:
    logits = torch.full((30, 60), 5.0)
    logits[:, :30] = -5.0
    # A 30x60 image resized to 32x64 inside a 64-px square, low-res grid 16x16.
    low = logits_in_frame(logits, (32, 64), 64, (16, 16))
    assert low.shape == (1, 1, 16, 16)
    assert (low[0, 0, :7, :7] < 0).all() and (low[0, 0, :7, 9:] > 0).all()
    assert (low[0, 0, 9:] < -10).all()  # the padding below the image: confidently outside
