"""Label Studio region JSON <-> our masks and prompts.

Units: Label Studio gives keypoint and rectangle positions in **percent** of the original image
size (``x``/``width`` of ``original_width``, ``y``/``height`` of ``original_height``, 0-100, the
rectangle's ``x``/``y`` its top-left corner); everything returned here is in **pixels** (x to the
right, y down; boxes XYXY for SAM's predictor). Brush masks travel as Label Studio's brush RLE
(``value.rle``, a list of bytes, converted by :mod:`storage.rle`) and come back as COCO RLE.

Parsing is strict: a region with an unknown ``from_name``, a coordinate outside 0-100 %, a brush
RLE that does not decode to the image size, or a missing field raises
:class:`~storage.errors.AnnotationError` (results) or :class:`~storage.errors.PromptError`
(interactive prompts), with a message naming the region.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from annotation_ui.labeling_config import NEGATIVE_LABEL, LabelingSchema
from storage import rle as rle_codec
from storage.errors import AnnotationError, PromptError, RleError
from storage.rle import Rle

__all__ = [
    "BrushRegion",
    "ParsedResult",
    "Prompt",
    "Prompts",
    "brush_result",
    "parse_result",
    "prompts_from_context",
]


@dataclass(frozen=True)
class Prompt:
    """One click or box from a result, in pixels.

    ``kind`` is ``"point"`` (``xy`` the click) or ``"box"`` (``box_xyxy`` the rectangle, ``xy``
    its centre). ``positive`` is False for background clicks; boxes are always positive.
    """

    kind: str
    xy: tuple[float, float]
    positive: bool
    label: str | None
    box_xyxy: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Prompts:
    """SAM predictor inputs from an interactive context, in pixels.

    ``point_coords`` is float32 ``(N, 2)`` XY, ``point_labels`` int32 ``(N,)`` (1 foreground,
    0 background), ``box`` float32 ``(4,)`` XYXY or None; ``label`` is the class the annotator
    had selected (None if the context named none).
    """

    point_coords: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None
    label: str | None
    width: int
    height: int

    @property
    def count(self) -> int:
        """Number of prompts (clicks plus the box)."""
        return len(self.point_labels) + (self.box is not None)


@dataclass(frozen=True)
class BrushRegion:
    """One brush region of a result: its Label Studio id, class label and mask (COCO RLE)."""

    region_id: str
    label: str | None
    segmentation: Rle
    score: float | None = None


@dataclass(frozen=True)
class ParsedResult:
    """An annotation's (or prediction's) result list, parsed: masks and the prompts used."""

    regions: list[BrushRegion] = field(default_factory=list)
    prompts: list[Prompt] = field(default_factory=list)


def brush_result(
    segmentation: Rle,
    *,
    schema: LabelingSchema,
    label: str,
    region_id: str,
    score: float | None = None,
) -> dict[str, Any]:
    """A Label Studio ``brushlabels`` result item for a COCO RLE mask (image size from the RLE).

    ``score`` (the model's predicted IoU, 0-1) is shown by Label Studio next to the region.
    """
    height, width = (int(s) for s in rle_codec.validate(segmentation)["size"])
    item: dict[str, Any] = {
        "id": region_id,
        "from_name": schema.brush,
        "to_name": schema.image,
        "type": "brushlabels",
        "origin": "prediction",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle_codec.to_brush(segmentation), "brushlabels": [label]},
    }
    if score is not None:
        item["score"] = float(score)
    return item


def parse_result(
    result: Any, *, schema: LabelingSchema, height: int, width: int, where: str
) -> ParsedResult:
    """Parse a result list of brush, keypoint and rectangle regions on an image of ``height`` x
    ``width`` pixels. ``where`` names the annotation in error messages (e.g. ``task 7 annotation
    12``).

    Raises :class:`AnnotationError` for a result that is not a list, an item with an unknown
    ``from_name`` or type, a brush RLE that does not decode to ``height`` x ``width``, a region
    whose ``original_width``/``original_height`` differ from the image, or coordinates outside
    0-100 %.
    """
    if not isinstance(result, list):
        raise AnnotationError(f"{where}: result is {type(result).__name__}; expected a list")
    parsed = ParsedResult()
    for i, item in enumerate(result):
        name = f"{where} result[{i}]"
        if not isinstance(item, Mapping):
            raise AnnotationError(f"{name} is {type(item).__name__}; expected an object")
        from_name = item.get("from_name")
        if from_name not in schema.controls:
            raise AnnotationError(
                f"{name} has from_name {from_name!r}; expected one of {sorted(schema.controls)}"
            )
        _check_original_size(item, height, width, name)
        if from_name == schema.brush:
            parsed.regions.append(_brush_region(item, height, width, name))
        else:
            parsed.prompts.append(_prompt(item, schema, height, width, name, AnnotationError))
    return parsed


def prompts_from_context(
    context: Any, *, schema: LabelingSchema, height: int, width: int
) -> Prompts:
    """SAM prompts from Label Studio's interactive context ``{"result": [...]}``, in pixels.

    Keypoints become points (label 0 when ``is_positive`` is false or the label is
    :data:`~annotation_ui.labeling_config.NEGATIVE_LABEL`); the last rectangle becomes the box
    (SAM takes one). Raises :class:`PromptError` for a malformed context, an unknown control,
    coordinates outside 0-100 %, or no prompt at all.
    """
    items = context.get("result") if isinstance(context, Mapping) else None
    if not isinstance(items, list) or not items:
        raise PromptError("context has no result list; expected keypoint or rectangle regions")
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    box: tuple[float, float, float, float] | None = None
    label: str | None = None
    for i, item in enumerate(items):
        name = f"context.result[{i}]"
        if not isinstance(item, Mapping) or item.get("from_name") not in schema.prompt_controls:
            got = item.get("from_name") if isinstance(item, Mapping) else item
            raise PromptError(
                f"{name} has from_name {got!r}; expected one of {sorted(schema.prompt_controls)}"
            )
        prompt = _prompt(item, schema, height, width, name, PromptError)
        if prompt.positive and prompt.label is not None:
            label = prompt.label
        if prompt.kind == "box":
            box = prompt.box_xyxy
        else:
            points.append(prompt.xy)
            labels.append(1 if prompt.positive else 0)
    return Prompts(
        point_coords=np.asarray(points, dtype=np.float32).reshape(-1, 2),
        point_labels=np.asarray(labels, dtype=np.int32),
        box=None if box is None else np.asarray(box, dtype=np.float32),
        label=label,
        width=width,
        height=height,
    )


def _brush_region(item: Mapping[str, Any], height: int, width: int, name: str) -> BrushRegion:
    value = item.get("value")
    if not isinstance(value, Mapping):
        raise AnnotationError(f"{name} has no value object")
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise AnnotationError(f"{name}: brush value has format {value.get('format')!r}; need rle")
    try:
        segmentation = rle_codec.from_brush(value["rle"], height, width)
    except RleError as err:
        raise AnnotationError(f"{name}: brush RLE is not a {height}x{width} mask: {err}") from None
    labels = value.get("brushlabels") or []
    score = item.get("score")
    return BrushRegion(
        region_id=_region_id(item, name),
        label=str(labels[0]) if labels else None,
        segmentation=segmentation,
        score=float(score) if isinstance(score, int | float) and math.isfinite(score) else None,
    )


def _prompt(
    item: Mapping[str, Any],
    schema: LabelingSchema,
    height: int,
    width: int,
    name: str,
    error: type[AnnotationError] | type[PromptError],
) -> Prompt:
    value = item.get("value")
    if not isinstance(value, Mapping):
        raise error(f"{name} has no value object")
    is_box = item.get("from_name") == schema.rectangle
    label_key = "rectanglelabels" if is_box else "keypointlabels"
    labels = value.get(label_key) or value.get("labels") or []
    label = str(labels[0]) if labels else None
    x = _percent(value, "x", name, error)
    y = _percent(value, "y", name, error)
    if not is_box:
        positive = item.get("is_positive") is not False and label != NEGATIVE_LABEL
        return Prompt("point", (x * width / 100, y * height / 100), positive, label)
    w = _percent(value, "width", name, error)
    h = _percent(value, "height", name, error)
    if x + w > 100 + 1e-6 or y + h > 100 + 1e-6:
        raise error(f"{name}: rectangle x+width or y+height exceeds 100 %")
    if value.get("rotation") not in (None, 0, 0.0):
        raise error(f"{name}: rotated rectangles are not supported (rotation {value['rotation']})")
    x0, y0 = x * width / 100, y * height / 100
    x1, y1 = (x + w) * width / 100, (y + h) * height / 100
    return Prompt("box", ((x0 + x1) / 2, (y0 + y1) / 2), True, label, (x0, y0, x1, y1))


def _percent(
    value: Mapping[str, Any], key: str, name: str, error: type[AnnotationError] | type[PromptError]
) -> float:
    v = value.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise error(f"{name}: value.{key} is {v!r}; expected a number of percent 0-100")
    if not 0.0 <= v <= 100.0:
        raise error(f"{name}: value.{key} is {v} %; expected 0-100 % of the image")
    return float(v)


def _check_original_size(item: Mapping[str, Any], height: int, width: int, name: str) -> None:
    # Regions carry the size Label Studio saw; a different size means the task's image is not
    # the registered one, and percent coordinates or brush pixels would land in the wrong place.
    ow, oh = item.get("original_width"), item.get("original_height")
    if ow is None and oh is None:
        return
    if ow != width or oh != height:
        raise AnnotationError(
            f"{name} was drawn on a {ow}x{oh} image; the registered image is {width}x{height} "
            "(width x height)"
        )


def _region_id(item: Mapping[str, Any], name: str) -> str:
    region_id = item.get("id")
    if not isinstance(region_id, str | int) or isinstance(region_id, bool) or region_id == "":
        raise AnnotationError(f"{name} has no region id")
    return str(region_id)
