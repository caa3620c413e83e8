"""The data engine's one configuration: a validated pydantic model, read from TOML or YAML plus
environment overrides, validated once at the edge and then passed to the flows as a parameter.

File layout (every section and key optional except ``root``; see ``examples/config.toml``)::

    root = "./engine-data"          # local folder or s3://bucket/prefix
    [source]      images = "synthetic" | a folder | s3://bucket/prefix, holdout, ...
    [label_studio] url, token (secret), poll_interval_s, timeout_s
    [model]       variant, checkpoint, pretrain_steps / pretrain_minutes
    [annotator]   kind = "simulated" | "label_studio", the simulated person's time model
    [stage1] [stage2] [stage3]   rounds, images_per_round, training budget, thresholds
    [evaluation]  holdout clicks
    [lease]       ttl_s, wait_s: one run of a run name at a time (a second one waits or stops)

Environment overrides: ``DATA_ENGINE_<SECTION>__<KEY>=value`` (``DATA_ENGINE_ROOT`` for top-level
keys), e.g. ``DATA_ENGINE_STAGE1__ROUNDS=2``. ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``
(the names Label Studio's own tools use) set the Label Studio section. Unknown keys, in the file or
in a ``DATA_ENGINE_`` variable, and values of the wrong type are all reported in one
:class:`~storage.errors.ConfigError`; the token never appears in a message or a log.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from storage.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "AnnotatorConfig",
    "EngineConfig",
    "EvaluationConfig",
    "LabelStudioConfig",
    "LeaseConfig",
    "ModelConfig",
    "SourceConfig",
    "Stage1Config",
    "Stage2Config",
    "Stage3Config",
    "TrainingBudget",
    "demo_config",
    "load_config",
    "parse_config",
    "training_minutes",
]

ENV_PREFIX = "DATA_ENGINE_"
# Environment variables named by Label Studio's own tooling, mapped into our config.
_LABEL_STUDIO_ENV = {"LABEL_STUDIO_URL": "url", "LABEL_STUDIO_API_KEY": "token"}
# Fields whose values must never be echoed back in an error message.
_SECRET_FIELDS = frozenset({"token"})


class _Section(BaseModel):
    """Strict base: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class SourceConfig(_Section):
    """Where the images come from.

    ``images = "synthetic"`` draws scenes with exact ground truth from :mod:`engine.synthetic`
    (the demo's default); the simulated annotator and the holdout use that ground truth. Any
    other value is a local folder or ``s3://bucket/prefix`` of images for the pool.
    """

    images: str = "synthetic"
    holdout: str | None = Field(
        default=None, description="folder or s3:// prefix of holdout images (real sources only)"
    )
    holdout_coco: str | None = Field(
        default=None,
        description="COCO instances JSON with the holdout's ground truth (real sources)",
    )
    pool_coco: str | None = Field(
        default=None,
        description="COCO ground truth of the pool, needed only by the simulated annotator",
    )
    pool_images: int | None = Field(
        default=None, ge=1, description="synthetic: pool size; default: what the stages consume"
    )
    holdout_images: int = Field(default=16, ge=1, description="synthetic: holdout images")
    image_size: int = Field(
        default=256, ge=32, le=2048, description="synthetic: image side, pixels"
    )
    seed: int = Field(default=0, description="synthetic: dataset seed (pool, holdout, pretraining)")
    scene: dict[str, int] = Field(
        default_factory=dict,
        description="synthetic: engine.synthetic.generate_scene settings, e.g. max_objects, "
        "min_area (pixels)",
    )

    @property
    def synthetic(self) -> bool:
        """Whether the built-in synthetic scenes are the source."""
        return self.images == "synthetic"


class LabelStudioConfig(_Section):
    """How to reach Label Studio (only used when ``annotator.kind = "label_studio"``)."""

    url: str = "http://localhost:8080"
    token: SecretStr | None = Field(
        default=None, description="API token; prefer LABEL_STUDIO_API_KEY"
    )
    poll_interval_s: float = Field(
        default=10.0, gt=0, description="seconds between progress checks"
    )
    timeout_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="seconds to wait for a round's tasks before failing",
    )
    ml_backend_url: str | None = Field(default=None, description="ML backend to attach to projects")
    document_root: str | None = Field(
        default=None,
        description="Label Studio's LOCAL_FILES_DOCUMENT_ROOT (local images must be under it)",
    )
    dataset: str = Field(default="engine", description="dataset name in project titles")


