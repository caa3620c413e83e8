"""Masks as COCO RLE in a Parquet dataset on local disk or S3, with their provenance."""

from storage.errors import (
    AnnotationError,
    CheckpointError,
    CommitConflictError,
    ConfigError,
    DataEngineError,
    ImageError,
    InvalidInputError,
    MaskFormatError,
    NotFoundError,
    PromptError,
    RleError,
    StorageError,
    TrainingError,
    UnsafeKeyError,
)

__all__ = [
    "AnnotationError",
    "CheckpointError",
    "CommitConflictError",
    "ConfigError",
    "DataEngineError",
    "ImageError",
    "InvalidInputError",
    "MaskFormatError",
    "NotFoundError",
    "PromptError",
    "RleError",
    "StorageError",
    "TrainingError",
    "UnsafeKeyError",
]
