"""Versioned models in the mask store: ``<root>/models/<version>/{checkpoint.pt,card.json}``.

Every retrain registers a new version (``v0001``, ``v0002``, ...) with its checkpoint and a JSON
model card; nothing is overwritten except the card's promotion record. A version is *promoted*
only when it is not worse than its parent on the holdout; both numbers are kept in the card
either way, so the history of the data engine can be read back from the cards alone.

Card fields::

    version, parent           "v0003", "v0002" (parent: a version, a checkpoint URI, or null)
    variant                   "tiny" | "vit_b" | ...
    trained_on                snapshot: commit sequence, stages, rounds, sources, mask counts
    steps, wall_time_s        optimizer steps of the run and its training time, seconds
    metrics, parent_metrics   holdout metrics (InteractiveMetrics keys) of this model and of its
                              parent on the same holdout (null when not measured)
    promoted                  bool
    promotion                 the last decision: {promoted, regressions, reason, decided_at}
    calibration               the generator's gates fitted to this model on the holdout
                              (``engine.amg.calibration.GateCalibration.to_dict()``), or null
    created_at, extra

The card is written after the checkpoint, so a version is visible only once both exist. Besides the
promotion record, only ``calibration`` is ever added to a card, once, by :meth:`set_calibration`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from engine.evaluation.metrics import InteractiveMetrics
from storage.errors import CheckpointError, NotFoundError

__all__ = ["ModelCard", "ModelRegistry"]

_PREFIX = "models"
_VERSION = re.compile(r"^v(\d{4,})$")


@dataclass
class ModelCard:
    """What the registry knows about one model version (see the module docstring)."""

    version: str
    parent: str | None
    variant: str
    trained_on: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    wall_time_s: float = 0.0
    metrics: dict[str, Any] | None = None
    parent_metrics: dict[str, Any] | None = None
    promoted: bool = False
    promotion: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, *, name: str) -> ModelCard:
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as err:
            raise CheckpointError(f"model card {name} is not a valid card: {err}") from None


class ModelRegistry:
    """Model versions stored next to the masks they were trained on.

    Args:
        store: a ``storage.mask_store.MaskStore`` (local folder or S3).
    """

    def __init__(self, store: Any) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"ModelRegistry({self.store!r})"

    # ---------------------------------------------------------------------------------- writing

    def register(
        self,
        model: Any,
        *,
        parent: str | None = None,
        trained_on: dict[str, Any] | None = None,
        steps: int = 0,
        wall_time_s: float = 0.0,
        metrics: InteractiveMetrics | dict[str, Any] | None = None,
        parent_metrics: InteractiveMetrics | dict[str, Any] | None = None,
        optimizer_state: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ModelCard:
        """Store ``model`` (a ``Sam``) as the next version; returns its card (not promoted).

        ``metrics`` and ``parent_metrics`` are holdout metrics of this model and of its parent
        measured on the same holdout; :meth:`promote` compares them.
        """
        from engine.checkpoint import save_checkpoint

        version = self._next_version()
        card = ModelCard(
            version=version,
            parent=parent,
            variant=str(model.build_args.get("variant")),
            trained_on=dict(trained_on or {}),
            steps=int(steps),
            wall_time_s=float(wall_time_s),
            metrics=_as_dict(metrics),
            parent_metrics=_as_dict(parent_metrics),
            created_at=_now(),
            extra=dict(extra or {}),
        )
        save_checkpoint(
            model,
            self.checkpoint_uri(version),
            version=version,
            parent=parent,
            trained_on=card.trained_on,
            step=card.steps,
            optimizer_state=optimizer_state,
            extra={"wall_time_s": card.wall_time_s, **card.extra},
            endpoint_url=self.store.location.endpoint_url,
        )
        self._write_card(card)
        return card

    def promote(
        self, version: str, *, miou_tolerance: float = 0.0, noc_tolerance: float = 0.0
    ) -> ModelCard:
        """Promote ``version`` if it is not worse than its parent on the holdout.

        The parent's numbers are the card's ``parent_metrics`` (measured next to this model's)
        or else the parent version's own card metrics. A version without a parent, or whose
        parent has no metrics anywhere, is promoted (nothing to compare with). The decision and
        both sets of numbers are recorded in the card either way; read ``card.promoted``.

        Raises:
            NotFoundError: no such version.
            CheckpointError: the version has no holdout metrics to judge it by.
        """
        card = self.get(version)
        if card.metrics is None:
            raise CheckpointError(
                f"model {version} has no holdout metrics; evaluate it before promoting"
            )
        parent_metrics = card.parent_metrics
        if parent_metrics is None and card.parent is not None and self._exists(card.parent):
            parent_metrics = self.get(card.parent).metrics
            card.parent_metrics = parent_metrics
        if parent_metrics is None:
            regressions: list[str] = []
            reason = "no parent metrics to compare with"
        else:
            regressions = InteractiveMetrics.from_dict(card.metrics).regressions(
                InteractiveMetrics.from_dict(parent_metrics),
                miou_tolerance=miou_tolerance,
                noc_tolerance=noc_tolerance,
            )
            reason = (
                f"worse than parent {card.parent} on {', '.join(regressions)}"
                if regressions
                else f"not worse than parent {card.parent}"
            )
        card.promoted = not regressions
        card.promotion = {
            "promoted": card.promoted,
            "regressions": regressions,
            "reason": reason,
            "metrics": card.metrics,
            "parent_metrics": parent_metrics,
            "miou_tolerance": miou_tolerance,
            "noc_tolerance": noc_tolerance,
            "decided_at": _now(),
        }
        self._write_card(card)
        return card

    # ---------------------------------------------------------------------------------- reading

    def set_calibration(self, version: str, calibration: dict[str, Any]) -> ModelCard:
        """Record the generator's gate calibration of ``version`` in its card; returns the card."""
        card = self.get(version)
        card.calibration = dict(calibration)
        self._write_card(card)
        return card

    def versions(self) -> list[ModelCard]:
        """Every registered version, oldest first."""
        return [self.get(v) for v in self._version_names()]

    def get(self, version: str) -> ModelCard:
        """The card of ``version``; raises :class:`NotFoundError` if it does not exist."""
        if not isinstance(version, str) or not _VERSION.match(version):
            raise NotFoundError(
                f"model version {version!r} is not a version name; expected e.g. 'v0001'"
            )
        key = f"{_PREFIX}/{version}/card.json"
        try:
            text = self.store.get_object(key)
        except NotFoundError:
            raise NotFoundError(
                f"model version {version!r} is not registered in {self.store}"
            ) from None
        return ModelCard.from_json(text, name=key)

    def latest(self) -> ModelCard | None:
        """The newest promoted version, or None when nothing is promoted yet."""
        promoted = [card for card in self.versions() if card.promoted]
        return promoted[-1] if promoted else None

    def resolve(self, version: str) -> ModelCard:
        """``"latest"`` (the newest promoted version) or a version name -> its card."""
        if version == "latest":
            card = self.latest()
            if card is None:
                raise NotFoundError(f"no promoted model in {self.store}; train one first")
            return card
        return self.get(version)

    def checkpoint_uri(self, version: str) -> str:
        """Where ``version``'s checkpoint lives (a local path or an ``s3://`` URI)."""
        return self.store.location.uri(f"{_PREFIX}/{version}/checkpoint.pt")

    def load(self, version: str, *, device: str = "cpu") -> Any:
        """The model of ``version`` (or ``"latest"``) as a ``Sam`` in eval mode."""
        from engine.checkpoint import load_checkpoint

        card = self.resolve(version)
        model, _ = load_checkpoint(
            self.checkpoint_uri(card.version),
            variant=card.variant,
            map_location=device,
            endpoint_url=self.store.location.endpoint_url,
        )
        return model

    # ---------------------------------------------------------------------------------- private

    def _version_names(self) -> list[str]:
        names = set()
        for key in self.store.list_objects(_PREFIX):
            parts = key.split("/")
            # keys are relative to the store root: models/<version>/card.json
            if len(parts) >= 3 and parts[-1] == "card.json" and _VERSION.match(parts[-2]):
                names.add(parts[-2])
        return sorted(names, key=lambda v: int(v[1:]))

    def _next_version(self) -> str:
        numbers = [int(v[1:]) for v in self._version_names()]
        # A checkpoint without its card (a crashed register) still takes its number.
        for key in self.store.list_objects(_PREFIX):
            parts = key.split("/")
            if len(parts) >= 2 and (m := _VERSION.match(parts[-2])):
                numbers.append(int(m.group(1)))
        return f"v{max(numbers, default=0) + 1:04d}"

    def _exists(self, version: str) -> bool:
        return bool(_VERSION.match(version)) and version in self._version_names()

    def _write_card(self, card: ModelCard) -> None:
        self.store.put_object(f"{_PREFIX}/{card.version}/card.json", card.to_json().encode())


def _as_dict(metrics: InteractiveMetrics | dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    if isinstance(metrics, InteractiveMetrics):
        return metrics.to_dict()
    return dict(metrics)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
