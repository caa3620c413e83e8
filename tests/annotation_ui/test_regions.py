from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annotation_ui.labeling_config import NEGATIVE_LABEL, labeling_config, parse_labeling_config
from annotation_ui.regions import brush_result, parse_result, prompts_from_context
from storage import rle
from storage.errors import AnnotationError, PromptError

SCHEMA = parse_labeling_config(labeling_config(1, ["cat", "dog"]))
H, W = 40, 60


def keypoint(x: float, y: float, *, label: str = "cat", positive: bool | None = True) -> dict:
    item: dict[str, Any] = {
        "id": f"k{x}-{y}",
        "from_name": "point",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": W,
        "original_height": H,
        "value": {"x": x, "y": y, "width": 0.4, "keypointlabels": [label]},
    }
    if positive is not None:
        item["is_positive"] = positive
    return item


def rectangle(x: float, y: float, w: float, h: float, *, label: str = "dog") -> dict:
    return {
        "id": "r1",
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "value": {
            "x": x,
            "y": y,
            "width": w,
            "height": h,
            "rotation": 0,
            "rectanglelabels": [label],
        },
    }


ROTATED = {"x": 5, "y": 5, "width": 5, "height": 5, "rotation": 30, "rectanglelabels": ["dog"]}


def a_mask(seed: int = 0) -> rle.Rle:
    mask = np.zeros((1, H, W), dtype=bool)
    rng = np.random.default_rng(seed)
    y, x = rng.integers(0, H - 10), rng.integers(0, W - 10)
    mask[0, y : y + 9, x : x + 7] = True
    return rle.encode(mask)[0]


def test_brush_result_round_trips_to_the_same_coco_rle() -> None:
    seg = a_mask()
    item = brush_result(seg, schema=SCHEMA, label="dog", region_id="abc", score=0.75)
    assert (item["from_name"], item["to_name"], item["type"]) == ("mask", "image", "brushlabels")
    assert (item["original_width"], item["original_height"]) == (W, H)
    assert item["value"]["brushlabels"] == ["dog"] and item["score"] == 0.75
    parsed = parse_result([item], schema=SCHEMA, height=H, width=W, where="t")
    (region,) = parsed.regions
    assert region.segmentation == seg
    assert (region.region_id, region.label, region.score) == ("abc", "dog", 0.75)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.data())
def test_brush_round_trip_property(h: int, w: int, data: st.DataObject) -> None:
    bits = data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    seg = rle.encode(np.asarray(bits, dtype=bool).reshape(1, h, w))[0]
    item = brush_result(seg, schema=SCHEMA, label="cat", region_id="x")
    parsed = parse_result([item], schema=SCHEMA, height=h, width=w, where="t")
    assert parsed.regions[0].segmentation == seg


def test_prompts_are_converted_from_percent_to_pixels() -> None:
    context = {
        "result": [
            keypoint(50.0, 25.0),
            keypoint(10.0, 90.0, positive=False),
            keypoint(20.0, 20.0, label=NEGATIVE_LABEL),
            rectangle(10.0, 20.0, 50.0, 40.0),
        ]
    }
    prompts = prompts_from_context(context, schema=SCHEMA, height=H, width=W)
    np.testing.assert_allclose(prompts.point_coords, [[30.0, 10.0], [6.0, 36.0], [12.0, 8.0]])
    assert prompts.point_labels.tolist() == [1, 0, 0]
    np.testing.assert_allclose(prompts.box, [6.0, 8.0, 36.0, 24.0])  # XYXY pixels
    assert prompts.label == "dog"  # the last positive prompt's class
    assert prompts.count == 4


def test_a_click_without_is_positive_counts_as_foreground() -> None:
    prompts = prompts_from_context(
        {"result": [keypoint(5.0, 5.0, positive=None)]}, schema=SCHEMA, height=H, width=W
    )
    assert prompts.point_labels.tolist() == [1] and prompts.box is None


@pytest.mark.parametrize(
    "context",
    [
        None,
        {},
        {"result": []},
        {"result": [keypoint(101.0, 5.0)]},
        {"result": [keypoint(5.0, -0.1)]},
        {"result": [keypoint(float("nan"), 5.0)]},
        {"result": [rectangle(60.0, 0.0, 50.0, 10.0)]},
        {"result": [{**keypoint(5.0, 5.0), "from_name": "elsewhere"}]},
        {
            "result": [
                {
                    **rectangle(5.0, 5.0, 5.0, 5.0),
                    "value": {"x": 5, "y": 5, "width": 5, "height": 5, "rotation": 30},
                }
            ]
        },
        {"result": ["not a region"]},
    ],
)
def test_bad_contexts_are_prompt_errors(context: object) -> None:
    with pytest.raises(PromptError):
        prompts_from_context(context, schema=SCHEMA, height=H, width=W)


def test_result_prompts_are_parsed_with_their_polarity() -> None:
    parsed = parse_result(
        [
            brush_result(a_mask(), schema=SCHEMA, label="cat", region_id="m"),
            keypoint(50, 50),
            keypoint(1, 1, positive=False),
            rectangle(0, 0, 10, 10),
        ],
        schema=SCHEMA,
        height=H,
        width=W,
        where="t",
    )
    assert [(p.kind, p.positive) for p in parsed.prompts] == [
        ("point", True),
        ("point", False),
        ("box", True),
    ]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"from_name": "nope", "id": "x"}, "from_name 'nope'"),
        (keypoint(120.0, 3.0), "0-100 %"),
        ({**keypoint(3.0, 3.0), "original_width": W + 1}, "registered image"),
        ("text", "expected an object"),
    ],
)
def test_bad_result_items_are_annotation_errors_naming_the_item(item: object, message: str) -> None:
    with pytest.raises(AnnotationError, match="task 3 annotation 9 result\\[0\\]") as err:
        parse_result([item], schema=SCHEMA, height=H, width=W, where="task 3 annotation 9")
    assert message in str(err.value)


def test_brush_rle_of_another_size_is_an_annotation_error() -> None:
    other = rle.encode(np.ones((1, H + 2, W), dtype=bool))[0]
    item = brush_result(other, schema=SCHEMA, label="cat", region_id="m")
    item["original_height"] = H  # lie about the size: only the RLE tells
    with pytest.raises(AnnotationError, match=f"not a {H}x{W} mask"):
        parse_result([item], schema=SCHEMA, height=H, width=W, where="t")


def test_result_that_is_not_a_list_is_rejected() -> None:
    with pytest.raises(AnnotationError, match="expected a list"):
        parse_result({"a": 1}, schema=SCHEMA, height=H, width=W, where="t")
