"""`MaskStore`: the one writer of the mask dataset, and its readers.

Layout under the root (a local folder or ``s3://bucket/prefix``)::

    images/part-<utc time>-<uuid>.parquet      images table (IMAGES_SCHEMA); every file counts
    masks/stage=<N>/part-r<round>-<utc time>-<uuid>.parquet
                                               masks (MASKS_FILE_SCHEMA), hive-partitioned
    _commits/<sequence, 10 digits>.json        commit log: which mask files are visible
    embeddings/<model_version>/<image_id>.npz  cached image embeddings
    models/..., anything else                  other subsystems' objects (put_object)

How a write stays atomic and idempotent:

1. ``write_masks`` validates every record (RLE, sizes, ids, registered image) before any I/O.
2. It reads the commit log, drops mask ids that are already committed, and writes the remaining
   rows as **one** Parquet file (a single atomic put). Nothing reads that file yet.
3. It creates ``_commits/<head + 1>.json`` *exclusively* (create-if-absent). That one put is the
   moment the masks become visible. If another writer took the number first, the file is
   deleted and steps 2-3 run again on top of the new head, so two writers never commit the
   same mask id twice.

Readers list ``_commits/`` and read only the files commits name, so a writer killed between its
data file and its commit leaves an orphan that nobody sees (and :meth:`MaskStore.gc` deletes);
rerunning the same batch writes it again and commits it once. A snapshot ``as_of=s`` reads the
commits with sequence <= s. A commit's ``replaces`` hides earlier masks (edited annotations)
from that sequence on; the files themselves are never rewritten.

Direct readers of ``masks/`` (DuckDB, Polars, ``pyarrow.dataset``) see every file, including
orphans before ``gc`` and replaced masks; the commit log is the source of truth.

Images are not versioned: each ``add_images`` call writes one file and every file under
``images/`` counts (duplicate ids are resolved to the first one written).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage import rle as rle_codec
from storage.errors import (
    CommitConflictError,
    InvalidInputError,
    NotFoundError,
    RleError,
    StorageError,
    UnsafeKeyError,
)
from storage.images import decode_image, sha256_hex
from storage.location import StorageLocation, read_uri
from storage.rle import Rle
from storage.schema import (
    IMAGES_SCHEMA,
    MASKS_FILE_SCHEMA,
    MASKS_SCHEMA,
    SCHEMA_VERSION,
    SOURCES,
    SPLITS,
    STAGES,
    stored_float,
)

__all__ = ["CommitInfo", "ImageRecord", "MaskRecord", "MaskStore", "make_mask_id"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+\-]{0,199}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMITS = "_commits"
_RESERVED_PREFIXES = ("images", "masks", _COMMITS, "embeddings")
_TEMP_MARK = ".tmp-"
# Enough for a handful of concurrent writers; each retry re-reads the log first.
_MAX_COMMIT_ATTEMPTS = 20


def make_mask_id(*parts: str) -> str:
    """Deterministic mask id: first 32 hex digits (128 bits) of SHA-256 over the parts.

    :meth:`MaskStore.write_masks` uses ``(image_id, stage, round, run_id, source, counts)``,
    so a retried write of the same mask gives the same id.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8"))
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class ImageRecord:
    """One registered image. ``width`` and ``height`` in pixels; ``sha256`` of the file bytes."""

    image_id: str
    uri: str
    width: int
    height: int
    sha256: str
    split: str = "pool"
    added_at: datetime | None = None


@dataclass
class MaskRecord:
    """One mask with its provenance. Coordinates are pixels; boxes are XYWH.

    ``area``, ``bbox``, ``height`` and ``width`` derive from ``segmentation``; ``mask_id``, if
    None, is derived at write time with :func:`make_mask_id`.
    """

    image_id: str
    segmentation: Rle
    stage: int
    round: int
    source: str
    run_id: str
    predicted_iou: float | None = None
    stability_score: float | None = None
    point_coords: list[list[float]] | None = None
    crop_box: list[float] | None = None
    model_version: str | None = None
    annotator: str | None = None
    lead_time_s: float | None = None
    clicks: int | None = None
    mask_id: str | None = None
    created_at: datetime | None = None

    @property
    def height(self) -> int:
        """Mask height in pixels."""
        return int(self.segmentation["size"][0])

    @property
    def width(self) -> int:
        """Mask width in pixels."""
        return int(self.segmentation["size"][1])

    @property
    def area(self) -> int:
        """Foreground pixel count."""
        return int(rle_codec.area([self.segmentation])[0])

    @property
    def bbox(self) -> list[float]:
        """Tight box XYWH in pixels."""
        return [float(v) for v in rle_codec.to_bbox([self.segmentation])[0]]


