"""Stage-3 automatic masks for a list of image files, written to the mask store.

:func:`generate_for_images` is the per-image work of ``data-engine amg`` (and of any Prefect
task or Dask worker that wants it): read and decode each image, register it in the store if it
is new, generate its masks, and commit them as stage-3 ``auto`` masks, one commit per batch of
images. Mask ids are deterministic in (image, stage, round, run id, source, RLE), so rerunning
the same run (same ``run_id``) commits nothing new.

Bad images never stop the run: gray, palette, RGBA and 16-bit files are converted to 8-bit RGB
by ``storage.images.decode_image``; unreadable, empty, zero-size, truncated and oversized ones
are skipped, and the summary counts them by reason.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.amg.generator import AutomaticMaskGenerator
from engine.predictor import SamPredictor
from storage.errors import ConfigError, ImageError, NotFoundError, StorageError
from storage.images import decode_image, image_id_for, sha256_hex
from storage.location import read_uri, write_uri_atomic
from storage.mask_store import ImageRecord, MaskRecord, MaskStore, make_mask_id

__all__ = [
    "AmgRunSummary",
    "SkippedImage",
    "generate_for_images",
    "mask_records",
    "sa1b_document",
]

#: Stage and source of every mask this module writes.
STAGE = 3
SOURCE = "auto"

Progress = Callable[[Iterable[str]], Iterable[str]]

# Reason for skipping an image, keyed on what decode_image's message says.
_REASONS = (
    ("is truncated or corrupt", "truncated or corrupt"),
    ("is empty", "empty file"),
    ("is not in a known image format", "unknown format"),
    ("has zero size", "zero-size image"),
    ("the limit is", "too many pixels"),
    ("has more than", "too many pixels"),
)


@dataclass(frozen=True)
class SkippedImage:
    """An image the run could not use: its URI, a short reason and the full message."""

    uri: str
    reason: str
    message: str


@dataclass
class AmgRunSummary:
    """What a run did. ``masks_already_stored`` counts masks a previous run committed."""

    images: int = 0
    images_done: int = 0
    images_registered: int = 0
    masks_generated: int = 0
    masks_written: int = 0
    masks_already_stored: int = 0
    embeddings_reused: int = 0
    commits: int = 0
    seconds: float = 0.0
    skipped: list[SkippedImage] = field(default_factory=list)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped images per reason, most frequent first."""
        return dict(Counter(s.reason for s in self.skipped).most_common())

    def describe(self) -> str:
        """A short human summary (the CLI prints it)."""
        text = (
            f"{self.images_done}/{self.images} images, {self.masks_generated} masks generated, "
            f"{self.masks_written} written, {self.masks_already_stored} already stored, "
            f"{self.embeddings_reused} stored embeddings reused, {self.commits} commits, "
            f"{self.seconds:.1f} s"
        )
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in self.skipped_by_reason.items())
            text += f"; skipped {len(self.skipped)} ({reasons})"
        return text


@dataclass
class _Decoded:
    uri: str
    image_id: str
    sha256: str
    image: np.ndarray


