"""The one exception tree of sam-data-engine.

Every error the engine raises on purpose derives from :class:`DataEngineError`, so a caller can
catch the whole family with one clause. Messages name the input that is wrong and what was
expected, and never contain secrets (tokens, passwords, keys).

    DataEngineError
    ├── InvalidInputError (also ValueError)   bad user input, rejected before any I/O
    │   ├── MaskFormatError                   mask array of the wrong shape or dtype
    │   ├── RleError                          RLE counts that are corrupt or do not sum to h*w
    │   ├── UnsafeKeyError                    an id or key that escapes the storage root
    │   ├── ImageError                        unreadable, truncated, too large or empty image
    │   ├── PromptError                       prompts outside the image, empty or malformed
    │   └── ConfigError                       config with unknown keys or wrong types
    ├── StorageError                          the mask store could not read or write
    │   ├── CommitConflictError               another writer committed the same sequence first
    │   ├── NotFoundError (also KeyError)     a version, snapshot, image or object that is absent
    │   └── LeaseLostError                    a lease this process held was taken over
    ├── LeaseHeldError                        another live run holds the lease (nothing was done)
    ├── CheckpointError                       a checkpoint whose keys or shapes do not fit a variant
    ├── TrainingError                         no data, NaN loss, holdout overlapping training data
    └── AnnotationError                       Label Studio unreachable, bad annotation JSON
"""

from __future__ import annotations

__all__ = [
    "AnnotationError",
    "CheckpointError",
    "CommitConflictError",
    "ConfigError",
    "DataEngineError",
    "ImageError",
    "InvalidInputError",
    "LeaseHeldError",
    "LeaseLostError",
    "MaskFormatError",
    "NotFoundError",
    "PromptError",
    "RleError",
    "StorageError",
    "TrainingError",
    "UnsafeKeyError",
]


class DataEngineError(Exception):
    """Root of every error sam-data-engine raises on purpose."""


class InvalidInputError(DataEngineError, ValueError):
    """User input was rejected before anything was written."""


class MaskFormatError(InvalidInputError):
    """A mask array has the wrong shape or dtype."""


class RleError(InvalidInputError):
    """An RLE is corrupt or its counts do not sum to height * width."""


class UnsafeKeyError(InvalidInputError):
    """An image id, key or path would escape the storage root."""


class ImageError(InvalidInputError):
    """An image is unreadable, truncated, empty or over the pixel limit.

    ``reason`` is a short fixed phrase for counting and quarantine records (``"empty file"``,
    ``"unknown format"``, ``"too many pixels"``, ``"zero size"``, ``"truncated or corrupt"``,
    ``"unreadable"``); the message says the rest.
    """

    def __init__(self, message: str, *, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason


class PromptError(InvalidInputError):
    """Prompts (points, boxes, mask inputs) are malformed or outside the image."""


class ConfigError(InvalidInputError):
    """A configuration has unknown keys or values of the wrong type."""


class StorageError(DataEngineError):
    """The mask store could not complete a read or a write."""


class CommitConflictError(StorageError):
    """Another writer took the commit sequence number first; retry on top of it."""


class NotFoundError(StorageError, KeyError):
    """A requested version, snapshot, image or object does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class LeaseLostError(StorageError):
    """A lease this process held expired and another run took it; stop before writing more."""


class LeaseHeldError(DataEngineError):
    """Another live run holds the lease (its owner and expiry are named); nothing was done."""


class CheckpointError(DataEngineError):
    """A checkpoint does not match the model variant (keys, shapes) or cannot be read."""


class TrainingError(DataEngineError):
    """Training cannot run or had to stop (no masks, NaN loss, leaking holdout)."""


class AnnotationError(DataEngineError):
    """Label Studio is unreachable or returned annotations that cannot be used."""
