"""Point grids that prompt the model during automatic mask generation.

A grid is an ``(n * n, 2)`` float64 array of (x, y) points in [0, 1] x [0, 1], normalised by
the crop's width and height: multiply by ``(crop_w, crop_h)`` to get pixels. Points sit at cell
centres (``(i + 0.5) / n``), x varies fastest, so row ``k`` is cell ``(k // n, k % n)`` as
(row, column). This is the layout SAM's public generator uses, which keeps its ``point_grids``
argument interchangeable with ours.
"""

from __future__ import annotations

import numpy as np

from storage.errors import ConfigError

__all__ = ["build_all_layer_point_grids", "build_point_grid"]


def build_point_grid(n_per_side: int) -> np.ndarray:
    """``n_per_side ** 2`` cell-centre points (x, y), normalised to [0, 1], x fastest."""
    if n_per_side < 1:
        raise ConfigError(f"n_per_side is {n_per_side}; expected a positive number of points")
    centres = (np.arange(n_per_side, dtype=np.float64) + 0.5) / n_per_side
    xs, ys = np.meshgrid(centres, centres, indexing="xy")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """One grid per crop layer (``n_layers + 1`` grids): layer ``i`` has
    ``int(n_per_side / scale_per_layer ** i)`` points per side (the zoomed crops of deeper layers
    need fewer points to cover objects of the same size in pixels)."""
    if n_layers < 0:
        raise ConfigError(f"n_layers is {n_layers}; expected 0 or more crop layers")
    if scale_per_layer < 1:
        raise ConfigError(f"scale_per_layer is {scale_per_layer}; expected 1 or more")
    grids = []
    for layer in range(n_layers + 1):
        n = int(n_per_side / (scale_per_layer**layer))
        if n < 1:
            raise ConfigError(
                f"points_per_side {n_per_side} downscaled by {scale_per_layer} per layer leaves "
                f"no points on crop layer {layer}; use fewer crop layers or more points"
            )
        grids.append(build_point_grid(n))
    return grids
