"""The engine's model versions: the base model, retrains from a parent, holdout scores, promotion.

Library code (no Prefect) composing :mod:`engine.training`, :mod:`engine.evaluation` and
:class:`engine.registry.ModelRegistry`; the flows call each function through one thin task.

Each version the engine makes is tagged in its card's ``extra`` with what it is for
(``engine_run``, ``role`` = ``base`` | ``retrain``, ``stage``, ``round``, ``dataset``). Before
training, :func:`find_version` looks for a version with the same tags: a run resumed after a
crash that came after a version was registered reuses it instead of training (and registering)
a second one. Every version is evaluated on the holdout *before* it is registered, so a card
never lacks the metrics its promotion needs.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage.errors import ImageError

if TYPE_CHECKING:
    from engine.amg.calibration import GateCalibration
    from engine.evaluation.interactive import EvalSample
    from engine.evaluation.metrics import InteractiveMetrics
    from engine.registry import ModelCard, ModelRegistry
    from engine.training import SyntheticTrainingData
    from flows.config import TrainingBudget
    from storage.mask_store import MaskStore

__all__ = [
    "VersionTags",
    "base_version",
    "evaluate_on_holdout",
    "find_version",
    "gate_calibration",
    "pretraining_data",
    "promote_version",
    "retrain_version",
]


@dataclass(frozen=True)
class VersionTags:
    """What a version was made for; stored in its card's ``extra``."""

    engine_run: str
    dataset: str
    role: str  # "base" or "retrain"
    stage: int | None = None
    round: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine_run": self.engine_run,
            "dataset": self.dataset,
            "role": self.role,
            "stage": self.stage,
            "round": self.round,
        }

    def seed(self, base: int) -> int:
        """A training seed of its own for every (stage, round), stable across reruns."""
        text = f"{base}/{self.engine_run}/{self.role}/{self.stage}/{self.round}"
        return zlib.crc32(text.encode("utf-8"))


def find_version(registry: ModelRegistry, tags: VersionTags) -> ModelCard | None:
    """The newest registered version carrying exactly ``tags``, or None."""
    wanted = tags.as_dict()
    found = [
        card for card in registry.versions() if {k: card.extra.get(k) for k in wanted} == wanted
    ]
    return found[-1] if found else None


def evaluate_on_holdout(
    model: Any, samples: Sequence[EvalSample], *, max_clicks: int
) -> InteractiveMetrics:
    """mIoU@1/@5, NoC@85/@90 and box mIoU of ``model`` on the holdout samples."""
    from engine.evaluation.interactive import evaluate_interactive

    if not samples:
        raise ImageError("the holdout has no images with ground truth; cannot score a model")
    return evaluate_interactive(model, samples, max_clicks=max_clicks)


def base_version(
    store: MaskStore,
    registry: ModelRegistry,
    *,
    variant: str,
    checkpoint: str | None,
    budget: TrainingBudget,
    seed: int,
    tags: VersionTags,
    holdout: Sequence[EvalSample],
    max_clicks: int,
) -> ModelCard:
    """The engine's first version: ``checkpoint`` as given, or ``variant`` pretrained from
    scratch on synthetic scenes for ``budget``; evaluated, registered and promoted.

    Returns the existing version when one with ``tags`` is registered already.
    """
    from engine import build_sam
    from engine.training import train

    existing = find_version(registry, tags)
    if existing is not None:
        return existing
    import torch

    # Random initial weights from the run's seed: the same config builds the same base model
    # (forked, so the caller's global generator is left as it was).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tags.seed(seed))
        model = build_sam(variant, checkpoint=checkpoint)
    steps, wall_time_s, trained_on = 0, 0.0, {"source": "checkpoint", "uri": checkpoint}
    if checkpoint is None:
        data = pretraining_data(model.img_size)
        result = train(model, data, _train_config(budget, tags.seed(seed)), progress=False)
        steps, wall_time_s, trained_on = result.step, result.train_s, data.describe()
    model.eval()
    metrics = evaluate_on_holdout(model, holdout, max_clicks=max_clicks)
    card = registry.register(
        model,
        parent=checkpoint,
        trained_on=trained_on,
        steps=steps,
        wall_time_s=wall_time_s,
        metrics=metrics,
        extra=tags.as_dict(),
    )
    # Nothing to compare the first version with: the registry promotes it.
    return registry.promote(card.version)


