from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from annotation_ui.labeling_config import (
    NEGATIVE_LABEL,
    labeling_config,
    parse_labeling_config,
)
from storage.errors import ConfigError


@pytest.mark.parametrize("stage", [1, 2])
def test_default_config_has_the_contract_controls(stage: int) -> None:
    schema = parse_labeling_config(labeling_config(stage))
    assert (schema.image, schema.image_value) == ("image", "image")
    assert (schema.brush, schema.keypoint, schema.rectangle) == ("mask", "point", "box")
    assert schema.classes == ("object",)
    assert schema.controls == {"mask", "point", "box"}


def test_classes_rewrite_every_control_and_keep_the_negative_click() -> None:
    root = ET.fromstring(labeling_config(1, ["cat", "dog"]))
    labels = {c.tag: [lb.get("value") for lb in c] for c in root if len(c)}
    assert labels["BrushLabels"] == ["cat", "dog"]
    assert labels["KeyPointLabels"] == ["cat", "dog", NEGATIVE_LABEL]
    assert labels["RectangleLabels"] == ["cat", "dog"]
    smart = [c.get("smart") for c in root if c.tag in ("KeyPointLabels", "RectangleLabels")]
    assert smart == ["true", "true"]


def test_stage_two_tells_annotators_to_correct_predictions() -> None:
    header = ET.fromstring(labeling_config(2)).find("Header")
    assert header is not None and "prefilled" in str(header.get("value"))


@pytest.mark.parametrize(
    ("stage", "classes"),
    [(3, ["object"]), (1, []), (1, ["a", "a"]), (1, [""]), (1, [NEGATIVE_LABEL]), (1, "object")],
)
def test_bad_stage_or_classes_are_config_errors(stage: int, classes: object) -> None:
    with pytest.raises(ConfigError):
        labeling_config(stage, classes)  # type: ignore[arg-type]


def test_hand_written_config_is_found_by_tag() -> None:
    xml = """<View><Image name="img" value="$url"/>
      <BrushLabels name="b" toName="img"><Label value="car"/></BrushLabels>
      <KeyPointLabels name="k" toName="img"><Label value="car"/></KeyPointLabels></View>"""
    schema = parse_labeling_config(xml)
    assert (schema.image, schema.image_value, schema.brush) == ("img", "url", "b")
    assert (schema.keypoint, schema.rectangle, schema.classes) == ("k", None, ("car",))


@pytest.mark.parametrize(
    "xml",
    [
        "<View><Image name='i' value='$image'/>",
        "<View><Image name='i' value='$image'/></View>",
        "<View><Image name='i' value='$image'/><BrushLabels name='b' toName='x'/></View>",
        "<View><Image name='i' value='image'/><BrushLabels name='b' toName='i'/></View>",
    ],
)
def test_configs_without_a_usable_brush_are_rejected(xml: str) -> None:
    with pytest.raises(ConfigError):
        parse_labeling_config(xml)