class TrainingBudget(_Section):
    """How one training run is sized: ``steps`` and/or ``minutes`` of training time.

    With both, training stops at whichever comes first; the learning-rate schedule follows the
    minutes when they are set.
    """

    steps: int | None = Field(default=None, ge=1)
    minutes: float | None = Field(default=0.5, gt=0)
    images_per_step: int = Field(default=2, ge=1, description="images encoded per step")
    masks_per_image: int = Field(default=8, ge=1, description="masks simulated per image per step")
    lr: float = Field(default=2e-4, gt=0, description="peak learning rate")
    warmup_steps: int = Field(default=5, ge=0)
    # SAM simulates 11 rounds per mask; 3 make a step ~3x cheaper on a CPU, which is what lets
    # a few minutes of training do some good (the test fixture and bench_train use 3 as well).
    num_rounds: int = Field(default=3, ge=1, description="interactive rounds per mask (SAM: 11)")
    no_point_rounds: int = Field(default=1, ge=0)
    # The engine's own model is pretrained with cross-entropy + dice at 1:1 and retrains keep
    # that loss rather than switch to SAM's focal 20 on the first retrain step. For an official
    # checkpoint, SAM's recipe is focal_weight 20, focal_gamma 2, focal_alpha 0.25.
    focal_weight: float = Field(
        default=1.0,
        ge=0,
        description="focal term's weight against dice (SAM: 20; the engine's model: 1, with "
        "gamma 0 and no alpha, i.e. cross-entropy + dice)",
    )
    focal_gamma: float = Field(
        default=0.0, ge=0, description="focal loss's focusing exponent (SAM: 2; 0: none)"
    )
    focal_alpha: float = Field(
        default=-1.0,
        description="focal loss's foreground weight (SAM: 0.25; negative: none, so gamma 0 "
        "gives plain binary cross-entropy)",
    )

    freeze_image_encoder: bool = Field(
        default=False,
        description="train the prompt encoder and mask decoder only (fine-tuning on few masks)",
    )
    # A retrain on a few dozen masks, most of them the most prominent objects (stage 1 labels
    # largest first), drags the model towards large blobs within tens of steps; mixing in the
    # scenes the base model was pretrained on keeps what it knew (results/cpu-2core-2026-12-07).
    replay_fraction: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="retrains: share of each step's images drawn from the base model's own "
        "pretraining source (synthetic scenes) instead of the store; default: 0.5 when the "
        "engine pretrained the base model, 0 when it started from model.checkpoint",
    )

    @model_validator(mode="after")
    def _some_budget(self) -> TrainingBudget:
        if self.steps is None and self.minutes is None:
            raise ValueError("give steps or minutes (or both)")
        if self.no_point_rounds >= self.num_rounds:
            raise ValueError("no_point_rounds must be smaller than num_rounds")
        return self


#: Retrains of the engine's own model replay this share of pretraining scenes by default.
_DEFAULT_REPLAY_FRACTION = 0.5


def _pretrain_budget() -> TrainingBudget:
    # From random weights the same loss as retraining (cross-entropy + dice; bench_train: over
    # twice the mIoU@1 of dice alone), a higher lr and a longer warm-up.
    return TrainingBudget(minutes=3.0, lr=1e-3, warmup_steps=20)


class ModelConfig(_Section):
    """The model the engine starts from: an existing checkpoint, or ``variant`` pretrained on
    synthetic scenes (a seed stream apart from the pool's and the holdout's) as the first
    version."""

    variant: Literal["tiny", "vit_b", "vit_l", "vit_h"] = "tiny"
    checkpoint: str | None = Field(
        default=None,
        description="start from this checkpoint (local or s3://) instead of pretraining",
    )
    pretrain: TrainingBudget = Field(default_factory=_pretrain_budget)


