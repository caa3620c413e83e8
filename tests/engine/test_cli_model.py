"""The `data-engine train` and `eval` commands (flows/commands/model.py) on a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.registry import ModelRegistry
from flows.cli import build_app
from storage.errors import CheckpointError, TrainingError
from storage.mask_store import MaskStore
from tests.fixtures.models import make_synthetic_store

# Small and quick: a 64 px tiny model, two rounds, a 3-click evaluation on one holdout image.
_FAST = [
    "--num-rounds", "2", "--images-per-step", "1", "--masks-per-image", "2",
    "--eval-clicks", "3", "--holdout-limit", "1",
]  # fmt: skip


def _run(*args: str) -> object:
    result = CliRunner().invoke(build_app(), list(args))
    return result


def test_train_registers_versions_and_eval_reports_metrics(tmp_path: Path) -> None:
    store = make_synthetic_store(tmp_path / "store", n_pool=3, n_holdout=1)
    root = str(tmp_path / "store")

    first = _run("train", "--root", root, "--from", "scratch", "--image-size", "64",
                 "--steps", "2", *_FAST)  # fmt: skip
    assert first.exit_code == 0, first.output
    assert "registered v0001" in first.output and "mIoU@1" in first.output
    assert "promoted: no parent metrics" in first.output

    # Without --from the latest promoted version is the parent; both are evaluated.
    second = _run("train", "--root", root, "--steps", "1", *_FAST)
    assert second.exit_code == 0, second.output
    assert "registered v0002" in second.output and "parent v0001" in second.output
    card = ModelRegistry(store).get("v0002")
    assert card.parent == "v0001" and card.metrics and card.parent_metrics
    assert card.trained_on["masks"] == store.count_masks(split="pool")
    assert card.promotion is not None and card.promoted == (card.promotion["regressions"] == [])

    out = tmp_path / "metrics.json"
    evaluated = _run("eval", "--model", "latest", "--root", root, "--json", str(out),
                     "--max-clicks", "3", "--limit", "1")  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert set(json.loads(out.read_text())) == {
        "miou_1click", "miou_5click", "noc85", "noc90", "box_miou", "images", "objects"
    }  # fmt: skip

    checkpoint = ModelRegistry(store).checkpoint_uri("v0001")
    images = tmp_path / "store-images-holdout"
    on_coco = _run("eval", "--model", checkpoint, "--images", str(images),
                   "--coco", str(images / "annotations.json"), "--max-clicks", "2")  # fmt: skip
    assert on_coco.exit_code == 0, on_coco.output
    assert "NoC@90" in on_coco.output


def test_bad_input_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    empty = _run("train", "--root", str(tmp_path / "empty"), "--from", "scratch",
                 "--image-size", "64", "--steps", "1")  # fmt: skip
    assert isinstance(empty.exception, TrainingError), empty.output
    assert "no pool masks" in str(empty.exception)

    make_synthetic_store(tmp_path / "store", n_pool=1, n_holdout=0)
    root = str(tmp_path / "store")
    ok = _run("train", "--root", root, "--from", "scratch", "--image-size", "64",
              "--steps", "1", *_FAST)  # fmt: skip
    assert ok.exit_code == 0 and "not evaluated" in ok.output
    checkpoint = ModelRegistry(MaskStore(root)).checkpoint_uri("v0001")
    other = _run("train", "--root", root, "--from", checkpoint, "--variant", "vit_b",
                 "--steps", "1")  # fmt: skip
    assert isinstance(other.exception, CheckpointError), other.output
    with pytest.raises(SystemExit):
        # Through the console entry point the same error is one line and exit code 2.
        import sys

        from flows.cli import main

        argv = sys.argv
        sys.argv = ["data-engine", "eval", "--model", "latest", "--root", root]
        try:
            main()
        finally:
            sys.argv = argv


@pytest.mark.slow
def test_train_on_two_processes_registers_one_version(tmp_path: Path) -> None:
    # The real console command: `--nproc-per-node 2` starts it again under torchrun (Gloo).
    import shutil
    import subprocess
    import sys

    store = make_synthetic_store(tmp_path / "store", n_pool=3, n_holdout=1)
    exe = shutil.which("data-engine", path=str(Path(sys.executable).parent))
    assert exe is not None
    done = subprocess.run(
        [exe, "train", "--root", str(tmp_path / "store"), "--from", "scratch",
         "--image-size", "64", "--steps", "2", "--nproc-per-node", "2", *_FAST],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("registered v0001") == 1, done.stdout
    cards = ModelRegistry(store).versions()
    assert [c.version for c in cards] == ["v0001"] and cards[0].steps == 2
    assert cards[0].extra["train_config"]["steps"] == 2
