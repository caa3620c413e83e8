"""`data-engine amg`: stage-3 automatic masks for a folder or S3 prefix of images."""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from typing import Annotated, Any

import typer

_VERSION = re.compile(r"^(latest|v\d{4,})$")


class Preset(StrEnum):
    """Named generator settings (``engine.amg.PRESETS``)."""

    paper = "paper"
    default = "default"


class Split(StrEnum):
    """Split new images are registered in."""

    pool = "pool"
    holdout = "holdout"


def register(app: typer.Typer) -> None:
    """Add the `amg` command to the `data-engine` app."""
    app.command("amg")(amg)


def _generator_option(help_text: str) -> Any:
    return typer.Option(help=f"{help_text} (default: the preset's, else SAM's).")


def amg(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="A registered model version (v0003, latest) or a checkpoint path / s3:// URI.",
        ),
    ],
    images: Annotated[str, typer.Option("--images", help="Folder or s3:// prefix of images.")],
    root: Annotated[
        str, typer.Option("--root", help="Store root: a folder or s3://bucket/prefix.")
    ],
    preset: Annotated[
        Preset, typer.Option("--preset", help="Generator settings to start from.")
    ] = (Preset.default),
    points_per_side: Annotated[int | None, _generator_option("Grid points per side")] = None,
    points_per_batch: Annotated[int | None, _generator_option("Points decoded together")] = None,
    pred_iou_thresh: Annotated[float | None, _generator_option("Predicted-IoU filter")] = None,
    stability_score_thresh: Annotated[float | None, _generator_option("Stability filter")] = None,
    stability_score_offset: Annotated[
        float | None, _generator_option("Stability logit offset")
    ] = None,
    box_nms_thresh: Annotated[float | None, _generator_option("NMS IoU within a crop")] = None,
    crop_n_layers: Annotated[int | None, _generator_option("Zoomed crop layers")] = None,
    crop_nms_thresh: Annotated[float | None, _generator_option("NMS IoU across crops")] = None,
    crop_overlap_ratio: Annotated[float | None, _generator_option("Crop overlap ratio")] = None,
    crop_n_points_downscale_factor: Annotated[
        int | None, _generator_option("Points-per-side divisor per crop layer")
    ] = None,
    min_mask_region_area: Annotated[
        int | None, _generator_option("Holes/islands clean-up area, pixels")
    ] = None,
    max_mask_region_fraction: Annotated[
        float | None, _generator_option("Drop masks covering this fraction of the image")
    ] = None,
    round: Annotated[int, typer.Option("--round", help="Stage-3 round of the masks.")] = 0,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            help="Run id in every mask id (default: derived from model and settings, so a "
            "rerun adds nothing).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per commit.")] = 8,
    split: Annotated[Split, typer.Option("--split", help="Split for new images.")] = Split.pool,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", help="Skip images with more pixels than this.")
    ] = 64_000_000,
    sa1b_out: Annotated[
        str | None, typer.Option("--sa1b-out", help="Also write SA-1B JSON per image here.")
    ] = None,
    reuse_embeddings: Annotated[
        bool,
        typer.Option(help="Use image embeddings the store holds for this model version."),
    ] = True,
    device: Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda.")] = (
        "cpu"
    ),
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Run on a local Dask cluster of N worker processes."),
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option("--dask-address", help="Run on an existing Dask scheduler (tcp://...)."),
    ] = None,
    endpoint_url: Annotated[
        str | None,
        typer.Option(
            "--endpoint-url",
            envvar="AWS_ENDPOINT_URL",
            help="S3-compatible endpoint (MinIO, moto); credentials come from the AWS settings.",
        ),
    ] = None,
) -> None:
    """Generate stage-3 automatic masks for every image and commit them to the store."""
    from tqdm import tqdm

    from engine.amg import PRESETS, AutomaticMaskGenerator, generate_for_images
    from storage.images import list_images
    from storage.mask_store import MaskStore

    overrides = {
        "points_per_side": points_per_side,
        "points_per_batch": points_per_batch,
        "pred_iou_thresh": pred_iou_thresh,
        "stability_score_thresh": stability_score_thresh,
        "stability_score_offset": stability_score_offset,
        "box_nms_thresh": box_nms_thresh,
        "crop_n_layers": crop_n_layers,
        "crop_nms_thresh": crop_nms_thresh,
        "crop_overlap_ratio": crop_overlap_ratio,
        "crop_n_points_downscale_factor": crop_n_points_downscale_factor,
        "min_mask_region_area": min_mask_region_area,
        "max_mask_region_fraction": max_mask_region_fraction,
    }
    kwargs = PRESETS[preset.value]()
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if workers is not None or dask_address is not None:
        _amg_on_dask(
            root,
            model,
            images,
            kwargs,
            run_id,
            round,
            split.value,
            batch_size,
            max_pixels,
            reuse_embeddings,
            sa1b_out,
            endpoint_url,
            device,
            workers,
            dask_address,
        )
        return
    store = MaskStore(root, endpoint_url=endpoint_url)
    sam, model_version = _load_model(model, store, device, endpoint_url)
    generator = AutomaticMaskGenerator(sam, **kwargs)
    if run_id is None:
        run_id = _default_run_id(model_version, kwargs)
    uris = list_images(images, endpoint_url=endpoint_url)
    typer.echo(
        f"amg: {len(uris)} images, model {model_version}, run {run_id}, settings "
        f"{json.dumps(kwargs, sort_keys=True)}"
    )
    summary = generate_for_images(
        generator,
        uris,
        store,
        model_version=model_version,
        run_id=run_id,
        round=round,
        split=split.value,
        batch_size=batch_size,
        max_pixels=max_pixels,
        reuse_embeddings=reuse_embeddings,
        sa1b_out=sa1b_out,
        endpoint_url=endpoint_url,
        progress=lambda items: tqdm(items, desc="amg", unit="image"),
    )
    typer.echo(f"amg: {summary.describe()}")
    for skipped in summary.skipped:
        typer.echo(f"skipped {skipped.uri}: {skipped.message}")


