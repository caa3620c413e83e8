"""``AutomaticMaskGenerator``: SAM's fully automatic mask generation (data-engine stage 3).

The algorithm is the published one (SAM paper, section 4 and appendix B; the public generator's
arguments keep their names and meanings):

1. Crop layers: the whole image, then ``2**i x 2**i`` overlapping zoomed crops per layer ``i``.
2. Each crop is encoded once and prompted with a regular grid of single foreground points, in
   batches, with multimask output (3 masks per point).
3. A mask is kept when its predicted IoU is above ``pred_iou_thresh``, its stability score is at
   least ``stability_score_thresh``, it does not touch an inner edge of its crop, and (paper, not
   the public code) it covers less than ``max_mask_region_fraction`` of the image.
4. Box NMS within each crop ranked by predicted IoU, then across crops preferring the most
   zoomed crop (score ``1 / crop area``).
5. Optionally holes and islands under ``min_mask_region_area`` pixels are removed, then NMS
   runs again preferring masks the clean-up left unchanged.

Where this differs from the public code in *how* (never in which masks come out):

- the predicted-IoU filter runs on the decoder's IoU head before any mask is upscaled, and the
  transposed-convolution upscaling runs only for prompts with a surviving mask
  (:mod:`engine.amg.decoding`);
- a provable upper bound on the stability score, computed on the low-res logits, drops masks
  that cannot pass before they are upsampled; the exact score is computed at full resolution
  for the rest (:mod:`engine.amg.upsampling`);
- only surviving masks are upsampled, over the part of the model input that holds the image,
  in chunks of bounded size, and each is kept as COCO RLE at once; full-resolution masks of an
  image are never all in memory together;
- clean-up decodes one mask at a time and labels only its bounding box when that is exact.

Two deliberate differences in *what*: an empty mask is never returned (the public code keeps
empty masks when both thresholds are 0), and ``bbox`` is the tight COCO box (``w`` counts the
pixels, one more than the public code's ``x1 - x0``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from engine.amg.boxes import masks_to_boxes_xyxy, xyxy_inclusive_to_xywh
from engine.amg.calibration import IouCalibration
from engine.amg.crops import box_near_crop_edge, crop_box_xywh, generate_crop_boxes
from engine.amg.decoding import PointDecoder
from engine.amg.nms import nms
from engine.amg.point_grids import build_all_layer_point_grids
from engine.amg.regions import clean_up_masks
from engine.amg.stability import stability_from_counts
from engine.amg.upsampling import LogitUpsampler
from engine.modeling.sam import Sam
from engine.predictor import SamPredictor
from storage import rle as rle_codec
from storage.errors import ConfigError, ImageError
from storage.rle import Rle

__all__ = ["OUTPUT_MODES", "AutomaticMaskGenerator"]

#: Forms of ``segmentation`` that ``generate`` can return.
OUTPUT_MODES: tuple[str, ...] = ("coco_rle", "binary_mask", "uncompressed_rle")

# Logit pixels (float32, 4 bytes each) upsampled at once; bounds the generator's peak memory.
_DEFAULT_UPSAMPLE_PIXELS = 16 * 1024 * 1024


class _EmbeddingSource(Protocol):
    """What ``generate`` needs from ``engine.embeddings.EmbeddingCache``."""

    def get_or_compute(
        self,
        image_id: str,
        image: np.ndarray | Callable[[], np.ndarray],
        predictor: SamPredictor,
    ) -> None: ...


@dataclass
class _Masks:
    """Masks in flat arrays: COCO RLEs of the whole image plus per-mask values.

    ``boxes`` are XYXY with the end inclusive, ``points`` (x, y) and ``crop_boxes`` XYXY with the
    end exclusive, all in image pixels.
    """

    rles: list[Rle] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.int64))
    iou: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    stability: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.float64))
    crop_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.rles)

    def take(self, index: np.ndarray) -> _Masks:
        index = np.asarray(index, dtype=np.int64)
        return _Masks(
            rles=[self.rles[i] for i in index],
            boxes=self.boxes[index],
            iou=self.iou[index],
            stability=self.stability[index],
            points=self.points[index],
            crop_boxes=self.crop_boxes[index],
        )

    @staticmethod
    def concat(parts: list[_Masks]) -> _Masks:
        if not parts:
            return _Masks()
        return _Masks(
            rles=[r for p in parts for r in p.rles],
            boxes=np.concatenate([p.boxes for p in parts]),
            iou=np.concatenate([p.iou for p in parts]),
            stability=np.concatenate([p.stability for p in parts]),
            points=np.concatenate([p.points for p in parts]),
            crop_boxes=np.concatenate([p.crop_boxes for p in parts]),
        )


@dataclass(frozen=True)
class _Crop:
    """One crop being processed: its box (XYXY, end exclusive) and the image size (H, W)."""

    box: list[int]
    image_size: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return y1 - y0, x1 - x0


class AutomaticMaskGenerator:
    """Masks for everything in an image, by prompting SAM with grids of points.

    Args:
        model: the SAM model (any variant; eval mode).
        points_per_side: points along each side of the layer-0 grid (None: use point_grids).
        points_per_batch: points decoded together; more is faster and uses more memory.
        pred_iou_thresh: keep masks whose predicted IoU is above this (0 disables the filter).
        stability_score_thresh: keep masks whose stability score is at least this (0 disables).
        stability_score_offset: logit offset of the stability score's two thresholds.
        box_nms_thresh: box IoU above which NMS drops the lower-ranked mask within a crop.
        crop_n_layers: zoomed crop layers; layer i has 2**i x 2**i crops (0: whole image only).
        crop_nms_thresh: box IoU above which NMS across crops drops the less zoomed mask.
        crop_overlap_ratio: overlap of layer-1 crops as a fraction of the image's short side.
        crop_n_points_downscale_factor: points per side divide by this on each deeper layer.
        point_grids: explicit normalised (x, y) grids in [0, 1], one ``(N, 2)`` array per layer.
        min_mask_region_area: fill holes and drop islands under this many pixels (0 disables).
        max_mask_region_fraction: drop masks covering at least this fraction of the image (the
            paper's 0.95 filter; None disables).
        output_mode: "coco_rle" (``{"size", "counts": str}``), "binary_mask" (``(H, W)`` bool)
            or "uncompressed_rle" (``{"size", "counts": list[int]}``).
        upsample_pixels: logit pixels upsampled at once (4 bytes each): the memory bound.
        iou_calibration: a map from the IoU head's answer to the expected IoU
            (:class:`engine.amg.calibration.IouCalibration`, or its ``to_dict()``), fitted for
            this model on holdout images; ``pred_iou_thresh`` and the returned
            ``predicted_iou`` are then in expected IoU. None: the head's answer, as SAM.
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        max_mask_region_fraction: float | None = None,
        output_mode: str = "coco_rle",
        *,
        upsample_pixels: int = _DEFAULT_UPSAMPLE_PIXELS,
        iou_calibration: IouCalibration | Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ConfigError("give exactly one of points_per_side and point_grids")
        if output_mode not in OUTPUT_MODES:
            raise ConfigError(f"output_mode is {output_mode!r}; expected one of {OUTPUT_MODES}")
        if points_per_batch < 1:
            raise ConfigError(f"points_per_batch is {points_per_batch}; expected 1 or more")
        for name, value in (
            ("box_nms_thresh", box_nms_thresh),
            ("crop_nms_thresh", crop_nms_thresh),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} is {value}; expected a box IoU in [0, 1]")
        if max_mask_region_fraction is not None and not 0.0 < max_mask_region_fraction <= 1.0:
            raise ConfigError(
                f"max_mask_region_fraction is {max_mask_region_fraction}; expected (0, 1] or None"
            )
        if min_mask_region_area < 0 or upsample_pixels < 1:
            raise ConfigError("min_mask_region_area must be >= 0 and upsample_pixels >= 1")
        if point_grids is None:
            assert points_per_side is not None
            point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        elif len(point_grids) != crop_n_layers + 1:
            raise ConfigError(
                f"point_grids has {len(point_grids)} grids; expected crop_n_layers + 1 = "
                f"{crop_n_layers + 1}"
            )
        self.point_grids = [_check_grid(g, i) for i, g in enumerate(point_grids)]
        self.model = model
        self.predictor = SamPredictor(model)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.min_mask_region_area = int(min_mask_region_area)
        self.max_mask_region_fraction = max_mask_region_fraction
        self.output_mode = output_mode
        self.upsample_pixels = int(upsample_pixels)
        if iou_calibration is not None and not isinstance(iou_calibration, IouCalibration):
            iou_calibration = IouCalibration.from_dict(iou_calibration)
        self.iou_calibration = iou_calibration

    @torch.inference_mode()
    def generate(
        self,
        image: np.ndarray,
        *,
        image_id: str | None = None,
        embeddings: _EmbeddingSource | None = None,
    ) -> list[dict[str, Any]]:
        """Masks of ``image``, an ``(H, W, 3)`` uint8 RGB array.

        Args:
            image: the image.
            image_id, embeddings: with both, the whole-image embedding comes from (and goes to)
                ``embeddings`` (an ``engine.embeddings.EmbeddingCache``) under ``image_id``.

        Returns:
            one dict per mask: ``segmentation`` (see ``output_mode``), ``area`` (pixels),
            ``bbox`` (tight XYWH, pixels), ``predicted_iou``, ``point_coords`` (``[[x, y]]``,
            pixels), ``stability_score``, ``crop_box`` (XYWH, pixels).
        """
        _check_image(image)
        if not image.flags.writeable:
            # Decoded images can be read-only views; torch warns when wrapping those.
            image = image.copy()
        masks = self._generate_masks(image, image_id=image_id, embeddings=embeddings)
        return self._records(masks)

    def _generate_masks(
        self,
        image: np.ndarray,
        *,
        image_id: str | None = None,
        embeddings: _EmbeddingSource | None = None,
    ) -> _Masks:
        """The masks before formatting (see :meth:`generate`)."""
        height, width = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes(
            (height, width), self.crop_n_layers, self.crop_overlap_ratio
        )
        parts = []
        for box, layer in zip(crop_boxes, layers, strict=True):
            crop = _Crop(box, (height, width))
            cache = embeddings if layer == 0 and image_id is not None else None
            parts.append(self._process_crop(image, crop, layer, image_id, cache))
        masks = _Masks.concat(parts)
        if len(crop_boxes) > 1 and len(masks):
            # Prefer masks from smaller (more zoomed) crops: score 1 / crop area.
            crop_area = torch.as_tensor(
                (masks.crop_boxes[:, 2] - masks.crop_boxes[:, 0])
                * (masks.crop_boxes[:, 3] - masks.crop_boxes[:, 1])
            )
            by_zoom = nms(torch.as_tensor(masks.boxes), 1 / crop_area, self.crop_nms_thresh)
            masks = masks.take(by_zoom.numpy())
        if self.min_mask_region_area > 0 and len(masks):
            kept, rles, boxes = clean_up_masks(
                masks.rles,
                self.min_mask_region_area,
                max(self.box_nms_thresh, self.crop_nms_thresh),
            )
            masks = masks.take(kept)
            masks.rles, masks.boxes = rles, boxes
            if self.max_mask_region_fraction is not None:
                # Filling holes can grow a mask past the limit.
                area = rle_codec.area(masks.rles)
                masks = masks.take(np.flatnonzero(~self._too_large(area, height * width)))
        return masks

    def _process_crop(
        self,
        image: np.ndarray,
        crop: _Crop,
        layer: int,
        image_id: str | None,
        embeddings: _EmbeddingSource | None,
    ) -> _Masks:
        x0, y0, x1, y1 = crop.box
        predictor = self.predictor
        if embeddings is not None and image_id is not None:
            embeddings.get_or_compute(image_id, image, predictor)
        else:
            predictor.set_image(np.ascontiguousarray(image[y0:y1, x0:x1]))
        crop_h, crop_w = crop.size
        assert predictor.input_size is not None
        upsampler = LogitUpsampler(
            self.model.prompt_encoder.mask_input_size,
            self.model.img_size,
            predictor.input_size,
            (crop_h, crop_w),
        )
        decoder = PointDecoder(
            self.model, predictor.get_image_embedding(), *upsampler.needed_low_res
        )
        points = self.point_grids[layer] * np.array([[crop_w, crop_h]], dtype=np.float64)
        parts = [
            self._process_batch(points[i : i + self.points_per_batch], crop, decoder, upsampler)
            for i in range(0, len(points), self.points_per_batch)
        ]
        predictor.reset_image()
        masks = _Masks.concat(parts)
        if len(masks):
            keep = nms(
                torch.as_tensor(masks.boxes), torch.as_tensor(masks.iou), self.box_nms_thresh
            )
            masks = masks.take(keep.numpy())
        offset = np.array([[x0, y0]])
        masks.boxes = masks.boxes + np.tile(offset, 2)
        masks.points = masks.points + offset
        masks.crop_boxes = np.tile(np.asarray(crop.box, dtype=np.int64), (len(masks), 1))
        return masks

    def _process_batch(
        self,
        points: np.ndarray,
        crop: _Crop,
        decoder: PointDecoder,
        upsampler: LogitUpsampler,
    ) -> _Masks:
        """Masks of a batch of points ``(B, 2)`` in crop pixels; boxes in crop pixels."""
        coords = self.predictor.transform.apply_coords(points, crop.size)
        decoded = decoder.run(torch.as_tensor(coords, dtype=torch.float32))
        iou = decoded.iou_predictions.flatten().cpu().numpy()  # (3B,): prompt-major
        if self.iou_calibration is not None:
            iou = self.iou_calibration(iou)
        candidates: np.ndarray = np.arange(iou.size)
        if self.pred_iou_thresh > 0.0:
            candidates = candidates[iou > self.pred_iou_thresh]
        if candidates.size == 0:
            return _Masks()
        index = torch.as_tensor(candidates)
        low_res = decoder.low_res_logits(decoded, index // 3, index % 3).cpu()
        if self.stability_score_thresh > 0.0:
            bound = upsampler.stability_upper_bound(
                low_res.numpy(), self.model.mask_threshold, self.stability_score_offset
            )
            possible = bound >= self.stability_score_thresh
            candidates, low_res = candidates[possible], low_res[torch.as_tensor(possible)]
        parts = []
        for chunk in self._chunks(len(candidates), crop):
            # Column-major (x-first) logits: thresholded, they are what COCO RLE encodes.
            logits_t = upsampler.upsample(low_res[chunk], transposed=True)
            rows, part = self._masks_from_logits(logits_t, crop)
            chosen = candidates[chunk][rows]
            part.iou = iou[chosen]
            part.points = points[chosen // 3]
            parts.append(part)
        return _Masks.concat(parts)

    def _chunks(self, n: int, crop: _Crop) -> Iterator[slice]:
        """Slices of at most ``upsample_pixels`` float32 logits (4 bytes a pixel) and as many
        bytes again of whole-image bool masks (1 byte a pixel) for the RLE encoder."""
        crop_h, crop_w = crop.size
        image_h, image_w = crop.image_size
        step = min(
            self.upsample_pixels // (crop_h * crop_w),
            4 * self.upsample_pixels // (image_h * image_w),
        )
        step = max(1, step)
        for start in range(0, n, step):
            yield slice(start, min(start + step, n))

    def _masks_from_logits(self, logits_t: np.ndarray, crop: _Crop) -> tuple[np.ndarray, _Masks]:
        """Filter and encode masks from full-resolution logits of one crop, given transposed
        as ``(K, w, h)``.

        Returns the rows of ``logits_t`` kept and their RLEs (whole image), boxes (crop
        pixels) and stability scores; the caller fills in IoU and points.
        """
        threshold = self.model.mask_threshold
        offset = self.stability_score_offset
        # numpy's count_nonzero on a contiguous bool array is several times faster than a sum.
        high = np.array([np.count_nonzero(m > threshold + offset) for m in logits_t])
        low = np.array([np.count_nonzero(m > threshold - offset) for m in logits_t])
        stability = stability_from_counts(high, low)
        rows: np.ndarray = np.arange(len(logits_t))
        if self.stability_score_thresh > 0.0:
            rows = rows[stability >= self.stability_score_thresh]
            logits_t = logits_t[rows]
        binary_t = logits_t > threshold  # (K, w, h)
        boxes = masks_to_boxes_xyxy(binary_t.transpose(0, 2, 1))
        x0, y0, _, _ = crop.box
        height, width = crop.image_size
        area = np.array([np.count_nonzero(m) for m in binary_t], dtype=np.int64)
        keep = area > 0
        in_image = boxes + np.array([x0, y0, x0, y0])
        keep &= ~box_near_crop_edge(in_image, crop.box, [0, 0, width, height])
        keep &= ~self._too_large(area, height * width)
        if not keep.all():
            binary_t, boxes, rows = binary_t[keep], boxes[keep], rows[keep]
        masks = _Masks(
            rles=_encode_in_image(binary_t, crop),
            boxes=boxes,
            iou=np.zeros(len(rows), dtype=np.float32),
            stability=stability[rows],
            points=np.zeros((len(rows), 2)),
            crop_boxes=np.zeros((len(rows), 4), dtype=np.int64),
        )
        return rows, masks

    def _too_large(self, area: np.ndarray, image_area: int) -> np.ndarray:
        if self.max_mask_region_fraction is None:
            return np.zeros(len(area), dtype=bool)
        return np.asarray(area) >= self.max_mask_region_fraction * image_area

    def _records(self, masks: _Masks) -> list[dict[str, Any]]:
        areas = rle_codec.area(masks.rles)
        bboxes = xyxy_inclusive_to_xywh(masks.boxes)
        records = []
        for i, rle in enumerate(masks.rles):
            records.append(
                {
                    "segmentation": self._segmentation(rle),
                    "area": int(areas[i]),
                    "bbox": [float(v) for v in bboxes[i]],
                    "predicted_iou": float(masks.iou[i]),
                    "point_coords": [[float(v) for v in masks.points[i]]],
                    "stability_score": float(masks.stability[i]),
                    "crop_box": [int(v) for v in crop_box_xywh(masks.crop_boxes[i].tolist())],
                }
            )
        return records

    def _segmentation(self, rle: Rle) -> Any:
        if self.output_mode == "binary_mask":
            return rle_codec.decode([rle])[0]
        if self.output_mode == "uncompressed_rle":
            return {
                "size": list(rle["size"]),
                "counts": rle_codec.counts_to_runs(rle["counts"]).tolist(),
            }
        return rle


def _encode_in_image(binary_t: np.ndarray, crop: _Crop) -> list[Rle]:
    """COCO RLEs of crop masks given transposed, ``(K, w, h)``, placed in the whole image."""
    if len(binary_t) == 0:
        return []
    height, width = crop.image_size
    x0, y0, x1, y1 = crop.box
    if (x0, y0, x1, y1) != (0, 0, width, height):
        full_t = np.zeros((len(binary_t), width, height), dtype=bool)
        full_t[:, x0:x1, y0:y1] = binary_t
        binary_t = full_t
    # (K, W, H) in C order is (K, H, W) column-major: encoded without a copy.
    return rle_codec.encode(binary_t.transpose(0, 2, 1))


def _check_grid(grid: np.ndarray, layer: int) -> np.ndarray:
    arr = np.asarray(grid, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ConfigError(f"point_grids[{layer}] has shape {arr.shape}; expected (N, 2), N >= 1")
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise ConfigError(f"point_grids[{layer}] must hold (x, y) in [0, 1]")
    return arr


def _check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = getattr(image, "dtype", type(image).__name__)
        raise ImageError(f"image is {kind}; expected a uint8 RGB array (H, W, 3)")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"image has shape {image.shape}; expected (H, W, 3) with H, W > 0")
