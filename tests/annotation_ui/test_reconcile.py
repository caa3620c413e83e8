"""One annotation -> mask records (the part of reconciling that needs no server)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from annotation_ui.client import Project, ProjectKey
from annotation_ui.labeling_config import labeling_config, parse_labeling_config
from annotation_ui.reconcile import PredictedMask, annotation_masks, mask_id_prefix
from annotation_ui.regions import brush_result
from storage import rle
from storage.errors import AnnotationError
from storage.mask_store import ImageRecord
from tests.annotation_ui.conftest import box_mask

H, W = 50, 80
SCHEMA = parse_labeling_config(labeling_config(1))
STAGE1 = Project(id=5, key=ProjectKey("d", 1, 2), schema=SCHEMA, uid="5.1700000000")
STAGE2 = Project(id=6, key=ProjectKey("d", 2, 0), schema=SCHEMA, uid="6.1700000000")
IMAGE = ImageRecord("a" * 24, "/img.png", W, H, "0" * 64)
# The store's id rule (storage.mask_store): ids become file names.
ID_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+\-]{0,199}$")


def region(mask: np.ndarray, region_id: str) -> dict[str, Any]:
    return brush_result(rle.encode(mask)[0], schema=SCHEMA, label="object", region_id=region_id)


def click(x: float, y: float, positive: bool = True) -> dict[str, Any]:
    return {
        "id": f"c{x}{y}",
        "from_name": "point",
        "to_name": "image",
        "type": "keypointlabels",
        "value": {"x": 100 * x / W, "y": 100 * y / H, "keypointlabels": ["object"]},
        "is_positive": positive,
    }


def annotation(result: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": 42, "result": result, "lead_time": 18.0, "updated_at": "t1", **extra}


BIG = box_mask(H, W, 0, 40, 0, 60)
SMALL = box_mask(H, W, 10, 20, 10, 20)  # inside BIG
FAR = box_mask(H, W, 42, 50, 70, 80)


def test_masks_carry_provenance_and_a_deterministic_id() -> None:
    ann = annotation([region(BIG, "r1"), region(FAR, "r2")])
    out = annotation_masks({"id": 7}, ann, project=STAGE1, image=IMAGE, annotator="ann@x")
    again = annotation_masks({"id": 7}, ann, project=STAGE1, image=IMAGE, annotator="ann@x")
    assert [r.mask_id for r in out.values()] == [r.mask_id for r in again.values()]
    for lineage, record in out.items():
        assert record.mask_id is not None and ID_RULE.match(record.mask_id)
        assert record.mask_id.startswith(lineage + "-")
        assert lineage.startswith(f"{mask_id_prefix(STAGE1)}a42-")
        assert (record.stage, record.round, record.source) == (1, 2, "manual")
        assert (record.image_id, record.annotator, record.lead_time_s) == (
            IMAGE.image_id,
            "ann@x",
            9.0,
        )
        assert record.run_id == "label-studio-5.1700000000"
    masks = [rle.decode([r.segmentation])[0] for r in out.values()]
    np.testing.assert_array_equal(masks[0], BIG[0])
    np.testing.assert_array_equal(masks[1], FAR[0])


def test_each_prompt_is_credited_to_one_mask() -> None:
    ann = annotation(
        [
            region(BIG, "big"),
            region(SMALL, "small"),
            region(FAR, "far"),
            click(15, 15),  # inside BIG and SMALL: the smaller one
            click(5, 5),  # inside BIG only
            click(75, 30, False),  # background: nearest box is FAR's
            click(65, 45),
        ]  # inside nothing: nearest box (FAR)
    )
    out = list(annotation_masks({"id": 1}, ann, project=STAGE1, image=IMAGE).values())
    assert [r.clicks for r in out] == [1, 1, 2]
    assert out[0].point_coords == [[pytest.approx(5.0), pytest.approx(5.0)]]
    assert out[1].point_coords == [[pytest.approx(15.0), pytest.approx(15.0)]]
    assert out[2].point_coords == [[pytest.approx(65.0), pytest.approx(45.0)]]


def test_stage2_unchanged_prediction_is_model_and_changed_is_manual() -> None:
    accepted = rle.encode(BIG)[0]["counts"]
    predicted = {accepted: PredictedMask("v0003", 0.91)}
    ann = annotation([region(BIG, "p1"), region(SMALL, "p2")])
    out = list(
        annotation_masks({"id": 1}, ann, project=STAGE2, image=IMAGE, predicted=predicted).values()
    )
    assert [(r.source, r.model_version, r.predicted_iou) for r in out] == [
        ("model", "v0003", 0.91),
        ("manual", None, None),
    ]


def test_a_mask_redrawn_back_to_a_replaced_shape_gets_a_fresh_id() -> None:
    ann = annotation([region(BIG, "r1")])
    (old,) = annotation_masks({"id": 1}, ann, project=STAGE1, image=IMAGE).values()
    back = annotation({**ann}["result"], updated_at="t3")
    (new,) = annotation_masks(
        {"id": 1}, back, project=STAGE1, image=IMAGE, hidden={str(old.mask_id)}
    ).values()
    assert new.mask_id != old.mask_id
    assert str(new.mask_id).rsplit("-", 1)[0] == str(old.mask_id).rsplit("-", 1)[0]


@pytest.mark.parametrize(
    ("ann", "message"),
    [
        (annotation([]), "no result"),
        (annotation([click(3, 3)]), "no brush mask"),
        (annotation([region(BIG, "same"), region(FAR, "same")]), "appears twice"),
        ({"result": [region(BIG, "x")]}, "no id"),
    ],
)
def test_unusable_annotations_raise(ann: dict[str, Any], message: str) -> None:
    with pytest.raises(AnnotationError, match=message):
        annotation_masks({"id": 9}, ann, project=STAGE1, image=IMAGE)
