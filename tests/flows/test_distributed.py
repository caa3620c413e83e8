"""Stage 3 and embeddings fanned out over a real Dask LocalCluster through prefect-dask.

The reference is the single-process run, ``engine.amg.generate_for_images`` over every image (what
``data-engine amg`` does without --workers), into another store: with the same ``run_id`` the
mask ids are hashes of the same RLEs, so "same masks" is "same ids, same RLEs, same scores". The
lost-worker test SIGKILLs a worker process while it holds a shard and checks that the round still
commits every mask exactly once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.builder import build_sam
from engine.checkpoint import save_checkpoint
from engine.synthetic import write_synthetic_dataset
from flows.distributed import (
    ClusterSpec,
    EmbeddingJob,
    ModelRef,
    RoundSummary,
    Shard,
    Stage3Job,
    loaded_model,
    make_shards,
    precompute_embeddings,
    resolve_model,
    run_stage3,
)
from storage.errors import ConfigError, NotFoundError
from storage.images import image_id_for, sha256_hex
from storage.mask_store import ImageRecord, MaskStore

N_IMAGES = 6
SHARD_SIZE = 2
SIZE = (96, 96)
# A random tiny model gives heavily overlapping masks: with no gates and no NMS it still gives
# dozens of distinct ones per image.
GENERATOR: dict[str, Any] = {
    "points_per_side": 4,
    "points_per_batch": 16,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 1.0,  # NMS off: every distinct mask is kept
}


@dataclass(frozen=True)
class Dataset:
    checkpoint: str
    uris: list[str]
    image_ids: list[str]

    def registered_root(self, path: Path) -> str:
        """A fresh store at ``path`` with the dataset's images registered."""
        records = []
        for uri in self.uris:
            data = Path(uri).read_bytes()
            records.append(ImageRecord(image_id_for(data), uri, SIZE[1], SIZE[0], sha256_hex(data)))
        MaskStore(str(path)).add_images(records)
        return str(path)

    def job(self, root: Path) -> Stage3Job:
        return Stage3Job(
            root=str(root),
            model=ModelRef(self.checkpoint),
            run_id="stage3-r1",
            round=1,
            generator_kwargs=GENERATOR,
        )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    tmp = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    checkpoint = str(tmp / "tiny-v0.pt")
    # Without the instance code: a random code's click term answers many points alike.
    save_checkpoint(build_sam("tiny", instance_dim=0), checkpoint, version="tiny-v0")
    paths, _ = write_synthetic_dataset(tmp / "images", N_IMAGES, seed=7, size=SIZE)
    ids = [image_id_for(p.read_bytes()) for p in paths]
    return Dataset(checkpoint, [str(p) for p in paths], ids)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    # Dask workers run torch on one thread; in-process runs must too for bitwise-equal logits
    # (a mask is logits > 0, so a different summation order can flip a pixel and its id).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    with _one_torch_thread():
        yield


