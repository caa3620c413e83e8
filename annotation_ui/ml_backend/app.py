"""The ML backend web app, speaking Label Studio's ML backend protocol (Label Studio 1.23).

Routes (request and response shapes as Label Studio's ``ml/api_connector.py`` sends and reads):

- ``GET /health`` -> ``{"status": "UP", "model_version"}``; never needs credentials (Label
  Studio's own health check sends none first, and container health checks need it).
- ``POST /setup`` ``{"project": "<id>.<created>", "schema": <label config XML>, "hostname",
  "access_token", "extra_params"}`` -> ``{"model_version"}``. Label Studio gives it 3 s, so the
  model is loaded at start-up, not here. The access token is never logged or kept.
- ``POST /predict`` ``{"tasks": [...], "project", "label_config", "params": {"context"}}`` ->
  ``{"results": [{"result": [brush regions], "score", "model_version"}, ...]}``: interactive
  when ``params.context.result`` holds the annotator's clicks/boxes (one task), batch
  pre-annotation otherwise (one prediction per task, in order).
- ``POST /webhook`` ``{"action": "ANNOTATION_CREATED", ...}`` -> 201: events are counted, and
  every ``retrain_every`` annotation events (or on ``START_TRAINING``) ``on_retrain`` is called.
- ``POST /train`` (Label Studio's older "Start training" call): asks for retraining too.
- ``GET /metrics``: requests, latencies, embedding cache, model swaps, webhook events.

With ``basic_auth`` set, every route but ``/health`` answers 401 without those credentials.
Errors come back as ``{"error": message}`` with 400 (bad prompts, tasks or request bodies), 404
(image not registered) or 503 (no model yet); a message names fields, never echoes their values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import BackgroundTasks, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from annotation_ui.labeling_config import LabelingSchema, parse_labeling_config
from annotation_ui.ml_backend.metrics import Metrics
from annotation_ui.ml_backend.models import ModelHolder, ModelSource, NoModelError
from annotation_ui.ml_backend.predict import BatchOptions, batch_prediction, interactive_prediction
from annotation_ui.ml_backend.responses import PredictionResponse
from engine.zoom_in import DEFAULT_ZOOM_IN, ZoomIn
from storage.errors import ConfigError, DataEngineError, InvalidInputError, NotFoundError
from storage.mask_store import MaskStore

__all__ = ["BackendOptions", "create_app"]

logger = logging.getLogger(__name__)

# Label Studio events that mean an annotation was submitted or changed.
_ANNOTATION_EVENTS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_UPDATED"}
)
_OPEN_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class BackendOptions:
    """Settings of :func:`create_app` (see ``annotation_ui.settings.MlBackendSettings``)."""

    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    cache_items: int = 64
    model_check_interval_s: float = 30.0
    batch: BatchOptions = field(default_factory=BatchOptions)
    retrain_every: int | None = None
    preload: bool = True
    zoom_in: ZoomIn | None = DEFAULT_ZOOM_IN


class PredictRequest(BaseModel):
    """Body of ``POST /predict``."""

    model_config = ConfigDict(extra="allow")

    tasks: list[dict[str, Any]] = Field(min_length=1)
    project: str | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = None


class SetupRequest(BaseModel):
    """Body of ``POST /setup`` (``access_token`` is accepted and dropped)."""

    model_config = ConfigDict(extra="allow")

    project: str | None = None
    schema_: str | None = Field(default=None, alias="schema")


class _State:
    """Everything the routes share, on ``app.state.backend``."""

    def __init__(
        self,
        holder: ModelHolder,
        store: MaskStore,
        options: BackendOptions,
        on_retrain: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.holder = holder
        self.store = store
        self.options = options
        self.on_retrain = on_retrain
        self.metrics = Metrics()
        self.schemas: dict[str, LabelingSchema] = {}
        self.project_schemas: dict[str, LabelingSchema] = {}
        self.annotations_since_retrain = 0
        self.lock = threading.Lock()

    def schema(self, label_config: str | None, project: str | None) -> LabelingSchema:
        """The labeling schema from the request's config, else the one /setup saw."""
        if label_config:
            digest = hashlib.sha256(label_config.encode("utf-8")).hexdigest()
            if digest not in self.schemas:
                self.schemas[digest] = parse_labeling_config(label_config)
            schema = self.schemas[digest]
            if project:
                self.project_schemas[project] = schema
            return schema
        if project and project in self.project_schemas:
            return self.project_schemas[project]
        raise InvalidInputError("request has no label_config and /setup was not called for it")


