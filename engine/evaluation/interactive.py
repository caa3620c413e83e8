"""Run the interactive-segmentation protocol of a model on images with ground-truth masks.

Per image the encoder runs once; then all objects of the image go through the prompt encoder and
mask decoder together, one batch per click round. Per object:

- click 1 is the simulated annotator's (:func:`engine.evaluation.clicks.next_click`) with no
  prediction yet, i.e. the deepest point of the object; the model answers with its three
  multimask outputs and the one with the highest predicted IoU is kept (SAM's rule);
- every further click corrects the current mask; all clicks so far go in as points, the previous
  low-res logits as the mask prompt, and the single-mask output is used;
- the simulation stops at ``max_clicks``, or earlier once the curve no longer changes any
  metric (IoU reached 0.90 and at least 5 clicks made) or the mask is perfect;
- separately, the tight ground-truth box (XYXY, inclusive pixel ends) is the only prompt for the
  box-prompt IoU.

With a :class:`~engine.zoom_in.ZoomIn` (the default, as RITM evaluates) every answer after the
whole image's first one is decoded again on a crop around the object, re-encoded at the model's
input size, whenever the object is small enough (see :mod:`engine.zoom_in`); objects then go one
by one. ``zoom_in=None`` decodes the whole image only, all objects of an image in one batch.

IoUs are measured at the original image resolution.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from engine.evaluation.clicks import Click, next_click
from engine.evaluation.metrics import InteractiveMetrics, mask_iou, summarize
from engine.predictor import SamPredictor
from engine.zoom_in import DEFAULT_ZOOM_IN, ZoomIn
from engine.zoom_predictor import ZoomInPredictor

if TYPE_CHECKING:
    from engine.modeling.sam import Sam

__all__ = ["EvalSample", "evaluate_interactive", "mask_boxes_xyxy"]

# Clicks after which mIoU stops being read (mIoU@5); the simulation runs at least this long.
_MIOU_CLICKS = 5
# The highest NoC threshold reported; an object past it (and past 5 clicks) is done.
_TOP_THRESHOLD = 0.90


@dataclass(frozen=True)
class EvalSample:
    """One holdout image: ``image`` ``(H, W, 3)`` uint8 RGB, ``masks`` ``(N, H, W)`` bool."""

    image: np.ndarray
    masks: np.ndarray
    image_id: str = ""


def mask_boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """Tight boxes ``(N, 4)`` float32 XYXY in pixels (inclusive ends) of ``(N, H, W)`` masks."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        ys = np.flatnonzero(mask.any(axis=1))
        xs = np.flatnonzero(mask.any(axis=0))
        if ys.size:
            boxes[i] = (xs[0], ys[0], xs[-1], ys[-1])
    return boxes


@torch.no_grad()
def evaluate_interactive(
    model: Sam,
    samples: Iterable[EvalSample],
    *,
    max_clicks: int = 20,
    max_batch: int = 64,
    progress: bool = False,
    zoom_in: ZoomIn | None = DEFAULT_ZOOM_IN,
) -> InteractiveMetrics:
    """Interactive metrics of ``model`` (a ``Sam``) over ``samples``.

    Args:
        model: the model; it is put in eval mode for the run and restored afterwards.
        samples: holdout images with their ground-truth masks (empty masks are skipped).
        max_clicks: the click budget per object (the NoC cap).
        max_batch: most objects decoded in one batch.
        progress: show a tqdm bar over images.
        zoom_in: when and how to decode small objects again on a crop (None: never).

    Raises:
        ValueError: when no sample holds a non-empty mask.
    """
    was_training = model.training
    model.eval()
    curves: list[list[float]] = []
    box_ious: list[float] = []
    images = 0
    try:
        for sample in tqdm(samples, desc="eval", unit="img", disable=not progress):
            keep = sample.masks.reshape(len(sample.masks), -1).any(axis=1)
            masks = sample.masks[keep]
            if len(masks) == 0:
                continue
            session = _ImageSession(model, sample.image)
            zooming = None
            if zoom_in is not None:
                whole = SamPredictor(model)
                whole.set_embedding(session.embedding, session.original_size)
                zooming = ZoomInPredictor(whole, np.asarray(sample.image), zoom_in)
            for start in range(0, len(masks), max_batch):
                chunk = masks[start : start + max_batch]
                if zooming is None:
                    curves.extend(_click_curves(session, chunk, max_clicks))
                else:
                    curves.extend(_zoom_curve(zooming, mask, max_clicks) for mask in chunk)
                box_ious.extend(_box_ious(session, chunk, zooming))
            images += 1
    finally:
        model.train(was_training)
    return summarize(curves, box_ious, images=images, max_clicks=max_clicks)


