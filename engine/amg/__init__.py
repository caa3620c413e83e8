"""Fully automatic mask generation (data-engine stage 3): SAM's grid-prompting algorithm.

Public surface: :class:`AutomaticMaskGenerator`, :func:`paper_preset`, and the per-image batch
runner :func:`generate_for_images` that the CLI, Prefect flows and Dask workers can call.
"""

from engine.amg.batch import AmgRunSummary, SkippedImage, generate_for_images
from engine.amg.generator import OUTPUT_MODES, AutomaticMaskGenerator
from engine.amg.presets import PRESETS, paper_preset

__all__ = [
    "OUTPUT_MODES",
    "PRESETS",
    "AmgRunSummary",
    "AutomaticMaskGenerator",
    "SkippedImage",
    "generate_for_images",
    "paper_preset",
]