@pytest.fixture(scope="module")
def reference(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """mask_id -> (image_id, counts, predicted_iou, stability_score) of the single-process run."""
    from engine.amg import AutomaticMaskGenerator, generate_for_images
    from engine.checkpoint import load_checkpoint

    root = str(tmp_path_factory.mktemp("reference"))
    model, _ = load_checkpoint(dataset.checkpoint)
    with _one_torch_thread():
        summary = generate_for_images(
            AutomaticMaskGenerator(model, **GENERATOR),
            dataset.uris,
            MaskStore(root),
            model_version="tiny-v0",
            run_id="stage3-r1",
            round=1,
            # Under 256 masks per commit: pycocotools 2.0.11's area() overflows beyond 255 RLEs
            # (storage.rle calls it on a whole write_masks batch; reported, not ours to fix).
            batch_size=SHARD_SIZE,
        )
    assert summary.masks_written > 2 * N_IMAGES, "the generator settings give too few masks"
    return _masks(root)


def _masks(root: str) -> dict[str, tuple]:
    table = MaskStore(root).masks(stage=3)
    ids = table["mask_id"].to_pylist()
    assert len(ids) == len(set(ids)), "a mask id was committed twice"
    columns = ("image_id", "counts", "predicted_iou", "stability_score")
    rows = zip(*(table[c].to_pylist() for c in columns), strict=True)
    return dict(zip(ids, rows, strict=True))


def _assert_same_masks(actual: dict[str, tuple], reference: dict[str, tuple]) -> None:
    """Same masks: the same ids (so the same image and RLE) with the same scores.

    One allowance, for floating point. In about one full run in three on this busy machine, a
    process gave a couple of masks one pixel apart (a logit within rounding of 0, so another
    RLE and id) or a score a few ulps apart; every process runs torch on one thread, so the
    source is below torch (CPU kernel paths). Such a mask must pair with a reference mask of its
    image at mask IoU >= 0.99 with scores within 1e-4, and these must stay under 2% of the masks;
    a missing, extra, duplicated or otherwise different mask fails with the details.
    """
    assert len(actual) == len(reference), f"{len(actual)} masks, reference {len(reference)}"
    common = set(actual) & set(reference)
    differ = [
        (m, actual[m][2:], reference[m][2:])
        for m in sorted(common)
        if actual[m][:2] != reference[m][:2] or not _close(actual[m][2:], reference[m][2:])
    ]
    assert not differ, f"{len(differ)} masks' scores differ (id, actual, reference): {differ[:3]}"
    extra = sorted(set(actual) - common)
    missing = sorted(set(reference) - common)
    assert len(extra) <= 0.02 * len(reference), f"{len(extra)} masks differ: {extra[:5]}"
    for mask_id in extra:
        image_id, counts, *scores = actual[mask_id]
        best = max(
            missing,
            key=lambda m: _rle_iou(counts, reference[m][1], reference[m][0] == image_id),
        )
        ref_image, ref_counts, *ref_scores = reference[best]
        overlap = _rle_iou(counts, ref_counts, ref_image == image_id)
        assert overlap >= 0.99, f"mask {mask_id} has no reference twin (best IoU {overlap:.4f})"
        assert _close(tuple(scores), tuple(ref_scores)), f"mask {mask_id}: {scores} vs {ref_scores}"
        missing.remove(best)


def _close(a: tuple, b: tuple) -> bool:
    return all(abs(x - y) <= 1e-4 for x, y in zip(a, b, strict=True))


def _rle_iou(a: str, b: str, same_image: bool) -> float:
    from pycocotools import mask as coco_mask

    if not same_image:
        return 0.0
    rles = [{"size": list(SIZE), "counts": c.encode("ascii")} for c in (a, b)]
    return float(coco_mask.iou(rles[:1], rles[1:], [0])[0][0])


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect server; the DaskTaskRunner's tasks report to it from the workers."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as env:
        # The server's telemetry job only adds "database is locked" noise on a busy machine.
        env.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=180):  # a busy 2-core machine
            yield


@pytest.fixture(scope="module")
def dask_cluster(prefect_api: None) -> Iterator[object]:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        yield cluster


# --- pure parts ----------------------------------------------------------------------------------


def test_cluster_spec_is_validated_at_the_edge() -> None:
    assert not ClusterSpec().distributed
    assert ClusterSpec(workers=2).distributed
    assert ClusterSpec(address="tcp://10.0.0.5:8786").distributed
    with pytest.raises(ConfigError, match="not both"):
        ClusterSpec(workers=2, address="tcp://h:8786")
    with pytest.raises(ConfigError, match="workers must be"):
        ClusterSpec(workers=0)
    with pytest.raises(ConfigError, match="must look like tcp://"):
        ClusterSpec(address="h:8786")


def test_shards_cover_every_image_once_with_stable_keys() -> None:
    ids = [f"img{i}" for i in range(7)]
    shards = make_shards(ids, 3)
    assert [s.items for s in shards] == [tuple(ids[0:3]), tuple(ids[3:6]), (ids[6],)]
    assert make_shards(ids, 3)[1].key == shards[1].key
    assert Shard(1, ("a", "b")).key != Shard(1, ("b", "a")).key
    with pytest.raises(ConfigError, match="shard_size"):
        make_shards(ids, 0)
    with pytest.raises(ConfigError, match="repeats"):
        make_shards(["a", "a"], 1)


def test_a_checkpoint_path_resolves_without_a_registry(dataset: Dataset, tmp_path: Path) -> None:
    ref = resolve_model(dataset.checkpoint, root=str(tmp_path))
    assert ref == ModelRef(dataset.checkpoint)
    with pytest.raises(NotFoundError, match="no promoted model"):
        resolve_model("latest", root=str(tmp_path))


def test_a_process_loads_each_model_once(dataset: Dataset) -> None:
    ref = ModelRef(dataset.checkpoint)
    first, _ = loaded_model(ref)
    again, loaded_again = loaded_model(ModelRef(dataset.checkpoint))
    assert again is first and not loaded_again
    assert first.version == "tiny-v0" and first.load_s > 0


# --- stage 3 -------------------------------------------------------------------------------------


