"""Train ``tiny`` from scratch on synthetic scenes for a wall-clock budget; evaluate every minute.

The question it answers: how good does the engine's own model get, from random weights, in ten
minutes on a 2-core CPU? Targets after 10 minutes: mIoU@1 >= 0.75 and NoC@90 <= 5 on synthetic
holdout scenes the model never saw (a fixed seed apart from the training stream).

Training time only counts the training steps; the evaluations in between are timed separately.
Clicks go through the zoom-in the ML backend uses (``engine.zoom_in``; ``--zoom-in 0`` turns it
off); the final model is also scored the other way, and both are in the JSON.
Prints one row per evaluation (minute, steps, samples/s, loss, metrics) and writes
``bench_train.json`` to ``--out``. Uses CUDA when available (then the targets do not apply).

    python -m benchmarks.bench_train --out bench-results            # 10 minutes
    python -m benchmarks.bench_train --out bench-results --quick    # 1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.machine import load_average

#: Seed of the holdout scenes (training scenes come from TrainConfig.seed streams).
HOLDOUT_SEED = 1_000_003
TARGETS = {"miou_1click": 0.75, "noc90": 5.0}
_SCENE_SIZE = (256, 256)
#: Scenes of the curriculum's first part (as the test fixture's): few, large objects.
EASY_SCENES = {"max_objects": 4, "min_area": 800}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for bench_train.json")
    parser.add_argument("--quick", action="store_true", help="1 minute, small holdout")
    parser.add_argument("--minutes", type=float, default=None, help="training budget (10)")
    parser.add_argument("--eval-every", type=float, default=1.0, help="minutes between evals")
    parser.add_argument("--holdout", type=int, default=None, help="holdout images (40)")
    parser.add_argument(
        "--probe", type=int, default=None, help="holdout images of the per-minute evals (12)"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="model input side, px (tiny: 256)"
    )
    parser.add_argument(
        "--out-stride", type=int, default=None, help="tiny's embedding stride, 8 or 4 (8)"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="also save the trained model here (for inspection)"
    )
    parser.add_argument("--images-per-step", type=int, default=2)
    parser.add_argument("--masks-per-image", type=int, default=8)
    parser.add_argument("--num-rounds", type=int, default=3)
    parser.add_argument(
        "--max-points-per-round", type=int, default=1, help="TrainConfig.max_points_per_round"
    )
    parser.add_argument(
        "--instance-loss-weight", type=float, default=1.0, help="TrainConfig.instance_loss_weight"
    )
    parser.add_argument(
        "--iou-loss-weight", type=float, default=1.0, help="TrainConfig.iou_loss_weight"
    )
    parser.add_argument(
        "--instance-dim", type=int, default=None, help="tiny's instance code channels (16; 0: none)"
    )
    parser.add_argument(
        "--click-disks", type=int, choices=(0, 1), default=None, help="tiny's click disks (1)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--steps", type=int, default=None, help="step cap (a CPU-equivalent budget on a GPU)"
    )
    parser.add_argument(
        "--focal-weight",
        type=float,
        default=1.0,
        help="focal:dice weight (SAM: 20; from random weights cross-entropy + dice at 1:1 "
        "trains fastest, as the flows pretrain)",
    )
    parser.add_argument(
        "--focal-gamma", type=float, default=0.0, help="SAM: 2; 0: no focusing (cross-entropy)"
    )
    parser.add_argument(
        "--focal-alpha",
        type=float,
        default=-1.0,
        help="foreground weight (SAM: 0.25; negative: none)",
    )
    parser.add_argument("--repeat-masks", action="store_true", help="TrainConfig.repeat_masks")
    parser.add_argument(
        "--scale-min", type=float, default=1.0, help="scale jitter: longest side x [min, 1]"
    )
    parser.add_argument(
        "--zoom-in",
        type=int,
        choices=(0, 1),
        default=1,
        help="evaluate with ZoomIn (1, the default; the final row is also reported without)",
    )
    parser.add_argument(
        "--easy-fraction",
        type=float,
        default=0.0,
        help="share of the run's first samples drawn from easy scenes (a curriculum)",
    )
    args = parser.parse_args(argv)

    import torch

    from engine.builder import build_sam
    from engine.evaluation import evaluate_interactive, synthetic_holdout
    from engine.training import (
        AugmentConfig,
        StepLog,
        SyntheticTrainingData,
        TrainConfig,
        no_point_rounds_for,
        train,
    )
    from engine.zoom_in import ZoomIn

    zoom_in = ZoomIn() if args.zoom_in else None
    if args.threads:
        torch.set_num_threads(args.threads)
    minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 10.0)
    n_holdout = args.holdout if args.holdout is not None else (10 if args.quick else 40)
    n_probe = min(n_holdout, args.probe if args.probe is not None else 12)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    overrides: dict[str, Any] = {"image_size": args.image_size} if args.image_size else {}
    if args.out_stride:
        overrides["encoder_out_stride"] = args.out_stride
    if args.instance_dim is not None:
        overrides["instance_dim"] = args.instance_dim
    if args.click_disks is not None:
        overrides["click_disks"] = bool(args.click_disks)
    model = build_sam("tiny", device=device, **overrides)
    holdout = list(synthetic_holdout(n_holdout, seed=HOLDOUT_SEED, size=_SCENE_SIZE))
    config = TrainConfig(
        # --steps alone: the lr schedule follows steps, as a CPU run of that many steps would.
        minutes=None if args.steps is not None and args.minutes is None else minutes,
        images_per_step=args.images_per_step,
        masks_per_image=args.masks_per_image,
        num_rounds=args.num_rounds,
        no_point_rounds=no_point_rounds_for(args.num_rounds),
        max_points_per_round=args.max_points_per_round,
        instance_loss_weight=args.instance_loss_weight,
        iou_loss_weight=args.iou_loss_weight,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        steps=args.steps,
        focal_weight=args.focal_weight,
        focal_gamma=args.focal_gamma,
        focal_alpha=args.focal_alpha,
        repeat_masks=args.repeat_masks,
    )
    rows: list[dict[str, Any]] = []
    state = {"next_eval_s": args.eval_every * 60, "last_step": 0, "last_s": 0.0, "samples": 0}

    def evaluate(log: StepLog | None, *, final: bool = False) -> None:
        t0 = time.perf_counter()
        # The per-minute rows use the first n_probe holdout images; the final row all of them.
        metrics = evaluate_interactive(
            model, holdout if final else holdout[:n_probe], zoom_in=zoom_in
        )
        model.train()
        steps = log.step if log else 0
        train_s = log.train_s if log else 0.0
        window_s = max(1e-9, train_s - state["last_s"])
        rows.append(
            {
                "minute": round(train_s / 60, 2),
                "steps": steps,
                "steps_per_s": (steps - state["last_step"]) / window_s,
                "samples_per_s": state["samples"] / window_s,
                "loss": log.loss if log else float("nan"),
                "eval_s": time.perf_counter() - t0,
                "final": final,
                **metrics.to_dict(),
            }
        )
        state.update(last_step=steps, last_s=train_s, samples=0)
        _print_row(rows[-1], header=len(rows) == 1)

    def on_step(log: StepLog) -> None:
        state["samples"] += log.masks
        if log.train_s >= state["next_eval_s"]:
            evaluate(log)
            state["next_eval_s"] += args.eval_every * 60

    print(
        f"bench_train: tiny from scratch, {minutes:g} min on {device} "
        f"({torch.get_num_threads()} threads), holdout {n_holdout} scenes "
        f"(per-minute rows: first {n_probe}); {config}",
        flush=True,
    )
    load_before = load_average()
    # Training scenes are drawn at the holdout's size and resized to the model input like any
    # image, so a smaller model input sees the same distribution.
    jitter = AugmentConfig(scale_range=(args.scale_min, 1.0))
    data: Any = SyntheticTrainingData(model.img_size, augment=jitter, scene_size=_SCENE_SIZE)
    if args.easy_fraction > 0:
        easy = SyntheticTrainingData(
            model.img_size, augment=jitter, scene_kwargs=EASY_SCENES, scene_size=_SCENE_SIZE
        )
        planned = args.steps or int(minutes * 60 * 1.3)  # samples drawn ~ steps x images
        data = _Curriculum(easy, data, int(args.easy_fraction * planned * args.images_per_step))
    result = train(model, data, config, on_step=on_step, progress=False)
    evaluate(result.history[-1] if result.history else None, final=True)
    final = rows[-1]
    # The same model without zoom-in: what the decoder does on whole images alone.
    other = evaluate_interactive(model, holdout, zoom_in=None if zoom_in else ZoomIn())
    print(
        f"final {'without' if zoom_in else 'with'} zoom-in: "
        + ", ".join(f"{k} {v:.3f}" for k, v in other.to_dict().items() if isinstance(v, float)),
        flush=True,
    )
    passed = {
        k: (final[k] >= v if k.startswith("miou") else final[k] <= v) for k, v in TARGETS.items()
    }
    report = {
        "benchmark": "bench_train",
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "minutes": minutes,
        "holdout_images": n_holdout,
        "holdout_seed": HOLDOUT_SEED,
        "image_size": model.img_size,
        "build_args": model.build_args,
        "scene_size": list(_SCENE_SIZE),
        "config": config.to_dict(),
        "steps": result.step,
        "train_s": result.train_s,
        "samples_per_s": result.samples_per_s,
        "rows": rows,
        "final": {
            k: final[k] for k in ("miou_1click", "miou_5click", "noc85", "noc90", "box_miou")
        },
        "zoom_in": asdict(zoom_in) if zoom_in else None,
        "final_other_zoom": other.to_dict(),
        "targets": TARGETS,
        "targets_met": passed,
    }
    print(
        f"final after {result.train_s / 60:.1f} min, {result.step} steps: "
        + ", ".join(
            f"{k} {final[k]:.3f} (target {v}: {'met' if passed[k] else 'MISSED'})"
            for k, v in TARGETS.items()
        ),
        flush=True,
    )
    if args.checkpoint:
        from engine.checkpoint import save_checkpoint

        save_checkpoint(model, args.checkpoint, step=result.step)
        print(f"saved the model to {args.checkpoint}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_train.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {out / 'bench_train.json'}")
    return 0


class _Curriculum:
    """The first ``easy_samples`` samples from ``easy``, the rest from ``full``."""

    def __init__(self, easy: Any, full: Any, easy_samples: int) -> None:
        self.easy, self.full, self.easy_samples, self.drawn = easy, full, easy_samples, 0

    def sample(self, rng: Any) -> Any:
        self.drawn += 1
        return (self.easy if self.drawn <= self.easy_samples else self.full).sample(rng)

    def describe(self) -> dict[str, Any]:
        return {"curriculum": {"easy": self.easy.describe(), "easy_samples": self.easy_samples}}


def _print_row(row: dict[str, Any], *, header: bool) -> None:
    if header:
        print(
            f"{'min':>5} {'steps':>6} {'steps/s':>8} {'samples/s':>9} {'loss':>7} "
            f"{'mIoU@1':>7} {'mIoU@5':>7} {'NoC85':>6} {'NoC90':>6} {'boxIoU':>7} {'eval s':>7}"
        )
    print(
        f"{row['minute']:>5.1f} {row['steps']:>6d} {row['steps_per_s']:>8.2f} "
        f"{row['samples_per_s']:>9.1f} {row['loss']:>7.3f} {row['miou_1click']:>7.3f} "
        f"{row['miou_5click']:>7.3f} {row['noc85']:>6.2f} {row['noc90']:>6.2f} "
        f"{row['box_miou']:>7.3f} {row['eval_s']:>7.1f}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
