"""The model side of the engine: SAM modeling, predictor, training, evaluation, automatic masks.

Public model API (imported lazily, so ``import engine.<submodule>`` does not pull in torch for
modules that do not need it)::

    build_sam(variant, checkpoint=None, *, device=None) -> Sam    # vit_b | vit_l | vit_h | tiny
    sam_model_registry[variant](checkpoint=None) -> Sam
    SamPredictor(model).set_image(rgb_uint8) / .predict(point_coords, point_labels, box, ...)
    save_checkpoint(model, uri, ...) / load_checkpoint(uri) -> (Sam, CheckpointMeta)
    EmbeddingCache(model_version, store=...).get_or_compute(image_id, image, predictor)
    ResizeLongestSide(target_length)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.builder import build_sam, build_sam_from_args, sam_model_registry
    from engine.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
    from engine.embeddings import CachedEmbedding, EmbeddingCache
    from engine.modeling.sam import Sam
    from engine.predictor import SamPredictor
    from engine.transforms import ResizeLongestSide

__all__ = [
    "CachedEmbedding",
    "CheckpointMeta",
    "EmbeddingCache",
    "ResizeLongestSide",
    "Sam",
    "SamPredictor",
    "build_sam",
    "build_sam_from_args",
    "load_checkpoint",
    "sam_model_registry",
    "save_checkpoint",
]

_HOMES = {
    "build_sam": "engine.builder",
    "build_sam_from_args": "engine.builder",
    "sam_model_registry": "engine.builder",
    "CheckpointMeta": "engine.checkpoint",
    "load_checkpoint": "engine.checkpoint",
    "save_checkpoint": "engine.checkpoint",
    "CachedEmbedding": "engine.embeddings",
    "EmbeddingCache": "engine.embeddings",
    "Sam": "engine.modeling.sam",
    "SamPredictor": "engine.predictor",
    "ResizeLongestSide": "engine.transforms",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