class _ImageSession:
    """One image encoded once; decodes batches of prompts given in original-image pixels."""

    def __init__(self, model: Sam, image: np.ndarray) -> None:
        from engine.transforms import ResizeLongestSide

        self.model = model
        self.original_size = (int(image.shape[0]), int(image.shape[1]))
        self.transform = ResizeLongestSide(model.img_size)
        if not image.flags.writeable:  # store images are read-only; torch warns on those
            image = image.copy()
        resized = self.transform.apply_image(image)
        self.input_size = (int(resized.shape[0]), int(resized.shape[1]))
        pixels = torch.as_tensor(resized, device=model.device).permute(2, 0, 1).float()
        self.embedding = model.image_encoder(model.preprocess(pixels)[None])

    def decode(
        self,
        coords: np.ndarray | None,
        labels: np.ndarray | None,
        boxes: np.ndarray | None,
        mask_input: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Masks ``(B, H, W)`` bool at the original size and their low-res logits ``(B, 1, h, w)``.

        ``coords`` ``(B, K, 2)`` xy and ``boxes`` ``(B, 4)`` XYXY are original-image pixels;
        with ``multimask`` the output with the highest predicted IoU is chosen per prompt.
        """
        device = self.model.device
        points = None
        if coords is not None and labels is not None:
            moved = self.transform.apply_coords(coords.astype(np.float64), self.original_size)
            points = (
                torch.as_tensor(moved, dtype=torch.float32, device=device),
                torch.as_tensor(labels, dtype=torch.int64, device=device),
            )
        box_tensor = None
        if boxes is not None:
            moved_boxes = self.transform.apply_boxes(boxes.astype(np.float64), self.original_size)
            box_tensor = torch.as_tensor(moved_boxes, dtype=torch.float32, device=device)
        low_res, iou_pred = self.model.decode_prompts(
            self.embedding,
            points=points,
            boxes=box_tensor,
            masks=mask_input,
            multimask_output=multimask,
        )
        best = iou_pred.argmax(dim=1)
        chosen = low_res[torch.arange(len(best), device=device), best][:, None]
        full = self.model.postprocess_masks(chosen, self.input_size, self.original_size)
        return (full[:, 0] > self.model.mask_threshold).cpu().numpy(), chosen


def _click_curves(session: _ImageSession, masks: np.ndarray, max_clicks: int) -> list[list[float]]:
    """IoU after each click for every mask of one image (curves stop early when settled)."""
    n = len(masks)
    clicks: list[list[Click]] = [[] for _ in range(n)]
    curves: list[list[float]] = [[] for _ in range(n)]
    preds: list[np.ndarray | None] = [None] * n
    logits: torch.Tensor | None = None  # (n, 1, h, w) low-res logits of every object
    active = list(range(n))
    for k in range(max_clicks):
        still: list[int] = []
        for i in active:
            click = next_click(preds[i], masks[i])
            if click is None:  # perfect: nothing left to correct
                continue
            clicks[i].append(click)
            still.append(i)
        if not still:
            break
        coords = np.array([[(c.x, c.y) for c in clicks[i]] for i in still], dtype=np.float64)
        labels = np.array([[int(c.positive) for c in clicks[i]] for i in still], dtype=np.int64)
        mask_input = None if logits is None else logits[still]
        pred, low = session.decode(coords, labels, None, mask_input, multimask=k == 0)
        if logits is None:
            logits = torch.zeros((n, *low.shape[1:]), dtype=low.dtype, device=low.device)
        logits[still] = low
        active = []
        for row, i in enumerate(still):
            preds[i] = pred[row]
            curves[i].append(mask_iou(pred[row], masks[i]))
            if k + 1 < _MIOU_CLICKS or curves[i][-1] < _TOP_THRESHOLD:
                active.append(i)
        if not active:
            break
    return curves


def _zoom_curve(predictor: ZoomInPredictor, mask: np.ndarray, max_clicks: int) -> list[float]:
    """IoU after each click for one object, through the zoom-in predictor the tools use."""
    clicks: list[Click] = []
    curve: list[float] = []
    pred: np.ndarray | None = None
    low: np.ndarray | None = None
    for k in range(max_clicks):
        click = next_click(pred, mask)
        if click is None:
            break
        clicks.append(click)
        masks, scores, low_res = predictor.predict(
            point_coords=np.array([(c.x, c.y) for c in clicks], dtype=np.float64),
            point_labels=np.array([int(c.positive) for c in clicks], dtype=np.int64),
            mask_input=low,
            multimask_output=k == 0,
        )
        best = int(np.argmax(scores))
        pred, low = masks[best], low_res[best : best + 1]
        curve.append(mask_iou(pred, mask))
        if k + 1 >= _MIOU_CLICKS and curve[-1] >= _TOP_THRESHOLD:
            break
    return curve


def _box_ious(
    session: _ImageSession, masks: np.ndarray, predictor: ZoomInPredictor | None
) -> list[float]:
    boxes = mask_boxes_xyxy(masks)
    if predictor is None:
        pred, _ = session.decode(None, None, boxes, None, multimask=False)
        return [mask_iou(p, m) for p, m in zip(pred, masks, strict=True)]
    ious = []
    for box, mask in zip(boxes, masks, strict=True):
        answer, _, _ = predictor.predict(box=box, multimask_output=False)
        ious.append(mask_iou(answer[0], mask))
    return ious
