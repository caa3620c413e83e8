"""SAM's interactive training simulation for one step: prompts, rounds and the loss.

Per mask (Kirillov et al. 2023, section 3 and appendix A):

1. The first prompt is, with equal chance, a point drawn uniformly inside the mask or the mask's
   box with noise. A lone point is ambiguous, so its round uses the three multimask outputs; a
   box uses the single-mask output.
2. Each later round adds one point drawn uniformly from the error region between the previous
   prediction and the ground truth (positive in a false negative, negative in a false positive;
   ``max_points_per_round > 1`` adds between one and that many at once, so a run with few
   rounds still shows the model prompts with as many clicks as an annotator makes)
   and feeds the previous round's unthresholded low-res logits back as the mask prompt; from
   round 2 on the model sees several prompts, so the single-mask output is used.
3. ``no_point_rounds`` rounds add no point, so the model learns to refine from its own mask: one
   always at the end, the others at random among the middle rounds.
4. With multimask output, the mask carried forward is the one with the highest predicted IoU
   and only the output with the lowest loss is backpropagated; the IoU head learns the true IoU
   of every output it produced (MSE).

All masks of all images in the step go through the decoder together; the image encoder runs
once per step and every round reuses its output. Round-to-round mask prompts are detached (the
gradient of one round does not flow into the previous one), as in the public SAM recipes.

Where the loss is taken: by default on the decoder's low-res grid (``4x`` the embedding: half the
input side for ``tiny``, a quarter for the ViTs) against the ground truth average-pooled onto it
(soft targets: the share of each low-res pixel the object covers). The IoU head learns the IoU
there, a low-res pixel counting as object when at least half of it is. ``loss_at_low_res=False``
upsamples every output to the input size first (the paper does not say which): the same
comparison over 4x (ViTs: 16x) the pixels, ~40% of a ``tiny`` step on a CPU. Error points are
drawn at the input resolution either way.

A model with an instance code (``tiny``) also learns the code: the discriminative loss of
``engine.training.losses.instance_loss`` on every mask of the step, weighted by
``instance_loss_weight`` and added once per step (the encoder runs once).

Frames: everything is in the model's padded input square; points are xy pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from engine.training.losses import FOCAL_WEIGHT, instance_loss, mask_iou, mask_loss
from engine.training.prompts import (
    PAD_LABEL,
    noisy_boxes,
    sample_points_in_masks,
    sample_several_error_points,
)

if TYPE_CHECKING:
    from engine.modeling.sam import Sam

__all__ = ["SimulationResult", "no_point_round_indexes", "simulate_interactive"]

# Point labels of the prompt encoder (see engine.modeling.prompt_encoder).
_POSITIVE, _BOX_TOP_LEFT, _BOX_BOTTOM_RIGHT = 1, 2, 3


@dataclass(frozen=True)
class SimulationResult:
    """The loss of one step and what it measured.

    Attributes:
        loss: scalar to backpropagate (mean over rounds of mask loss + IoU loss, plus the
            weighted instance loss).
        mask_loss: mean focal*20 + dice of the kept outputs, float.
        iou_loss: mean MSE of the IoU head, float.
        instance_loss: the instance code's discriminative loss, float (0 without a code).
        first_iou: mean IoU of the kept mask after the first prompt, float in [0, 1].
        last_iou: mean IoU after the last round, float in [0, 1].
        masks: number of masks simulated.
    """

    loss: torch.Tensor
    mask_loss: float
    iou_loss: float
    instance_loss: float
    first_iou: float
    last_iou: float
    masks: int


def no_point_round_indexes(
    num_rounds: int, no_point_rounds: int, generator: torch.Generator
) -> set[int]:
    """Which rounds add no new point: always the last, the rest at random among the middle.

    Round 0 is the first prompt and always has one. Raises ValueError when the counts do not
    fit (``no_point_rounds`` must be below ``num_rounds``).
    """
    if num_rounds < 1 or not 0 <= no_point_rounds < num_rounds:
        raise ValueError(
            f"num_rounds={num_rounds}, no_point_rounds={no_point_rounds}; expected "
            "num_rounds >= 1 and 0 <= no_point_rounds < num_rounds"
        )
    if no_point_rounds == 0:
        return set()
    middle = torch.randperm(max(0, num_rounds - 2), generator=generator, device=generator.device)
    middle = middle.cpu() + 1
    return {num_rounds - 1, *(int(r) for r in middle[: no_point_rounds - 1])}


def simulate_interactive(
    model: Sam,
    images: torch.Tensor,
    gt: torch.Tensor,
    image_index: torch.Tensor,
    *,
    num_rounds: int,
    no_point_rounds: int,
    generator: torch.Generator,
    freeze_image_encoder: bool = False,
    focal_alpha: float = 0.25,
    focal_weight: float = FOCAL_WEIGHT,
    focal_gamma: float = 2.0,
    loss_at_low_res: bool = True,
    max_points_per_round: int = 1,
    instance_loss_weight: float = 1.0,
    iou_loss_weight: float = 1.0,
) -> SimulationResult:
    """Run the simulation for a batch of masks and return the loss.

    Args:
        model: a ``Sam`` (in train mode).
        images: ``(B, 3, S, S)`` preprocessed (normalised, padded) images.
        gt: ``(M, S, S)`` bool ground-truth masks, every one non-empty.
        image_index: ``(M,)`` int64, the image each mask belongs to.
        num_rounds: rounds per mask (SAM: 11).
        no_point_rounds: rounds without a new point (SAM: 2).
        generator: the random source for prompts (on the masks' device).
        freeze_image_encoder: run the encoder without gradients.
        focal_alpha: the focal loss's foreground weight (negative: none).
        focal_weight: weight of the focal term against dice (SAM: 20).
        focal_gamma: the focal loss's focusing exponent (0 with no alpha: plain BCE).
        loss_at_low_res: take the loss on the low-res grid against pooled targets (else on
            logits upsampled to the input size).
        max_points_per_round: each round that adds points adds, per mask, a number drawn
            uniformly from 1 to this, every one from the current error region (1: SAM's one
            point a round).
        instance_loss_weight: weight of the instance code's loss (models with a code; not
            taken with a frozen encoder).
        iou_loss_weight: weight of the IoU head's MSE against the mask loss (SAM: 1).
    """
    no_point = no_point_round_indexes(num_rounds, no_point_rounds, generator)
    if freeze_image_encoder:
        with torch.no_grad():
            embeddings = model.image_encoder(images)
    else:
        embeddings = model.image_encoder(images)
    code = model.mask_decoder.split_embedding(embeddings)[1]
    code_loss = (
        instance_loss(code, gt, image_index)
        if code is not None and not freeze_image_encoder and instance_loss_weight > 0
        else None
    )
    per_mask = embeddings[image_index]  # (M, C, h, w): one copy per prompt, shared gradient
    image_pe = model.prompt_encoder.get_dense_pe()
    size = gt.shape[-2:]
    m = gt.shape[0]
    rows = torch.arange(m, device=gt.device)

    low_h, low_w = model.prompt_encoder.mask_input_size
    if loss_at_low_res and (size[0] % low_h or size[1] % low_w):
        raise ValueError(f"gt size {tuple(size)} is not a multiple of the low-res {low_h}x{low_w}")
    # Soft targets on the low-res grid (the covered share of each low-res pixel), or the truth.
    target = (
        F.avg_pool2d(gt[:, None].float(), (size[0] // low_h, size[1] // low_w))[:, 0]
        if loss_at_low_res
        else gt
    )

    coords, labels, multimask = _first_prompts(gt, generator)
    mask_prompt: torch.Tensor | None = None
    pred = gt  # replaced after round 0, before any error point is drawn
    losses: list[torch.Tensor] = []
    mask_terms: list[torch.Tensor] = []
    iou_terms: list[torch.Tensor] = []
    round_ious: list[torch.Tensor] = []
    for r in range(num_rounds):
        if r > 0 and r not in no_point:
            new_coords, new_labels = sample_several_error_points(
                pred, gt, generator, max_points_per_round
            )
            coords = torch.cat([coords, new_coords], dim=1)
            labels = torch.cat([labels, new_labels], dim=1)
        sparse = model.prompt_encoder.embed_points(coords, labels, pad=False)
        dense = model.prompt_encoder.embed_dense((coords, labels), None, mask_prompt, batch=m)
        low_res, iou_pred = model.mask_decoder.predict_masks(
            per_mask, image_pe, sparse, dense, (coords, labels)
        )
        if r > 0:  # several prompts from here on: only the single-mask output
            low_res, iou_pred = low_res[:, :1], iou_pred[:, :1]
            valid = torch.ones((m, 1), dtype=torch.bool, device=gt.device)
        else:
            valid = torch.stack([~multimask, multimask, multimask, multimask], dim=1)
        logits = (
            low_res
            if loss_at_low_res
            else F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)
        )
        per_output = mask_loss(
            logits,
            target,
            focal_alpha=focal_alpha,
            focal_weight=focal_weight,
            focal_gamma=focal_gamma,
        )
        true_iou = mask_iou(logits, target >= 0.5)
        inf = torch.full_like(per_output, float("inf"))
        best_loss = torch.where(valid, per_output, inf).min(dim=1).values
        iou_mse = ((iou_pred - true_iou) ** 2 * valid).sum(1) / valid.sum(1)
        losses.append((best_loss + iou_loss_weight * iou_mse).mean())
        mask_terms.append(best_loss.detach().mean())
        iou_terms.append(iou_mse.detach().mean())
        # Carry forward the output the model itself rates best (it cannot see the ground truth).
        chosen = torch.where(valid, iou_pred.detach(), -inf).argmax(dim=1)
        kept = low_res.detach()[rows, chosen][:, None]
        pred = F.interpolate(kept, size=size, mode="bilinear", align_corners=False)[:, 0] > 0
        round_ious.append(true_iou[rows, chosen].mean())
        mask_prompt = kept
    loss = torch.stack(losses).mean()
    if code_loss is not None:
        loss = loss + instance_loss_weight * code_loss
    return SimulationResult(
        loss=loss,
        mask_loss=float(torch.stack(mask_terms).mean()),
        iou_loss=float(torch.stack(iou_terms).mean()),
        instance_loss=float(code_loss.detach()) if code_loss is not None else 0.0,
        first_iou=float(round_ious[0]),
        last_iou=float(round_ious[-1]),
        masks=m,
    )


def _first_prompts(
    gt: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First prompts, point or noisy box with equal chance, as two point tokens per mask.

    Returns coords ``(M, 2, 2)`` xy, labels ``(M, 2)`` and ``multimask`` ``(M,)`` bool (True for
    a point prompt). A point prompt is the point plus a padding token; a box is its two corners
    (labels 2 and 3), so both kinds share one batch with the same token count.
    """
    m = gt.shape[0]
    use_point = torch.rand(m, generator=generator, device=gt.device) < 0.5
    points = sample_points_in_masks(gt, generator)
    boxes = noisy_boxes(gt, generator)
    point_coords = torch.stack([points, torch.zeros_like(points)], dim=1)
    box_coords = boxes.reshape(m, 2, 2)
    coords = torch.where(use_point[:, None, None], point_coords, box_coords)
    point_labels = torch.tensor([_POSITIVE, PAD_LABEL], device=gt.device)
    box_labels = torch.tensor([_BOX_TOP_LEFT, _BOX_BOTTOM_RIGHT], device=gt.device)
    labels = torch.where(use_point[:, None], point_labels, box_labels)
    return coords, labels, use_point
