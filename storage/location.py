"""Where the dataset lives (a folder or ``s3://bucket/prefix``): safe keys and atomic puts.

A *key* is a ``/``-separated path relative to the location's root (``masks/stage=1/part.parquet``).
Every key is checked by :meth:`StorageLocation.key` before any I/O: no ``..`` or ``.`` segment, no
absolute path, no backslash, NUL or other control character, no percent-encoding (``%2e%2e``)
and no URI of another bucket (``s3://other/...``) can name an object outside the root. Keys are
also refused when they could mislead a person, or a later tool that normalizes Unicode: format
characters (a right-to-left override can make a name ending in ``gnp.exe`` display as
``exe.png``; zero-width spaces), line separators, private-use or unassigned code points, text
not in NFC (an NFD ``café`` differs byte-wise from the NFC one that looks the same), and
characters that fold (NFKC) to ``/``, ``\\``, ``.``, ``:`` or ``%`` or look like a slash
(fullwidth solidus ``／``, fraction slash ``⁄``). A segment is at most 255 bytes of UTF-8 (a
file name) and a key at most 1024 (S3's limit).

Writes are atomic: locally a temporary file next to the target (a dot-file, which listings and
``pyarrow.dataset`` skip) is renamed over it; on S3 an object appears whole when its single PUT
(or multipart upload) completes. ``exclusive=True`` creates a key only if it does not exist yet
(``os.link`` locally, ``If-None-Match: *`` on S3), which is what the commit log needs.

S3 credentials and region come from the standard AWS chain (environment, config files); they are
never logged. ``endpoint_url`` points at MinIO, moto or another S3-compatible server; without it,
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` is used when set, as boto3 does.
"""

from __future__ import annotations

import builtins
import functools
import os
import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from storage.errors import CommitConflictError, NotFoundError, StorageError, UnsafeKeyError

__all__ = ["ObjectInfo", "StorageLocation", "read_uri", "write_uri_atomic"]

