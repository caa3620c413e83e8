"""Gates of the automatic generator calibrated to one model, from holdout images.

SAM's gates (predicted IoU above 0.88, stability score at least 0.95 with a logit offset of 1)
assume SAM's IoU head and SAM's scale: its predicted IoU estimates the true IoU, and its masks
are hundreds of pixels across. A small model trained for minutes on small images meets neither:
its IoU head ranks masks well but under-states how good the best ones are, and a one-logit band
along the boundary of a 40-pixel object is a large fraction of its area. So the paper's gates
keep nothing, though the masks they would need to keep are there.

:class:`GateCalibration` restores the gates' meaning for one model:

- ``iou``: an isotonic (monotone) map from the IoU head's answer to the mean true IoU of the
  generator's masks with that answer, fitted on holdout images with ground truth
  (:func:`fit_gate_calibration`). With it, ``pred_iou_thresh=0.88`` keeps masks whose *expected*
  IoU is 0.88, whatever the head's own scale. Being monotone, it never changes which of a
  prompt's masks ranks first, nor the order NMS sees.
- ``stability_score_offset``: SAM's offset of 1 logit at its 1024-pixel input, scaled by the
  model's input side, so the stability score measures a boundary band of the same relative
  width (0.25 for the 256-pixel ``tiny``; 1.0, SAM's value, for the ViTs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.errors import ConfigError, InvalidInputError

__all__ = ["GateCalibration", "IouCalibration", "fit_gate_calibration", "fit_iou_calibration"]

#: SAM's stability offset (logits) and the input side it was chosen at.
SAM_STABILITY_OFFSET = 1.0
SAM_INPUT_SIDE = 1024


@dataclass(frozen=True)
class IouCalibration:
    """A monotone piecewise-linear map from predicted IoU to expected true IoU.

    ``raw`` are increasing knots of the IoU head's answers, ``calibrated`` the non-decreasing
    expected IoU at each; between knots the map is linear, outside them it is flat.
    """

    raw: tuple[float, ...]
    calibrated: tuple[float, ...]

    def __post_init__(self) -> None:
        raw, cal = np.asarray(self.raw, float), np.asarray(self.calibrated, float)
        if raw.ndim != 1 or raw.size < 1 or raw.shape != cal.shape:
            raise ConfigError(
                f"an IoU calibration needs as many calibrated values as raw knots (>= 1); got "
                f"{raw.size} and {cal.size}"
            )
        if not (np.isfinite(raw).all() and np.isfinite(cal).all()):
            raise ConfigError("an IoU calibration's knots must be finite numbers")
        if (np.diff(raw) <= 0).any() or (np.diff(cal) < 0).any():
            raise ConfigError(
                "an IoU calibration's raw knots must increase and its calibrated values must "
                "not decrease"
            )

    def __call__(self, iou: np.ndarray) -> np.ndarray:
        """The expected IoU of masks with predicted IoU ``iou`` (any shape, float32)."""
        values = np.interp(np.asarray(iou, dtype=np.float64), self.raw, self.calibrated)
        return values.astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"raw": list(self.raw), "calibrated": list(self.calibrated)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> IouCalibration:
        try:
            return cls(
                tuple(float(v) for v in data["raw"]), tuple(float(v) for v in data["calibrated"])
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"an IoU calibration is a mapping with 'raw' and 'calibrated' lists: {err}"
            ) from None


@dataclass(frozen=True)
class GateCalibration:
    """What the generator needs to apply SAM's gates to one model (see the module docstring).

    ``masks`` and ``images`` count the holdout masks and images the IoU map was fitted on.
    """

    iou: IouCalibration | None
    stability_score_offset: float
    masks: int = 0
    images: int = 0

    def generator_kwargs(self) -> dict[str, Any]:
        """``AutomaticMaskGenerator`` arguments that apply this calibration (plain JSON values,
        so they travel in a job description to other processes)."""
        return {
            "iou_calibration": None if self.iou is None else self.iou.to_dict(),
            "stability_score_offset": self.stability_score_offset,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "iou": None if self.iou is None else self.iou.to_dict(),
            "stability_score_offset": self.stability_score_offset,
            "masks": self.masks,
            "images": self.images,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateCalibration:
        try:
            iou = data.get("iou")
            return cls(
                iou=None if iou is None else IouCalibration.from_dict(iou),
                stability_score_offset=float(data["stability_score_offset"]),
                masks=int(data.get("masks", 0)),
                images=int(data.get("images", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"not a gate calibration: {err}") from None


def stability_offset_for(model: Any) -> float:
    """SAM's stability offset scaled to ``model``'s input side (1.0 for 1024 pixels)."""
    side = int(model.image_encoder.img_size)
    return SAM_STABILITY_OFFSET * side / SAM_INPUT_SIDE


def fit_iou_calibration(
    predicted: np.ndarray, true: np.ndarray, *, min_block: int = 20, max_knots: int = 48
) -> IouCalibration:
    """Isotonic regression of ``true`` IoU on ``predicted`` IoU, as at most ``max_knots`` knots.

    Pooling adjacent violators over every mask gives the monotone step function closest to the
    truth; blocks of fewer than ``min_block`` masks are pooled with a neighbour (no knot rests
    on a handful of masks), and the knots are the blocks' mean answer and mean true IoU. The
    bins are not of equal count: the masks worth keeping are a few percent at the top, where
    the map is steepest.

    Raises:
        InvalidInputError: fewer than ``min_block`` pairs, or arrays of different lengths.
    """
    predicted = np.asarray(predicted, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    if predicted.shape != true.shape:
        raise InvalidInputError(
            f"{predicted.size} predicted IoUs but {true.size} true IoUs; they must pair up"
        )
    if predicted.size < min_block:
        raise InvalidInputError(
            f"{predicted.size} masks are too few to calibrate the IoU head (need {min_block})"
        )
    order = np.argsort(predicted, kind="stable")
    blocks = _pool_adjacent_violators(predicted[order], true[order], np.ones(predicted.size))
    blocks = _pool_small(blocks, min_block)
    while len(blocks[0]) > max_knots:
        blocks = _pool_small(blocks, int(blocks[2].min()) + 1)
    x, y, _ = blocks
    return IouCalibration(tuple(x.tolist()), tuple(np.clip(y, 0.0, 1.0).tolist()))


def fit_gate_calibration(
    model: Any,
    samples: Iterable[Any],
    *,
    points_per_side: int = 12,
    max_images: int | None = None,
) -> GateCalibration:
    """Fit the gates of ``model`` on holdout ``samples`` (``EvalSample``: image and masks).

    The generator runs with every gate and NMS off, so each grid prompt's three masks are seen;
    each mask's true IoU is its IoU with the best-matching ground-truth mask of its image.

    Raises:
        InvalidInputError: the samples give too few masks to fit on.
    """
    from engine.amg.generator import AutomaticMaskGenerator

    generator = AutomaticMaskGenerator(
        model,
        points_per_side=points_per_side,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        output_mode="binary_mask",
    )
    predicted: list[float] = []
    true: list[float] = []
    images = 0
    for sample in samples:
        if max_images is not None and images >= max_images:
            break
        truth = np.asarray(sample.masks).astype(bool)
        if truth.ndim != 3 or len(truth) == 0:
            continue
        images += 1
        flat_truth = truth.reshape(len(truth), -1)
        truth_area = flat_truth.sum(axis=1)
        for mask in generator.generate(np.asarray(sample.image)):
            flat = mask["segmentation"].reshape(-1)
            inter = flat_truth[:, flat].sum(axis=1)
            union = truth_area + flat.sum() - inter
            predicted.append(float(mask["predicted_iou"]))
            true.append(float((inter / np.maximum(union, 1)).max()))
    iou = fit_iou_calibration(np.array(predicted), np.array(true))
    return GateCalibration(
        iou=iou,
        stability_score_offset=stability_offset_for(model),
        masks=len(predicted),
        images=images,
    )


_Blocks = tuple[np.ndarray, np.ndarray, np.ndarray]  # mean x, mean y, weight


def _pool_adjacent_violators(x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> _Blocks:
    """Blocks of consecutive points (``x`` sorted) whose mean ``y`` does not decrease and whose
    mean ``x`` increases: each block's x and y are the weighted means of its points."""
    xs: list[float] = []
    ys: list[float] = []
    ws: list[float] = []
    for xi, yi, wi in zip(x.tolist(), y.tolist(), weight.tolist(), strict=True):
        xs.append(xi)
        ys.append(yi)
        ws.append(wi)
        # Pool while the last block breaks monotonicity, or ties the previous one in x.
        while len(ys) > 1 and (ys[-2] > ys[-1] or xs[-1] <= xs[-2]):
            w = ws[-2] + ws[-1]
            xs[-2] = (xs[-2] * ws[-2] + xs[-1] * ws[-1]) / w
            ys[-2] = (ys[-2] * ws[-2] + ys[-1] * ws[-1]) / w
            ws[-2] = w
            del xs[-1], ys[-1], ws[-1]
    return np.array(xs), np.array(ys), np.array(ws)


def _pool_small(blocks: _Blocks, min_weight: float) -> _Blocks:
    """Pool every block lighter than ``min_weight`` with its upper neighbour (the top one with
    its lower): means of neighbours stay ordered, so the result is still monotone."""
    xs, ys, ws = (list(a.tolist()) for a in blocks)
    i = 0
    while len(ws) > 1 and i < len(ws):
        if ws[i] >= min_weight:
            i += 1
            continue
        j = i + 1 if i + 1 < len(ws) else i - 1
        lo, hi = min(i, j), max(i, j)
        w = ws[lo] + ws[hi]
        xs[lo] = (xs[lo] * ws[lo] + xs[hi] * ws[hi]) / w
        ys[lo] = (ys[lo] * ws[lo] + ys[hi] * ws[hi]) / w
        ws[lo] = w
        del xs[hi], ys[hi], ws[hi]
        i = lo
    return np.array(xs), np.array(ys), np.array(ws)
