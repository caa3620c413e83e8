"""`data-engine` commands that run the engine: demo, run, stage, report, deploy, serve.

The demo and ``run`` execute the flows in this process against Prefect's API: a server when
``PREFECT_API_URL`` is set, otherwise Prefect's local ephemeral API (nothing to start). The
summary they print is read back from the store and the registry after the run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from flows.config import EngineConfig

_CONFIG = typer.Option("--config", help="Engine config: a .toml, .yaml or .yml file.")
_REPORT = typer.Option("--report", help="Write the HTML report here (default: <root>/report).")

# Prefect settings the commands default (the user's environment wins): a slow, busy machine
# needs more than the default 20 s to start the ephemeral API, and the demo phones no one.
_PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def register(app: typer.Typer) -> None:
    """Add the engine commands to the `data-engine` app."""
    app.command("demo")(demo)
    app.command("run")(run)
    app.command("stage")(stage)
    app.command("report")(report)
    app.command("deploy")(deploy)
    app.command("serve")(serve)


def demo(
    root: Annotated[str, typer.Option("--root", help="Storage root (folder or s3://).")] = (
        "./engine-data"
    ),
    images: Annotated[
        int | None, typer.Option("--images", help="Pool images used by the three stages.")
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option("--minutes", help="Minutes of training in all (pretraining + retrains)."),
    ] = None,
    report_dir: Annotated[str | None, _REPORT] = None,
) -> None:
    """Run all three stages on built-in synthetic images with a simulated annotator."""
    from flows.config import demo_config

    config = demo_config(_absolute(root), images=images, minutes=minutes, environ=os.environ)
    _run_engine(config, report_dir)


def run(
    config_file: Annotated[Path, _CONFIG],
    report_dir: Annotated[str | None, _REPORT] = None,
) -> None:
    """Run the whole engine (stages 1 -> 2 -> 3) from a config file."""
    _run_engine(_load(config_file), report_dir)


def stage(
    number: Annotated[int, typer.Argument(help="Stage: 1, 2 or 3.", min=1, max=3)],
    config_file: Annotated[Path, _CONFIG],
) -> None:
    """Run one stage from the newest promoted model version (all of its rounds)."""
    config = _load(config_file)
    _prefect_defaults()
    from flows.stages import stage1_assisted_manual, stage2_semi_automatic, stage3_fully_automatic

    flow = {1: stage1_assisted_manual, 2: stage2_semi_automatic, 3: stage3_fully_automatic}[number]
    result = flow(config)
    typer.echo(
        f"stage {number}: {result.masks} masks in {len(result.rounds)} rounds; model "
        f"{result.start_version} -> {result.final_version}"
    )


def report(
    root: Annotated[str, typer.Option("--root", help="Storage root (folder or s3://).")],
    out: Annotated[str, typer.Option("--out", help="Folder for index.html and the PNGs.")],
    endpoint_url: Annotated[
        str | None, typer.Option("--endpoint-url", envvar="AWS_ENDPOINT_URL")
    ] = None,
) -> None:
    """Write the HTML + PNG report of a storage root and print its summary table."""
    from flows.report import engine_summary, format_table, write_report
    from storage.mask_store import MaskStore

    store = MaskStore(root, endpoint_url=endpoint_url)
    typer.echo(format_table(engine_summary(store)))
    files = write_report(store, out)
    typer.echo(f"\nreport: {files.index}")


def deploy(
    config_file: Annotated[Path, _CONFIG],
    cron: Annotated[
        str | None, typer.Option("--cron", help="Cron schedule of the whole engine.")
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Deployment name.")] = "engine",
) -> None:
    """Register the engine's flows as deployments with the Prefect server (PREFECT_API_URL)."""
    from flows.deployments import build_deployments, register_deployments

    config = _load(config_file)
    ids = register_deployments(build_deployments(config, name=name, cron=cron))
    for deployment_id in ids:
        typer.echo(f"deployment {deployment_id}")
    typer.echo(f"registered {len(ids)} deployments named {name!r}; run `data-engine serve` to work")


def serve(
    config_file: Annotated[Path, _CONFIG],
    cron: Annotated[
        str | None, typer.Option("--cron", help="Cron schedule of the whole engine.")
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Deployment name.")] = "engine",
) -> None:
    """Serve the engine's deployments from this process (runs scheduled and requested runs)."""
    from flows.deployments import build_deployments, serve_deployments

    serve_deployments(build_deployments(_load(config_file), name=name, cron=cron))


# --- private -----------------------------------------------------------------------------------


def _load(config_file: Path) -> EngineConfig:
    from flows.config import load_config

    config = load_config(config_file, environ=os.environ)
    return config.model_copy(update={"root": _absolute(config.root)})


def _absolute(root: str) -> str:
    """Local roots become absolute (flows may run in another working directory)."""
    return root if "://" in root else str(Path(root).expanduser().resolve())


def _prefect_defaults() -> None:
    for key, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _run_engine(config: EngineConfig, report_dir: str | None) -> None:
    _prefect_defaults()
    from flows.engine import data_engine
    from flows.report import engine_summary, format_table, write_report
    from flows.tasks import store_for

    started = time.perf_counter()
    data_engine(config)
    engine_s = time.perf_counter() - started
    store = store_for(config)
    summary = engine_summary(store)
    typer.echo("\n" + format_table(summary))
    out = report_dir or (
        str(Path(config.root) / "report") if "://" not in config.root else "./engine-report"
    )
    files = write_report(store, out)
    typer.echo(f"\nengine wall time: {engine_s / 60:.1f} min")
    typer.echo(f"report: {files.index}")
