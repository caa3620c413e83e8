"""Stage-3 throughput on 1 and 2 Dask workers (one thread each), and the scaling ratio.

Each configuration runs the same stage-3 round (``flows.distributed.run_stage3``: Prefect flow,
``DaskTaskRunner``, one task per shard, masks written by the workers through the ``MaskStore``)
on a fresh copy of the same registered synthetic images:

- ``dask-1`` / ``dask-2``: a ``LocalCluster`` of 1 or 2 worker processes, ``threads_per_worker=1``
  (torch set to one thread in each worker);
- ``in-process``: the single-process path (no Dask, no Prefect), torch on one thread, for scale.

The cluster is started and the model loaded on every worker before the clock starts: images/s is
steady-state throughput, and the per-worker model-load time is reported on its own line. The
model is an untrained ``tiny`` SAM; its gates are off (``pred_iou_thresh`` and
``stability_score_thresh`` 0) so the round keeps, upsamples, encodes and writes a realistic number
of masks instead of rejecting them all.

Target: dask-2 >= 1.6x dask-1 images/s on a 2-core machine. Other processes on the machine lower
the ratio; the load average before and after is printed with the table.

    python -m benchmarks.bench_scale --quick --out bench-results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TARGET_RATIO = 1.6
GENERATOR = {
    "points_per_side": 16,  # --quick: 8
    "points_per_batch": 64,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 0.7,
}


def _prepare(tmp: Path, n_images: int, size: int) -> tuple[str, list[Path]]:
    """A seeded untrained tiny checkpoint and ``n_images`` synthetic scenes."""
    import torch

    from engine.builder import build_sam
    from engine.checkpoint import save_checkpoint
    from engine.synthetic import write_synthetic_dataset

    torch.manual_seed(0)
    checkpoint = str(tmp / "tiny-bench.pt")
    save_checkpoint(build_sam("tiny"), checkpoint, version="tiny-bench")
    paths, _ = write_synthetic_dataset(tmp / "images", n_images, seed=3, size=(size, size))
    return checkpoint, paths


def _warm_worker(ref: Any) -> tuple[str, float, bool]:
    """Run on a Dask worker: load the model into its per-process cache."""
    from flows.distributed import loaded_model

    loaded, loaded_now = loaded_model(ref)
    return f"{socket.gethostname()}:{os.getpid()}", loaded.load_s, loaded_now


@contextlib.contextmanager
def _cluster(workers: int) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(workers)
        yield client


def _run_dask(
    workers: int, job: Any, uris: list[str], shard_size: int
) -> tuple[dict[str, Any], dict[str, float]]:
    from flows.distributed import ClusterSpec, run_stage3

    with _cluster(workers) as client:
        warm = client.run(_warm_worker, job.model)
        loads = {name: load_s for name, load_s, _ in warm.values()}
        cluster = ClusterSpec(address=client.scheduler.address)
        summary = run_stage3(job, uris, cluster=cluster, shard_size=shard_size)
    reloaded = [r.worker for r in summary.shards if r.model_load_s > 0]
    row = {
        "name": f"dask-{workers}",
        "workers": workers,
        "images": summary.images,
        "masks": summary.masks_written,
        "wall_s": summary.wall_s,
        "images_per_s": summary.images_per_s,
        "workers_used": len({r.worker for r in summary.shards}),
        "model_reloads_during_run": len(reloaded),
    }
    return row, loads


def _run_in_process(job: Any, uris: list[str], shard_size: int) -> dict[str, Any]:
    import torch

    from flows.distributed import loaded_model, run_stage3

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded_model(job.model)  # load outside the clock, as on the workers
        summary = run_stage3(job, uris, shard_size=shard_size)
    finally:
        torch.set_num_threads(threads)
    return {
        "name": "in-process",
        "workers": 0,
        "images": summary.images,
        "masks": summary.masks_written,
        "wall_s": summary.wall_s,
        "images_per_s": summary.images_per_s,
        "workers_used": 1,
        "model_reloads_during_run": 0,
    }


def _load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results", help="folder for bench_scale.json")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller images")
    parser.add_argument("--images", type=int, default=None, help="images per configuration")
    parser.add_argument("--size", type=int, default=None, help="image side, pixels")
    parser.add_argument("--shard-size", type=int, default=None, help="images per shard (task)")
    args = parser.parse_args(argv)
    n_images = args.images or (8 if args.quick else 24)
    size = args.size or (128 if args.quick else 256)
    shard_size = args.shard_size or (2 if args.quick else 4)
    generator = {**GENERATOR, "points_per_side": 8 if args.quick else 16}

    from prefect.testing.utilities import prefect_test_harness

    from flows.distributed import ModelRef, Stage3Job

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    load_before = _load_average()
    try:
        checkpoint, paths = _prepare(tmp, n_images, size)

        uris = [str(p) for p in paths]

        def job_for(name: str) -> tuple[Any, list[str]]:
            # A fresh, empty store per configuration; the workers register the images.
            job = Stage3Job(str(tmp / name), ModelRef(checkpoint), "bench-r1", 1, generator)
            return job, uris

        rows, loads = [], {}
        # A throwaway Prefect server keeps the runs out of the user's Prefect database.
        with prefect_test_harness(server_startup_timeout=180):
            for workers in (1, 2):
                job, ids = job_for(f"dask-{workers}")
                row, loads[row["name"]] = _run_dask(workers, job, ids, shard_size)
                rows.append(row)
        job, ids = job_for("in-process")
        rows.append(_run_in_process(job, ids, shard_size))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    by_name = {r["name"]: r for r in rows}
    ratio = by_name["dask-2"]["images_per_s"] / by_name["dask-1"]["images_per_s"]
    result = {
        "benchmark": "bench_scale",
        "images": n_images,
        "image_size": size,
        "shard_size": shard_size,
        "generator": generator,
        "rows": rows,
        "model_load_s": loads,
        "ratio_dask2_vs_dask1": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": _load_average(),
        },
    }
    _print_table(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_scale.json").write_text(json.dumps(result, indent=2))
    return 0


def _print_table(result: dict[str, Any]) -> None:
    print(
        f"stage 3, {result['images']} images of {result['image_size']} px, "
        f"shards of {result['shard_size']}, tiny model"
    )
    print(f"{'config':<12}{'images':>8}{'masks':>8}{'wall s':>9}{'images/s':>10}{'workers':>9}")
    for r in result["rows"]:
        print(
            f"{r['name']:<12}{r['images']:>8}{r['masks']:>8}{r['wall_s']:>9.2f}"
            f"{r['images_per_s']:>10.3f}{r['workers_used']:>9}"
        )
    verdict = "meets" if result["meets_target"] else "MISSES"
    print(
        f"dask-2 / dask-1: {result['ratio_dask2_vs_dask1']:.2f}x "
        f"({verdict} the {result['target_ratio']}x target)"
    )
    print("model load per worker process (before the clock):")
    for config, loads in result["model_load_s"].items():
        for worker, seconds in loads.items():
            print(f"  {config:<10} {worker:<24} {seconds:.2f} s")
    machine = result["machine"]
    print(
        f"machine: {machine['cpus']} CPUs, load average before {machine['load_average_before']}, "
        f"after {machine['load_average_after']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
