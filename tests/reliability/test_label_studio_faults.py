"""Issue 9, scenarios 5 and 6: Label Studio failing, restarting and being edited under a reconcile.

Everything runs against the real Label Studio of the session. Faults come from the outside, where
they happen in production: a loopback proxy between our client and Label Studio answers 5xx
itself (a gateway whose upstream is restarting), drops connections or cuts answers short, and
the real server process is stopped and started again.

What "stored exactly once" means here: each brush region of each annotation Label Studio holds
when the reconcile starts (the cut-off) has one row in the store's current view, and nothing else
of the project does.
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest

from annotation_ui.client import LabelStudioClient, LabelStudioUnavailableError, Project, ProjectKey
from annotation_ui.reconcile import reconcile_project
from annotation_ui.regions import brush_result
from annotation_ui.settings import LabelStudioSettings
from annotation_ui.tasks import setup_project
from flows.annotators.label_studio import LabelStudioAnnotator
from storage import rle
from storage.mask_store import ImageRecord, MaskRecord, MaskStore
from tests.annotation_ui.conftest import box_mask, register_images, write_images
from tests.fixtures.label_studio import LabelStudioServer

pytestmark = [pytest.mark.label_studio, pytest.mark.slow]

H, W = 64, 96
RESET = "reset"  # close the connection without an answer
TRUNCATE = "truncate"  # forward, then cut Label Studio's answer half-way through its body
Fault = int | str | None

# ------------------------------------------------------------------------------------ the proxy

_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer"}
    | {"upgrade", "content-length", "host"}
)


class FaultyProxy:
    """A loopback HTTP proxy in front of a real server that injects faults.

    ``plan(method, path)`` (path with query) decides each request: None forwards it, a status
    code is answered by the proxy itself with an HTML page (as a gateway does while its upstream
    restarts), :data:`RESET` or :data:`TRUNCATE`. An upstream that refuses connections is a 502.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.plan: Callable[[str, str], Fault] = lambda method, path: None
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(_RelayHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def follow(self, plan: Callable[[str, str], Fault]) -> None:
        """Use ``plan`` from now on, counting requests and faults afresh."""
        with self._lock:
            self.plan, self.requests, self.injected = plan, 0, Counter()

    def decide(self, method: str, path: str) -> Fault:
        with self._lock:
            self.requests += 1
            fault = self.plan(method, path)
            if fault is not None:
                self.injected[str(fault)] += 1
            return fault

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _RelayHandler(BaseHTTPRequestHandler):
    owner: FaultyProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test reports what it injected

    def do_GET(self) -> None:
        self._relay()

    do_POST = do_PATCH = do_PUT = do_DELETE = do_GET

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.close_connection = True
        fault = self.owner.decide(self.command, self.path)
        if fault == RESET:
            return
        if isinstance(fault, int):
            self._answer(fault, {"Content-Type": "text/html"}, b"<h1>Bad Gateway</h1>")
            return
        connection = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        try:
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            status, data = response.status, response.read()
            kept = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS}
        except OSError:
            self._answer(502, {"Content-Type": "text/html"}, b"<h1>upstream refused</h1>")
            return
        finally:
            connection.close()
        self._answer(status, kept, data, cut=fault == TRUNCATE)

    def _answer(self, status: int, headers: dict[str, str], data: bytes, cut: bool = False) -> None:
        self.send_response_only(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if cut else data)


def tasks_page(path: str) -> int | None:
    """The page number of a task-list request, else None."""
    parts = urlsplit(path)
    if parts.path.rstrip("/") != "/api/tasks":
        return None
    return int(parse_qs(parts.query).get("page", ["1"])[0])


# ------------------------------------------------------------------------------ projects, checks

_CLIENTS: list[LabelStudioClient] = []


def client_for(
    server: LabelStudioServer,
    *,
    url: str | None = None,
    http: httpx.Client | None = None,
    **kw: Any,
) -> LabelStudioClient:
    settings = LabelStudioSettings(url=url or server.url, api_key=server.token, **kw)
    client = LabelStudioClient(settings, httpx_client=http)
    _CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def brush(project: Project, mask: np.ndarray, region_id: str) -> dict[str, Any]:
    item = brush_result(
        rle.encode(mask)[0], schema=project.schema, label="object", region_id=region_id
    )
    item["origin"] = "manual"
    return item