_PERCENT_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_TEMP_MARK = ".tmp-"
# Unicode categories never allowed in a key: controls, format characters (bidi overrides,
# zero-width), surrogates, private use, unassigned, line and paragraph separators.
_BANNED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# ASCII characters with a meaning in paths or URIs: nothing may fold (NFKC) into one of them.
_PATH_SYNTAX = frozenset("/\\.:%")
# Slash lookalikes that NFKC leaves alone.
_SLASH_LOOKALIKES = frozenset("\u2044\u2215\u2216\u2571\u29f5\u29f8\u29f9")
_MAX_SEGMENT_BYTES = 255
_MAX_KEY_BYTES = 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the root), size in bytes, last-modified time."""

    key: str
    size: int
    mtime: datetime | None


class StorageLocation:
    """A local folder or ``s3://bucket/prefix`` that objects are read from and written to.

    Args:
        root: local path (relative paths are made absolute) or ``s3://bucket[/prefix]``.
        filesystem: a pyarrow filesystem to use instead of the one chosen from ``root``.
        endpoint_url: S3 endpoint such as ``http://127.0.0.1:9000`` (MinIO, moto).
        region: S3 region; default from the standard AWS settings.
    """

    def __init__(
        self,
        root: str,
        *,
        filesystem: pafs.FileSystem | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        root = str(root)
        if endpoint_url is None and root.startswith("s3://") and filesystem is None:
            # The standard AWS setting (boto3 reads it too; pyarrow does not).
            endpoint_url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                "AWS_ENDPOINT_URL"
            )
        self.endpoint_url = endpoint_url
        self.region = region
        if root.startswith("s3://"):
            self.bucket, self.prefix = _split_s3(root)
            self.is_s3 = True
            self._base = f"{self.bucket}/{self.prefix}".rstrip("/")
            self.root = f"s3://{self._base}"
            self.filesystem = filesystem or _s3_filesystem(endpoint_url, region)
        else:
            if root.startswith("file://"):
                root = root[len("file://") :]
            if not root or "\x00" in root:
                raise UnsafeKeyError(f"storage root {root!r}; expected a folder path or s3:// URI")
            self.bucket, self.prefix = "", ""
            self.is_s3 = False
            if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
                self._base = os.path.abspath(os.path.expanduser(root))
            else:
                # A path inside the given filesystem (e.g. a SubTreeFileSystem): keep it as is.
                _check_part(root.lstrip("/"))
                self._base = root.rstrip("/")
            self.root = self._base
            self.filesystem = filesystem or pafs.LocalFileSystem()
        self._is_local_fs = isinstance(self.filesystem, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"StorageLocation({self.root!r})"

    def key(self, *parts: str) -> str:
        """Join ``parts`` into a safe key relative to the root; raises :class:`UnsafeKeyError`."""
        segments: list[str] = []
        for part in parts:
            if not isinstance(part, str):
                raise UnsafeKeyError(f"key part {part!r} is {type(part).__name__}; expected str")
            _check_part(part)
            segments.extend(s for s in part.split("/") if s)
        key = "/".join(segments)
        if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
            raise UnsafeKeyError(
                f"key {key[:80]!r}... is {len(key.encode('utf-8'))} bytes of UTF-8; "
                f"expected at most {_MAX_KEY_BYTES}"
            )
        return key

    def uri(self, key: str) -> str:
        """The absolute local path or ``s3://`` URI of ``key``."""
        key = self.key(key)
        if self.is_s3:
            return f"s3://{self._path(key)}"
        return self._path(key)

    def put_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write ``data`` to ``key`` atomically (readers see the old object, none, or all of it).

        With ``exclusive`` the key is created only if absent; otherwise
        :class:`CommitConflictError` is raised and nothing is changed.
        """
        key = self.key(key)
        if not key:
            raise UnsafeKeyError("put_bytes: empty key; expected a file name under the root")
        try:
            if self.is_s3 or not self._is_local_fs:
                self._put_object(key, bytes(data), exclusive=exclusive)
            else:
                self._put_local(key, bytes(data), exclusive=exclusive)
        except (CommitConflictError, UnsafeKeyError):
            raise
        except OSError as err:
            raise StorageError(f"could not write {self.uri(key)}: {err}") from err

    def get_bytes(self, key: str) -> bytes:
        """Read the whole object; raises :class:`NotFoundError` if it does not exist."""
        key = self.key(key)
        try:
            with self.filesystem.open_input_stream(self._path(key)) as stream:
                return bytes(stream.read())
        except FileNotFoundError:
            raise NotFoundError(f"{self.uri(key)} does not exist") from None
        except IsADirectoryError:
            raise NotFoundError(f"{self.uri(key)} is a folder, not a file") from None
        except OSError as err:
            raise StorageError(f"could not read {self.uri(key)}: {err}") from err

    def exists(self, key: str) -> bool:
        """Whether ``key`` is an existing file (folders do not count)."""
        key = self.key(key)
        try:
            info = self.filesystem.get_file_info(self._path(key))
        except OSError as err:
            raise StorageError(f"could not check {self.uri(key)}: {err}") from err
        return info.type == pafs.FileType.File

    def list(self, prefix: str = "", *, include_hidden: bool = False) -> builtins.list[str]:
        """Keys of the files under the folder ``prefix`` (recursive, sorted).

        Names starting with ``.`` (temporary files of writes in progress) are left out unless
        ``include_hidden``. A missing folder lists as empty.
        """
        return [info.key for info in self.list_info(prefix, include_hidden=include_hidden)]

    def list_info(
        self, prefix: str = "", *, include_hidden: bool = False
    ) -> builtins.list[ObjectInfo]:
        """Like :meth:`list`, with each file's size and last-modified time."""
        prefix = self.key(prefix)
        selector = pafs.FileSelector(self._path(prefix), recursive=True, allow_not_found=True)
        try:
            infos = self.filesystem.get_file_info(selector)
        except OSError as err:
            raise StorageError(f"could not list {self.uri(prefix)}: {err}") from err
        out = []
        strip = len(self._base) + 1 if self._base else 0
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            if not include_hidden and info.base_name.startswith("."):
                continue
            mtime = info.mtime
            if mtime is not None and mtime.tzinfo is None:
                mtime = mtime.replace(tzinfo=UTC)
            out.append(ObjectInfo(key=info.path[strip:], size=info.size or 0, mtime=mtime))
        out.sort(key=lambda o: o.key)
        return out

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""
        key = self.key(key)
        if not key:
            raise UnsafeKeyError("delete: empty key; refusing to delete the root")
        try:
            self.filesystem.delete_file(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as err:
            raise StorageError(f"could not delete {self.uri(key)}: {err}") from err

    def _path(self, key: str) -> str:
        if not key:
            return self._base
        return f"{self._base}/{key}" if self._base else key

    def _put_local(self, key: str, data: bytes, *, exclusive: bool) -> None:
        path = self._path(key)
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        temp = os.path.join(folder, f".{name}{_TEMP_MARK}{uuid.uuid4().hex}")
        try:
            with open(temp, "wb") as f:
                f.write(data)
            if exclusive:
                # link() fails if the target exists: an atomic create-if-absent.
                try:
                    os.link(temp, path)
                except FileExistsError:
                    raise CommitConflictError(f"{path} already exists") from None
            else:
                os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)

    def _put_object(self, key: str, data: bytes, *, exclusive: bool) -> None:
        path = self._path(key)
        if exclusive:
            if self.is_s3:
                self._put_s3_if_absent(key, data)
                return
            # A filesystem without create-if-absent: check then write (racy; documented).
            if self.exists(key):
                raise CommitConflictError(f"{self.uri(key)} already exists")
        if self.is_s3:
            # An S3 object appears whole when its PUT (or multipart upload) completes.
            with self.filesystem.open_output_stream(path) as stream:
                stream.write(data)
            return
        folder, _, name = path.rpartition("/")
        if folder:
            self.filesystem.create_dir(folder, recursive=True)
        temp = f"{folder}/.{name}{_TEMP_MARK}{uuid.uuid4().hex}" if folder else f".{name}"
        with self.filesystem.open_output_stream(temp) as stream:
            stream.write(data)
        self.filesystem.move(temp, path)

    def _put_s3_if_absent(self, key: str, data: bytes) -> None:
        # pyarrow cannot send If-None-Match, so the conditional PUT goes through boto3.
        from botocore.exceptions import BotoCoreError, ClientError

        client = _s3_client(self.endpoint_url, self.region)
        try:
            client.put_object(
                Bucket=self.bucket,
                Key=self._path(key)[len(self.bucket) + 1 :],
                Body=data,
                IfNoneMatch="*",
            )
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                # boto3 retries a PUT whose response was lost; if the first attempt landed,
                # the retry meets our own object. That is success, not another writer's.
                if self._holds(key, data):
                    return
                raise CommitConflictError(f"{self.uri(key)} already exists") from None
            raise StorageError(f"could not write {self.uri(key)}: {code or err}") from None
        except BotoCoreError as err:  # connection dropped or refused, after boto3's retries
            raise StorageError(
                f"could not write {self.uri(key)} (it may or may not have been created): {err}"
            ) from None

    def _holds(self, key: str, data: bytes) -> bool:
        """Whether ``key`` exists with exactly ``data`` as its content."""
        try:
            return self.get_bytes(key) == data
        except NotFoundError:
            return False


