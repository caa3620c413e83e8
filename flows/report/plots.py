"""The report's PNG plots, drawn with matplotlib's object API on the Agg canvas.

No pyplot: figures are built as ``matplotlib.figure.Figure`` objects and saved directly, so no
global backend or state is touched (safe in worker threads, nothing happens at import).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from flows.report.summary import EngineSummary, RoundSummary

__all__ = [
    "plot_effort",
    "plot_gate_calibration",
    "plot_masks_per_image",
    "plot_model_quality",
    "plot_overlay_grid",
    "plot_stage3_scores",
]

_STAGE_COLOURS = {1: "#4C72B0", 2: "#DD8452", 3: "#55A868"}
_DPI = 110


def plot_masks_per_image(summary: EngineSummary, path: Path) -> Path:
    """Bars of masks per image for every (stage, round), coloured by stage."""
    rounds = _rounds(summary)
    fig, ax = _figure(7.5, 3.6)
    x = np.arange(len(rounds))
    ax.bar(
        x,
        [r.masks_per_image for r in rounds],
        color=[_STAGE_COLOURS.get(r.stage, "grey") for r in rounds],
    )
    _label_rounds(ax, rounds)
    ax.set_ylabel("masks per image")
    ax.set_title("Masks per image, by stage and round")
    _stage_legend(ax, rounds)
    return _save(fig, path)


def plot_effort(summary: EngineSummary, path: Path) -> Path:
    """Human clicks per mask and seconds per mask for every (stage, round)."""
    rounds = _rounds(summary)
    fig, (left, right) = _figure(10.0, 3.6, ncols=2)
    x = np.arange(len(rounds))
    colours = [_STAGE_COLOURS.get(r.stage, "grey") for r in rounds]
    left.bar(x, [r.clicks_per_mask for r in rounds], color=colours)
    left.set_ylabel("clicks per mask")
    left.set_title("Human clicks per mask")
    right.bar(x, [r.seconds_per_mask for r in rounds], color=colours, label="all masks")
    new = [r.seconds_per_new_mask for r in rounds]
    right.plot(
        [i for i, v in enumerate(new) if v is not None],
        [v for v in new if v is not None],
        "k_",
        markersize=18,
        mew=2,
        label="new (manual) masks",
    )
    right.set_ylabel("seconds per mask")
    right.set_title("Annotation time per mask")
    right.legend(loc="upper right", fontsize=8)
    for ax in (left, right):
        _label_rounds(ax, rounds)
    _stage_legend(left, rounds)
    return _save(fig, path)


def plot_model_quality(summary: EngineSummary, path: Path) -> Path:
    """mIoU after 1 click and NoC@90 of every model version on the holdout."""
    versions = [v for v in summary.versions if v.miou_1click is not None]
    fig, (left, right) = _figure(10.0, 3.6, ncols=2)
    x = np.arange(len(versions))
    colours = [_STAGE_COLOURS.get(v.stage or 0, "grey") for v in versions]
    left.plot(x, [v.miou_1click for v in versions], color="#333333", zorder=1)
    left.scatter(x, [v.miou_1click for v in versions], c=colours, zorder=2)
    left.set_ylabel("mIoU after 1 click")
    left.set_title("Holdout mIoU@1 (higher is better)")
    right.plot(x, [v.noc90 for v in versions], color="#333333", zorder=1)
    right.scatter(x, [v.noc90 for v in versions], c=colours, zorder=2)
    right.set_ylabel("clicks to IoU 0.90")
    right.set_title("Holdout NoC@90 (lower is better)")
    for ax in (left, right):
        ax.set_xticks(x)
        ax.set_xticklabels([v.version for v in versions], rotation=45, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_stage3_scores(
    predicted_iou: Sequence[float], stability: Sequence[float], path: Path
) -> Path:
    """Histograms of stage 3's predicted IoU and stability scores."""
    fig, (left, right) = _figure(10.0, 3.4, ncols=2)
    for ax, values, name in (
        (left, predicted_iou, "predicted IoU"),
        (right, stability, "stability score"),
    ):
        data = np.asarray([v for v in values if v is not None], dtype=np.float64)
        if data.size:
            ax.hist(data, bins=30, color=_STAGE_COLOURS[3])
            ax.axvline(float(np.median(data)), color="k", linestyle="--", label="median")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no stage-3 masks", ha="center", va="center")
        ax.set_xlabel(name)
        ax.set_ylabel("masks")
        ax.set_title(f"Stage 3 {name} ({data.size} masks)")
    return _save(fig, path)


