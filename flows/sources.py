"""Image sources of the engine: the built-in synthetic scenes, or a folder / S3 prefix.

Library code (no Prefect): the flows call these through thin tasks.

Synthetic source (the demo's default): scenes from :mod:`engine.synthetic`, drawn from seed
streams apart for the pool and the holdout, written as PNG objects under
``<root>/sources/synthetic/{pool,holdout}/`` and registered in the store by content hash. The
holdout's ground truth goes into the store the way ``data-engine import --split holdout`` puts it
(stage-1 ``manual`` masks of holdout images, run ``coco-import``), so evaluation reads it the same
way for every source; the pool's ground truth, which only the simulated annotator may see, is a
COCO file at :data:`~flows.annotators.ground_truth.GROUND_TRUTH_KEY`. Everything is a pure
function of (seed, sizes), so registering again changes nothing.

Folder or S3 source: images are registered by :func:`storage.export.import_dataset` with
``quarantine=True``: a file that is empty, truncated, not an image, over the pixel limit or listed
under an unsafe key is recorded in the store's quarantine (:mod:`storage.quarantine`) with its
reason and left out, so the run goes on with the usable images.

A round's batch is a fixed slice of the pool in registration order: stage 1 takes the first
images, stage 2 the next, stage 3 the rest; a resumed run picks exactly the same images.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from flows.annotators.ground_truth import GROUND_TRUTH_KEY, GroundTruth
from storage import rle as rle_codec
from storage.errors import ImageError, InvalidInputError, NotFoundError
from storage.export import IMPORT_RUN_ID, import_dataset
from storage.images import image_id_for, sha256_hex
from storage.location import read_uri
from storage.mask_store import ImageRecord, MaskRecord, MaskStore, make_mask_id

if TYPE_CHECKING:
    from engine.evaluation.interactive import EvalSample
    from flows.config import EngineConfig, SourceConfig

__all__ = [
    "DATASET_ID_KEY",
    "SourceSummary",
    "dataset_id",
    "holdout_samples",
    "load_pool_ground_truth",
    "prepare_source",
    "round_images",
]

#: An id minted once per storage root; cache keys include it so a new root never hits old caches.
DATASET_ID_KEY = "engine/dataset.json"
# Seed streams of the synthetic source (scene i of split s is rng([seed, stream, i])).
_POOL_STREAM, _HOLDOUT_STREAM = 0, 1
_SYNTHETIC_PREFIX = "sources/synthetic"


@dataclass(frozen=True)
class SourceSummary:
    """What a registered source holds: image counts and the holdout's object count.

    ``quarantined`` counts the source's image files that were refused (pool and holdout), now
    or by an earlier registration; they are in :func:`storage.quarantine.quarantined`.
    """

    pool_images: int
    holdout_images: int
    holdout_objects: int
    synthetic: bool
    quarantined: int = 0


def dataset_id(store: MaskStore) -> str:
    """The root's id, minted (random) on first use and stored under :data:`DATASET_ID_KEY`."""
    try:
        return str(json.loads(store.get_object(DATASET_ID_KEY))["dataset_id"])
    except NotFoundError:
        minted = uuid.uuid4().hex
        store.put_object(DATASET_ID_KEY, json.dumps({"dataset_id": minted}).encode("utf-8"))
        # Another process may have minted one at the same time; the stored one wins.
        return str(json.loads(store.get_object(DATASET_ID_KEY))["dataset_id"])


def prepare_source(store: MaskStore, config: EngineConfig) -> SourceSummary:
    """Register the configured source's images (and holdout truth) in ``store``; idempotent.

    Raises:
        ImageError: the source holds no images (nothing is registered or trained then).
        InvalidInputError: the pool is smaller than the configured rounds consume.
    """
    source = config.source
    needed = config.pool_images_needed()
    if source.synthetic:
        summary = _register_synthetic(store, source, pool_images=source.pool_images or needed)
    else:
        summary = _register_folder(store, source, endpoint_url=config.endpoint_url)
    if summary.pool_images == 0:
        raise ImageError(
            f"image source {source.images!r} holds no images; nothing to annotate "
            "(expected image files: .jpg, .png, .bmp, .tif, .webp)"
        )
    if summary.holdout_objects == 0:
        raise ImageError(
            f"the holdout of {source.images!r} has no ground-truth masks; every model version "
            "is evaluated on them (set source.holdout and source.holdout_coco)"
        )
    if summary.pool_images < needed:
        raise InvalidInputError(
            f"image source {source.images!r} has {summary.pool_images} pool images but the "
            f"stages' rounds x images_per_round need {needed}; add images or lower them"
        )
    return summary


def round_images(
    store: MaskStore, config: EngineConfig, stage: int, round: int
) -> list[ImageRecord]:
    """The pool images of (stage, round): a fixed slice, so a resumed run gets the same ones."""
    offset = 0
    for s in (1, 2, 3):
        section = config.stage(s)
        if s == stage:
            if not 0 <= round < section.rounds:
                raise InvalidInputError(
                    f"stage {stage} has rounds 0..{section.rounds - 1}; got round {round}"
                )
            offset += round * section.images_per_round
            pool = store.images(split="pool")
            batch = pool[offset : offset + section.images_per_round]
            if len(batch) < section.images_per_round:
                raise InvalidInputError(
                    f"stage {stage} round {round} needs pool images {offset}.."
                    f"{offset + section.images_per_round - 1} but the pool has {len(pool)}"
                )
            return batch
        offset += section.rounds * section.images_per_round
    raise InvalidInputError(f"stage must be 1, 2 or 3, got {stage!r}")


