"""`data-engine` commands on models: train (a new registered version) and eval (holdout metrics)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from engine.evaluation.metrics import InteractiveMetrics

_ROOT_HELP = "Store root: a folder or s3://bucket/prefix."
_ENDPOINT = typer.Option(
    "--endpoint-url",
    envvar="AWS_ENDPOINT_URL",
    help="S3-compatible endpoint (MinIO, moto); credentials come from the AWS settings.",
)
# Row labels of the metrics table, in print order.
_ROWS = (
    ("miou_1click", "mIoU@1"),
    ("miou_5click", "mIoU@5"),
    ("noc85", "NoC@85"),
    ("noc90", "NoC@90"),
    ("box_miou", "box mIoU"),
    ("images", "images"),
    ("objects", "objects"),
)


def register(app: typer.Typer) -> None:
    """Add the model commands to the `data-engine` app."""
    app.command("train")(train)
    app.command("eval")(eval_)


def train(
    root: Annotated[str, typer.Option("--root", help=_ROOT_HELP)],
    from_: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Parent: a version (v0003), 'latest', a checkpoint path/URI, or 'scratch'. "
            "Default: the latest promoted version, else scratch.",
        ),
    ] = None,
    variant: Annotated[
        str | None, typer.Option("--variant", help="Model variant (default tiny from scratch).")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
    minutes: Annotated[
        float | None, typer.Option("--minutes", help="Training-time budget, minutes.")
    ] = None,
    stage: Annotated[
        list[int] | None, typer.Option("--stage", help="Train on masks of this stage (repeat).")
    ] = None,
    round_: Annotated[
        list[int] | None, typer.Option("--round", help="Train on masks of this round (repeat).")
    ] = None,
    source: Annotated[
        list[str] | None, typer.Option("--source", help="manual, model or auto (repeat).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the --from checkpoint's run (optimizer, step)."),
    ] = False,
    freeze_encoder: Annotated[
        bool, typer.Option("--freeze-encoder", help="Train only prompt encoder and decoder.")
    ] = False,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    num_rounds: Annotated[int, typer.Option("--num-rounds", help="Rounds per mask.")] = 11,
    images_per_step: Annotated[int, typer.Option("--images-per-step")] = 2,
    masks_per_image: Annotated[int, typer.Option("--masks-per-image")] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    no_promote: Annotated[
        bool, typer.Option("--no-promote", help="Register the version but do not promote it.")
    ] = False,
    holdout_limit: Annotated[
        int | None, typer.Option("--holdout-limit", help="Evaluate on at most N holdout images.")
    ] = None,
    eval_clicks: Annotated[
        int, typer.Option("--eval-clicks", help="Click budget of the holdout evaluation.")
    ] = 20,
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", help="Input side in pixels of a model built from scratch."),
    ] = None,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            "--nproc-per-node",
            min=1,
            help="Data-parallel processes on this machine (one per GPU, or CPU workers); "
            "started through torchrun. Under torchrun already, leave it out.",
        ),
    ] = 1,
    endpoint_url: Annotated[str | None, _ENDPOINT] = None,
) -> None:
    """Train a model on the store's pool masks and register it as a new version.

    The new version and its parent are evaluated on the store's holdout; the new version is
    promoted when it is not worse than its parent. With several processes (``--nproc-per-node``
    or ``torchrun``), every rank trains on its own samples with averaged gradients; rank 0
    evaluates and registers.
    """
    from engine.registry import ModelRegistry
    from engine.training import StoreTrainingData, TrainConfig, no_point_rounds_for
    from engine.training import train as run_training
    from engine.training.distributed import init_from_env, leave_process_group, rank_and_world
    from storage.errors import ConfigError
    from storage.mask_store import MaskStore

    if nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_relaunch_under_torchrun(nproc_per_node))
    device = init_from_env()
    rank = rank_and_world()[0]
    if steps is None and minutes is None:
        steps = 2000
    if steps is not None and minutes is not None:
        raise ConfigError("give --steps or --minutes, not both")
    store = MaskStore(root, endpoint_url=endpoint_url)
    registry = ModelRegistry(store)
    model, parent, meta = _parent_model(registry, from_, variant, image_size, endpoint_url)
    model.to(device)
    if resume and (meta is None or meta.step is None):
        raise ConfigError("--resume needs --from a checkpoint written by a training run")
    data = StoreTrainingData(store, model.img_size, stages=stage, rounds=round_, sources=source)
    config = TrainConfig(
        steps=steps,
        minutes=minutes,
        images_per_step=images_per_step,
        masks_per_image=masks_per_image,
        num_rounds=num_rounds,
        no_point_rounds=no_point_rounds_for(num_rounds),
        seed=seed,
        freeze_image_encoder=freeze_encoder,
        checkpoint_every=200,
    )
    if lr is not None:
        config = dataclasses.replace(config, lr=lr)
    trained_on = data.describe()
    if rank == 0:
        typer.echo(
            f"training {model.variant} from {parent or 'scratch'} on {trained_on['masks']} "
            f"masks of {trained_on['images']} images (commit {trained_on['commit_sequence']})"
        )
    run_uri = store.location.uri(f"models/_runs/{time.strftime('%Y%m%dT%H%M%S')}.pt")
    result = run_training(
        model,
        data,
        config,
        start_step=meta.step if resume and meta and meta.step else 0,
        optimizer_state=meta.optimizer_state if resume and meta else None,
        checkpoint_uri=run_uri,
        checkpoint_meta={"parent": parent, "trained_on": trained_on},
        progress=rank == 0,
    )
    leave_process_group()  # training held the last collective
    if rank != 0:
        return  # rank 0 holds the same weights and does the rest
    metrics = parent_metrics = None
    if store.count_masks(split="holdout") > 0:
        metrics = _evaluate(model, _store_samples(store, holdout_limit), max_clicks=eval_clicks)
        if parent is not None:
            parent_model = _load(registry, parent, endpoint_url)
            parent_metrics = _evaluate(
                parent_model, _store_samples(store, holdout_limit), max_clicks=eval_clicks
            )
    else:
        typer.secho("no holdout masks in the store: the new version is not evaluated", err=True)
    card = registry.register(
        model,
        parent=parent,
        trained_on=trained_on,
        steps=result.step,
        wall_time_s=result.train_s,
        metrics=metrics,
        parent_metrics=parent_metrics,
        optimizer_state=result.optimizer_state,
        extra={"train_config": config.to_dict(), "samples_per_s": result.samples_per_s},
    )
    if metrics is not None and not no_promote:
        card = registry.promote(card.version)
    typer.echo(f"registered {card.version} ({result.step} steps, {result.train_s:.0f} s)")
    typer.echo(_table(metrics, parent_metrics, parent))
    if card.promotion:
        typer.echo(f"{'promoted' if card.promoted else 'not promoted'}: {card.promotion['reason']}")


def _relaunch_under_torchrun(nproc: int) -> int:
    """Run this same command again under ``torchrun`` with ``nproc`` processes; its exit code."""
    argv = sys.argv[1:]
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            kept.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", "-m", "flows.cli", *kept]
    return subprocess.run(command, check=False).returncode


def eval_(
    model: Annotated[
        str, typer.Option("--model", help="A version (v0003), 'latest', or a checkpoint.")
    ],
    root: Annotated[str | None, typer.Option("--root", help=_ROOT_HELP)] = None,
    images: Annotated[str | None, typer.Option("--images", help="Image folder for --coco.")] = None,
    coco: Annotated[
        str | None, typer.Option("--coco", help="COCO instances JSON with the ground truth.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the metrics to this JSON file.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="At most N images.")] = None,
    max_clicks: Annotated[int, typer.Option("--max-clicks", help="NoC cap.")] = 20,
    zoom_in: Annotated[
        bool,
        typer.Option(
            "--zoom-in/--no-zoom-in",
            help="Answer small objects again on a crop around them, as the ML backend does.",
        ),
    ] = True,
    endpoint_url: Annotated[str | None, _ENDPOINT] = None,
) -> None:
    """Interactive metrics of a model on the store's holdout or on a COCO file."""
    from engine.evaluation import coco_holdout
    from engine.registry import ModelRegistry
    from storage.errors import ConfigError
    from storage.mask_store import MaskStore

    if (root is None) == (images is None or coco is None):
        raise ConfigError("give --root, or --images with --coco (and not both)")
    store = MaskStore(root, endpoint_url=endpoint_url) if root is not None else None
    registry = ModelRegistry(store) if store is not None else None
    sam = _load(registry, model, endpoint_url)
    samples = (
        _store_samples(store, limit)
        if store is not None
        else coco_holdout(str(images), str(coco), limit=limit)
    )
    metrics = _evaluate(sam, samples, max_clicks=max_clicks, zoom_in=zoom_in)
    typer.echo(_table(metrics, None, None))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(metrics.to_dict(), indent=1))
        typer.echo(f"wrote {json_out}")