@dataclass
class Annotated:
    store: MaskStore
    project: Project
    images: list[ImageRecord]
    task_ids: list[int]  # in image order
    writer: LabelStudioClient  # straight to Label Studio, as the labeling UI saves


def annotated_project(
    server: LabelStudioServer, tmp_path: Path, name: str, regions: list[list[int]]
) -> Annotated:
    """A project with one task per entry of ``regions``; each entry lists the annotations of
    that task by their number of brush regions (``[]``: not annotated yet)."""
    folder = server.document_root / name
    write_images(folder, len(regions), seed=zlib.crc32(name.encode()), size=(H, W))
    store = MaskStore(str(tmp_path / "store"))
    images = register_images(store, str(folder))
    writer = client_for(server)
    project = setup_project(
        writer, ProjectKey(name, 1, 0), images, document_root=server.document_root
    ).project
    by_image = {t["data"]["image_id"]: int(t["id"]) for t in writer.iter_tasks(project.id)}
    task_ids = [by_image[r.image_id] for r in images]
    for task_id, counts in zip(task_ids, regions, strict=True):
        for n_regions in counts:
            annotate(writer, project, task_id, n_regions)
    return Annotated(store, project, images, task_ids, writer)


def annotate(client: LabelStudioClient, project: Project, task_id: int, n_regions: int) -> int:
    """Save an annotation of ``n_regions`` disjoint boxes on a task; returns its id."""
    result = [
        brush(project, box_mask(H, W, 4 + 12 * k, 12 + 12 * k, 4, 40 + task_id % 20), f"r{k}")
        for k in range(n_regions)
    ]
    return client.create_annotation(task_id, result, lead_time_s=6.0)


def regions_in_label_studio(client: LabelStudioClient, project_id: int) -> Counter[int]:
    """Annotation id -> brush regions, for every submitted annotation Label Studio holds."""
    return Counter(
        {
            int(a["id"]): sum(1 for r in a["result"] if r["type"] == "brushlabels")
            for t in client.iter_tasks(project_id)
            for a in t.get("annotations") or []
            if not a.get("was_cancelled")
        }
    )


def current_rows(store: MaskStore, project: Project) -> list[MaskRecord]:
    prefix = f"ls-{project.uid}-"
    return [
        r
        for r in store.mask_records(stage=1, round=0)
        if r.mask_id and r.mask_id.startswith(prefix)
    ]


def assert_each_region_stored_once(store: MaskStore, project: Project, expected: Counter[int]):
    """The store's current view holds one row per region of each annotation, nothing more."""
    rows = current_rows(store, project)
    ids = [r.mask_id for r in rows]
    assert len(ids) == len(set(ids))
    pattern = re.compile(rf"^ls-{re.escape(project.uid)}-a(\d+)-([0-9a-f]{{8}})-[0-9a-f]+$")
    lineages = [pattern.match(i or "") for i in ids]
    assert all(lineages), ids
    assert len({m.group(1, 2) for m in lineages if m}) == len(rows)  # one row per region
    stored = Counter(int(m.group(1)) for m in lineages if m)
    assert stored == expected
    return rows


# ------------------------------------------------------------------------------------ scenario 5


