"""`data-engine ls setup|pull` (Label Studio projects) and `data-engine ml-backend`.

The Label Studio token comes from ``LABEL_STUDIO_API_KEY`` or a file (``--token-file`` or
``LABEL_STUDIO_API_KEY_FILE``); it is never printed or put in an error message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from storage.mask_store import ImageRecord, MaskRecord, MaskStore

_ROOT = typer.Option("--root", help="Store root: a folder or s3://bucket/prefix.")
_URL = typer.Option("--url", envvar="LABEL_STUDIO_URL", help="Label Studio base URL.")
_TOKEN_FILE = typer.Option(
    "--token-file",
    envvar="LABEL_STUDIO_API_KEY_FILE",
    help="File holding the Label Studio token (else LABEL_STUDIO_API_KEY).",
)
_ENDPOINT = typer.Option(
    "--endpoint-url",
    envvar="AWS_ENDPOINT_URL",
    help="S3-compatible endpoint (MinIO, moto); credentials come from the AWS settings.",
)

ls_app = typer.Typer(
    name="ls", help="Label Studio projects: set up tasks, pull annotations.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add `ls setup`, `ls pull` and `ml-backend` to the `data-engine` app."""
    app.add_typer(ls_app)
    app.command("ml-backend")(ml_backend)


@ls_app.command("setup")
def setup(
    root: Annotated[str, _ROOT],
    url: Annotated[str, _URL],
    stage: Annotated[int, typer.Option("--stage", min=1, max=2, help="1 or 2.")],
    images: Annotated[
        str | None,
        typer.Option("--images", help="Folder or s3:// prefix: register these and task them."),
    ] = None,
    round_: Annotated[int, typer.Option("--round", min=0, help="Round within the stage.")] = 0,
    ml_backend: Annotated[
        str | None, typer.Option("--ml-backend", help="ML backend URL to connect.")
    ] = None,
    classes: Annotated[
        str, typer.Option("--classes", help="Comma-separated class names.")
    ] = "object",
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Dataset name in the project title.")
    ] = None,
    document_root: Annotated[
        Path | None,
        typer.Option(
            "--document-root",
            envvar="LOCAL_FILES_DOCUMENT_ROOT",
            help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT (local image folders lie under it).",
        ),
    ] = None,
    predictions_run: Annotated[
        str | None,
        typer.Option(
            "--predictions-run",
            help="Stage 2: import the store's masks of this run as predictions.",
        ),
    ] = None,
    ls_s3_endpoint: Annotated[
        str | None,
        typer.Option(
            "--ls-s3-endpoint",
            help="S3 endpoint as Label Studio reaches it (default: --endpoint-url).",
        ),
    ] = None,
    ls_s3_credentials: Annotated[
        bool,
        typer.Option(
            "--ls-s3-credentials/--no-ls-s3-credentials",
            help="Give Label Studio's S3 storage this process's AWS keys (default: its own).",
        ),
    ] = False,
    token_file: Annotated[Path | None, _TOKEN_FILE] = None,
    endpoint_url: Annotated[str | None, _ENDPOINT] = None,
) -> None:
    """Create or reuse the Label Studio project of a stage and round, task its images, print
    the project id."""
    from annotation_ui.client import LabelStudioClient, ProjectKey
    from annotation_ui.settings import LabelStudioSettings, MlBackendSettings, load_settings
    from annotation_ui.tasks import S3Access, setup_project
    from flows.sources import dataset_id
    from storage.export import import_dataset
    from storage.mask_store import MaskStore

    settings = load_settings(
        LabelStudioSettings, url=url, api_key_file=token_file, document_root=document_root
    )
    store = MaskStore(root, endpoint_url=endpoint_url)
    if images is not None:
        import_dataset(store, images, endpoint_url=endpoint_url)
        records = [r for r in store.images() if _under(r.uri, images)]
    else:
        records = store.images(split="pool")
    predictions, model_version = _predictions(store, predictions_run, records)
    credentials = None
    if ls_s3_credentials:
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            credentials = (key, secret)
    backend_auth = load_settings(MlBackendSettings, root=root).basic_auth if ml_backend else None
    with LabelStudioClient(settings) as client:
        report = setup_project(
            client,
            ProjectKey(dataset or dataset_id(store), stage, round_),
            records,
            classes=[c.strip() for c in classes.split(",") if c.strip()],
            document_root=settings.document_root,
            s3=S3Access(ls_s3_endpoint or endpoint_url, None, credentials),
            ml_backend_url=ml_backend,
            ml_backend_auth=backend_auth,
            predictions=predictions,
            model_version=model_version,
        )
    typer.echo(
        f"project {report.project.id} ({'created' if report.created else 'reused'}): "
        f"{report.tasks_added} tasks added, {report.tasks_present} already there, "
        f"{report.predictions_added} predictions added",
        err=True,
    )
    typer.echo(report.project.id)


