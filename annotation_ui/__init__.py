"""Label Studio side of the engine: labeling configs, the API client, the ML backend.

Public API (imported lazily, so ``import annotation_ui`` costs nothing)::

    labeling_config(stage, classes) -> str          parse_labeling_config(xml) -> LabelingSchema
    LabelStudioSettings, MlBackendSettings, load_settings(cls, **values)
    LabelStudioClient(settings)                     ProjectKey(dataset, stage, round), Project
    LabelStudioUnavailableError (Label Studio down or 5xx after retries; an AnnotationError)
    setup_project(client, key, images, ...) -> SetupReport          S3Access(endpoint, ...)
    reconcile_project(client, store, project_id) -> ReconcileReport (added/replaced/unchanged)
    annotation_ui.ml_backend: create_app(source, store, ...), build_app(settings), running(app)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from annotation_ui.client import (
        LabelStudioClient,
        LabelStudioUnavailableError,
        Project,
        ProjectKey,
    )
    from annotation_ui.labeling_config import LabelingSchema, labeling_config, parse_labeling_config
    from annotation_ui.reconcile import ItemProblem, ReconcileReport, reconcile_project
    from annotation_ui.settings import LabelStudioSettings, MlBackendSettings, load_settings
    from annotation_ui.tasks import S3Access, SetupReport, setup_project

__all__ = [
    "ItemProblem",
    "LabelStudioClient",
    "LabelStudioSettings",
    "LabelStudioUnavailableError",
    "LabelingSchema",
    "MlBackendSettings",
    "Project",
    "ProjectKey",
    "ReconcileReport",
    "S3Access",
    "SetupReport",
    "labeling_config",
    "load_settings",
    "parse_labeling_config",
    "reconcile_project",
    "setup_project",
]

_HOMES = {
    "LabelStudioClient": "annotation_ui.client",
    "LabelStudioUnavailableError": "annotation_ui.client",
    "Project": "annotation_ui.client",
    "ProjectKey": "annotation_ui.client",
    "LabelingSchema": "annotation_ui.labeling_config",
    "labeling_config": "annotation_ui.labeling_config",
    "parse_labeling_config": "annotation_ui.labeling_config",
    "ItemProblem": "annotation_ui.reconcile",
    "ReconcileReport": "annotation_ui.reconcile",
    "reconcile_project": "annotation_ui.reconcile",
    "LabelStudioSettings": "annotation_ui.settings",
    "MlBackendSettings": "annotation_ui.settings",
    "load_settings": "annotation_ui.settings",
    "S3Access": "annotation_ui.tasks",
    "SetupReport": "annotation_ui.tasks",
    "setup_project": "annotation_ui.tasks",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'annotation_ui' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
