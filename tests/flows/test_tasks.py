"""The thin tasks, called with ``task.fn()`` (no flow run): each does its one library call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prefect.logging import disable_run_logger

from flows.config import EngineConfig, parse_config
from flows.report.summary import read_round_manifests
from flows.sources import prepare_source
from flows.tasks import (
    base_model,
    commit_masks,
    prepare_dataset,
    record_round,
    registry_for,
    retrain_model,
    round_image_ids,
    store_for,
)
from storage import rle as rle_codec
from storage.errors import ImageError
from storage.mask_store import MaskRecord
from tests.flows.conftest import TINY_TRAINING, tiny_engine_config


@pytest.fixture
def config(tmp_path: Path) -> EngineConfig:
    config = parse_config(
        {
            "root": str(tmp_path / "root"),
            "source": {"holdout_images": 1, "image_size": 48},
            "stage1": {"rounds": 2, "images_per_round": 2},
            "stage2": {"rounds": 1, "images_per_round": 3},
            "stage3": {"rounds": 1, "images_per_round": 1},
        }
    )
    prepare_source(store_for(config), config)
    return config


def _mask(image_id: str, k: int, run_id: str) -> MaskRecord:
    mask = np.zeros((1, 48, 48), bool)
    mask[0, k : k + 5, 3:9] = True
    return MaskRecord(image_id, rle_codec.encode(mask)[0], 1, 0, "manual", run_id)


def test_round_images_are_fixed_disjoint_slices_of_the_pool(config: EngineConfig) -> None:
    with disable_run_logger():
        batches = {
            (s, r): round_image_ids.fn(config, s, r) for s, r in ((1, 0), (1, 1), (2, 0), (3, 0))
        }
        again = round_image_ids.fn(config, 2, 0)
    assert [len(b) for b in batches.values()] == [2, 2, 3, 1]
    flat = [i for b in batches.values() for i in b]
    assert len(flat) == len(set(flat)) == 8
    assert again == batches[(2, 0)]
    holdout = {r.image_id for r in store_for(config).images("holdout")}
    assert not holdout & set(flat)


def test_commit_masks_once_per_run_id_and_never_twice(config: EngineConfig) -> None:
    image_ids = round_image_ids.fn(config, 1, 0)
    ours = [_mask(image_ids[0], 2, "engine"), _mask(image_ids[1], 7, "engine")]
    theirs = [_mask(image_ids[0], 20, "label-studio-7.1")]
    store = store_for(config)
    store.write_masks(theirs, stage=1, round=0, run_id="label-studio-7.1")  # reconciled already
    with disable_run_logger():
        first = commit_masks.fn(config, ours + theirs, 1, 0)
        second = commit_masks.fn(config, ours + theirs, 1, 0)
    assert first["masks"] == 3 and first["masks_new"] == 2
    assert second["masks_new"] == 0 and second["sequence"] == first["sequence"]
    assert store.count_masks(stage=1, round=0, split="pool") == 3
    runs = sorted(c.run_id for c in store.commits() if c.stage == 1 and c.files)
    assert runs == ["coco-import", "engine", "label-studio-7.1"]


def test_record_round_writes_a_manifest_the_report_reads(config: EngineConfig) -> None:
    manifest = {"stage": 2, "round": 0, "image_ids": ["a", "b"], "masks": 5, "masks_new": 5}
    with disable_run_logger():
        key = record_round.fn(config, manifest)
    assert key.endswith("stage2-round000.json")
    assert read_round_manifests(store_for(config))[(2, 0)] == manifest


@pytest.mark.parametrize(("replay_fraction", "expected"), [(None, 0.5), (0.0, None)])
def test_a_retrain_rehearses_the_base_models_pretraining_scenes(
    tmp_path: Path, replay_fraction: float | None, expected: float | None
) -> None:
    train = {**TINY_TRAINING, "replay_fraction": replay_fraction}
    config = tiny_engine_config(tmp_path / "root", stage1={"train": train})
    store = store_for(config)
    prepare_source(store, config)
    image_ids = round_image_ids.fn(config, 1, 0)
    with disable_run_logger():
        dataset = prepare_dataset.fn(config)
        mask = np.zeros((1, 96, 96), bool)  # tiny_engine_config's images are 96 px
        mask[0, 20:60, 30:50] = True
        record = MaskRecord(image_ids[0], rle_codec.encode(mask)[0], 1, 0, "manual", "engine")
        commit_masks.fn(config, [record], 1, 0)
        base = base_model.fn(config, dataset)
        trained = retrain_model.fn(config, dataset, base, 1, 0)
    card = registry_for(config).get(trained["version"])
    assert card.trained_on["masks"] == 1  # the store's snapshot, as without replay
    replay = card.trained_on.get("replay")
    assert (replay or {}).get("fraction") == expected
    if expected is not None:
        assert replay["source"] == "synthetic"


def test_gate_calibration_is_fitted_once_and_kept_in_the_card(tmp_path: Path) -> None:
    from engine.amg import GateCalibration
    from engine.evaluation.interactive import EvalSample
    from engine.registry import ModelRegistry
    from engine.synthetic import generate_scene
    from flows.versions import gate_calibration
    from storage.mask_store import MaskStore
    from tests.fixtures.models import sharp_tiny_model

    registry = ModelRegistry(MaskStore(str(tmp_path / "store")))
    version = registry.register(sharp_tiny_model()).version
    scene = generate_scene(np.random.default_rng(5), (64, 64))
    reads = []

    def holdout() -> list[EvalSample]:
        reads.append(1)
        return [EvalSample(image=scene.image, masks=scene.masks, image_id="h0")]

    first = gate_calibration(registry, version, holdout)
    assert reads == [1] and first.images == 1 and first.masks >= 20
    assert registry.get(version).calibration == first.to_dict()
    # Read back from the card: the holdout is not read again, the answer is the same.
    again = gate_calibration(registry, version, holdout)
    assert reads == [1] and again == GateCalibration.from_dict(first.to_dict())

    other = registry.register(sharp_tiny_model()).version
    with pytest.raises(ImageError, match="cannot calibrate v0002"):
        gate_calibration(registry, other, list)
