"""The three stages of SAM's data engine as Prefect flows, and the typed reports they return.

Every stage runs rounds of the same loop (the paper's: 6 retrains in stage 1, 5 in stage 2)::

    take the round's images from the pool
    get masks            stage 1: people click, the model answers
                         stage 2: the generator pre-labels at a high gate, people fix and add
                         stage 3: the generator alone
    commit them          one atomic write through the MaskStore
    retrain              from the current version on every pool mask so far, scored on the holdout
    promote              if not worse than its parent; the next round uses the promoted version

A stage flow run on its own (``data-engine stage N``, no ``start_version``) takes the run's lease
(:mod:`flows.leases`), registers the image source first and starts from the newest promoted
version, or makes the base version when the registry is empty.

A round this run name finished before (its manifest is in the store) is not run again: its
report comes back from the manifest with ``reused`` set, so a rerun, or a run that waited for
another run of the same name, commits nothing twice and trains no second version.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ValidationError

from flows.config import EngineConfig
from flows.leases import check_run_lease, run_lease
from flows.tasks import (
    annotate_round,
    base_model,
    check_label_studio,
    commit_masks,
    current_version,
    finished_round,
    generate_auto_masks,
    prelabel_masks,
    prepare_dataset,
    promote_model,
    record_round,
    register_source,
    retrain_model,
    round_image_ids,
)

__all__ = [
    "RoundReport",
    "StageReport",
    "stage1_assisted_manual",
    "stage2_semi_automatic",
    "stage3_fully_automatic",
]


class RoundReport(BaseModel):
    """What one round did: its images, masks (all of them, and those new in the store), the
    version that helped, the version trained after it and whether that one was promoted.
    ``reused``: the round was finished by an earlier run of this run name and not run again."""

    stage: int
    round: int
    image_ids: list[str]
    masks: int
    masks_new: int
    model_version: str
    trained_version: str
    promoted: bool
    metrics: dict[str, Any] | None
    next_version: str
    reused: bool = False


class StageReport(BaseModel):
    """What one stage did: its rounds, and the version it started from and ended with.
    ``lease_wait_s``: seconds a stage run on its own waited for another run of its name."""

    stage: int
    start_version: str
    final_version: str
    rounds: list[RoundReport]
    lease_wait_s: float = 0.0

    @property
    def masks(self) -> int:
        return sum(r.masks for r in self.rounds)


@flow(name="stage1-assisted-manual")
def stage1_assisted_manual(config: EngineConfig, start_version: str | None = None) -> StageReport:
    """Stage 1: annotators click foreground/background points; the model answers each click."""
    return _run_stage(config, 1, start_version)


@flow(name="stage2-semi-automatic")
def stage2_semi_automatic(config: EngineConfig, start_version: str | None = None) -> StageReport:
    """Stage 2: images come pre-filled with confident masks; annotators fix and add the rest."""
    return _run_stage(config, 2, start_version)


@flow(name="stage3-fully-automatic")
def stage3_fully_automatic(config: EngineConfig, start_version: str | None = None) -> StageReport:
    """Stage 3: the automatic mask generator labels the images alone."""
    return _run_stage(config, 3, start_version)


def _run_stage(config: EngineConfig, stage: int, start_version: str | None) -> StageReport:
    # Run on its own, the stage takes the run's lease; inside the parent flow, the parent has.
    with run_lease(config) if start_version is None else nullcontext() as lease:
        dataset = prepare_dataset(config)
        if start_version is None:  # run on its own: the parent flow has not set anything up
            if stage in (1, 2) and config.annotator.kind == "label_studio":
                check_label_studio(config)
            register_source(config, dataset)
        version = start_version or current_version(config) or base_model(config, dataset)
        start = version
        rounds: list[RoundReport] = []
        for r in range(config.stage(stage).rounds):
            report = _run_round(config, dataset, stage, r, version)
            rounds.append(report)
            version = report.next_version
    return StageReport(
        stage=stage,
        start_version=start,
        final_version=version,
        rounds=rounds,
        lease_wait_s=lease.waited_s if lease is not None else 0.0,
    )


def _finished_report(config: EngineConfig, stage: int, round: int) -> RoundReport | None:
    manifest = finished_round(config, stage, round)
    if manifest is None:
        return None
    try:
        return RoundReport.model_validate({**manifest, "reused": True})
    except ValidationError as err:
        get_run_logger().warning(
            "stage %d round %d: manifest unreadable (%s); running the round", stage, round, err
        )
        return None


def _run_round(
    config: EngineConfig, dataset: str, stage: int, round: int, version: str
) -> RoundReport:
    check_run_lease()
    finished = _finished_report(config, stage, round)
    if finished is not None:
        return finished
    image_ids = round_image_ids(config, stage, round)
    if stage == 3:
        written = generate_auto_masks(config, dataset, version, image_ids, round)
    else:
        predictions = (
            prelabel_masks(config, dataset, version, image_ids, round) if stage == 2 else None
        )
        masks = annotate_round(config, dataset, version, image_ids, stage, round, predictions)
        check_run_lease()  # a run that hung and lost its lease must not commit the round
        written = commit_masks(config, masks, stage, round)
    trained = retrain_model(config, dataset, version, stage, round)
    promoted = promote_model(config, trained["version"])
    report = RoundReport(
        stage=stage,
        round=round,
        image_ids=image_ids,
        masks=int(written["masks"]),
        masks_new=int(written["masks_new"]),
        model_version=version,
        trained_version=trained["version"],
        promoted=promoted,
        metrics=trained["metrics"],
        next_version=trained["version"] if promoted else version,
    )
    record_round(config, report.model_dump())
    return report
