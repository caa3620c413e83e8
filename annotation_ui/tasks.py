"""Label Studio tasks from registered images, predictions from our masks, and project set-up.

A task's data holds the image URL under the labeling config's image key plus our ``image_id`` (and
the size in pixels), so every annotation that comes back names its image without guessing:

- a local image must lie under Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT``; its URL is
  ``/data/local-files/?d=<path relative to the root>``, served through a local-files storage
  connected on the images' folder;
- an S3 image keeps its ``s3://bucket/key`` URI; an S3 source storage connected on the bucket
  (with the MinIO/moto endpoint if any) makes Label Studio presign it when the task is opened.

:func:`setup_project` is idempotent: it reuses the project, storages and ML backend, adds tasks
only for images the project lacks, and predictions only for tasks without one of the same model
version.
"""

from __future__ import annotations

import os
import posixpath
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from annotation_ui.client import LabelStudioClient, Project, ProjectKey
from annotation_ui.labeling_config import LabelingSchema
from annotation_ui.regions import brush_result
from storage.errors import ConfigError
from storage.mask_store import ImageRecord, MaskRecord

__all__ = [
    "S3Access",
    "SetupReport",
    "image_url",
    "prediction_for_task",
    "setup_project",
    "task_data",
]


@dataclass(frozen=True)
class S3Access:
    """How Label Studio reaches S3 images: endpoint (MinIO, moto) and optional credentials.

    ``credentials`` is (access key id, secret); None leaves them to Label Studio's environment.
    """

    endpoint_url: str | None = None
    region: str | None = None
    credentials: tuple[str, str] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SetupReport:
    """What :func:`setup_project` did."""

    project: Project
    created: bool
    tasks_added: int
    tasks_present: int
    predictions_added: int
    storages: tuple[int, ...]
    ml_backend_id: int | None


def image_url(record: ImageRecord, *, document_root: Path | None) -> str:
    """The URL Label Studio loads the image from (see the module docstring).

    Raises :class:`ConfigError` for a local image when ``document_root`` is None or the image
    is not under it, and for a URI that is neither a local path nor ``s3://``.
    """
    uri = record.uri
    if uri.startswith("s3://"):
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if not os.path.isabs(uri):
        raise ConfigError(
            f"image {record.image_id!r} has uri {record.uri!r}; expected an "
            "absolute path or s3:// URI"
        )
    if document_root is None:
        raise ConfigError(
            f"image {record.image_id!r} is a local file ({uri}); Label Studio serves local "
            "files only under LOCAL_FILES_DOCUMENT_ROOT: give the document root"
        )
    root = os.path.realpath(document_root)
    path = os.path.realpath(uri)
    if os.path.commonpath([root, path]) != root:
        raise ConfigError(
            f"image {record.image_id!r} at {path} is outside Label Studio's document root "
            f"{root}; move the images under it (LOCAL_FILES_DOCUMENT_ROOT)"
        )
    relative = Path(os.path.relpath(path, root)).as_posix()
    return f"/data/local-files/?d={quote(relative)}"


def task_data(
    record: ImageRecord, schema: LabelingSchema, *, document_root: Path | None
) -> dict[str, Any]:
    """A task's ``data``: the image URL under the config's image key, our id and the size."""
    return {
        schema.image_value: image_url(record, document_root=document_root),
        "image_id": record.image_id,
        "width": record.width,
        "height": record.height,
    }


def prediction_for_task(
    task_id: int,
    masks: Sequence[MaskRecord],
    *,
    schema: LabelingSchema,
    model_version: str,
    label: str,
) -> dict[str, Any]:
    """A Label Studio prediction holding ``masks`` (one brush region each) for a task.

    Region ids derive from the masks' ids when they have one, so the same masks imported twice
    give the same regions. The prediction's score is the mean predicted IoU.
    """
    result = []
    scores = []
    for i, mask in enumerate(masks):
        region_id = (mask.mask_id or f"m{i}")[:16]
        result.append(
            brush_result(
                mask.segmentation,
                schema=schema,
                label=label,
                region_id=region_id,
                score=mask.predicted_iou,
            )
        )
        if mask.predicted_iou is not None:
            scores.append(float(mask.predicted_iou))
    prediction: dict[str, Any] = {"task": task_id, "result": result, "model_version": model_version}
    if scores:
        prediction["score"] = sum(scores) / len(scores)
    return prediction


