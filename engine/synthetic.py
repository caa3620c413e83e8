"""Synthetic scenes with exact ground truth: the engine's built-in image source.

A scene is a textured background with objects painted on it back to front, so later objects
occlude earlier ones. Each object's ground-truth mask is what stays visible after occlusion;
masks smaller than ``min_area`` pixels (tiny leftovers of occluded objects) are dropped.

What makes the scenes varied enough that colour alone does not segment them:

- textures on the background and on the objects: flat, low-frequency noise, stripes, linear
  gradients and checkerboards, each in two colours;
- shapes with holes (rings), thin parts (bars, L-shapes, crosses) and irregular outlines
  (star polygons, thresholded noise blobs), besides ellipses and rotated rectangles;
- sizes spread log-uniformly from a few pixels to about a third of the image side;
- a share of objects take the background's colour under them and differ only by texture;
- per-pixel sensor noise on the finished image.

Everything is drawn from the ``numpy.random.Generator`` passed in, so a scene is a pure function
of the generator's state: the same seed gives the same pixels and masks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = [
    "SHAPES",
    "TEXTURES",
    "Scene",
    "generate_scene",
    "scene_rng",
    "write_synthetic_dataset",
]

TEXTURES: tuple[str, ...] = ("flat", "noise", "stripes", "gradient", "checker")
SHAPES: tuple[str, ...] = (
    "ellipse",
    "rectangle",
    "polygon",
    "blob",
    "ring",
    "bar",
    "l_shape",
    "cross",
)


@dataclass(frozen=True)
class Scene:
    """One synthetic image with its ground truth.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        masks: ``(N, H, W)`` bool, one per visible object, occlusion applied, back to front.
        shapes: the shape name of each mask (one of :data:`SHAPES`).
    """

    image: np.ndarray
    masks: np.ndarray
    shapes: tuple[str, ...]


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for scene ``index`` of the dataset ``seed`` (independent streams)."""
    return np.random.default_rng([seed, index])


def generate_scene(
    rng: np.random.Generator,
    size: tuple[int, int] = (256, 256),
    *,
    min_objects: int = 3,
    max_objects: int = 12,
    min_area: int = 40,
    similar_colour_prob: float = 0.25,
    noise_std: float = 4.0,
) -> Scene:
    """Draw one scene.

    Args:
        rng: the random source; the scene is a pure function of its state.
        size: ``(height, width)`` of the image, pixels.
        min_objects, max_objects: how many objects are painted (before occlusion drops some).
        min_area: visible masks with fewer pixels than this are dropped.
        similar_colour_prob: chance that an object takes the background colour under its centre
            (it then differs by texture only).
        noise_std: standard deviation of the per-pixel Gaussian noise, in 0-255 grey levels.

    Returns:
        A :class:`Scene` with at least one mask.
    """
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16:
        raise ValueError(f"generate_scene: size {size} is too small; expected at least 16x16 px")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(
            f"generate_scene: min_objects={min_objects}, max_objects={max_objects}; "
            "expected 1 <= min_objects <= max_objects"
        )
    while True:
        scene = _draw_scene(rng, h, w, min_objects, max_objects, min_area, similar_colour_prob)
        if scene is None:  # every object got occluded or was too small: draw again
            continue
        canvas, masks, shapes = scene
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(noise_std)
        image = np.clip(canvas, 0, 255).astype(np.uint8)
        return Scene(image=image, masks=masks, shapes=shapes)


def write_synthetic_dataset(
    out_dir: str | Path,
    n_images: int,
    *,
    seed: int,
    size: tuple[int, int] = (256, 256),
) -> tuple[list[Path], dict[str, Any]]:
    """Write ``n_images`` scenes as PNGs plus a COCO ``annotations.json`` into ``out_dir``.

    Image ``i`` is ``synthetic_{i:05d}.png`` drawn from :func:`scene_rng` ``(seed, i)``, so a
    dataset is reproducible and its first ``k`` images do not depend on ``n_images``.
    Segmentations are COCO RLE dicts with ``counts`` as ``str``; boxes are XYWH in pixels.

    Returns:
        The image paths in order, and the COCO instances dict that was written.
    """
    from storage.rle import encode, to_bbox

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(n_images):
        scene = generate_scene(scene_rng(seed, i), size)
        path = out / f"synthetic_{i:05d}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"write_synthetic_dataset: could not write {path}")
        paths.append(path)
        image_id = i + 1
        images.append({"id": image_id, "file_name": path.name, "height": size[0], "width": size[1]})
        rles = encode(scene.masks)
        boxes = to_bbox(rles)
        for rle, box, mask, shape in zip(rles, boxes, scene.masks, scene.shapes, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": dict(rle),
                    "area": int(mask.sum()),
                    "bbox": [float(v) for v in box],
                    "iscrowd": 0,
                    "shape": shape,
                }
            )
    coco: dict[str, Any] = {
        "info": {"description": f"sam-data-engine synthetic scenes, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object"}],
    }
    (out / "annotations.json").write_text(json.dumps(coco))
    return paths, coco