# ------------------------------------------------------------------------------------- helpers


def _parent_model(
    registry: Any,
    from_: str | None,
    variant: str | None,
    image_size: int | None,
    endpoint_url: str | None,
) -> tuple[Any, str | None, Any]:
    """(model to train, parent name or None, checkpoint meta or None) for ``--from``."""
    from engine.builder import build_sam
    from engine.checkpoint import load_checkpoint
    from storage.errors import ConfigError

    if from_ is None:
        latest = registry.latest()
        from_ = latest.version if latest is not None else "scratch"
    if from_ == "scratch":
        overrides: dict[str, Any] = {"image_size": image_size} if image_size else {}
        return build_sam(variant or "tiny", **overrides), None, None
    if image_size:
        raise ConfigError("--image-size applies to a model built from scratch (--from scratch)")
    if from_ == "latest" or _is_version(from_):
        card = registry.resolve(from_)
        uri = registry.checkpoint_uri(card.version)
        name = card.version
    else:
        uri = name = from_
    model, meta = load_checkpoint(uri, variant=variant, endpoint_url=endpoint_url)
    return model, name, meta


def _load(registry: Any, name: str, endpoint_url: str | None) -> Any:
    from engine.checkpoint import load_checkpoint
    from storage.errors import ConfigError

    if name == "latest" or _is_version(name):
        if registry is None:
            raise ConfigError(f"--model {name} names a registered version; give --root too")
        return registry.load(name)
    return load_checkpoint(name, endpoint_url=endpoint_url)[0]


