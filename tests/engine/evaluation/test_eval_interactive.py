"""engine.evaluation.interactive and .holdout with a real trained tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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
from engine.zoom_in import ZoomIn
from storage.errors import InvalidInputError, NotFoundError
from storage.mask_store import MaskStore


def test_mask_boxes_xyxy() -> None:
    masks = np.zeros((2, 6, 8), dtype=bool)
    masks[0, 1:4, 2:7] = True
    assert mask_boxes_xyxy(masks).tolist() == [[2, 1, 6, 3], [0, 0, 0, 0]]


def test_trained_model_segments_synthetic_objects(trained_tiny_checkpoint: str) -> None:
    from engine.synthetic import generate_scene, scene_rng
    from tests.fixtures.models import FIXTURE_SCENES

    model = build_sam("tiny", checkpoint=trained_tiny_checkpoint)
    torch.manual_seed(0)
    untrained = build_sam("tiny")
    # Unseen scenes of the kind the fixture model trained on (another seed stream).
    samples = []
    for i in range(4):
        scene = generate_scene(scene_rng(4242, i), (256, 256), **FIXTURE_SCENES)
        samples.append(EvalSample(image=scene.image, masks=scene.masks, image_id=f"s{i}"))
    metrics = evaluate_interactive(model, samples, max_clicks=5)
    assert metrics.images == 4 and metrics.objects == sum(len(s.masks) for s in samples)
    baseline = evaluate_interactive(untrained, samples, max_clicks=2)
    # A few CPU minutes from random weights: useful on simple scenes, far above random weights
    # (measured: mIoU@1 0.42 and box 0.42 against 0.05 untrained).
    assert metrics.miou_1click > 0.25 and metrics.box_miou > 0.25
    assert metrics.miou_1click > 3 * baseline.miou_1click
    assert metrics.box_miou > 3 * baseline.box_miou
    assert 1 <= metrics.noc85 <= metrics.noc90 <= 5
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


def _fixture_samples(n: int) -> list[EvalSample]:
    from engine.synthetic import generate_scene, scene_rng
    from tests.fixtures.models import FIXTURE_SCENES

    samples = []
    for i in range(n):
        scene = generate_scene(scene_rng(4343, i), (256, 256), **FIXTURE_SCENES)
        samples.append(EvalSample(image=scene.image, masks=scene.masks, image_id=f"s{i}"))
    return samples


def test_zoom_in_that_never_crops_matches_the_whole_image_run(
    trained_tiny_checkpoint: str,
) -> None:
    model = build_sam("tiny", checkpoint=trained_tiny_checkpoint)
    samples = _fixture_samples(2)
    batched = evaluate_interactive(model, samples, max_clicks=6, zoom_in=None)
    # Every crop would cover 3/4 of the image: one object at a time, on the whole image.
    never = ZoomIn(min_fraction=0.75, max_fraction=0.75)
    one_by_one = evaluate_interactive(model, samples, max_clicks=6, zoom_in=never)
    for key, value in batched.to_dict().items():
        assert one_by_one.to_dict()[key] == pytest.approx(value, abs=0.01), key


def test_zoom_in_encodes_a_crop_for_a_small_object_and_not_for_a_large_one(
    trained_tiny_checkpoint: str,
) -> None:
    model = build_sam("tiny", checkpoint=trained_tiny_checkpoint)
    (scene,) = _fixture_samples(1)
    small = np.zeros((1, 256, 256), dtype=bool)
    small[0, 100:112, 60:74] = True
    large = np.zeros((1, 256, 256), dtype=bool)
    large[0, 10:240, 20:250] = True
    encoded: list[tuple[int, ...]] = []
    hook = model.image_encoder.register_forward_hook(
        lambda _m, args, _out: encoded.append(tuple(args[0].shape))
    )
    try:
        evaluate_interactive(model, [EvalSample(scene.image, large)], max_clicks=3)
        assert len(encoded) == 1  # the whole image only
        metrics = evaluate_interactive(model, [EvalSample(scene.image, small)], max_clicks=3)
    finally:
        hook.remove()
    # The whole image, then at least one crop (the box's is certain: a 14x12 box is far under
    # 3/4 of the image), resized to the model's full input.
    assert len(encoded) >= 1 + 2 and set(encoded) == {(1, 3, 256, 256)}
    assert metrics.objects == 1
