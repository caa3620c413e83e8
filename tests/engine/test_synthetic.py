"""engine.synthetic: deterministic, varied scenes whose masks match what is painted."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from engine.synthetic import SHAPES, generate_scene, scene_rng, write_synthetic_dataset
from storage.rle import decode


def test_same_seed_same_scene_and_different_seed_differs() -> None:
    a = generate_scene(np.random.default_rng(7), (96, 128))
    b = generate_scene(np.random.default_rng(7), (96, 128))
    c = generate_scene(np.random.default_rng(8), (96, 128))
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.masks, b.masks)
    assert a.shapes == b.shapes
    assert not np.array_equal(a.image, c.image)


def test_scene_types_and_shapes() -> None:
    scene = generate_scene(np.random.default_rng(0), (96, 128), min_area=30)
    assert scene.image.shape == (96, 128, 3) and scene.image.dtype == np.uint8
    assert scene.masks.dtype == bool and scene.masks.shape[1:] == (96, 128)
    assert scene.masks.shape[0] == len(scene.shapes) >= 1
    assert (scene.masks.reshape(len(scene.masks), -1).sum(1) >= 30).all()


def test_visible_masks_are_disjoint_because_occlusion_is_applied() -> None:
    for i in range(20):
        scene = generate_scene(scene_rng(3, i), (64, 64))
        assert scene.masks.sum(0).max() <= 1


def test_scenes_are_varied() -> None:
    scenes = [generate_scene(scene_rng(1, i), (128, 128)) for i in range(40)]
    shapes = {s for scene in scenes for s in scene.shapes}
    assert shapes == set(SHAPES)
    areas = np.concatenate([scene.masks.reshape(len(scene.masks), -1).sum(1) for scene in scenes])
    assert areas.min() < 150 and areas.max() > 2000  # small and large objects
    # At least one ring keeps its hole: a contour with a child in the two-level hierarchy.
    holes = 0
    for scene in scenes:
        for mask, shape in zip(scene.masks, scene.shapes, strict=True):
            if shape == "ring":
                _, hierarchy = cv2.findContours(
                    mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
                )
                holes += int(hierarchy is not None and (hierarchy[0, :, 3] >= 0).any())
    assert holes > 0
    # Objects are not one flat colour each: many masks have a wide spread of pixel values.
    spreads = [scene.image[mask].std(axis=0).max() for scene in scenes for mask in scene.masks]
    assert np.mean(np.asarray(spreads) > 20) > 0.3


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="too small"):
        generate_scene(np.random.default_rng(0), (8, 8))
    with pytest.raises(ValueError, match="min_objects"):
        generate_scene(np.random.default_rng(0), min_objects=5, max_objects=2)


def test_write_synthetic_dataset_round_trips(tmp_path) -> None:
    paths, coco = write_synthetic_dataset(tmp_path, 3, seed=5, size=(64, 80))
    assert [p.name for p in paths] == [f"synthetic_{i:05d}.png" for i in range(3)]
    on_disk = json.loads((tmp_path / "annotations.json").read_text())
    assert on_disk == coco
    for image_info, path in zip(coco["images"], paths, strict=True):
        i = image_info["id"] - 1
        scene = generate_scene(scene_rng(5, i), (64, 80))
        pixels = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        assert np.array_equal(pixels, scene.image)
        anns = [a for a in coco["annotations"] if a["image_id"] == image_info["id"]]
        masks = decode([a["segmentation"] for a in anns])
        assert np.array_equal(masks, scene.masks)
        assert [a["area"] for a in anns] == [int(m.sum()) for m in scene.masks]