# --- scene assembly ---------------------------------------------------------------------------


def _draw_scene(
    rng: np.random.Generator,
    h: int,
    w: int,
    min_objects: int,
    max_objects: int,
    min_area: int,
    similar_colour_prob: float,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]] | None:
    bg_colours = _random_colour(rng), _random_colour(rng)
    bg_texture = str(rng.choice(TEXTURES))
    canvas = _texture(rng, bg_texture, h, w, *bg_colours)
    background = canvas.copy()

    n = int(rng.integers(min_objects, max_objects + 1))
    full_masks: list[np.ndarray] = []
    shapes: list[str] = []
    for _ in range(n):
        shape = str(rng.choice(SHAPES))
        mask = _shape_mask(rng, shape, h, w)
        if not mask.any():
            continue
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        if rng.random() < similar_colour_prob:
            # Camouflage: the background's own colour under the object, a little shifted, so
            # only the texture (a different one from the background's) gives the boundary away.
            under = background[(y0 + y1) // 2, (x0 + x1) // 2]
            colour = np.clip(under + rng.normal(0, 12, 3), 0, 255).astype(np.float32)
            texture = str(rng.choice([t for t in TEXTURES if t not in ("flat", bg_texture)]))
        else:
            colour = _random_colour(rng)
            texture = str(rng.choice(TEXTURES))
        second = _second_colour(rng, colour)
        patch = _texture(rng, texture, int(y1 - y0), int(x1 - x0), colour, second)
        region = canvas[y0:y1, x0:x1]
        sub = mask[y0:y1, x0:x1]
        region[sub] = patch[sub]
        full_masks.append(mask)
        shapes.append(shape)

    # Visible part = the object minus everything painted after it.
    covered = np.zeros((h, w), dtype=bool)
    visible: list[np.ndarray] = []
    kept: list[str] = []
    for mask, shape in zip(reversed(full_masks), reversed(shapes), strict=True):
        vis = mask & ~covered
        covered |= mask
        if int(vis.sum()) >= min_area:
            visible.append(vis)
            kept.append(shape)
    if not visible:
        return None
    visible.reverse()
    kept.reverse()
    return canvas, np.stack(visible), tuple(kept)


# --- colours and textures ---------------------------------------------------------------------


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _second_colour(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """A companion colour for two-tone textures: shifted by 40-110 grey levels overall."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-6
    shifted = colour + direction * rng.uniform(40, 110)
    return np.clip(shifted, 0, 255).astype(np.float32)


def _texture(
    rng: np.random.Generator, kind: str, h: int, w: int, c1: np.ndarray, c2: np.ndarray
) -> np.ndarray:
    """An ``(h, w, 3)`` float32 patch mixing colours ``c1`` and ``c2`` in pattern ``kind``."""
    t = _TEXTURE_WEIGHTS[kind](rng, h, w)
    return c1.astype(np.float32) + t[..., None] * (c2 - c1).astype(np.float32)


def _flat(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return np.full((h, w), rng.uniform(0.0, 0.15), dtype=np.float32)


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # Value noise: a coarse random grid upsampled bicubically gives smooth blotches.
    cell = rng.uniform(3, 24)
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    coarse = rng.random((gh, gw), dtype=np.float32)
    fine = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(fine, 0.0, 1.0)


def _phase(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Distance along a random direction, pixels, for an ``(h, w)`` patch."""
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))


def _stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    period = rng.uniform(4, 20)
    wave = np.sin(_phase(rng, h, w) * np.float32(2 * np.pi / period))
    return (wave > rng.uniform(-0.5, 0.5)).astype(np.float32)


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    d = _phase(rng, h, w)
    span = float(d.max() - d.min()) or 1.0
    return (d - d.min()) / np.float32(span)


def _checker(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cell = int(rng.integers(3, 16))
    oy, ox = rng.integers(0, cell, size=2)
    yy = (np.arange(h)[:, None] + oy) // cell
    xx = (np.arange(w)[None, :] + ox) // cell
    return ((yy + xx) % 2).astype(np.float32)


_TEXTURE_WEIGHTS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "flat": _flat,
    "noise": _noise,
    "stripes": _stripes,
    "gradient": _gradient,
    "checker": _checker,
}


