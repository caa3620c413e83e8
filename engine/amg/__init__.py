"""Fully automatic mask generation (data-engine stage 3): SAM's grid-prompting algorithm.

Public surface: :class:`AutomaticMaskGenerator`, :func:`paper_preset`, the per-model gate
calibration :func:`fit_gate_calibration`, and the per-image batch
runner :func:`generate_for_images` that the CLI, Prefect flows and Dask workers can call.
"""

from engine.amg.batch import AmgRunSummary, SkippedImage, generate_for_images
from engine.amg.calibration import GateCalibration, IouCalibration, fit_gate_calibration
from engine.amg.generator import OUTPUT_MODES, AutomaticMaskGenerator
from engine.amg.presets import PRESETS, paper_preset

__all__ = [
    "OUTPUT_MODES",
    "PRESETS",
    "AmgRunSummary",
    "AutomaticMaskGenerator",
    "GateCalibration",
    "IouCalibration",
    "SkippedImage",
    "fit_gate_calibration",
    "generate_for_images",
    "paper_preset",
]