def setup_project(
    client: LabelStudioClient,
    key: ProjectKey,
    images: Sequence[ImageRecord],
    *,
    classes: Sequence[str] | None = None,
    document_root: Path | None = None,
    s3: S3Access | None = None,
    ml_backend_url: str | None = None,
    ml_backend_auth: tuple[str, str] | None = None,
    predictions: Mapping[str, Sequence[MaskRecord]] | None = None,
    model_version: str | None = None,
) -> SetupReport:
    """Create or reuse the project for ``key`` and give it one task per image.

    Connects the storages the images need, imports the missing tasks, imports ``predictions``
    (``image_id -> masks``, stage 2) as ``model_version``, and attaches the ML backend at
    ``ml_backend_url``. Raises :class:`ConfigError` before touching Label Studio if an image
    cannot be served (see :func:`image_url`) or predictions come without a model version.
    """
    if predictions and not model_version:
        raise ConfigError("predictions need a model_version (shown in Label Studio)")
    unknown = set(predictions or ()) - {r.image_id for r in images}
    if unknown:
        raise ConfigError(f"predictions for images not in the set-up: {sorted(unknown)[:5]}")
    project, created = client.ensure_project(key, classes=classes)
    datas = [task_data(r, project.schema, document_root=document_root) for r in images]
    storages = _connect_storages(client, project.id, images, document_root, s3)
    present = client.task_image_ids(project.id)
    new = [(r, d) for r, d in zip(images, datas, strict=True) if r.image_id not in present]
    ids = client.import_tasks(project.id, [{"data": d} for _, d in new])
    task_ids = dict(present)
    task_ids.update({r.image_id: t for (r, _), t in zip(new, ids, strict=True)})
    added_predictions = 0
    if predictions and model_version:
        added_predictions = _import_predictions(
            client, project, task_ids, predictions, model_version
        )
    backend_id = None
    if ml_backend_url:
        backend_id = client.attach_ml_backend(
            project.id, ml_backend_url, basic_auth=ml_backend_auth
        )
    return SetupReport(
        project=project,
        created=created,
        tasks_added=len(ids),
        tasks_present=len(images) - len(new),
        predictions_added=added_predictions,
        storages=storages,
        ml_backend_id=backend_id,
    )


def _connect_storages(
    client: LabelStudioClient,
    project_id: int,
    images: Sequence[ImageRecord],
    document_root: Path | None,
    s3: S3Access | None,
) -> tuple[int, ...]:
    local_dirs = sorted(
        {
            os.path.dirname(os.path.realpath(r.uri.removeprefix("file://")))
            for r in images
            if not r.uri.startswith("s3://")
        }
    )
    by_bucket: dict[str, list[str]] = defaultdict(list)
    for r in images:
        if r.uri.startswith("s3://"):
            bucket, _, key = r.uri[len("s3://") :].partition("/")
            by_bucket[bucket].append(posixpath.dirname(key))
    ids: list[int] = []
    if local_dirs:
        # One storage on the deepest folder holding every image: Label Studio serves a file
        # when its folder starts with a storage's path.
        ids.append(client.connect_local_storage(project_id, os.path.commonpath(local_dirs)))
    access = s3 or S3Access()
    for bucket, folders in sorted(by_bucket.items()):
        prefix = posixpath.commonpath(folders) if all(folders) else ""
        ids.append(
            client.connect_s3_storage(
                project_id,
                bucket=bucket,
                prefix=prefix,
                endpoint_url=access.endpoint_url,
                region=access.region,
                credentials=access.credentials,
            )
        )
    return tuple(ids)


def _import_predictions(
    client: LabelStudioClient,
    project: Project,
    task_ids: Mapping[str, int],
    predictions: Mapping[str, Sequence[MaskRecord]],
    model_version: str,
) -> int:
    have = {
        int(t["id"])
        for t in client.iter_tasks(project.id)
        for p in t.get("predictions") or []
        if p.get("model_version") == model_version
    }
    label = project.schema.classes[0] if project.schema.classes else "object"
    batch = []
    for image_id, masks in predictions.items():
        task_id = task_ids[image_id]
        if task_id in have or not masks:
            continue
        batch.append(
            prediction_for_task(
                task_id, masks, schema=project.schema, model_version=model_version, label=label
            )
        )
    added = client.import_predictions(project.id, batch) if batch else 0
    client.set_model_version(project.id, model_version)
    return added
