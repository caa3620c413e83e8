"""Speed of the SAM variants (random weights: speed does not depend on them).

For ``tiny`` and ``vit_b``, with and without ``F.scaled_dot_product_attention`` and with float32
or bfloat16 autocast:

- encoder: seconds per image at the model's input size (256 px tiny, 1024 px vit_b);
- decoder: milliseconds for one prompt batch (prompt encoder + mask decoder, multimask output)
  of 1 point and of 64 points (one point per prompt, as the automatic mask generator sends);
- the decoder's folded cross-attention (``Sam.use_factored_attention``) on and off;
- click: ``SamPredictor.predict`` with one point from a cached embedding (``set_embedding``),
  masks returned at the original image size, the latency an annotator feels.

Medians over ``--runs`` runs (>= 20 by default for the decoder and clicks). Targets on the 2-core
CI CPU: vit_b click under 50 ms median, tiny encoder under 100 ms per image.

Usage: ``python -m benchmarks.bench_model [--quick] [--out DIR] [--variants tiny vit_b]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.builder import build_sam
from engine.modeling.sam import Sam
from engine.predictor import SamPredictor

TARGET_CLICK_MS = {"vit_b": 50.0}
#: Name -> (use SDPA, autocast dtype or None for float32, factored decoder attention).
_CONFIGS: dict[str, tuple[bool, torch.dtype | None, bool]] = {
    "sdpa-fp32": (True, None, True),
    "math-fp32": (False, None, True),
    "sdpa-bf16": (True, torch.bfloat16, True),
    "sdpa-fp32-unfactored": (True, None, False),
}
TARGET_ENCODER_S = {"tiny": 0.100}
#: Original image sizes (H, W) for the click: a 1024 px photo and the SA-1B average.
CLICK_SIZES = ((768, 1024), (1500, 2250))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results", help="folder for the JSON result")
    parser.add_argument("--quick", action="store_true", help="fewer runs, fewer configurations")
    parser.add_argument("--variants", nargs="+", default=["tiny", "vit_b"])
    parser.add_argument("--runs", type=int, default=None, help="runs per decoder/click timing")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=sorted(_CONFIGS),
        default=None,
        help="attention/dtype settings to time (default: all; --quick: sdpa-fp32 for ViTs)",
    )
    parser.add_argument(
        "--no-encoder", action="store_true", help="skip the ViT encoder timing (~1 TFLOP each)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = args.runs or (5 if args.quick else 20)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        rows.extend(
            _bench_variant(variant, device, runs, args.quick, args.configs, args.no_encoder)
        )
    result = {
        "benchmark": "model",
        "quick": args.quick,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": {"cpu": platform.processor() or platform.machine(), "load": _load_average()},
        "targets": {"click_ms_median": TARGET_CLICK_MS, "encoder_s": TARGET_ENCODER_S},
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_model.json").write_text(json.dumps(result, indent=1))
    _print_table(rows)
    return 0


def _bench_variant(
    variant: str,
    device: torch.device,
    runs: int,
    quick: bool,
    config_names: list[str] | None,
    no_encoder: bool,
) -> list[dict]:
    torch.manual_seed(0)
    model = build_sam(variant, device=device)
    names = config_names or list(_CONFIGS)
    if quick and variant != "tiny" and config_names is None:
        names = ["sdpa-fp32"]
    rows = []
    for name in names:
        use_sdpa, dtype, factored = _CONFIGS[name]
        model.use_sdpa = use_sdpa
        model.use_factored_attention = factored
        skip_encoder = no_encoder and variant != "tiny"
        rows.append(_bench_config(model, variant, dtype, runs, skip_encoder))
        print(_format_row(rows[-1]), flush=True)
    model.use_sdpa = True
    model.use_factored_attention = True
    return rows


def _native_cpu_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX; Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _bench_config(
    model: Sam, variant: str, dtype: torch.dtype | None, runs: int, skip_encoder: bool
) -> dict:
    row: dict[str, Any] = {
        "variant": variant,
        "sdpa": model.use_sdpa,
        "dtype": "bfloat16" if dtype else "float32",
        "factored": model.use_factored_attention,
    }
    # A ViT-B encoder pass is ~1 TFLOP: a few runs are enough for its median.
    encoder_runs = runs if variant == "tiny" else max(1, min(3, runs // 5))
    if dtype is not None and variant != "tiny":
        encoder_runs = 1
        if model.device.type == "cpu" and not _native_cpu_bf16():
            # Emulated bf16: the tiny encoder runs 125x slower than fp32 on an AVX2 CPU, so a
            # ViT-B pass would take over half an hour. Its decoder is still timed.
            skip_encoder = True
    if skip_encoder:
        row["encoder_s"] = row["encoder_cpu_s"] = float("nan")
        embedding = torch.randn(
            1, model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size
        ).to(model.device)
    else:
        row["encoder_s"], row["encoder_cpu_s"] = _median(
            functools.partial(_encode, model, dtype), encoder_runs
        )
        embedding = _encode(model, dtype)
    for n_prompts in (1, 64):
        decode = functools.partial(_decode, model, embedding, n_prompts, dtype)
        wall, cpu = _median(decode, runs)
        row[f"decoder_ms_{n_prompts}"], row[f"decoder_cpu_ms_{n_prompts}"] = wall * 1e3, cpu * 1e3
    predictor = SamPredictor(model, autocast_dtype=dtype)
    point_label = np.array([1])
    for size in CLICK_SIZES:
        predictor.set_embedding(embedding, size)
        point = np.array([[size[1] * 0.4, size[0] * 0.6]])
        click = functools.partial(predictor.predict, point, point_label)
        wall, cpu = _median(click, runs)
        row[f"click_ms_{size[0]}x{size[1]}"] = wall * 1e3
        row[f"click_cpu_ms_{size[0]}x{size[1]}"] = cpu * 1e3
    return row


@torch.no_grad()
def _encode(model: Sam, dtype: torch.dtype | None) -> torch.Tensor:
    x = torch.randn(1, 3, model.img_size, model.img_size, device=model.device)
    with torch.autocast(model.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model.image_encoder(x)
    return out.float()


@torch.no_grad()
def _decode(model: Sam, embedding: torch.Tensor, n: int, dtype: torch.dtype | None) -> None:
    coords = torch.rand(n, 1, 2, device=model.device) * model.img_size
    labels = torch.ones(n, 1, dtype=torch.long, device=model.device)
    with torch.autocast(model.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low_res, _ = model.mask_decoder(
            embedding,
            model.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output=True,
            points=(coords, labels),
        )
    low_res.float().sum().item()  # waits for the device


def _median(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds of ``fn`` over ``runs`` runs.

    On a machine shared with other jobs the wall clock of a multi-threaded run inflates badly
    (threads wait for each other at every barrier); the CPU time of a ``--threads 1`` run is
    then the better estimate of what the work costs.
    """
    fn()  # warm-up: allocator, kernels, caches
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    walls, cpus = [], []
    for _ in range(runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return statistics.median(walls), statistics.median(cpus)


def _format_row(row: dict[str, Any]) -> str:
    def pair(key: str, cpu_key: str, scale: str) -> str:
        return f"{row[key]:{scale}} ({row[cpu_key]:{scale}})"

    clicks = "  ".join(
        pair(f"click_ms_{h}x{w}", f"click_cpu_ms_{h}x{w}", "7.1f") for h, w in CLICK_SIZES
    )
    return (
        f"{row['variant']:<6} {'sdpa' if row['sdpa'] else 'math':<5} {row['dtype']:<9} "
        f"{'yes' if row['factored'] else 'no':<4} "
        f"{pair('encoder_s', 'encoder_cpu_s', '7.3f')}  "
        f"{pair('decoder_ms_1', 'decoder_cpu_ms_1', '7.1f')}  "
        f"{pair('decoder_ms_64', 'decoder_cpu_ms_64', '8.1f')}  {clicks}"
    )


def _print_table(rows: list[dict[str, Any]]) -> None:
    sizes = "  ".join(f"click {h}x{w:<10}" for h, w in CLICK_SIZES)
    print(
        f"\nmedian wall (median process CPU), threads={torch.get_num_threads()}\n"
        f"{'model':<6} {'attn':<5} {'dtype':<9} {'fold':<4} {'encoder s/img':<17}  "
        f"{'decoder ms 1pt':<17}  "
        f"{'decoder ms 64pt':<19}  {sizes}"
    )
    for row in rows:
        print(_format_row(row))
    for row in rows:
        if not (row["sdpa"] and row["dtype"] == "float32" and row["factored"]):
            continue
        variant = row["variant"]
        if variant in TARGET_CLICK_MS:
            click = row[f"click_ms_{CLICK_SIZES[0][0]}x{CLICK_SIZES[0][1]}"]
            verdict = "meets" if click < TARGET_CLICK_MS[variant] else "MISSES"
            print(
                f"{variant} click {click:.1f} ms {verdict} the {TARGET_CLICK_MS[variant]} ms target"
            )
        if variant in TARGET_ENCODER_S:
            enc = row["encoder_s"]
            verdict = "meets" if enc < TARGET_ENCODER_S[variant] else "MISSES"
            target_ms = TARGET_ENCODER_S[variant] * 1000
            print(f"{variant} encoder {enc * 1000:.0f} ms {verdict} the {target_ms:.0f} ms target")
    print(f"load average: {_load_average()}")


def _load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    raise SystemExit(main())
