"""engine.registry: versions, cards, promotion only when not worse, loading."""

from __future__ import annotations

import json

import pytest
import torch

from engine.builder import build_sam
from engine.evaluation.metrics import InteractiveMetrics
from engine.registry import ModelRegistry
from storage.errors import CheckpointError, NotFoundError
from storage.mask_store import MaskStore
from tests.fixtures.s3 import StoreRoot

_GOOD = InteractiveMetrics(0.70, 0.85, 3.0, 4.5, 0.80, images=4, objects=20)
_WORSE = InteractiveMetrics(0.65, 0.85, 3.2, 4.5, 0.80, images=4, objects=20)
_BETTER = InteractiveMetrics(0.75, 0.88, 2.5, 4.0, 0.82, images=4, objects=20)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_sam("tiny", image_size=64)


def test_register_promote_latest_and_load(store_root: StoreRoot) -> None:
    store = MaskStore(store_root.root, endpoint_url=store_root.endpoint_url)
    registry = ModelRegistry(store)
    assert registry.versions() == [] and registry.latest() is None

    first = registry.register(
        _model(0),
        trained_on={"commit_sequence": 3, "stages": [1], "masks": 40},
        steps=100,
        wall_time_s=12.5,
        metrics=_GOOD,
    )
    assert first.version == "v0001" and not first.promoted
    first = registry.promote("v0001")  # no parent: nothing to be worse than
    assert first.promoted and registry.latest().version == "v0001"

    worse = registry.register(_model(1), parent="v0001", steps=50, metrics=_WORSE)
    worse = registry.promote(worse.version)
    assert worse.version == "v0002" and not worse.promoted
    # Both numbers are recorded either way, with the metrics that got worse.
    assert worse.parent_metrics == _GOOD.to_dict() and worse.metrics == _WORSE.to_dict()
    assert worse.promotion["regressions"] == ["miou_1click", "noc85"]
    assert registry.latest().version == "v0001"

    better = registry.promote(registry.register(_model(2), parent="v0002", metrics=_BETTER).version)
    assert better.promoted and registry.latest().version == "v0003"
    assert [c.version for c in registry.versions()] == ["v0001", "v0002", "v0003"]

    card = json.loads(store.get_object("models/v0001/card.json"))
    assert card["trained_on"] == {"commit_sequence": 3, "stages": [1], "masks": 40}
    assert card["steps"] == 100 and card["wall_time_s"] == 12.5 and card["variant"] == "tiny"

    loaded = registry.load("latest")
    for (name, a), (_, b) in zip(
        _model(2).state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_parent_metrics_measured_alongside_win_over_the_parent_card(tmp_path) -> None:
    registry = ModelRegistry(MaskStore(str(tmp_path)))
    registry.promote(registry.register(_model(0), metrics=_BETTER).version)
    # On today's (harder) holdout the parent scores _WORSE; the child beats that: promoted.
    card = registry.register(_model(1), parent="v0001", metrics=_GOOD, parent_metrics=_WORSE)
    assert registry.promote(card.version).promoted


def test_missing_versions_and_metrics(tmp_path) -> None:
    registry = ModelRegistry(MaskStore(str(tmp_path)))
    with pytest.raises(NotFoundError, match="v0009"):
        registry.get("v0009")
    with pytest.raises(NotFoundError, match="not a version name"):
        registry.get("../etc")
    with pytest.raises(NotFoundError, match="no promoted model"):
        registry.load("latest")
    card = registry.register(_model(0))
    with pytest.raises(CheckpointError, match="no holdout metrics"):
        registry.promote(card.version)


def test_checkpoint_of_another_variant_is_refused(tmp_path) -> None:
    from engine.checkpoint import load_checkpoint

    registry = ModelRegistry(MaskStore(str(tmp_path)))
    card = registry.register(_model(0))
    with pytest.raises(CheckpointError, match="not 'vit_b'"):
        load_checkpoint(registry.checkpoint_uri(card.version), variant="vit_b")
