"""The vit_b image encoder against the original segment-anything encoder, same weights, one run.

Issue 5's encoder target is "no slower than the original" (12.9 s a 1024-px image on a 2-core CPU
when the issue was filed). A figure measured on another day is a weak reference on a noisy
machine, so this benchmark times both encoders in the same process, alternating them, with the
same random weights, and checks that they compute the same embedding.

The original comes from the ``segment-anything`` package (the ``bench`` extra; ``make bench``
installs it). Its package ``__init__`` imports torchvision, which this project does not install,
so only its ``modeling`` subpackage is imported (torch alone). Without the package, only our
encoder is timed.

Usage: ``python -m benchmarks.bench_encoder [--out DIR] [--runs 3] [--threads N]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import load_average
from engine.builder import VARIANTS, build_sam


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results", help="folder for the JSON result")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per encoder")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--image-size", type=int, default=1024, help="input side, pixels")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = build_sam("vit_b").image_encoder
    _randomise(ours)  # rel-pos tables start at zero; random values make the bias do real work
    encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"ours (sdpa)": ours}
    ours_math = build_sam("vit_b", use_sdpa=False).image_encoder
    ours_math.load_state_dict(ours.state_dict())
    encoders["ours (math)"] = ours_math
    original = _original_encoder(ours)
    if original is not None:
        encoders["original segment-anything"] = original
    else:
        print("segment-anything is not installed (pip install -e '.[bench]'): ours only")

    x = torch.randn(1, 3, args.image_size, args.image_size)
    times: dict[str, list[float]] = {name: [] for name in encoders}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, encoder in encoders.items():  # warm-up, and the outputs to compare
            outputs[name] = encoder(x)
        for _ in range(args.runs):  # alternate, so drifting load hits every encoder alike
            for name, encoder in encoders.items():
                start = time.perf_counter()
                encoder(x)
                times[name].append(time.perf_counter() - start)

    reference = outputs.get("original segment-anything")
    rows = []
    for name in encoders:
        row: dict[str, Any] = {
            "encoder": name,
            "median_s": statistics.median(times[name]),
            "min_s": min(times[name]),
            "runs_s": times[name],
        }
        if reference is not None:
            row["max_abs_diff_vs_original"] = float((outputs[name] - reference).abs().max())
            row["ratio_to_original"] = row["median_s"] / statistics.median(
                times["original segment-anything"]
            )
        rows.append(row)
    _print_table(rows)
    report = {
        "benchmark": "bench_encoder",
        "variant": "vit_b",
        "image_size": args.image_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "rows": rows,
        "target": "ours (sdpa) no slower than the original (ratio <= 1)",
    }
    if reference is not None:
        ratio = rows[0]["ratio_to_original"]
        report["target_met"] = ratio <= 1.0
        print(f"ours (sdpa) / original: {ratio:.2f}x ({'met' if ratio <= 1 else 'MISSED'})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_encoder.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'bench_encoder.json'}")
    return 0


def _original_encoder(ours: torch.nn.Module) -> torch.nn.Module | None:
    """The original ``ImageEncoderViT`` with vit_b's settings and ``ours``' weights, or None."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        return None
    if "segment_anything" not in sys.modules:
        # The package without its __init__ (which imports torchvision): a bare namespace whose
        # path lets `segment_anything.modeling` import normally.
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    args = VARIANTS["vit_b"]
    encoder = ImageEncoderViT(
        depth=args["encoder_depth"],
        embed_dim=args["encoder_embed_dim"],
        img_size=args["image_size"],
        mlp_ratio=4,
        norm_layer=lambda dim: torch.nn.LayerNorm(dim, eps=1e-6),
        num_heads=args["encoder_num_heads"],
        patch_size=args["vit_patch_size"],
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(args["encoder_global_attn_indexes"]),
        window_size=args["window_size"],
        out_chans=args["prompt_embed_dim"],
    )
    encoder.load_state_dict(ours.state_dict(), strict=True)
    return encoder.eval()


def _randomise(module: torch.nn.Module, std: float = 0.02) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'encoder':<28} {'median s':>9} {'min s':>7} {'vs original':>12} {'max |diff|':>11}")
    for row in rows:
        ratio = row.get("ratio_to_original")
        diff = row.get("max_abs_diff_vs_original")
        print(
            f"{row['encoder']:<28} {row['median_s']:>9.2f} {row['min_s']:>7.2f} "
            f"{(f'{ratio:.2f}x' if ratio is not None else '-'):>12} "
            f"{(f'{diff:.1e}' if diff is not None else '-'):>11}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