def generate_for_images(
    generator: AutomaticMaskGenerator,
    uris: Sequence[str],
    store: MaskStore,
    *,
    model_version: str,
    run_id: str,
    round: int = 0,
    split: str = "pool",
    batch_size: int = 8,
    max_pixels: int = 64_000_000,
    reuse_embeddings: bool = True,
    sa1b_out: str | None = None,
    endpoint_url: str | None = None,
    progress: Progress | None = None,
) -> AmgRunSummary:
    """Generate, and commit, stage-3 ``auto`` masks of every image in ``uris``.

    Args:
        generator: the configured generator.
        uris: image files (local paths or ``s3://`` URIs), e.g. from ``storage.list_images``.
        store: where masks go; new images are registered in ``split``.
        model_version: recorded on every mask; also keys the stored embeddings.
        run_id: part of every mask id: the same run id makes a rerun add nothing.
        round: the stage-3 round the masks belong to.
        batch_size: images per commit.
        max_pixels: images with more pixels are skipped.
        reuse_embeddings: use an embedding the store holds for (image, model_version) instead
            of running the encoder on the whole image.
        sa1b_out: folder or ``s3://`` prefix for one SA-1B JSON per image (None: none).
        progress: wraps the iteration over ``uris`` (e.g. ``tqdm``).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size is {batch_size}; expected 1 or more images per commit")
    start = time.perf_counter()
    summary = AmgRunSummary(images=len(uris))
    embeddings = _StoredEmbeddings(store, model_version) if reuse_embeddings else None
    pending: list[tuple[ImageRecord, list[MaskRecord]]] = []
    iterable: Iterable[str] = progress(uris) if progress is not None else uris
    for uri in iterable:
        decoded = _read(uri, max_pixels, endpoint_url, summary)
        if decoded is None:
            skipped = summary.skipped[-1]
            if skipped.reason != "unreadable":  # a bad file, not a passing I/O failure
                _quarantine(store, skipped)
            continue
        masks = generator.generate(decoded.image, image_id=decoded.image_id, embeddings=embeddings)
        records = mask_records(
            decoded.image_id, masks, round=round, run_id=run_id, model_version=model_version
        )
        summary.masks_generated += len(records)
        summary.images_done += 1
        # Keep what the commit needs, not the pixels: a batch of large images adds up.
        pending.append((_image_record(decoded, split), records))
        if len(pending) >= batch_size:
            _commit(store, pending, round, run_id, sa1b_out, endpoint_url, summary)
            pending = []
    if pending:
        _commit(store, pending, round, run_id, sa1b_out, endpoint_url, summary)
    summary.embeddings_reused = embeddings.hits if embeddings is not None else 0
    summary.seconds = time.perf_counter() - start
    return summary


def mask_records(
    image_id: str,
    masks: Sequence[dict[str, Any]],
    *,
    round: int,
    run_id: str,
    model_version: str,
    stage: int = STAGE,
    source: str = SOURCE,
) -> list[MaskRecord]:
    """Records of ``generate``'s output (COCO RLE) with their mask ids (default: stage-3
    ``auto``; stage 2's pre-labels pass their own stage and source)."""
    records = []
    for mask in masks:
        segmentation = mask["segmentation"]
        records.append(
            MaskRecord(
                image_id=image_id,
                segmentation=segmentation,
                stage=stage,
                round=round,
                source=source,
                run_id=run_id,
                predicted_iou=float(mask["predicted_iou"]),
                stability_score=float(mask["stability_score"]),
                point_coords=[[float(x), float(y)] for x, y in mask["point_coords"]],
                crop_box=[float(v) for v in mask["crop_box"]],
                model_version=model_version,
                # The id write_masks would derive; set here so SA-1B files can name it.
                mask_id=make_mask_id(
                    image_id, str(stage), str(round), run_id, source, segmentation["counts"]
                ),
            )
        )
    return records


def sa1b_document(image: ImageRecord, records: Sequence[MaskRecord]) -> dict[str, Any]:
    """One image's SA-1B JSON: ``image`` facts and ``annotations`` (ids are mask ids)."""
    return {
        "image": {
            "image_id": image.image_id,
            "width": image.width,
            "height": image.height,
            "file_name": posixpath.basename(image.uri),
        },
        "annotations": [
            {
                "id": r.mask_id,
                "segmentation": dict(r.segmentation),
                "bbox": r.bbox,
                "area": r.area,
                "predicted_iou": r.predicted_iou,
                "stability_score": r.stability_score,
                "crop_box": r.crop_box,
                "point_coords": r.point_coords,
            }
            for r in records
        ],
    }


def _read(
    uri: str, max_pixels: int, endpoint_url: str | None, summary: AmgRunSummary
) -> _Decoded | None:
    try:
        data = read_uri(uri, endpoint_url=endpoint_url)
    except (StorageError, OSError) as err:
        summary.skipped.append(SkippedImage(uri, "unreadable", str(err)))
        return None
    try:
        image = decode_image(data, name=uri, max_pixels=max_pixels)
    except ImageError as err:
        summary.skipped.append(SkippedImage(uri, _reason(str(err)), str(err)))
        return None
    return _Decoded(uri, image_id_for(data), sha256_hex(data), image)


