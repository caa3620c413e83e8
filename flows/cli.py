"""The `data-engine` command line.

Each command group lives in its own module under `flows.commands`, exposing
``register(app: typer.Typer) -> None``. Heavy imports (torch, prefect, pyarrow) happen inside the
command bodies so that `data-engine --help` answers at once.
"""

from __future__ import annotations

import importlib

import typer

# Modules under flows.commands that add commands to the app, in --help order.
_COMMAND_MODULES: tuple[str, ...] = ("store", "ls", "amg", "model", "engine")

app = typer.Typer(
    name="data-engine",
    help="Grow a segmentation-mask dataset through SAM's three data-engine stages.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """sam-data-engine: assisted-manual, semi-automatic and fully automatic mask annotation."""


def build_app() -> typer.Typer:
    """Register every command module on the app (idempotent) and return it."""
    if not getattr(app, "_registered", False):
        for name in _COMMAND_MODULES:
            importlib.import_module(f"flows.commands.{name}").register(app)
        app._registered = True  # type: ignore[attr-defined]
    return app


def main() -> None:
    """Console-script entry point; DataEngineError becomes a one-line message and exit code 2."""
    from storage.errors import DataEngineError

    try:
        build_app()(standalone_mode=True)
    except DataEngineError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
