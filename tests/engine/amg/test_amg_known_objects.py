"""A trained tiny model's automatic masks find the objects of synthetic scenes."""

from __future__ import annotations

import numpy as np
import torch

from engine.amg import AutomaticMaskGenerator
from engine.builder import build_sam
from engine.synthetic import generate_scene
from storage import rle

# The fixture model trains for a few minutes on simple scenes: its IoU head is young, so the
# gates are low (SAM's 0.88 / 0.95 would keep nothing); the masks it keeps must still be right.
SETTINGS = dict(
    points_per_side=12,
    pred_iou_thresh=0.3,
    stability_score_thresh=0.5,
    min_mask_region_area=20,
    max_mask_region_fraction=0.95,
)


def _recall(masks: list[dict], truth: np.ndarray, threshold: float) -> float:
    """Fraction of ground-truth objects that some generated mask matches at IoU >= threshold."""
    if not masks:
        return 0.0
    ious = rle.iou(rle.encode(truth), [m["segmentation"] for m in masks])
    return float((ious.max(axis=1) >= threshold).mean())


def test_trained_model_finds_the_objects(trained_tiny_checkpoint: str) -> None:
    from tests.fixtures.models import FIXTURE_SCENES

    model = build_sam("tiny", checkpoint=trained_tiny_checkpoint)
    generator = AutomaticMaskGenerator(model, **SETTINGS)
    torch.manual_seed(0)
    untrained = AutomaticMaskGenerator(build_sam("tiny"), **SETTINGS)
    rng = np.random.default_rng(777)
    recalls, baseline = [], []
    for _ in range(6):
        scene = generate_scene(rng, (256, 256), min_objects=2, **FIXTURE_SCENES)
        masks = generator.generate(scene.image)
        recalls.append(_recall(masks, scene.masks, 0.5))
        baseline.append(_recall(untrained.generate(scene.image), scene.masks, 0.5))
        # Every mask is a real region of the image, in the SA-1B record format.
        for m in masks:
            assert 0 < m["area"] < 0.95 * 256 * 256
            assert m["predicted_iou"] > 0.3 and m["stability_score"] >= 0.5
    # Measured: recall 0.5 against 0.0 for random weights (3 scenes).
    assert np.mean(recalls) >= 0.25, recalls
    assert np.mean(recalls) > np.mean(baseline) + 0.2, (recalls, baseline)
