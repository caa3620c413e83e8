"""Annotators behind one interface: a simulated person (demo, tests) and Label Studio (people).

``LabelStudioAnnotator`` lives in :mod:`flows.annotators.label_studio` and is imported from there,
so that using the simulated annotator never loads the Label Studio SDK.
"""

from flows.annotators.base import Annotator
from flows.annotators.ground_truth import GROUND_TRUTH_KEY, GroundTruth
from flows.annotators.simulated import (
    ClickSession,
    SimulatedAnnotator,
    TimeModel,
    click_until_target,
)

__all__ = [
    "GROUND_TRUTH_KEY",
    "Annotator",
    "ClickSession",
    "GroundTruth",
    "SimulatedAnnotator",
    "TimeModel",
    "click_until_target",
]