def retrain_version(
    store: MaskStore,
    registry: ModelRegistry,
    *,
    parent: str,
    budget: TrainingBudget,
    seed: int,
    tags: VersionTags,
    holdout: Sequence[EvalSample],
    max_clicks: int,
    replay_fraction: float = 0.0,
) -> ModelCard:
    """Train ``parent`` further on every pool mask in the store, score it, register it.

    With ``replay_fraction`` > 0 that share of the images comes from :func:`pretraining_data`
    (rehearsal of what the engine's base model learnt from). The new version is not promoted
    here (see :func:`promote_version`). Returns the existing version when one with ``tags`` is
    registered already.
    """
    from engine.training import ReplayTrainingData, StoreTrainingData, TrainingData, train

    existing = find_version(registry, tags)
    if existing is not None:
        return existing
    model = registry.load(parent)
    data: TrainingData = StoreTrainingData(store, model.img_size)
    if replay_fraction > 0:
        data = ReplayTrainingData(data, pretraining_data(model.img_size), replay_fraction)
    result = train(model, data, _train_config(budget, tags.seed(seed)), progress=False)
    model.eval()
    metrics = evaluate_on_holdout(model, holdout, max_clicks=max_clicks)
    return registry.register(
        model,
        parent=parent,
        trained_on=data.describe(),
        steps=result.step,
        wall_time_s=result.train_s,
        metrics=metrics,
        parent_metrics=registry.get(parent).metrics,
        extra=tags.as_dict(),
    )


def pretraining_data(img_size: int) -> SyntheticTrainingData:
    """What the engine pretrains its base model on: fresh synthetic scenes at ``img_size``."""
    from engine.training import SyntheticTrainingData

    return SyntheticTrainingData(img_size=img_size)


def promote_version(
    registry: ModelRegistry, version: str, *, miou_tolerance: float, noc_tolerance: float
) -> ModelCard:
    """Promote ``version`` if it is not worse than its parent (within the tolerances)."""
    return registry.promote(version, miou_tolerance=miou_tolerance, noc_tolerance=noc_tolerance)


def gate_calibration(
    registry: ModelRegistry, version: str, holdout: Callable[[], Sequence[EvalSample]]
) -> GateCalibration:
    """The generator's gates fitted to ``version`` on the holdout (``holdout()`` gives it, read
    only when needed): fitted once and kept in the card, so a rerun, or the next stage using the
    same version, reads them back."""
    from engine.amg.calibration import GateCalibration, fit_gate_calibration

    card = registry.get(version)
    if card.calibration is not None:
        return GateCalibration.from_dict(card.calibration)
    samples = holdout()
    if not samples:
        raise ImageError(
            f"the holdout has no images with ground truth; cannot calibrate {version}'s gates"
        )
    calibration = fit_gate_calibration(registry.load(version), samples)
    registry.set_calibration(version, calibration.to_dict())
    return calibration


def _train_config(budget: TrainingBudget, seed: int) -> Any:
    from engine.training import TrainConfig

    return TrainConfig(
        steps=budget.steps,
        minutes=budget.minutes,
        images_per_step=budget.images_per_step,
        masks_per_image=budget.masks_per_image,
        num_rounds=budget.num_rounds,
        no_point_rounds=budget.no_point_rounds,
        lr=budget.lr,
        warmup_steps=budget.warmup_steps,
        focal_weight=budget.focal_weight,
        focal_gamma=budget.focal_gamma,
        focal_alpha=budget.focal_alpha,
        freeze_image_encoder=budget.freeze_image_encoder,
        seed=seed,
    )
