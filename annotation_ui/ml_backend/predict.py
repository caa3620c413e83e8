"""What the ML backend answers: masks for Label Studio tasks, as brush regions.

- Interactive (the annotator clicked or drew a box; Label Studio sends a ``context``): the prompts
  go to SAM's predictor on the image's cached embedding, then, for a small object, again on a
  crop around it (zoom-in, ``engine.zoom_in``; ``MlBackendSettings.zoom_in``). One click is
  ambiguous, so SAM's three masks are made and the one with the highest predicted IoU is
  returned (SAM paper, section 3); with several prompts the single-mask output is used.
- Batch (no context: Label Studio asks for pre-annotations of whole tasks): the automatic mask
  generator with a high confidence gate, the stage-2 pre-fill (SAM paper, section 4).

Images are found by the ``image_id`` in the task data and read from the mask store, so it does
not matter how Label Studio serves them (local files, S3, presigned URLs).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from annotation_ui.labeling_config import LabelingSchema
from annotation_ui.ml_backend.models import LoadedModel
from annotation_ui.regions import brush_result, prompts_from_context
from storage import rle as rle_codec
from storage.errors import InvalidInputError
from storage.mask_store import ImageRecord, MaskStore

__all__ = ["BatchOptions", "batch_prediction", "interactive_prediction", "task_image"]


@dataclass(frozen=True)
class BatchOptions:
    """Automatic pre-annotation settings (stage 2's confident masks).

    ``points_per_side`` is the grid; ``pred_iou_thresh`` and ``stability_score_thresh`` the
    gate; ``max_masks`` bounds the regions per task (highest predicted IoU first).
    """

    points_per_side: int = 16
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    max_masks: int = 100


def task_image(store: MaskStore, task: Any) -> ImageRecord:
    """The registered image a task names in ``data.image_id``.

    Raises :class:`InvalidInputError` for a task without one, :class:`NotFoundError` (from the
    store) for an image that is not registered.
    """
    data = task.get("data") if isinstance(task, Mapping) else None
    image_id = data.get("image_id") if isinstance(data, Mapping) else None
    if not isinstance(image_id, str) or not image_id:
        task_id = task.get("id") if isinstance(task, Mapping) else None
        raise InvalidInputError(
            f"task {task_id} has no data.image_id; only tasks created by the engine can be "
            "predicted"
        )
    return store.get_image(image_id)


def interactive_prediction(
    model: LoadedModel,
    store: MaskStore,
    schema: LabelingSchema,
    task: Mapping[str, Any],
    context: Mapping[str, Any],
) -> dict[str, Any]:
    """One prediction (``{"result": [one brush region], "score", "model_version"}``) for the
    prompts in ``context``. Raises :class:`PromptError` for bad prompts."""
    image = task_image(store, task)
    prompts = prompts_from_context(context, schema=schema, height=image.height, width=image.width)
    label = prompts.label if prompts.label in schema.classes else _default_label(schema)
    single_click = prompts.box is None and len(prompts.point_labels) == 1
    with model.lock:
        model.cache.get_or_compute(
            image.image_id, lambda: _pixels(store, image.image_id), model.predictor
        )
        predictor: Any = model.predictor
        if model.zoom_in is not None:
            from engine.zoom_predictor import ZoomInPredictor

            pixels = model.pixels(image.image_id, lambda: _pixels(store, image.image_id))
            predictor = ZoomInPredictor(model.predictor, pixels, model.zoom_in)
        masks, scores, _ = predictor.predict(
            point_coords=prompts.point_coords if len(prompts.point_labels) else None,
            point_labels=prompts.point_labels if len(prompts.point_labels) else None,
            box=prompts.box,
            multimask_output=single_click,
        )
    best = int(np.argmax(scores))
    segmentation = rle_codec.encode(masks[best : best + 1])[0]
    score = float(scores[best])
    region = brush_result(
        segmentation, schema=schema, label=label, region_id=_region_id(), score=score
    )
    return {"result": [region], "score": score, "model_version": model.version}


def batch_prediction(
    model: LoadedModel,
    store: MaskStore,
    schema: LabelingSchema,
    task: Mapping[str, Any],
    options: BatchOptions,
) -> dict[str, Any]:
    """Pre-annotations for a whole task: the generator's confident masks as brush regions."""
    image = task_image(store, task)
    generator = model.generator(
        points_per_side=options.points_per_side,
        pred_iou_thresh=options.pred_iou_thresh,
        stability_score_thresh=options.stability_score_thresh,
    )
    pixels = _pixels(store, image.image_id)
    with model.lock:
        records = generator.generate(pixels, image_id=image.image_id, embeddings=model.cache)
    records.sort(key=lambda r: -float(r["predicted_iou"]))
    records = records[: options.max_masks]
    label = _default_label(schema)
    result = [
        brush_result(
            r["segmentation"],
            schema=schema,
            label=label,
            region_id=_region_id(),
            score=float(r["predicted_iou"]),
        )
        for r in records
    ]
    scores = [float(r["predicted_iou"]) for r in records]
    return {
        "result": result,
        "score": float(np.mean(scores)) if scores else 0.0,
        "model_version": model.version,
    }


def _pixels(store: MaskStore, image_id: str) -> np.ndarray:
    """The image as a writable array: torch warns (and may misbehave) on read-only buffers, and
    decoded images can come back read-only."""
    return np.require(store.load_image(image_id), requirements=["C", "W"])


def _default_label(schema: LabelingSchema) -> str:
    return schema.classes[0] if schema.classes else "object"


def _region_id() -> str:
    # Label Studio region ids are short random strings; they only need to be unique per task.
    return secrets.token_urlsafe(8)[:10]
