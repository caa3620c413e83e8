"""The engine's Prefect tasks: each wraps one library call and takes small, hashable inputs.

Retries go only on tasks doing storage or Label Studio I/O, and only for storage or network
errors. Caching (``INPUTS + TASK_SOURCE``, persisted results) goes on the costly deterministic
steps: the base model, a round's pre-labels, generated masks and annotations, a retrain. Their
inputs carry ``dataset``, the id minted once per storage root, so a fresh root never reuses
another root's results; a run resumed after a crash gets the finished steps back from the cache,
and the store's deterministic mask ids make every commit of an already committed round a no-op.

Tasks pass ids (image ids, version names) rather than images or models, so cache keys stay
cheap and every task reads what it needs from the store.
"""

from __future__ import annotations

from contextlib import closing
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from flows.config import EngineConfig

if TYPE_CHECKING:
    from engine.registry import ModelRegistry
    from storage.mask_store import MaskRecord, MaskStore

__all__ = [
    "annotate_round",
    "base_model",
    "check_label_studio",
    "commit_masks",
    "current_version",
    "finished_round",
    "generate_auto_masks",
    "prelabel_masks",
    "prepare_dataset",
    "promote_model",
    "record_round",
    "register_source",
    "retrain_model",
    "round_image_ids",
]

_CACHED = INPUTS + TASK_SOURCE


def _retry_io_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Retry storage and network trouble; bad input fails at once (a retry cannot fix it)."""
    from storage.errors import AnnotationError, InvalidInputError, StorageError

    try:
        state.result()
    except InvalidInputError:
        return False
    except (StorageError, AnnotationError, OSError):
        return True
    except Exception:
        return False
    return False


_IO_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": _retry_io_errors,
}


@lru_cache(maxsize=8)
def _open_store(root: str, endpoint_url: str | None) -> MaskStore:
    from storage.mask_store import MaskStore

    return MaskStore(root, endpoint_url=endpoint_url)


def store_for(config: EngineConfig) -> MaskStore:
    """The process's ``MaskStore`` for ``config.root`` (one per root, reused by every task)."""
    return _open_store(config.root, config.endpoint_url)


def registry_for(config: EngineConfig) -> ModelRegistry:
    """The model registry next to the masks of ``config.root``."""
    from engine.registry import ModelRegistry

    return ModelRegistry(store_for(config))


# --- set-up ------------------------------------------------------------------------------------


# No retries: the client already retries each request; an unreachable server should stop the
# run at once, before any image is registered.
@task(name="check-label-studio", cache_policy=NO_CACHE)
def check_label_studio(config: EngineConfig) -> str:
    """Fail fast, naming the URL, when the configured Label Studio does not answer."""
    from flows.annotators.factory import label_studio_annotator

    with closing(label_studio_annotator(config, store_for(config))) as annotator:
        user = annotator.check_reachable()
    get_run_logger().info("Label Studio at %s answers (user %s)", config.label_studio.url, user)
    return user


@task(name="prepare-dataset", cache_policy=NO_CACHE, **_IO_RETRIES)
def prepare_dataset(config: EngineConfig) -> str:
    """The storage root's dataset id (minted on first use)."""
    from flows.sources import dataset_id

    return dataset_id(store_for(config))


@task(name="register-source", cache_policy=NO_CACHE, **_IO_RETRIES)
def register_source(config: EngineConfig, dataset: str) -> dict[str, Any]:
    """Register the configured images (and holdout truth) in the store; idempotent."""
    from dataclasses import asdict

    from flows.sources import prepare_source

    summary = prepare_source(store_for(config), config)
    logger = get_run_logger()
    logger.info("image source ready: %s", summary)
    if summary.quarantined:
        logger.warning(
            "%d image file(s) of the source are quarantined and left out; "
            "`data-engine stats` lists the reasons",
            summary.quarantined,
        )
    return asdict(summary)


@task(name="round-images", cache_policy=NO_CACHE, **_IO_RETRIES)
def round_image_ids(config: EngineConfig, stage: int, round: int) -> list[str]:
    """The ids of the pool images that (stage, round) works on."""
    from flows.sources import round_images

    return [r.image_id for r in round_images(store_for(config), config, stage, round)]


# --- model versions ----------------------------------------------------------------------------


@task(name="base-model", cache_policy=_CACHED, persist_result=True)
def base_model(config: EngineConfig, dataset: str) -> str:
    """The engine's first version (pretrained or imported), evaluated and promoted."""
    from flows.sources import holdout_samples
    from flows.versions import VersionTags, base_version

    store = store_for(config)
    card = base_version(
        store,
        registry_for(config),
        variant=config.model.variant,
        checkpoint=config.model.checkpoint,
        budget=config.model.pretrain,
        seed=config.seed,
        tags=VersionTags(config.run_name, dataset, "base"),
        holdout=holdout_samples(
            store, max_objects_per_image=config.evaluation.max_objects_per_image
        ),
        max_clicks=config.evaluation.max_clicks,
    )
    get_run_logger().info("base model %s: %s", card.version, card.metrics)
    return card.version


