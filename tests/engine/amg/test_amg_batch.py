"""generate_for_images and the `data-engine amg` command on a real store, with bad images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from engine.amg import AutomaticMaskGenerator, generate_for_images
from engine.checkpoint import save_checkpoint
from engine.predictor import SamPredictor
from engine.registry import ModelRegistry
from engine.synthetic import generate_scene
from flows.cli import build_app
from storage.images import image_id_for
from storage.mask_store import MaskStore
from tests.fixtures.models import sharp_tiny_model

# Low thresholds: random weights are never confident, and these tests are about the plumbing.
LOOSE = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
LOOSE_ARGS = ["--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


@pytest.fixture(scope="module")
def model():
    return sharp_tiny_model()


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    """Two good scenes, three that need converting, five that must be skipped."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    scenes = [generate_scene(rng, (48, 64)).image for _ in range(3)]
    (folder / "a.png").write_bytes(_png(scenes[0]))
    (folder / "b.png").write_bytes(_png(scenes[1]))
    (folder / "gray.png").write_bytes(_png(scenes[2][:, :, 0]))
    (folder / "rgba.png").write_bytes(
        _png(np.dstack([scenes[2], np.full((48, 64), 200, np.uint8)]))
    )
    wide = (scenes[2][:, :, 1].astype(np.uint16) * 257).astype(np.uint16)
    (folder / "sixteen.png").write_bytes(_png(wide))
    jpeg = io.BytesIO()
    Image.fromarray(scenes[0]).save(jpeg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "notes.jpg").write_bytes(b"this is not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "huge.png").write_bytes(_png(np.zeros((120, 120, 3), np.uint8)))
    (folder / "cut.png").write_bytes(b"\x89PNG")  # the signature alone
    return folder


def test_generate_for_images_writes_masks_and_skips_bad_files(model, image_dir, tmp_path) -> None:
    from storage.images import list_images

    store = MaskStore(str(tmp_path / "store"))
    generator = AutomaticMaskGenerator(model, **LOOSE)
    uris = list_images(str(image_dir))
    summary = generate_for_images(
        generator,
        uris,
        store,
        model_version="test-v1",
        run_id="run-1",
        batch_size=2,
        max_pixels=10_000,
        sa1b_out=str(tmp_path / "sa1b"),
    )
    assert summary.images == 10
    assert summary.images_done == 5  # a, b, gray, rgba, sixteen
    assert summary.skipped_by_reason == {
        "truncated or corrupt": 1,
        "unknown format": 2,  # notes.jpg and a cut PNG signature
        "empty file": 1,
        "too many pixels": 1,
    }
    # The five bad files are in the store's quarantine with their reasons, once each.
    from storage.quarantine import quarantine_reasons, quarantined

    assert quarantine_reasons(quarantined(store)) == summary.skipped_by_reason
    assert summary.masks_generated > 0
    assert summary.masks_written == summary.masks_generated
    assert summary.commits == 3  # batches of 2 images
    assert summary.images_registered == 5
    table = store.masks(stage=3)
    assert table.num_rows == summary.masks_written
    assert set(table.column("source").to_pylist()) == {"auto"}
    assert set(table.column("model_version").to_pylist()) == {"test-v1"}
    # One SA-1B JSON per processed image, naming the stored mask ids.
    docs = sorted((tmp_path / "sa1b").glob("*.json"))
    assert len(docs) == 5
    stored_ids = set(table.column("mask_id").to_pylist())
    for doc_path in docs:
        doc = json.loads(doc_path.read_text())
        assert {"image_id", "width", "height", "file_name"} <= set(doc["image"])
        for ann in doc["annotations"]:
            assert ann["id"] in stored_ids
            assert ann["segmentation"]["size"] == [48, 64]
            assert len(ann["bbox"]) == 4 and len(ann["crop_box"]) == 4
    # The same run again adds nothing.
    again = generate_for_images(
        generator, uris, store, model_version="test-v1", run_id="run-1", max_pixels=10_000
    )
    assert again.masks_written == 0
    assert again.masks_already_stored == summary.masks_written
    assert store.masks(stage=3).num_rows == summary.masks_written


def test_stored_embeddings_are_reused(model, image_dir, tmp_path) -> None:
    store = MaskStore(str(tmp_path / "store"))
    uri = str(image_dir / "a.png")
    data = (image_dir / "a.png").read_bytes()
    image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    predictor = SamPredictor(model)
    predictor.set_image(image)
    store.save_embedding(
        image_id_for(data),
        "test-v1",
        predictor.get_image_embedding()[0].numpy(),
        predictor.original_size,
        predictor.input_size,
    )
    generator = AutomaticMaskGenerator(model, **LOOSE)
    reused = generate_for_images(generator, [uri], store, model_version="test-v1", run_id="r")
    fresh = generate_for_images(
        generator, [uri], MaskStore(str(tmp_path / "other")), model_version="test-v1", run_id="r"
    )
    assert reused.embeddings_reused == 1 and fresh.embeddings_reused == 0
    assert reused.masks_generated == fresh.masks_generated > 0


def test_cli_amg_from_a_checkpoint_and_from_the_registry(model, image_dir, tmp_path) -> None:
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(model, str(checkpoint))
    root = str(tmp_path / "store")
    folder = tmp_path / "few"
    folder.mkdir()
    for name in ("a.png", "notes.jpg", "huge.png"):
        (folder / name).write_bytes((image_dir / name).read_bytes())
    runner = CliRunner()
    app = build_app()
    args = ["amg", "--model", str(checkpoint), "--images", str(folder), "--root", root]
    args += [*LOOSE_ARGS, "--max-pixels", "10000", "--sa1b-out", str(tmp_path / "sa1b")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "1/3 images" in first.output
    assert "skipped 2 (" in first.output
    assert "1 unknown format" in first.output and "1 too many pixels" in first.output
    assert "notes.jpg" in first.output
    written = MaskStore(root).count_masks(stage=3)
    assert written > 0
    assert len(list((tmp_path / "sa1b").glob("*.json"))) == 1
    # A rerun (same model, same settings: same run id) adds nothing.
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "0 written" in second.output
    assert MaskStore(root).count_masks(stage=3) == written
    # A registered version, with the paper preset's clean-up on top of loose thresholds.
    card = ModelRegistry(MaskStore(root)).register(model)
    args = ["amg", "--model", card.version, "--images", str(folder), "--root", root, "--preset"]
    args += ["paper", "--crop-n-layers", "0", *LOOSE_ARGS]
    third = runner.invoke(app, args)
    assert third.exit_code == 0, third.output
    versions = set(MaskStore(root).masks(stage=3).column("model_version").to_pylist())
    assert card.version in versions and len(versions) == 2


def test_cli_amg_reports_an_unknown_version(tmp_path, image_dir) -> None:
    result = CliRunner().invoke(
        build_app(),
        ["amg", "--model", "v0042", "--images", str(image_dir), "--root", str(tmp_path / "s")],
    )
    assert result.exit_code != 0
    assert "v0042" in str(result.exception) or "v0042" in result.output


def test_images_already_registered_keep_their_split(model, image_dir, tmp_path) -> None:
    from storage.images import sha256_hex
    from storage.mask_store import ImageRecord

    store = MaskStore(str(tmp_path / "store"))
    data = (image_dir / "b.png").read_bytes()
    holdout = ImageRecord(
        image_id_for(data), "elsewhere/b.png", 64, 48, sha256_hex(data), "holdout"
    )
    store.add_images([holdout])
    generator = AutomaticMaskGenerator(model, **LOOSE)
    summary = generate_for_images(
        generator, [str(image_dir / "b.png")], store, model_version="m", run_id="r"
    )
    assert summary.images_registered == 0 and summary.masks_written > 0
    assert store.get_image(holdout.image_id).split == "holdout"
