"""Bad input stops the engine early with a message that names it, before anything is made."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from engine.synthetic import write_synthetic_dataset
from flows.config import parse_config
from flows.engine import data_engine
from flows.stages import stage3_fully_automatic
from storage.errors import AnnotationError, ImageError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_empty_image_source_stops_before_any_model_is_made(
    prefect_harness: None, tmp_path: Path
) -> None:
    empty = tmp_path / "pool"
    empty.mkdir()
    holdout = tmp_path / "holdout"
    write_synthetic_dataset(holdout, 1, seed=5, size=(64, 64))
    config = parse_config(
        {
            "root": str(tmp_path / "root"),
            "source": {
                "images": str(empty),
                "holdout": str(holdout),
                "holdout_coco": str(holdout / "annotations.json"),
            },
            # People annotate a real pool: no pool ground truth needed.
            "annotator": {"kind": "label_studio"},
        }
    )
    # Stage 3 needs no annotator, so nothing but the source is in the way.
    with pytest.raises(ImageError, match=rf"image source '{empty}' holds no images"):
        stage3_fully_automatic(config)
    assert not (tmp_path / "root" / "models").exists()


def test_an_unreachable_label_studio_fails_fast_naming_the_url(
    prefect_harness: None, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    config = parse_config(
        {
            "root": str(tmp_path / "root"),
            "annotator": {"kind": "label_studio"},
            "label_studio": {"url": url, "token": "not-a-real-token"},
        }
    )
    with pytest.raises(AnnotationError) as caught:
        data_engine(config)
    assert url in str(caught.value)
    assert "not-a-real-token" not in str(caught.value)
    # Failed before registering a single image or training anything.
    assert not (tmp_path / "root" / "images").exists()
    assert not (tmp_path / "root" / "models").exists()


def test_a_pool_too_small_for_the_rounds_is_named(tmp_path: Path) -> None:
    from flows.sources import prepare_source
    from storage.errors import InvalidInputError
    from storage.mask_store import MaskStore

    config = parse_config(
        {"root": str(tmp_path / "root"), "source": {"pool_images": 3, "holdout_images": 1}}
    )
    with pytest.raises(InvalidInputError, match=r"has 3 pool images but .* need 46"):
        prepare_source(MaskStore(config.root), config)
