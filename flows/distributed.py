"""Fan stage 3 and bulk embedding precomputation out over Dask, through Prefect's integration.

Where the work runs is a :class:`ClusterSpec`:

- ``ClusterSpec()``: this process, no Dask, no Prefect API needed (the default; small runs);
- ``ClusterSpec(workers=N)``: a ``distributed.LocalCluster`` of N worker processes, one thread each;
- ``ClusterSpec(address="tcp://host:8786")``: an existing Dask scheduler (e.g. docker-compose's).

The images are cut into shards (:func:`shard_images`); each shard is one Prefect task that
``prefect_dask.DaskTaskRunner`` hands to a Dask worker. The worker loads the model once per process
(:func:`loaded_model` caches it by checkpoint URI), processes the shard's images and writes the
results itself through the ``MaskStore``: stage-3 masks with one ``write_masks`` commit per shard,
embeddings with ``save_embedding``.

Why a lost worker never duplicates masks: a shard's masks are written with the round's ``run_id``,
so their ids (``make_mask_id`` over image, stage, round, run, source and RLE) are the same every
time the shard runs, and ``write_masks`` skips ids already committed. When Dask re-runs a shard
whose worker died, after its commit the rerun commits nothing, before its commit it commits the
shard once. After the commit a small done-marker (``runs/...``) is written so that rerunning a
finished round skips the finished shards' compute too.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from storage.errors import ConfigError, NotFoundError, StorageError

__all__ = [
    "ClusterSpec",
    "EmbeddingJob",
    "LoadedModel",
    "ModelRef",
    "RoundSummary",
    "Shard",
    "ShardResult",
    "Stage3Job",
    "embed_shard",
    "fan_out",
    "fan_out_shards",
    "generate_shard",
    "loaded_model",
    "precompute_embeddings",
    "run_stage3",
    "shard_images",
    "shard_task",
    "task_runner_for",
]


@dataclass(frozen=True)
class ClusterSpec:
    """Where shards run: this process (default), N local worker processes, or a scheduler."""

    workers: int | None = None
    address: str | None = None
    threads_per_worker: int = 1
    memory_limit: str = "auto"

    def __post_init__(self) -> None:
        if self.workers is not None and self.address is not None:
            raise ConfigError(
                f"give workers ({self.workers}) or a Dask address ({self.address!r}), not both"
            )
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise ConfigError(f"workers must be an integer >= 1, got {self.workers!r}")
        if self.address is not None and not self.address.startswith(("tcp://", "tls://")):
            raise ConfigError(
                f"Dask address {self.address!r} must look like tcp://host:8786 or tls://host:8786"
            )
        if self.threads_per_worker < 1:
            raise ConfigError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")

    @property
    def distributed(self) -> bool:
        """Whether shards go to Dask (False: a plain loop in this process)."""
        return self.workers is not None or self.address is not None


@dataclass(frozen=True)
class ModelRef:
    """A model checkpoint to load on the workers; the per-process cache key.

    ``checkpoint`` is a local path or ``s3://`` URI every worker can read; ``version`` names the
    model when the checkpoint does not (official SAM weights).
    """

    checkpoint: str
    version: str | None = None
    variant: str | None = None
    endpoint_url: str | None = None


@dataclass
class LoadedModel:
    """A model loaded in this process: ``model`` (a ``Sam``, eval mode), its version, load time."""

    model: Any
    version: str
    load_s: float


@dataclass(frozen=True)
class Shard:
    """A slice of a round's images; ``key`` is stable for the same images in the same order."""

    index: int
    image_ids: tuple[str, ...]

    @property
    def key(self) -> str:
        digest = hashlib.sha256("\x1f".join(self.image_ids).encode("utf-8")).hexdigest()
        return f"{self.index:05d}-{digest[:16]}"


