"""Training data: images with their masks, resized to the model's input and augmented.

Two sources share one interface (``sample(rng) -> TrainSample``):

- :class:`StoreTrainingData` reads a snapshot of the mask store (the masks of the ``pool`` split,
  any stages, rounds and sources asked for; never the holdout) and refuses to start when the
  pool shares an image with the holdout;
- :class:`SyntheticTrainingData` draws scenes from :mod:`engine.synthetic`, for training from
  scratch and for benchmarks.

:class:`ReplayTrainingData` mixes a second source into the first (rehearsal): a retrain on a
few new masks also keeps seeing what the model was trained on before, so masks skewed to one
kind of object (stage 1 collects the most prominent ones first) do not pull it off the rest.

Augmentation (:func:`augment`): the longest side is resized to ``img_size * s`` with ``s``
drawn from ``scale_range`` (SAM's large-scale jitter; a larger image is randomly cropped to the
input square, a smaller one padded by the model), then a random horizontal flip. Masks too small
to prompt (under ``min_mask_area`` pixels) or covering more than ``max_mask_fraction`` of the input
(SAM drops those) are dropped afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.nn import functional as F

from engine.synthetic import generate_scene
from storage.errors import TrainingError
from storage.rle import Rle

__all__ = [
    "ReplayTrainingData",
    "StoreTrainingData",
    "SyntheticTrainingData",
    "TrainSample",
    "TrainingData",
    "augment",
]

# Draws before a source gives up finding an image with a usable mask.
_MAX_DRAWS = 100


@dataclass(frozen=True)
class TrainSample:
    """One augmented image in the model's input frame.

    Attributes:
        image: ``(3, h, w)`` float32 RGB in 0..255, ``h, w <= img_size`` (not padded: the model's
            ``preprocess`` pads, so padding looks the same as at inference).
        masks: ``(N, img_size, img_size)`` bool, N >= 1, zero in the padding.
    """

    image: torch.Tensor
    masks: torch.Tensor


class TrainingData(Protocol):
    """A source of training samples."""

    def sample(self, rng: np.random.Generator) -> TrainSample:
        """Draw one augmented image with at least one usable mask."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the data is (for the model card's trained-on snapshot)."""
        ...


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings.

    Attributes:
        scale_range: the longest side becomes ``img_size * s``, ``s`` uniform in this range.
        flip: random horizontal flips.
        min_mask_area: masks with fewer pixels after augmentation are dropped.
        max_mask_fraction: masks covering more of the input square are dropped.
    """

    scale_range: tuple[float, float] = (0.5, 1.5)
    flip: bool = True
    min_mask_area: int = 12
    max_mask_fraction: float = 0.9


def augment(
    image: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    img_size: int,
    config: AugmentConfig,
) -> TrainSample | None:
    """Resize, crop and flip an image ``(H, W, 3)`` uint8 with masks ``(N, H, W)`` bool.

    Returns None when no mask survives the filters.
    """
    h, w = image.shape[:2]
    lo, hi = config.scale_range
    s = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    scale = img_size * s / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    # INTER_AREA when shrinking avoids aliasing on textures; linear when growing.
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else image
    mask_t = torch.from_numpy(np.ascontiguousarray(masks)).view(torch.uint8)
    if (nh, nw) != (h, w):
        mask_t = F.interpolate(mask_t[None], size=(nh, nw), mode="nearest-exact")[0]
    y0 = int(rng.integers(0, nh - img_size + 1)) if nh > img_size else 0
    x0 = int(rng.integers(0, nw - img_size + 1)) if nw > img_size else 0
    resized = resized[y0 : y0 + img_size, x0 : x0 + img_size]
    mask_t = mask_t[:, y0 : y0 + img_size, x0 : x0 + img_size]
    if config.flip and rng.random() < 0.5:
        resized = resized[:, ::-1]
        mask_t = mask_t.flip(2)
    areas = mask_t.flatten(1).sum(1, dtype=torch.int64)
    keep = (areas >= config.min_mask_area) & (areas <= config.max_mask_fraction * img_size**2)
    if not bool(keep.any()):
        return None
    mask_t = mask_t[keep].bool()
    ch, cw = mask_t.shape[1:]
    padded = torch.zeros((mask_t.shape[0], img_size, img_size), dtype=torch.bool)
    padded[:, :ch, :cw] = mask_t
    # np.array(..., float32) copies: the input may be a read-only store image.
    pixels = torch.from_numpy(np.array(resized, dtype=np.float32)).permute(2, 0, 1)
    return TrainSample(image=pixels, masks=padded)


@dataclass
class SyntheticTrainingData:
    """Fresh synthetic scenes (:func:`engine.synthetic.generate_scene`) at the input size.

    Every sample is a new scene drawn from the ``rng`` passed to :meth:`sample`, so the stream
    never repeats; keep holdout scenes on a different seed. ``scene_size`` ``(height, width)``
    is the size scenes are drawn at (default: the input square); they are then resized to the
    input like any image.
    """

    img_size: int
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(scale_range=(1.0, 1.0)))
    scene_kwargs: dict[str, Any] = field(default_factory=dict)
    scene_size: tuple[int, int] | None = None

    def sample(self, rng: np.random.Generator) -> TrainSample:
        size = self.scene_size or (self.img_size, self.img_size)
        for _ in range(_MAX_DRAWS):
            scene = generate_scene(rng, size, **self.scene_kwargs)
            sample = augment(scene.image, scene.masks, rng, self.img_size, self.augment)
            if sample is not None:
                return sample
        raise TrainingError(f"no synthetic scene with a usable mask in {_MAX_DRAWS} draws")

    def describe(self) -> dict[str, Any]:
        size = list(self.scene_size or (self.img_size, self.img_size))
        return {"source": "synthetic", "scene_size": size, **self.scene_kwargs}


class StoreTrainingData:
    """The pool masks of one mask-store snapshot, grouped by image.

    Args:
        store: a ``storage.mask_store.MaskStore``.
        img_size: the model's input side, pixels.
        stages, rounds, sources: keep only masks of these (None: all).
        as_of: the commit sequence to read (None: the head at construction time).
        augment: augmentation settings.

    Raises:
        TrainingError: no pool masks match, or a pool image is also in the holdout (same id or
            same file content).
    """

    def __init__(
        self,
        store: Any,
        img_size: int,
        *,
        stages: Sequence[int] | None = None,
        rounds: Sequence[int] | None = None,
        sources: Sequence[str] | None = None,
        as_of: int | None = None,
        augment: AugmentConfig | None = None,
    ) -> None:
        self.store = store
        self.img_size = img_size
        self.augment = augment or AugmentConfig()
        commits = store.commits()
        self.sequence = as_of if as_of is not None else (commits[-1].sequence if commits else 0)
        table = store.masks(split="pool", as_of=self.sequence)
        table = _filter(table, "stage", stages)
        table = _filter(table, "round", rounds)
        table = _filter(table, "source", sources)
        if table.num_rows == 0:
            raise TrainingError(
                f"no pool masks to train on in {store} at commit {self.sequence} "
                f"(stages={_fmt(stages)}, rounds={_fmt(rounds)}, sources={_fmt(sources)}); "
                "annotate some images first"
            )
        self._check_holdout(set(pc.unique(table["image_id"]).to_pylist()))
        self.stages, self.rounds, self.sources = stages, rounds, sources
        self._columns = {
            name: table[name].to_pylist()
            for name in ("image_id", "counts", "height", "width", "stage", "round", "source")
        }
        self._rows: dict[str, list[int]] = {}
        for i, image_id in enumerate(self._columns["image_id"]):
            self._rows.setdefault(image_id, []).append(i)
        self.image_ids = sorted(self._rows)

    def sample(self, rng: np.random.Generator) -> TrainSample:
        from storage.rle import decode

        for _ in range(_MAX_DRAWS):
            image_id = self.image_ids[int(rng.integers(len(self.image_ids)))]
            rows = self._rows[image_id]
            cols = self._columns
            rles: list[Rle] = [
                {"size": [cols["height"][i], cols["width"][i]], "counts": cols["counts"][i]}
                for i in rows
            ]
            image = self.store.load_image(image_id)
            masks = decode(rles)
            if masks.shape[1:] != image.shape[:2]:
                raise TrainingError(
                    f"image {image_id!r} is {image.shape[1]}x{image.shape[0]} px but its masks "
                    f"are {masks.shape[2]}x{masks.shape[1]}; expected the same size"
                )
            sample = augment(image, masks, rng, self.img_size, self.augment)
            if sample is not None:
                return sample
        raise TrainingError(
            f"no usable mask (area >= {self.augment.min_mask_area} px after resizing, at most "
            f"{self.augment.max_mask_fraction:.0%} of the image) in {_MAX_DRAWS} draws from "
            f"{self.store}"
        )

    def describe(self) -> dict[str, Any]:
        """The trained-on snapshot: commit sequence, filters, mask counts per stage/round/source."""
        counts: dict[str, int] = {}
        for key in ("stage", "round", "source"):
            for value in self._columns[key]:
                name = f"{key}={value}"
                counts[name] = counts.get(name, 0) + 1
        return {
            "source": "mask_store",
            "root": str(getattr(self.store.location, "root", self.store)),
            "commit_sequence": self.sequence,
            "stages": sorted(set(self._columns["stage"])),
            "rounds": sorted(set(self._columns["round"])),
            "sources": sorted(set(self._columns["source"])),
            "filters": {
                "stages": _fmt(self.stages),
                "rounds": _fmt(self.rounds),
                "sources": _fmt(self.sources),
            },
            "images": len(self.image_ids),
            "masks": len(self._columns["image_id"]),
            "mask_counts": counts,
        }

    def _check_holdout(self, pool_ids: set[str]) -> None:
        holdout = self.store.images(split="holdout")
        by_id = pool_ids & {r.image_id for r in holdout}
        holdout_sha = {r.sha256: r.image_id for r in holdout}
        by_content = sorted(
            f"{r.image_id} = holdout {holdout_sha[r.sha256]}"
            for r in self.store.images(split="pool")
            if r.image_id in pool_ids and r.sha256 in holdout_sha
        )
        if by_id or by_content:
            leaks = sorted(by_id) + by_content
            raise TrainingError(
                f"the holdout overlaps the training images in {self.store}: {leaks[:5]}"
                f"{' ...' if len(leaks) > 5 else ''}; evaluating on them would overstate the model"
            )


@dataclass
class ReplayTrainingData:
    """Each sample from ``replay`` with probability ``fraction``, else from ``data``.

    Args:
        data: the new data (e.g. the engine's masks, :class:`StoreTrainingData`).
        replay: what the model was trained on before (e.g. :class:`SyntheticTrainingData`).
        fraction: share of samples drawn from ``replay``, in [0, 1).
    """

    data: TrainingData
    replay: TrainingData
    fraction: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise TrainingError(f"replay fraction {self.fraction}; expected a value in [0, 1)")

    def sample(self, rng: np.random.Generator) -> TrainSample:
        source = self.replay if rng.random() < self.fraction else self.data
        return source.sample(rng)

    def describe(self) -> dict[str, Any]:
        """The new data's snapshot, with the replayed source and its share under ``replay``."""
        return {
            **self.data.describe(),
            "replay": {"fraction": self.fraction, **self.replay.describe()},
        }


def _filter(table: pa.Table, column: str, values: Sequence[Any] | None) -> pa.Table:
    if values is None:
        return table
    return table.filter(
        pc.is_in(table[column], value_set=pa.array(list(values), type=table[column].type))
    )


def _fmt(values: Sequence[Any] | None) -> list[Any] | str:
    return "all" if values is None else list(values)
