"""The report: numbers read back from the store and the registry, plots and page written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.config import parse_config
from flows.report import engine_summary, format_table, write_report
from flows.report.summary import round_manifest_key
from flows.sources import prepare_source, round_images
from storage import rle as rle_codec
from storage.mask_store import MaskRecord, MaskStore


def _disk(h: int, w: int, cy: int, cx: int, r: int) -> dict:
    yy, xx = np.mgrid[:h, :w]
    return rle_codec.encode((((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r)[None])[0]


@pytest.fixture
def engine_root(tmp_path: Path) -> MaskStore:
    """A root shaped like an engine run: 3 stages of masks, 3 model versions, round manifests."""
    from engine import build_sam
    from engine.registry import ModelRegistry

    config = parse_config(
        {
            "root": str(tmp_path / "root"),
            "source": {"holdout_images": 1, "image_size": 64},
            "stage1": {"rounds": 1, "images_per_round": 2},
            "stage2": {"rounds": 1, "images_per_round": 2},
            "stage3": {"rounds": 1, "images_per_round": 2},
        }
    )
    store = MaskStore(config.root)
    prepare_source(store, config)
    plan = {  # stage -> per image: (source, clicks, seconds) of each mask
        1: [[("manual", 4, 15.0), ("manual", 2, 10.0)], [("manual", 6, 25.0)]],
        2: [[("model", 0, 1.5), ("manual", 2, 10.0), ("model", 0, 1.5)], [("manual", 3, 12.5)]],
        3: [[("auto", None, None)] * 3, [("auto", None, None)] * 2],
    }
    for stage, per_image in plan.items():
        images = round_images(store, config, stage, 0)
        records = []
        for image, masks in zip(images, per_image, strict=True):
            for k, (source, clicks, seconds) in enumerate(masks):
                auto = source != "manual"
                records.append(
                    MaskRecord(
                        image.image_id,
                        _disk(64, 64, 10 + 12 * k, 30, 5),
                        stage,
                        0,
                        source,
                        "engine",
                        predicted_iou=0.9 + 0.01 * k if auto else None,
                        stability_score=0.96 if auto else None,
                        clicks=clicks,
                        lead_time_s=seconds,
                        model_version=f"v000{stage}",
                    )
                )
        store.write_masks(records, stage=stage, round=0, run_id="engine")
        manifest = {"stage": stage, "round": 0, "image_ids": [i.image_id for i in images]}
        store.put_object(round_manifest_key("engine", stage, 0), json.dumps(manifest).encode())
    registry = ModelRegistry(store)
    model = build_sam("tiny")
    for n, (miou, noc) in enumerate([(0.50, 6.0), (0.62, 4.5), (0.70, 3.5)]):
        metrics = {
            "miou_1click": miou,
            "miou_5click": miou + 0.1,
            "noc85": noc - 0.5,
            "noc90": noc,
            "box_miou": miou,
            "images": 1,
            "objects": 3,
        }
        card = registry.register(
            model,
            parent=f"v{n:04d}" if n else None,
            metrics=metrics,
            extra={"stage": n or None, "round": 0 if n else None},
        )
        registry.promote(card.version)
    registry.set_calibration(
        "v0002",
        {
            "iou": {"raw": [0.1, 0.5, 0.7], "calibrated": [0.05, 0.3, 0.95]},
            "stability_score_offset": 0.25,
        },
    )
    return store


def test_summary_is_read_back_from_the_store_and_registry(engine_root: MaskStore) -> None:
    summary = engine_summary(engine_root)
    s1, s2, s3 = (summary.stage(n) for n in (1, 2, 3))
    assert s1 is not None and s2 is not None and s3 is not None
    assert s1.masks_per_image == pytest.approx(3 / 2)
    assert s1.clicks_per_mask == pytest.approx(12 / 3)
    assert s1.seconds_per_mask == pytest.approx(50 / 3)
    assert s2.masks_per_image == pytest.approx(4 / 2)
    assert s2.rounds[0].model == 2 and s2.rounds[0].manual == 2
    assert s2.rounds[0].seconds_per_new_mask == pytest.approx(22.5 / 2)
    assert s3.masks_per_image == pytest.approx(5 / 2)
    assert s3.clicks_per_mask == 0.0  # nobody clicked on automatic masks
    assert summary.total_masks == 3 + 4 + 5  # the holdout's ground truth is not engine work
    assert [v.version for v in summary.versions] == ["v0001", "v0002", "v0003"]
    assert summary.first_version is not None and summary.final_version is not None
    assert summary.first_version.miou_1click == 0.50
    assert summary.final_version.noc90 == 3.5
    table = format_table(summary)
    assert "1.5" in table and "v0003" in table and "3.50" in table


def test_report_files(engine_root: MaskStore, tmp_path: Path) -> None:
    files = write_report(engine_root, tmp_path / "report")
    assert files.index.name == "index.html"
    names = {p.name for p in files.plots}
    assert names == {
        "masks_per_image.png",
        "effort.png",
        "model_quality.png",
        "stage3_scores.png",
        "gate_calibration.png",
        "overlays.png",
    }
    for png in files.plots:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, png
    page = files.index.read_text()
    for name in names:
        assert f'src="{name}"' in page
    assert "v0003" in page and "semi-automatic" in page
    data = json.loads(files.summary_json.read_text())
    assert [s["stage"] for s in data["stages"]] == [1, 2, 3]
    assert data["stages"][2]["masks_per_image"] == pytest.approx(2.5)
