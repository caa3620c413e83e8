"""An LRU cache of image embeddings keyed by ``(image_id, model_version)``.

Embeddings are what make a click fast: the encoder runs once per image and model version, every
later prompt only runs the decoder. The cache keeps the most recent ``max_items`` embeddings in
memory and, when given a store (``MaskStore``), reads and writes them there too so they survive
restarts and are shared between processes. Each entry is an embedding ``(C, h, w)`` float32 with
the image's ``original_size`` and resized ``input_size`` (both ``(H, W)`` pixels).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.predictor import SamPredictor
from storage.errors import ConfigError


class EmbeddingStore(Protocol):
    """What the cache needs from a store (``storage.MaskStore`` provides it)."""

    def save_embedding(
        self,
        image_id: str,
        model_version: str,
        embedding: np.ndarray,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
    ) -> None: ...

    def load_embedding(
        self, image_id: str, model_version: str
    ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]] | None: ...


@dataclass(frozen=True)
class CachedEmbedding:
    """One image's embedding ``(C, h, w)`` float32 and its sizes ``(H, W)`` in pixels."""

    embedding: np.ndarray
    original_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclass
class CacheStats:
    """Where ``get_or_compute`` found each embedding."""

    memory_hits: int = 0
    store_hits: int = 0
    computed: int = 0


class EmbeddingCache:
    """In-memory LRU of embeddings for one model version, optionally backed by a store."""

    def __init__(
        self, model_version: str, *, max_items: int = 32, store: EmbeddingStore | None = None
    ) -> None:
        """
        Args:
            model_version: the model version the embeddings belong to (part of every key).
            max_items: embeddings kept in memory (a 256x64x64 float32 one is 4 MiB).
            store: where embeddings persist (``save_embedding`` / ``load_embedding``), or None.
        """
        if not model_version:
            raise ConfigError("model_version must be a non-empty string")
        if max_items < 1:
            raise ConfigError(f"max_items must be >= 1, got {max_items}")
        self.model_version = model_version
        self.max_items = max_items
        self.store = store
        self.stats = CacheStats()
        self._items: OrderedDict[str, CachedEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._items

    def get(self, image_id: str) -> CachedEmbedding | None:
        """The embedding from memory, else from the store (then kept in memory), else None."""
        with self._lock:
            item = self._items.get(image_id)
            if item is not None:
                self._items.move_to_end(image_id)
                return item
        if self.store is None:
            return None
        loaded = self.store.load_embedding(image_id, self.model_version)
        if loaded is None:
            return None
        embedding, original_size, input_size = loaded
        item = CachedEmbedding(
            np.asarray(embedding, dtype=np.float32),
            (int(original_size[0]), int(original_size[1])),
            (int(input_size[0]), int(input_size[1])),
        )
        self._remember(image_id, item)
        return item

    def put(
        self,
        image_id: str,
        embedding: np.ndarray,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
    ) -> None:
        """Keep an embedding ``(C, h, w)`` in memory and write it to the store if there is one."""
        item = CachedEmbedding(
            np.ascontiguousarray(embedding, dtype=np.float32),
            (int(original_size[0]), int(original_size[1])),
            (int(input_size[0]), int(input_size[1])),
        )
        if self.store is not None:
            self.store.save_embedding(
                image_id, self.model_version, item.embedding, item.original_size, item.input_size
            )
        self._remember(image_id, item)

    def get_or_compute(
        self,
        image_id: str,
        image: np.ndarray | Callable[[], np.ndarray],
        predictor: SamPredictor,
    ) -> None:
        """Leave ``predictor`` set on the image: from a cached embedding when there is one that
        fits the predictor's model, else by running its encoder (then cache the result).

        ``image`` is the ``(H, W, 3)`` uint8 RGB array, or a callable returning it (so a cache
        hit never reads the image).
        """
        in_memory = image_id in self._items
        item = self.get(image_id)
        if item is not None and _fits(item, predictor):
            predictor.set_embedding(item.embedding, item.original_size)
            if in_memory:
                self.stats.memory_hits += 1
            else:
                self.stats.store_hits += 1
            return
        predictor.set_image(image() if callable(image) else image)
        assert predictor.original_size is not None and predictor.input_size is not None
        embedding = predictor.get_image_embedding()[0].detach().cpu().numpy()
        self.put(image_id, embedding, predictor.original_size, predictor.input_size)
        self.stats.computed += 1

    def clear(self) -> None:
        """Drop every in-memory entry (the store keeps its copies)."""
        with self._lock:
            self._items.clear()

    def _remember(self, image_id: str, item: CachedEmbedding) -> None:
        with self._lock:
            self._items[image_id] = item
            self._items.move_to_end(image_id)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)


def _fits(item: CachedEmbedding, predictor: SamPredictor) -> bool:
    """Whether an embedding was made by a model shaped like the predictor's (else recompute)."""
    shape = predictor.model.image_embedding_shape
    h, w = item.original_size
    expected_input = predictor.transform.get_preprocess_shape(h, w, predictor.model.img_size)
    return tuple(item.embedding.shape) == shape and tuple(item.input_size) == expected_input
