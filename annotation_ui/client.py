"""Our layer over ``label-studio-sdk`` 2.x: the few Label Studio calls the engine makes.

Everything returned is plain Python (dicts, dataclasses), whatever pydantic models the SDK uses.
Every failure becomes an :class:`~storage.errors.AnnotationError` whose message names the call,
the HTTP status and Label Studio's own explanation, and never the token or a session cookie (the
SDK's ``ApiError`` text includes response headers, so it is never shown as is).

Retries: the SDK retries 5xx, 408, 409, 429 and dropped connections ``max_retries`` times with
exponential back-off; what still fails is an error here, a :class:`LabelStudioUnavailableError`
(an :class:`AnnotationError`) when Label Studio did not answer or answered 5xx, 408 or 429, so a
caller that can wait (a round waiting for people) tells an outage from a refusal.

Projects are keyed by (dataset, stage, round): :meth:`LabelStudioClient.ensure_project` finds the
project by its title and the machine-readable marker line in its description, or creates it, so
set-up can run any number of times.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, overload

import httpx

from annotation_ui.labeling_config import LabelingSchema, labeling_config, parse_labeling_config
from annotation_ui.settings import LabelStudioSettings
from storage.errors import AnnotationError, ConfigError

__all__ = ["LabelStudioClient", "LabelStudioUnavailableError", "Project", "ProjectKey"]

T = TypeVar("T")
_MARKER = "sam-data-engine:"
_ML_TITLE = "sam-data-engine"
_IMPORT_BATCH = 500
# Label Studio's own limit (PROJECT_TITLE_MAX_LEN).
_TITLE_MAX = 50


# Answers that say "not now" rather than "no": worth asking again later.
_UNAVAILABLE = frozenset({408, 429})


class LabelStudioUnavailableError(AnnotationError):
    """Label Studio did not answer, or answered 5xx, 408 or 429, after the retries."""


@dataclass(frozen=True)
class ProjectKey:
    """What a Label Studio project holds: one round of one stage of one dataset."""

    dataset: str
    stage: int
    round: int

    @property
    def title(self) -> str:
        """The project's title (at most 50 characters, Label Studio's limit)."""
        title = f"SAM {self.dataset[:20]} stage {self.stage} round {self.round}"
        return title[:_TITLE_MAX]

    def description(self) -> str:
        """Human text plus the marker line :meth:`from_description` reads back."""
        what = {1: "assisted-manual", 2: "semi-automatic"}.get(self.stage, "")
        marker = json.dumps(
            {"dataset": self.dataset, "stage": self.stage, "round": self.round}, sort_keys=True
        )
        return f"SAM data engine, {what} stage {self.stage}, round {self.round}.\n{_MARKER}{marker}"

    @classmethod
    def from_description(cls, description: str | None) -> ProjectKey | None:
        """The key in a description written by :meth:`description`, or None."""
        for line in (description or "").splitlines():
            if line.startswith(_MARKER):
                try:
                    data = json.loads(line[len(_MARKER) :])
                    return cls(str(data["dataset"]), int(data["stage"]), int(data["round"]))
                except (ValueError, KeyError, TypeError):
                    return None
        return None


@dataclass(frozen=True)
class Project:
    """A Label Studio project of the engine.

    ``uid`` is ``<id>.<creation unix time>``, the form Label Studio sends ML backends; unlike the
    bare id it does not repeat if the project is deleted and Label Studio reinstalled.
    """

    id: int
    key: ProjectKey
    schema: LabelingSchema
    uid: str


class LabelStudioClient:
    """The engine's Label Studio calls.

    Args:
        settings: URL, token, timeouts.
        httpx_client: the HTTP client the SDK uses; tests pass one with a transport that
            injects failures (a seam, not a mock: requests still reach the real server).
    """

    def __init__(
        self, settings: LabelStudioSettings, *, httpx_client: httpx.Client | None = None
    ) -> None:
        from label_studio_sdk import LabelStudio

        self.settings = settings
        self.url = settings.url
        self._http = httpx_client or httpx.Client(timeout=settings.timeout_s, follow_redirects=True)
        self._sdk = LabelStudio(
            base_url=settings.url,
            api_key=settings.token(),
            timeout=settings.timeout_s,
            max_retries=settings.max_retries,
            httpx_client=self._http,
        )
        self._users: dict[int, str] = {}

    def __repr__(self) -> str:
        return f"LabelStudioClient({self.url!r})"

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections (also done by ``with LabelStudioClient(...)``)."""
        self._http.close()

    # -------------------------------------------------------------------------------- projects

    def whoami(self) -> str:
        """The token's user e-mail; checks that Label Studio answers and accepts the token."""
        user = self._call("check the token", self._sdk.users.whoami)
        return str(_plain(user).get("email") or _plain(user).get("username") or "")

    def ensure_project(
        self, key: ProjectKey, *, classes: Sequence[str] | None = None
    ) -> tuple[Project, bool]:
        """Find the project for ``key`` or create it with the stage's labeling config.

        Returns ``(project, created)``. Stage-2 projects show predictions to annotators
        (``show_collab_predictions``). Raises :class:`ConfigError` for a stage without a config.
        """
        candidates: list[Any] = self._call(
            "list projects", lambda: list(self._sdk.projects.list(title=key.title))
        )
        for candidate in candidates:
            data = _plain(candidate)
            if data.get("title") == key.title and ProjectKey.from_description(
                data.get("description")
            ) == (key):
                return self.project(int(data["id"])), False
        config = labeling_config(key.stage, tuple(classes) if classes else ("object",))
        created = self._call(
            "create a project",
            lambda: self._sdk.projects.create(
                title=key.title,
                description=key.description(),
                label_config=config,
                show_collab_predictions=key.stage == 2,
                # Stage 2 asks annotators to fix prefilled masks: start from the prediction.
                reveal_preannotations_interactively=False,
            ),
        )
        return self.project(int(_plain(created)["id"])), True

    def project(self, project_id: int) -> Project:
        """Read a project the engine created; :class:`AnnotationError` if it is not one."""
        data = _plain(self._call(f"read project {project_id}", self._sdk.projects.get, project_id))
        key = ProjectKey.from_description(data.get("description"))
        if key is None:
            raise AnnotationError(
                f"project {project_id} ({data.get('title')!r}) was not created by the engine: "
                f"its description has no {_MARKER!r} line"
            )
        try:
            schema = parse_labeling_config(str(data.get("label_config") or ""))
        except ConfigError as err:
            raise AnnotationError(f"project {project_id}: {err}") from None
        created = data.get("created_at")
        if isinstance(created, str):
            created = datetime.fromisoformat(created.replace("Z", "+00:00"))
        stamp = int(created.timestamp()) if isinstance(created, datetime) else 0
        return Project(id=project_id, key=key, schema=schema, uid=f"{project_id}.{stamp}")

    def set_model_version(self, project_id: int, model_version: str) -> None:
        """Show predictions of ``model_version`` to annotators (the project's model version)."""
        self._call(
            f"set project {project_id}'s model version",
            lambda: self._sdk.projects.update(project_id, model_version=model_version),
        )

    # ------------------------------------------------------------------------------- ML backend

    def attach_ml_backend(
        self,
        project_id: int,
        url: str,
        *,
        basic_auth: tuple[str, str] | None = None,
        timeout_s: float = 100.0,
    ) -> int:
        """Connect the ML backend at ``url`` for interactive predictions; reuse it if present.

        Label Studio checks ``/health`` and ``/setup`` before saving, and creates a webhook to
        ``<url>/webhook``; with ``basic_auth`` that webhook gets the same credentials, since
        Label Studio would otherwise post annotation events without them. Returns the ML
        backend's id.
        """
        url = url.rstrip("/")
        backend_id = self._find_ml_backend(project_id, url)
        if backend_id is None:
            auth: dict[str, Any] = {"auth_method": "NONE"}
            if basic_auth is not None:
                auth = {
                    "auth_method": "BASIC_AUTH",
                    "basic_auth_user": basic_auth[0],
                    "basic_auth_pass": basic_auth[1],
                }
            created = self._call(
                f"connect the ML backend to project {project_id}",
                lambda: self._sdk.ml.create(
                    project=project_id,
                    url=url,
                    title=_ML_TITLE,
                    is_interactive=True,
                    timeout=timeout_s,
                    **auth,
                ),
            )
            backend_id = int(_plain(created)["id"])
        if basic_auth is not None:
            self._authorize_webhook(project_id, f"{url}/webhook", basic_auth)
        return backend_id

    def _find_ml_backend(self, project_id: int, url: str) -> int | None:
        backends = self._call(
            f"list ML backends of project {project_id}",
            lambda: self._sdk.ml.list(project=project_id),
        )
        for backend in backends:
            data = _plain(backend)
            if str(data.get("url", "")).rstrip("/") == url:
                return int(data["id"])
        return None

    def predict_interactive(
        self, ml_backend_id: int, task_id: int, context: dict[str, Any]
    ) -> dict[str, Any]:
        """Ask Label Studio for an interactive prediction, as the labeling UI does on a click.

        Returns Label Studio's answer: ``{"data": {"result": [...], "score": .., ...}}`` or
        ``{"errors": [...]}``.
        """
        raw = self._call(
            f"interactive prediction for task {task_id}",
            lambda: self._sdk.ml.with_raw_response.predict_interactive(
                ml_backend_id, task=task_id, context=context
            ),
        )
        body = raw.response.json()
        if not isinstance(body, dict):
            raise AnnotationError(f"interactive prediction for task {task_id}: answer not a dict")
        return body

    def _authorize_webhook(self, project_id: int, url: str, basic_auth: tuple[str, str]) -> None:
        token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode("ascii")
        hooks = self._call(
            f"list webhooks of project {project_id}",
            lambda: self._sdk.webhooks.list(project=str(project_id)),
        )
        for hook in hooks:
            data = _plain(hook)
            if str(data.get("url", "")).rstrip("/") == url:
                self._call(
                    f"set the ML backend webhook's credentials (project {project_id})",
                    lambda data=data: self._sdk.webhooks.update(
                        int(data["id"]), headers={"Authorization": f"Basic {token}"}
                    ),
                )

    # ---------------------------------------------------------------------------------- storage

    def connect_local_storage(self, project_id: int, path: str) -> int:
        """Connect a local-files source storage at absolute ``path`` (no sync); reuse if present.

        Label Studio serves ``/data/local-files/?d=...`` only for files under such a storage.
        """
        storages = self._call(
            f"list local storages of project {project_id}",
            lambda: self._sdk.import_storage.local.list(project=project_id),
        )
        for storage in storages:
            data = _plain(storage)
            if str(data.get("path", "")).rstrip("/") == path.rstrip("/"):
                return int(data["id"])
        created = self._call(
            f"connect local storage {path} to project {project_id}",
            lambda: self._sdk.import_storage.local.create(
                project=project_id, path=path, title="images", use_blob_urls=True
            ),
        )
        return int(_plain(created)["id"])

    def connect_s3_storage(
        self,
        project_id: int,
        *,
        bucket: str,
        prefix: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        credentials: tuple[str, str] | None = None,
        presign_ttl_min: int = 60,
    ) -> int:
        """Connect an S3 source storage (no sync) so Label Studio presigns ``s3://`` task URLs.

        ``endpoint_url`` is for MinIO or another S3-compatible server, as Label Studio reaches
        it. ``credentials`` is (access key id, secret); None leaves them to Label Studio's own
        environment. Reused when a storage on the same bucket and prefix exists.
        """
        storages = self._call(
            f"list S3 storages of project {project_id}",
            lambda: self._sdk.import_storage.s3.list(project=project_id),
        )
        for storage in storages:
            data = _plain(storage)
            if data.get("bucket") == bucket and (data.get("prefix") or "") == prefix:
                return int(data["id"])
        options: dict[str, Any] = {}
        if endpoint_url:
            options["s3endpoint"] = endpoint_url
        if region:
            options["region_name"] = region
        if credentials is not None:
            options["aws_access_key_id"], options["aws_secret_access_key"] = credentials
        created = self._call(
            f"connect S3 storage s3://{bucket}/{prefix} to project {project_id}",
            lambda: self._sdk.import_storage.s3.create(
                project=project_id,
                bucket=bucket,
                prefix=prefix,
                presign=True,
                presign_ttl=presign_ttl_min,
                use_blob_urls=True,
                title="images",
                **options,
            ),
        )
        return int(_plain(created)["id"])

    # -------------------------------------------------------------------------- tasks, results

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Create tasks (each ``{"data": {...}}``) in batches; returns their ids in order."""
        ids: list[int] = []
        for start in range(0, len(tasks), _IMPORT_BATCH):
            batch = list(tasks[start : start + _IMPORT_BATCH])
            answer = _plain(
                self._call(
                    f"import {len(batch)} tasks into project {project_id}",
                    lambda batch=batch: self._sdk.projects.import_tasks(
                        project_id, request=batch, return_task_ids=True
                    ),
                )
            )
            got = [int(t) for t in answer.get("task_ids") or []]
            if len(got) != len(batch):
                raise AnnotationError(
                    f"import into project {project_id}: sent {len(batch)} tasks, Label Studio "
                    f"reported {len(got)} task ids"
                )
            ids.extend(got)
        return ids

    def import_predictions(self, project_id: int, predictions: Sequence[dict[str, Any]]) -> int:
        """Create predictions (``{"task", "result", "score", "model_version"}``) in batches."""
        created = 0
        for start in range(0, len(predictions), _IMPORT_BATCH):
            batch = list(predictions[start : start + _IMPORT_BATCH])
            answer = _plain(
                self._call(
                    f"import {len(batch)} predictions into project {project_id}",
                    lambda batch=batch: self._sdk.projects.import_predictions(
                        project_id, request=batch
                    ),
                )
            )
            created += int(answer.get("created") or len(batch))
        return created

    def iter_tasks(self, project_id: int, *, page_size: int | None = None) -> Iterator[dict]:
        """Every task of the project with its annotations and predictions, page by page.

        Raises :class:`AnnotationError` if a page cannot be read after the retries or if fewer
        tasks came back than Label Studio counted (a read cut short is never taken as the
        whole project).
        """
        size = page_size or self.settings.page_size
        seen: set[int] = set()
        total: int | None = None
        page = 1
        while True:
            pager: Any = self._call(
                f"read page {page} of project {project_id}'s tasks",
                lambda page=page: self._sdk.tasks.list(
                    project=project_id, page=page, page_size=size, fields="all"
                ),
                # Label Studio answers 404 for a page past the last one.
                missing_ok=page > 1,
            )
            if pager is None:
                break
            response = _plain(pager.response)
            if total is None:
                total = int(response.get("total") or 0)
            items = [_plain(t) for t in pager.items or []]
            if not items:
                break
            for task in items:
                if int(task["id"]) not in seen:
                    seen.add(int(task["id"]))
                    yield task
            if len(seen) >= total:
                break
            page += 1
        if total is not None and len(seen) < total:
            raise AnnotationError(
                f"read {len(seen)} of {total} tasks of project {project_id}; Label Studio "
                "stopped answering pages early, nothing taken from this read"
            )

    def task_image_ids(self, project_id: int) -> dict[str, int]:
        """``image_id -> task id`` for the project's tasks that carry one."""
        out: dict[str, int] = {}
        for task in self.iter_tasks(project_id):
            image_id = (task.get("data") or {}).get("image_id")
            if isinstance(image_id, str):
                out.setdefault(image_id, int(task["id"]))
        return out

    def create_annotation(
        self,
        task_id: int,
        result: list[dict[str, Any]],
        *,
        lead_time_s: float | None = None,
        parent_prediction: int | None = None,
    ) -> int:
        """Save an annotation on a task the way the labeling UI submits one; returns its id."""
        extra: dict[str, Any] = {}
        if lead_time_s is not None:
            extra["lead_time"] = lead_time_s
        if parent_prediction is not None:
            extra["parent_prediction"] = parent_prediction
        created = self._call(
            f"annotate task {task_id}",
            lambda: self._sdk.annotations.create(task_id, result=result, **extra),
        )
        return int(_plain(created)["id"])

    def update_annotation(
        self, annotation_id: int, result: list[dict[str, Any]], *, lead_time_s: float | None
    ) -> None:
        """Replace an annotation's result, as the UI's "Update" button does."""
        extra = {"lead_time": lead_time_s} if lead_time_s is not None else {}
        self._call(
            f"update annotation {annotation_id}",
            lambda: self._sdk.annotations.update(annotation_id, result=result, **extra),
        )

    def user_name(self, user_id: int) -> str:
        """The e-mail of a Label Studio user (cached); ``user:<id>`` for a deleted user.

        Any other failure raises :class:`AnnotationError`: a placeholder taken during an outage
        would be stored as the annotator for good.
        """
        if user_id not in self._users:
            user = self._call(f"read user {user_id}", self._sdk.users.get, user_id, missing_ok=True)
            email = _plain(user).get("email") if user is not None else None
            self._users[user_id] = str(email or f"user:{user_id}")
        return self._users[user_id]

    # -------------------------------------------------------------------------------- private

    @overload
    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T: ...

    @overload
    def _call(self, what: str, fn: Callable[..., T], *args: Any, missing_ok: bool) -> T | None: ...

    def _call(
        self, what: str, fn: Callable[..., T], *args: Any, missing_ok: bool = False
    ) -> T | None:
        """Run one SDK call; errors become :class:`AnnotationError` (None on 404 if missing_ok)."""
        from label_studio_sdk.core.api_error import ApiError

        try:
            return fn(*args)
        except ApiError as err:
            if missing_ok and err.status_code == 404:
                return None
            status = err.status_code or 0
            error = (
                LabelStudioUnavailableError
                if status >= 500 or status in _UNAVAILABLE
                else AnnotationError
            )
            raise error(_api_message(what, self.url, err)) from None
        except httpx.HTTPError as err:
            raise LabelStudioUnavailableError(
                f"Label Studio at {self.url} did not answer ({type(err).__name__}) "
                f"when trying to {what}"
            ) from None


def _api_message(what: str, url: str, err: Any) -> str:
    status = err.status_code
    if status == 401:
        return f"Label Studio at {url} rejected the API token (401) when trying to {what}"
    if status == 403:
        return f"Label Studio at {url} refused (403) to {what}: the token's user lacks permission"
    body = err.body
    if isinstance(body, dict):
        detail = body.get("validation_errors") or body.get("detail") or body.get("errors") or body
        text = json.dumps(detail, default=str)
    else:
        text = str(body)
    return f"Label Studio at {url} answered {status} when trying to {what}: {text[:400]}"


def _plain(obj: Any) -> dict[str, Any]:
    """A dict from an SDK pydantic model or a dict (the SDK returns both)."""
    if isinstance(obj, dict):
        return obj
    dump = getattr(obj, "model_dump", None)
    if dump is not None:
        return dict(dump())
    raise AnnotationError(f"unexpected object from label-studio-sdk: {type(obj).__name__}")