@task(name="current-version", cache_policy=NO_CACHE, **_IO_RETRIES)
def current_version(config: EngineConfig) -> str | None:
    """The newest promoted version in the registry, or None."""
    card = registry_for(config).latest()
    return card.version if card is not None else None


@task(name="retrain-model", cache_policy=_CACHED, persist_result=True)
def retrain_model(
    config: EngineConfig, dataset: str, parent: str, stage: int, round: int
) -> dict[str, Any]:
    """Retrain ``parent`` on every pool mask, score it on the holdout, register it."""
    from flows.sources import holdout_samples
    from flows.versions import VersionTags, retrain_version

    store = store_for(config)
    card = retrain_version(
        store,
        registry_for(config),
        parent=parent,
        budget=config.stage(stage).train,
        replay_fraction=config.replay_fraction(stage),
        seed=config.seed,
        tags=VersionTags(config.run_name, dataset, "retrain", stage, round),
        holdout=holdout_samples(
            store, max_objects_per_image=config.evaluation.max_objects_per_image
        ),
        max_clicks=config.evaluation.max_clicks,
    )
    get_run_logger().info(
        "stage %d round %d: %s (from %s) trained %d steps, holdout %s",
        stage,
        round,
        card.version,
        parent,
        card.steps,
        card.metrics,
    )
    return {"version": card.version, "metrics": card.metrics, "steps": card.steps}


@task(name="promote-model", cache_policy=NO_CACHE, **_IO_RETRIES)
def promote_model(config: EngineConfig, version: str) -> bool:
    """Promote ``version`` if it is not worse than its parent; returns the decision."""
    from flows.versions import promote_version

    card = promote_version(
        registry_for(config),
        version,
        miou_tolerance=config.evaluation.miou_tolerance,
        noc_tolerance=config.evaluation.noc_tolerance,
    )
    get_run_logger().info("%s: %s", version, (card.promotion or {}).get("reason"))
    return card.promoted


# --- masks -------------------------------------------------------------------------------------


@task(name="prelabel-masks", cache_policy=_CACHED, persist_result=True)
def prelabel_masks(
    config: EngineConfig, dataset: str, version: str, image_ids: list[str], round: int
) -> list[MaskRecord]:
    """Stage 2's pre-labels: the generator's confident masks on the round's images."""
    from flows.generation import GeneratorSettings, generate_records

    s2 = config.stage2
    gates = _calibrated_gates(config, version) if s2.calibrate_gates else {}
    records = generate_records(
        store_for(config),
        registry_for(config).load(version),
        image_ids,
        settings=GeneratorSettings(
            points_per_side=s2.points_per_side,
            pred_iou_thresh=s2.pred_iou_thresh,
            stability_score_thresh=s2.stability_score_thresh,
            crop_n_layers=s2.crop_n_layers,
            crop_n_points_downscale_factor=2 if s2.crop_n_layers else 1,
            **gates,
        ),
        stage=2,
        round=round,
        run_id=config.run_name,
        model_version=version,
        source="model",
    )
    get_run_logger().info(
        "stage 2 round %d: %d pre-labels on %d images by %s",
        round,
        len(records),
        len(image_ids),
        version,
    )
    return records


@task(name="generate-auto-masks", cache_policy=_CACHED, persist_result=True, **_IO_RETRIES)
def generate_auto_masks(
    config: EngineConfig, dataset: str, version: str, image_ids: list[str], round: int
) -> dict[str, Any]:
    """Stage 3: generate and commit ``auto`` masks on the round's images (a rerun adds none).

    Runs in this process, or sharded over Dask when ``stage3.workers`` / ``stage3.dask_address``
    is set (:func:`flows.distributed.run_stage3`).
    """
    from flows.distributed import ClusterSpec, Stage3Job, resolve_model, run_stage3

    s3 = config.stage3
    store = store_for(config)
    gates = _calibrated_gates(config, version) if s3.calibrate_gates else {}
    job = Stage3Job(
        root=config.root,
        model=resolve_model(version, root=config.root, endpoint_url=config.endpoint_url),
        run_id=config.run_name,
        round=round,
        generator_kwargs={
            "points_per_side": s3.points_per_side,
            "pred_iou_thresh": s3.pred_iou_thresh,
            "stability_score_thresh": s3.stability_score_thresh,
            "crop_n_layers": s3.crop_n_layers,
            "crop_n_points_downscale_factor": 2 if s3.crop_n_layers else 1,
            "min_mask_region_area": s3.min_mask_region_area,
            "max_mask_region_fraction": s3.max_mask_region_fraction,
            **gates,
        },
        endpoint_url=config.endpoint_url,
    )
    summary = run_stage3(
        job,
        [store.get_image(i).uri for i in image_ids],
        cluster=ClusterSpec(workers=s3.workers, address=s3.dask_address),
        shard_size=s3.shard_size,
    )
    skipped = sum(len(r.skipped) for r in summary.shards)
    stored = sum(r.masks_already_stored for r in summary.shards)
    get_run_logger().info(
        "stage 3 round %d: %d images, %d masks written, %d already stored, %d skipped, %.1f s",
        round,
        summary.images,
        summary.masks_written,
        stored,
        skipped,
        summary.wall_s,
    )
    return {
        "masks": summary.masks_written + stored,
        "masks_new": summary.masks_written,
        "skipped": skipped,
    }