def test_5xx_and_dropped_connections_mid_reconcile_leave_each_annotation_stored_once(
    label_studio: LabelStudioServer, tmp_path: Path
) -> None:
    # 5 tasks on 3 pages of 2; task 2 has two annotations, task 4 none yet.
    setup = annotated_project(label_studio, tmp_path, "faults-5xx", [[1], [2], [1, 1], [2], []])
    store, project = setup.store, setup.project
    commits = len(store.commits())
    with FaultyProxy(label_studio.url) as proxy:
        # A gateway answering 502 for page 3 for longer than the retries: the read stops, and
        # nothing of the pages already read is written.
        proxy.follow(lambda method, path: 502 if tasks_page(path) == 3 else None)
        through = client_for(label_studio, url=proxy.url, page_size=2, max_retries=2)
        with pytest.raises(LabelStudioUnavailableError, match="answered 502") as err:
            reconcile_project(through, store, project.id)
        assert proxy.injected["502"] == 3  # the first try and two retries
        assert label_studio.token not in str(err.value)
        assert len(store.commits()) == commits

        # Users cannot be looked up (5xx): the reconcile stops rather than store a placeholder
        # annotator ("user:1") that no later reconcile would correct.
        proxy.follow(lambda method, path: 503 if path.startswith("/api/users/") else None)
        through = client_for(label_studio, url=proxy.url, page_size=2, max_retries=1)
        with pytest.raises(LabelStudioUnavailableError, match="read user"):
            reconcile_project(through, store, project.id)
        assert len(store.commits()) == commits

        # People keep working meanwhile: the cut-off moves.
        annotate(setup.writer, project, setup.task_ids[4], 1)

        # Every other request fails, by turns: a 503, a dropped connection, an answer cut
        # short. Each heals within the retries, so one pass brings everything home.
        turns: list[Fault] = [503, None, RESET, None, TRUNCATE, None]
        proxy.follow(lambda method, path: turns[(proxy.requests - 1) % len(turns)])
        expected = regions_in_label_studio(setup.writer, project.id)  # the cut-off
        through = client_for(label_studio, url=proxy.url, page_size=2, max_retries=2)
        result = reconcile_project(through, store, project.id)
    assert {k: proxy.injected[k] for k in ("503", RESET, TRUNCATE)} == {
        "503": 2,
        RESET: 2,
        TRUNCATE: 1,
    }  # 10 requests through the proxy: project, 3 pages, the user, and 5 retries
    assert (result.added, result.replaced, result.removed, result.problems) == (8, 0, 0, ())
    assert sum(expected.values()) == 8 and len(expected) == 6
    rows = assert_each_region_stored_once(store, project, expected)
    assert {r.annotator for r in rows} == {label_studio.username}
    assert len(store.commits()) == commits + 1

    again = reconcile_project(setup.writer, store, project.id)
    assert (again.unchanged, again.added, again.commit) == (8, 0, None)


def test_a_reconcile_in_flight_rides_through_a_label_studio_restart(
    label_studio: LabelStudioServer, tmp_path: Path
) -> None:
    setup = annotated_project(label_studio, tmp_path, "faults-restart", [[1], [2], [1], [1]])
    expected = regions_in_label_studio(setup.writer, setup.project.id)
    page2_attempts = 0
    restart_errors: list[BaseException] = []

    def restart() -> None:
        try:
            label_studio.start()
        except BaseException as err:  # reported below, not lost in the thread
            restart_errors.append(err)

    restarter = threading.Thread(target=restart, daemon=True)

    def stop_at_page_2(request: httpx.Request) -> None:
        nonlocal page2_attempts
        if tasks_page(str(request.url.raw_path, "ascii")) == 2:
            page2_attempts += 1
            if page2_attempts == 1:  # page 1 is read; the server goes down under the reconcile
                label_studio.stop()
                restarter.start()

    http = httpx.Client(timeout=60, event_hooks={"request": [stop_at_page_2]})
    # Back-off 1, 2, 4, 8, 16, 32 s: about a minute for the server to come back (it takes ~10 s).
    client = client_for(label_studio, http=http, page_size=2, max_retries=6)
    try:
        result = reconcile_project(client, setup.store, setup.project.id)
    finally:
        if restarter.is_alive():
            restarter.join(timeout=120)
        label_studio.start()  # whatever happened, leave the session's server running
    assert restart_errors == []
    assert page2_attempts >= 2  # refused while down, read once it was back
    assert (result.added, result.problems) == (5, ())
    assert_each_region_stored_once(setup.store, setup.project, expected)


