"""Low-resolution mask logits to image pixels, as a separable linear map, without the waste.

SAM's ``postprocess_masks`` upsamples the decoder's ``(h, w)`` logits (256x256 for 1024 px) to
the square model input (bilinear, ``align_corners=False``), crops away the padding, and resizes
to the original image (bilinear again). Every step is linear and acts on rows and columns
separately, so the whole map is ``full = A_y @ low @ A_x.T`` with non-negative row weights that
sum to 1 and touch only 2-3 neighbouring low-res rows (columns). :class:`LogitUpsampler` derives
``A_y`` and ``A_x`` by pushing identity matrices through the very same ``F.interpolate`` calls
(so it follows the model's maths, whatever the sizes), then

- upsamples only the low-res rows and columns that map into the crop (the original upsamples the
  square's padding too, then throws it away), with OpenCV's bilinear resize;
- bounds the stability score **before** upsampling: each output pixel is a convex combination
  of its support block, so it lies between the block's min and max. Counting pixels whose block
  max is above ``t + offset`` (an upper bound on the high-threshold area) and whose block min is
  above ``t - offset`` (a lower bound on the low-threshold area) bounds the stability score from
  above; a mask whose bound is below the threshold cannot pass it and is never upsampled. The
  bound is exact maths plus a float margin, so it never drops a mask the full computation would
  keep.

Results equal ``F.interpolate``'s up to float rounding (about 1e-5 of the largest logit).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["LogitUpsampler"]

# Relative float margin for the stability bound: interpolation rounds each output by a few
# ulps of the largest |logit| involved; 1e-4 of it is orders of magnitude more than that.
_BOUND_MARGIN = 1e-4


@dataclass(frozen=True)
class _Axis:
    """One axis of the separable map: which low-res positions each output position reads."""

    used: slice  # low-res positions that any output uses
    group_lo: np.ndarray  # (groups,) first low-res position of each distinct support
    group_hi: np.ndarray  # (groups,) last low-res position (inclusive)
    group_count: np.ndarray  # (groups,) float64, output pixels with that support


class LogitUpsampler:
    """Maps ``(N, h, w)`` low-res logits of one crop to that crop's pixels.

    Args:
        low_res_size: ``(h, w)`` of the decoder's logits (``4 x`` the embedding grid).
        img_size: side of the square model input, pixels.
        input_size: ``(H, W)`` of the resized crop inside the model input, before padding.
        original_size: ``(H0, W0)`` of the crop, pixels.
    """

    def __init__(
        self,
        low_res_size: tuple[int, int],
        img_size: int,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> None:
        self.low_res_size = (int(low_res_size[0]), int(low_res_size[1]))
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self._img_size = int(img_size)
        self._input_size = (int(input_size[0]), int(input_size[1]))
        self._y = _axis(self.low_res_size[0], img_size, int(input_size[0]), self.original_size[0])
        self._x = _axis(self.low_res_size[1], img_size, int(input_size[1]), self.original_size[1])

    @property
    def needed_low_res(self) -> tuple[int, int]:
        """Leading low-res rows and columns that any crop pixel depends on."""
        return self._y.used.stop, self._x.used.stop

    def upsample(
        self, low_res: torch.Tensor | np.ndarray, *, transposed: bool = False
    ) -> np.ndarray:
        """Logits ``(N, r, c)`` (the leading rows and columns of the low-res map, at least
        :attr:`needed_low_res`) -> float32 ``(N, H0, W0)`` logits at the crop's pixels.

        The same two bilinear resizes as ``Sam.postprocess_masks`` (half-pixel centres, no
        antialiasing), on the leading block only: with an integer factor, a resize reads the
        same source rows with the same weights whether or not later rows exist. They run
        through OpenCV, a few times faster than ``F.interpolate`` on the CPU and equal to it up
        to float rounding (about 1e-5 of the largest logit).

        With ``transposed`` the result is ``(N, W0, H0)`` (x first: the column-major layout COCO
        RLE reads without a copy), made by resizing the transposed map; bilinear resizing
        treats both axes alike.
        """
        low = _as_float32_numpy(low_res)
        rows, cols = int(low.shape[-2]), int(low.shape[-1])
        need_rows, need_cols = self.needed_low_res
        if rows < need_rows or cols < need_cols:
            raise ValueError(
                f"low_res has {rows}x{cols} leading logits; this crop needs {need_rows}x{need_cols}"
            )
        low_h, low_w = self.low_res_size
        if self._img_size % low_h or self._img_size % low_w:
            # A fractional factor maps rows differently on a cut map: pad back to full size.
            low = np.pad(low, ((0, 0), (0, low_h - rows), (0, low_w - cols)))
            rows, cols = low_h, low_w
        up_size = (rows * (self._img_size // low_h), cols * (self._img_size // low_w))
        input_size, original_size = self._input_size, self.original_size
        if transposed:
            low = low.transpose(0, 2, 1)
            up_size, input_size, original_size = (
                up_size[::-1],
                input_size[::-1],
                original_size[::-1],
            )
        out = np.empty((low.shape[0], *original_size), dtype=np.float32)
        for k in range(low.shape[0]):  # one OpenCV call per mask; each is a whole image
            up = cv2.resize(
                np.ascontiguousarray(low[k]), up_size[::-1], interpolation=cv2.INTER_LINEAR
            )
            cropped = up[: input_size[0], : input_size[1]]
            if cropped.shape == original_size:
                out[k] = cropped
            else:
                cv2.resize(cropped, original_size[::-1], dst=out[k], interpolation=cv2.INTER_LINEAR)
        return out

    def stability_upper_bound(
        self, low_res: np.ndarray, mask_threshold: float, offset: float
    ) -> np.ndarray:
        """An upper bound on each mask's stability score, from low-res logits ``(N, h, w)``:
        float64 ``(N,)``, ``inf`` where no bound can be given (no pixel surely above
        ``t - offset``)."""
        low = np.asarray(low_res, dtype=np.float32)
        if low.shape[0] == 0:
            return np.zeros(0)
        margin = _BOUND_MARGIN * (1.0 + np.abs(low).reshape(low.shape[0], -1).max(axis=1))
        hi = _block_reduce(low, self._y, self._x, np.maximum)
        lo = _block_reduce(low, self._y, self._x, np.minimum)
        weights = self._y.group_count[:, None] * self._x.group_count[None, :]
        above_high = hi > (mask_threshold + offset - margin)[:, None, None]
        above_low = lo > (mask_threshold - offset + margin)[:, None, None]
        high_ub = np.einsum("nrc,rc->n", above_high, weights)
        low_lb = np.einsum("nrc,rc->n", above_low, weights)
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = high_ub / low_lb
        bound[low_lb == 0] = np.inf
        return bound


def _axis(low: int, img_size: int, input_len: int, original_len: int) -> _Axis:
    """Weights of one axis, by running SAM's interpolation steps on an identity matrix."""
    eye = torch.eye(low, dtype=torch.float64)[None, None]  # (1, 1, low, low): rows are the axis
    up = F.interpolate(eye, (img_size, low), mode="bilinear", align_corners=False)
    up = up[..., :input_len, :]
    full = F.interpolate(up, (original_len, low), mode="bilinear", align_corners=False)
    matrix = full[0, 0].numpy()  # (original_len, low)
    nonzero = matrix > 0
    lo = nonzero.argmax(axis=1)
    hi = low - 1 - nonzero[:, ::-1].argmax(axis=1)
    pairs, counts = np.unique(np.stack([lo, hi], axis=1), axis=0, return_counts=True)
    return _Axis(
        used=slice(int(lo.min()), int(hi.max()) + 1),
        group_lo=pairs[:, 0],
        group_hi=pairs[:, 1],
        group_count=counts.astype(np.float64),
    )


def _as_float32_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def _block_reduce(low: np.ndarray, y: _Axis, x: _Axis, reduce: np.ufunc) -> np.ndarray:
    """``reduce`` (max or min) of ``low`` over every (row support, column support) block:
    ``(N, row groups, column groups)``."""
    rows = _group_reduce(low, y.group_lo, y.group_hi, reduce, axis=1)
    return _group_reduce(rows, x.group_lo, x.group_hi, reduce, axis=2)


def _group_reduce(
    values: np.ndarray, lo: np.ndarray, hi: np.ndarray, reduce: np.ufunc, axis: int
) -> np.ndarray:
    span = int((hi - lo).max()) + 1
    out = np.take(values, lo, axis=axis)
    for d in range(1, span):
        reduce(out, np.take(values, np.minimum(lo + d, hi), axis=axis), out=out)
    return out
