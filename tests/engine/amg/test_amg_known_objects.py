"""A trained tiny model's automatic masks find the objects of synthetic scenes."""

from __future__ import annotations

import numpy as np

from engine.amg import AutomaticMaskGenerator
from engine.builder import build_sam
from engine.synthetic import generate_scene
from storage import rle

# The fixture model trains for about a minute: confident enough for these gates, not SAM's.
SETTINGS = dict(
    points_per_side=12,
    pred_iou_thresh=0.6,
    stability_score_thresh=0.8,
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
    model = build_sam("tiny", checkpoint=trained_tiny_checkpoint)
    generator = AutomaticMaskGenerator(model, **SETTINGS)
    untrained = AutomaticMaskGenerator(build_sam("tiny"), **SETTINGS)
    rng = np.random.default_rng(777)
    recalls, baseline = [], []
    for _ in range(3):
        scene = generate_scene(rng, (256, 256), min_objects=3, max_objects=5, min_area=400)
        masks = generator.generate(scene.image)
        recalls.append(_recall(masks, scene.masks, 0.5))
        baseline.append(_recall(untrained.generate(scene.image), scene.masks, 0.5))
        # Every mask is a real region of the image, in the SA-1B record format.
        for m in masks:
            assert 0 < m["area"] < 0.95 * 256 * 256
            assert m["predicted_iou"] > 0.6 and m["stability_score"] >= 0.8
    assert np.mean(recalls) >= 0.5, recalls
    assert np.mean(recalls) > np.mean(baseline) + 0.3, (recalls, baseline)