@dataclass
class ShardResult:
    """What one shard did. ``model_load_s`` is 0 when the worker already had the model."""

    shard: str
    images: int
    worker: str
    seconds: float
    model_load_s: float = 0.0
    masks_written: int = 0
    masks_skipped: int = 0
    commit_sequence: int | None = None
    embeddings_computed: int = 0
    already_done: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def shard_images(image_ids: Sequence[str], shard_size: int) -> list[Shard]:
    """Cut ``image_ids`` into shards of ``shard_size`` images, in order."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if len(set(image_ids)) != len(image_ids):
        raise ConfigError("image_ids repeat an image; each image belongs to one shard")
    return [
        Shard(i, tuple(image_ids[start : start + shard_size]))
        for i, start in enumerate(range(0, len(image_ids), shard_size))
    ]


# --- the per-process model cache ----------------------------------------------------------------

_MODELS: dict[ModelRef, LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def loaded_model(ref: ModelRef) -> tuple[LoadedModel, bool]:
    """The model of ``ref``, loaded once per process; returns ``(loaded, loaded_now)``.

    Inside a Dask worker it also sets torch's intra-op threads to the worker's thread count,
    so N single-threaded workers use N cores rather than N x all of them.
    """
    with _MODELS_LOCK:
        cached = _MODELS.get(ref)
        if cached is not None:
            return cached, False
        _limit_torch_threads_in_dask_worker()
        from engine.checkpoint import load_checkpoint

        start = time.perf_counter()
        model, meta = load_checkpoint(
            ref.checkpoint, variant=ref.variant, endpoint_url=ref.endpoint_url
        )
        version = meta.version or ref.version
        if not version:
            raise ConfigError(
                f"checkpoint {ref.checkpoint!r} does not name its version; pass ModelRef(version=)"
            )
        loaded = LoadedModel(model, version, time.perf_counter() - start)
        _MODELS[ref] = loaded
        return loaded, True


def _limit_torch_threads_in_dask_worker() -> None:
    try:
        from distributed import get_worker

        threads = get_worker().state.nthreads
    except (ImportError, ValueError):  # not inside a Dask worker: leave torch as the caller set it
        return
    import torch

    torch.set_num_threads(max(1, int(threads)))


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- shard markers ------------------------------------------------------------------------------


def _marker_key(kind: str, run_id: str, shard: Shard) -> str:
    return f"runs/{kind}/{run_id}/shard-{shard.key}.json"


def _finished(store: Any, key: str) -> ShardResult | None:
    try:
        data = json.loads(store.get_object(key))
    except NotFoundError:
        return None
    result = ShardResult(**data)
    result.already_done = True
    return result


def _mark_finished(store: Any, key: str, result: ShardResult) -> None:
    store.put_object(key, json.dumps(asdict(result), indent=1).encode("utf-8"))


# --- bulk embeddings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingJob:
    """Precompute image embeddings of ``model`` for the images of a dataset root."""

    root: str
    model: ModelRef
    run_id: str
    endpoint_url: str | None = None


def embed_shard(job: EmbeddingJob, shard: Shard) -> ShardResult:
    """Worker side: embed the shard's images that have no cached embedding for the model yet."""
    from engine.embeddings import EmbeddingCache
    from engine.predictor import SamPredictor
    from storage.mask_store import MaskStore

    start = time.perf_counter()
    store = MaskStore(job.root, endpoint_url=job.endpoint_url)
    marker = _marker_key("embeddings", job.run_id, shard)
    done = _finished(store, marker)
    if done is not None:
        return done
    loaded, loaded_now = loaded_model(job.model)
    cache = EmbeddingCache(loaded.version, max_items=1, store=store)
    predictor = SamPredictor(loaded.model)
    for image_id in shard.image_ids:
        cache.get_or_compute(image_id, lambda i=image_id: np.array(store.load_image(i)), predictor)
    result = ShardResult(
        shard=shard.key,
        images=len(shard.image_ids),
        worker=_worker_name(),
        seconds=time.perf_counter() - start,
        model_load_s=loaded.load_s if loaded_now else 0.0,
        embeddings_computed=cache.stats.computed,
    )
    _mark_finished(store, marker, result)
    return result


def precompute_embeddings(
    job: EmbeddingJob, image_ids: Sequence[str], *, cluster: ClusterSpec, shard_size: int = 8
) -> list[ShardResult]:
    """Embed every image of ``image_ids`` (skipping cached ones), sharded over ``cluster``."""
    return fan_out(embed_shard, job, shard_images(image_ids, shard_size), cluster=cluster)


# --- stage 3 -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage3Job:
    """One stage-3 round: the generator's arguments, the model and the round's provenance.

    ``generator_kwargs`` are ``AutomaticMaskGenerator`` keyword arguments (e.g.
    ``engine.amg.paper_preset()``). ``run_id`` must be the same for every shard and every retry
    of the round: it is part of each mask's id. ``use_embedding_cache`` reads (and writes) whole
    image embeddings in the store, worth it when they were precomputed.
    """

    root: str
    model: ModelRef
    round: int
    run_id: str
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    endpoint_url: str | None = None
    use_embedding_cache: bool = False
    source: str = "auto"


