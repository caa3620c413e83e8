"""Label Studio labeling configs for stages 1 and 2, and the schema our code reads from them.

The two XML files in ``annotation_ui/configs/`` are the configs for the default class ``object``;
:func:`labeling_config` rewrites their ``<Label>`` lists for other classes. Both use four controls
whose names are a contract with the rest of ``annotation_ui``:

==========  ==================  ===============================================================
name        tag                 use
==========  ==================  ===============================================================
``image``   ``Image``           the picture, from the task's ``$image`` URL
``mask``    ``BrushLabels``     the masks: Label Studio brush RLE, one region per object
``point``   ``KeyPointLabels``  smart clicks: a class label (foreground) or ``background``
``box``     ``RectangleLabels`` smart boxes around an object
==========  ==================  ===============================================================

A click is negative (background) when Label Studio marks it ``is_positive: false`` (Alt+click in
smart mode) or when it carries the :data:`NEGATIVE_LABEL` label. Configs edited by hand keep
working as long as they have one ``BrushLabels`` on an ``Image``: :func:`parse_labeling_config`
finds the controls by tag, not by name.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import resources

from storage.errors import ConfigError

__all__ = [
    "DEFAULT_CLASSES",
    "NEGATIVE_LABEL",
    "LabelingSchema",
    "labeling_config",
    "parse_labeling_config",
]

DEFAULT_CLASSES: tuple[str, ...] = ("object",)
# The keypoint label that makes a click negative, whatever class is selected.
NEGATIVE_LABEL = "background"
_STAGES = (1, 2)
# Colours cycled over the classes; negative clicks are always red.
_PALETTE = ("#2E86DE", "#10AC84", "#F79F1F", "#8E44AD", "#16A085", "#D35400", "#2C3E50")
_NEGATIVE_COLOUR = "#EE5253"


@dataclass(frozen=True)
class LabelingSchema:
    """The controls of a labeling config that the engine reads and writes.

    Attributes:
        image: name of the ``Image`` tag (``to_name`` of every region).
        image_value: the task data key holding the image URL (``$image`` gives ``image``).
        brush: name of the ``BrushLabels`` control (masks).
        keypoint: name of the ``KeyPointLabels`` control, or None if the config has none.
        rectangle: name of the ``RectangleLabels`` control, or None.
        classes: the brush labels, in config order.
    """

    image: str
    image_value: str
    brush: str
    keypoint: str | None
    rectangle: str | None
    classes: tuple[str, ...]

    @property
    def prompt_controls(self) -> frozenset[str]:
        """Names of the controls whose regions are prompts (clicks and boxes)."""
        return frozenset(n for n in (self.keypoint, self.rectangle) if n is not None)

    @property
    def controls(self) -> frozenset[str]:
        """Names of every control the engine understands (valid ``from_name`` values)."""
        return self.prompt_controls | {self.brush}


def labeling_config(stage: int, classes: tuple[str, ...] | list[str] = DEFAULT_CLASSES) -> str:
    """The labeling config XML for ``stage`` (1 or 2) with one brush label per class.

    Raises :class:`ConfigError` for another stage, no classes, a repeated or blank class, or a
    class named like the negative click label.
    """
    if stage not in _STAGES:
        raise ConfigError(f"stage is {stage!r}; Label Studio configs exist for stages {_STAGES}")
    names = _check_classes(classes)
    root = ET.fromstring(_template(stage))
    for control in root:
        if control.tag not in ("BrushLabels", "KeyPointLabels", "RectangleLabels"):
            continue
        smart = control.tag != "BrushLabels"
        for label in list(control):
            control.remove(label)
        for i, name in enumerate(names):
            control.append(_label(name, _PALETTE[i % len(_PALETTE)], smart=smart))
        if control.tag == "KeyPointLabels":
            control.append(_label(NEGATIVE_LABEL, _NEGATIVE_COLOUR, smart=True))
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def parse_labeling_config(xml: str) -> LabelingSchema:
    """Find the image, brush, keypoint and rectangle controls of a labeling config.

    Raises :class:`ConfigError` when the XML does not parse, has no ``BrushLabels`` bound to an
    ``Image``, or binds the brush to a tag that is not an image.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise ConfigError(f"labeling config is not valid XML: {err}") from None
    images = {
        str(el.get("name")): el.get("value", "") for el in root.iter("Image") if el.get("name")
    }
    brush = next(root.iter("BrushLabels"), None)
    if brush is None or brush.get("name") is None:
        raise ConfigError("labeling config has no named <BrushLabels>; masks need one")
    to_name = brush.get("toName")
    if to_name not in images:
        raise ConfigError(
            f"labeling config: BrushLabels {brush.get('name')!r} points at {to_name!r}, "
            f"which is not an <Image> (images: {sorted(images)})"
        )
    value = images[to_name]
    if not value.startswith("$") or len(value) < 2:
        raise ConfigError(
            f"labeling config: Image {to_name!r} has value {value!r}; expected '$<data key>'"
        )

    def control(tag: str) -> str | None:
        for el in root.iter(tag):
            if el.get("toName") == to_name and el.get("name"):
                return el.get("name")
        return None

    classes = tuple(str(lb.get("value")) for lb in brush.iter("Label") if lb.get("value"))
    return LabelingSchema(
        image=str(to_name),
        image_value=value[1:],
        brush=str(brush.get("name")),
        keypoint=control("KeyPointLabels"),
        rectangle=control("RectangleLabels"),
        classes=classes,
    )


def _template(stage: int) -> str:
    return (resources.files("annotation_ui") / "configs" / f"stage{stage}.xml").read_text("utf-8")


def _label(value: str, colour: str, *, smart: bool) -> ET.Element:
    attrs = {"value": value, "background": colour}
    if smart:
        attrs.update(smart="true", showInline="true")
    return ET.Element("Label", attrs)


def _check_classes(classes: tuple[str, ...] | list[str]) -> list[str]:
    if isinstance(classes, str) or not isinstance(classes, tuple | list):
        raise ConfigError(f"classes is {classes!r}; expected a list of class names")
    names = [c.strip() if isinstance(c, str) else c for c in classes]
    if not names:
        raise ConfigError("classes is empty; expected at least one class name")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"class {name!r} is not a non-empty string")
        if name == NEGATIVE_LABEL:
            raise ConfigError(
                f"class {name!r} clashes with the negative click label; rename the class"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"classes {names} repeat a name; each class once")
    return names