@dataclass(frozen=True)
class CommitInfo:
    """One entry of the commit log.

    ``counts`` has ``masks`` (rows written), ``skipped`` (already committed or repeated in the
    batch) and ``replaced`` (earlier masks this commit hides). A write that found nothing new
    returns ``files == ()``, writes no commit, and gives the current head as ``sequence``.
    """

    sequence: int
    stage: int
    round: int
    run_id: str
    files: tuple[str, ...]
    counts: dict[str, int]
    created_at: datetime
    replaces: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The commit file's content."""
        return {
            "schema_version": SCHEMA_VERSION,
            "sequence": self.sequence,
            "stage": self.stage,
            "round": self.round,
            "run_id": self.run_id,
            "files": list(self.files),
            "counts": dict(self.counts),
            "replaces": list(self.replaces),
            "created_at": self.created_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, name: str) -> CommitInfo:
        """Parse a commit file; raises :class:`StorageError` if it is malformed or too new."""
        try:
            version = int(data["schema_version"])
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{name} has schema_version {version}; this code reads <= {SCHEMA_VERSION}"
                )
            return cls(
                sequence=int(data["sequence"]),
                stage=int(data["stage"]),
                round=int(data["round"]),
                run_id=str(data["run_id"]),
                files=tuple(str(f) for f in data["files"]),
                counts={str(k): int(v) for k, v in data["counts"].items()},
                created_at=datetime.fromisoformat(data["created_at"]),
                replaces=tuple(str(r) for r in data.get("replaces", ())),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise StorageError(f"{name} is not a valid commit record: {err!r}") from None


class MaskStore:
    """The mask dataset at ``root`` (local folder or ``s3://bucket/prefix``).

    Args:
        root: where the dataset lives.
        filesystem: a pyarrow filesystem to use instead of the one chosen from ``root``.
        endpoint_url: S3-compatible endpoint (MinIO, moto); also used to read s3:// images.
        region: S3 region; default from the standard AWS settings.

    Reads cache immutable files (commits, mask files, image files) in memory for the life of
    the object; new commits by other processes are seen on the next call.
    """

    def __init__(
        self,
        root: str,
        *,
        filesystem: pafs.FileSystem | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        self.location = StorageLocation(
            root, filesystem=filesystem, endpoint_url=endpoint_url, region=region
        )
        self._commit_cache: dict[int, CommitInfo] = {}
        self._mask_files: dict[str, pa.Table] = {}
        # Tables this object wrote, without the stage column (added when first read).
        self._written_files: dict[str, tuple[pa.Table, int]] = {}
        self._image_files: dict[str, pa.Table] = {}  # written here, not yet indexed
        self._images_by_id: dict[str, ImageRecord] = {}
        self._indexed_image_files: list[str] = []
        # Mask ids of every committed file seen so far, grown one file at a time.
        self._known_ids: set[str] = set()
        self._known_id_files: set[str] = set()

    def __repr__(self) -> str:
        return f"MaskStore({self.location.root!r})"

    # ----------------------------------------------------------------------------------- images

    def add_images(self, records: Iterable[ImageRecord]) -> int:
        """Register images; idempotent by ``image_id``. Returns how many were new.

        Raises :class:`InvalidInputError` (before writing) for a bad field or for an image
        already registered in another split (moving images into or out of the holdout would
        leak it).
        """
        records = list(records)
        for i, rec in enumerate(records):
            _check_image_record(rec, f"records[{i}]")
        known = self._image_index()
        new: dict[str, ImageRecord] = {}
        for i, rec in enumerate(records):
            earlier = known.get(rec.image_id) or new.get(rec.image_id)
            if earlier is not None:
                if earlier.split != rec.split:
                    raise InvalidInputError(
                        f"records[{i}]: image {rec.image_id!r} is already in split "
                        f"{earlier.split!r}; cannot register it again as {rec.split!r}"
                    )
                continue
            new[rec.image_id] = rec
        if not new:
            return 0
        now = datetime.now(UTC)
        table = pa.Table.from_pydict(
            {
                "image_id": [r.image_id for r in new.values()],
                "uri": [r.uri for r in new.values()],
                "width": [int(r.width) for r in new.values()],
                "height": [int(r.height) for r in new.values()],
                "sha256": [r.sha256 for r in new.values()],
                "split": [r.split for r in new.values()],
                "added_at": [_utc(r.added_at) or now for r in new.values()],
            },
            schema=IMAGES_SCHEMA,
        )
        key = f"images/part-{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:12]}.parquet"
        self.location.put_bytes(key, _parquet_bytes(table))
        self._image_files[key] = table
        return len(new)

    def images(self, split: str | None = None) -> list[ImageRecord]:
        """Registered images in the order they were added, optionally of one split."""
        if split is not None:
            _check_split(split, "split")
        return [r for r in self._image_index().values() if split is None or r.split == split]

    def get_image(self, image_id: str) -> ImageRecord:
        """One image's record; raises :class:`NotFoundError` if it is not registered."""
        try:
            return self._image_index()[image_id]
        except KeyError:
            raise NotFoundError(f"image {image_id!r} is not registered in {self}") from None

    def load_image(self, image_id: str) -> np.ndarray:
        """The image's pixels, RGB ``uint8`` ``(H, W, 3)``, read from its uri (local or s3).

        Raises :class:`StorageError` if the file changed since it was registered (its masks
        would no longer fit it).
        """
        record = self.get_image(image_id)
        data = read_uri(record.uri, endpoint_url=self.location.endpoint_url)
        if sha256_hex(data) != record.sha256:
            raise StorageError(
                f"image {image_id!r} at {record.uri} changed since it was registered "
                "(sha256 differs); register the new file as a new image"
            )
        return decode_image(data, name=record.uri)

    # ------------------------------------------------------------------------------------ masks

    def write_masks(
        self,
        records: Iterable[MaskRecord],
        *,
        stage: int,
        round: int,
        run_id: str,
        replaces: Sequence[str] = (),
    ) -> CommitInfo:
        """Commit a batch of masks of one (stage, round, run) atomically.

        Every record must carry the same ``stage``, ``round`` and ``run_id`` as the call, name a
        registered image and have an RLE of that image's size. Mask ids already committed are
        skipped (a retried batch leaves one copy); ``replaces`` lists committed mask ids that
        this commit hides from now on (edited annotations). Raises an
        :class:`InvalidInputError` subclass before writing anything if any input is bad.
        """
        _check_commit_args(stage, round, run_id)
        records = list(records)
        batch = _Batch.build(records, stage, round, run_id, self._image_index())
        if isinstance(replaces, str):
            raise InvalidInputError("replaces is a str; expected a sequence of mask ids")
        replaces = tuple(dict.fromkeys(replaces))
        for i, mask_id in enumerate(replaces):
            if not isinstance(mask_id, str) or not mask_id:
                raise InvalidInputError(f"replaces[{i}] is {mask_id!r}; expected a mask id")
            if mask_id in batch.index:
                raise InvalidInputError(
                    f"replaces[{i}] {mask_id!r} is also in the batch; a mask cannot replace itself"
                )
        for _attempt in range(_MAX_COMMIT_ATTEMPTS):
            head = self._read_commits()
            committed = self._committed_mask_ids(head)
            missing = [m for m in replaces if m not in committed]
            if missing:
                raise InvalidInputError(
                    f"replaces names mask ids that were never committed: {missing[:5]}"
                )
            hidden = {m for c in head for m in c.replaces}
            keep = [i for i, m in enumerate(batch.mask_ids) if m not in committed]
            new_replaces = tuple(m for m in replaces if m not in hidden)
            head_seq = head[-1].sequence if head else 0
            counts = {
                "masks": len(keep),
                "skipped": len(records) - len(keep),
                "replaced": len(new_replaces),
            }
            now = datetime.now(UTC)
            if not keep and not new_replaces:
                return CommitInfo(head_seq, stage, round, run_id, (), counts, now, ())
            files: tuple[str, ...] = ()
            table = None
            if keep:
                table = batch.table(keep, now)
                key = (
                    f"masks/stage={stage}/part-r{round:04d}-{now:%Y%m%dT%H%M%S%f}-"
                    f"{uuid.uuid4().hex[:12]}.parquet"
                )
                self.location.put_bytes(key, _parquet_bytes(table))
                files = (key,)
            info = CommitInfo(head_seq + 1, stage, round, run_id, files, counts, now, new_replaces)
            try:
                self.location.put_bytes(
                    _commit_key(info.sequence),
                    json.dumps(info.to_json(), indent=1).encode("utf-8"),
                    exclusive=True,
                )
            except CommitConflictError:
                # Another writer took this sequence number: drop our file, retry on top of it.
                for key in files:
                    self.location.delete(key)
                continue
            self._commit_cache[info.sequence] = info
            if table is not None:
                self._written_files[files[0]] = (table, stage)
            return info
        raise CommitConflictError(
            f"gave up committing run {run_id!r} after {_MAX_COMMIT_ATTEMPTS} conflicts"
        )

    def masks(
        self,
        *,
        stage: int | None = None,
        round: int | None = None,
        image_id: str | Sequence[str] | None = None,
        source: str | None = None,
        split: str | None = None,
        as_of: int | None = None,
    ) -> pa.Table:
        """Committed masks as an Arrow table (MASKS_SCHEMA), filtered.

        ``image_id`` may be one id or several; ``split`` keeps masks of images in that split;
        ``as_of`` reads the snapshot at that commit sequence (0 = before the first commit).
        Raises :class:`NotFoundError` for a sequence that does not exist.
        """
        commits = self._commits_as_of(as_of)
        hidden = {m for c in commits for m in c.replaces}
        tables = [
            self._read_mask_file(key, c.stage)
            for c in commits
            if (stage is None or c.stage == stage) and (round is None or c.round == round)
            for key in c.files
        ]
        if not tables:
            return MASKS_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        hidden_ids = pa.array(sorted(hidden), pa.string())
        keep = pc.invert(pc.is_in(table["mask_id"], value_set=hidden_ids))
        if image_id is not None:
            ids = [image_id] if isinstance(image_id, str) else list(image_id)
            keep = pc.and_(keep, pc.is_in(table["image_id"], value_set=pa.array(ids, pa.string())))
        if source is not None:
            keep = pc.and_(keep, pc.equal(table["source"], source))
        if split is not None:
            ids = [r.image_id for r in self.images(split)]
            keep = pc.and_(keep, pc.is_in(table["image_id"], value_set=pa.array(ids, pa.string())))
        return table.filter(keep)

    def mask_records(self, **filters: Any) -> list[MaskRecord]:
        """Like :meth:`masks` (same keyword filters), as :class:`MaskRecord` objects."""
        return [_row_to_record(row) for row in self.masks(**filters).to_pylist()]

    def count_masks(self, **filters: Any) -> int:
        """Number of committed masks matching the :meth:`masks` filters."""
        return self.masks(**filters).num_rows

    def iter_image_masks(self, **filters: Any) -> Iterator[tuple[str, list[str], np.ndarray]]:
        """Yield ``(image_id, mask_ids, masks)`` per image, masks decoded to bool ``(N, H, W)``.

        Takes the :meth:`masks` filters; images come in image_id order.
        """
        table = self.masks(**filters)
        if table.num_rows == 0:
            return
        order = pc.sort_indices(table, sort_keys=[("image_id", "ascending")])
        table = table.take(order)
        image_ids = table["image_id"].to_pylist()
        mask_ids = table["mask_id"].to_pylist()
        counts = table["counts"].to_pylist()
        heights = table["height"].to_pylist()
        widths = table["width"].to_pylist()
        start = 0
        for end in range(1, len(image_ids) + 1):
            if end < len(image_ids) and image_ids[end] == image_ids[start]:
                continue
            rles: list[Rle] = [
                {"size": [heights[i], widths[i]], "counts": counts[i]} for i in range(start, end)
            ]
            yield image_ids[start], mask_ids[start:end], rle_codec.decode(rles)
            start = end

    def commits(self) -> list[CommitInfo]:
        """The commit log, oldest first."""
        return list(self._read_commits())

    def gc(self, *, older_than_s: float = 0.0) -> list[str]:
        """Delete mask files no commit references and stale temporary files; return their keys.

        Only files last modified more than ``older_than_s`` seconds ago are touched: with
        other writers running, pass a grace period longer than a write takes, or gc could
        delete a data file whose commit is about to be written.
        """
        referenced = {key for c in self._read_commits() for key in c.files}
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        deleted = []
        for info in self.location.list_info("", include_hidden=True):
            name = info.key.rsplit("/", 1)[-1]
            orphan = info.key.startswith("masks/") and not name.startswith(".")
            orphan = orphan and info.key not in referenced
            temp = name.startswith(".") and _TEMP_MARK in name
            if not (orphan or temp):
                continue
            if info.mtime is not None and info.mtime > cutoff:
                continue
            self.location.delete(info.key)
            deleted.append(info.key)
        return deleted

    # ------------------------------------------------------------------------------- embeddings

    def save_embedding(
        self,
        image_id: str,
        model_version: str,
        embedding: np.ndarray,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
    ) -> None:
        """Cache an image embedding ``(C, h, w)`` float for a model version.

        ``original_size`` is the image's (height, width) and ``input_size`` the resized
        (height, width) before padding, both in pixels, as SamPredictor needs them.
        """
        _check_id(image_id, "image_id")
        _check_id(model_version, "model_version")
        if not isinstance(embedding, np.ndarray) or embedding.ndim != 3:
            raise InvalidInputError(
                f"embedding for {image_id!r} has shape {getattr(embedding, 'shape', None)}; "
                "expected a numpy array (C, h, w)"
            )
        if embedding.dtype.kind != "f":
            raise InvalidInputError(
                f"embedding for {image_id!r} has dtype {embedding.dtype}; expected float"
            )
        original = _size_pair(original_size, "original_size")
        resized = _size_pair(input_size, "input_size")
        buffer = io.BytesIO()
        np.savez(buffer, embedding=embedding, original_size=original, input_size=resized)
        self.location.put_bytes(_embedding_key(image_id, model_version), buffer.getvalue())

    def load_embedding(
        self, image_id: str, model_version: str
    ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]] | None:
        """``(embedding, original_size, input_size)`` saved for this image and model, or None."""
        _check_id(image_id, "image_id")
        _check_id(model_version, "model_version")
        key = _embedding_key(image_id, model_version)
        try:
            data = self.location.get_bytes(key)
        except NotFoundError:
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                embedding = npz["embedding"]
                original = npz["original_size"]
                resized = npz["input_size"]
        except (OSError, ValueError, KeyError) as err:
            raise StorageError(f"embedding {self.location.uri(key)} is corrupt: {err}") from None
        return (
            embedding,
            (int(original[0]), int(original[1])),
            (int(resized[0]), int(resized[1])),
        )

    # ---------------------------------------------------------------------------- other objects

    def put_object(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write another subsystem's object (e.g. ``models/<version>/model.pt``) atomically.

        With ``exclusive`` the object is created only if absent; otherwise
        :class:`CommitConflictError` is raised and nothing changes.
        """
        self.location.put_bytes(self._object_key(key), data, exclusive=exclusive)

    def get_object(self, key: str) -> bytes:
        """Read an object written with :meth:`put_object`; :class:`NotFoundError` if absent."""
        return self.location.get_bytes(self._object_key(key))

    def list_objects(self, prefix: str) -> list[str]:
        """Keys of the objects under the folder ``prefix``, sorted."""
        return self.location.list(self._object_key(prefix))

    # ---------------------------------------------------------------------------------- private

    def _object_key(self, key: str) -> str:
        key = self.location.key(key)
        if key.split("/", 1)[0] in _RESERVED_PREFIXES:
            raise UnsafeKeyError(
                f"key {key!r} is inside a folder the mask store owns "
                f"({', '.join(_RESERVED_PREFIXES)}); use the store's own methods"
            )
        return key

    def _image_index(self) -> dict[str, ImageRecord]:
        """Registered images by id, first registration wins; one LIST, new files only."""
        keys = [k for k in self.location.list("images") if k.endswith(".parquet")]
        done = self._indexed_image_files
        if keys[: len(done)] != done:  # a file sorted in among older ones: rebuild
            self._images_by_id, done = {}, []
        for key in keys[len(done) :]:
            table = self._image_files.get(key)
            if table is None:
                table = _read_parquet(self.location.get_bytes(key), key, IMAGES_SCHEMA)
            for row in table.to_pylist():
                self._images_by_id.setdefault(row["image_id"], ImageRecord(**row))
            done.append(key)
        self._indexed_image_files = done
        self._image_files.clear()
        return self._images_by_id

    def _read_commits(self) -> list[CommitInfo]:
        for key in self.location.list(_COMMITS):
            name = key.rsplit("/", 1)[-1]
            if not (name.endswith(".json") and name[:-5].isdigit()):
                continue
            sequence = int(name[:-5])
            if sequence in self._commit_cache:
                continue
            try:
                data = json.loads(self.location.get_bytes(key))
            except json.JSONDecodeError as err:
                raise StorageError(f"{self.location.uri(key)} is not valid JSON: {err}") from None
            info = CommitInfo.from_json(data, name=self.location.uri(key))
            if info.sequence != sequence:
                raise StorageError(
                    f"{self.location.uri(key)} says sequence {info.sequence}; expected {sequence}"
                )
            self._commit_cache[sequence] = info
        return [self._commit_cache[s] for s in sorted(self._commit_cache)]

    def _commits_as_of(self, as_of: int | None) -> list[CommitInfo]:
        commits = self._read_commits()
        if as_of is None:
            return commits
        head = commits[-1].sequence if commits else 0
        if isinstance(as_of, bool) or not isinstance(as_of, int) or not 0 <= as_of <= head:
            raise NotFoundError(f"snapshot as_of={as_of!r} does not exist; commits are 0..{head}")
        return [c for c in commits if c.sequence <= as_of]

    def _committed_mask_ids(self, commits: Sequence[CommitInfo]) -> set[str]:
        """Ids of every mask in ``commits`` (the whole log: callers pass the head)."""
        for c in commits:
            for key in c.files:
                if key not in self._known_id_files:
                    written = self._written_files.get(key)
                    table = written[0] if written else self._read_mask_file(key, c.stage)
                    self._known_ids.update(table["mask_id"].to_pylist())
                    self._known_id_files.add(key)
        return self._known_ids

    def _read_mask_file(self, key: str, stage: int) -> pa.Table:
        table = self._mask_files.get(key)
        if table is None:
            written = self._written_files.pop(key, None)
            if written is not None:
                raw = written[0]
            else:
                raw = _read_parquet(self.location.get_bytes(key), key, MASKS_FILE_SCHEMA)
            table = _with_stage(raw, stage)
            self._mask_files[key] = table
        return table


class _Batch:
    """A validated batch of mask records, as columns ready for one Parquet file."""

    def __init__(self, columns: dict[str, list[Any]], bbox: np.ndarray) -> None:
        self.columns = columns
        self.bbox = bbox
        self.mask_ids: list[str] = columns["mask_id"]
        self.index = {m: i for i, m in enumerate(self.mask_ids)}

    @classmethod
    def build(
        cls,
        records: list[MaskRecord],
        stage: int,
        round: int,
        run_id: str,
        images: dict[str, ImageRecord],
    ) -> _Batch:
        for i, rec in enumerate(records):
            name = f"records[{i}]"
            if not isinstance(rec, MaskRecord):
                raise InvalidInputError(f"{name} is {type(rec).__name__}; expected a MaskRecord")
            for attr, expected in (("stage", stage), ("round", round), ("run_id", run_id)):
                if getattr(rec, attr) != expected:
                    raise InvalidInputError(
                        f"{name}.{attr} is {getattr(rec, attr)!r} but the write is for "
                        f"{attr}={expected!r}"
                    )
            if rec.source not in SOURCES:
                raise InvalidInputError(f"{name}.source is {rec.source!r}; expected {SOURCES}")
            image = images.get(rec.image_id) if isinstance(rec.image_id, str) else None
            if image is None:
                raise InvalidInputError(
                    f"{name}.image_id {rec.image_id!r} is not a registered image; add_images first"
                )
        # One vectorised pass over every RLE of the batch.
        checked = rle_codec.validate_many(
            [rec.segmentation for rec in records], name="records", suffix=".segmentation"
        )
        columns: dict[str, list[Any]] = {name: [] for name in MASKS_FILE_SCHEMA.names}
        segmentations: list[Rle] = []
        seen: dict[str, str] = {}
        for i, (rec, seg) in enumerate(zip(records, checked, strict=True)):
            name = f"records[{i}]"
            image = images[rec.image_id]
            if seg["size"] != [image.height, image.width]:
                raise RleError(
                    f"{name}.segmentation has size {seg['size']}; image {rec.image_id!r} is "
                    f"[{image.height}, {image.width}] (height, width)"
                )
            mask_id = rec.mask_id
            if mask_id is None:
                mask_id = make_mask_id(
                    rec.image_id, str(stage), str(round), run_id, rec.source, seg["counts"]
                )
            elif not isinstance(mask_id, str) or not _ID.match(mask_id):
                raise InvalidInputError(
                    f"{name}.mask_id {mask_id!r}; expected 1-200 letters, digits, '._=+-'"
                )
            # Every field is checked, also of a record dropped below as a repeat: bad input is
            # refused wherever it is in the batch.
            optional = {
                "predicted_iou": _opt_float(rec.predicted_iou, f"{name}.predicted_iou"),
                "stability_score": _opt_float(rec.stability_score, f"{name}.stability_score"),
                "point_coords": _opt_points(rec.point_coords, f"{name}.point_coords"),
                "crop_box": _opt_box(rec.crop_box, f"{name}.crop_box"),
                "model_version": _opt_str(rec.model_version, f"{name}.model_version"),
                "annotator": _opt_str(rec.annotator, f"{name}.annotator"),
                "lead_time_s": _opt_float(rec.lead_time_s, f"{name}.lead_time_s", minimum=0.0),
                "clicks": _opt_int(rec.clicks, f"{name}.clicks"),
            }
            if mask_id in seen:
                if seen[mask_id] != seg["counts"]:
                    raise InvalidInputError(
                        f"{name}.mask_id {mask_id!r} repeats in the batch with a different mask; "
                        "mask ids must be unique"
                    )
                continue  # the same mask twice in one batch: keep one
            seen[mask_id] = seg["counts"]
            segmentations.append(seg)
            columns["image_id"].append(rec.image_id)
            columns["mask_id"].append(mask_id)
            columns["round"].append(round)
            columns["source"].append(rec.source)
            columns["height"].append(seg["size"][0])
            columns["width"].append(seg["size"][1])
            columns["counts"].append(seg["counts"])
            for column, value in optional.items():
                columns[column].append(value)
            columns["run_id"].append(run_id)
            columns["created_at"].append(_utc(rec.created_at))
        area, bbox = rle_codec._area_and_bbox_of_valid(segmentations)
        columns["area"] = area.tolist()
        return cls(columns, bbox)

    def table(self, rows: list[int], now: datetime) -> pa.Table:
        """The rows ``rows`` as a MASKS_FILE_SCHEMA table; missing created_at becomes ``now``."""
        arrays = []
        for f in MASKS_FILE_SCHEMA:
            if f.name == "bbox":
                flat = pa.array(self.bbox[rows].ravel(), pa.float32())
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, 4))
                continue
            values = self.columns[f.name]
            column = [values[i] for i in rows]
            if f.name == "created_at":
                column = [v or now for v in column]
            arrays.append(pa.array(column, f.type))
        return pa.Table.from_arrays(arrays, schema=MASKS_FILE_SCHEMA)


def _with_stage(table: pa.Table, stage: int) -> pa.Table:
    stage_column = pa.array(np.full(table.num_rows, stage, dtype=np.int8))
    with_stage = table.add_column(MASKS_SCHEMA.get_field_index("stage"), "stage", stage_column)
    return with_stage.cast(MASKS_SCHEMA)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _read_parquet(data: bytes, key: str, schema: pa.Schema) -> pa.Table:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise StorageError(f"{key} is not a readable Parquet file: {err}") from None
    version = int((table.schema.metadata or {}).get(b"schema_version", b"0"))
    if version > SCHEMA_VERSION:
        raise StorageError(f"{key} has schema_version {version}; this reads <= {SCHEMA_VERSION}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowException, KeyError) as err:
        table_name = schema.metadata[b"table"].decode()
        raise StorageError(f"{key} does not match the {table_name} schema: {err}") from None


def _row_to_record(row: dict[str, Any]) -> MaskRecord:
    return MaskRecord(
        image_id=row["image_id"],
        segmentation={"size": [row["height"], row["width"]], "counts": row["counts"]},
        stage=row["stage"],
        round=row["round"],
        source=row["source"],
        run_id=row["run_id"],
        predicted_iou=stored_float(row["predicted_iou"]),
        stability_score=stored_float(row["stability_score"]),
        point_coords=row["point_coords"],
        crop_box=row["crop_box"],
        model_version=row["model_version"],
        annotator=row["annotator"],
        lead_time_s=stored_float(row["lead_time_s"]),
        clicks=row["clicks"],
        mask_id=row["mask_id"],
        created_at=row["created_at"],
    )


def _commit_key(sequence: int) -> str:
    return f"{_COMMITS}/{sequence:010d}.json"


def _embedding_key(image_id: str, model_version: str) -> str:
    return f"embeddings/{model_version}/{image_id}.npz"


def _check_id(value: Any, name: str) -> None:
    if not isinstance(value, str) or not _ID.match(value):
        raise UnsafeKeyError(
            f"{name} {value!r}; expected 1-200 letters, digits and '._=+-', not starting "
            "with a dot or dash (ids become file names)"
        )


def _size_pair(size: Any, name: str) -> np.ndarray:
    try:
        values = [int(s) for s in size]
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} is {size!r}; expected (height, width) in pixels") from None
    if len(values) != 2 or min(values) <= 0:
        raise InvalidInputError(f"{name} is {size!r}; expected (height, width) > 0")
    return np.asarray(values, dtype=np.int64)


def _check_split(value: Any, name: str) -> None:
    if value not in SPLITS:
        raise InvalidInputError(f"{name} is {value!r}; expected one of {SPLITS}")


def _check_commit_args(stage: Any, round: Any, run_id: Any) -> None:
    if stage not in STAGES or isinstance(stage, bool):
        raise InvalidInputError(f"stage is {stage!r}; expected one of {STAGES}")
    if not isinstance(round, int | np.integer) or isinstance(round, bool) or round < 0:
        raise InvalidInputError(f"round is {round!r}; expected an int >= 0")
    if not isinstance(run_id, str) or not run_id or len(run_id) > 200:
        raise InvalidInputError(f"run_id is {run_id!r}; expected a non-empty string")


def _check_image_record(rec: Any, name: str) -> None:
    if not isinstance(rec, ImageRecord):
        raise InvalidInputError(f"{name} is {type(rec).__name__}; expected an ImageRecord")
    _check_id(rec.image_id, f"{name}.image_id")
    if not isinstance(rec.uri, str) or not rec.uri:
        raise InvalidInputError(f"{name}.uri is {rec.uri!r}; expected a path or s3:// URI")
    for attr in ("width", "height"):
        value = getattr(rec, attr)
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value <= 0:
            raise InvalidInputError(f"{name}.{attr} is {value!r}; expected pixels > 0")
    if not isinstance(rec.sha256, str) or not _SHA256.match(rec.sha256):
        raise InvalidInputError(f"{name}.sha256 is {rec.sha256!r}; expected 64 lowercase hex")
    _check_split(rec.split, f"{name}.split")


def _utc(value: datetime | None) -> datetime | None:
    # A naive datetime is taken as UTC (what datetime.utcnow() gives).
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _opt_float(value: Any, name: str, *, minimum: float | None = None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} is {value!r}; expected a number or None") from None
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise InvalidInputError(f"{name} is {value!r}; expected a finite number{bound}")
    return number


def _opt_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
        raise InvalidInputError(f"{name} is {value!r}; expected an int >= 0 or None")
    return int(value)


def _opt_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidInputError(f"{name} is {value!r}; expected a string or None")
    return value


def _opt_points(value: Any, name: str) -> list[list[float]] | None:
    if value is None:
        return None
    try:
        points = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} is {value!r}; expected [[x, y], ...] in pixels") from None
    if points.size == 0:
        points = points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2 or not np.isfinite(points).all():
        raise InvalidInputError(f"{name} has shape {points.shape}; expected finite (K, 2) [x, y]")
    return points.tolist()


def _opt_box(value: Any, name: str) -> list[float] | None:
    if value is None:
        return None
    try:
        box = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} is {value!r}; expected [x, y, w, h] in pixels") from None
    if box.shape != (4,) or not np.isfinite(box).all() or box[2] < 0 or box[3] < 0:
        raise InvalidInputError(f"{name} is {value!r}; expected finite [x, y, w, h], w, h >= 0")
    return box.tolist()