class AnnotatorConfig(_Section):
    """Who annotates stages 1 and 2, and the simulated person's behaviour and time model.

    Simulated seconds per mask = ``seconds_per_object`` (find the object, decide, check) +
    ``seconds_per_click`` x clicks + ``brush_seconds`` when the click budget ran out and the
    rest was painted by hand. An accepted stage-2 prediction costs ``accept_seconds``, a deleted
    one ``reject_seconds``; one that overlaps an object at ``fix_iou`` but below ``iou_target``
    is fixed from where the model left it (``accept_seconds`` + the corrective clicks). A
    person spends at most ``image_budget_s`` on one image, labels objects in order of
    prominence (largest first) and, in stage 1, moves to the next image after a mask that took
    over ``move_on_after_s``, so a better model means more masks per image; in stage 2 people
    add every missing object they can within the image budget (the paper).
    """

    kind: Literal["simulated", "label_studio"] = "simulated"
    iou_target: float = Field(default=0.9, gt=0, le=1)
    click_budget: int = Field(default=8, ge=1, description="clicks before switching to the brush")
    seconds_per_click: float = Field(default=2.5, ge=0)
    seconds_per_object: float = Field(default=5.0, ge=0)
    brush_seconds: float = Field(default=20.0, ge=0)
    accept_seconds: float = Field(default=1.5, ge=0)
    reject_seconds: float = Field(default=1.0, ge=0)
    image_budget_s: float = Field(default=90.0, gt=0)
    move_on_after_s: float = Field(
        default=30.0,
        gt=0,
        description="stage 1: next image after a mask that took longer (SA-1B's rule)",
    )
    fix_iou: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="stage 2: fix a prediction overlapping an object at this IoU, else delete it",
    )
    name: str = Field(default="simulated", description="annotator name stored with each mask")


class _StageBase(_Section):
    rounds: int = Field(default=2, ge=1)
    images_per_round: int = Field(default=6, ge=1)
    train: TrainingBudget = Field(default_factory=TrainingBudget)


class Stage1Config(_StageBase):
    """Assisted-manual: the annotator clicks, the model answers."""

    rounds: int = Field(default=3, ge=1)


class _GeneratingStage(_StageBase):
    """The generator's grid and gates, shared by stages 2 and 3 (SAM's argument names)."""

    points_per_side: int = Field(default=16, ge=1)
    pred_iou_thresh: float = Field(default=0.88, ge=0, le=1.5)
    stability_score_thresh: float = Field(default=0.95, ge=0, le=1)
    calibrate_gates: bool = Field(
        default=True,
        description="apply the gates to the model's predicted IoU calibrated on the holdout "
        "(and SAM's stability offset scaled to its input size); false: SAM's raw gates",
    )
    crop_n_layers: int = Field(
        default=1, ge=0, le=3, description="zoomed crop layers (the paper's run: 2 at 1500 px)"
    )


class Stage2Config(_GeneratingStage):
    """Semi-automatic: the generator pre-labels the masks it is confident of (the paper's
    confident gate, predicted IoU 0.88, as in stage 3; the person checks every one)."""


class Stage3Config(_GeneratingStage):
    """Fully automatic: the generator alone, with the paper's filters."""

    rounds: int = Field(default=1, ge=1)
    images_per_round: int = Field(default=16, ge=1)
    min_mask_region_area: int = Field(default=20, ge=0)
    max_mask_region_fraction: float | None = Field(default=0.95, gt=0, le=1)
    workers: int | None = Field(
        default=None, ge=1, description="Dask LocalCluster worker processes"
    )
    dask_address: str | None = Field(
        default=None, description="an existing Dask scheduler, tcp://..."
    )
    shard_size: int = Field(default=8, ge=1, description="images per shard (one commit each)")

    @model_validator(mode="after")
    def _one_cluster(self) -> Stage3Config:
        if self.workers is not None and self.dask_address is not None:
            raise ValueError("give stage3.workers or stage3.dask_address, not both")
        return self


class EvaluationConfig(_Section):
    """The holdout protocol and the promotion rule.

    A new version is promoted (used by the next round) when it is not worse than its parent on
    any headline metric by more than the tolerances: ``miou_tolerance`` in IoU for mIoU@1,
    mIoU@5 and box mIoU, ``noc_tolerance`` in clicks for NoC@85 and NoC@90.
    """

    max_clicks: int = Field(default=10, ge=5, le=20)
    max_objects_per_image: int | None = Field(default=None, ge=1)
    miou_tolerance: float = Field(default=0.01, ge=0, le=1)
    noc_tolerance: float = Field(default=0.25, ge=0)


