"""The training loop: SAM's interactive recipe on any :class:`TrainingData`, read top to bottom.

``train(model, data, config)`` runs until ``config.steps`` (or the ``config.minutes`` budget of
training time), one optimizer step per batch of ``images_per_step`` images with up to
``masks_per_image`` masks each. Around it sit small pure helpers: :func:`lr_at` (warm-up then step
decay), :func:`param_groups` (no weight decay on norms and biases, after nanoGPT) and
:func:`collate`.

Reproducibility: the data and prompts of step ``k`` come from generators seeded by
``(config.seed, k)``, so a run resumed from a checkpoint at step ``k`` continues exactly as the
uninterrupted run would have (same samples, same optimizer state).

A non-finite loss or gradient stops the run with :class:`TrainingError` *before* the optimizer
applies it, after saving the still-good weights to ``checkpoint_uri``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from engine.training.data import TrainingData, TrainSample
from engine.training.distributed import (
    average_gradients,
    broadcast_parameters,
    mean_across_ranks,
    rank_and_world,
    rank_zero_decides,
)
from engine.training.losses import FOCAL_WEIGHT
from engine.training.simulation import simulate_interactive
from storage.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from engine.modeling.sam import Sam

__all__ = [
    "StepLog",
    "TrainConfig",
    "TrainResult",
    "collate",
    "focal_weight_at",
    "lr_at",
    "no_point_rounds_for",
    "param_groups",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    Attributes:
        steps: optimizer steps of the whole run (the schedule's length); with ``minutes`` set,
            a cap (None: no cap).
        minutes: budget of training time, minutes (evaluation callbacks do not count); the lr
            schedule then follows the elapsed fraction of the budget.
        images_per_step: images encoded per step.
        masks_per_image: masks drawn at random from each image per step (all if fewer).
        repeat_masks: fill ``masks_per_image`` by prompting masks again (fresh prompts) when an
            image has fewer: the decoder sees more prompts per encoder pass, which is cheap.
        num_rounds: interactive rounds per mask (SAM: 11).
        no_point_rounds: rounds that add no new point (SAM: 2).
        instance_loss_weight: weight of the instance code's discriminative loss (models with
            a code, i.e. ``tiny``; see ``engine.training.losses.instance_loss``).
        iou_loss_weight: weight of the IoU head's MSE against the mask loss (SAM: 1); the
            generator's confidence gates read that head.
        max_points_per_round: each round that adds points adds 1 to this many per mask (SAM:
            1); with a few rounds, more lets the model see prompts of many clicks.
        lr: peak learning rate.
        betas: AdamW betas.
        weight_decay: AdamW weight decay on weight matrices and conv kernels.
        warmup_steps: linear warm-up from lr/warmup_steps to lr, steps.
        decay_at: fractions of the run after which the lr is multiplied by ``decay_factor``.
        decay_factor: the step decay factor (SAM: 0.1).
        grad_clip: max global gradient norm (0: no clipping).
        freeze_image_encoder: train only the prompt encoder and mask decoder.
        focal_alpha: foreground weight of the focal loss (RetinaNet's 0.25; negative: none).
        focal_weight: weight of the focal term against dice (SAM: 20). From random weights on
            small objects, 20 makes the single-mask output predict nothing (an empty mask is the
            cheapest answer while the model cannot yet tell where the object is); a dice-led
            loss trains faster (the test fixture uses 0: dice only).
        focal_gamma: the focal loss's focusing exponent (RetinaNet and SAM: 2). With 0 and
            ``focal_alpha < 0`` the term is plain binary cross-entropy.
        focal_warmup_steps: ramp the focal weight linearly from 0 to ``focal_weight`` over these
            steps (0: none). From random weights, the focal term alone drives every logit negative
            (small objects are a tiny share of the pixels) before the decoder has learnt where
            a prompt points; dice first keeps the masks alive through that phase.
        loss_at_low_res: take the mask loss on the decoder's low-res grid against pooled
            targets, not on logits upsampled to the input (see ``engine.training.simulation``);
            on a CPU it makes a ``tiny`` step ~1.3x faster.
        seed: seeds data, prompts and nothing else (the model is built by the caller).
        checkpoint_every: steps between checkpoints to ``checkpoint_uri`` (0: only at the end).
    """

    steps: int | None = 2000
    minutes: float | None = None
    images_per_step: int = 2
    masks_per_image: int = 8
    repeat_masks: bool = False
    num_rounds: int = 11
    no_point_rounds: int = 2
    max_points_per_round: int = 1
    instance_loss_weight: float = 1.0
    iou_loss_weight: float = 1.0
    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.1
    warmup_steps: int = 250
    decay_at: tuple[float, ...] = (0.8, 0.95)
    decay_factor: float = 0.1
    grad_clip: float = 1.0
    freeze_image_encoder: bool = False
    focal_alpha: float = 0.25
    focal_weight: float = FOCAL_WEIGHT
    focal_gamma: float = 2.0
    focal_warmup_steps: int = 0
    loss_at_low_res: bool = True
    seed: int = 0
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ConfigError("TrainConfig needs steps or minutes; got neither")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"TrainConfig.steps is {self.steps}; expected >= 0")
        if self.minutes is not None and not self.minutes > 0:
            raise ConfigError(f"TrainConfig.minutes is {self.minutes}; expected > 0")
        if self.images_per_step < 1 or self.masks_per_image < 1:
            raise ConfigError(
                f"images_per_step={self.images_per_step}, masks_per_image="
                f"{self.masks_per_image}; expected both >= 1"
            )
        if self.num_rounds < 1 or not 0 <= self.no_point_rounds < self.num_rounds:
            raise ConfigError(
                f"num_rounds={self.num_rounds}, no_point_rounds={self.no_point_rounds}; expected "
                "num_rounds >= 1 and 0 <= no_point_rounds < num_rounds"
            )
        if not self.iou_loss_weight >= 0:
            raise ConfigError(
                f"TrainConfig.iou_loss_weight is {self.iou_loss_weight}; expected >= 0"
            )
        if not self.instance_loss_weight >= 0:
            raise ConfigError(
                f"TrainConfig.instance_loss_weight is {self.instance_loss_weight}; expected >= 0"
            )
        if self.max_points_per_round < 1:
            raise ConfigError(
                f"TrainConfig.max_points_per_round is {self.max_points_per_round}; expected >= 1"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StepLog:
    """What one step measured: loss terms and IoUs (see ``SimulationResult``), lr, seconds."""

    step: int
    loss: float
    mask_loss: float
    iou_loss: float
    instance_loss: float
    first_iou: float
    last_iou: float
    lr: float
    masks: int
    train_s: float


@dataclass
class TrainResult:
    """The outcome of :func:`train`.

    Attributes:
        step: the step count reached (optimizer steps since the run began, resumes included).
        train_s: training time of this call, seconds (callbacks excluded).
        samples: masks simulated in this call.
        history: one :class:`StepLog` per step of this call.
        optimizer_state: the AdamW state, for a later resume.
    """

    step: int
    train_s: float
    samples: int
    history: list[StepLog] = field(default_factory=list)
    optimizer_state: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_s if self.train_s > 0 else 0.0

    @property
    def final_loss(self) -> float:
        return self.history[-1].loss if self.history else math.nan


def train(
    model: Sam,
    data: TrainingData,
    config: TrainConfig,
    *,
    start_step: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    checkpoint_uri: str | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
    on_step: Callable[[StepLog], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` (a ``Sam``) in place with SAM's interactive recipe.

    Args:
        model: the model to train (on any device; data follow it).
        data: where samples come from.
        config: the run's settings.
        start_step: the step to start from (a resumed run's checkpoint step).
        optimizer_state: AdamW state to restore (a resumed run's).
        checkpoint_uri: where checkpoints go (every ``config.checkpoint_every`` steps and at the
            end; a NaN leaves the last one in place); None: no checkpoints.
        checkpoint_meta: ``version``, ``parent`` and ``trained_on`` for those checkpoints.
        on_step: called after every step with its log; its time does not count as training.
        progress: show a tqdm bar with loss and steps/s.

    Raises:
        TrainingError: the loss or the gradient became NaN or infinite.
    """
    device = next(model.parameters()).device
    rank, world = rank_and_world()
    broadcast_parameters(model)  # every rank starts from rank 0's weights
    model.train()
    if config.freeze_image_encoder:
        model.image_encoder.requires_grad_(False)
        model.image_encoder.eval()  # frozen: its norm layers use no batch statistics anyway
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, fused=True
    )
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    budget_s = config.minutes * 60 if config.minutes is not None else None
    result = TrainResult(step=start_step, train_s=0.0, samples=0)
    bar = tqdm(total=config.steps, initial=start_step, disable=not progress, unit="step")
    step = start_step
    saved_step: int | None = None
    try:
        while rank_zero_decides(_keep_going(step, result.train_s, config, budget_s), device):
            t0 = time.perf_counter()
            fraction = (
                result.train_s / budget_s
                if budget_s is not None
                else step / max(1, config.steps or 1)
            )
            lr = lr_at(step, fraction, config)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Rank 0 draws what a single process would; every other rank its own samples.
            rng = np.random.default_rng([config.seed, step] + ([rank] if rank else []))
            generator = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
            samples = [data.sample(rng) for _ in range(config.images_per_step)]
            images, gt, image_index = collate(
                samples, model, config.masks_per_image, rng, repeat=config.repeat_masks
            )

            sim = simulate_interactive(
                model,
                images,
                gt,
                image_index,
                num_rounds=config.num_rounds,
                no_point_rounds=config.no_point_rounds,
                max_points_per_round=config.max_points_per_round,
                instance_loss_weight=config.instance_loss_weight,
                iou_loss_weight=config.iou_loss_weight,
                generator=generator,
                freeze_image_encoder=config.freeze_image_encoder,
                focal_alpha=config.focal_alpha,
                focal_weight=focal_weight_at(step, config),
                focal_gamma=config.focal_gamma,
                loss_at_low_res=config.loss_at_low_res,
            )
            optimizer.zero_grad(set_to_none=True)
            sim.loss.backward()
            trainable = [p for g in optimizer.param_groups for p in g["params"]]
            average_gradients(trainable)
            # The step's loss and masks over all ranks: the same on each, so all stop together.
            loss, masks = mean_across_ranks(
                torch.stack([sim.loss.detach(), torch.tensor(float(sim.masks), device=device)])
            ).tolist()
            if not math.isfinite(loss):
                _stop_on_nan("loss", torch.tensor(loss), step, checkpoint_uri, saved_step)
            if config.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            else:
                norm = torch.norm(
                    torch.stack([p.grad.norm() for p in trainable if p.grad is not None])
                )
            if not torch.isfinite(norm):
                _stop_on_nan("gradient norm", norm, step, checkpoint_uri, saved_step)
            optimizer.step()
            step += 1

            dt = time.perf_counter() - t0
            result.train_s += dt
            result.samples += round(masks * world)
            log = StepLog(
                step=step,
                loss=loss,
                mask_loss=sim.mask_loss,
                iou_loss=sim.iou_loss,
                instance_loss=sim.instance_loss,
                first_iou=sim.first_iou,
                last_iou=sim.last_iou,
                lr=lr,
                masks=round(masks * world),
                train_s=result.train_s,
            )
            result.history.append(log)
            bar.update(1)
            bar.set_postfix(
                loss=f"{log.loss:.3f}",
                iou1=f"{log.first_iou:.2f}",
                steps_s=f"{len(result.history) / result.train_s:.2f}",
            )
            if (
                checkpoint_uri
                and rank == 0
                and config.checkpoint_every
                and step % config.checkpoint_every == 0
            ):
                _save(model, optimizer, step, checkpoint_uri, checkpoint_meta, config)
                saved_step = step
            if on_step is not None:
                on_step(log)
    finally:
        bar.close()
        if config.freeze_image_encoder:  # hand the model back trainable as it came
            model.image_encoder.requires_grad_(True)
    result.step = step
    result.optimizer_state = optimizer.state_dict()
    if checkpoint_uri and rank == 0:
        _save(model, optimizer, step, checkpoint_uri, checkpoint_meta, config)
    model.eval()
    return result


def no_point_rounds_for(num_rounds: int) -> int:
    """SAM's share of rounds without a new point (2 of the 10 after the first), for any count.

    11 rounds -> 2, 6 -> 1, 3 -> 0: short simulations keep their corrective clicks.
    """
    return round(2 * max(0, num_rounds - 1) / 10)


def lr_at(step: int, fraction: float, config: TrainConfig) -> float:
    """Learning rate at ``step`` with ``fraction`` of the run done: linear warm-up, step decay."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    decays = sum(1 for at in config.decay_at if fraction >= at)
    return config.lr * warm * config.decay_factor**decays


def focal_weight_at(step: int, config: TrainConfig) -> float:
    """Weight of the focal term at ``step``: ``focal_weight``, ramped up over
    ``focal_warmup_steps``."""
    if config.focal_warmup_steps <= 0:
        return config.focal_weight
    return config.focal_weight * min(1.0, step / config.focal_warmup_steps)


def param_groups(model: Sam, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: matrices/kernels decay, vectors do not.

    (nanoGPT's rule: every tensor with 2+ dimensions decays; biases, norm scales and single
    embedding rows do not.)
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def collate(
    samples: list[TrainSample],
    model: Sam,
    masks_per_image: int,
    rng: np.random.Generator,
    *,
    repeat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack samples into a step's batch on the model's device.

    Returns preprocessed images ``(B, 3, S, S)``, masks ``(M, S, S)`` bool (up to
    ``masks_per_image`` per image, drawn without replacement; with ``repeat``, an image with
    fewer masks has them drawn again until there are ``masks_per_image``) and ``(M,)`` image
    indexes.
    """
    device = next(model.parameters()).device
    images = torch.stack([model.preprocess(s.image.to(device)) for s in samples])
    masks, index = [], []
    for i, sample in enumerate(samples):
        n = sample.masks.shape[0]
        pick = rng.permutation(n)[:masks_per_image]
        if repeat and n < masks_per_image:
            pick = np.concatenate([pick, rng.integers(0, n, size=masks_per_image - n)])
        masks.append(sample.masks[torch.from_numpy(pick)])
        index.extend([i] * len(pick))
    return (
        images,
        torch.cat(masks).to(device),
        torch.tensor(index, dtype=torch.int64, device=device),
    )


def _keep_going(step: int, train_s: float, config: TrainConfig, budget_s: float | None) -> bool:
    if config.steps is not None and step >= config.steps:
        return False
    return budget_s is None or train_s < budget_s


def _save(
    model: Sam,
    optimizer: torch.optim.Optimizer,
    step: int,
    uri: str,
    meta: dict[str, Any] | None,
    config: TrainConfig,
) -> None:
    from engine.checkpoint import save_checkpoint

    meta = meta or {}
    save_checkpoint(
        model,
        uri,
        version=meta.get("version"),
        parent=meta.get("parent"),
        trained_on=meta.get("trained_on"),
        step=step,
        optimizer_state=optimizer.state_dict(),
        extra={"train_config": config.to_dict(), **meta.get("extra", {})},
    )


def _stop_on_nan(
    what: str, value: torch.Tensor, step: int, uri: str | None, saved: int | None
) -> None:
    # Nothing is saved here: the checkpoint at `uri` stays the last good one written.
    if uri and saved is not None:
        kept = f"; the last good checkpoint (step {saved}) is kept at {uri}"
    elif uri:
        kept = f"; no checkpoint was written to {uri} before it (checkpoint_every is too large)"
    else:
        kept = ""
    raise TrainingError(
        f"training stopped at step {step}: the {what} is {float(value.detach())}{kept}; "
        "lower the learning rate or check the data"
    )
