"""Run the ML backend from validated settings (what ``data-engine ml-backend`` calls)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI

from annotation_ui.ml_backend.app import BackendOptions, create_app
from annotation_ui.ml_backend.models import RegistryModelSource
from annotation_ui.settings import MlBackendSettings
from engine.zoom_in import DEFAULT_ZOOM_IN

__all__ = ["build_app", "retrain_poster", "running", "serve"]

logger = logging.getLogger(__name__)


def build_app(settings: MlBackendSettings) -> FastAPI:
    """The app for ``settings``: the store's registry as model source, retraining by URL."""
    from storage.mask_store import MaskStore

    store = MaskStore(settings.root, endpoint_url=settings.endpoint_url)
    options = BackendOptions(
        basic_auth=settings.basic_auth,
        cache_items=settings.embedding_cache_items,
        model_check_interval_s=settings.model_check_interval_s,
        retrain_every=settings.retrain_every,
        zoom_in=DEFAULT_ZOOM_IN if settings.zoom_in else None,
    )
    on_retrain = retrain_poster(settings.retrain_url) if settings.retrain_url else None
    return create_app(
        RegistryModelSource(store, settings.model), store, options=options, on_retrain=on_retrain
    )


def retrain_poster(url: str, *, timeout_s: float = 10.0) -> Callable[[dict[str, Any]], None]:
    """A retrain trigger that POSTs the request as JSON to ``url`` (e.g. a Prefect deployment's
    ``create_flow_run`` endpoint); a non-2xx answer raises."""
    import httpx

    def post(info: dict[str, Any]) -> None:
        response = httpx.post(url, json={"parameters": {}, "context": info}, timeout=timeout_s)
        response.raise_for_status()
        logger.info("asked for retraining at %s (%s)", url, info["reason"])

    return post


def serve(settings: MlBackendSettings) -> None:
    """Serve until interrupted (uvicorn, one process: the model and caches live in it)."""
    import uvicorn

    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level="info")


@contextmanager
def running(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yield its base URL; stop on exit.

    ``port=0`` takes a free port. For tests, benchmarks and in-process annotation loops that need
    a real HTTP server (Label Studio must be able to call it).
    """
    import uvicorn

    if port == 0:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name=f"ml-backend:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the ML backend did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