@ls_app.command("pull")
def pull(
    root: Annotated[str, _ROOT],
    url: Annotated[str, _URL],
    project: Annotated[int, typer.Option("--project", help="Label Studio project id.")],
    token_file: Annotated[Path | None, _TOKEN_FILE] = None,
    endpoint_url: Annotated[str | None, _ENDPOINT] = None,
) -> None:
    """Reconcile the project's submitted annotations into the store; print what changed.

    Exits with 1 when some annotations could not be used (they are listed; the rest is stored).
    """
    from annotation_ui.client import LabelStudioClient
    from annotation_ui.reconcile import reconcile_project
    from annotation_ui.settings import LabelStudioSettings, load_settings
    from storage.mask_store import MaskStore

    settings = load_settings(LabelStudioSettings, url=url, api_key_file=token_file)
    store = MaskStore(root, endpoint_url=endpoint_url)
    with LabelStudioClient(settings) as client:
        report = reconcile_project(client, store, project)
    typer.echo(
        f"added {report.added}, replaced {report.replaced}, unchanged {report.unchanged}, "
        f"removed {report.removed}, problems {len(report.problems)}"
    )
    for problem in report.problems:
        typer.echo(f"problem: {problem}", err=True)
    if report.problems:
        raise typer.Exit(1)


def ml_backend(
    root: Annotated[str, _ROOT],
    model: Annotated[
        str, typer.Option("--model", help="Model version to pin, or 'latest' (promoted).")
    ] = "latest",
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 9090,
    cache_items: Annotated[
        int, typer.Option("--cache-items", help="Image embeddings kept in memory.")
    ] = 64,
    retrain_every: Annotated[
        int | None, typer.Option("--retrain-every", help="Annotation events per retrain ask.")
    ] = None,
    retrain_url: Annotated[
        str | None, typer.Option("--retrain-url", help="URL to POST retrain requests to.")
    ] = None,
    zoom_in: Annotated[
        bool | None,
        typer.Option(
            "--zoom-in/--no-zoom-in",
            help="Answer clicks on small objects again on a crop around them (default: on).",
        ),
    ] = None,
    endpoint_url: Annotated[str | None, _ENDPOINT] = None,
) -> None:
    """Serve the Label Studio ML backend (basic auth from BASIC_AUTH_USER / BASIC_AUTH_PASS)."""
    from annotation_ui.ml_backend import serve
    from annotation_ui.settings import MlBackendSettings, load_settings

    settings = load_settings(
        MlBackendSettings,
        root=root,
        model=model,
        host=host,
        port=port,
        embedding_cache_items=cache_items,
        retrain_every=retrain_every,
        retrain_url=retrain_url,
        zoom_in=zoom_in,
        endpoint_url=endpoint_url,
    )
    serve(settings)


def _under(uri: str, source: str) -> bool:
    if source.startswith("s3://"):
        return uri.startswith(source.rstrip("/") + "/")
    folder = os.path.realpath(source)
    return os.path.commonpath([folder, os.path.realpath(uri)]) == folder


def _predictions(
    store: MaskStore, run_id: str | None, records: Sequence[ImageRecord]
) -> tuple[dict[str, list[MaskRecord]] | None, str | None]:
    """The store's masks of ``run_id`` on ``records``' images, and their model version."""
    if run_id is None:
        return None, None
    from storage.errors import ConfigError

    wanted = {r.image_id for r in records}
    by_image: dict[str, list[MaskRecord]] = {}
    versions: set[str] = set()
    for mask in store.mask_records(image_id=sorted(wanted)):
        if mask.run_id == run_id:
            by_image.setdefault(mask.image_id, []).append(mask)
            versions.add(mask.model_version or run_id)
    if not by_image:
        raise ConfigError(f"--predictions-run {run_id!r}: no masks of that run on these images")
    return by_image, "+".join(sorted(versions))
