"""The engine's numbers, read back from the mask store and the model registry (no Prefect).

Per stage and round: images annotated, masks, masks per image, human clicks and seconds per
mask (auto masks count as zero clicks and zero seconds: nobody touched them), the share of
masks kept from the model, and the model version that helped. Per model version: the holdout
metrics from its model card. Nothing here is configured or hard-coded: a summary of a root is a
function of what that root holds.

Masks of holdout images (their ground truth) and imported masks (run ``coco-import``) are not
engine work and are left out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.export import IMPORT_RUN_ID

if TYPE_CHECKING:
    from storage.mask_store import MaskStore

__all__ = [
    "ROUND_MANIFEST_PREFIX",
    "EngineSummary",
    "RoundSummary",
    "StageSummary",
    "VersionSummary",
    "format_table",
    "read_round_manifests",
    "round_manifest_key",
    "summarize",
]

#: Where the flows record each finished round (its images, commit and model versions).
ROUND_MANIFEST_PREFIX = "engine/rounds"

STAGE_NAMES = {1: "assisted-manual", 2: "semi-automatic", 3: "fully automatic"}


def round_manifest_key(run_id: str, stage: int, round: int) -> str:
    """Object key of the manifest of (run, stage, round)."""
    return f"{ROUND_MANIFEST_PREFIX}/{run_id}/stage{stage}-round{round:03d}.json"


@dataclass(frozen=True)
class RoundSummary:
    """One round's masks. Seconds are simulated (or Label Studio's lead time) per mask."""

    stage: int
    round: int
    images: int
    masks: int
    manual: int
    model: int
    auto: int
    clicks_per_mask: float
    seconds_per_mask: float
    seconds_per_new_mask: float | None
    assisted_by: str | None
    trained_version: str | None = None

    @property
    def masks_per_image(self) -> float:
        """Masks per annotated image."""
        return self.masks / self.images if self.images else 0.0


@dataclass(frozen=True)
class StageSummary:
    """One stage: its rounds and the totals over them."""

    stage: int
    rounds: tuple[RoundSummary, ...]

    @property
    def images(self) -> int:
        return sum(r.images for r in self.rounds)

    @property
    def masks(self) -> int:
        return sum(r.masks for r in self.rounds)

    @property
    def masks_per_image(self) -> float:
        return self.masks / self.images if self.images else 0.0

    @property
    def clicks_per_mask(self) -> float:
        return _weighted([(r.clicks_per_mask, r.masks) for r in self.rounds])

    @property
    def seconds_per_mask(self) -> float:
        return _weighted([(r.seconds_per_mask, r.masks) for r in self.rounds])


@dataclass(frozen=True)
class VersionSummary:
    """One registered model version with its holdout metrics (from its model card)."""

    version: str
    parent: str | None
    stage: int | None
    round: int | None
    miou_1click: float | None
    miou_5click: float | None
    noc85: float | None
    noc90: float | None
    promoted: bool | None


@dataclass(frozen=True)
class EngineSummary:
    """Everything the summary table and the report show."""

    stages: tuple[StageSummary, ...]
    versions: tuple[VersionSummary, ...]
    total_masks: int
    extras: dict[str, Any] = field(default_factory=dict)

    def stage(self, number: int) -> StageSummary | None:
        """The summary of stage ``number``, or None if it has no masks yet."""
        return next((s for s in self.stages if s.stage == number), None)

    @property
    def first_version(self) -> VersionSummary | None:
        """The first version with metrics (the engine's starting model)."""
        return next((v for v in self.versions if v.miou_1click is not None), None)

    @property
    def final_version(self) -> VersionSummary | None:
        """The engine's model now: the newest promoted version with metrics."""
        promoted = [v for v in self.versions if v.promoted and v.miou_1click is not None]
        return promoted[-1] if promoted else None

    @property
    def last_trained(self) -> VersionSummary | None:
        """The newest version with metrics, promoted or not."""
        scored = [v for v in self.versions if v.miou_1click is not None]
        return scored[-1] if scored else None

    def to_json(self) -> dict[str, Any]:
        """Plain data (for ``summary.json`` next to the report)."""
        return {
            "stages": [
                {
                    "stage": s.stage,
                    "images": s.images,
                    "masks": s.masks,
                    "masks_per_image": s.masks_per_image,
                    "clicks_per_mask": s.clicks_per_mask,
                    "seconds_per_mask": s.seconds_per_mask,
                    "rounds": [
                        {**asdict(r), "masks_per_image": r.masks_per_image} for r in s.rounds
                    ],
                }
                for s in self.stages
            ],
            "versions": [asdict(v) for v in self.versions],
            "total_masks": self.total_masks,
            **self.extras,
        }


def summarize(store: MaskStore, versions: Sequence[VersionSummary] = ()) -> EngineSummary:
    """Summarise the engine's masks in ``store`` plus the given model versions.

    Round image counts come from the round manifests the flows write (so a stage-3 image with
    no confident mask still counts); without a manifest, from the images that have masks.
    """
    table = _engine_masks(store)
    manifests = read_round_manifests(store)
    # Rounds come from the masks and from the manifests (a round may commit no mask at all).
    keys = set(zip(table["stage"].to_pylist(), table["round"].to_pylist(), strict=True))
    keys |= set(manifests)
    stages: list[StageSummary] = []
    for stage in sorted({s for s, _ in keys}):
        in_stage = table.filter(pc.equal(table["stage"], stage))
        rounds = [
            _round_summary(
                in_stage.filter(pc.equal(in_stage["round"], r)),
                stage,
                r,
                manifests.get((stage, r)),
            )
            for r in sorted(r for s, r in keys if s == stage)
        ]
        stages.append(StageSummary(stage=int(stage), rounds=tuple(rounds)))
    return EngineSummary(stages=tuple(stages), versions=tuple(versions), total_masks=table.num_rows)


def read_round_manifests(store: MaskStore) -> dict[tuple[int, int], dict[str, Any]]:
    """Every round manifest under the root, keyed by (stage, round); the latest run wins."""
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for key in store.list_objects(ROUND_MANIFEST_PREFIX):
        if not key.endswith(".json"):
            continue
        data = json.loads(store.get_object(key))
        found[(int(data["stage"]), int(data["round"]))] = data
    return found


def format_table(summary: EngineSummary) -> str:
    """The summary as a fixed-width text table (what the demo prints)."""
    lines = [
        f"{'stage':<20} {'round':>5} {'images':>6} {'masks':>6} {'masks/img':>9} "
        f"{'clicks/mask':>11} {'s/mask':>7} {'kept model':>10}  assisted by",
    ]
    for stage in summary.stages:
        name = f"{stage.stage} {STAGE_NAMES.get(stage.stage, '')}"
        for r in stage.rounds:
            kept = f"{r.model}" if r.stage == 2 else "-"
            lines.append(
                f"{name:<20} {r.round:>5} {r.images:>6} {r.masks:>6} {r.masks_per_image:>9.1f} "
                f"{r.clicks_per_mask:>11.2f} {r.seconds_per_mask:>7.1f} {kept:>10}  "
                f"{r.assisted_by or '-'}"
            )
            name = ""
        lines.append(
            f"{'  = stage ' + str(stage.stage):<20} {'all':>5} {stage.images:>6} {stage.masks:>6} "
            f"{stage.masks_per_image:>9.1f} {stage.clicks_per_mask:>11.2f} "
            f"{stage.seconds_per_mask:>7.1f}"
        )
    lines.append("")
    lines.append(
        f"{'model version':<24} {'parent':<24} {'stage':>5} {'round':>5} {'mIoU@1':>7} "
        f"{'mIoU@5':>7} {'NoC@85':>7} {'NoC@90':>7} {'promoted':>8}"
    )
    for v in summary.versions:
        lines.append(
            f"{v.version:<24} {v.parent or '-':<24} {_opt(v.stage):>5} {_opt(v.round):>5} "
            f"{_num(v.miou_1click, 3):>7} {_num(v.miou_5click, 3):>7} {_num(v.noc85, 2):>7} "
            f"{_num(v.noc90, 2):>7} {_opt(v.promoted):>8}"
        )
    lines.extend(_holdout_lines(summary))
    return "\n".join(lines)


def _holdout_lines(summary: EngineSummary) -> list[str]:
    first, final, last = summary.first_version, summary.final_version, summary.last_trained
    if first is None:
        return []
    lines = [""]
    for label, v in (
        ("first model", first),
        ("engine's model (newest promoted)", final),
        ("last trained", last),
    ):
        if v is None:
            continue
        lines.append(
            f"{label + ':':<34} {v.version:<8} mIoU@1 {_num(v.miou_1click, 3)}  "
            f"NoC@90 {_num(v.noc90, 2)}"
        )
    return lines


# --- private -----------------------------------------------------------------------------------


def _engine_masks(store: MaskStore) -> pa.Table:
    table = store.masks(split="pool")
    return table.filter(pc.not_equal(table["run_id"], IMPORT_RUN_ID))


def _round_summary(
    table: pa.Table, stage: int, round: int, manifest: dict[str, Any] | None
) -> RoundSummary:
    sources = table["source"].to_pylist()
    clicks = np.asarray([c or 0 for c in table["clicks"].to_pylist()], dtype=np.float64)
    seconds = np.asarray([s or 0.0 for s in table["lead_time_s"].to_pylist()], dtype=np.float64)
    manual = np.asarray([s == "manual" for s in sources], dtype=bool)
    images = len(set(table["image_id"].to_pylist()))
    if manifest is not None:
        images = len(manifest.get("image_ids", [])) or images
    versions = [v for v in table["model_version"].to_pylist() if v]
    n = table.num_rows
    return RoundSummary(
        stage=int(stage),
        round=int(round),
        images=images,
        masks=n,
        manual=int(manual.sum()),
        model=sources.count("model"),
        auto=sources.count("auto"),
        clicks_per_mask=float(clicks.mean()) if n else 0.0,
        seconds_per_mask=float(seconds.mean()) if n else 0.0,
        seconds_per_new_mask=float(seconds[manual].mean()) if manual.any() else None,
        assisted_by=(manifest or {}).get("model_version") or (versions[0] if versions else None),
        trained_version=(manifest or {}).get("trained_version"),
    )


def _weighted(pairs: Sequence[tuple[float, int]]) -> float:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else 0.0


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _opt(value: object) -> str:
    return "-" if value is None else str(value)