# --- shapes -----------------------------------------------------------------------------------


def _shape_mask(rng: np.random.Generator, shape: str, h: int, w: int) -> np.ndarray:
    """A boolean ``(h, w)`` mask of one object of kind ``shape`` at a random place and size."""
    side = min(h, w)
    # Log-uniform radius: as many small objects as big ones, from ~4 px to a third of the side.
    radius = float(np.exp(rng.uniform(np.log(4.0), np.log(side * 0.33))))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    angle = rng.uniform(0, 180)
    canvas = np.zeros((h, w), dtype=np.uint8)
    if shape == "ellipse":
        axes = (radius, radius * rng.uniform(0.35, 1.0))
        _ellipse(canvas, cx, cy, axes, angle, 1)
    elif shape == "rectangle":
        _rotated_rect(canvas, cx, cy, 2 * radius, 2 * radius * rng.uniform(0.3, 1.0), angle)
    elif shape == "polygon":
        _star_polygon(rng, canvas, cx, cy, radius)
    elif shape == "blob":
        return _blob(rng, h, w, cx, cy, max(radius, 6.0))
    elif shape == "ring":
        radius = max(radius, 8.0)
        axes = (radius, radius * rng.uniform(0.6, 1.0))
        _ellipse(canvas, cx, cy, axes, angle, 1)
        inner = rng.uniform(0.35, 0.7)
        _ellipse(canvas, cx, cy, (axes[0] * inner, axes[1] * inner), angle, 0)
    elif shape in ("bar", "l_shape", "cross"):
        _thin_shape(rng, canvas, shape, cx, cy, max(radius, 8.0), angle)
    else:
        raise ValueError(f"_shape_mask: unknown shape {shape!r}; expected one of {SHAPES}")
    return canvas.astype(bool)


def _ellipse(
    canvas: np.ndarray, cx: float, cy: float, axes: tuple[float, float], angle: float, value: int
) -> None:
    # cv2 draws with integer coordinates; 4 bits of sub-pixel shift keep small shapes round.
    s = 16
    cv2.ellipse(
        canvas,
        (round(cx * s), round(cy * s)),
        (max(1, round(axes[0] * s)), max(1, round(axes[1] * s))),
        angle,
        0,
        360,
        value,
        thickness=-1,
        lineType=cv2.LINE_8,
        shift=4,
    )


def _rotated_rect(
    canvas: np.ndarray, cx: float, cy: float, length: float, width: float, angle: float
) -> None:
    corners = cv2.boxPoints(((cx, cy), (length, width), angle))
    cv2.fillPoly(canvas, [np.round(corners).astype(np.int32)], 1)


def _star_polygon(
    rng: np.random.Generator, canvas: np.ndarray, cx: float, cy: float, radius: float
) -> None:
    k = int(rng.integers(3, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
    radii = radius * rng.uniform(0.4, 1.0, size=k)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)


def _blob(
    rng: np.random.Generator, h: int, w: int, cx: float, cy: float, radius: float
) -> np.ndarray:
    # A circle whose radius is modulated by smooth noise: irregular, one connected outline.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / np.float32(radius)
    wobble = _noise(rng, h, w) * np.float32(0.8) - np.float32(0.4)
    return dist < 1.0 + wobble


def _thin_shape(
    rng: np.random.Generator,
    canvas: np.ndarray,
    shape: str,
    cx: float,
    cy: float,
    radius: float,
    angle: float,
) -> None:
    thickness = float(rng.uniform(3, max(4.0, radius * 0.3)))
    length = 2 * radius
    if shape == "bar":
        _rotated_rect(canvas, cx, cy, length, thickness, angle)
        return
    if shape == "cross":
        _rotated_rect(canvas, cx, cy, length, thickness, angle)
        _rotated_rect(canvas, cx, cy, length * rng.uniform(0.5, 1.0), thickness, angle + 90)
        return
    # L-shape: two bars sharing one end, at a right angle.
    theta = np.deg2rad(angle)
    ux, uy = np.cos(theta), np.sin(theta)
    corner_x, corner_y = cx - ux * radius / 2, cy - uy * radius / 2
    _rotated_rect(
        canvas, corner_x + ux * length / 2, corner_y + uy * length / 2, length, thickness, angle
    )
    second = length * rng.uniform(0.4, 0.9)
    vx, vy = -uy, ux
    _rotated_rect(
        canvas, corner_x + vx * second / 2, corner_y + vy * second / 2, thickness, second, angle
    )
