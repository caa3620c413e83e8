"""Issue 9, scenario 8: no secret reaches a log, a run record, an error or a repr.

Sentinel values stand in for the secrets: the Label Studio token (the test server's own, which
the run must use for real), the ML backend's basic-auth password and the AWS keys (moto takes
any). Two real rounds run with every logger at DEBUG:

- on S3 (moto): ``data-engine ls setup`` registers S3 images, gives Label Studio an S3 storage
  with this process's AWS keys and attaches the ML backend (served from the S3 store) with basic
  auth; a click goes Label Studio -> ML backend; ``data-engine ls pull`` reconciles;
- a stage-1 flow under Prefect with the Label Studio annotator: the token is in the flow's
  config parameter, people click through Label Studio and the authenticated ML backend.

Then every place a secret could surface is read back and searched: each log record (message,
arguments, exception text, every attribute), stdout and stderr, the CLI's output, the Prefect
flow run (parameters, states, task runs), the logs Prefect stored, persisted task results, the
text of deliberately provoked errors, and the reprs of the objects holding the secrets.

One exception, asserted as such: botocore's own DEBUG wire trace shows the AWS access key id (in
the SigV4 ``Authorization`` header) and the session token; neither signs a request without the
secret key, which appears nowhere. Nothing of ours logs them.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from typer.testing import CliRunner

from annotation_ui.client import LabelStudioClient, ProjectKey
from annotation_ui.ml_backend import build_app, running
from annotation_ui.settings import LabelStudioSettings, MlBackendSettings, load_settings
from flows.cli import build_app as build_cli
from storage.errors import DataEngineError
from storage.mask_store import MaskStore
from tests.annotation_ui.conftest import register_model, write_images
from tests.fixtures.label_studio import LabelStudioServer
from tests.fixtures.s3 import S3Root
from tests.flows.conftest import tiny_engine_data

pytestmark = [pytest.mark.label_studio, pytest.mark.slow, pytest.mark.timeout(900)]

H, W = 64, 96
ML_USER = "annotators"


class Secrets:
    """Sentinels, unique per test, and the environment that carries them."""

    def __init__(self, ls_token: str) -> None:
        tag = uuid.uuid4().hex[:12]
        self.ls_token = ls_token
        self.ml_password = f"mlpass-{tag}"
        self.aws_key_id = f"AKIA{tag.upper()}"
        self.aws_secret = f"awssecret-{tag}"
        self.aws_session = f"awssession-{tag}"
        self.wrong_token = f"wrongtoken-{tag}"
        self.wrong_password = f"wrongpass-{tag}"

    def all(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items()}

    def environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", self.ls_token)
        monkeypatch.setenv("BASIC_AUTH_USER", ML_USER)
        monkeypatch.setenv("BASIC_AUTH_PASS", self.ml_password)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", self.aws_key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", self.aws_secret)
        monkeypatch.setenv("AWS_SESSION_TOKEN", self.aws_session)
        # boto3's default session keeps the credentials it first read: start a fresh one.
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


class Capture(logging.Handler):
    """Every log record of the process, at DEBUG, as text: its message, exception and stack
    text, and all its attributes (arguments and ``extra`` fields included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []  # (logger name, text)
        self._formatter = logging.Formatter()
        self._records_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        parts = [record.getMessage(), repr(record.__dict__)]
        if record.exc_info:
            parts.append(self._formatter.formatException(record.exc_info))
        if record.stack_info:
            parts.append(record.stack_info)
        with self._records_lock:
            self.records.append((record.name, "\n".join(parts)))

    def into(self, found: Haystack) -> None:
        for name, text in self.records:
            found.add(f"log record of {name}", text)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[Capture]:
    """Every logger at DEBUG, each record captured, for the test; levels restored after."""
    # Prefect sets logging up once per process when prefect.main is first imported, replacing
    # the root's handlers: have that done before hooking in.
    import prefect.main  # noqa: F401

    capture = Capture()
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    levels = {lg: lg.level for lg in loggers}
    hooked = [lg for lg in loggers if lg is logging.getLogger() or not lg.propagate]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    for lg in hooked:
        lg.addHandler(capture)
    try:
        yield capture
    finally:
        for lg in hooked:
            lg.removeHandler(capture)
        for lg, level in levels.items():
            lg.setLevel(level)


class Haystack:
    """Everything gathered to be searched for the sentinels."""

    def __init__(self) -> None:
        self.texts: dict[str, list[str]] = {}

    def add(self, where: str, *texts: Any) -> None:
        self.texts.setdefault(where, []).extend(str(t) for t in texts)

    def output(self, *streams: str) -> None:
        """stdout/stderr, split into the log records a console handler printed (``12:00:00.000
        | DEBUG   | botocore.auth - ...`` and its continuation lines), each under its logger."""
        logger = "no logger"
        for line in "\n".join(streams).splitlines():
            start = _CONSOLE_RECORD.match(line)
            if start:
                logger = start.group(1)
            self.add(f"output line of {logger}", line)

    def error(self, where: str, err: BaseException) -> None:
        self.add(where, str(err), repr(err), "".join(traceback.format_exception(err)))

    def hits(self, secrets: Secrets) -> tuple[list[str], int]:
        """Where a sentinel was found, and how many of the tolerated botocore hits (module
        docstring) there were."""
        hits, tolerated = [], 0
        for where, texts in self.texts.items():
            for text in texts:
                for name, value in secrets.all().items():
                    if value not in text:
                        continue
                    wire_trace = where.startswith(
                        ("log record of botocore", "output line of botocore")
                    )
                    if wire_trace and name in _BOTOCORE_SHOWS:
                        tolerated += 1
                        continue
                    start = text.find(value)
                    hits.append(f"{name} in {where}: ...{text[max(0, start - 80) : start]}")
        return hits, tolerated

    @property
    def size(self) -> int:
        return sum(len(t) for texts in self.texts.values() for t in texts)


# The start of a record printed by Prefect's console handler; the group is the logger.
_CONSOLE_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| \w+ *\| ([\w.]+) - ")
# What botocore's DEBUG wire trace shows (module docstring).
_BOTOCORE_SHOWS = frozenset({"aws_key_id", "aws_session"})


def click(x_pct: float, y_pct: float) -> dict[str, Any]:
    return {
        "id": "k1",
        "from_name": "point",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "value": {"x": x_pct, "y": y_pct, "width": 0.6, "keypointlabels": ["object"]},
        "is_positive": True,
    }


def annotate_by_clicking(client: LabelStudioClient, backend_id: int, task_id: int) -> None:
    """What an annotator does in the UI: click, take the ML backend's mask, submit."""
    answer = client.predict_interactive(backend_id, task_id, {"result": [click(50, 50)]})
    assert "errors" not in answer, answer
    (region,) = answer["data"]["result"]
    region["origin"] = "prediction-changed"
    client.create_annotation(task_id, [region, click(50, 50)], lead_time_s=3.0)


def test_setup_ml_backend_and_pull_on_s3_leak_no_secret(
    label_studio: LabelStudioServer,
    s3_root: S3Root,
    tiny_model_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    captured: Capture,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    secrets = Secrets(label_studio.token)
    secrets.environment(monkeypatch)  # over s3_root's dummy keys: moto takes any
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    found = Haystack()
    folder = tmp_path / "png"
    write_images(folder, 2, seed=5, size=(H, W))
    s3 = boto3.client("s3", endpoint_url=s3_root.endpoint_url, region_name="us-east-1")
    for path in sorted(folder.glob("*.png")):
        s3.upload_file(str(path), s3_root.bucket, f"{s3_root.prefix}-images/{path.name}")
    store = MaskStore(s3_root.root, endpoint_url=s3_root.endpoint_url)
    register_model(store, tiny_model_factory())
    backend_settings = load_settings(
        MlBackendSettings, root=s3_root.root, endpoint_url=s3_root.endpoint_url
    )
    found.add("reprs", repr(backend_settings), backend_settings.model_dump_json())
    cli = CliRunner()
    with running(build_app(backend_settings)) as backend_url:
        setup_args = ["ls", "setup", "--root", s3_root.root, "--stage", "1"]
        setup_args += ["--images", f"s3://{s3_root.bucket}/{s3_root.prefix}-images"]
        setup_args += ["--endpoint-url", s3_root.endpoint_url, "--ls-s3-credentials"]
        setup_args += ["--ml-backend", backend_url, "--dataset", f"secrets-{uuid.uuid4().hex[:6]}"]
        setup = cli.invoke(build_cli(), setup_args)
        found.add("cli output", setup.output)
        assert setup.exit_code == 0, setup.output
        project_id = int(setup.stdout.strip().splitlines()[-1])

        settings = load_settings(LabelStudioSettings)
        found.add("reprs", repr(settings), settings.model_dump_json())
        with LabelStudioClient(settings) as client:
            found.add("reprs", repr(client))
            backend_id = client.attach_ml_backend(
                project_id, backend_url, basic_auth=(ML_USER, secrets.ml_password)
            )
            for task in client.iter_tasks(project_id):
                annotate_by_clicking(client, backend_id, int(task["id"]))
            # Label Studio refuses a backend with the wrong password: the error names neither.
            with pytest.raises(DataEngineError) as refused:
                client.attach_ml_backend(
                    project_id,
                    backend_url.replace("127.0.0.1", "localhost"),  # another backend entry
                    basic_auth=(ML_USER, secrets.wrong_password),
                )
            found.error("errors", refused.value)

        pull_args = ["ls", "pull", "--root", s3_root.root, "--project", str(project_id)]
        pull_args += ["--endpoint-url", s3_root.endpoint_url]
        pull = cli.invoke(build_cli(), pull_args)
        found.add("cli output", pull.output)
        assert pull.exit_code == 0 and "added 2," in pull.output, pull.output
        # A wrong token: the CLI fails with a message that does not repeat it.
        wrong = cli.invoke(
            build_cli(), pull_args, env={"LABEL_STUDIO_API_KEY": secrets.wrong_token}
        )
        found.add("cli output", wrong.output)
        assert wrong.exit_code != 0 and wrong.exception is not None
        found.error("errors", wrong.exception)
    assert len(store.mask_records(stage=1)) == 2

    # Settings that fail validation do not echo the secrets beside the bad value.
    for cls, values in [
        (LabelStudioSettings, {"url": "ftp://x", "api_key": secrets.ls_token}),
        (MlBackendSettings, {"root": "/x", "port": -1, "basic_auth_pass": secrets.ml_password}),
    ]:
        with pytest.raises(DataEngineError) as err:
            load_settings(cls, **values)
        found.error("errors", err.value)

    out = capfd.readouterr()
    found.output(out.out, out.err)
    captured.into(found)
    hits, botocore = found.hits(secrets)
    assert hits == []
    assert len(captured.records) > 100  # DEBUG really was on: the round logged plenty
    assert botocore > 0  # and the AWS keys really were used
    print(
        f"\nS3 round: {len(captured.records)} log records, {found.size} characters searched: "
        f"0 hits of {len(secrets.all())} sentinels ({botocore} in botocore's wire trace)"
    )


@pytest.fixture
def tiny_model_factory() -> Any:
    def make() -> Any:
        import torch

        from engine import build_sam

        torch.manual_seed(0)
        return build_sam("tiny")

    return make


class _People(threading.Thread):
    """Annotators: once the flow has tasked the round and attached the ML backend, click each
    task through Label Studio."""

    def __init__(self, settings: LabelStudioSettings, project_id: int, n: int):
        super().__init__(daemon=True)
        self.settings, self.project_id, self.n = settings, project_id, n
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with LabelStudioClient(self.settings) as client:
                deadline = time.monotonic() + 600
                tasks: list[dict[str, Any]] = []
                backends: list[dict[str, Any]] = []
                while (len(tasks) < self.n or not backends) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    tasks = list(client.iter_tasks(self.project_id))
                    backends = self._ml_backends()
                (backend,) = backends
                for task in tasks:
                    annotate_by_clicking(client, int(backend["id"]), int(task["id"]))
        except BaseException as err:  # reported by the test
            self.error = err

    def _ml_backends(self) -> list[dict[str, Any]]:
        answer = httpx.get(
            f"{self.settings.url}/api/ml/",
            params={"project": self.project_id},
            headers={"Authorization": f"Token {self.settings.token()}"},
        )
        answer.raise_for_status()
        return list(answer.json())


@pytest.mark.usefixtures("prefect_harness")
def test_a_stage1_flow_round_leaks_no_secret(
    label_studio: LabelStudioServer,
    tiny_model_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    captured: Capture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    from flows.annotators.factory import label_studio_annotator
    from flows.config import parse_config
    from flows.sources import prepare_source
    from flows.stages import stage1_assisted_manual

    started = time.time()
    secrets = Secrets(label_studio.token)
    secrets.environment(monkeypatch)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY")  # the flow takes the token from its config
    found = Haystack()
    root = Path(label_studio.document_root) / f"engine-{uuid.uuid4().hex[:8]}"
    dataset = f"secrets-{uuid.uuid4().hex[:6]}"
    store = MaskStore(str(root))
    with running(build_app(load_settings(MlBackendSettings, root=str(root)))) as backend_url:
        config = parse_config(
            tiny_engine_data(
                root,
                stage1={"rounds": 1, "images_per_round": 2},
                annotator={"kind": "label_studio"},
                label_studio={
                    "url": label_studio.url,
                    "token": secrets.ls_token,
                    "document_root": str(label_studio.document_root),
                    "dataset": dataset,
                    "ml_backend_url": backend_url,
                    "poll_interval_s": 0.5,
                    "timeout_s": 600.0,
                },
            )
        )
        found.add("reprs", repr(config), config.model_dump_json(), json.dumps(config.redacted()))
        # The team's set-up before the round: images, a first model, the project. The flow
        # attaches the ML backend, with its basic auth from the environment.
        prepare_source(store, config)
        register_model(store, tiny_model_factory())
        with closing(label_studio_annotator(config, store)) as annotator:
            found.add("reprs", repr(annotator.client), repr(annotator))
            project, _ = annotator.client.ensure_project(ProjectKey(dataset, 1, 0))
        people = _People(
            LabelStudioSettings(url=label_studio.url, api_key=secrets.ls_token), project.id, 2
        )
        people.start()
        state = stage1_assisted_manual(config, return_state=True)
        people.join(timeout=60)
    assert people.error is None, people.error
    assert state.is_completed(), state.message
    report = state.result()
    assert report.rounds[0].masks == 2
    found.add("flow result", report.model_dump_json())

    APILogHandler().flush()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        found.add("prefect flow run", run.model_dump_json(), json.dumps(run.parameters))
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        found.add("prefect task runs", *(t.model_dump_json() for t in task_runs))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        found.add("prefect logs", *(log.model_dump_json() for log in logs))
    assert run.parameters["config"]["label_studio"]["token"] == "**********"
    results = [
        p
        for p in Path(PREFECT_LOCAL_STORAGE_PATH.value()).rglob("*")
        if p.is_file() and p.stat().st_mtime >= started
    ]
    found.add("persisted results", *(p.read_bytes().decode("latin-1") for p in results))

    out = capfd.readouterr()
    found.output(out.out, out.err)
    captured.into(found)
    hits, _ = found.hits(secrets)
    assert hits == []
    assert len(captured.records) > 100  # DEBUG really was on
    assert len(task_runs) >= 6 and len(logs) >= 5 and len(results) >= 2
    print(
        f"\nflow round: {len(captured.records)} log records, {len(logs)} Prefect logs, "
        f"{len(task_runs)} task runs, {len(results)} persisted results, {found.size} "
        f"characters searched: 0 hits of {len(secrets.all())} sentinels"
    )
