"""The ML backend app served on loopback, with a real tiny model and a real store."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from annotation_ui.labeling_config import labeling_config
from annotation_ui.ml_backend import (
    BackendOptions,
    BatchOptions,
    RegistryModelSource,
    StaticModelSource,
    create_app,
    running,
)
from engine.predictor import SamPredictor
from engine.zoom_in import DEFAULT_ZOOM_IN, ZoomIn
from engine.zoom_predictor import ZoomInPredictor
from storage import rle
from storage.mask_store import ImageRecord, MaskStore
from tests.annotation_ui.conftest import (
    register_images,
    register_model,
    write_images,
)

CONFIG = labeling_config(1)


@contextmanager
def TestClient(app: FastAPI) -> Iterator[httpx.Client]:
    """An HTTP client on ``app`` served for real on loopback (lifespan included)."""
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


AUTH = ("annotators", "s3cret-pass")


@pytest.fixture
def store_with_images(tmp_path: Path) -> tuple[MaskStore, list[ImageRecord]]:
    folder = tmp_path / "images"
    write_images(folder, 2)
    store = MaskStore(str(tmp_path / "store"))
    return store, register_images(store, str(folder))


def click(x: float, y: float, *, positive: bool = True) -> dict[str, Any]:
    return {
        "id": "k1",
        "from_name": "point",
        "to_name": "image",
        "type": "keypointlabels",
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["object"]},
        "is_positive": positive,
    }


def predict_body(image: ImageRecord, context: dict | None, task_id: int = 1) -> dict[str, Any]:
    return {
        "tasks": [{"id": task_id, "data": {"image": "/x.png", "image_id": image.image_id}}],
        "project": "3.1700000000",
        "label_config": CONFIG,
        "params": {"login": None, "password": None, "context": context},
    }


def test_health_is_open_and_everything_else_needs_basic_auth(
    tiny_model: Any, store_with_images: tuple[MaskStore, list[ImageRecord]]
) -> None:
    store, _ = store_with_images
    app = create_app(
        StaticModelSource(tiny_model, "tiny-a"), store, options=BackendOptions(basic_auth=AUTH)
    )
    with TestClient(app) as client:
        assert client.get("/health").json() == {
            "status": "UP",
            "model_class": "SamDataEngine",
            "model_version": "tiny-a",
        }
        for method, path in [
            ("post", "/setup"),
            ("post", "/predict"),
            ("post", "/webhook"),
            ("get", "/metrics"),
            ("post", "/train"),
        ]:
            answer = client.request(method.upper(), path, json={})
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"].startswith("Basic")
        wrong = client.get("/metrics", auth=(AUTH[0], "guess"))
        assert wrong.status_code == 401
        assert client.get("/metrics", auth=AUTH).status_code == 200
        setup = client.post(
            "/setup",
            auth=AUTH,
            json={"project": "3.1", "schema": CONFIG, "access_token": "ls-user-token"},
        )
        assert setup.status_code == 200 and setup.json() == {"model_version": "tiny-a"}


def test_setup_rejects_a_config_without_brush(
    tiny_model: Any, store_with_images: tuple[MaskStore, list[ImageRecord]]
) -> None:
    store, _ = store_with_images
    with TestClient(create_app(StaticModelSource(tiny_model, "tiny-a"), store)) as client:
        answer = client.post("/setup", json={"schema": "<View><Image name='i' value='$i'/></View>"})
    assert answer.status_code == 400 and "BrushLabels" in answer.json()["error"]


@pytest.mark.parametrize("zoom_in", [DEFAULT_ZOOM_IN, None], ids=["zoom-in", "whole-image"])
def test_a_click_returns_the_predictors_best_mask_as_a_brush_region(
    tiny_model: Any,
    store_with_images: tuple[MaskStore, list[ImageRecord]],
    zoom_in: ZoomIn | None,
) -> None:
    store, images = store_with_images
    image = images[0]
    options = BackendOptions(zoom_in=zoom_in)
    app = create_app(StaticModelSource(tiny_model, "tiny-a"), store, options=options)
    with TestClient(app) as client:
        answer = client.post("/predict", json=predict_body(image, {"result": [click(50, 25)]}))
        assert answer.status_code == 200, answer.text
        (prediction,) = answer.json()["results"]
        (region,) = prediction["result"]
        assert (region["from_name"], region["to_name"], region["type"]) == (
            "mask",
            "image",
            "brushlabels",
        )
        assert (region["original_width"], region["original_height"]) == (image.width, image.height)
        assert region["value"]["brushlabels"] == ["object"]
        assert prediction["model_version"] == "tiny-a"
        got = rle.decode([rle.from_brush(region["value"]["rle"], image.height, image.width)])[0]
        # The same prompt straight through SAM's predictor (zoomed in, or not): one click -> 3
        # masks, best IoU wins.
        pixels = np.array(store.load_image(image.image_id))
        predictor: Any = SamPredictor(tiny_model)
        predictor.set_image(pixels)
        if zoom_in is not None:
            predictor = ZoomInPredictor(predictor, pixels, zoom_in)
        masks, scores, _ = predictor.predict(
            point_coords=np.array([[image.width * 0.5, image.height * 0.25]]),
            point_labels=np.array([1]),
            multimask_output=True,
        )
        np.testing.assert_array_equal(got, masks[int(np.argmax(scores))])
        assert prediction["score"] == pytest.approx(float(scores.max()), abs=1e-5)
        # A second click on the same image reuses the cached embedding.
        client.post("/predict", json=predict_body(image, {"result": [click(10, 10)]}))
        cache = client.get("/metrics").json()["embedding_cache"]
        assert (cache["computed"], cache["memory_hits"]) == (1, 1)


def test_embeddings_persist_in_the_store_across_restarts(
    tiny_model: Any, store_with_images: tuple[MaskStore, list[ImageRecord]]
) -> None:
    store, images = store_with_images
    body = predict_body(images[1], {"result": [click(30, 60)]})
    with TestClient(create_app(StaticModelSource(tiny_model, "tiny-a"), store)) as client:
        first = client.post("/predict", json=body).json()
    assert store.load_embedding(images[1].image_id, "tiny-a") is not None
    with TestClient(create_app(StaticModelSource(tiny_model, "tiny-a"), store)) as client:
        second = client.post("/predict", json=body).json()
        cache = client.get("/metrics").json()["embedding_cache"]
    assert (cache["store_hits"], cache["computed"]) == (1, 0)
    assert (
        first["results"][0]["result"][0]["value"]["rle"]
        == (second["results"][0]["result"][0]["value"]["rle"])
    )


@pytest.mark.parametrize(
    ("context", "status", "text"),
    [
        ({"result": [click(150, 25)]}, 400, "0-100 %"),
        ({"result": [{**click(5, 5), "from_name": "mask"}]}, 400, "from_name 'mask'"),
    ],
)
def test_bad_prompts_are_400_with_the_reason(
    tiny_model: Any,
    store_with_images: tuple[MaskStore, list[ImageRecord]],
    context: dict,
    status: int,
    text: str,
) -> None:
    store, images = store_with_images
    with TestClient(create_app(StaticModelSource(tiny_model, "tiny-a"), store)) as client:
        answer = client.post("/predict", json=predict_body(images[0], context))
    assert answer.status_code == status and text in answer.json()["error"]


def test_tasks_of_unknown_images_are_refused(
    tiny_model: Any, store_with_images: tuple[MaskStore, list[ImageRecord]]
) -> None:
    store, images = store_with_images
    gone = dataclasses.replace(images[0], image_id="0" * 24)
    no_id = predict_body(images[0], {"result": [click(5, 5)]})
    del no_id["tasks"][0]["data"]["image_id"]
    with TestClient(create_app(StaticModelSource(tiny_model, "tiny-a"), store)) as client:
        missing = client.post("/predict", json=predict_body(gone, {"result": [click(5, 5)]}))
        unnamed = client.post("/predict", json=no_id)
    assert missing.status_code == 404 and "not registered" in missing.json()["error"]
    assert unnamed.status_code == 400 and "image_id" in unnamed.json()["error"]


def test_batch_pre_annotation_answers_every_task_in_order(
    tiny_model: Any, store_with_images: tuple[MaskStore, list[ImageRecord]]
) -> None:
    store, images = store_with_images
    # Random weights predict low IoUs: open the gate so the generator returns masks at all.
    options = BackendOptions(
        batch=BatchOptions(
            points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, max_masks=5
        )
    )
    body = predict_body(images[0], None)
    body["tasks"] = [
        {"id": 1, "data": {"image_id": images[0].image_id}},
        {"id": 2, "data": {"image_id": "0" * 24}},
        {"id": 3, "data": {"image_id": images[1].image_id}},
    ]
    with TestClient(
        create_app(StaticModelSource(tiny_model, "tiny-a"), store, options=options)
    ) as c:
        answer = c.post("/predict", json=body)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [bool(r["result"]) for r in results] == [True, False, True]
    for prediction, image in ((results[0], images[0]), (results[2], images[1])):
        assert 1 <= len(prediction["result"]) <= 5
        for region in prediction["result"]:
            mask = rle.from_brush(region["value"]["rle"], image.height, image.width)
            assert rle.area([mask])[0] > 0
        # Region scores are the generator's predicted IoUs (unbounded for random weights), most
        # confident first; the task's score is their mean.
        scores = [region["score"] for region in prediction["result"]]
        assert scores == sorted(scores, reverse=True)
        assert prediction["score"] == pytest.approx(sum(scores) / len(scores))


def test_a_newly_promoted_version_is_served_without_restart(
    tiny_model: Any, store_with_images: tuple[MaskStore, list[ImageRecord]]
) -> None:
    from engine import build_sam

    store, images = store_with_images
    first = register_model(store, tiny_model)
    app = create_app(
        RegistryModelSource(store, "latest"),
        store,
        options=BackendOptions(model_check_interval_s=0.0),
    )
    body = predict_body(images[0], {"result": [click(40, 40)]})
    with TestClient(app) as client:
        assert client.post("/predict", json=body).json()["model_version"] == first
        second = register_model(store, build_sam("tiny"))
        answer = client.post("/predict", json=body).json()
        metrics = client.get("/metrics").json()
        setup = client.post("/setup", json={"schema": CONFIG}).json()
    assert (first, second) == ("v0001", "v0002")
    assert answer["model_version"] == second == answer["results"][0]["model_version"]
    assert metrics["model_swaps"] == 2 and setup["model_version"] == second


def test_pinned_version_is_kept_even_when_a_newer_one_is_promoted(
    tiny_model: Any, store_with_images: tuple[MaskStore, list[ImageRecord]]
) -> None:
    store, images = store_with_images
    pinned = register_model(store, tiny_model)
    register_model(store, tiny_model)
    app = create_app(
        RegistryModelSource(store, pinned), store, options=BackendOptions(model_check_interval_s=0)
    )
    with TestClient(app) as client:
        answer = client.post("/predict", json=predict_body(images[0], {"result": [click(5, 5)]}))
    assert answer.json()["model_version"] == pinned


def test_without_a_registered_model_health_is_up_and_predict_is_503(
    store_with_images: tuple[MaskStore, list[ImageRecord]],
) -> None:
    store, images = store_with_images
    with TestClient(create_app(RegistryModelSource(store), store)) as client:
        assert client.get("/health").json()["model_version"] is None
        answer = client.post("/predict", json=predict_body(images[0], {"result": [click(5, 5)]}))
    assert answer.status_code == 503 and "no model" in answer.json()["error"]


def test_webhooks_are_counted_and_ask_for_retraining(
    tiny_model: Any, store_with_images: tuple[MaskStore, list[ImageRecord]]
) -> None:
    store, _ = store_with_images
    asked: list[dict] = []

    def flaky(info: dict) -> None:
        asked.append(info)
        if info["reason"] == "START_TRAINING":
            raise RuntimeError("the orchestrator is down")

    app = create_app(
        StaticModelSource(tiny_model, "tiny-a"),
        store,
        options=BackendOptions(retrain_every=2),
        on_retrain=flaky,
    )
    with TestClient(app) as client:
        for action in [
            "ANNOTATION_CREATED",
            "PROJECT_UPDATED",
            "ANNOTATION_UPDATED",
            "ANNOTATION_CREATED",
            "START_TRAINING",
        ]:
            answer = client.post("/webhook", json={"action": action, "project": {"id": 4}})
            assert answer.status_code == 201
        # Retraining is asked for in a background task after the answer: wait for the last one.
        deadline = time.monotonic() + 30
        while True:
            metrics = client.get("/metrics").json()
            done = metrics["retrain_requests"] + metrics["retrain_failures"] >= 3
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert asked == [
        {"reason": "annotation events", "annotation_events": 2, "project": 4},
        {"reason": "START_TRAINING", "annotation_events": 1, "project": 4},
    ]
    assert metrics["webhook_events"] == {
        "ANNOTATION_CREATED": 2,
        "PROJECT_UPDATED": 1,
        "ANNOTATION_UPDATED": 1,
        "START_TRAINING": 1,
    }
    assert (metrics["retrain_requests"], metrics["retrain_failures"]) == (2, 1)
    assert metrics["latency"]["/webhook"]["count"] == 5