class LeaseConfig(_Section):
    """The run lease: a run holds ``leases/run-<run_name>`` in the store while it works.

    Another run of the same name (a scheduled run firing while this one still works, or a stage
    run on its own) waits up to ``wait_s`` for it, then stops with
    :class:`~storage.errors.LeaseHeldError` having done nothing. A lease not renewed within
    ``ttl_s`` (its run died or hung) is free; so is one whose process is gone on this machine.
    """

    ttl_s: float = Field(default=120.0, ge=5, description="seconds a lease outlives its heartbeat")
    wait_s: float = Field(default=0.0, ge=0, description="seconds to wait for a held lease")
    poll_s: float = Field(default=2.0, gt=0, description="seconds between looks while waiting")


class EngineConfig(_Section):
    """Everything a data-engine run needs, validated at once."""

    root: str = Field(..., min_length=1, description="storage root: a folder or s3://bucket/p")
    endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, moto)")
    run_name: str = Field(
        default="engine", min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="names commits"
    )
    seed: int = 0
    source: SourceConfig = Field(default_factory=SourceConfig)
    label_studio: LabelStudioConfig = Field(default_factory=LabelStudioConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    annotator: AnnotatorConfig = Field(default_factory=AnnotatorConfig)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    stage3: Stage3Config = Field(default_factory=Stage3Config)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    lease: LeaseConfig = Field(default_factory=LeaseConfig)

    @model_validator(mode="after")
    def _ground_truth_for_simulation(self) -> EngineConfig:
        # A simulated person needs the truth to click towards; a real source must bring it.
        if not self.source.synthetic:
            if self.annotator.kind == "simulated" and self.source.pool_coco is None:
                raise ValueError(
                    "annotator.kind = 'simulated' on a real image source needs source.pool_coco "
                    "(ground truth to click towards); use annotator.kind = 'label_studio'"
                )
            if self.source.holdout is None or self.source.holdout_coco is None:
                raise ValueError(
                    "a real image source needs source.holdout and source.holdout_coco "
                    "(images and ground truth to evaluate each model version on)"
                )
        return self

    def stage(self, number: int) -> Stage1Config | Stage2Config | Stage3Config:
        """The section of stage ``number`` (1, 2 or 3)."""
        sections: dict[int, Stage1Config | Stage2Config | Stage3Config] = {
            1: self.stage1,
            2: self.stage2,
            3: self.stage3,
        }
        if number not in sections:
            raise ConfigError(f"stage must be 1, 2 or 3, got {number!r}")
        return sections[number]

    def replay_fraction(self, number: int) -> float:
        """Share of stage ``number``'s retrain images replayed from the pretraining scenes:
        the stage's ``train.replay_fraction``, or by default 0.5 when the engine pretrained the
        base model and 0 when it started from ``model.checkpoint`` (nothing to rehearse)."""
        fraction = self.stage(number).train.replay_fraction
        if fraction is not None:
            return fraction
        return _DEFAULT_REPLAY_FRACTION if self.model.checkpoint is None else 0.0

    def pool_images_needed(self) -> int:
        """Pool images the three stages consume (each image is used by one round only)."""
        return sum(s.rounds * s.images_per_round for s in (self.stage1, self.stage2, self.stage3))

    def redacted(self) -> dict[str, Any]:
        """The config as plain JSON-able data with the token masked (for logs and reports)."""
        return json.loads(self.model_dump_json())


def parse_config(
    data: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    origin: str = "config",
) -> EngineConfig:
    """Validate ``data`` (a config dict) with environment overrides applied on top.

    Args:
        data: the parsed file (nested dicts).
        environ: the environment to read overrides from; None means no overrides.
        origin: what ``data`` came from, named in the error message.

    Raises:
        ConfigError: listing every unknown key and every wrong value at once.
    """
    merged, problems = _apply_environment(dict(data), environ or {})
    try:
        config = EngineConfig.model_validate(merged)
    except ValidationError as err:
        problems.extend(_describe(e) for e in err.errors())
    else:
        if not problems:
            return config
    lines = "\n".join(f"  - {p}" for p in problems)
    raise ConfigError(f"{origin}: {len(problems)} problem(s):\n{lines}")


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> EngineConfig:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config, apply overrides, validate.

    Args:
        path: the config file; None starts from an empty document (defaults + overrides).
        environ: environment variables for ``DATA_ENGINE_*`` / ``LABEL_STUDIO_*`` overrides.
        overrides: nested values applied after the file and before the environment (the CLI's
            own options, e.g. ``{"root": "./engine-data"}``).

    Raises:
        ConfigError: the file is missing, unparsable, of an unknown type, or invalid.
    """
    data: dict[str, Any] = {}
    origin = "config"
    if path is not None:
        p = Path(path)
        origin = str(p)
        data = _read_file(p)
    _deep_update(data, dict(overrides or {}))
    return parse_config(data, environ=environ, origin=origin)


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: expected a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path} is not valid {suffix[1:].upper()}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def _apply_environment(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """Overlay ``DATA_ENGINE_*`` and ``LABEL_STUDIO_*`` variables; unknown names are problems."""
    problems: list[str] = []
    for var, key in _LABEL_STUDIO_ENV.items():
        if environ.get(var):
            data.setdefault("label_studio", {})
            if isinstance(data["label_studio"], dict):
                data["label_studio"][key] = environ[var]
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in var[len(ENV_PREFIX) :].split("__")]
        if not _known_path(path):
            problems.append(f"{var}: unknown setting {'.'.join(path)!r}")
            continue
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                problems.append(f"{var}: {part!r} is not a section")
                break
        else:
            target[path[-1]] = _parse_env_value(environ[var])
    return data, problems


def _known_path(path: list[str]) -> bool:
    model: type[BaseModel] = EngineConfig
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif i != len(path) - 1:
            return False
    return True


def _parse_env_value(raw: str) -> Any:
    """``"null"`` and ``"none"`` (any case) mean None; everything else pydantic coerces."""
    return None if raw.strip().lower() in ("null", "none") else raw


def _deep_update(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def _describe(error: Mapping[str, Any]) -> str:
    loc = ".".join(str(part) for part in error.get("loc", ())) or "(top level)"
    if error.get("type") == "extra_forbidden":
        return f"{loc}: unknown key"
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "missing":
        return f"{loc}: required but missing"
    secret = any(str(part) in _SECRET_FIELDS for part in error.get("loc", ()))
    value = error.get("input")
    if secret or isinstance(value, dict | list) or value is None:
        return f"{loc}: {message}"
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{loc}: {message} (got {shown})"


def training_minutes(config: EngineConfig) -> float:
    """Minutes of training the config budgets: pretraining plus every retrain (0 if step-only)."""
    total = 0.0 if config.model.checkpoint else (config.model.pretrain.minutes or 0.0)
    for number in (1, 2, 3):
        section = config.stage(number)
        total += section.rounds * (section.train.minutes or 0.0)
    return total


def demo_config(
    root: str,
    *,
    images: int | None = None,
    minutes: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> EngineConfig:
    """The demo's config: the defaults on the synthetic source, resized.

    Args:
        root: storage root.
        images: pool images the three stages use in all (default: the defaults' total); each
            stage keeps its share and every round gets at least one image.
        minutes: minutes of training in all, pretraining included (default: the defaults'
            total); every budget is scaled by the same factor.
        environ: ``DATA_ENGINE_*`` overrides applied on top.
    """
    base = parse_config({"root": root})
    data: dict[str, Any] = {"root": root}
    if images is not None:
        if images < 1:
            raise ConfigError(f"--images must be at least 1, got {images}")
        factor = images / base.pool_images_needed()
        for number in (1, 2, 3):
            section = base.stage(number)
            per_round = max(1, round(section.images_per_round * factor))
            data[f"stage{number}"] = {"images_per_round": per_round}
    if minutes is not None:
        if minutes <= 0:
            raise ConfigError(f"--minutes must be positive, got {minutes}")
        factor = minutes / training_minutes(base)
        data["model"] = {"pretrain": {"minutes": (base.model.pretrain.minutes or 0) * factor}}
        for number in (1, 2, 3):
            train = {"minutes": (base.stage(number).train.minutes or 0) * factor}
            data.setdefault(f"stage{number}", {})["train"] = train
    return parse_config(data, environ=environ, origin="demo settings")
