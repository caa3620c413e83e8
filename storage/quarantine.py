"""The quarantine: input images the engine refused, each with its reason, kept in the store.

An image file that cannot be used (empty, truncated, not an image at all, over the pixel limit,
or listed under an unsafe key) is not registered. It is recorded here instead, so that an import
or a stage run goes on with the other images and says what it left out and why: every input is
either registered or quarantined.

Layout: one JSON object per entry, ``quarantine/<entry id>.json`` under the store root::

    {"schema_version": 1, "key": "s3://bucket/pool/broken.jpg", "sha256": "9f86..." | null,
     "reason": "truncated or corrupt", "message": "image 's3://...' is truncated ...",
     "quarantined_at": "2026-01-01T12:00:00+00:00"}

``key`` is the image's URI (or, for an unsafe key, the source and the key as listed: a name, never
opened). ``sha256`` is that of the file's bytes when they could be read. ``reason`` is a short
fixed phrase (:attr:`storage.errors.ImageError.reason`, or ``"unsafe key"``).

The entry id is the first 32 hex digits of the SHA-256 of ``key`` and ``sha256``, and entries are
created exclusively, so quarantining the same file again (a rerun, or two runs at once) keeps the
first entry and adds nothing; a file replaced by other bytes under the same key is a new entry.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from storage.errors import CommitConflictError, StorageError

if TYPE_CHECKING:
    from storage.mask_store import MaskStore

__all__ = [
    "QUARANTINE_PREFIX",
    "QUARANTINE_SCHEMA_VERSION",
    "UNSAFE_KEY_REASON",
    "QuarantineEntry",
    "quarantine_image",
    "quarantine_reasons",
    "quarantined",
]

QUARANTINE_PREFIX = "quarantine"
QUARANTINE_SCHEMA_VERSION = 1
#: Reason recorded for an image listed under a key that could escape the root or mislead.
UNSAFE_KEY_REASON = "unsafe key"


@dataclass(frozen=True)
class QuarantineEntry:
    """One refused image: its key (URI), why, and when (UTC) it was first quarantined."""

    key: str
    reason: str
    message: str
    sha256: str | None
    quarantined_at: datetime

    @property
    def entry_id(self) -> str:
        """The entry's object name: a hash of ``key`` and ``sha256``."""
        return _entry_id(self.key, self.sha256)

    def to_json(self) -> dict[str, Any]:
        """The stored object's content."""
        return {
            "schema_version": QUARANTINE_SCHEMA_VERSION,
            "key": self.key,
            "sha256": self.sha256,
            "reason": self.reason,
            "message": self.message,
            "quarantined_at": self.quarantined_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: Any, *, name: str) -> QuarantineEntry:
        """Parse a stored entry; raises :class:`StorageError` if malformed or too new."""
        try:
            version = int(data["schema_version"])
            if version > QUARANTINE_SCHEMA_VERSION:
                raise StorageError(
                    f"{name} has schema_version {version}; this code reads "
                    f"<= {QUARANTINE_SCHEMA_VERSION}"
                )
            sha = data["sha256"]
            return cls(
                key=str(data["key"]),
                reason=str(data["reason"]),
                message=str(data["message"]),
                sha256=None if sha is None else str(sha),
                quarantined_at=datetime.fromisoformat(data["quarantined_at"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise StorageError(f"{name} is not a valid quarantine entry: {err!r}") from None


def quarantine_image(
    store: MaskStore,
    key: str,
    *,
    reason: str,
    message: str,
    sha256: str | None = None,
) -> bool:
    """Record ``key`` as refused; returns False if the same file was quarantined before."""
    entry = QuarantineEntry(key, reason, message, sha256, datetime.now(UTC))
    data = json.dumps(entry.to_json(), ensure_ascii=True, indent=1).encode("utf-8")
    try:
        store.put_object(_object_key(entry.entry_id), data, exclusive=True)
    except CommitConflictError:
        return False
    return True


def quarantined(store: MaskStore) -> list[QuarantineEntry]:
    """Every quarantined image of ``store``, oldest first."""
    entries = []
    for object_key in store.list_objects(QUARANTINE_PREFIX):
        if not object_key.endswith(".json"):
            continue
        try:
            data = json.loads(store.get_object(object_key))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StorageError(f"{object_key} is not valid JSON: {err}") from None
        entries.append(QuarantineEntry.from_json(data, name=object_key))
    entries.sort(key=lambda e: (e.quarantined_at, e.key))
    return entries


def quarantine_reasons(entries: list[QuarantineEntry]) -> dict[str, int]:
    """Entries per reason, most frequent first."""
    return dict(Counter(e.reason for e in entries).most_common())


def _entry_id(key: str, sha256: str | None) -> str:
    text = f"{key}\x1f{sha256 or ''}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _object_key(entry_id: str) -> str:
    return f"{QUARANTINE_PREFIX}/{entry_id}.json"