def plot_gate_calibration(
    curves: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    gates: Sequence[tuple[str, float]],
    path: Path,
) -> Path:
    """Each calibrated version's map from the IoU head's answer to the expected IoU of its
    masks, with the stages' predicted-IoU gates; ``curves`` are ``(version, raw, calibrated)``."""
    fig, ax = _figure(6.5, 3.8)
    if curves:
        for version, raw, calibrated in curves:
            ax.plot(raw, calibrated, marker=".", label=version)
        low = min(min(raw) for _, raw, _ in curves)
        high = max(max(raw) for _, raw, _ in curves)
        ax.plot([low, high], [low, high], color="grey", linestyle=":", label="answer = IoU")
        for name, value in gates:
            ax.axhline(value, color="k", linestyle="--", linewidth=0.8)
            ax.text(low, value, f" {name} gate {value:g}", va="bottom", fontsize=8)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.9))
    else:
        ax.text(0.5, 0.5, "no calibrated model version", ha="center", va="center")
    ax.set_xlabel("IoU head's answer")
    ax.set_ylabel("expected IoU on the holdout")
    ax.set_title("Generator gates calibrated per model version")
    return _save(fig, path)


def plot_overlay_grid(
    tiles: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path, *, columns: int = 4
) -> Path:
    """A grid of images with their masks overlaid in random colours.

    Args:
        tiles: ``(title, image (H, W, 3) uint8, masks (N, H, W) bool)`` per tile.
        path: the PNG to write.
        columns: tiles per row.
    """
    n = max(1, len(tiles))
    rows = (n + columns - 1) // columns
    fig, axes = _figure(2.6 * columns, 2.8 * rows, nrows=rows, ncols=columns, squeeze=False)
    rng = np.random.default_rng(0)  # fixed colours: the same report twice looks the same
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= len(tiles):
            continue
        title, image, masks = tiles[k]
        ax.imshow(_overlay(image, masks, rng))
        ax.set_title(title, fontsize=7)
    return _save(fig, path)


# --- private -----------------------------------------------------------------------------------


def _overlay(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image dimmed, each mask filled in its own colour with a solid outline."""
    import cv2

    out = image.astype(np.float32) * 0.6
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    # Largest first so small masks stay visible on top.
    for i in np.argsort(-areas):
        colour = rng.uniform(60, 255, size=3).astype(np.float32)
        mask = masks[i].astype(np.uint8)
        fill = mask.astype(bool)
        out[fill] = 0.4 * out[fill] + 0.6 * colour
        outline = fill & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
        out[outline] = colour
    return np.clip(out, 0, 255).astype(np.uint8)


def _rounds(summary: EngineSummary) -> list[RoundSummary]:
    return [r for s in summary.stages for r in s.rounds]


def _label_rounds(ax: Any, rounds: Sequence[RoundSummary]) -> None:
    ax.set_xticks(np.arange(len(rounds)))
    ax.set_xticklabels(
        [f"S{r.stage} R{r.round}" for r in rounds], rotation=45, ha="right", fontsize=8
    )
    ax.grid(axis="y", alpha=0.3)


def _stage_legend(ax: Any, rounds: Sequence[RoundSummary]) -> None:
    from matplotlib.patches import Patch

    stages = sorted({r.stage for r in rounds})
    handles = [Patch(color=_STAGE_COLOURS.get(s, "grey"), label=f"stage {s}") for s in stages]
    if handles:
        ax.legend(handles=handles, loc="upper left", fontsize=8)


def _figure(width: float, height: float, **subplots: Any) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    axes: Any = fig.subplots(**subplots)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
