"""`data-engine` commands on the mask store: export, import, gc, stats."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

_ROOT = typer.Option("--root", help="Store root: a folder or s3://bucket/prefix.")
_ENDPOINT = typer.Option(
    "--endpoint-url",
    envvar="AWS_ENDPOINT_URL",
    help="S3-compatible endpoint (MinIO, moto); credentials come from the AWS settings.",
)


class ExportFormat(StrEnum):
    """Export formats."""

    coco = "coco"
    sa1b = "sa1b"


class Split(StrEnum):
    """Image splits."""

    pool = "pool"
    holdout = "holdout"


def register(app: typer.Typer) -> None:
    """Add the store commands to the `data-engine` app."""
    app.command("export")(export)
    app.command("import")(import_)
    app.command("gc")(gc)
    app.command("stats")(stats)


def export(
    root: Annotated[str, _ROOT],
    out: Annotated[str, typer.Option("--out", help="FILE.json for coco, a folder for sa1b.")],
    format: Annotated[ExportFormat, typer.Option("--format")] = ExportFormat.coco,
    split: Annotated[Split | None, typer.Option("--split", help="Only this split.")] = None,
    stage: Annotated[int | None, typer.Option("--stage", help="Only this stage.")] = None,
    endpoint_url: Annotated[str | None, _ENDPOINT] = None,
) -> None:
    """Export committed masks as COCO instances JSON or SA-1B per-image JSON files."""
    from tqdm import tqdm

    from storage.export import export_coco, export_sa1b
    from storage.mask_store import MaskStore

    store = MaskStore(root, endpoint_url=endpoint_url)
    split_name = split.value if split else None
    if format is ExportFormat.coco:
        result = export_coco(store, out, split=split_name, stage=stage, endpoint_url=endpoint_url)
    else:
        result = export_sa1b(
            store,
            out,
            split=split_name,
            stage=stage,
            endpoint_url=endpoint_url,
            progress=lambda items: tqdm(items, desc="sa1b", unit="image"),
        )
    typer.echo(
        f"exported {result.images} images, {result.annotations} masks "
        f"({format.value}, {result.files} file(s)) to {out}"
    )


def import_(
    root: Annotated[str, _ROOT],
    images: Annotated[str, typer.Option("--images", help="Folder or s3:// prefix of images.")],
    coco: Annotated[
        str | None, typer.Option("--coco", help="COCO annotations JSON (path or s3:// URI).")
    ] = None,
    split: Annotated[Split, typer.Option("--split")] = Split.pool,
    quarantine: Annotated[
        bool,
        typer.Option(
            "--quarantine",
            help="Record unusable images in the store's quarantine and import the rest "
            "(default: stop at the first one, before writing anything).",
        ),
    ] = False,
    endpoint_url: Annotated[str | None, _ENDPOINT] = None,
) -> None:
    """Register images (and COCO masks as stage-1 manual masks); importing again adds nothing."""
    from tqdm import tqdm

    from storage.export import import_dataset
    from storage.mask_store import MaskStore

    store = MaskStore(root, endpoint_url=endpoint_url)
    result = import_dataset(
        store,
        images,
        coco=coco,
        split=split.value,
        endpoint_url=endpoint_url,
        progress=lambda items: tqdm(items, desc="images", unit="image"),
        quarantine=quarantine,
    )
    for entry in result.quarantined:
        typer.echo(f"quarantined {entry.key!a}: {entry.reason}")
    typer.echo(
        f"images: {result.images_found} found, {result.images_added} new ({split.value}); "
        f"masks: {result.masks_added} new, {result.masks_skipped} already present; "
        f"annotations without a matching image: {result.annotations_unmatched}, "
        f"crowd regions skipped: {result.annotations_crowd}"
        + (f"; quarantined: {result.images_quarantined}" if result.quarantined else "")
    )


def gc(
    root: Annotated[str, _ROOT],
    older_than_s: Annotated[
        float,
        typer.Option("--older-than-s", help="Only files older than this (seconds)."),
    ] = 0.0,
    endpoint_url: Annotated[str | None, _ENDPOINT] = None,
) -> None:
    """Delete mask files that no commit references (left by interrupted writes)."""
    from storage.mask_store import MaskStore

    deleted = MaskStore(root, endpoint_url=endpoint_url).gc(older_than_s=older_than_s)
    for key in deleted:
        typer.echo(f"deleted {key}")
    typer.echo(f"gc: {len(deleted)} file(s) deleted")


def stats(
    root: Annotated[str, _ROOT],
    endpoint_url: Annotated[str | None, _ENDPOINT] = None,
) -> None:
    """Print image counts per split, quarantined images per reason, and mask counts per stage,
    round and source."""
    from storage.mask_store import MaskStore
    from storage.quarantine import quarantine_reasons, quarantined

    store = MaskStore(root, endpoint_url=endpoint_url)
    images = store.images()
    commits = store.commits()
    table = store.masks()
    refused = quarantined(store)
    typer.echo(f"store {store.location.root}")
    splits: dict[str, int] = {}
    for image in images:
        splits[image.split] = splits.get(image.split, 0) + 1
    split_text = ", ".join(f"{k} {v}" for k, v in sorted(splits.items())) or "none"
    typer.echo(f"images: {len(images)} ({split_text})")
    if refused:
        reasons = ", ".join(f"{r} {n}" for r, n in quarantine_reasons(refused).items())
        typer.echo(f"quarantined: {len(refused)} ({reasons})")
    typer.echo(f"commits: {len(commits)}; masks: {table.num_rows}")
    if table.num_rows == 0:
        return
    grouped = (
        table.group_by(["stage", "round", "source"])
        .aggregate([("mask_id", "count"), ("image_id", "count_distinct")])
        .sort_by([("stage", "ascending"), ("round", "ascending"), ("source", "ascending")])
    )
    typer.echo(f"{'stage':>5} {'round':>5} {'source':<7} {'masks':>9} {'images':>7}")
    for row in grouped.to_pylist():
        typer.echo(
            f"{row['stage']:>5} {row['round']:>5} {row['source']:<7} "
            f"{row['mask_id_count']:>9} {row['image_id_count_distinct']:>7}"
        )
