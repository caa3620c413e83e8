"""Helpers of the flow tests: a tiny engine config (the Prefect harness: tests/fixtures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.config import EngineConfig, parse_config

#: Training runs of the flow tests: one step of a two-round simulation on two masks.
TINY_TRAINING: dict[str, Any] = {
    "steps": 1,
    "minutes": None,
    "images_per_step": 1,
    "masks_per_image": 2,
    "num_rounds": 2,
    "no_point_rounds": 1,
    "warmup_steps": 0,
}


def tiny_engine_data(root: Path | str, **sections: Any) -> dict[str, Any]:
    """An engine config (as data) that runs every stage in seconds on a few small images."""
    data: dict[str, Any] = {
        "root": str(root),
        "source": {"holdout_images": 2, "image_size": 96},
        "model": {"pretrain": TINY_TRAINING},
        "stage1": {"rounds": 2, "images_per_round": 2, "train": TINY_TRAINING},
        "stage2": {
            "rounds": 2,
            "images_per_round": 2,
            "points_per_side": 4,
            "pred_iou_thresh": 0.0,  # an untrained model must still pre-label something
            "stability_score_thresh": 0.0,
            "train": TINY_TRAINING,
        },
        "stage3": {
            "rounds": 1,
            "images_per_round": 2,
            "points_per_side": 4,
            "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.0,
            "train": TINY_TRAINING,
        },
        "evaluation": {"max_clicks": 5, "max_objects_per_image": 2},
        "annotator": {"click_budget": 2},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def tiny_engine_config(root: Path | str, **sections: Any) -> EngineConfig:
    """:func:`tiny_engine_data` validated."""
    return parse_config(tiny_engine_data(root, **sections))