def _is_version(name: str) -> bool:
    return len(name) >= 5 and name[0] == "v" and name[1:].isdigit()


def _store_samples(store: Any, limit: int | None) -> Any:
    from engine.evaluation import store_holdout

    return store_holdout(store, limit=limit)


def _evaluate(
    model: Any, samples: Any, *, max_clicks: int = 20, zoom_in: bool = True
) -> InteractiveMetrics:
    from engine.evaluation import evaluate_interactive
    from engine.zoom_in import DEFAULT_ZOOM_IN

    return evaluate_interactive(
        model,
        samples,
        max_clicks=max_clicks,
        progress=True,
        zoom_in=DEFAULT_ZOOM_IN if zoom_in else None,
    )


def _table(
    metrics: InteractiveMetrics | None,
    parent_metrics: InteractiveMetrics | None,
    parent: str | None,
) -> str:
    if metrics is None:
        return "(no metrics)"
    new, old = metrics.to_dict(), parent_metrics.to_dict() if parent_metrics else None
    header = f"{'metric':<10} {'model':>9}" + (
        f" {('parent ' + str(parent))[-16:]:>16}" if old else ""
    )
    lines = [header]
    for key, label in _ROWS:
        line = f"{label:<10} {_fmt(new[key]):>9}"
        if old:
            line += f" {_fmt(old[key]):>16}"
        lines.append(line)
    return "\n".join(lines)


def _fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3f}"
