"""AutomaticMaskGenerator against a literal implementation of the published algorithm, plus its
arguments, outputs and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.amg import AutomaticMaskGenerator, paper_preset
from engine.embeddings import EmbeddingCache
from engine.synthetic import generate_scene
from storage import rle
from storage.errors import ConfigError, ImageError
from tests.engine.amg.reference_amg import reference_generate
from tests.fixtures.models import sharp_tiny_model


@pytest.fixture(scope="module")
def sharp_tiny():
    """A random-weight tiny model whose logits are scaled up so that masks have confident,
    varied shapes and stability scores (plain random weights give logits near 0)."""
    return sharp_tiny_model()


@pytest.fixture(scope="module")
def scene_image() -> np.ndarray:
    return generate_scene(np.random.default_rng(0), (96, 128)).image


@pytest.fixture(scope="module")
def cache() -> EmbeddingCache:
    """Shared by the tests that only look at layer 0, so the encoder runs once for them."""
    return EmbeddingCache("sharp-tiny")


def _generate(model, image, cache, **kwargs) -> list[dict]:
    return AutomaticMaskGenerator(model, **kwargs).generate(
        image, image_id="scene", embeddings=cache
    )


def _assert_same_masks(ours: list[dict], reference: list) -> None:
    """One-to-one: each of ours matches a reference mask at IoU >= 0.95 with equal scores."""
    assert len(ours) == len(reference)
    if not ours:
        return
    ref_rles = rle.encode(np.stack([r.mask for r in reference]))
    ious = rle.iou([o["segmentation"] for o in ours], ref_rles)
    unmatched = set(range(len(reference)))
    for i, mask in enumerate(ours):
        candidates = [
            j
            for j in unmatched
            if ious[i, j] >= 0.95
            and abs(mask["predicted_iou"] - reference[j].predicted_iou) <= 1e-3
            and _close(mask["stability_score"], reference[j].stability_score)
        ]
        assert candidates, f"mask {i} has no reference match"
        best = max(candidates, key=lambda j: ious[i, j])
        unmatched.remove(best)
        np.testing.assert_allclose(mask["point_coords"][0], reference[best].point, atol=1e-6)
        x0, y0, x1, y1 = reference[best].crop_box
        assert mask["crop_box"] == [x0, y0, x1 - x0, y1 - y0]


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-3


# Random weights give masks spread over the whole crop, so NMS at the usual thresholds keeps
# one of them; the cases with NMS at 1.0 let every mask through the other steps.
EQUIVALENCE_CASES = {
    "no_filters": dict(points_per_side=5, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                       box_nms_thresh=1.0),
    "filters_and_nms": dict(points_per_side=6, pred_iou_thresh=0.1, stability_score_thresh=0.2,
                            box_nms_thresh=0.7),
    "crops_clean_up_fraction": dict(points_per_side=4, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.1, box_nms_thresh=0.95,
                                    crop_n_layers=1, crop_n_points_downscale_factor=2,
                                    min_mask_region_area=25, max_mask_region_fraction=0.4),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EQUIVALENCE_CASES))
def test_same_masks_as_the_published_algorithm(sharp_tiny, scene_image, case) -> None:
    kwargs = EQUIVALENCE_CASES[case]
    reference_kwargs = {k: v for k, v in kwargs.items() if k != "max_mask_region_fraction"}
    reference = reference_generate(
        sharp_tiny,
        scene_image,
        points_per_batch=7,
        max_fraction=kwargs.get("max_mask_region_fraction"),
        **reference_kwargs,
    )
    generator = AutomaticMaskGenerator(sharp_tiny, points_per_batch=7, **kwargs)
    ours = generator.generate(scene_image)
    assert len(ours) >= 1, "the case should let masks through"
    _assert_same_masks(ours, reference)


def test_small_upsample_chunks_change_nothing(sharp_tiny, scene_image) -> None:
    kwargs = EQUIVALENCE_CASES["filters_and_nms"]
    whole = AutomaticMaskGenerator(sharp_tiny, **kwargs).generate(scene_image)
    chunked = AutomaticMaskGenerator(sharp_tiny, upsample_pixels=1, **kwargs).generate(scene_image)
    assert [m["segmentation"] for m in whole] == [m["segmentation"] for m in chunked]


def test_records_have_the_sa1b_fields(sharp_tiny, scene_image, cache) -> None:
    masks = _generate(sharp_tiny, scene_image, cache, **EQUIVALENCE_CASES["no_filters"])
    for m in masks:
        seg = m["segmentation"]
        assert seg["size"] == [96, 128] and isinstance(seg["counts"], str)
        assert m["area"] == int(rle.area([seg])[0]) > 0
        assert m["bbox"] == rle.to_bbox([seg])[0].tolist()
        assert len(m["point_coords"]) == 1 and len(m["crop_box"]) == 4
        assert isinstance(m["predicted_iou"], float) and isinstance(m["stability_score"], float)


def test_output_modes(sharp_tiny, scene_image, cache) -> None:
    kwargs = dict(EQUIVALENCE_CASES["no_filters"], points_per_side=2)
    coco = _generate(sharp_tiny, scene_image, cache, **kwargs)
    binary = _generate(sharp_tiny, scene_image, cache, output_mode="binary_mask", **kwargs)
    raw = _generate(sharp_tiny, scene_image, cache, output_mode="uncompressed_rle", **kwargs)
    assert len(coco) == len(binary) == len(raw) > 0
    for c, b, r in zip(coco, binary, raw, strict=True):
        assert b["segmentation"].dtype == bool and b["segmentation"].shape == (96, 128)
        np.testing.assert_array_equal(b["segmentation"], rle.decode([c["segmentation"]])[0])
        assert rle.validate(r["segmentation"]) == c["segmentation"]


def test_whole_image_filter_drops_large_masks(sharp_tiny, scene_image, cache) -> None:
    kwargs = EQUIVALENCE_CASES["no_filters"]
    unfiltered = _generate(sharp_tiny, scene_image, cache, **kwargs)
    limit = 0.4
    filtered = _generate(sharp_tiny, scene_image, cache, max_mask_region_fraction=limit, **kwargs)
    image_area = 96 * 128
    assert all(m["area"] < limit * image_area for m in filtered)
    assert len(filtered) < len(unfiltered)
    assert len(filtered) == sum(m["area"] < limit * image_area for m in unfiltered)


def test_default_thresholds_on_random_weights_give_nothing_confident(
    sharp_tiny, scene_image, cache
) -> None:
    # Predicted IoU of random weights stays far below the default 0.88.
    assert _generate(sharp_tiny, scene_image, cache, points_per_side=4) == []


def test_embedding_cache_is_reused(sharp_tiny, scene_image) -> None:
    cache = EmbeddingCache("test-model")
    generator = AutomaticMaskGenerator(
        sharp_tiny, **dict(EQUIVALENCE_CASES["no_filters"], points_per_side=2)
    )
    first = generator.generate(scene_image, image_id="img-1", embeddings=cache)
    second = generator.generate(scene_image, image_id="img-1", embeddings=cache)
    assert cache.stats.computed == 1 and cache.stats.memory_hits == 1
    assert [m["segmentation"] for m in first] == [m["segmentation"] for m in second]


def test_paper_preset() -> None:
    preset = paper_preset()
    assert preset["crop_n_layers"] == 2
    assert preset["crop_n_points_downscale_factor"] == 2
    assert preset["min_mask_region_area"] == 100
    assert preset["max_mask_region_fraction"] == 0.95
    assert preset["points_per_side"] == 32
    assert preset["pred_iou_thresh"] == 0.88 and preset["stability_score_thresh"] == 0.95
    preset["crop_n_layers"] = 0
    assert paper_preset()["crop_n_layers"] == 2  # a fresh dict each call


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(points_per_side=None),
        dict(point_grids=[np.zeros((4, 2))]),  # both given
        dict(output_mode="polygon"),
        dict(points_per_batch=0),
        dict(box_nms_thresh=1.5),
        dict(max_mask_region_fraction=0.0),
        dict(points_per_side=None, point_grids=[np.full((4, 2), 2.0)]),
        dict(points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1),
        dict(points_per_side=2, crop_n_layers=2, crop_n_points_downscale_factor=2),
    ],
)
def test_bad_arguments_are_refused(sharp_tiny, kwargs) -> None:
    with pytest.raises(ConfigError):
        AutomaticMaskGenerator(sharp_tiny, **kwargs)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((10, 10), dtype=np.uint8),  # grayscale: decode_image converts, generate does not
        np.zeros((10, 10, 4), dtype=np.uint8),
        np.zeros((10, 10, 3), dtype=np.uint16),
        np.zeros((0, 10, 3), dtype=np.uint8),
        [[1, 2, 3]],
    ],
)
def test_bad_images_are_refused(sharp_tiny, image) -> None:
    with pytest.raises(ImageError):
        AutomaticMaskGenerator(sharp_tiny, points_per_side=2).generate(image)
