"""engine.evaluation.clicks: the simulated annotator's next click."""

from __future__ import annotations

import numpy as np
import pytest

from engine.evaluation.clicks import Click, next_click


def _square(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_first_click_is_the_centre_of_the_object() -> None:
    gt = _square(40, 50, 10, 21, 20, 31)  # an 11 x 11 square centred at (25, 15)
    assert next_click(None, gt) == Click(x=25, y=15, positive=True)


def test_false_positive_region_gets_a_negative_click() -> None:
    gt = _square(40, 40, 5, 10, 5, 10)
    pred = gt | _square(40, 40, 20, 35, 20, 35)  # a big false alarm
    click = next_click(pred, gt)
    assert click is not None and not click.positive
    assert pred[click.y, click.x] and not gt[click.y, click.x]
    assert (click.x, click.y) == (27, 27)


def test_the_largest_error_region_wins() -> None:
    gt = _square(60, 60, 0, 30, 0, 60)
    pred = gt.copy()
    pred[2:6, 2:6] = False  # a small miss
    pred[40:55, 10:50] = True  # a large false alarm
    click = next_click(pred, gt)
    assert click is not None and not click.positive and 40 <= click.y < 55


def test_image_border_counts_as_boundary() -> None:
    gt = np.ones((21, 21), dtype=bool)  # the whole image: without a border, any pixel ties
    assert next_click(None, gt) == Click(x=10, y=10, positive=True)


def test_perfect_prediction_needs_no_click_and_shapes_must_match() -> None:
    gt = _square(8, 8, 2, 5, 2, 5)
    assert next_click(gt.copy(), gt) is None
    with pytest.raises(ValueError, match="shape"):
        next_click(np.zeros((4, 4), bool), gt)