def test_single_process_rerun_skips_finished_shards_and_duplicates_nothing(
    dataset: Dataset, reference: dict[str, tuple], tmp_path: Path, one_torch_thread: None
) -> None:
    root = tmp_path / "root"
    job = dataset.job(root)
    first = run_stage3(job, dataset.uris, shard_size=SHARD_SIZE)
    assert not any(r.already_done for r in first.shards)
    assert first.images == N_IMAGES and sum(r.images_done for r in first.shards) == N_IMAGES
    again = run_stage3(job, dataset.uris, shard_size=SHARD_SIZE)
    assert all(r.already_done for r in again.shards)
    _assert_same_masks(_masks(str(root)), reference)
    assert len(MaskStore(str(root)).commits()) == len(first.shards)  # one commit per shard


@pytest.mark.slow
def test_two_worker_local_cluster_gives_the_single_process_masks(
    dataset: Dataset, reference: dict[str, tuple], prefect_api: None, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    summary = run_stage3(
        dataset.job(root), dataset.uris, cluster=ClusterSpec(workers=2), shard_size=SHARD_SIZE
    )
    assert summary.images == N_IMAGES
    masks = _masks(str(root))
    _assert_same_masks(masks, reference)
    _each_worker_loaded_the_model_once(summary)


def _each_worker_loaded_the_model_once(summary: RoundSummary) -> None:
    workers = {r.worker for r in summary.shards}
    loads = [r.worker for r in summary.shards if r.model_load_s > 0]
    assert sorted(set(loads)) == sorted(workers), "a worker ran a shard without loading"
    assert len(loads) == len(set(loads)), "a worker loaded the model twice"
    assert all(w != f"{os.uname().nodename}:{os.getpid()}" for w in workers), "ran in-process"


@pytest.mark.slow
def test_a_killed_worker_still_commits_every_mask_exactly_once(
    dataset: Dataset, reference: dict[str, tuple], dask_cluster: object, tmp_path: Path
) -> None:
    from distributed import Client

    root = tmp_path / "root"
    cluster = ClusterSpec(address=dask_cluster.scheduler_address)  # type: ignore[attr-defined]
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["summary"] = run_stage3(
                dataset.job(root), dataset.uris, cluster=cluster, shard_size=SHARD_SIZE
            )
        except BaseException as err:  # reported by the main thread
            outcome["error"] = err

    runner = threading.Thread(target=run)
    with Client(cluster.address) as client:
        runner.start()
        killed = _kill_a_busy_worker(client, timeout_s=240)
    runner.join(timeout=600)
    assert not runner.is_alive(), "the round did not finish after a worker was killed"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    summary = outcome["summary"]
    assert isinstance(summary, RoundSummary)
    assert killed not in {r.worker.rsplit(":", 1)[1] for r in summary.shards}
    masks = _masks(str(root))  # asserts no mask id twice
    _assert_same_masks(masks, reference)
    assert MaskStore(str(root)).count_masks(stage=3) == len(reference)


def _kill_a_busy_worker(client: object, *, timeout_s: float) -> str:
    """SIGKILL the process of a worker that is running a shard; return its pid as text."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = [addr for addr, tasks in client.processing().items() if tasks]  # type: ignore[attr-defined]
        if busy:
            pids = client.run(os.getpid, workers=busy[:1])  # type: ignore[attr-defined]
            pid = pids[busy[0]]
            time.sleep(1.0)  # let it get into the shard (model load, first image)
            os.kill(pid, signal.SIGKILL)
            return str(pid)
        time.sleep(0.2)
    raise AssertionError("no worker picked up a shard in time")


# --- embeddings ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_embeddings_fan_out_over_the_cluster_and_match_local_ones(
    dataset: Dataset, dask_cluster: object, tmp_path: Path
) -> None:
    root = dataset.registered_root(tmp_path / "root")
    job = EmbeddingJob(root, ModelRef(dataset.checkpoint), run_id="embed-1")
    cluster = ClusterSpec(address=dask_cluster.scheduler_address)  # type: ignore[attr-defined]
    summary = precompute_embeddings(job, dataset.image_ids, cluster=cluster, shard_size=3)
    assert sum(r.embeddings_computed for r in summary.shards) == N_IMAGES
    local_root = dataset.registered_root(tmp_path / "local")
    with _one_torch_thread():
        precompute_embeddings(
            replace(job, root=local_root), dataset.image_ids, cluster=ClusterSpec()
        )
    for image_id in dataset.image_ids:
        remote = MaskStore(root).load_embedding(image_id, "tiny-v0")
        local = MaskStore(local_root).load_embedding(image_id, "tiny-v0")
        assert remote is not None and local is not None
        np.testing.assert_allclose(remote[0], local[0], rtol=1e-5, atol=1e-5)
        assert remote[1:] == local[1:]
