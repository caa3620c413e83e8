"""Stage 1 against a real Label Studio: the flow waits while people (here: the test, through
Label Studio's API, as the labeling UI saves them) annotate, then brings the masks home."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.config import parse_config
from flows.stages import stage1_assisted_manual
from storage import rle as rle_codec
from storage.mask_store import MaskStore
from tests.fixtures.label_studio import LabelStudioServer
from tests.flows.conftest import tiny_engine_data

# Label Studio takes minutes to start on a busy 2-core machine (the first test pays for it).
pytestmark = [pytest.mark.label_studio, pytest.mark.slow, pytest.mark.timeout(1800)]

_LEAD_TIME_S = 12.0


class _People(threading.Thread):
    """Annotates every task of a project once the flow has imported them: the two largest
    ground-truth objects of each image as brush regions, saved with a lead time."""

    def __init__(self, server: LabelStudioServer, project_id: int, truth: Any, expected: int):
        super().__init__(daemon=True)
        self.server = server
        self.project_id = project_id
        self.truth = truth
        self.expected = expected
        self.drawn: dict[str, list[np.ndarray]] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        from annotation_ui.client import LabelStudioClient
        from annotation_ui.regions import brush_result
        from annotation_ui.settings import LabelStudioSettings

        try:
            settings = LabelStudioSettings(
                url=self.server.url,
                api_key=self.server.token,
                document_root=self.server.document_root,
            )
            client = LabelStudioClient(settings)
            try:
                project = client.project(self.project_id)
                deadline = time.monotonic() + 600
                tasks: list[dict[str, Any]] = []
                while len(tasks) < self.expected and time.monotonic() < deadline:
                    time.sleep(1.0)
                    tasks = list(client.iter_tasks(self.project_id))
                for task in tasks:
                    image_id = task["data"]["image_id"]
                    masks = self.truth.masks(image_id)
                    areas = masks.reshape(len(masks), -1).sum(axis=1)
                    drawn = [masks[i] for i in np.argsort(-areas)[:2]]
                    result = []
                    for k, mask in enumerate(drawn):
                        item = brush_result(
                            rle_codec.encode(mask[None])[0],
                            schema=project.schema,
                            label="object",
                            region_id=f"r{k}",
                        )
                        item["origin"] = "manual"
                        result.append(item)
                    client.create_annotation(int(task["id"]), result, lead_time_s=_LEAD_TIME_S)
                    self.drawn[image_id] = drawn
            finally:
                client.close()
        except BaseException as err:  # reported by the test, not lost in the thread
            self.error = err


def test_stage1_waits_for_label_studio_and_stores_what_people_drew(
    prefect_harness: None, label_studio: LabelStudioServer
) -> None:
    from annotation_ui.client import LabelStudioClient, ProjectKey
    from annotation_ui.settings import LabelStudioSettings
    from flows.sources import load_pool_ground_truth, prepare_source

    # The root lives under Label Studio's document root so it can serve the images.
    root = Path(label_studio.document_root) / f"engine-{uuid.uuid4().hex[:8]}"
    dataset = f"flowtest-{uuid.uuid4().hex[:6]}"
    config = parse_config(
        tiny_engine_data(
            root,
            stage1={"rounds": 1, "images_per_round": 2},
            stage2={"rounds": 1, "images_per_round": 1},
            stage3={"rounds": 1, "images_per_round": 1},
            annotator={"kind": "label_studio"},
            label_studio={
                "url": label_studio.url,
                "token": label_studio.token,
                "document_root": str(label_studio.document_root),
                "dataset": dataset,
                "poll_interval_s": 1.0,
                "timeout_s": 600.0,
            },
        )
    )
    store = MaskStore(config.root)
    prepare_source(store, config)  # the flow does it too (idempotent); the test needs the truth
    truth = load_pool_ground_truth(store, config)
    # The team sets the round's project up beforehand; the flow finds and fills it.
    settings = LabelStudioSettings(
        url=label_studio.url, api_key=label_studio.token, document_root=label_studio.document_root
    )
    client = LabelStudioClient(settings)
    try:
        project, created = client.ensure_project(ProjectKey(dataset, 1, 0))
    finally:
        client.close()
    assert created
    people = _People(label_studio, project.id, truth, expected=2)
    people.start()

    report = stage1_assisted_manual(config)

    people.join(timeout=60)
    assert people.error is None, people.error
    assert len(people.drawn) == 2
    (round_report,) = report.rounds
    assert round_report.masks == 4
    assert report.final_version in (round_report.trained_version, report.start_version)

    records = MaskStore(config.root).mask_records(stage=1, round=0, split="pool")
    assert len(records) == 4
    for record in records:
        assert record.source == "manual"
        assert record.annotator == label_studio.username
        assert record.lead_time_s == pytest.approx(_LEAD_TIME_S / 2)  # shared by its 2 masks
        mask = rle_codec.decode([record.segmentation])[0]
        assert any(np.array_equal(mask, drawn) for drawn in people.drawn[record.image_id])
