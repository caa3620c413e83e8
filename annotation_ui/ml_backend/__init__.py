"""Label Studio ML backend: SAM masks for clicks and boxes, pre-annotations, webhooks.

Build the app with :func:`create_app` (inject the model source and the store: tests pass a real
tiny model) or from settings with :func:`build_app`; ``data-engine ml-backend`` serves it.
"""

from annotation_ui.ml_backend.app import BackendOptions, create_app
from annotation_ui.ml_backend.models import (
    LoadedModel,
    ModelHolder,
    ModelSource,
    NoModelError,
    RegistryModelSource,
    StaticModelSource,
)
from annotation_ui.ml_backend.predict import BatchOptions
from annotation_ui.ml_backend.server import build_app, retrain_poster, running, serve

__all__ = [
    "BackendOptions",
    "BatchOptions",
    "LoadedModel",
    "ModelHolder",
    "ModelSource",
    "NoModelError",
    "RegistryModelSource",
    "StaticModelSource",
    "build_app",
    "create_app",
    "retrain_poster",
    "running",
    "serve",
]