def generate_shard(job: Stage3Job, shard: Shard) -> ShardResult:
    """Worker side: stage-3 masks of the shard's images, committed in one ``write_masks``."""
    from engine.amg import AutomaticMaskGenerator
    from engine.embeddings import EmbeddingCache
    from storage.mask_store import MaskRecord, MaskStore

    start = time.perf_counter()
    store = MaskStore(job.root, endpoint_url=job.endpoint_url)
    marker = _marker_key(f"stage3/round-{job.round:04d}", job.run_id, shard)
    done = _finished(store, marker)
    if done is not None:
        return done
    loaded, loaded_now = loaded_model(job.model)
    generator = AutomaticMaskGenerator(loaded.model, **job.generator_kwargs)
    cache = EmbeddingCache(loaded.version, store=store) if job.use_embedding_cache else None
    records = []
    for image_id in shard.image_ids:
        image = np.array(store.load_image(image_id))  # writable: torch warns on read-only
        for mask in generator.generate(image, image_id=image_id, embeddings=cache):
            records.append(
                MaskRecord(
                    image_id=image_id,
                    segmentation=mask["segmentation"],
                    stage=3,
                    round=job.round,
                    source=job.source,
                    run_id=job.run_id,
                    predicted_iou=float(mask["predicted_iou"]),
                    stability_score=float(mask["stability_score"]),
                    point_coords=[[float(x), float(y)] for x, y in mask["point_coords"]],
                    crop_box=[float(v) for v in mask["crop_box"]],
                    model_version=loaded.version,
                )
            )
    # mask_id is left to write_masks: a hash of image, stage, round, run, source and RLE, the
    # same on every rerun of this shard, so a retried shard never commits a mask twice.
    info = store.write_masks(records, stage=3, round=job.round, run_id=job.run_id)
    result = ShardResult(
        shard=shard.key,
        images=len(shard.image_ids),
        worker=_worker_name(),
        seconds=time.perf_counter() - start,
        model_load_s=loaded.load_s if loaded_now else 0.0,
        masks_written=info.counts["masks"],
        masks_skipped=info.counts["skipped"],
        commit_sequence=info.sequence if info.files else None,
    )
    _mark_finished(store, marker, result)
    return result


@dataclass
class RoundSummary:
    """A fanned-out run: per-shard results plus totals. ``images_per_s`` over the wall time."""

    shards: list[ShardResult]
    wall_s: float

    @property
    def images(self) -> int:
        return sum(r.images for r in self.shards)

    @property
    def masks_written(self) -> int:
        return sum(r.masks_written for r in self.shards)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    def model_load_s(self) -> dict[str, float]:
        """Seconds each worker process spent loading the model (workers that loaded it)."""
        loads: dict[str, float] = {}
        for r in self.shards:
            if r.model_load_s > 0:
                loads[r.worker] = loads.get(r.worker, 0.0) + r.model_load_s
        return loads


def run_stage3(
    job: Stage3Job,
    image_ids: Sequence[str],
    *,
    cluster: ClusterSpec | None = None,
    shard_size: int = 4,
) -> RoundSummary:
    """Run one stage-3 round over ``image_ids``: in this process (default) or on a Dask cluster.

    Every shard commits its masks as it finishes; rerunning the same job (same ``run_id``)
    skips finished shards and never duplicates a mask. This is what ``data-engine amg
    --workers N / --dask-address`` and the stage-3 flow call.
    """
    start = time.perf_counter()
    shards = shard_images(image_ids, shard_size)
    results = fan_out(generate_shard, job, shards, cluster=cluster or ClusterSpec())
    return RoundSummary(results, time.perf_counter() - start)


# --- Prefect + Dask -----------------------------------------------------------------------------


def task_runner_for(cluster: ClusterSpec) -> Any:
    """The ``DaskTaskRunner`` for a distributed ``cluster`` (processes, not threads: torch)."""
    if not cluster.distributed:
        raise ConfigError("ClusterSpec() runs in this process; it has no Dask task runner")
    from prefect_dask import DaskTaskRunner

    if cluster.address is not None:
        return DaskTaskRunner(address=cluster.address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": cluster.workers,
            "threads_per_worker": cluster.threads_per_worker,
            "processes": True,
            "memory_limit": cluster.memory_limit,
            "dashboard_address": None,
        },
    )


def _retry_storage_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a shard on storage or network trouble only; bad input fails at once."""
    try:
        state.result()
    except (StorageError, OSError):
        return True
    except Exception:
        return False
    return False


# No Prefect result cache: the store's commit log and shard markers record what is done, and
# every worker sees them (a result cache on one worker's disk is not shared).
@task(
    name="shard",
    task_run_name="{work.__name__}-{shard.index}",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_storage_errors,
    cache_policy=NO_CACHE,
)
def shard_task(work: Callable[[Any, Shard], ShardResult], job: Any, shard: Shard) -> ShardResult:
    """One shard on one worker: ``work(job, shard)``."""
    return work(job, shard)


@flow(name="fan-out-shards", validate_parameters=False)
def fan_out_shards(
    work: Callable[[Any, Shard], ShardResult], job: Any, shards: list[Shard]
) -> list[ShardResult]:
    """Submit every shard to the flow's task runner; results in shard order."""
    futures = shard_task.map(unmapped(work), unmapped(job), shards)
    return [future.result() for future in futures]


def fan_out(
    work: Callable[[Any, Shard], ShardResult],
    job: Any,
    shards: Sequence[Shard],
    *,
    cluster: ClusterSpec,
) -> list[ShardResult]:
    """Run ``work(job, shard)`` for every shard: in this process, or as a Prefect flow whose
    tasks a ``DaskTaskRunner`` spreads over ``cluster``. Results come back in shard order.

    ``work`` must be a module-level function (workers import it by name).
    """
    if not cluster.distributed:
        return [work(job, shard) for shard in shards]
    flow = fan_out_shards.with_options(task_runner=task_runner_for(cluster))
    return list(flow(work, job, list(shards)))
