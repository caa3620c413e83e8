"""``ResizeLongestSide``: the resize SAM applies before its encoder, and the matching maps of
point and box coordinates from original-image pixels to the resized frame.

The longest side becomes ``target_length``; the other keeps the aspect ratio, rounded half up.
Coordinates are (x, y) pixels; boxes are XYXY pixels. The model then pads the resized image on the
bottom and right to a ``target_length`` square (see ``Sam.preprocess``), so the resized frame is
also the model's input frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F


class ResizeLongestSide:
    """Resize images, coordinates and boxes so the image's longest side is ``target_length``."""

    def __init__(self, target_length: int) -> None:
        self.target_length = int(target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, C)`` uint8 -> ``(H', W', C)`` uint8 with ``max(H', W') == target_length``.

        Bilinear with antialiasing when shrinking (what PIL's bilinear resize does, which the
        original SAM used), rounded to the nearest integer.
        """
        h, w = image.shape[:2]
        target = self.get_preprocess_shape(h, w, self.target_length)
        if (h, w) == target:
            return np.ascontiguousarray(image)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        resized = F.interpolate(
            tensor, target, mode="bilinear", align_corners=False, antialias=True
        )
        out = resized[0].permute(1, 2, 0).round_().clamp_(0, 255)
        return out.to(torch.uint8).numpy()

    def apply_coords(self, coords: np.ndarray, original_size: Sequence[int]) -> np.ndarray:
        """``(..., 2)`` xy pixels of an image of ``original_size = (H, W)`` -> resized frame."""
        old_h, old_w = int(original_size[0]), int(original_size[1])
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords, dtype=np.float64, copy=True)
        coords[..., 0] *= new_w / old_w
        coords[..., 1] *= new_h / old_h
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: Sequence[int]) -> np.ndarray:
        """``(B, 4)`` XYXY pixels -> ``(B, 4)`` XYXY in the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float -> resized float batch (bilinear, antialiased; not rounded)."""
        target = self.get_preprocess_shape(image.shape[-2], image.shape[-1], self.target_length)
        return F.interpolate(image, target, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(
        self, coords: torch.Tensor, original_size: Sequence[int]
    ) -> torch.Tensor:
        """Torch version of :meth:`apply_coords` (float32 result, input left unchanged)."""
        old_h, old_w = int(original_size[0]), int(original_size[1])
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        scale = torch.tensor([new_w / old_w, new_h / old_h], device=coords.device)
        return coords.to(torch.float32) * scale

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: Sequence[int]) -> torch.Tensor:
        """Torch version of :meth:`apply_boxes`."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """``(H', W')`` of ``(oldh, oldw)`` scaled to a longest side of ``long_side_length``."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return int(oldh * scale + 0.5), int(oldw * scale + 0.5)
