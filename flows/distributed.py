"""Fan stage 3 and bulk embedding precomputation out over Dask, through Prefect's integration.

Where the work runs is a :class:`ClusterSpec`:

- ``ClusterSpec()``: this process, no Dask, no Prefect API needed (the default; small runs);
- ``ClusterSpec(workers=N)``: a ``distributed.LocalCluster`` of N worker processes, one thread each;
- ``ClusterSpec(address="tcp://host:8786")``: an existing Dask scheduler (e.g. docker-compose's).

The input (image files for stage 3, registered image ids for embeddings) is cut into shards
(:func:`make_shards`); each shard is one Prefect task that ``prefect_dask.DaskTaskRunner`` hands
to a Dask worker. The worker loads the model once per process (:func:`loaded_model` caches it by
:class:`ModelRef`), processes its shard and writes the results itself through the ``MaskStore``:
stage-3 masks with ``engine.amg.generate_for_images`` (the same per-image work as
``data-engine amg``), one ``write_masks`` commit per shard; embeddings with ``save_embedding``.

Why a lost worker never duplicates masks: every shard writes with the round's ``run_id``, so its
mask ids (``make_mask_id`` over image, stage, round, run, source and RLE) are the same every time
it runs, and ``write_masks`` skips ids already committed. When Dask re-runs a shard whose worker
died, after its commit the rerun commits nothing; before its commit, it commits the shard once.
After the commit a small done-marker (``runs/...`` in the store) is written, so rerunning a
finished round skips the finished shards' compute as well.

Masks are bitwise the same as a single-process run when every process runs torch on the same
number of threads (Dask workers use one): a mask is ``logits > 0``, and another summation order
can flip a pixel, hence its RLE and id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
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
    "make_shards",
    "precompute_embeddings",
    "resolve_model",
    "run_stage3",
    "shard_task",
    "task_runner_for",
]

_REGISTRY_VERSION = re.compile(r"^(latest|v\d{4,})$")


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
    """A checkpoint every worker can read (local path or ``s3://``); the per-process cache key.

    ``version`` is recorded on the masks and keys stored embeddings; None means the checkpoint's
    own version, else ``ckpt-`` and 16 hex digits of its SHA-256 (as ``data-engine amg``).
    Build one from a registry version or a path with :func:`resolve_model`.
    """

    checkpoint: str
    version: str | None = None
    variant: str | None = None
    endpoint_url: str | None = None
    device: str = "cpu"


@dataclass
class LoadedModel:
    """A model loaded in this process: ``model`` (a ``Sam``, eval mode), its version, load time."""

    model: Any
    version: str
    load_s: float


@dataclass(frozen=True)
class Shard:
    """A slice of the input (image URIs or ids); ``key`` is stable for the same items in order."""

    index: int
    items: tuple[str, ...]

    @property
    def key(self) -> str:
        digest = hashlib.sha256("\x1f".join(self.items).encode("utf-8")).hexdigest()
        return f"{self.index:05d}-{digest[:16]}"


@dataclass
class ShardResult:
    """What one shard did. ``model_load_s`` is 0 when the worker already had the model."""

    shard: str
    images: int
    worker: str
    seconds: float
    model_load_s: float = 0.0
    images_done: int = 0
    masks_written: int = 0
    masks_already_stored: int = 0
    embeddings_computed: int = 0
    skipped: list[list[str]] = field(default_factory=list)  # [uri, reason] per unusable image
    already_done: bool = False


def make_shards(items: Sequence[str], shard_size: int) -> list[Shard]:
    """Cut ``items`` into shards of ``shard_size``, in order."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if len(set(items)) != len(items):
        raise ConfigError("the input repeats an image; each image belongs to one shard")
    return [
        Shard(i, tuple(items[start : start + shard_size]))
        for i, start in enumerate(range(0, len(items), shard_size))
    ]


def resolve_model(
    model: str, *, root: str, endpoint_url: str | None = None, device: str = "cpu"
) -> ModelRef:
    """``latest``, a registry version (``v0003``) of the store at ``root``, or a checkpoint path.

    Resolved once, on the caller's side: a promotion during the run never gives two workers
    two different models.
    """
    if not _REGISTRY_VERSION.match(model):
        return ModelRef(model, endpoint_url=endpoint_url, device=device)
    from engine.registry import ModelRegistry
    from storage.mask_store import MaskStore

    registry = ModelRegistry(MaskStore(root, endpoint_url=endpoint_url))
    card = registry.resolve(model)
    return ModelRef(
        registry.checkpoint_uri(card.version),
        version=card.version,
        variant=card.variant,
        endpoint_url=endpoint_url,
        device=device,
    )


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
        from storage.location import read_uri

        start = time.perf_counter()
        model, meta = load_checkpoint(
            ref.checkpoint,
            variant=ref.variant,
            map_location=ref.device,
            endpoint_url=ref.endpoint_url,
        )
        version = ref.version or meta.version
        if not version:
            data = read_uri(ref.checkpoint, endpoint_url=ref.endpoint_url)
            version = f"ckpt-{hashlib.sha256(data).hexdigest()[:16]}"
        loaded = LoadedModel(model, version, time.perf_counter() - start)
        _MODELS[ref] = loaded
        return loaded, True


def _limit_torch_threads_in_dask_worker() -> None:
    try:
        from distributed import get_worker

        threads = get_worker().state.nthreads
    except (ImportError, ValueError):  # not in a Dask worker: torch stays as the caller set it
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


# --- stage 3 ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage3Job:
    """One stage-3 run over image files, as ``data-engine amg`` would do it in one process.

    ``generator_kwargs`` are ``AutomaticMaskGenerator`` arguments (e.g. ``paper_preset()``).
    ``run_id`` must be the same for every shard and every retry: it is part of each mask id.
    The other fields are ``engine.amg.generate_for_images``'s.
    """

    root: str
    model: ModelRef
    run_id: str
    round: int = 0
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    split: str = "pool"
    max_pixels: int = 64_000_000
    reuse_embeddings: bool = True
    sa1b_out: str | None = None
    endpoint_url: str | None = None


def generate_shard(job: Stage3Job, shard: Shard) -> ShardResult:
    """Worker side: register the shard's images, generate their masks, commit them once."""
    from engine.amg import AutomaticMaskGenerator, generate_for_images
    from storage.mask_store import MaskStore

    start = time.perf_counter()
    store = MaskStore(job.root, endpoint_url=job.endpoint_url)
    marker = _marker_key(f"stage3/round-{job.round:04d}", job.run_id, shard)
    done = _finished(store, marker)
    if done is not None:
        return done
    loaded, loaded_now = loaded_model(job.model)
    generator = AutomaticMaskGenerator(loaded.model, **job.generator_kwargs)
    summary = generate_for_images(
        generator,
        list(shard.items),
        store,
        model_version=loaded.version,
        run_id=job.run_id,
        round=job.round,
        split=job.split,
        batch_size=len(shard.items),  # one commit per shard
        max_pixels=job.max_pixels,
        reuse_embeddings=job.reuse_embeddings,
        sa1b_out=job.sa1b_out,
        endpoint_url=job.endpoint_url,
    )
    result = ShardResult(
        shard=shard.key,
        images=len(shard.items),
        worker=_worker_name(),
        seconds=time.perf_counter() - start,
        model_load_s=loaded.load_s if loaded_now else 0.0,
        images_done=summary.images_done,
        masks_written=summary.masks_written,
        masks_already_stored=summary.masks_already_stored,
        skipped=[[s.uri, s.reason] for s in summary.skipped],
    )
    _mark_finished(store, marker, result)
    return result


@dataclass
class RoundSummary:
    """A fanned-out run: per-shard results and totals; ``images_per_s`` over the wall time."""

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
        """Seconds each worker process spent loading the model during the run."""
        loads: dict[str, float] = {}
        for r in self.shards:
            if r.model_load_s > 0:
                loads[r.worker] = loads.get(r.worker, 0.0) + r.model_load_s
        return loads


def run_stage3(
    job: Stage3Job,
    uris: Sequence[str],
    *,
    cluster: ClusterSpec | None = None,
    shard_size: int = 8,
) -> RoundSummary:
    """Stage-3 masks for image files ``uris``: in this process (default) or on a Dask cluster.

    Each shard commits its masks when it finishes; rerunning the same job (same ``run_id``)
    skips finished shards and never duplicates a mask. ``data-engine amg --workers N`` /
    ``--dask-address`` and the stage-3 flow call this.
    """
    start = time.perf_counter()
    shards = make_shards(uris, shard_size)
    results = fan_out(generate_shard, job, shards, cluster=cluster or ClusterSpec())
    return RoundSummary(results, time.perf_counter() - start)


# --- bulk embeddings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingJob:
    """Precompute the model's image embeddings for registered images of the store at ``root``."""

    root: str
    model: ModelRef
    run_id: str
    endpoint_url: str | None = None


def embed_shard(job: EmbeddingJob, shard: Shard) -> ShardResult:
    """Worker side: embed the shard's images that have no stored embedding for the model yet."""
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
    for image_id in shard.items:
        # A writable copy, read only on a cache miss (torch warns on read-only arrays).
        pixels = functools.partial(_writable_image, store, image_id)
        cache.get_or_compute(image_id, pixels, predictor)
    result = ShardResult(
        shard=shard.key,
        images=len(shard.items),
        worker=_worker_name(),
        seconds=time.perf_counter() - start,
        model_load_s=loaded.load_s if loaded_now else 0.0,
        images_done=len(shard.items),
        embeddings_computed=cache.stats.computed,
    )
    _mark_finished(store, marker, result)
    return result


def _writable_image(store: Any, image_id: str) -> np.ndarray:
    return np.array(store.load_image(image_id))


def precompute_embeddings(
    job: EmbeddingJob, image_ids: Sequence[str], *, cluster: ClusterSpec, shard_size: int = 8
) -> RoundSummary:
    """Embed every registered image of ``image_ids`` (skipping stored ones) over ``cluster``."""
    start = time.perf_counter()
    results = fan_out(embed_shard, job, make_shards(image_ids, shard_size), cluster=cluster)
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
            "dashboard_address": ":0",  # a free port: never a clash, never a warning
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
    """Run ``work(job, shard)`` for every shard: in this process, or as the Prefect flow
    :func:`fan_out_shards` whose tasks a ``DaskTaskRunner`` spreads over ``cluster``.

    ``work`` must be a module-level function (workers import it by name). Results come back in
    shard order.
    """
    if not cluster.distributed:
        return [work(job, shard) for shard in shards]
    runner = fan_out_shards.with_options(task_runner=task_runner_for(cluster))
    return list(runner(work, job, list(shards)))
