"""Build the configured annotator (simulated or Label Studio) from the engine config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flows.annotators.simulated import SimulatedAnnotator, TimeModel

if TYPE_CHECKING:
    from annotation_ui.client import LabelStudioClient
    from flows.annotators.base import Annotator
    from flows.annotators.label_studio import LabelStudioAnnotator
    from flows.config import EngineConfig
    from storage.mask_store import MaskStore

__all__ = ["label_studio_annotator", "label_studio_client", "make_annotator"]


def make_annotator(config: EngineConfig, store: MaskStore) -> Annotator:
    """The annotator ``config.annotator.kind`` names, reading from (and writing to) ``store``."""
    if config.annotator.kind == "label_studio":
        return label_studio_annotator(config, store)
    from flows.sources import load_pool_ground_truth

    a = config.annotator
    return SimulatedAnnotator(
        store,
        load_pool_ground_truth(store, config),
        iou_target=a.iou_target,
        click_budget=a.click_budget,
        time_model=TimeModel(
            seconds_per_object=a.seconds_per_object,
            seconds_per_click=a.seconds_per_click,
            brush_seconds=a.brush_seconds,
            accept_seconds=a.accept_seconds,
            reject_seconds=a.reject_seconds,
        ),
        image_budget_s=a.image_budget_s,
        move_on_after_s=a.move_on_after_s,
        fix_iou=a.fix_iou,
        name=a.name,
    )


def label_studio_client(config: EngineConfig) -> LabelStudioClient:
    """A client for ``config.label_studio``; the token falls back to ``LABEL_STUDIO_API_KEY``."""
    from annotation_ui.client import LabelStudioClient
    from annotation_ui.settings import LabelStudioSettings, load_settings

    ls = config.label_studio
    settings = load_settings(
        LabelStudioSettings,
        url=ls.url,
        api_key=ls.token.get_secret_value() if ls.token is not None else None,
        document_root=Path(ls.document_root) if ls.document_root else None,
    )
    return LabelStudioClient(settings)


def label_studio_annotator(config: EngineConfig, store: MaskStore) -> LabelStudioAnnotator:
    """People in the Label Studio of ``config.label_studio``.

    The ML backend's basic-auth credentials come from ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``,
    the variables the backend itself reads (as for ``data-engine ls setup``): they never travel
    as flow parameters.
    """
    from annotation_ui.settings import MlBackendSettings, load_settings
    from annotation_ui.tasks import S3Access
    from flows.annotators.label_studio import LabelStudioAnnotator

    ls = config.label_studio
    backend_auth = None
    if ls.ml_backend_url:
        backend_auth = load_settings(MlBackendSettings, root=config.root).basic_auth
    client = label_studio_client(config)
    return LabelStudioAnnotator(
        store,
        client,
        dataset=ls.dataset,
        document_root=client.settings.document_root,
        s3=S3Access(endpoint_url=config.endpoint_url) if config.endpoint_url else None,
        ml_backend_url=ls.ml_backend_url,
        ml_backend_auth=backend_auth,
        poll_interval_s=ls.poll_interval_s,
        timeout_s=ls.timeout_s,
    )