def _quarantine(store: MaskStore, skipped: SkippedImage) -> None:
    """Record a file that cannot be decoded in the store's quarantine (once per file)."""
    from storage.quarantine import quarantine_image

    quarantine_image(store, skipped.uri, reason=skipped.reason, message=skipped.message)


def _reason(message: str) -> str:
    for needle, reason in _REASONS:
        if needle in message:
            return reason
    return "unreadable"


def _image_record(decoded: _Decoded, split: str) -> ImageRecord:
    return ImageRecord(
        image_id=decoded.image_id,
        uri=decoded.uri,
        width=int(decoded.image.shape[1]),
        height=int(decoded.image.shape[0]),
        sha256=decoded.sha256,
        split=split,
    )


def _commit(
    store: MaskStore,
    pending: list[tuple[ImageRecord, list[MaskRecord]]],
    round: int,
    run_id: str,
    sa1b_out: str | None,
    endpoint_url: str | None,
    summary: AmgRunSummary,
) -> None:
    """Register the batch's new images, commit its masks, write its SA-1B files."""
    # Images registered before (in either split) stay as they are.
    new_images = [image for image, _ in pending if not _registered(store, image.image_id)]
    summary.images_registered += store.add_images(new_images)
    # Two prompts can give the very same mask (same pixels, so the same id); NMS keeps both
    # when their boxes are degenerate. Store it once and do not count the copy as stored before.
    unique: dict[str | None, MaskRecord] = {}
    for _, recs in pending:
        for r in recs:
            unique.setdefault(r.mask_id, r)
    records = list(unique.values())
    if records:
        info = store.write_masks(records, stage=STAGE, round=round, run_id=run_id)
        summary.masks_written += info.counts["masks"]
        summary.masks_already_stored += info.counts["skipped"]
        summary.commits += 1 if info.files else 0
    if sa1b_out is not None:
        for image, recs in pending:
            # The stored record: an image registered before keeps its first uri.
            doc = sa1b_document(store.get_image(image.image_id), recs)
            target = sa1b_out.rstrip("/") + f"/{image.image_id}.json"
            write_uri_atomic(target, json.dumps(doc).encode("utf-8"), endpoint_url=endpoint_url)


def _registered(store: MaskStore, image_id: str) -> bool:
    try:
        store.get_image(image_id)
    except NotFoundError:
        return False
    return True


class _StoredEmbeddings:
    """Whole-image embeddings the store already holds for one model version; computes (and does
    not store) the others, so a run does not fill the store with 4 MB per image."""

    def __init__(self, store: MaskStore, model_version: str) -> None:
        self.store = store
        self.model_version = model_version
        self.hits = 0

    def get_or_compute(
        self,
        image_id: str,
        image: np.ndarray | Callable[[], np.ndarray],
        predictor: SamPredictor,
    ) -> None:
        pixels = image() if callable(image) else image
        loaded = self.store.load_embedding(image_id, self.model_version)
        if loaded is not None and _fits(loaded, pixels.shape[:2], predictor):
            predictor.set_embedding(torch.from_numpy(loaded[0]), loaded[1])
            self.hits += 1
            return
        predictor.set_image(pixels)


def _fits(
    loaded: tuple[np.ndarray, tuple[int, int], tuple[int, int]],
    image_size: tuple[int, ...],
    predictor: SamPredictor,
) -> bool:
    """Whether a stored embedding belongs to an image of this size and a model of this shape."""
    embedding, original_size, input_size = loaded
    model = predictor.model
    shape = model.image_embedding_shape
    expected_input = predictor.transform.get_preprocess_shape(*original_size, model.img_size)
    return (
        tuple(embedding.shape) == shape
        and tuple(original_size) == tuple(image_size)
        and tuple(input_size) == expected_input
    )
