"""Deployments of the engine's flows: register them with a Prefect server, or serve them.

Kept apart from the flow code. Four deployments share one name and one config: ``data-engine``
(the whole engine, optionally on a cron schedule) and one per stage (run on demand, e.g. a
stage-2 round after people finished in Label Studio). The config goes in as the flows' default
parameter without the Label Studio token: a flow run reads it from ``LABEL_STUDIO_API_KEY`` (or
``LABEL_STUDIO_API_KEY_FILE``) in the worker's environment, so the secret never reaches
Prefect's database or UI.

The scheduled ``data-engine`` deployment runs one at a time: a run that comes due while the
previous one still works is cancelled by Prefect (``CANCEL_NEW``), and whatever starts a second
run some other way (a stage deployment, the CLI) meets the run lease in the store
(:mod:`flows.leases`).

``register_deployments`` needs a Prefect server (``PREFECT_API_URL``); the served process
(``serve_deployments``, what ``data-engine serve`` runs) executes their runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from flows.config import EngineConfig

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.deployments.runner import RunnerDeployment

__all__ = [
    "DEFAULT_NAME",
    "build_deployments",
    "deployment_parameters",
    "register_deployments",
    "serve_deployments",
]

DEFAULT_NAME = "engine"


def deployment_parameters(config: EngineConfig) -> dict[str, Any]:
    """The flows' ``config`` parameter as JSON data, without the Label Studio token."""
    data = config.model_dump(mode="json", exclude={"label_studio": {"token"}})
    return {"config": data}


def build_deployments(
    config: EngineConfig, *, name: str = DEFAULT_NAME, cron: str | None = None
) -> list[RunnerDeployment]:
    """The engine's deployments (not yet registered); ``cron`` schedules the whole engine."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.engine import data_engine
    from flows.stages import stage1_assisted_manual, stage2_semi_automatic, stage3_fully_automatic

    parameters = deployment_parameters(config)
    tags = ["sam-data-engine", f"root:{config.root}"]
    deployments: list[Any] = [
        data_engine.to_deployment(
            name=name,
            cron=cron,
            parameters=parameters,
            tags=tags,
            description="SAM's data engine: stages 1 -> 2 -> 3, retraining after every round.",
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
        )
    ]
    for stage_flow in (stage1_assisted_manual, stage2_semi_automatic, stage3_fully_automatic):
        deployments.append(stage_flow.to_deployment(name=name, parameters=parameters, tags=tags))
    return cast("list[RunnerDeployment]", deployments)


def register_deployments(deployments: Sequence[RunnerDeployment]) -> list[UUID]:
    """Register (create or update) the deployments with the Prefect API; their ids."""
    return [cast("UUID", deployment.apply()) for deployment in deployments]


def serve_deployments(deployments: Sequence[RunnerDeployment], *, limit: int | None = 1) -> None:
    """Register the deployments and run their scheduled and requested runs (blocks)."""
    from prefect import serve

    serve(*deployments, limit=limit)
