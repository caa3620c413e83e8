"""engine.evaluation.interactive and .holdout with a real trained tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.builder import build_sam
from engine.evaluation import (
    coco_holdout,
    evaluate_interactive,
    mask_boxes_xyxy,
    store_holdout,
    synthetic_holdout,
)
from engine.evaluation.interactive import EvalSample
from engine.synthetic import write_synthetic_dataset
from storage.errors import InvalidInputError, NotFoundError
from storage.mask_store import MaskStore


def test_mask_boxes_xyxy() -> None:
    masks = np.zeros((2, 6, 8), dtype=bool)
    masks[0, 1:4, 2:7] = True
    assert mask_boxes_xyxy(masks).tolist() == [[2, 1, 6, 3], [0, 0, 0, 0]]


def test_trained_model_segments_synthetic_objects(trained_tiny_checkpoint: str) -> None:
    model = build_sam("tiny", checkpoint=trained_tiny_checkpoint)
    untrained = build_sam("tiny")
    samples = list(synthetic_holdout(3, seed=4242, size=(192, 256)))
    metrics = evaluate_interactive(model, samples, max_clicks=8)
    assert metrics.images == 3 and metrics.objects == sum(len(s.masks) for s in samples)
    baseline = evaluate_interactive(untrained, samples[:1], max_clicks=2)
    # The fixture model must already be useful, and far better than random weights.
    assert metrics.miou_1click > 0.4 and metrics.box_miou > 0.4
    assert metrics.miou_5click >= metrics.miou_1click - 0.05
    assert metrics.miou_1click > baseline.miou_1click + 0.2
    assert 1 <= metrics.noc85 <= metrics.noc90 <= 8
    assert not model.training  # evaluation leaves the mode as it found it


def test_coco_holdout_reads_what_the_generator_wrote(tmp_path) -> None:
    _paths, coco = write_synthetic_dataset(tmp_path, 2, seed=3, size=(40, 48))
    read = list(coco_holdout(tmp_path, tmp_path / "annotations.json"))
    expected = list(synthetic_holdout(2, seed=3, size=(40, 48)))
    assert len(read) == 2
    for a, b in zip(read, expected, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    # Polygons work too: a square as a polygon.
    coco["annotations"] = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[4, 4, 20, 4, 20, 20, 4, 20]]}
    ]
    (tmp_path / "poly.json").write_text(json.dumps(coco))
    (sample,) = list(coco_holdout(tmp_path, tmp_path / "poly.json"))
    assert sample.masks.shape == (1, 40, 48) and 200 < sample.masks.sum() < 330


def test_bad_holdouts(tmp_path) -> None:
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="not a COCO"):
        list(coco_holdout(tmp_path, tmp_path / "bad.json"))
    with pytest.raises(NotFoundError, match="no masks on holdout"):
        list(store_holdout(MaskStore(str(tmp_path / "empty"))))


def test_store_holdout_yields_holdout_images_only(synthetic_store: MaskStore) -> None:
    samples = list(store_holdout(synthetic_store))
    holdout = {r.image_id for r in synthetic_store.images(split="holdout")}
    assert {s.image_id for s in samples} == holdout
    assert all(isinstance(s, EvalSample) and s.masks.shape[0] > 0 for s in samples)