def read_uri(uri: str, *, endpoint_url: str | None = None) -> bytes:
    """Read a whole file given as a local path or ``s3://`` URI."""
    location, key = _split_uri(uri, endpoint_url)
    return location.get_bytes(key)


def write_uri_atomic(uri: str, data: bytes, *, endpoint_url: str | None = None) -> None:
    """Write a whole file given as a local path or ``s3://`` URI, atomically."""
    location, key = _split_uri(uri, endpoint_url)
    location.put_bytes(key, data)


def _split_uri(uri: str, endpoint_url: str | None) -> tuple[StorageLocation, str]:
    uri = str(uri)
    if uri.startswith("s3://"):
        bucket, path = _split_s3(uri)
        if not path:
            raise UnsafeKeyError(f"{uri!r} names a bucket; expected s3://bucket/key")
        parent, _, name = path.rpartition("/")
        root = f"s3://{bucket}/{parent}" if parent else f"s3://{bucket}"
        return StorageLocation(root, endpoint_url=endpoint_url), name
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    path = os.path.abspath(os.path.expanduser(uri))
    if uri.endswith(("/", os.sep)) or not os.path.basename(path):
        raise UnsafeKeyError(f"{uri!r} names a folder; expected a file path")
    return StorageLocation(os.path.dirname(path)), os.path.basename(path)


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise UnsafeKeyError(f"{uri!r}: bucket {bucket!r} is not a valid S3 bucket name")
    if prefix:
        try:
            _check_part(prefix)
        except UnsafeKeyError as err:
            raise UnsafeKeyError(f"{uri!r}: {err}") from None
    return bucket, "/".join(s for s in prefix.split("/") if s)


