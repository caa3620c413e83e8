"""Bring finished Label Studio annotations home: reconcile a project into the mask store.

Each brush region of each submitted annotation becomes one :class:`~storage.mask_store.MaskRecord`
(COCO RLE of the task's image, the annotator's e-mail, lead time, prompts used). Its ``mask_id``
is deterministic::

    ls-<project uid>-a<annotation id>-<region hash>-<content hash>
    \\________________ lineage ________________/

The *lineage* names the region (which annotation, which Label Studio region id); the content hash
covers everything the record takes from the annotation: the mask, its label, the annotator, its
share of the lead time, its prompts and the prediction it came from. Reconciling compares the
lineages Label Studio has now with those the store holds for the project:

- same lineage, same id: **unchanged** (nothing written, so running twice changes nothing);
- same lineage, new id (the region was redrawn or relabelled, or an edit of its annotation changed
  its lead-time share or prompts): the new record is written and **replaces** the old one
  (``write_masks(replaces=...)``), which stays in history but is hidden from then on;
- a new lineage: **added**; a lineage gone from Label Studio (region erased, annotation deleted or
  cancelled): **removed** (hidden, nothing written in its place).

All changes go into one commit, so a reader sees the pull entirely or not at all. An annotation
that cannot be used (no result, unknown control, coordinates outside 0-100 %, brush RLE of the
wrong size, a task without a registered image) is reported with its task id and left as the
store has it; the others are still stored. A Label Studio that fails mid-read or while naming
annotators (after the SDK's retries) raises :class:`~storage.errors.AnnotationError` before
anything is written; running it again later stores everything once.

Per-mask numbers: Label Studio times an annotation, not a mask, so each mask gets an equal share of
the annotation's ``lead_time`` (the shares add up to the annotator's time). Each click or box of
the annotation is credited to one mask: a foreground click or box to the smallest mask containing
it, a background click (or one inside no mask) to the mask with the nearest box. ``clicks`` counts
a mask's prompts and ``point_coords`` holds its foreground clicks, in pixels.

Stage 2: a region identical to one of the task's predictions (the annotator accepted it as it was)
is stored with source ``model``, the prediction's model version and score; a changed or new region
is ``manual``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from annotation_ui.client import LabelStudioClient, Project
from annotation_ui.regions import BrushRegion, Prompt, parse_result
from storage import rle as rle_codec
from storage.errors import AnnotationError
from storage.mask_store import ImageRecord, MaskRecord, MaskStore

__all__ = [
    "ItemProblem",
    "PredictedMask",
    "ReconcileReport",
    "annotation_masks",
    "mask_id_prefix",
    "reconcile_project",
]


@dataclass(frozen=True)
class ItemProblem:
    """An annotation (or task) that was not used, and why."""

    task_id: int
    annotation_id: int | None
    message: str

    def __str__(self) -> str:
        what = f"task {self.task_id}"
        if self.annotation_id is not None:
            what += f" annotation {self.annotation_id}"
        return f"{what}: {self.message}"


@dataclass(frozen=True)
class ReconcileReport:
    """The outcome of one reconcile; ``commit`` is the store commit written (None: none)."""

    project_id: int
    added: int
    replaced: int
    unchanged: int
    removed: int
    problems: tuple[ItemProblem, ...]
    commit: int | None


@dataclass(frozen=True)
class PredictedMask:
    """Where a predicted mask came from: the model version and its score (predicted IoU)."""

    model_version: str | None
    score: float | None


def mask_id_prefix(project: Project) -> str:
    """The prefix every mask id of ``project`` starts with."""
    return f"ls-{project.uid}-"


def reconcile_project(
    client: LabelStudioClient, store: MaskStore, project_id: int
) -> ReconcileReport:
    """Reconcile every submitted annotation of a project into ``store`` (module docstring)."""
    project = client.project(project_id)
    tasks = list(client.iter_tasks(project_id))  # all of it, or an AnnotationError
    images = {r.image_id: r for r in store.images()}
    prefix = mask_id_prefix(project)
    stored = [
        m
        for m in store.masks(stage=project.key.stage, round=project.key.round)[
            "mask_id"
        ].to_pylist()
        if m.startswith(prefix)
    ]
    hidden = {m for c in store.commits() for m in c.replaces}
    current: dict[str, MaskRecord] = {}  # lineage -> record
    problems: list[ItemProblem] = []
    for task in tasks:
        task_id = int(task["id"])
        image = _task_image(task, images)
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if isinstance(image, str):
            problems.extend(ItemProblem(task_id, _int(a.get("id")), image) for a in annotations)
            continue
        predicted = _predicted_masks(task, project, image, problems)
        for annotation in annotations:
            annotation_id = _int(annotation.get("id"))
            # Outside the try: Label Studio failing to name the annotator is no fault of the
            # annotation, and stops the reconcile before anything is written.
            annotator = _annotator(client, annotation)
            try:
                masks = annotation_masks(
                    task,
                    annotation,
                    project=project,
                    image=image,
                    predicted=predicted,
                    annotator=annotator,
                    hidden=hidden,
                )
            except AnnotationError as err:
                problems.append(ItemProblem(task_id, annotation_id, str(err)))
                continue
            current.update(masks)
    return _commit(store, project, stored, current, problems)


def annotation_masks(
    task: Mapping[str, Any],
    annotation: Mapping[str, Any],
    *,
    project: Project,
    image: ImageRecord,
    predicted: Mapping[str, PredictedMask] | None = None,
    annotator: str | None = None,
    hidden: set[str] | frozenset[str] = frozenset(),
) -> dict[str, MaskRecord]:
    """The masks of one annotation, keyed by lineage (module docstring).

    ``predicted`` maps the COCO counts of the task's predicted masks to their provenance
    (stage 2). ``hidden`` holds mask ids the store has replaced: an id that would collide with
    one (a region redrawn back to an earlier shape) is salted with the annotation's update time.
    Raises :class:`AnnotationError` if the annotation cannot be used.
    """
    annotation_id = _int(annotation.get("id"))
    where = f"task {task.get('id')} annotation {annotation_id}"
    if annotation_id is None:
        raise AnnotationError(f"{where}: annotation has no id")
    result = annotation.get("result")
    if not result:
        raise AnnotationError(f"{where}: the annotation has no result (nothing was drawn)")
    parsed = parse_result(
        result, schema=project.schema, height=image.height, width=image.width, where=where
    )
    if not parsed.regions:
        raise AnnotationError(f"{where}: the annotation has prompts but no brush mask")
    credited = _credit_prompts(parsed.regions, parsed.prompts)
    lead = annotation.get("lead_time")
    share = float(lead) / len(parsed.regions) if isinstance(lead, int | float) else None
    predicted = predicted or {}
    out: dict[str, MaskRecord] = {}
    for region, prompts in zip(parsed.regions, credited, strict=True):
        lineage = f"{mask_id_prefix(project)}a{annotation_id}-{_short(region.region_id, 8)}"
        if lineage in out:
            raise AnnotationError(f"{where}: region id {region.region_id!r} appears twice")
        accepted = predicted.get(region.segmentation["counts"])
        positives = [list(p.xy) for p in prompts if p.positive and p.kind == "point"]
        record = MaskRecord(
            image_id=image.image_id,
            segmentation=region.segmentation,
            stage=project.key.stage,
            round=project.key.round,
            source="model" if accepted is not None else "manual",
            run_id=_run_id(project),
            predicted_iou=accepted.score if accepted is not None else None,
            point_coords=positives or None,
            model_version=accepted.model_version if accepted is not None else None,
            annotator=annotator,
            lead_time_s=share,
            clicks=len(prompts),
        )
        content = _content(record, region.label)
        mask_id = f"{lineage}-{_short(content)}"
        if mask_id in hidden:
            mask_id = f"{lineage}-{_short(content + '|' + str(annotation.get('updated_at')))}"
        out[lineage] = dataclasses.replace(record, mask_id=mask_id)
    return out


def _content(record: MaskRecord, label: str | None) -> str:
    """What a region's mask id hashes besides its lineage: all the record takes from Label
    Studio, so that any edit of it gives a new id (and the old row is replaced)."""
    return json.dumps(
        [
            record.segmentation["counts"],
            label,
            record.source,
            record.predicted_iou,
            record.model_version,
            record.annotator,
            record.lead_time_s,
            record.clicks,
            record.point_coords,
        ]
    )


def _commit(
    store: MaskStore,
    project: Project,
    stored: Sequence[str],
    current: Mapping[str, MaskRecord],
    problems: list[ItemProblem],
) -> ReconcileReport:
    stored_by_lineage = {m.rsplit("-", 1)[0]: m for m in stored}
    problem_annotations = {
        f"{mask_id_prefix(project)}a{p.annotation_id}-" for p in problems if p.annotation_id
    }
    new: list[MaskRecord] = []
    replaces: list[str] = []
    added = replaced = unchanged = removed = 0
    for lineage, record in current.items():
        old = stored_by_lineage.get(lineage)
        if old == record.mask_id:
            unchanged += 1
            continue
        new.append(record)
        if old is None:
            added += 1
        else:
            replaces.append(old)
            replaced += 1
    for lineage, old in stored_by_lineage.items():
        if lineage in current:
            continue
        annotation = lineage.rsplit("-", 1)[0] + "-"
        if annotation in problem_annotations:
            continue  # a bad annotation leaves what the store has
        # Its region was erased, or its annotation deleted or cancelled in Label Studio (the
        # read covered every task, so absence is real).
        replaces.append(old)
        removed += 1
    commit = None
    if new or replaces:
        info = store.write_masks(
            new,
            stage=project.key.stage,
            round=project.key.round,
            run_id=_run_id(project),
            replaces=replaces,
        )
        commit = info.sequence
    return ReconcileReport(
        project_id=project.id,
        added=added,
        replaced=replaced,
        unchanged=unchanged,
        removed=removed,
        problems=tuple(problems),
        commit=commit,
    )


def _task_image(task: Mapping[str, Any], images: Mapping[str, ImageRecord]) -> ImageRecord | str:
    """The task's registered image, or the reason there is none."""
    data = task.get("data") or {}
    image_id = data.get("image_id")
    if not isinstance(image_id, str) or not image_id:
        return "task data has no image_id; it was not created by the engine"
    image = images.get(image_id)
    if image is None:
        return f"image {image_id!r} is not registered in the store (gone or another dataset)"
    return image


