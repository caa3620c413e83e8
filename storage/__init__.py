"""Masks as COCO RLE in a Parquet dataset on local disk or S3, with their provenance.

Public surface: the RLE codec (:mod:`storage.rle`), the table schemas (:mod:`storage.schema`),
storage locations (:mod:`storage.location`), image reading (:mod:`storage.images`), the
:class:`MaskStore` and its records (:mod:`storage.mask_store`), COCO / SA-1B export and COCO
import (:mod:`storage.export`), the quarantine of refused images (:mod:`storage.quarantine`),
leases (:mod:`storage.lease`), and the error tree (:mod:`storage.errors`).
"""

from storage.errors import (
    AnnotationError,
    CheckpointError,
    CommitConflictError,
    ConfigError,
    DataEngineError,
    ImageError,
    InvalidInputError,
    LeaseHeldError,
    LeaseLostError,
    MaskFormatError,
    NotFoundError,
    PromptError,
    RleError,
    StorageError,
    TrainingError,
    UnsafeKeyError,
)
from storage.export import ImportResult, export_coco, export_sa1b, import_dataset
from storage.images import (
    ImageScan,
    RejectedKey,
    decode_image,
    image_id_for,
    list_images,
    scan_images,
    sha256_hex,
)
from storage.lease import Lease, LeaseOwner, LeaseState
from storage.location import ObjectInfo, StorageLocation, read_uri, write_uri_atomic
from storage.mask_store import CommitInfo, ImageRecord, MaskRecord, MaskStore, make_mask_id
from storage.quarantine import QuarantineEntry, quarantine_image, quarantined
from storage.rle import Rle
from storage.schema import IMAGES_SCHEMA, MASKS_FILE_SCHEMA, MASKS_SCHEMA, SCHEMA_VERSION

__all__ = [
    "IMAGES_SCHEMA",
    "MASKS_FILE_SCHEMA",
    "MASKS_SCHEMA",
    "SCHEMA_VERSION",
    "AnnotationError",
    "CheckpointError",
    "CommitConflictError",
    "CommitInfo",
    "ConfigError",
    "DataEngineError",
    "ImageError",
    "ImageRecord",
    "ImageScan",
    "ImportResult",
    "InvalidInputError",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "LeaseOwner",
    "LeaseState",
    "MaskFormatError",
    "MaskRecord",
    "MaskStore",
    "NotFoundError",
    "ObjectInfo",
    "PromptError",
    "QuarantineEntry",
    "RejectedKey",
    "Rle",
    "RleError",
    "StorageError",
    "StorageLocation",
    "TrainingError",
    "UnsafeKeyError",
    "decode_image",
    "export_coco",
    "export_sa1b",
    "image_id_for",
    "import_dataset",
    "list_images",
    "make_mask_id",
    "quarantine_image",
    "quarantined",
    "read_uri",
    "scan_images",
    "sha256_hex",
    "write_uri_atomic",
]