def create_app(
    source: ModelSource,
    store: MaskStore,
    *,
    options: BackendOptions | None = None,
    on_retrain: Callable[[dict[str, Any]], None] | None = None,
) -> FastAPI:
    """Build the ML backend app serving ``source``'s model on images of ``store``.

    ``on_retrain`` receives ``{"reason", "annotation_events", "project"}`` when retraining is
    due; it runs after the response is sent.
    """
    options = options or BackendOptions()
    holder = ModelHolder(
        source,
        store=store,
        cache_items=options.cache_items,
        check_interval_s=options.model_check_interval_s,
        zoom_in=options.zoom_in,
    )
    state = _State(holder, store, options, on_retrain)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if options.preload:
            try:
                holder.get()
            except NoModelError:
                logger.warning("no model registered yet; /predict answers 503 until one is")
        yield

    app = FastAPI(title="sam-data-engine ML backend", lifespan=lifespan)
    app.state.backend = state

    @app.middleware("http")
    async def auth_and_timing(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if (
            options.basic_auth is not None
            and request.url.path not in _OPEN_PATHS
            and not _authorized(request.headers.get("authorization"), options.basic_auth)
        ):
            return JSONResponse(
                {"error": "authentication required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="ml-backend"'},
            )
        start = time.perf_counter()
        response = await call_next(request)
        state.metrics.observe(
            request.url.path, time.perf_counter() - start, error=response.status_code >= 400
        )
        return response

    @app.exception_handler(DataEngineError)
    async def engine_error(request: Request, err: DataEngineError) -> JSONResponse:
        status = 400
        if isinstance(err, NoModelError):
            status = 503
        elif isinstance(err, NotFoundError):
            status = 404
        elif not isinstance(err, InvalidInputError):
            status = 500
        return JSONResponse({"error": str(err)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 answer echoes the offending input, which can be a whole body
        # holding Label Studio's access token.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors()
        )
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=400)

    # /health and /metrics only read counters: served on the event loop, they answer at once
    # even when every worker thread is busy with clicks (Label Studio drops a backend whose
    # health check times out).
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": "SamDataEngine", "model_version": holder.version}

    @app.post("/setup")
    def setup(body: SetupRequest) -> dict[str, Any]:
        if body.schema_:
            try:
                schema = parse_labeling_config(body.schema_)
            except ConfigError as err:
                raise InvalidInputError(f"label config does not fit this backend: {err}") from None
            if body.project:
                state.project_schemas[body.project] = schema
        version = holder.version or holder.get().version
        return {"model_version": version}

    @app.post("/predict")
    def predict(body: PredictRequest) -> Response:
        schema = state.schema(body.label_config, body.project)
        model = holder.get()
        context = (body.params or {}).get("context")
        if isinstance(context, dict) and context.get("result"):
            result = interactive_prediction(model, store, schema, body.tasks[0], context)
            # A response, not a dict: FastAPI would walk every byte of the brush RLEs in Python.
            return PredictionResponse({"results": [result], "model_version": model.version})
        results = []
        for task in body.tasks:
            try:
                results.append(batch_prediction(model, store, schema, task, options.batch))
            except DataEngineError as err:
                # Label Studio pairs results with tasks by position: answer every task.
                logger.warning("no pre-annotation for task %s: %s", task.get("id"), err)
                state.metrics.observe("/predict:task", 0.0, error=True)
                results.append({"result": [], "score": 0.0, "model_version": model.version})
        return PredictionResponse({"results": results, "model_version": model.version})

    @app.post("/webhook", status_code=201)
    def webhook(event: dict[str, Any], background: BackgroundTasks) -> dict[str, Any]:
        action = str(event.get("action") or "UNKNOWN")
        state.metrics.event(action)
        project = event.get("project")
        project_id = project.get("id") if isinstance(project, dict) else project
        due = None
        with state.lock:
            if action in _ANNOTATION_EVENTS:
                state.annotations_since_retrain += 1
                every = options.retrain_every
                if every is not None and state.annotations_since_retrain >= every:
                    due = "annotation events"
            elif action == "START_TRAINING":
                due = "START_TRAINING"
            if due is not None:
                count = state.annotations_since_retrain
                state.annotations_since_retrain = 0
        if due is not None:
            _ask_retrain(state, background, due, count, project_id)
        return {"status": "ok", "action": action, "retrain": due is not None}

    @app.post("/train", status_code=201)
    def train(background: BackgroundTasks) -> dict[str, Any]:
        with state.lock:
            count = state.annotations_since_retrain
            state.annotations_since_retrain = 0
        _ask_retrain(state, background, "train request", count, None)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        snapshot = state.metrics.snapshot()
        loaded = holder._loaded
        snapshot["model_version"] = holder.version
        snapshot["model_swaps"] = holder.swaps
        if loaded is not None:
            stats = loaded.cache.stats
            snapshot["embedding_cache"] = {
                "items": len(loaded.cache),
                "max_items": loaded.cache.max_items,
                "memory_hits": stats.memory_hits,
                "store_hits": stats.store_hits,
                "computed": stats.computed,
            }
        snapshot["annotations_since_retrain"] = state.annotations_since_retrain
        return snapshot

    return app


def _ask_retrain(
    state: _State, background: BackgroundTasks, reason: str, count: int, project: Any
) -> None:
    if state.on_retrain is None:
        return
    callback = state.on_retrain
    info = {"reason": reason, "annotation_events": count, "project": project}

    def run() -> None:
        state.metrics.retrain_requests += 1
        try:
            callback(info)
        except Exception as err:  # a failed trigger must not take the backend down
            state.metrics.retrain_failures += 1
            logger.error("retrain trigger failed: %s", err)

    background.add_task(run)


def _authorized(header: str | None, expected: tuple[str, str]) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user, sep, password = decoded.partition(":")
    if not sep:
        return False
    # Compare both in constant time so neither leaks through timing.
    ok_user = secrets.compare_digest(user.encode(), expected[0].encode())
    ok_pass = secrets.compare_digest(password.encode(), expected[1].encode())
    return ok_user and ok_pass
