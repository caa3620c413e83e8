"""Shared pieces of the annotation_ui tests: a tiny real model, registered models, images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from storage.export import import_dataset
from storage.mask_store import ImageRecord, MaskStore

# The registry needs holdout metrics to promote a version; these are placeholders of the right
# shape (the tests promote versions without parents, which compares nothing).
PLACEHOLDER_METRICS = {
    "miou_1click": 0.5,
    "miou_5click": 0.6,
    "noc85": 5.0,
    "noc90": 6.0,
    "box_miou": 0.6,
    "images": 1,
    "objects": 1,
}


@pytest.fixture(scope="session")
def tiny_model():  # type: ignore[no-untyped-def]
    """A real tiny SAM with random weights (seeded): fast, and enough to test the protocol."""
    import torch

    from engine import build_sam

    torch.manual_seed(0)
    return build_sam("tiny")


def register_model(store: MaskStore, model: object) -> str:
    """Register ``model`` in ``store``'s registry and promote it; return its version."""
    from engine.registry import ModelRegistry

    registry = ModelRegistry(store)
    card = registry.register(model, metrics=dict(PLACEHOLDER_METRICS))
    assert registry.promote(card.version).promoted
    return card.version


def write_images(
    folder: Path, n: int, *, seed: int = 7, size: tuple[int, int] = (64, 96)
) -> list[Path]:
    """Write ``n`` synthetic scenes (PNG) into ``folder``."""
    from engine.synthetic import write_synthetic_dataset

    paths, _ = write_synthetic_dataset(folder, n, seed=seed, size=size)
    return paths


def register_images(
    store: MaskStore, source: str, endpoint_url: str | None = None
) -> list[ImageRecord]:
    """Register the images under ``source`` and return their records in path order."""
    import_dataset(store, source, endpoint_url=endpoint_url)
    by_uri = {r.uri: r for r in store.images()}
    return [by_uri[u] for u in sorted(by_uri) if u.startswith(source.rstrip("/"))]


def box_mask(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """A ``(1, H, W)`` bool mask with one filled rectangle (rows y0:y1, columns x0:x1)."""
    mask = np.zeros((1, height, width), dtype=bool)
    mask[0, y0:y1, x0:x1] = True
    return mask