def _check_part(part: str) -> None:
    if _CONTROL.search(part):
        raise UnsafeKeyError(f"key {part!r} contains a NUL or control character")
    if "\\" in part:
        raise UnsafeKeyError(f"key {part!r} contains a backslash; expected '/' separators")
    if part.startswith("/"):
        raise UnsafeKeyError(f"key {part!r} is absolute; expected a path under the root")
    if "://" in part or part.lower().startswith(("s3:", "file:")):
        raise UnsafeKeyError(f"key {part!r} is a URI; expected a path under the root")
    if _PERCENT_ESCAPE.search(part):
        raise UnsafeKeyError(f"key {part!r} contains percent-encoding; expected plain characters")
    for segment in part.split("/"):
        if segment in (".", ".."):
            raise UnsafeKeyError(f"key {part!r} has a {segment!r} segment; it may escape the root")
        if len(segment.encode("utf-8")) > _MAX_SEGMENT_BYTES:
            raise UnsafeKeyError(
                f"key {part[:80]!r}... has a segment of {len(segment.encode('utf-8'))} bytes; "
                f"expected file names of at most {_MAX_SEGMENT_BYTES} bytes of UTF-8"
            )
    if not part.isascii():
        _check_unicode(part)


def _check_unicode(part: str) -> None:
    """Refuse characters that hide or fake path syntax (see the module docstring)."""
    for char in part:
        if char.isascii():
            continue
        what = f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}"
        category = unicodedata.category(char)
        if category in _BANNED_CATEGORIES or (category == "Zs" and char != " "):
            raise UnsafeKeyError(
                f"key {part!r} contains {what} (category {category}); expected visible "
                "characters only"
            )
        folded = "/" if char in _SLASH_LOOKALIKES else unicodedata.normalize("NFKC", char)
        if _PATH_SYNTAX.intersection(folded):
            raise UnsafeKeyError(
                f"key {part!r} contains {what}, which looks like {folded!r}; "
                "expected the ASCII character itself or another one"
            )
    nfc = unicodedata.normalize("NFC", part)
    if nfc != part:
        raise UnsafeKeyError(
            f"key {part!r} ({part!a}) is not in Unicode NFC: it looks the same as "
            f"{nfc!a} but differs byte-wise; expected NFC file names"
        )


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if endpoint_url:
        kwargs["endpoint_override"] = endpoint_url
        if urlsplit(endpoint_url).scheme == "http":
            kwargs["scheme"] = "http"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None, region: str | None) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
