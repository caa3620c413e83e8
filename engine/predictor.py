"""``SamPredictor``: encode an image once, then answer many prompts from its embedding.

Prompts given to :meth:`SamPredictor.predict` are in original-image pixels: points ``(N, 2)`` as
(x, y), labels ``(N,)`` (1 foreground, 0 background), one box ``(4,)`` XYXY. Masks come back at
the original image size; ``low_res_logits`` ``(C, 4h, 4w)`` (256x256 for the ViT variants,
128x128 for tiny) can be fed back as ``mask_input`` on the next click.
:meth:`SamPredictor.predict_torch` takes batched tensors already in the model's input frame.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from engine.modeling.sam import Sam
from engine.transforms import ResizeLongestSide
from storage.errors import ImageError, PromptError

_IMAGE_FORMATS = ("RGB", "BGR")
_POINT_LABELS = (-1, 0, 1)


class SamPredictor:
    """Image embedding + repeated mask prediction with SAM's conventional API.

    Attributes:
        model: the :class:`Sam` in use.
        transform: the ``ResizeLongestSide`` to the model's input size.
        original_size: ``(H, W)`` of the current image, pixels (None before ``set_image``).
        input_size: ``(H', W')`` of the resized image inside the padded input, pixels.
        features: the image embedding ``(1, C, h, w)`` float32, or None.
        is_image_set: whether an image (or an embedding) is set.
    """

    def __init__(self, model: Sam, *, autocast_dtype: torch.dtype | None = None) -> None:
        """
        Args:
            model: the model; it is used as is (call ``model.eval()`` first when it was training).
            autocast_dtype: run encoder and decoder under ``torch.autocast`` in this dtype (e.g.
                ``torch.bfloat16``); outputs are always float32. None: full float32.
        """
        self.model = model
        self.transform = ResizeLongestSide(model.img_size)
        self.autocast_dtype = autocast_dtype
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.features: torch.Tensor | None = None
        self.is_image_set = False

    @property
    def device(self) -> torch.device:
        return self.model.device

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute and keep the embedding of ``image``, an ``(H, W, 3)`` uint8 array."""
        if image_format not in _IMAGE_FORMATS:
            raise ImageError(f"image_format must be one of {_IMAGE_FORMATS}, got {image_format!r}")
        _check_image(image)
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(tensor, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: Sequence[int]
    ) -> None:
        """Embed an image already resized with ``transform``: ``(1, 3, H', W')`` 0..255 values
        whose longest side is ``model.img_size``; ``original_image_size`` is ``(H, W)``."""
        shape = tuple(transformed_image.shape)
        if (
            len(shape) != 4
            or shape[0] != 1
            or shape[1] != 3
            or max(shape[2:]) != self.model.img_size
        ):
            raise ImageError(
                f"transformed_image must be (1, 3, H, W) with longest side {self.model.img_size}, "
                f"got {shape}"
            )
        self.reset_image()
        input_image = self.model.preprocess(transformed_image.to(self.device, torch.float32))
        with self._autocast():
            features = self.model.image_encoder(input_image)
        self.features = _token_major(features.float())
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(shape[2]), int(shape[3]))
        self.is_image_set = True

    def set_embedding(
        self, embedding: torch.Tensor | np.ndarray, original_size: Sequence[int]
    ) -> None:
        """Use a stored embedding ``(1, C, h, w)`` (or ``(C, h, w)``) of an image of
        ``original_size = (H, W)`` pixels instead of running the encoder."""
        embedding = torch.as_tensor(embedding)
        if embedding.dim() == 3:
            embedding = embedding[None]
        expected = (1, *self.model.image_embedding_shape)
        if tuple(embedding.shape) != expected:
            raise ImageError(
                f"embedding must have shape {expected} for this model, got {tuple(embedding.shape)}"
            )
        h, w = int(original_size[0]), int(original_size[1])
        if h <= 0 or w <= 0:
            raise ImageError(f"original_size must be two positive ints (H, W), got {original_size}")
        self.reset_image()
        self.features = _token_major(embedding.to(self.device, torch.float32))
        self.original_size = (h, w)
        self.input_size = self.transform.get_preprocess_shape(h, w, self.model.img_size)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The current image embedding, ``(1, C, h, w)`` float32 (C=256, h=w=64 for ViT SAM)."""
        if not self.is_image_set or self.features is None:
            raise ImageError("no image set: call set_image(...) or set_embedding(...) first")
        return self.features

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt set on the current image, in original-image pixels.

        Args:
            point_coords: ``(N, 2)`` xy pixels; needs ``point_labels`` ``(N,)`` of 1/0.
            box: ``(4,)`` XYXY pixels.
            mask_input: ``(1, 4h, 4w)`` low-res logits from a previous call.
            multimask_output: 3 masks for an ambiguous prompt, else the single-mask output.
            return_logits: return logits instead of thresholded masks.

        Returns:
            masks ``(C, H, W)`` bool (float32 logits if ``return_logits``), iou predictions
            ``(C,)`` float32, low-res logits ``(C, 4h, 4w)`` float32; C = 3 or 1.
        """
        original_size = self._require_image()
        if point_coords is None and box is None and mask_input is None:
            raise PromptError("no prompt: give point_coords/point_labels, box or mask_input")
        coords_t = labels_t = box_t = mask_t = None
        if point_coords is not None or point_labels is not None:
            coords, labels = _check_points(point_coords, point_labels, original_size)
            coords = self.transform.apply_coords(coords, original_size)
            coords_t = torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int64, device=self.device)[None]
        if box is not None:
            box_xyxy = self.transform.apply_boxes(_check_box(box, original_size), original_size)
            box_t = torch.as_tensor(box_xyxy, dtype=torch.float32, device=self.device)
        if mask_input is not None:
            mask_t = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32)[None]
            mask_t = mask_t.to(self.device)
        masks, iou, low_res = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output, return_logits
        )
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction with prompts already in the model's input frame (see ``transform``).

        Args:
            point_coords: ``(B, N, 2)`` xy pixels with ``point_labels`` ``(B, N)``.
            boxes: ``(B, 4)`` XYXY pixels.
            mask_input: ``(B, 1, 4h, 4w)`` low-res logits.

        Returns:
            masks ``(B, C, H, W)`` at the original size (bool, or float32 logits), iou
            ``(B, C)`` float32, low-res logits ``(B, C, 4h, 4w)`` float32.
        """
        original_size = self._require_image()
        assert self.features is not None and self.input_size is not None
        points = self._check_batched(point_coords, point_labels, boxes, mask_input)
        with self._autocast():
            low_res, iou = self.model.decode_prompts(
                self.features,
                points=points,
                boxes=boxes,
                masks=mask_input,
                multimask_output=multimask_output,
            )
        low_res, iou = low_res.float(), iou.float()
        masks = self.model.postprocess_masks(low_res, self.input_size, original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    def _require_image(self) -> tuple[int, int]:
        if not self.is_image_set or self.original_size is None:
            raise ImageError("no image set: call set_image(...) or set_embedding(...) first")
        return self.original_size

    def _check_batched(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if point_coords is None and boxes is None and mask_input is None:
            raise PromptError("no prompt: give point_coords/point_labels, boxes or mask_input")
        batches: dict[str, int] = {}
        points = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise PromptError("point_coords and point_labels must be given together")
            if point_coords.dim() != 3 or point_coords.shape[-1] != 2:
                raise PromptError(
                    f"point_coords must be (B, N, 2), got {tuple(point_coords.shape)}"
                )
            if tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
                raise PromptError(
                    f"point_labels must be (B, N) = {tuple(point_coords.shape[:2])}, got "
                    f"{tuple(point_labels.shape)}"
                )
            batches["point_coords"] = point_coords.shape[0]
            points = (point_coords, point_labels)
        if boxes is not None:
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise PromptError(f"boxes must be (B, 4) XYXY, got {tuple(boxes.shape)}")
            batches["boxes"] = boxes.shape[0]
        if mask_input is not None:
            expected = (1, *self.model.prompt_encoder.mask_input_size)
            if mask_input.dim() != 4 or tuple(mask_input.shape[1:]) != expected:
                raise PromptError(
                    f"mask_input must be (B, {', '.join(map(str, expected))}) logits, got "
                    f"{tuple(mask_input.shape)}"
                )
            batches["mask_input"] = mask_input.shape[0]
        if len(set(batches.values())) > 1:
            raise PromptError(f"prompt batch sizes differ: {batches}")
        return points

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            yield


def _token_major(embedding: torch.Tensor) -> torch.Tensor:
    """The same ``(1, C, h, w)`` values stored channels-last, the layout the decoder's
    transformer reads them in (as ``h * w`` tokens of C), so no click pays for a transpose."""
    return embedding.contiguous(memory_format=torch.channels_last)


def _check_image(image: object) -> None:
    if not isinstance(image, np.ndarray):
        raise ImageError(f"image must be a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"image must have dtype uint8 (0..255), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"image is empty: shape {image.shape}")


def _check_points(
    point_coords: np.ndarray | None, point_labels: np.ndarray | None, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    if point_coords is None or point_labels is None:
        raise PromptError("point_coords and point_labels must be given together")
    coords = np.asarray(point_coords, dtype=np.float64)
    labels = np.asarray(point_labels)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
        raise PromptError(f"point_coords must be (N, 2) xy pixels with N >= 1, got {coords.shape}")
    if labels.shape != (coords.shape[0],):
        raise PromptError(f"point_labels must have shape ({coords.shape[0]},), got {labels.shape}")
    if not np.isin(labels, _POINT_LABELS).all():
        raise PromptError(
            f"point_labels must be 1 (foreground) or 0 (background), got {np.unique(labels)}"
        )
    _check_inside("point_coords", coords, size)
    return coords, labels.astype(np.int64)


def _check_box(box: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(box, dtype=np.float64)
    if arr.size != 4 or arr.ndim > 2:
        raise PromptError(f"box must be (4,) XYXY pixels, got shape {arr.shape}")
    arr = arr.reshape(1, 4)
    if arr[0, 2] < arr[0, 0] or arr[0, 3] < arr[0, 1]:
        raise PromptError(f"box must be XYXY with x0 <= x1 and y0 <= y1, got {arr[0].tolist()}")
    _check_inside("box", arr.reshape(2, 2), size)
    return arr


def _check_inside(name: str, xy: np.ndarray, size: tuple[int, int]) -> None:
    """Coordinates are continuous pixels: x in [0, W], y in [0, H]."""
    h, w = size
    if not np.isfinite(xy).all():
        raise PromptError(f"{name} must be finite numbers, got {xy.tolist()}")
    outside = (xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h)
    if outside.any():
        raise PromptError(f"{name} {xy[outside].tolist()} lie outside the {w}x{h} (WxH) image")
