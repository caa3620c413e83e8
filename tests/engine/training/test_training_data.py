"""engine.training.data: store snapshots, holdout leaks, augmentation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.training.data import (
    AugmentConfig,
    ReplayTrainingData,
    StoreTrainingData,
    SyntheticTrainingData,
    augment,
)
from storage.errors import TrainingError
from storage.mask_store import MaskStore
from tests.fixtures.models import make_synthetic_store


def test_samples_come_from_pool_masks_resized_to_the_input(synthetic_store: MaskStore) -> None:
    data = StoreTrainingData(synthetic_store, 64, augment=AugmentConfig(scale_range=(1.0, 1.0)))
    pool_ids = {r.image_id for r in synthetic_store.images(split="pool")}
    assert set(data.image_ids) <= pool_ids and data.image_ids
    rng = np.random.default_rng(0)
    for _ in range(4):
        sample = data.sample(rng)
        # 96x128 images: the long side becomes 64, the short side 48 (padding comes later).
        assert sample.image.shape == (3, 48, 64) and sample.image.dtype == torch.float32
        assert sample.masks.shape[1:] == (64, 64) and sample.masks.dtype == torch.bool
        assert not sample.masks[:, 48:].any()  # nothing in the padding
        assert sample.masks.flatten(1).sum(1).min() >= data.augment.min_mask_area
    described = data.describe()
    assert described["images"] == 6 and described["stages"] == [1]
    assert described["masks"] == sum(1 for r in synthetic_store.mask_records(split="pool"))
    assert described["commit_sequence"] == synthetic_store.commits()[-1].sequence


def test_replay_mixes_the_second_source_in_at_its_share(synthetic_store: MaskStore) -> None:
    fixed = AugmentConfig(scale_range=(1.0, 1.0), flip=False)
    store = StoreTrainingData(synthetic_store, 64, augment=fixed)
    scenes = SyntheticTrainingData(64)
    # The store's images are 96x128 (48x64 once resized); synthetic scenes are square.
    for fraction, low, high in ((0.0, 0, 0), (0.25, 30, 70)):
        mixed = ReplayTrainingData(store, scenes, fraction)
        rng = np.random.default_rng(0)
        shapes = [tuple(mixed.sample(rng).image.shape) for _ in range(200)]
        replayed = shapes.count((3, 64, 64))
        assert low <= replayed <= high and replayed + shapes.count((3, 48, 64)) == 200
    described = ReplayTrainingData(store, scenes, 0.5).describe()
    assert described["masks"] == store.describe()["masks"]  # the store's snapshot, unchanged
    assert described["replay"] == {"fraction": 0.5, **scenes.describe()}
    with pytest.raises(TrainingError, match="replay fraction"):
        ReplayTrainingData(store, scenes, 1.0)


def test_filters_that_match_nothing_raise(synthetic_store: MaskStore) -> None:
    with pytest.raises(TrainingError, match="no pool masks"):
        StoreTrainingData(synthetic_store, 64, stages=[3])
    with pytest.raises(TrainingError, match="no pool masks"):
        StoreTrainingData(synthetic_store, 64, sources=["auto"])


def test_empty_store_raises(tmp_path) -> None:
    with pytest.raises(TrainingError, match="no pool masks"):
        StoreTrainingData(MaskStore(str(tmp_path / "empty")), 64)


def test_holdout_overlapping_the_pool_is_refused(tmp_path) -> None:
    store = make_synthetic_store(tmp_path / "s", n_pool=2, n_holdout=1)
    pool = store.images(split="pool")[0]
    # The same file registered again as a holdout image under another id.
    store.add_images([replace(pool, image_id="copy-of-pool", split="holdout")])
    with pytest.raises(TrainingError, match="holdout overlaps"):
        StoreTrainingData(store, 64)


def test_augment_keeps_pixels_and_masks_aligned() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    masks = np.zeros((2, 40, 80), dtype=bool)
    masks[0, 10:30, 5:25] = True  # left square, painted red
    masks[1, 5:35, 50:78] = True  # right block, painted green
    image[masks[0]] = (255, 0, 0)
    image[masks[1]] = (0, 255, 0)
    config = AugmentConfig(scale_range=(0.8, 1.6), flip=True, min_mask_area=1)
    flips = 0
    for _ in range(12):
        sample = augment(image, masks, rng, 64, config)
        assert sample is not None
        img = sample.image.permute(1, 2, 0).numpy()
        h, w = img.shape[:2]
        for mask, channel in zip(sample.masks.numpy(), (0, 1), strict=False):
            inside = mask[:h, :w]
            if inside.sum() > 20:
                # Most pixels of each mask carry its colour (edges may blend after resizing).
                assert (img[inside][:, channel] > 128).mean() > 0.8
        if sample.masks.shape[0] == 2:
            left = sample.masks[0].nonzero()[:, 1].float().mean()
            right = sample.masks[1].nonzero()[:, 1].float().mean()
            flips += int(left > right)
    assert 0 < flips < 12  # some flipped, some not


def test_augment_drops_masks_too_small_or_too_large() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    masks = np.zeros((3, 64, 64), dtype=bool)
    masks[0, :2, :2] = True  # 4 px
    masks[1] = True  # the whole image
    masks[2, 10:30, 10:30] = True
    config = AugmentConfig(scale_range=(1.0, 1.0), flip=False, min_mask_area=12)
    sample = augment(image, masks, rng, 64, config)
    assert sample is not None and sample.masks.shape[0] == 1
    assert augment(image, masks[:2], rng, 64, config) is None


def test_synthetic_data_is_deterministic_given_the_rng() -> None:
    data = SyntheticTrainingData(64)
    a = data.sample(np.random.default_rng(5))
    b = data.sample(np.random.default_rng(5))
    assert torch.equal(a.image, b.image) and torch.equal(a.masks, b.masks)
