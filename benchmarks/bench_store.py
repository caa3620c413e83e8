"""Mask store throughput: encode+write and read+decode of 1024x1024 masks, against bare pycocotools.

Measured in one run on the same masks, batch by batch in turns (so load on a shared machine
hits every path alike):

- ``bare encode``: ``pycocotools.mask.encode`` of C-ordered (N, H, W) bool masks, including the
  Fortran-order uint8 copy pycocotools needs (what every caller of pycocotools pays);
- ``store write``: ``storage.rle.encode`` + ``MaskRecord`` + ``MaskStore.write_masks`` (validation,
  area/bbox, one Parquet file and one commit per batch) on the same C-ordered masks;
- ``bare encode (F input)``: pycocotools on masks already column-major (pure codec time);
- ``store write (F input)``: the store on those column-major masks (``rle.encode`` copies nothing);
- ``bare decode``: ``pycocotools.mask.decode`` to (H, W, N) Fortran uint8, and the same plus
  the copy to C-ordered (N, H, W) that ``storage.rle.decode`` returns;
- ``store read``: a fresh ``MaskStore`` reading the committed masks and decoding them to
  (N, H, W) bool per image (``iter_image_masks``).

Target: store write >= 0.8x bare encode throughput on the same input (storage overhead under
25%); both input layouts are reported.

    python -m benchmarks.bench_store --quick --out bench-results
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TARGET_WRITE_RATIO = 0.8


def make_masks(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` object-like bool masks ``(n, size, size)``: ellipses, boxes, unions, some holes."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.ogrid[:size, :size]
    for k in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(size * 0.01, size * 0.3, 2)
            if rng.random() < 0.6:
                masks[k] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            else:
                y0, x0 = int(max(cy - ry, 0)), int(max(cx - rx, 0))
                masks[k, y0 : int(cy + ry), x0 : int(cx + rx)] = True
        if rng.random() < 0.3:  # a hole
            cy, cx = rng.uniform(0, size, 2)
            masks[k] &= ((yy - cy) ** 2 + (xx - cx) ** 2) > (size * 0.05) ** 2
    return masks


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run(n: int, size: int, batch: int, root: str) -> dict[str, Any]:
    """Run every measurement once; returns the results dict (rates in masks per second)."""
    from pycocotools import mask as coco_mask

    from storage import rle
    from storage.mask_store import ImageRecord, MaskRecord, MaskStore

    pool = make_masks(batch, size)
    # The same masks, column-major in memory: (N, H, W) with strides (H*W, 1, H).
    pool_column_major = np.ascontiguousarray(pool.transpose(0, 2, 1)).transpose(0, 2, 1)
    pool_fortran = pool_column_major.view(np.uint8).transpose(1, 2, 0)
    n_batches = max(1, n // batch)
    n = n_batches * batch
    stores = {"c": MaskStore(f"{root}/c-input"), "f": MaskStore(f"{root}/f-input")}
    images = [
        ImageRecord(f"bench{i:05d}", f"/bench/{i}.jpg", size, size, f"{i:064x}")
        for i in range(n_batches)
    ]
    for store in stores.values():
        store.add_images(images)

    def write(store: MaskStore, masks: np.ndarray, i: int) -> None:
        records = [
            MaskRecord(
                f"bench{i:05d}",
                r,
                3,
                0,
                "auto",
                "bench",
                predicted_iou=0.9,
                stability_score=0.96,
                point_coords=[[10.0, 20.0]],
            )
            for r in rle.encode(masks)
        ]
        store.write_masks(records, stage=3, round=0, run_id="bench")

    coco_rles = coco_mask.encode(pool_fortran)
    paths: dict[str, Callable[[int], Any]] = {
        "bare_encode": lambda i: coco_mask.encode(
            np.asfortranarray(pool.transpose(1, 2, 0)).view(np.uint8)
        ),
        "store_write": lambda i: write(stores["c"], pool, i),
        "bare_encode_f_input": lambda i: coco_mask.encode(pool_fortran),
        "store_write_f_input": lambda i: write(stores["f"], pool_column_major, i),
        "bare_decode": lambda i: coco_mask.decode(coco_rles),
        "bare_decode_c_output": lambda i: np.ascontiguousarray(
            coco_mask.decode(coco_rles).transpose(2, 0, 1)
        ),
    }
    seconds = dict.fromkeys(paths, 0.0)
    for i in range(n_batches):
        for name, path in paths.items():
            start = time.perf_counter()
            path(i)
            seconds[name] += time.perf_counter() - start

    def read() -> int:
        reader = MaskStore(f"{root}/c-input")  # nothing cached: reads the log and Parquet files
        return sum(masks.shape[0] for _, _, masks in reader.iter_image_masks(stage=3))

    seconds["store_read"], read_count = _timed(read)
    if read_count != n:
        raise RuntimeError(f"read back {read_count} masks, wrote {n}")
    # Spot-check: the first image's masks read back equal the pool (order by mask id).
    _, _, first = next(MaskStore(f"{root}/f-input").iter_image_masks(image_id="bench00000"))
    if sorted(m.tobytes() for m in first) != sorted(m.tobytes() for m in pool):
        raise RuntimeError("store read back different masks")

    stored_bytes = sum(info.size for info in stores["c"].location.list_info("masks"))
    rates = {name: n / s for name, s in seconds.items()}
    ratio_c = rates["store_write"] / rates["bare_encode"]
    ratio_f = rates["store_write_f_input"] / rates["bare_encode_f_input"]
    return {
        "masks": n,
        "size": size,
        "batch": batch,
        "commits": n_batches,
        "seconds": seconds,
        "masks_per_s": rates,
        "write_vs_bare_encode": ratio_c,
        "write_vs_bare_encode_f_input": ratio_f,
        "read_vs_bare_decode": rates["store_read"] / rates["bare_decode"],
        "read_vs_bare_decode_c_output": rates["store_read"] / rates["bare_decode_c_output"],
        "parquet_bytes_per_mask": stored_bytes / n,
        "target_write_ratio": TARGET_WRITE_RATIO,
        "meets_target_c_input": ratio_c >= TARGET_WRITE_RATIO,
        "meets_target_f_input": ratio_f >= TARGET_WRITE_RATIO,
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or "?"},
    }


def _print_table(result: dict[str, Any]) -> None:
    rates, seconds = result["masks_per_s"], result["seconds"]
    print(f"{result['masks']} masks of {result['size']}px square, {result['batch']} per commit")
    print(f"{'path':<30} {'masks/s':>10} {'seconds':>9}")
    labels = {
        "bare_encode": "bare encode (C input)",
        "store_write": "store encode+write (C input)",
        "bare_encode_f_input": "bare encode (F input)",
        "store_write_f_input": "store encode+write (F input)",
        "bare_decode": "bare decode",
        "bare_decode_c_output": "bare decode + (N,H,W) copy",
        "store_read": "store read+decode",
    }
    for key, label in labels.items():
        print(f"{label:<30} {rates[key]:>10.1f} {seconds[key]:>9.2f}")
    target = TARGET_WRITE_RATIO

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(
        f"write / bare encode: C input {result['write_vs_bare_encode']:.2f}x "
        f"({verdict(result['meets_target_c_input'])}), "
        f"F input {result['write_vs_bare_encode_f_input']:.2f}x "
        f"({verdict(result['meets_target_f_input'])}); target >= {target}"
    )
    print(
        f"read / bare decode = {result['read_vs_bare_decode']:.2f}x, "
        f"/ bare decode to (N,H,W) = {result['read_vs_bare_decode_c_output']:.2f}x; "
        f"{result['parquet_bytes_per_mask']:.0f} Parquet bytes per mask"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="bench-results", help="folder for bench_store.json")
    parser.add_argument("--quick", action="store_true", help="1,000 masks instead of 10,000")
    parser.add_argument(
        "--masks", type=int, default=None, help="number of masks (overrides --quick)"
    )
    parser.add_argument("--size", type=int, default=1024, help="mask side in pixels")
    parser.add_argument("--batch", type=int, default=100, help="masks per commit")
    parser.add_argument("--root", default=None, help="store root (default: a temporary folder)")
    args = parser.parse_args(argv)
    n = args.masks or (1_000 if args.quick else 10_000)
    root = args.root or tempfile.mkdtemp(prefix="bench-store-")
    try:
        result = run(n, args.size, args.batch, root)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    _print_table(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_store.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
