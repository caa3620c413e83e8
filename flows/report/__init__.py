"""The engine's report: ``index.html`` with PNG plots, built from a storage root alone.

``write_report(store, out_dir)`` reads the masks (store), the model cards (registry) and the round
manifests the flows leave, and writes::

    out_dir/index.html            tables and plots
    out_dir/summary.json          the same numbers as data
    out_dir/masks_per_image.png   per stage and round
    out_dir/effort.png            clicks and seconds per mask, per stage and round
    out_dir/model_quality.png     mIoU@1 and NoC@90 of each model version on the holdout
    out_dir/stage3_scores.png     predicted-IoU and stability distributions of stage 3
    out_dir/gate_calibration.png  each calibrated version's map from its IoU head's answer to
                                  the expected IoU (the generator's gates read it)
    out_dir/overlays.png          images of each stage with their masks overlaid

No Prefect here; the CLI and the demo call it directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc

from flows.report.html import render_index
from flows.report.plots import (
    plot_effort,
    plot_gate_calibration,
    plot_masks_per_image,
    plot_model_quality,
    plot_overlay_grid,
    plot_stage3_scores,
)
from flows.report.summary import (
    STAGE_NAMES,
    EngineSummary,
    VersionSummary,
    format_table,
    summarize,
)

if TYPE_CHECKING:
    from engine.registry import ModelRegistry
    from storage.mask_store import MaskStore

__all__ = [
    "EngineSummary",
    "ReportFiles",
    "engine_summary",
    "format_table",
    "versions_from_registry",
    "write_report",
]

_TILES_PER_STAGE = 3


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    index: Path
    summary_json: Path
    plots: tuple[Path, ...]


def versions_from_registry(registry: ModelRegistry) -> list[VersionSummary]:
    """Every registered version with its holdout metrics, oldest first."""
    out: list[VersionSummary] = []
    for card in registry.versions():
        metrics = card.metrics or {}
        extra = card.extra or {}
        out.append(
            VersionSummary(
                version=card.version,
                parent=card.parent,
                stage=_int_or_none(extra.get("stage")),
                round=_int_or_none(extra.get("round")),
                miou_1click=metrics.get("miou_1click"),
                miou_5click=metrics.get("miou_5click"),
                noc85=metrics.get("noc85"),
                noc90=metrics.get("noc90"),
                promoted=card.promoted if card.promotion is not None else None,
            )
        )
    return out


def engine_summary(store: MaskStore) -> EngineSummary:
    """The summary of a storage root: masks from the store, versions from its registry."""
    from engine.registry import ModelRegistry

    return summarize(store, versions_from_registry(ModelRegistry(store)))


def write_report(store: MaskStore, out_dir: str | Path) -> ReportFiles:
    """Write the report of ``store`` into ``out_dir`` (created); see the module docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = engine_summary(store)
    plots = {
        "Masks per image": plot_masks_per_image(summary, out / "masks_per_image.png"),
        "Annotation effort per mask": plot_effort(summary, out / "effort.png"),
        "Model versions on the holdout": plot_model_quality(summary, out / "model_quality.png"),
        "Stage 3 score distributions": _stage3_scores(store, out / "stage3_scores.png"),
        "Gates calibrated per model version": _gate_calibration(
            store, out / "gate_calibration.png"
        ),
        "Images with their masks": plot_overlay_grid(
            _overlay_tiles(store, summary), out / "overlays.png", columns=_TILES_PER_STAGE
        ),
    }
    index = out / "index.html"
    index.write_text(
        render_index(summary, {k: p.name for k, p in plots.items()}, root=str(store.location.root)),
        encoding="utf-8",
    )
    summary_json = out / "summary.json"
    summary_json.write_text(json.dumps(summary.to_json(), indent=1), encoding="utf-8")
    return ReportFiles(index=index, summary_json=summary_json, plots=tuple(plots.values()))


def _stage3_scores(store: MaskStore, path: Path) -> Path:
    table = store.masks(stage=3, split="pool")
    return plot_stage3_scores(
        table["predicted_iou"].to_pylist(), table["stability_score"].to_pylist(), path
    )


def _gate_calibration(store: MaskStore, path: Path) -> Path:
    from engine.registry import ModelRegistry
    from flows.config import Stage2Config, Stage3Config

    curves = []
    for card in ModelRegistry(store).versions():
        iou = (card.calibration or {}).get("iou")
        if iou:
            curves.append((card.version, iou["raw"], iou["calibrated"]))
    # The engine's default gates (a run's own config is not stored with the masks).
    gates = [
        ("stage 2", Stage2Config().pred_iou_thresh),
        ("stage 3", Stage3Config().pred_iou_thresh),
    ]
    return plot_gate_calibration(curves, gates, path)


def _overlay_tiles(
    store: MaskStore, summary: EngineSummary
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """A few images of each stage (the first ones of its last round) with that stage's masks."""
    from storage import rle as rle_codec

    tiles: list[tuple[str, np.ndarray, np.ndarray]] = []
    for stage in summary.stages:
        last = stage.rounds[-1]
        table = store.masks(stage=stage.stage, round=last.round, split="pool")
        image_ids = sorted(set(table["image_id"].to_pylist()))[:_TILES_PER_STAGE]
        for image_id in image_ids:
            rows = table.filter(pc.equal(table["image_id"], image_id))
            rles: list[rle_codec.Rle] = [
                {"size": [h, w], "counts": c}
                for h, w, c in zip(
                    rows["height"].to_pylist(),
                    rows["width"].to_pylist(),
                    rows["counts"].to_pylist(),
                    strict=True,
                )
            ]
            title = (
                f"stage {stage.stage} {STAGE_NAMES.get(stage.stage, '')}, round {last.round}: "
                f"{len(rles)} masks"
            )
            tiles.append((title, store.load_image(image_id), rle_codec.decode(rles)))
    return tiles


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int | float | str) and str(value).isdigit() else None