def _calibrated_gates(config: EngineConfig, version: str) -> dict[str, Any]:
    """Generator arguments that fit SAM's gates to ``version`` (fitted on the holdout once)."""
    from flows.sources import holdout_samples
    from flows.versions import gate_calibration

    store = store_for(config)
    calibration = gate_calibration(
        registry_for(config),
        version,
        lambda: holdout_samples(
            store, max_objects_per_image=config.evaluation.max_objects_per_image
        ),
    )
    get_run_logger().info(
        "%s gates: predicted IoU calibrated on %d holdout masks of %d images, stability "
        "offset %.2f",
        version,
        calibration.masks,
        calibration.images,
        calibration.stability_score_offset,
    )
    return calibration.generator_kwargs()


# No task retries: Label Studio requests are retried by its client, and a round that timed out
# waiting for people should stop (rerun to resume), not wait all over again.
@task(name="annotate-round", cache_policy=_CACHED, persist_result=True)
def annotate_round(
    config: EngineConfig,
    dataset: str,
    version: str,
    image_ids: list[str],
    stage: int,
    round: int,
    predictions: list[MaskRecord] | None = None,
) -> list[MaskRecord]:
    """The annotator's masks for the round's images, helped by ``version``."""
    from flows.annotators.factory import make_annotator

    store = store_for(config)
    by_image: dict[str, list[MaskRecord]] = {}
    for record in predictions or []:
        by_image.setdefault(record.image_id, []).append(record)
    images = [store.get_image(i) for i in image_ids]
    with closing(make_annotator(config, store)) as annotator:
        records = annotator.annotate(
            images,
            registry_for(config).load(version),
            stage=stage,
            round=round,
            run_id=config.run_name,
            model_version=version,
            predictions=by_image if predictions is not None else None,
        )
    get_run_logger().info(
        "stage %d round %d: %d masks annotated on %d images",
        stage,
        round,
        len(records),
        len(images),
    )
    return records


@task(name="commit-masks", cache_policy=NO_CACHE, **_IO_RETRIES)
def commit_masks(
    config: EngineConfig, records: list[MaskRecord], stage: int, round: int
) -> dict[str, Any]:
    """Write the round's masks atomically, one commit per run id they carry (the engine's own,
    or a Label Studio project's, whose reconcile committed them already); a retried or
    repeated commit adds nothing."""
    store = store_for(config)
    by_run: dict[str, list[MaskRecord]] = {config.run_name: []}
    for record in records:
        by_run.setdefault(record.run_id, []).append(record)
    new = 0
    sequence = 0
    for run_id, batch in by_run.items():
        if not batch and run_id != config.run_name:
            continue
        info = store.write_masks(batch, stage=stage, round=round, run_id=run_id)
        new += info.counts["masks"]
        sequence = max(sequence, info.sequence)
        get_run_logger().info(
            "stage %d round %d, run %s: commit %d, %s",
            stage,
            round,
            run_id,
            info.sequence,
            info.counts,
        )
    return {"sequence": sequence, "masks": len(records), "masks_new": new}


@task(name="record-round", cache_policy=NO_CACHE, **_IO_RETRIES)
def record_round(config: EngineConfig, manifest: dict[str, Any]) -> str:
    """Store the round's manifest (images, commit, versions) next to the data; returns its key."""
    import json

    from flows.report.summary import round_manifest_key

    key = round_manifest_key(config.run_name, int(manifest["stage"]), int(manifest["round"]))
    store_for(config).put_object(key, json.dumps(manifest, sort_keys=True).encode("utf-8"))
    return key


@task(name="finished-round", cache_policy=NO_CACHE, **_IO_RETRIES)
def finished_round(config: EngineConfig, stage: int, round: int) -> dict[str, Any] | None:
    """The manifest :func:`record_round` stored for (stage, round) of this run name, or None
    if the round has not finished."""
    import json

    from flows.report.summary import round_manifest_key
    from storage.errors import NotFoundError

    key = round_manifest_key(config.run_name, stage, round)
    try:
        data = store_for(config).get_object(key)
    except NotFoundError:
        return None
    manifest: dict[str, Any] = json.loads(data)
    return manifest