def test_a_round_waiting_for_people_survives_a_label_studio_restart(
    label_studio: LabelStudioServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    setup = annotated_project(label_studio, tmp_path, "faults-wait", [[], [], []])
    caplog.set_level(logging.INFO, logger="flows.annotators.label_studio")
    annotator = LabelStudioAnnotator(
        setup.store,
        client_for(label_studio, max_retries=0),
        dataset=setup.project.key.dataset,
        document_root=label_studio.document_root,
        poll_interval_s=0.2,
        timeout_s=240,
    )
    outcome: list[Any] = []

    def run_round() -> None:
        try:
            outcome.append(
                annotator.annotate(
                    setup.images, None, stage=1, round=0, run_id="t", model_version="v0"
                )
            )
        except BaseException as err:
            outcome.append(err)

    def logged(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    round_thread = threading.Thread(target=run_round, daemon=True)
    round_thread.start()
    try:
        wait_for(lambda: logged("0/3 tasks annotated") > 0, "the round to start waiting")
        label_studio.stop()
        wait_for(lambda: logged("progress unknown") >= 2, "the round to notice the outage")
    finally:
        label_studio.start()
    assert round_thread.is_alive() and not outcome  # still waiting, not failed
    for task_id in setup.task_ids:
        annotate(setup.writer, setup.project, task_id, 2)
    round_thread.join(timeout=60)
    assert outcome, [r.getMessage() for r in caplog.records[-3:]]
    (records,) = outcome
    assert isinstance(records, list), records
    assert len(records) == 6
    assert_each_region_stored_once(
        setup.store, setup.project, regions_in_label_studio(setup.writer, setup.project.id)
    )
    warnings = [r for r in caplog.records if "progress unknown" in r.getMessage()]
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert all(label_studio.token not in r.getMessage() for r in caplog.records)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------ scenario 6


def test_an_annotation_edited_after_it_was_stored_replaces_its_rows(
    label_studio: LabelStudioServer, tmp_path: Path
) -> None:
    setup = annotated_project(label_studio, tmp_path, "edits", [[]])
    store, project, writer = setup.store, setup.project, setup.writer
    (task_id,) = setup.task_ids
    m1, m2 = box_mask(H, W, 2, 20, 2, 30), box_mask(H, W, 30, 60, 40, 90)
    annotation = writer.create_annotation(
        task_id, [brush(project, m1, "r1"), brush(project, m2, "r2")], lead_time_s=20.0
    )

    def reconcile_and_read() -> tuple[Any, dict[str, MaskRecord]]:
        report = reconcile_project(writer, store, project.id)
        rows = assert_each_region_stored_once(store, project, Counter({annotation: len(regions)}))
        by_region = {}
        for row in rows:
            (name,) = [n for n, m in regions.items() if np.array_equal(decoded(row), m[0])]
            by_region[name] = row
        assert sum(r.lead_time_s or 0 for r in rows) == pytest.approx(lead)
        return report, by_region

    regions, lead = {"r1": m1, "r2": m2}, 20.0
    first, before = reconcile_and_read()
    assert (first.added, first.replaced) == (2, 0)
    assert [before[n].lead_time_s for n in ("r1", "r2")] == [10.0, 10.0]

    # The annotator redraws r1 and adds r3; the annotation's time grows to 45 s, so every region
    # gets a new share (15 s): all three rows are new, the two old ones superseded.
    m1b, m3 = box_mask(H, W, 2, 25, 2, 35), box_mask(H, W, 40, 50, 2, 20)
    regions, lead = {"r1": m1b, "r2": m2, "r3": m3}, 45.0
    writer.update_annotation(
        annotation,
        [brush(project, m1b, "r1"), brush(project, m2, "r2"), brush(project, m3, "r3")],
        lead_time_s=lead,
    )
    edit, after = reconcile_and_read()
    assert (edit.added, edit.replaced, edit.unchanged, edit.removed) == (1, 2, 0, 0)
    assert [after[n].lead_time_s for n in ("r1", "r2", "r3")] == [15.0, 15.0, 15.0]
    (commit,) = [c for c in store.commits() if c.sequence == edit.commit]
    assert set(commit.replaces) == {before["r1"].mask_id, before["r2"].mask_id}
    # Superseded, not deleted: the snapshot before the edit still has the old rows.
    history = store.masks(as_of=first.commit)["mask_id"].to_pylist()
    assert {before["r1"].mask_id, before["r2"].mask_id} <= set(history)

    # Redrawn back to its first shape with the first time: the rows come back under new ids
    # (an id the store has hidden is never reused), still one per region.
    regions, lead = {"r1": m1, "r2": m2}, 20.0
    writer.update_annotation(
        annotation, [brush(project, m1, "r1"), brush(project, m2, "r2")], lead_time_s=lead
    )
    back, restored = reconcile_and_read()
    assert (back.added, back.replaced, back.removed) == (0, 2, 1)
    assert restored["r1"].mask_id not in {before["r1"].mask_id, after["r1"].mask_id}
    assert reconcile_project(writer, store, project.id).commit is None


def decoded(record: MaskRecord) -> np.ndarray:
    return rle.decode([record.segmentation])[0]
