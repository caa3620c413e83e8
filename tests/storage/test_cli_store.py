"""The `data-engine` store commands (flows/commands/store.py): import, export, stats, gc."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from flows.cli import build_app
from storage import rle
from storage.mask_store import MaskStore
from tests.fixtures.s3 import S3Root


def _write_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        pixels = np.full((16, 24, 3), i * 40, dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        (folder / f"im{i}.png").write_bytes(buffer.getvalue())


def _coco(path: Path, n: int) -> None:
    mask = np.zeros((1, 16, 24), dtype=bool)
    mask[0, 2:6, 3:9] = True
    seg = rle.encode(mask)[0]
    doc = {
        "images": [
            {"id": i, "file_name": f"im{i}.png", "width": 24, "height": 16} for i in range(n)
        ],
        "annotations": [{"id": i, "image_id": i, "segmentation": seg} for i in range(n)],
    }
    path.write_text(json.dumps(doc))


def test_import_export_stats_gc(tmp_path: Path) -> None:
    runner = CliRunner()
    app = build_app()
    root = str(tmp_path / "store")
    _write_images(tmp_path / "images", 3)
    _coco(tmp_path / "ann.json", 3)
    args = ["import", "--root", root, "--images", str(tmp_path / "images")]
    result = runner.invoke(app, [*args, "--coco", str(tmp_path / "ann.json")])
    assert result.exit_code == 0, result.output
    assert "3 found, 3 new (pool)" in result.output and "masks: 3 new" in result.output
    again = runner.invoke(app, [*args, "--coco", str(tmp_path / "ann.json")])
    assert "3 found, 0 new" in again.output and "masks: 0 new, 3 already present" in again.output

    stats = runner.invoke(app, ["stats", "--root", root])
    assert stats.exit_code == 0, stats.output
    assert "images: 3 (pool 3)" in stats.output and "commits: 1; masks: 3" in stats.output
    assert [line.split() for line in stats.output.splitlines()][-1] == [
        "1",
        "0",
        "manual",
        "3",
        "3",
    ]

    out = tmp_path / "out.json"
    export = runner.invoke(app, ["export", "--root", root, "--format", "coco", "--out", str(out)])
    assert export.exit_code == 0, export.output
    assert len(COCO(str(out)).getAnnIds()) == 3
    sa1b = runner.invoke(
        app, ["export", "--root", root, "--format", "sa1b", "--out", str(tmp_path / "sa")]
    )
    assert sa1b.exit_code == 0, sa1b.output
    assert len(list((tmp_path / "sa").glob("*.json"))) == 3

    MaskStore(root).location.put_bytes("masks/stage=1/orphan.parquet", b"x")
    gc = runner.invoke(app, ["gc", "--root", root])
    assert gc.exit_code == 0 and "deleted masks/stage=1/orphan.parquet" in gc.output


def test_import_from_s3_prefix(s3_root: S3Root, tmp_path: Path) -> None:
    _write_images(tmp_path / "images", 2)
    source = MaskStore(s3_root.root).location  # endpoint from AWS_ENDPOINT_URL (the fixture)
    for path in sorted((tmp_path / "images").iterdir()):
        source.put_bytes(f"incoming/{path.name}", path.read_bytes())
    runner = CliRunner()
    result = runner.invoke(
        build_app(),
        [
            "import",
            "--root",
            f"{s3_root.root}/store",
            "--images",
            f"{s3_root.root}/incoming",
            "--split",
            "holdout",
            "--endpoint-url",
            s3_root.endpoint_url,
        ],
    )
    assert result.exit_code == 0, result.output
    store = MaskStore(f"{s3_root.root}/store", endpoint_url=s3_root.endpoint_url)
    assert [r.split for r in store.images()] == ["holdout", "holdout"]
    assert store.images()[0].uri.startswith("s3://")


def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "import", "--root", str(tmp_path / "s"),
         "--images", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: image folder")
    assert "Traceback" not in done.stderr
