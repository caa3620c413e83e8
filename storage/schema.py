"""The Arrow schemas of the two stored tables, each with a ``schema_version`` in its metadata.

``masks`` (one row per mask; files under ``<root>/masks/stage=N/``):

==================  =========================  ==================================================
column              type                       meaning
==================  =========================  ==================================================
image_id            string                     the image's id in the images table
mask_id             string                     deterministic in the mask's provenance
stage               int8                       1 assisted-manual, 2 semi-automatic, 3 automatic
round               int32                      retraining round within the stage (0-based)
source              string                     ``manual``, ``model`` or ``auto``
height, width       int32                      mask size in pixels (the image's size)
counts              string                     compressed COCO RLE counts (column-major)
area                int64                      foreground pixels
bbox                fixed list of 4 float32    tight box, XYWH in pixels
predicted_iou       float32, nullable          model's IoU estimate; null for human masks
stability_score     float32, nullable          IoU of the mask at logit -1 and +1; null if human
point_coords        list of [x, y], nullable   prompt points in pixels
crop_box            list of 4 float32, null    crop the mask came from, XYWH in pixels
model_version       string, nullable           model that proposed the mask
annotator           string, nullable           who drew or corrected it
lead_time_s         float32, nullable          seconds the annotator spent on the mask
clicks              int32, nullable            clicks the annotator made
run_id              string                     the run (flow run, import) that wrote it
created_at          timestamp[us, UTC]         when the commit was made
==================  =========================  ==================================================

No nullable column is an Arrow *fixed-size* list: Arrow's Parquet reader before 25.0 (and
readers built on it) fails on a null fixed-size list (apache/arrow#35692), so ``crop_box`` is a
plain list whose length of 4 the writer checks. Schema version 1 stored it as a fixed-size list;
version 2 readers read both.

``stage`` is the hive partition key: it is the directory name (``stage=1``) and is not repeated
inside the Parquet files (:data:`MASKS_FILE_SCHEMA`), so DuckDB, Polars, Spark and
``pyarrow.dataset.dataset(root/"masks", partitioning="hive")`` read it from the path.

``images`` (one row per image; files under ``<root>/images/``): ``image_id``, ``uri`` (absolute
local path or ``s3://`` URI), ``width`` and ``height`` (pixels), ``sha256`` (hex of the file's
bytes), ``split`` (``pool`` or ``holdout``), ``added_at`` (timestamp, UTC).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = [
    "IMAGES_SCHEMA",
    "MASKS_FILE_SCHEMA",
    "MASKS_SCHEMA",
    "SCHEMA_VERSION",
    "SOURCES",
    "SPLITS",
    "STAGES",
    "stored_float",
]

SCHEMA_VERSION = 2
STAGES: tuple[int, ...] = (1, 2, 3)
SOURCES: tuple[str, ...] = ("manual", "model", "auto")
SPLITS: tuple[str, ...] = ("pool", "holdout")


def stored_float(value: float | None) -> float | None:
    """A float32 column value as the shortest Python float that round-trips (0.96, not
    0.9599999785423279), so records and exports read back what was written."""
    if value is None:
        return None
    return float(str(np.float32(value)))


_TIMESTAMP = pa.timestamp("us", tz="UTC")
_BOX = pa.list_(pa.float32(), 4)
_POINT = pa.list_(pa.float32(), 2)
_NULLABLE_BOX = pa.list_(pa.float32())  # length 4 checked on write; see the module's note


def _metadata(table: str) -> dict[bytes, bytes]:
    return {b"schema_version": str(SCHEMA_VERSION).encode(), b"table": table.encode()}


MASKS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("mask_id", pa.string(), nullable=False),
        pa.field("stage", pa.int8(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("counts", pa.string(), nullable=False),
        pa.field("area", pa.int64(), nullable=False),
        pa.field("bbox", _BOX, nullable=False),
        pa.field("predicted_iou", pa.float32()),
        pa.field("stability_score", pa.float32()),
        pa.field("point_coords", pa.list_(pa.field("item", _POINT, nullable=False))),
        pa.field("crop_box", _NULLABLE_BOX),
        pa.field("model_version", pa.string()),
        pa.field("annotator", pa.string()),
        pa.field("lead_time_s", pa.float32()),
        pa.field("clicks", pa.int32()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", _TIMESTAMP, nullable=False),
    ],
    metadata=_metadata("masks"),
)

# What a Parquet file under masks/stage=N/ holds: everything but the partition key.
MASKS_FILE_SCHEMA = MASKS_SCHEMA.remove(MASKS_SCHEMA.get_field_index("stage"))

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("added_at", _TIMESTAMP, nullable=False),
    ],
    metadata=_metadata("images"),
)
