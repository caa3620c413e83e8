"""Which model the ML backend serves, loaded once and swapped when a new version is promoted.

A :class:`ModelSource` says which version should be served now and loads it; the
:class:`ModelHolder` asks it at most every ``check_interval_s`` seconds, so a version promoted in
the registry is picked up on a following request without a restart, and keeps, per loaded
version, the predictor and the embedding cache (per (image, model version), bounded in memory and
persisted in the store). Requests that arrive while a new version loads keep using the old one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from engine.zoom_in import ZoomIn
from storage.errors import NotFoundError

if TYPE_CHECKING:
    from engine.amg.generator import AutomaticMaskGenerator
    from engine.embeddings import EmbeddingCache, EmbeddingStore
    from engine.modeling.sam import Sam
    from engine.predictor import SamPredictor

__all__ = [
    "LoadedModel",
    "ModelHolder",
    "ModelSource",
    "NoModelError",
    "RegistryModelSource",
    "StaticModelSource",
]


class NoModelError(NotFoundError):
    """The source has no model to serve yet (nothing registered and promoted)."""


class ModelSource(Protocol):
    """Where the served model comes from."""

    def current_version(self) -> str | None:
        """The version to serve now (None: no model available yet). Called often: keep cheap."""
        ...

    def load(self, version: str) -> Sam:
        """The model of ``version`` in eval mode."""
        ...


@dataclass
class StaticModelSource:
    """One model that never changes (benchmarks, or a model built in-process)."""

    model: Sam
    version: str

    def current_version(self) -> str | None:
        return self.version

    def load(self, version: str) -> Sam:
        if version != self.version:
            raise NotFoundError(f"model version {version!r} is not served here ({self.version})")
        return self.model


@dataclass
class RegistryModelSource:
    """The store's model registry: a pinned version, or ``latest`` (newest promoted)."""

    store: Any
    version: str = "latest"

    def current_version(self) -> str | None:
        from engine.registry import ModelRegistry

        if self.version != "latest":
            return self.version
        card = ModelRegistry(self.store).latest()
        return card.version if card is not None else None

    def load(self, version: str) -> Sam:
        from engine.registry import ModelRegistry

        model: Sam = ModelRegistry(self.store).load(version)
        return model.eval()


@dataclass
class LoadedModel:
    """A loaded version: its predictor, embedding cache and (lazily) automatic generator.

    ``lock`` serialises use of the predictor, which holds one image at a time. ``zoom_in``
    (None: off) is the crop rule clicks are answered with; the pixels of the last image clicked
    are kept for it.
    """

    version: str
    predictor: SamPredictor
    cache: EmbeddingCache
    lock: threading.Lock = field(default_factory=threading.Lock)
    zoom_in: ZoomIn | None = None
    _generators: dict[tuple[Any, ...], AutomaticMaskGenerator] = field(default_factory=dict)
    _pixels: tuple[str, np.ndarray] | None = None

    def pixels(self, image_id: str, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The pixels of ``image_id`` (``load``-ed once while the annotator stays on it)."""
        if self._pixels is None or self._pixels[0] != image_id:
            self._pixels = (image_id, load())
        return self._pixels[1]

    def generator(self, **options: Any) -> AutomaticMaskGenerator:
        """An automatic mask generator on this model with ``options`` (kept for reuse)."""
        from engine.amg.generator import AutomaticMaskGenerator

        key = tuple(sorted(options.items()))
        if key not in self._generators:
            self._generators[key] = AutomaticMaskGenerator(self.predictor.model, **options)
        return self._generators[key]


class ModelHolder:
    """Holds the served :class:`LoadedModel` and swaps it when the source's version changes.

    Args:
        source: the model source.
        store: where embeddings persist (``MaskStore``), or None for memory only.
        cache_items: embeddings kept in memory per version.
        check_interval_s: seconds between asking ``source`` for its current version.
        clock: monotonic seconds (tests pass their own).
        zoom_in: the crop rule clicks are answered with (``engine.zoom_in``; None: off).
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        store: EmbeddingStore | None = None,
        cache_items: int = 64,
        check_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        zoom_in: ZoomIn | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.cache_items = cache_items
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._loaded: LoadedModel | None = None
        self._checked_at: float | None = None
        self._swap_lock = threading.Lock()
        self.swaps = 0
        self.zoom_in = zoom_in

    @property
    def version(self) -> str | None:
        """The loaded version, without checking the source (None before the first load)."""
        return self._loaded.version if self._loaded is not None else None

    def get(self) -> LoadedModel:
        """The model to use now; loads or swaps it if the source names another version.

        Raises :class:`NoModelError` when the source has no model yet.
        """
        loaded = self._loaded
        now = self._clock()
        due = self._checked_at is None or now - self._checked_at >= self.check_interval_s
        if loaded is not None and not due:
            return loaded
        with self._swap_lock:
            # Another request may have checked while this one waited for the lock.
            if (
                self._loaded is not None
                and self._checked_at is not None
                and self._clock() - self._checked_at < self.check_interval_s
            ):
                return self._loaded
            wanted = self.source.current_version()
            self._checked_at = self._clock()
            if wanted is None:
                if self._loaded is not None:
                    return self._loaded
                raise NoModelError("no model to serve yet: register and promote a model first")
            if self._loaded is None or self._loaded.version != wanted:
                self._loaded = self._load(wanted)
                self.swaps += 1
            return self._loaded

    def _load(self, version: str) -> LoadedModel:
        from engine.embeddings import EmbeddingCache
        from engine.predictor import SamPredictor

        model = self.source.load(version)
        return LoadedModel(
            version=version,
            predictor=SamPredictor(model),
            cache=EmbeddingCache(version, max_items=self.cache_items, store=self.store),
            zoom_in=self.zoom_in,
        )