def _predicted_masks(
    task: Mapping[str, Any], project: Project, image: ImageRecord, problems: list[ItemProblem]
) -> dict[str, PredictedMask]:
    out: dict[str, PredictedMask] = {}
    for prediction in task.get("predictions") or []:
        where = f"task {task['id']} prediction {prediction.get('id')}"
        try:
            parsed = parse_result(
                prediction.get("result") or [],
                schema=project.schema,
                height=image.height,
                width=image.width,
                where=where,
            )
        except AnnotationError as err:
            problems.append(ItemProblem(int(task["id"]), None, str(err)))
            continue
        score = prediction.get("score")
        for region in parsed.regions:
            region_score = region.score if region.score is not None else score
            out.setdefault(
                region.segmentation["counts"],
                PredictedMask(
                    prediction.get("model_version") or None,
                    float(region_score) if isinstance(region_score, int | float) else None,
                ),
            )
    return out


def _credit_prompts(
    regions: Sequence[BrushRegion], prompts: Sequence[Prompt]
) -> list[list[Prompt]]:
    credited: list[list[Prompt]] = [[] for _ in regions]
    if not prompts:
        return credited
    if len(regions) == 1:
        credited[0] = list(prompts)
        return credited
    rles = [r.segmentation for r in regions]
    masks = rle_codec.decode(rles)
    areas = rle_codec.area(rles)
    boxes = rle_codec.to_bbox(rles)  # XYWH pixels
    h, w = masks.shape[1:]
    for prompt in prompts:
        x = min(max(int(prompt.xy[0]), 0), w - 1)
        y = min(max(int(prompt.xy[1]), 0), h - 1)
        inside = np.flatnonzero(masks[:, y, x])
        if prompt.positive and inside.size:
            best = int(inside[np.argmin(areas[inside])])
        else:
            best = int(np.argmin(_box_distance2(boxes, prompt.xy)))
        credited[best].append(prompt)
    return credited


def _box_distance2(boxes_xywh: np.ndarray, xy: tuple[float, float]) -> np.ndarray:
    """Squared distance in pixels from a point to each box (0 inside)."""
    x0, y0 = boxes_xywh[:, 0], boxes_xywh[:, 1]
    x1, y1 = x0 + boxes_xywh[:, 2], y0 + boxes_xywh[:, 3]
    dx = np.maximum(0.0, np.maximum(x0 - xy[0], xy[0] - x1))
    dy = np.maximum(0.0, np.maximum(y0 - xy[1], xy[1] - y1))
    return dx * dx + dy * dy


def _annotator(client: LabelStudioClient, annotation: Mapping[str, Any]) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        email = who.get("email")
        if email:
            return str(email)
        who = who.get("id")
    user_id = _int(who)
    return client.user_name(user_id) if user_id is not None else None


def _run_id(project: Project) -> str:
    return f"label-studio-{project.uid}"


def _short(text: str, digits: int = 12) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:digits]


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None
