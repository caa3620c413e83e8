"""Box prompts through virtual clicks (``box_clicks``, on for ``tiny``).

``tiny``'s decoder finds an object mostly through its clicks: the instance code is read at the
clicked pixel (``engine.modeling.instance_embedding``). A box alone has no clicked pixel, and
from scratch the decoder learns little more than to fill the box (holdout box mIoU 0.45, below
the 0.54 of the filled box itself). So a box without clicks is decoded as the box plus one
virtual positive click, at each of a 3x3 grid of points inside it (at 30, 50 and 70 % of its
width and height); training shows the decoder such prompts (a box, then corrective clicks).
Of the nine answers, the one kept scores best on the box's own statement of the object's
extent plus the model's confidence: the IoU between the answer's tight box and the prompt box,
plus its predicted IoU. With ``multimask_output`` the three best are returned, best first.

Everything is in the model's input frame (pixels); the logits are the decoder's low-res ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.modeling.sam import Sam

__all__ = ["BOX_CLICK_FRACTIONS", "box_fit", "decode_box_clicks", "virtual_clicks"]

#: Where the virtual clicks sit inside a box, as fractions of its width and height.
BOX_CLICK_FRACTIONS = (0.3, 0.5, 0.7)

# Prompts decoded in one pass (9 per box): bounds the transformer's memory for big batches.
_CHUNK = 256


def virtual_clicks(boxes: torch.Tensor) -> torch.Tensor:
    """``(B, 4)`` XYXY boxes -> ``(B, K, 2)`` xy points on the ``BOX_CLICK_FRACTIONS`` grid
    (K = 9, row-major, the box's centre in the middle)."""
    fractions = torch.tensor(BOX_CLICK_FRACTIONS, dtype=boxes.dtype, device=boxes.device)
    fy, fx = torch.meshgrid(fractions, fractions, indexing="ij")
    x0, y0, x1, y1 = boxes.unbind(-1)
    xs = x0[:, None] + fx.flatten()[None] * (x1 - x0)[:, None]
    ys = y0[:, None] + fy.flatten()[None] * (y1 - y0)[:, None]
    return torch.stack([xs, ys], dim=-1)


def box_fit(logits: torch.Tensor, boxes: torch.Tensor, input_size: int) -> torch.Tensor:
    """IoU between each mask's tight box and its prompt box.

    Args:
        logits: ``(B, K, h, w)`` low-res logits over the model's square input frame.
        boxes: ``(B, 4)`` XYXY prompt boxes, input-frame pixels (inclusive ends).
        input_size: side of the input frame, pixels.

    Returns:
        ``(B, K)`` float in [0, 1]; 0 for an empty mask. A low-res pixel covers
        ``input_size / w`` input pixels, and a mask's box spans its pixels whole.
    """
    h, w = logits.shape[-2:]
    inside = logits > 0
    rows = inside.any(dim=-1)  # (B, K, h)
    cols = inside.any(dim=-2)  # (B, K, w)
    empty = ~rows.any(dim=-1)

    def ends(occupied: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(n, device=occupied.device)
        first = torch.where(occupied, index, n).amin(dim=-1)
        last = torch.where(occupied, index, -1).amax(dim=-1)
        return first.float(), last.float()

    y0, y1 = ends(rows, h)
    x0, x1 = ends(cols, w)
    sy, sx = input_size / h, input_size / w
    mask_box = torch.stack([x0 * sx, y0 * sy, (x1 + 1) * sx, (y1 + 1) * sy], dim=-1)
    prompt = boxes.float()[:, None].clone()
    prompt[..., 2:] = prompt[..., 2:] + 1  # inclusive ends -> pixel edges
    lo = torch.maximum(mask_box[..., :2], prompt[..., :2])
    hi = torch.minimum(mask_box[..., 2:], prompt[..., 2:])
    inter = (hi - lo).clamp_min(0).prod(dim=-1)
    area = (mask_box[..., 2:] - mask_box[..., :2]).prod(-1) + (
        prompt[..., 2:] - prompt[..., :2]
    ).prod(-1)
    fit = inter / (area - inter).clamp_min(1e-6)
    return torch.where(empty, torch.zeros_like(fit), fit)


def decode_box_clicks(
    model: Sam,
    image_embeddings: torch.Tensor,
    boxes: torch.Tensor,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode box prompts with virtual clicks and keep the best-fitting answers.

    Args:
        model: the ``Sam`` whose prompt encoder and decoder run.
        image_embeddings: ``(1, C, h, w)`` the image's embedding.
        boxes: ``(B, 4)`` XYXY input-frame pixels.
        multimask_output: return the three best answers instead of the best one.

    Returns:
        low-res logits ``(B, M, 4h, 4w)`` and predicted IoU ``(B, M)``, M = 3 or 1, best first.
    """
    clicks = virtual_clicks(boxes)  # (B, K, 2)
    b, k = clicks.shape[:2]
    coords = clicks.reshape(b * k, 1, 2)
    labels = torch.ones((b * k, 1), dtype=torch.int64, device=boxes.device)
    repeated = boxes.repeat_interleave(k, dim=0)
    image_pe = model.prompt_encoder.get_dense_pe()
    logits_parts: list[torch.Tensor] = []
    iou_parts: list[torch.Tensor] = []
    for start in range(0, b * k, _CHUNK):
        part = slice(start, start + _CHUNK)
        points = (coords[part], labels[part])
        sparse, dense = model.prompt_encoder(points=points, boxes=repeated[part], masks=None)
        low_res, iou = model.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            points=points,
        )
        logits_parts.append(low_res)
        iou_parts.append(iou)
    logits = torch.cat(logits_parts).reshape(b, k, *logits_parts[0].shape[-2:])
    iou = torch.cat(iou_parts).reshape(b, k)
    score = box_fit(logits, boxes, model.img_size) + iou.float()
    keep = score.topk(3 if multimask_output else 1, dim=1).indices  # (B, M)
    rows = torch.arange(b, device=boxes.device)[:, None]
    return logits[rows, keep], iou[rows, keep]