def _amg_on_dask(
    root: str,
    model: str,
    images: str,
    kwargs: dict[str, Any],
    run_id: str | None,
    round: int,
    split: str,
    batch_size: int,
    max_pixels: int,
    reuse_embeddings: bool,
    sa1b_out: str | None,
    endpoint_url: str | None,
    device: str,
    workers: int | None,
    dask_address: str | None,
) -> None:
    """The same run fanned out in shards of ``batch_size`` images over Dask workers."""
    from flows.distributed import ClusterSpec, Stage3Job, resolve_model, run_stage3
    from storage.images import list_images

    ref = resolve_model(model, root=root, endpoint_url=endpoint_url, device=device)
    if run_id is None:
        # The in-process path's id when the version is known: either path resumes the other.
        run_id = _default_run_id(ref.version or model, kwargs)
    job = Stage3Job(
        root=root,
        model=ref,
        run_id=run_id,
        round=round,
        generator_kwargs=kwargs,
        split=split,
        max_pixels=max_pixels,
        reuse_embeddings=reuse_embeddings,
        sa1b_out=sa1b_out,
        endpoint_url=endpoint_url,
    )
    uris = list_images(images, endpoint_url=endpoint_url)
    cluster = ClusterSpec(workers=workers, address=dask_address)
    typer.echo(f"amg: {len(uris)} images on Dask ({workers or dask_address}), run {run_id}")
    summary = run_stage3(job, uris, cluster=cluster, shard_size=batch_size)
    typer.echo(
        f"amg: {summary.images} images, {summary.masks_written} masks written in "
        f"{summary.wall_s:.1f} s ({summary.images_per_s:.3f} images/s)"
    )


def _load_model(model: str, store: Any, device: str, endpoint_url: str | None) -> tuple[Any, str]:
    """A registered version (or "latest") through the registry, else a checkpoint file.

    Returns the model and the version recorded on its masks: the registry version, the
    checkpoint's own version, or ``ckpt-`` and the first 16 hex digits of the file's SHA-256.
    """
    if _VERSION.match(model):
        from engine.registry import ModelRegistry

        registry = ModelRegistry(store)
        card = registry.resolve(model)
        return registry.load(card.version, device=device), card.version
    from engine.checkpoint import load_checkpoint
    from storage.location import read_uri

    sam, meta = load_checkpoint(model, map_location=device, endpoint_url=endpoint_url)
    if meta.version:
        return sam, meta.version
    digest = hashlib.sha256(read_uri(model, endpoint_url=endpoint_url)).hexdigest()
    return sam, f"ckpt-{digest[:16]}"


def _default_run_id(model_version: str, kwargs: dict[str, Any]) -> str:
    """``amg-<model version>-<hash of the settings>``: equal for equal runs."""
    settings = json.dumps(kwargs, sort_keys=True, default=str)
    return f"amg-{model_version}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"
