"""engine.evaluation.metrics on hand-made IoU curves."""

from __future__ import annotations

import numpy as np
import pytest

from engine.evaluation.metrics import InteractiveMetrics, mask_iou, number_of_clicks, summarize


def test_mask_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_number_of_clicks() -> None:
    assert number_of_clicks([0.5, 0.86, 0.95], 0.85, 20) == 2
    assert number_of_clicks([0.5, 0.86, 0.95], 0.90, 20) == 3
    assert number_of_clicks([0.5] * 20, 0.85, 20) == 20
    assert number_of_clicks([0.5, 0.6], 0.85, 20) == 20  # a stopped curve that never got there
    assert number_of_clicks([0.1, 0.2, 0.95], 0.9, 2) == 2  # the cap


def test_a_perfect_predictor_gives_noc_1_and_miou_1() -> None:
    metrics = summarize([[1.0], [1.0], [1.0]], [1.0, 1.0, 1.0], images=2)
    assert metrics == InteractiveMetrics(
        miou_1click=1.0, miou_5click=1.0, noc85=1.0, noc90=1.0, box_miou=1.0, images=2, objects=3
    )


def test_summarize_mixed_curves() -> None:
    curves = [
        [0.5, 0.7, 0.8, 0.86, 0.91, 0.95],  # NoC85 4, NoC90 5
        [0.9, 1.0],  # perfect after 2 clicks: extended with 1.0
        [0.2] * 20,  # never: capped at 20
    ]
    m = summarize(curves, [0.8, 0.9, 0.1], images=1)
    assert m.miou_1click == pytest.approx((0.5 + 0.9 + 0.2) / 3)
    assert m.miou_5click == pytest.approx((0.91 + 1.0 + 0.2) / 3)
    assert m.noc85 == pytest.approx((4 + 1 + 20) / 3)
    assert m.noc90 == pytest.approx((5 + 1 + 20) / 3)
    assert m.box_miou == pytest.approx(0.6)
    assert set(m.to_dict()) == {
        "miou_1click",
        "miou_5click",
        "noc85",
        "noc90",
        "box_miou",
        "images",
        "objects",
    }
    assert InteractiveMetrics.from_dict(m.to_dict()) == m


def test_regressions_compare_each_metric_in_its_direction() -> None:
    base = InteractiveMetrics(0.7, 0.8, 4.0, 6.0, 0.75, 10, 50)
    better = InteractiveMetrics(0.72, 0.85, 3.5, 5.0, 0.8, 10, 50)
    worse_noc = InteractiveMetrics(0.72, 0.85, 3.5, 6.5, 0.8, 10, 50)
    assert better.regressions(base) == []
    assert base.regressions(better) == ["miou_1click", "miou_5click", "box_miou", "noc85", "noc90"]
    assert worse_noc.regressions(base) == ["noc90"]
    assert worse_noc.regressions(base, noc_tolerance=0.5) == []


def test_summarize_rejects_empty_and_mismatched_input() -> None:
    with pytest.raises(ValueError, match="no objects"):
        summarize([], [], images=0)
    with pytest.raises(ValueError, match="one each"):
        summarize([[1.0]], [], images=1)
