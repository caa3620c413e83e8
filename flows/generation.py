"""Stage 2's pre-labels: the automatic generator's confident masks on stored images, as records.

Library code (no Prefect). Nothing is written here: the pre-labels go to the annotators as
predictions, and only what they keep reaches the store (stage 3, which stores everything the
generator gives, uses :func:`engine.amg.generate_for_images`). Image embeddings come from (and go
to) the store per (image, model version), so a rerun of the round skips the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from storage.mask_store import MaskRecord

if TYPE_CHECKING:
    from storage.mask_store import MaskStore

__all__ = ["GeneratorSettings", "generate_records"]


@dataclass(frozen=True)
class GeneratorSettings:
    """The generator arguments a stage sets (names and meanings of SAM's generator, plus the
    model's gate calibration: see :mod:`engine.amg.calibration`)."""

    points_per_side: int = 16
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    crop_n_layers: int = 0
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    max_mask_region_fraction: float | None = 0.95
    points_per_batch: int = 64
    stability_score_offset: float = 1.0
    iou_calibration: dict[str, Any] | None = None

    def kwargs(self) -> dict[str, Any]:
        return {
            "stability_score_offset": self.stability_score_offset,
            "iou_calibration": self.iou_calibration,
            "points_per_side": self.points_per_side,
            "pred_iou_thresh": self.pred_iou_thresh,
            "stability_score_thresh": self.stability_score_thresh,
            "crop_n_layers": self.crop_n_layers,
            "crop_n_points_downscale_factor": self.crop_n_points_downscale_factor,
            "min_mask_region_area": self.min_mask_region_area,
            "max_mask_region_fraction": self.max_mask_region_fraction,
            "points_per_batch": self.points_per_batch,
        }


def generate_records(
    store: MaskStore,
    model: Any,
    image_ids: Sequence[str],
    *,
    settings: GeneratorSettings,
    stage: int,
    round: int,
    run_id: str,
    model_version: str,
    source: str,
) -> list[MaskRecord]:
    """Run the generator on each image and return one record per mask.

    Args:
        store: where the images (and cached embeddings) are.
        model: the ``Sam`` that generates.
        image_ids: the images, registered in ``store``.
        settings: the generator's thresholds and grid.
        stage, round, run_id: the records' provenance.
        model_version: the registry version of ``model`` (also keys the embedding cache).
        source: the records' source (``"model"`` for pre-labels).
    """
    from engine import EmbeddingCache
    from engine.amg.batch import mask_records
    from engine.amg.generator import AutomaticMaskGenerator

    generator = AutomaticMaskGenerator(model, **settings.kwargs())
    cache = EmbeddingCache(model_version, store=store)
    records: list[MaskRecord] = []
    for image_id in image_ids:
        image = np.array(store.load_image(image_id))
        masks = generator.generate(image, image_id=image_id, embeddings=cache)
        records.extend(
            mask_records(
                image_id,
                masks,
                round=round,
                run_id=run_id,
                model_version=model_version,
                stage=stage,
                source=source,
            )
        )
    return records
