"""The parent flow: the whole data engine, stage 1 -> 2 -> 3, each stage a subflow."""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel

from flows.config import EngineConfig
from flows.leases import run_lease
from flows.stages import (
    StageReport,
    stage1_assisted_manual,
    stage2_semi_automatic,
    stage3_fully_automatic,
)
from flows.tasks import base_model, check_label_studio, prepare_dataset, register_source

__all__ = ["EngineReport", "data_engine"]


class EngineReport(BaseModel):
    """What a data-engine run did: the source, the base version and each stage's report, and
    how long it waited for another run of the same name to finish (``lease_wait_s``)."""

    root: str
    dataset: str
    source: dict[str, Any]
    base_version: str
    final_version: str
    stages: list[StageReport]
    lease_wait_s: float = 0.0


@flow(name="data-engine")
def data_engine(config: EngineConfig) -> EngineReport:
    """Grow the dataset through SAM's three stages, retraining the model after every round.

    One run of a run name at a time (:mod:`flows.leases`): while another one works, this one
    waits up to ``config.lease.wait_s``, then stops with ``LeaseHeldError``, having done nothing.
    """
    with run_lease(config) as lease:
        if config.annotator.kind == "label_studio":
            check_label_studio(config)  # fail fast, before any image is registered or trained
        dataset = prepare_dataset(config)
        source = register_source(config, dataset)
        base = base_model(config, dataset)
        stage1 = stage1_assisted_manual(config, start_version=base)
        stage2 = stage2_semi_automatic(config, start_version=stage1.final_version)
        stage3 = stage3_fully_automatic(config, start_version=stage2.final_version)
    return EngineReport(
        root=config.root,
        dataset=dataset,
        source=source,
        base_version=base,
        final_version=stage3.final_version,
        stages=[stage1, stage2, stage3],
        lease_wait_s=lease.waited_s,
    )
