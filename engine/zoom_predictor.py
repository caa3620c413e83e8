"""``ZoomInPredictor``: :meth:`SamPredictor.predict` with zoom-in (:mod:`engine.zoom_in`), for
the tools people click in (the ML backend, the simulated annotator).

It wraps a predictor that holds the whole image, and the image's pixels. A prompt without a
mask (a first click, a box) is answered on the whole image first; that answer, the clicks and the
box give the crop, and the prompt is answered again there. A prompt with a mask (a later click)
goes straight to the crop around the previous mask and the clicks. Small objects are thereby
always decoded at several times their size; large ones on the whole image, as before.

Inputs and outputs are in whole-image pixels, as :class:`SamPredictor`'s: the low-res logits
returned are the answer resampled onto the whole image's low-res grid, so a caller can feed them
back as ``mask_input`` like any predictor's. When they come back unchanged, the answer's own
logits are used instead (the crop's low-res ones if the crop has not moved, else its full-
resolution ones cut to the new crop): no detail of a small object is lost between clicks.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.predictor import SamPredictor
from engine.zoom_in import DEFAULT_ZOOM_IN, Crop, ZoomIn, logits_in_frame
from storage.errors import ImageError

__all__ = ["ZoomInPredictor"]

#: Logit of "certainly not the object", outside the crop.
_OUTSIDE = -20.0


class ZoomInPredictor:
    """Zoom-in on top of a :class:`SamPredictor` whose image (or its embedding) is set.

    Attributes:
        predictor: the whole image's predictor.
        zoom_in: when and how far to zoom.
        crop: the crop of the last answer, ``(top, left, side)`` (None: the whole image).
    """

    def __init__(
        self, predictor: SamPredictor, image: np.ndarray, zoom_in: ZoomIn = DEFAULT_ZOOM_IN
    ) -> None:
        """
        Args:
            predictor: a predictor with ``image`` (or its embedding) already set.
            image: the same image, ``(H, W, 3)`` uint8 in the model's channel order (RGB).
            zoom_in: the crop rule.
        """
        if predictor.original_size is None:
            raise ImageError("ZoomInPredictor needs a predictor with its image set")
        if tuple(image.shape[:2]) != predictor.original_size:
            raise ImageError(
                f"image is {image.shape[0]}x{image.shape[1]} (HxW) but the predictor holds an "
                f"image of {predictor.original_size[0]}x{predictor.original_size[1]}"
            )
        self.predictor = predictor
        self.image = image
        self.zoom_in = zoom_in
        self.crop: Crop | None = None
        self._crop_predictor = SamPredictor(
            predictor.model, autocast_dtype=predictor.autocast_dtype
        )
        self._encoded: Crop | None = None  # the crop the crop predictor holds
        self._returned: np.ndarray | None = None  # low-res logits last returned (whole image)
        self._returned_in_crop: np.ndarray | None = None  # the same answers in the crop's frame
        self._returned_full: np.ndarray | None = None  # and at full resolution (whole image)

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`SamPredictor.predict` (same arguments, same shapes returned)."""
        whole = self.predictor
        previous_logits = None
        if mask_input is None:
            masks, scores, low_res = whole.predict(
                point_coords, point_labels, box, None, multimask_output, return_logits=True
            )
            previous = masks[int(np.argmax(scores))] > whole.model.mask_threshold
            first = True
        else:
            previous_logits = self._full_logits_of(mask_input)
            previous = (previous_logits > whole.model.mask_threshold).numpy()
            first = False
        crop = self.zoom_in.crop(previous, _prompt_points(point_coords, box), first=first)
        if crop is None:
            self._forget()
            if mask_input is not None:
                masks, scores, low_res = whole.predict(
                    point_coords, point_labels, box, mask_input, multimask_output, True
                )
            return _threshold(masks, whole, return_logits), scores, low_res
        # The prompt is read against the crop the last answer came from, before it moves.
        prompt = self._kept_prompt(crop, mask_input)
        top, left, side = crop
        inside = self._predictor_for(crop)
        if previous_logits is not None and prompt is None:
            assert inside.input_size is not None
            low_h, low_w = inside.model.prompt_encoder.mask_input_size
            prompt = logits_in_frame(
                previous_logits[top : top + side, left : left + side],
                inside.input_size,
                inside.model.img_size,
                (low_h, low_w),
            )[0].numpy()
        shift = np.array([left, top], dtype=np.float64)
        crop_masks, scores, crop_low = inside.predict(
            None if point_coords is None else np.asarray(point_coords, np.float64) - shift,
            point_labels,
            None if box is None else np.asarray(box, np.float64).reshape(2, 2) - shift,
            prompt,
            multimask_output,
            return_logits=True,
        )
        h, w = self.image.shape[:2]
        full = np.full((len(crop_masks), h, w), _OUTSIDE, dtype=np.float32)
        full[:, top : top + side, left : left + side] = crop_masks
        low_h, low_w = whole.model.prompt_encoder.mask_input_size
        assert whole.input_size is not None
        low_res = np.concatenate(
            [
                logits_in_frame(
                    torch.from_numpy(logits), whole.input_size, whole.model.img_size, (low_h, low_w)
                )[0].numpy()
                for logits in full
            ]
        )
        self.crop = crop
        self._returned, self._returned_in_crop, self._returned_full = low_res, crop_low, full
        return _threshold(full, whole, return_logits), scores, low_res

    def _forget(self) -> None:
        self.crop = None
        self._returned = self._returned_in_crop = self._returned_full = None

    def _returned_row(self, mask_input: np.ndarray) -> int | None:
        """Which of the last answers ``mask_input`` is (None: not one of them)."""
        if self._returned is None:
            return None
        given = np.asarray(mask_input).reshape(self._returned.shape[1:])
        for row, returned in enumerate(self._returned):
            if np.array_equal(returned, given):
                return row
        return None

    def _full_logits_of(self, mask_input: np.ndarray) -> torch.Tensor:
        """Whole-image logits ``(H, W)`` of a mask prompt: the last answer's own, at full
        resolution, when it is one of them; else ``mask_input`` upsampled."""
        row = self._returned_row(mask_input)
        if row is not None:
            assert self._returned_full is not None
            return torch.from_numpy(self._returned_full[row])
        whole = self.predictor
        assert whole.input_size is not None and whole.original_size is not None
        logits = torch.as_tensor(np.asarray(mask_input, dtype=np.float32))[None]
        return whole.model.postprocess_masks(logits, whole.input_size, whole.original_size)[0, 0]

    def _kept_prompt(self, crop: Crop, mask_input: np.ndarray | None) -> np.ndarray | None:
        """The crop-frame logits of the answer ``mask_input`` is, when it is one of the last
        answers and the crop has not moved (else None)."""
        if mask_input is None or crop != self.crop:
            return None
        row = self._returned_row(mask_input)
        if row is None:
            return None
        assert self._returned_in_crop is not None
        return self._returned_in_crop[row : row + 1]

    def _predictor_for(self, crop: Crop) -> SamPredictor:
        if self._encoded != crop:
            top, left, side = crop
            pixels = np.ascontiguousarray(self.image[top : top + side, left : left + side])
            self._crop_predictor.set_image(pixels, self.predictor.model.image_format)
            self._encoded = crop
        return self._crop_predictor


def _prompt_points(point_coords: np.ndarray | None, box: np.ndarray | None) -> np.ndarray:
    """Every clicked point and box corner ``(N, 2)`` xy (the crop must hold them all)."""
    parts = []
    if point_coords is not None:
        parts.append(np.asarray(point_coords, dtype=np.float64).reshape(-1, 2))
    if box is not None:
        parts.append(np.asarray(box, dtype=np.float64).reshape(2, 2))
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def _threshold(logits: np.ndarray, predictor: SamPredictor, return_logits: bool) -> np.ndarray:
    return logits if return_logits else logits > predictor.model.mask_threshold
