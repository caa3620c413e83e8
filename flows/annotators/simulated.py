"""A simulated annotator: a careful person with ground truth in mind and the model's help.

Used by the demo, the benchmarks and the tests in place of people. It behaves the way the SAM
paper describes its annotators (and is measured the way the paper measured them):

- **Prominence order**: objects are labelled largest first.
- **Clicks** (stage 1 and new objects in stage 2): the first click lands at the object's centre
  (the point farthest from its boundary), each further one at the point farthest from the
  boundary of the largest error region (positive in a miss, negative in a spill), the standard
  interactive-segmentation protocol (:func:`engine.evaluation.clicks.next_click`). The model
  answers every click from the image's embedding, computed once per image; the previous
  answer's low-resolution logits are fed back as the mask prompt. The person stops when the mask
  reaches ``iou_target`` against the truth, or after ``click_budget`` clicks, then finishes the
  mask with the brush (the stored mask is then the truth itself).
- **Time model**, in simulated seconds per mask::

      seconds = seconds_per_object + seconds_per_click * clicks (+ brush_seconds if brushed)

  ``seconds_per_object`` covers finding the object, choosing where to click and checking the
  result; the click cost includes looking at the model's answer. The defaults put an
  easy mask at ~8 s and a brushed one at ~45 s, the range of the paper's 14-34 s means.
- **Moving on**: a person spends at most ``image_budget_s`` on an image and, in stage 1 like
  SA-1B's stage-1 annotators, moves to the next image after a mask that took longer than
  ``move_on_after_s``. So a better model (fewer clicks, fewer brushed masks) yields more masks
  per image. In stage 2 the paper's annotators were asked to add every object still missing, so
  there only the image budget stops them (their time per new mask rose to 34 s, from 14 s).
- **Stage 2**: the image comes pre-filled with the model's confident masks. Each prediction is
  checked against the truth (``accept_seconds``): one that matches an unlabelled object at
  ``iou_target`` or better is kept unchanged (source ``model``, no clicks); one that overlaps an
  unlabelled object at ``fix_iou`` or better is fixed: the person goes on from the prediction
  (its prompt point and mask are the start), clicking at the largest error until the target
  (source ``manual``, its corrective clicks counted, ``accept_seconds`` + the clicks' time, no
  ``seconds_per_object``: the object is already found; only while the image's time budget
  lasts); any other is deleted
  (``reject_seconds``) and its object is left to be clicked like a new one (source ``manual``).

Everything is deterministic: same model, same images, same ground truth, same masks and times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.zoom_in import DEFAULT_ZOOM_IN, ZoomIn
from flows.annotators.base import Annotator
from storage import rle as rle_codec
from storage.mask_store import MaskRecord, make_mask_id

if TYPE_CHECKING:
    from torch import nn

    from flows.annotators.ground_truth import GroundTruth
    from storage.mask_store import ImageRecord, MaskStore

__all__ = ["ClickSession", "SimulatedAnnotator", "TimeModel", "click_until_target"]


@dataclass(frozen=True)
class TimeModel:
    """Simulated seconds a person spends; see the module docstring for the formula."""

    seconds_per_object: float = 5.0
    seconds_per_click: float = 2.5
    brush_seconds: float = 20.0
    accept_seconds: float = 1.5
    reject_seconds: float = 1.0

    def mask_seconds(self, clicks: int, brushed: bool) -> float:
        """Seconds for one clicked (and maybe brushed) mask."""
        extra = self.brush_seconds if brushed else 0.0
        return self.seconds_per_object + self.seconds_per_click * clicks + extra

    def fix_seconds(self, clicks: int, brushed: bool) -> float:
        """Seconds for fixing a prediction: checking it, then the corrective clicks (and brush)."""
        extra = self.brush_seconds if brushed else 0.0
        return self.accept_seconds + self.seconds_per_click * clicks + extra


@dataclass(frozen=True)
class ClickSession:
    """The outcome of clicking one object.

    Attributes:
        mask: the final mask ``(H, W)`` bool (the truth when ``brushed``).
        clicks: clicks the person made (not the prompt of a prediction they started from).
        points: every prompt point ``[[x, y], ...]`` in pixels, a start's first.
        ious: IoU with the truth after each click.
        brushed: whether the click budget ran out before ``iou_target``.
    """

    mask: np.ndarray
    clicks: int
    points: list[list[float]]
    ious: list[float]
    brushed: bool


def click_until_target(
    predictor: Any,
    gt: np.ndarray,
    *,
    iou_target: float,
    click_budget: int,
    start_points: Sequence[Sequence[float]] = (),
    start_mask: np.ndarray | None = None,
) -> ClickSession:
    """Click on one object until the model's mask reaches ``iou_target`` or the budget ends.

    Args:
        predictor: a ``SamPredictor`` with the image already set.
        gt: the object's true mask ``(H, W)`` bool.
        iou_target: stop once IoU with ``gt`` is at least this, in [0, 1].
        click_budget: at most this many clicks; then the person brushes the rest.
        start_points: positive prompt points of a prediction to go on from (stage 2's fixes);
            they are the model's, not clicks of the person.
        start_mask: that prediction's mask ``(H, W)``, what the person sees first.
    """
    from engine.evaluation.clicks import next_click
    from engine.evaluation.metrics import mask_iou

    pred: np.ndarray | None = None
    logits: np.ndarray | None = None
    points: list[list[float]] = [[float(x), float(y)] for x, y in start_points]
    labels: list[int] = [1] * len(points)
    ious: list[float] = []
    if start_mask is not None and points:
        pred = np.asarray(start_mask, dtype=bool)
        logits = _logits_of(predictor, points, pred)
    started = len(points)
    iou = mask_iou(pred, gt) if pred is not None else 0.0
    for k in range(click_budget if iou < iou_target else 0):
        click = next_click(pred, gt)
        if click is None:  # already perfect
            break
        points.append([float(click.x), float(click.y)])
        labels.append(1 if click.positive else 0)
        # One click is ambiguous (whole, part, sub-part): ask for three and keep the one the
        # model rates best, as SAM's tool does; later clicks disambiguate, so one mask suffices.
        masks, scores, low_res = predictor.predict(
            point_coords=np.asarray(points, dtype=np.float32),
            point_labels=np.asarray(labels, dtype=np.int64),
            mask_input=logits,
            multimask_output=k == 0 and not started,
        )
        best = int(np.argmax(scores))
        pred = np.asarray(masks[best], dtype=bool)
        logits = np.asarray(low_res[best : best + 1])
        iou = mask_iou(pred, gt)
        ious.append(iou)
        if iou >= iou_target:
            break
    reached = iou >= iou_target
    final = pred if reached and pred is not None else gt
    return ClickSession(
        mask=np.asarray(final, dtype=bool),
        clicks=len(points) - started,
        points=points,
        ious=ious,
        brushed=not reached,
    )


def _logits_of(predictor: Any, points: list[list[float]], mask: np.ndarray) -> np.ndarray:
    """Low-res logits for a prediction made from ``points``: the model's output on them that
    overlaps ``mask`` best (the next click feeds them back, as after any click)."""
    from engine.evaluation.metrics import mask_iou

    masks, _, low_res = predictor.predict(
        point_coords=np.asarray(points, dtype=np.float32),
        point_labels=np.ones(len(points), dtype=np.int64),
        mask_input=None,
        multimask_output=True,
    )
    best = int(np.argmax([mask_iou(np.asarray(m, dtype=bool), mask) for m in masks]))
    return np.asarray(low_res[best : best + 1])


class SimulatedAnnotator(Annotator):
    """A simulated person; see the module docstring for the behaviour and the time model.

    Args:
        store: where the images are read from.
        ground_truth: the truth of every image it will be given.
        iou_target: a mask is good enough at this IoU with the truth, in [0, 1].
        click_budget: clicks before switching to the brush.
        time_model: seconds per object, click, brush, accept and reject.
        image_budget_s: at most this many simulated seconds per image.
        fix_iou: stage 2 fixes a prediction that overlaps an unlabelled object at this IoU or
            better (and below ``iou_target``); one that overlaps none this well is deleted.
        move_on_after_s: in stage 1, move to the next image after a mask that took longer than
            this (stage 2 adds what is missing until ``image_budget_s``).
        name: stored in each mask's ``annotator`` column.
        cache_embeddings: keep image embeddings in the store, keyed by model version.
        zoom_in: the tool's zoom-in on small objects (:mod:`engine.zoom_in`, as the ML
            backend's); None clicks on the whole image only.
    """

    def __init__(
        self,
        store: MaskStore,
        ground_truth: GroundTruth,
        *,
        iou_target: float = 0.9,
        click_budget: int = 8,
        time_model: TimeModel | None = None,
        image_budget_s: float = 90.0,
        move_on_after_s: float = 30.0,
        fix_iou: float = 0.5,
        name: str = "simulated",
        cache_embeddings: bool = True,
        zoom_in: ZoomIn | None = DEFAULT_ZOOM_IN,
    ) -> None:
        if not 0.0 < iou_target <= 1.0:
            raise ValueError(f"iou_target={iou_target}; expected a value in (0, 1]")
        if not 0.0 < fix_iou <= 1.0:
            raise ValueError(f"fix_iou={fix_iou}; expected a value in (0, 1]")
        if click_budget < 1:
            raise ValueError(f"click_budget={click_budget}; expected at least 1")
        self.store = store
        self.ground_truth = ground_truth
        self.iou_target = float(iou_target)
        self.click_budget = int(click_budget)
        self.time_model = time_model or TimeModel()
        self.image_budget_s = float(image_budget_s)
        self.move_on_after_s = float(move_on_after_s)
        self.fix_iou = float(fix_iou)
        self.name = name
        self.cache_embeddings = cache_embeddings
        self.zoom_in = zoom_in

    def annotate(
        self,
        images: Sequence[ImageRecord],
        model: nn.Module,
        *,
        stage: int,
        round: int,
        run_id: str,
        model_version: str,
        predictions: Mapping[str, Sequence[MaskRecord]] | None = None,
    ) -> list[MaskRecord]:
        """See :meth:`Annotator.annotate`."""
        from engine import EmbeddingCache, SamPredictor
        from engine.zoom_predictor import ZoomInPredictor

        predictor = SamPredictor(model)  # type: ignore[arg-type]  # any Sam-like module
        # Embeddings persist in the store per (image, model version): a rerun of the round
        # after a crash, or another annotator on the same images, skips the encoder.
        cache = EmbeddingCache(model_version, store=self.store if self.cache_embeddings else None)
        records: list[MaskRecord] = []
        for image in images:
            pixels = partial(_writable_image, self.store, image.image_id)
            cache.get_or_compute(image.image_id, pixels, predictor)
            # The person clicks in the same tool as the ML backend's: zoom-in on small objects.
            tool: Any = predictor
            if self.zoom_in is not None:
                tool = ZoomInPredictor(predictor, pixels(), self.zoom_in)
            context = _RoundContext(stage, round, run_id, model_version, image.image_id)
            preds = list((predictions or {}).get(image.image_id, ()))
            records.extend(self._annotate_image(tool, context, preds))
            predictor.reset_image()
        return records

    def _annotate_image(
        self, predictor: Any, ctx: _RoundContext, predictions: Sequence[MaskRecord]
    ) -> list[MaskRecord]:
        gt_rles = self.ground_truth.rles(ctx.image_id)
        if not gt_rles:
            return []
        gt = rle_codec.decode(gt_rles)
        # Prominence: the largest objects first (ties by index, so the order is stable).
        order = sorted(range(len(gt)), key=lambda j: (-int(gt[j].sum()), j))
        records, done, spent = self._review_predictions(predictor, ctx, predictions, gt_rles, gt)
        for j in order:
            if j in done:
                continue
            if spent >= self.image_budget_s:
                break
            session = click_until_target(
                predictor, gt[j], iou_target=self.iou_target, click_budget=self.click_budget
            )
            seconds = self.time_model.mask_seconds(session.clicks, session.brushed)
            spent += seconds
            records.append(self._manual_record(ctx, j, session, seconds))
            if ctx.stage == 1 and seconds > self.move_on_after_s:
                break
        return records

    def _review_predictions(
        self,
        predictor: Any,
        ctx: _RoundContext,
        predictions: Sequence[MaskRecord],
        gt_rles: list[rle_codec.Rle],
        gt: np.ndarray,
    ) -> tuple[list[MaskRecord], set[int], float]:
        """Keep predictions that match an object at the target, fix those that overlap one at
        ``fix_iou``, delete the rest."""
        records: list[MaskRecord] = []
        done: set[int] = set()
        spent = 0.0
        if not predictions:
            return records, done, spent
        ious = rle_codec.iou([p.segmentation for p in predictions], gt_rles)  # (P, G)
        ranked = sorted(range(len(predictions)), key=lambda i: -(predictions[i].predicted_iou or 0))
        for i in ranked:
            candidates = [(ious[i, j], j) for j in range(len(gt_rles)) if j not in done]
            best_iou, j = max(candidates, default=(0.0, -1))
            prediction = predictions[i]
            if j >= 0 and best_iou >= self.iou_target:
                spent += self.time_model.accept_seconds
                done.add(j)
                records.append(self._accepted_record(ctx, prediction))
            elif (
                j >= 0
                and best_iou >= self.fix_iou
                and prediction.point_coords
                and spent < self.image_budget_s  # out of time: the near miss is deleted
            ):
                session = click_until_target(
                    predictor,
                    gt[j],
                    iou_target=self.iou_target,
                    click_budget=self.click_budget,
                    start_points=prediction.point_coords,
                    start_mask=rle_codec.decode([prediction.segmentation])[0],
                )
                seconds = self.time_model.fix_seconds(session.clicks, session.brushed)
                spent += seconds
                done.add(j)
                records.append(self._manual_record(ctx, j, session, seconds))
            else:
                spent += self.time_model.reject_seconds
        return records, done, spent

    def _manual_record(
        self, ctx: _RoundContext, gt_index: int, session: ClickSession, seconds: float
    ) -> MaskRecord:
        segmentation = rle_codec.encode(session.mask[None])[0]
        return MaskRecord(
            image_id=ctx.image_id,
            segmentation=segmentation,
            stage=ctx.stage,
            round=ctx.round,
            source="manual",
            run_id=ctx.run_id,
            point_coords=session.points or None,
            model_version=ctx.model_version,
            annotator=self.name,
            lead_time_s=float(seconds),
            clicks=session.clicks,
            # Keyed on the object, not the pixels: a rerun of the round (another model after
            # a crash) replaces nothing and duplicates nothing.
            mask_id=make_mask_id(
                ctx.image_id,
                str(ctx.stage),
                str(ctx.round),
                ctx.run_id,
                "manual",
                f"object-{gt_index}",
            ),
        )

    def _accepted_record(self, ctx: _RoundContext, prediction: MaskRecord) -> MaskRecord:
        return MaskRecord(
            image_id=ctx.image_id,
            segmentation=prediction.segmentation,
            stage=ctx.stage,
            round=ctx.round,
            source="model",
            run_id=ctx.run_id,
            predicted_iou=prediction.predicted_iou,
            stability_score=prediction.stability_score,
            point_coords=prediction.point_coords,
            crop_box=prediction.crop_box,
            model_version=prediction.model_version or ctx.model_version,
            annotator=self.name,
            lead_time_s=float(self.time_model.accept_seconds),
            clicks=0,
            mask_id=make_mask_id(
                ctx.image_id,
                str(ctx.stage),
                str(ctx.round),
                ctx.run_id,
                "model",
                prediction.segmentation["counts"],
            ),
        )


def _writable_image(store: MaskStore, image_id: str) -> np.ndarray:
    # torch warns on (and must not write into) the read-only arrays the store may return.
    return np.array(store.load_image(image_id))


@dataclass(frozen=True)
class _RoundContext:
    stage: int
    round: int
    run_id: str
    model_version: str
    image_id: str
