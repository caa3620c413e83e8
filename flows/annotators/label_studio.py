"""Annotation by people in Label Studio, behind the :class:`~flows.annotators.base.Annotator` API.

One round is one Label Studio project (keyed by dataset, stage and round, so a rerun finds the
same project): the round's images become tasks (stage 2: with the model's masks as predictions
to correct), then the annotator waits, polling every ``poll_interval_s`` seconds, until every task
of the round has a submitted annotation, and reconciles them into the store with
:func:`annotation_ui.reconcile.reconcile_project` (which commits, so an annotation edited later
replaces its older version). A Label Studio that is down or restarting while the round waits is
asked again at the next poll (people's work is safe in it); after ``timeout_s`` it stops with an
:class:`~storage.errors.AnnotationError`; running the round again resumes: the project, its tasks
and the annotations already made are reused, nothing is imported twice.

Unlike the simulated annotator, the masks are committed by the reconcile itself; ``annotate``
returns them as read back from the store, so the flow's own commit of them finds nothing new.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flows.annotators.base import Annotator
from storage.errors import AnnotationError

if TYPE_CHECKING:
    from torch import nn

    from annotation_ui.client import LabelStudioClient
    from annotation_ui.tasks import S3Access
    from storage.mask_store import ImageRecord, MaskRecord, MaskStore

__all__ = ["LabelStudioAnnotator", "RoundProgress"]

_log = logging.getLogger(__name__)


class RoundProgress:
    """How many of a round's tasks have a submitted (not cancelled) annotation."""

    def __init__(self, project_id: int, finished: int, total: int) -> None:
        self.project_id = project_id
        self.finished = finished
        self.total = total

    @property
    def done(self) -> bool:
        """Whether every task is finished."""
        return self.finished >= self.total

    def __repr__(self) -> str:
        return f"RoundProgress(project={self.project_id}, {self.finished}/{self.total})"


class LabelStudioAnnotator(Annotator):
    """People annotating in Label Studio.

    Args:
        store: the mask store (images are read from it, masks reconciled into it).
        client: the Label Studio client (URL and token already set).
        dataset: the dataset name in project titles.
        document_root: Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT`` for local images.
        s3: how Label Studio reaches S3 images (endpoint, credentials), if they are on S3.
        ml_backend_url: the ML backend to attach to each project (interactive clicks).
        ml_backend_auth: the ML backend's basic-auth ``(user, password)``, if it has them.
        poll_interval_s: seconds between checks of the round's progress.
        timeout_s: seconds to wait for a round before failing (a rerun resumes).
        clock, sleep: time sources (tests pass faster ones).
    """

    name = "label_studio"

    def __init__(
        self,
        store: MaskStore,
        client: LabelStudioClient,
        *,
        dataset: str,
        document_root: Path | None = None,
        s3: S3Access | None = None,
        ml_backend_url: str | None = None,
        ml_backend_auth: tuple[str, str] | None = None,
        poll_interval_s: float = 10.0,
        timeout_s: float = 7 * 24 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.client = client
        self.dataset = dataset
        self.document_root = document_root
        self.s3 = s3
        self.ml_backend_url = ml_backend_url
        self._ml_backend_auth = ml_backend_auth
        self.poll_interval_s = float(poll_interval_s)
        self.timeout_s = float(timeout_s)
        self._clock = clock
        self._sleep = sleep

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()

    def check_reachable(self) -> str:
        """Ask Label Studio who the token belongs to; :class:`AnnotationError` naming the URL."""
        try:
            return self.client.whoami()
        except AnnotationError as err:
            raise AnnotationError(
                f"Label Studio at {self.client.url} is not usable: {err}"
            ) from None

    def annotate(
        self,
        images: Sequence[ImageRecord],
        model: nn.Module,
        *,
        stage: int,
        round: int,
        run_id: str,
        model_version: str,
        predictions: Mapping[str, Sequence[MaskRecord]] | None = None,
    ) -> list[MaskRecord]:
        """Set up the round's project, wait for people to finish it, reconcile; see the module."""
        from annotation_ui.client import ProjectKey
        from annotation_ui.reconcile import mask_id_prefix, reconcile_project
        from annotation_ui.tasks import setup_project

        key = ProjectKey(self.dataset, stage, round)
        setup = setup_project(
            self.client,
            key,
            images,
            document_root=self.document_root,
            s3=self.s3,
            ml_backend_url=self.ml_backend_url,
            ml_backend_auth=self._ml_backend_auth,
            predictions={k: list(v) for k, v in (predictions or {}).items() if v} or None,
            model_version=model_version,
        )
        project = setup.project
        _log.info(
            "Label Studio project %s (%s): %d tasks added, %d already there, %d predictions",
            project.id,
            key.title,
            setup.tasks_added,
            setup.tasks_present,
            setup.predictions_added,
        )
        self.wait_until_finished(project.id, [r.image_id for r in images])
        report = reconcile_project(self.client, self.store, project.id)
        for problem in report.problems:
            _log.warning("Label Studio project %s: %s (left out)", project.id, problem)
        prefix = mask_id_prefix(project)
        return [
            r
            for r in self.store.mask_records(stage=stage, round=round)
            if r.mask_id is not None and r.mask_id.startswith(prefix)
        ]

    def progress(self, project_id: int, image_ids: Sequence[str]) -> RoundProgress:
        """How many of ``image_ids``' tasks in the project have a submitted annotation."""
        wanted = set(image_ids)
        finished: set[str] = set()
        for task in self.client.iter_tasks(project_id):
            image_id = (task.get("data") or {}).get("image_id")
            if image_id not in wanted:
                continue
            if any(not a.get("was_cancelled") for a in task.get("annotations") or []):
                finished.add(image_id)
        return RoundProgress(project_id, len(finished), len(wanted))

    def wait_until_finished(self, project_id: int, image_ids: Sequence[str]) -> RoundProgress:
        """Poll until every task of the round is annotated; :class:`AnnotationError` on timeout.

        A poll that finds Label Studio down or answering 5xx is logged and tried again at the
        next interval; any other refusal (token, permissions, a deleted project) stops at once.
        """
        from annotation_ui.client import LabelStudioUnavailableError

        deadline = self._clock() + self.timeout_s
        while True:
            try:
                state: RoundProgress | None = self.progress(project_id, image_ids)
            except LabelStudioUnavailableError as err:
                state, outage = None, err
            if state is not None and state.done:
                return state
            if self._clock() >= deadline:
                done = f"{state.finished} of {state.total}" if state else "an unknown number of"
                raise AnnotationError(
                    f"Label Studio at {self.client.url}: project {project_id} has {done} tasks "
                    f"annotated after {self.timeout_s:.0f} s; run the round again to keep "
                    "waiting (the project and the annotations made so far are kept)"
                )
            if state is None:
                _log.warning(
                    "Label Studio project %s: progress unknown, will ask again: %s",
                    project_id,
                    outage,
                )
            else:
                _log.info(
                    "waiting for Label Studio project %s: %d/%d tasks annotated",
                    project_id,
                    state.finished,
                    state.total,
                )
            self._sleep(min(self.poll_interval_s, max(0.0, deadline - self._clock())))