def load_pool_ground_truth(store: MaskStore, config: EngineConfig) -> GroundTruth:
    """The pool's ground truth for the simulated annotator (synthetic file or ``pool_coco``)."""
    if config.source.synthetic:
        return GroundTruth.load(store, GROUND_TRUTH_KEY)
    if config.source.pool_coco is None:
        raise InvalidInputError(
            "the simulated annotator needs source.pool_coco (the pool's ground truth)"
        )
    coco = json.loads(read_uri(config.source.pool_coco, endpoint_url=config.endpoint_url))
    by_name = {r.uri.rsplit("/", 1)[-1]: r.image_id for r in store.images(split="pool")}
    return GroundTruth.from_coco(coco, image_ids=by_name)


def holdout_samples(
    store: MaskStore, *, max_objects_per_image: int | None = None
) -> list[EvalSample]:
    """The holdout images with their ground-truth masks, for ``evaluate_interactive``.

    With ``max_objects_per_image``, only the largest objects of each image are kept (bounds the
    evaluation time on crowded images).
    """
    from engine.evaluation.interactive import EvalSample

    samples: list[EvalSample] = []
    for image_id, _ids, masks in store.iter_image_masks(split="holdout"):
        if max_objects_per_image is not None and len(masks) > max_objects_per_image:
            areas = masks.reshape(len(masks), -1).sum(axis=1)
            masks = masks[np.argsort(-areas, kind="stable")[:max_objects_per_image]]
        samples.append(EvalSample(image=store.load_image(image_id), masks=masks, image_id=image_id))
    return samples


# --- synthetic ---------------------------------------------------------------------------------


def _register_synthetic(
    store: MaskStore, source: SourceConfig, *, pool_images: int
) -> SourceSummary:
    size = (source.image_size, source.image_size)
    scene = source.scene
    pool, pool_truth = _write_scenes(
        store, "pool", _POOL_STREAM, pool_images, size, source.seed, scene
    )
    holdout, holdout_truth = _write_scenes(
        store, "holdout", _HOLDOUT_STREAM, source.holdout_images, size, source.seed, scene
    )
    store.add_images([*pool, *holdout])
    pool_truth.save(store, pool, GROUND_TRUTH_KEY)
    objects = _store_holdout_truth(store, holdout, holdout_truth)
    return SourceSummary(len(store.images("pool")), len(holdout), objects, synthetic=True)


def _write_scenes(
    store: MaskStore,
    split: str,
    stream: int,
    n: int,
    size: tuple[int, int],
    seed: int,
    scene_kwargs: dict[str, Any],
) -> tuple[list[ImageRecord], GroundTruth]:
    from engine.synthetic import generate_scene

    records: list[ImageRecord] = []
    truth: dict[str, list[rle_codec.Rle]] = {}
    for i in range(n):
        scene = generate_scene(np.random.default_rng([seed, stream, i]), size, **scene_kwargs)
        ok, png = cv2.imencode(".png", cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ImageError(f"could not encode synthetic scene {split}/{i} as PNG")
        data = png.tobytes()
        image_id = image_id_for(data)
        key = f"{_SYNTHETIC_PREFIX}/{split}/{i:05d}-{image_id}.png"
        store.put_object(key, data)
        records.append(
            ImageRecord(
                image_id=image_id,
                uri=store.location.uri(key),
                width=size[1],
                height=size[0],
                sha256=sha256_hex(data),
                split=split,
            )
        )
        truth[image_id] = rle_codec.encode(scene.masks)
    return records, GroundTruth(truth)


def _store_holdout_truth(
    store: MaskStore, holdout: Sequence[ImageRecord], truth: GroundTruth
) -> int:
    records = [
        MaskRecord(
            image_id=image.image_id,
            segmentation=rle,
            stage=1,
            round=0,
            source="manual",
            run_id=IMPORT_RUN_ID,
            annotator="ground-truth",
            mask_id=make_mask_id(image.image_id, "holdout-truth", rle["counts"]),
        )
        for image in holdout
        for rle in truth.rles(image.image_id)
    ]
    store.write_masks(records, stage=1, round=0, run_id=IMPORT_RUN_ID)
    return len(records)


# --- folder or S3 prefix -----------------------------------------------------------------------


def _register_folder(
    store: MaskStore, source: SourceConfig, *, endpoint_url: str | None
) -> SourceSummary:
    pool = import_dataset(
        store, source.images, split="pool", endpoint_url=endpoint_url, quarantine=True
    )
    assert source.holdout is not None and source.holdout_coco is not None  # config checks it
    holdout = import_dataset(
        store,
        source.holdout,
        coco=source.holdout_coco,
        split="holdout",
        endpoint_url=endpoint_url,
        quarantine=True,
    )
    return SourceSummary(
        pool_images=len(store.images("pool")),
        holdout_images=len(store.images("holdout")),
        holdout_objects=store.count_masks(split="holdout"),
        synthetic=False,
        quarantined=pool.images_quarantined + holdout.images_quarantined,
    )
