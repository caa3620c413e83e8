"""End to end with a real Label Studio, a real ML backend on loopback and real stores.

Annotations are created through Label Studio's API the way the labeling UI submits them: brush
RLE regions plus the smart keypoints the annotator clicked, with the lead time the UI measured.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest

from annotation_ui.client import LabelStudioClient, Project, ProjectKey
from annotation_ui.ml_backend import BackendOptions, RegistryModelSource, create_app, running
from annotation_ui.reconcile import reconcile_project
from annotation_ui.regions import brush_result
from annotation_ui.settings import LabelStudioSettings
from annotation_ui.tasks import S3Access, setup_project
from storage import rle
from storage.errors import AnnotationError
from storage.mask_store import ImageRecord, MaskRecord, MaskStore
from tests.annotation_ui.conftest import (
    box_mask,
    register_images,
    register_model,
    write_images,
)
from tests.fixtures.label_studio import LabelStudioServer
from tests.fixtures.s3 import S3Root

pytestmark = [pytest.mark.label_studio, pytest.mark.slow]

AUTH = ("ls-backend", "backend-pass-123")
H, W = 64, 96


_OPEN_CLIENTS: list[LabelStudioClient] = []


def client_for(server: LabelStudioServer, **kw: Any) -> LabelStudioClient:
    """A client of the test server (closed after each test by ``_close_clients``)."""
    transport = kw.pop("transport", None)
    settings = LabelStudioSettings(
        url=kw.pop("url", server.url),
        api_key=server.token,
        document_root=server.document_root,
        **kw,
    )
    http = httpx.Client(transport=transport, timeout=60) if transport is not None else None
    client = LabelStudioClient(settings, httpx_client=http)
    _OPEN_CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


def keypoint(x_px: float, y_px: float, *, positive: bool = True) -> dict[str, Any]:
    """A smart keypoint as the labeling UI stores it (percent of the image size)."""
    return {
        "id": f"kp{int(x_px)}x{int(y_px)}",
        "from_name": "point",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {
            "x": 100 * x_px / W,
            "y": 100 * y_px / H,
            "width": 0.6,
            "keypointlabels": ["object"],
        },
        "is_positive": positive,
    }


def brush(project: Project, mask: np.ndarray, region_id: str) -> dict[str, Any]:
    item = brush_result(
        rle.encode(mask)[0], schema=project.schema, label="object", region_id=region_id
    )
    item["origin"] = "manual"
    return item


def decoded(record: MaskRecord) -> np.ndarray:
    return rle.decode([record.segmentation])[0]


@contextmanager
def ml_backend(store: MaskStore) -> Iterator[tuple[str, Any]]:
    app = create_app(
        RegistryModelSource(store, "latest"), store, options=BackendOptions(basic_auth=AUTH)
    )
    with running(app) as url:
        yield url, app.state.backend


@pytest.fixture(scope="module")
def local_setup(
    label_studio: LabelStudioServer, tiny_model: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[MaskStore, str, Any]]:
    """A store with a promoted tiny model and the ML backend serving it, for the module."""
    store = MaskStore(str(tmp_path_factory.mktemp("e2e-store")))
    register_model(store, tiny_model)
    with ml_backend(store) as (url, state):
        yield store, url, state


def stage1_images(
    server: LabelStudioServer, store: MaskStore, name: str, n: int
) -> list[ImageRecord]:
    folder = server.document_root / name
    # Image ids are content hashes: each folder gets its own scenes, or they would be one image.
    write_images(folder, n, seed=zlib.crc32(name.encode()), size=(H, W))
    images = register_images(store, str(folder))
    assert len(images) == n
    return images


def test_stage1_local_folder_round_trip(
    label_studio: LabelStudioServer, local_setup: tuple[MaskStore, str, Any]
) -> None:
    store, backend_url, backend = local_setup
    images = stage1_images(label_studio, store, "stage1-local", 3)
    client = client_for(label_studio)
    report = setup_project(
        client,
        ProjectKey("e2e-local", 1, 0),
        images,
        document_root=label_studio.document_root,
        ml_backend_url=backend_url,
        ml_backend_auth=AUTH,
    )
    project = report.project
    assert (report.created, report.tasks_added, len(report.storages)) == (True, 3, 1)
    again = setup_project(
        client,
        ProjectKey("e2e-local", 1, 0),
        images,
        document_root=label_studio.document_root,
        ml_backend_url=backend_url,
        ml_backend_auth=AUTH,
    )
    assert (again.project.id, again.created, again.tasks_added, again.tasks_present) == (
        project.id,
        False,
        0,
        3,
    )
    assert again.ml_backend_id == report.ml_backend_id and again.storages == report.storages
    tasks = {t["data"]["image_id"]: t for t in client.iter_tasks(project.id)}
    assert set(tasks) == {r.image_id for r in images}

    # Label Studio serves the task's image from the local-files storage.
    first = tasks[images[0].image_id]
    served = httpx.get(
        label_studio.url + first["data"]["image"],
        headers={"Authorization": f"Token {label_studio.token}"},
    )
    assert served.status_code == 200 and served.content == Path(images[0].uri).read_bytes()

    # A click in the labeling UI: Label Studio asks the ML backend, which answers with a mask.
    click = keypoint(30, 20)
    answer = client.predict_interactive(report.ml_backend_id, first["id"], {"result": [click]})
    assert "errors" not in answer, answer
    (predicted,) = answer["data"]["result"]
    assert predicted["type"] == "brushlabels" and answer["data"]["model_version"] == "v0001"
    predicted_mask = rle.decode([rle.from_brush(predicted["value"]["rle"], H, W)])[0]

    # Annotator 1 accepts the prediction (the smart keypoint stays in the result, as in the UI).
    ann_a = client.create_annotation(first["id"], [predicted, click], lead_time_s=12.0)
    # Annotator 2 paints two objects by hand and clicks once inside B, once outside everything.
    second = tasks[images[1].image_id]
    mask_a, mask_b = box_mask(H, W, 5, 20, 5, 30), box_mask(H, W, 30, 60, 50, 90)
    ann_b = client.create_annotation(
        second["id"],
        [
            brush(project, mask_a, "regA"),
            brush(project, mask_b, "regB"),
            keypoint(70, 45),
            keypoint(40, 62, positive=False),
        ],
        lead_time_s=30.0,
    )

    result = reconcile_project(client, store, project.id)
    assert (result.added, result.replaced, result.unchanged, result.removed) == (3, 0, 0, 0)
    assert result.problems == ()
    records = {
        r.mask_id: r
        for r in store.mask_records(stage=1, round=0)
        if r.mask_id and r.mask_id.startswith(f"ls-{project.uid}-")
    }
    by_image: dict[str, list[MaskRecord]] = {}
    for r in records.values():
        by_image.setdefault(r.image_id, []).append(r)
    (accepted,) = by_image[images[0].image_id]
    np.testing.assert_array_equal(decoded(accepted), predicted_mask)
    assert (accepted.annotator, accepted.lead_time_s, accepted.clicks) == (
        label_studio.username,
        12.0,
        1,
    )
    assert accepted.source == "manual" and accepted.stage == 1
    assert accepted.point_coords == [[pytest.approx(30, abs=1e-3), pytest.approx(20, abs=1e-3)]]
    painted = sorted(by_image[images[1].image_id], key=lambda r: r.bbox[1])
    np.testing.assert_array_equal(decoded(painted[0]), mask_a[0])
    np.testing.assert_array_equal(decoded(painted[1]), mask_b[0])
    assert [r.lead_time_s for r in painted] == [15.0, 15.0]  # 30 s shared by two masks
    # The click inside B goes to B; the background click to the nearest box (B again).
    assert [r.clicks for r in painted] == [0, 2]
    assert all(r.annotator == label_studio.username for r in painted)
    commits = len(store.commits())

    # Reconciling again changes nothing.
    again_result = reconcile_project(client, store, project.id)
    assert (again_result.added, again_result.unchanged, again_result.commit) == (0, 3, None)
    assert len(store.commits()) == commits

    # Annotator 2 redraws A and erases B: the new A replaces the old one, B is removed.
    mask_a2 = box_mask(H, W, 5, 25, 5, 35)
    client.update_annotation(ann_b, [brush(project, mask_a2, "regA")], lead_time_s=40.0)
    edited = reconcile_project(client, store, project.id)
    assert (edited.added, edited.replaced, edited.unchanged, edited.removed) == (0, 1, 1, 1)
    (now,) = store.mask_records(image_id=images[1].image_id, stage=1)
    np.testing.assert_array_equal(decoded(now), mask_a2[0])
    assert now.lead_time_s == 40.0
    assert len(store.commits()) == commits + 1
    assert ann_a != ann_b

    # Label Studio posted the annotation events to the backend, with its credentials.
    events = backend.metrics.snapshot()["webhook_events"]
    assert events.get("ANNOTATION_CREATED", 0) >= 2 and events.get("ANNOTATION_UPDATED", 0) >= 1


def test_stage1_s3_images_through_moto(
    label_studio: LabelStudioServer,
    tiny_model: Any,
    s3_root: S3Root,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "png"
    write_images(folder, 2, seed=11, size=(H, W))
    s3 = boto3.client("s3", endpoint_url=s3_root.endpoint_url, region_name="us-east-1")
    for path in sorted(folder.glob("*.png")):
        s3.upload_file(str(path), s3_root.bucket, f"{s3_root.prefix}/images/{path.name}")
    source = f"s3://{s3_root.bucket}/{s3_root.prefix}/images"
    store = MaskStore(str(tmp_path / "store"), endpoint_url=s3_root.endpoint_url)
    images = register_images(store, source, s3_root.endpoint_url)
    assert [r.uri.startswith("s3://") for r in images] == [True, True]
    register_model(store, tiny_model)
    client = client_for(label_studio)
    with ml_backend(store) as (backend_url, _):
        report = setup_project(
            client,
            ProjectKey("e2e-s3", 1, 0),
            images,
            s3=S3Access(s3_root.endpoint_url, "us-east-1", ("testing", "testing")),
            ml_backend_url=backend_url,
            ml_backend_auth=AUTH,
        )
        project = report.project
        tasks = {t["data"]["image_id"]: t for t in client.iter_tasks(project.id)}
        task = tasks[images[0].image_id]
        # Label Studio resolves the s3:// URI through the connected storage: its task list
        # shows a resolve URL that redirects to a presigned one on the moto endpoint.
        shown = task["data"]["image"]
        assert shown == images[0].uri or shown.startswith(f"/tasks/{task['id']}/resolve/")
        resolved = httpx.get(
            f"{label_studio.url}/api/tasks/{task['id']}",
            params={"resolve_uri": "true"},
            headers={"Authorization": f"Token {label_studio.token}"},
        ).json()["data"]["image"]
        assert not resolved.startswith("s3://")
        url = resolved if resolved.startswith("http") else label_studio.url + resolved
        image = httpx.get(
            url, headers={"Authorization": f"Token {label_studio.token}"}, follow_redirects=True
        )
        assert image.status_code == 200
        assert image.content == (folder / Path(images[0].uri).name).read_bytes()

        click = keypoint(50, 30)
        answer = client.predict_interactive(report.ml_backend_id, task["id"], {"result": [click]})
        assert "errors" not in answer, answer
        (predicted,) = answer["data"]["result"]
        client.create_annotation(task["id"], [predicted, click], lead_time_s=7.5)

    result = reconcile_project(client, store, project.id)
    assert (result.added, result.problems) == (1, ())
    (record,) = store.mask_records(image_id=images[0].image_id)
    expected = rle.from_brush(predicted["value"]["rle"], H, W)
    assert record.segmentation == expected
    assert (record.annotator, record.lead_time_s) == (label_studio.username, 7.5)
    assert reconcile_project(client, store, project.id).unchanged == 1


def test_stage2_predictions_come_back_as_model_or_manual(
    label_studio: LabelStudioServer, local_setup: tuple[MaskStore, str, Any]
) -> None:
    store, _, _ = local_setup
    images = stage1_images(label_studio, store, "stage2-local", 2)
    proposals = {
        images[0].image_id: [box_mask(H, W, 10, 30, 10, 40)],
        images[1].image_id: [box_mask(H, W, 20, 50, 30, 70)],
    }
    records = [
        MaskRecord(
            image_id=i,
            segmentation=rle.encode(m)[0],
            stage=2,
            round=0,
            source="model",
            run_id="amg-e2e",
            predicted_iou=0.93,
            model_version="v0001",
        )
        for i, masks in proposals.items()
        for m in masks
    ]
    store.write_masks(records, stage=2, round=0, run_id="amg-e2e")
    stored = [r for r in store.mask_records(stage=2, round=0) if r.run_id == "amg-e2e"]
    predictions = {
        image.image_id: [
            r for r in stored if r.image_id == image.image_id and r.run_id == "amg-e2e"
        ]
        for image in images
    }
    client = client_for(label_studio)
    key = ProjectKey("e2e-stage2", 2, 0)
    report = setup_project(
        client,
        key,
        images,
        document_root=label_studio.document_root,
        predictions=predictions,
        model_version="v0001",
    )
    assert report.predictions_added == 2
    again = setup_project(
        client,
        key,
        images,
        document_root=label_studio.document_root,
        predictions=predictions,
        model_version="v0001",
    )
    assert again.predictions_added == 0
    project = report.project
    tasks = {t["data"]["image_id"]: t for t in client.iter_tasks(project.id)}
    for image in images:
        (prediction,) = tasks[image.image_id]["predictions"]
        assert prediction["model_version"] == "v0001"
        assert prediction["score"] == pytest.approx(0.93)
        (region,) = prediction["result"]
        shown = rle.from_brush(region["value"]["rle"], H, W)
        assert shown == rle.encode(proposals[image.image_id][0])[0]

    # Task A: the annotator accepts the prediction as it is (the UI copies its result).
    task_a = tasks[images[0].image_id]
    pred_a = task_a["predictions"][0]
    client.create_annotation(
        task_a["id"], pred_a["result"], lead_time_s=4.0, parent_prediction=pred_a["id"]
    )
    # Task B: the annotator fixes the prediction and adds an object the model missed.
    task_b = tasks[images[1].image_id]
    pred_b = task_b["predictions"][0]
    fixed = dict(pred_b["result"][0])
    fixed["value"] = dict(fixed["value"])
    fixed["value"]["rle"] = rle.to_brush(rle.encode(box_mask(H, W, 20, 55, 30, 75))[0])
    client.create_annotation(
        task_b["id"],
        [fixed, brush(project, box_mask(H, W, 0, 10, 0, 10), "new1")],
        lead_time_s=20.0,
        parent_prediction=pred_b["id"],
    )
    result = reconcile_project(client, store, project.id)
    assert (result.added, result.problems) == (3, ())
    back = [r for r in store.mask_records(stage=2, round=0) if r.run_id.startswith("label-studio")]
    (kept,) = [r for r in back if r.image_id == images[0].image_id]
    assert (kept.source, kept.model_version, kept.predicted_iou) == (
        "model",
        "v0001",
        pytest.approx(0.93),
    )
    assert sorted(r.source for r in back if r.image_id == images[1].image_id) == [
        "manual",
        "manual",
    ]


def test_bad_annotations_are_reported_and_good_ones_stored(
    label_studio: LabelStudioServer, local_setup: tuple[MaskStore, str, Any]
) -> None:
    store, _, _ = local_setup
    images = stage1_images(label_studio, store, "bad-input", 5)
    client = client_for(label_studio)
    report = setup_project(
        client, ProjectKey("e2e-bad", 1, 0), images, document_root=label_studio.document_root
    )
    project = report.project
    tasks = [t for t in client.iter_tasks(project.id)]
    by_image = {t["data"]["image_id"]: int(t["id"]) for t in tasks}
    ids = [by_image[r.image_id] for r in images]
    good = box_mask(H, W, 3, 9, 3, 9)
    client.create_annotation(ids[0], [brush(project, good, "ok")], lead_time_s=3.0)
    client.create_annotation(ids[1], [], lead_time_s=1.0)
    unknown = {**brush(project, good, "u"), "from_name": "label"}
    client.create_annotation(ids[2], [unknown])
    outside = keypoint(10, 10)
    outside["value"]["x"] = 140.0
    client.create_annotation(ids[3], [brush(project, good, "o"), outside])
    wrong_size = brush(project, box_mask(H + 4, W, 0, 5, 0, 5), "w")
    wrong_size["original_height"] = H
    client.create_annotation(ids[4], [wrong_size])
    # A task whose image is not (or no longer) in the store.
    (ghost,) = client.import_tasks(
        project.id, [{"data": {"image": "/data/local-files/?d=x.png", "image_id": "9" * 24}}]
    )
    client.create_annotation(ghost, [brush(project, good, "g")])

    result = reconcile_project(client, store, project.id)
    assert result.added == 1
    problems = {p.task_id: p.message for p in result.problems}
    assert set(problems) == {ids[1], ids[2], ids[3], ids[4], ghost}
    assert "no result" in problems[ids[1]]
    assert "from_name 'label'" in problems[ids[2]]
    assert "0-100 %" in problems[ids[3]]
    assert f"not a {H}x{W} mask" in problems[ids[4]]
    assert "not registered" in problems[ghost]
    assert all(p.annotation_id is not None for p in result.problems)
    (stored,) = store.mask_records(image_id=images[0].image_id, stage=1)
    np.testing.assert_array_equal(decoded(stored), good[0])
    # The bad ones stay reported, the good one unchanged, on every run.
    second = reconcile_project(client, store, project.id)
    assert (second.unchanged, len(second.problems), second.commit) == (1, 5, None)


class FlakyTransport(httpx.HTTPTransport):
    """Sends requests to the real server, but answers 503 itself when ``fail`` says so."""

    def __init__(self, fail: Callable[[httpx.Request, int], bool]) -> None:
        super().__init__()
        self.fail = fail
        self.calls = 0
        self.lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.calls += 1
            calls = self.calls
        if self.fail(request, calls):
            return httpx.Response(503, json={"detail": "maintenance"}, request=request)
        return super().handle_request(request)


def page(request: httpx.Request) -> int | None:
    if request.url.path.rstrip("/") != "/api/tasks":
        return None
    return int(request.url.params.get("page", "1"))


def test_label_studio_failing_mid_read_is_retried_or_stops_before_writing(
    label_studio: LabelStudioServer, local_setup: tuple[MaskStore, str, Any]
) -> None:
    store, _, _ = local_setup
    images = stage1_images(label_studio, store, "flaky", 3)
    setup = setup_project(
        client_for(label_studio),
        ProjectKey("e2e-flaky", 1, 0),
        images,
        document_root=label_studio.document_root,
    )
    writer = client_for(label_studio)
    for task in writer.iter_tasks(setup.project.id):
        writer.create_annotation(
            int(task["id"]), [brush(setup.project, box_mask(H, W, 1, 4, 1, 4), "m")]
        )
    commits = len(store.commits())

    # Page 2 always fails: after the retries the read stops, and nothing is written.
    broken = client_for(
        label_studio,
        page_size=1,
        max_retries=1,
        transport=FlakyTransport(lambda request, _: page(request) == 2),
    )
    with pytest.raises(AnnotationError, match="503") as err:
        reconcile_project(broken, store, setup.project.id)
    assert label_studio.token not in str(err.value) and "sessionid" not in str(err.value)
    assert len(store.commits()) == commits

    # Page 2 fails once: the SDK's retry gets it, and the whole project is stored.
    failed: list[int] = []

    def once(request: httpx.Request, calls: int) -> bool:
        if page(request) == 2 and not failed:
            failed.append(calls)
            return True
        return False

    flaky = client_for(label_studio, page_size=1, max_retries=2, transport=FlakyTransport(once))
    result = reconcile_project(flaky, store, setup.project.id)
    assert failed and (result.added, result.problems) == (3, ())

    # Label Studio down altogether: a typed error naming the URL, not the token.
    down = client_for(label_studio, url="http://127.0.0.1:9", max_retries=0)
    with pytest.raises(AnnotationError, match="did not answer") as err:
        reconcile_project(down, store, setup.project.id)
    assert label_studio.token not in str(err.value)


def test_cli_setup_and_pull(
    label_studio: LabelStudioServer, local_setup: tuple[MaskStore, str, Any]
) -> None:
    from typer.testing import CliRunner

    from flows.cli import build_app

    store, _, _ = local_setup
    folder = label_studio.document_root / "cli"
    write_images(folder, 2, seed=21, size=(H, W))
    env = {"LABEL_STUDIO_API_KEY": label_studio.token, "LABEL_STUDIO_URL": label_studio.url}
    args = [
        "ls",
        "setup",
        "--root",
        store.location.root,
        "--stage",
        "1",
        "--images",
        str(folder),
        "--dataset",
        "e2e-cli",
        "--document-root",
        str(label_studio.document_root),
    ]
    runner = CliRunner()
    first = runner.invoke(build_app(), args, env=env)
    assert first.exit_code == 0, first.output
    project_id = int(first.stdout.strip().splitlines()[-1])
    assert label_studio.token not in first.output
    client = client_for(label_studio)
    task = next(iter(client.iter_tasks(project_id)))
    project = client.project(project_id)
    client.create_annotation(int(task["id"]), [brush(project, box_mask(H, W, 2, 8, 2, 8), "c")])
    pull = ["ls", "pull", "--root", store.location.root, "--project", str(project_id)]
    out = runner.invoke(build_app(), pull, env=env)
    assert out.exit_code == 0, out.output
    assert "added 1, replaced 0, unchanged 0, removed 0, problems 0" in out.stdout
    out = runner.invoke(build_app(), pull, env=env)
    assert "added 0, replaced 0, unchanged 1, removed 0, problems 0" in out.stdout
    second = runner.invoke(build_app(), args, env=env)
    assert int(second.stdout.strip().splitlines()[-1]) == project_id
