"""Reading images safely, finding them under a folder or S3 prefix, and naming them.

Image ids are content-based: :func:`image_id_for` is the first 24 hex digits (96 bits) of the
SHA-256 of the file's bytes, so the same picture imported twice, from any path, is one image.

Decoding uses Pillow, which reads the header before the pixels: the size limit is checked before
anything large is allocated, and a truncated file raises instead of coming back half grey. EXIF
orientation is applied, as browsers (and so Label Studio) and ``cv2.imread`` do.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np

from storage.errors import ImageError, UnsafeKeyError
from storage.location import StorageLocation

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageScan",
    "RejectedKey",
    "decode_image",
    "image_id_for",
    "list_images",
    "scan_images",
    "sha256_hex",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_ID_HEX_DIGITS = 24
# Pillow's errors for broken files are not one class; these are the ones its decoders raise.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def image_id_for(data: bytes) -> str:
    """Deterministic image id from the file's bytes: first 24 hex digits of their SHA-256."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageError(
            f"image_id_for takes the image's bytes, got {type(data).__name__}; "
            "ids are content hashes so a re-import from another path finds the same image"
        )
    return sha256_hex(bytes(data))[:_ID_HEX_DIGITS]


def decode_image(data: bytes, *, name: str, max_pixels: int = 64_000_000) -> np.ndarray:
    """Decode image bytes to RGB ``uint8`` of shape ``(H, W, 3)``.

    Gray, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted (16-bit values are
    scaled to 8 bits, not clipped). Raises :class:`ImageError` naming ``name`` for empty data, an
    unknown format, a zero-size or truncated image, or one over ``max_pixels`` pixels.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError(f"image {name!r} is empty (0 bytes)", reason="empty file")
    with warnings.catch_warnings():
        # Our own limit is checked below; Pillow's bomb warning would turn into an error in
        # strict settings for sizes we accept.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(
                f"image {name!r} is not in a known image format", reason="unknown format"
            ) from None
        except Image.DecompressionBombError:
            raise ImageError(
                f"image {name!r} has more than {max_pixels} pixels, the limit (its header "
                "declares a decompression bomb)",
                reason="too many pixels",
            ) from None
        except _DECODE_ERRORS as err:
            raise ImageError(
                f"image {name!r} cannot be read: {err}", reason="truncated or corrupt"
            ) from None
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(f"image {name!r} has zero size ({width}x{height})", reason="zero size")
        if width * height > max_pixels:
            raise ImageError(
                f"image {name!r} is {width}x{height} = {width * height} pixels; "
                f"the limit is {max_pixels}",
                reason="too many pixels",
            )
        try:
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))
        except _DECODE_ERRORS as err:
            raise ImageError(
                f"image {name!r} is truncated or corrupt: {err}", reason="truncated or corrupt"
            ) from None
    return rgb


@dataclass(frozen=True)
class RejectedKey:
    """A listed image whose key is unsafe (see :mod:`storage.location`); it was never read.

    ``key`` is the source root and the key as listed, joined with ``/``: a name for reports,
    never a path to open.
    """

    key: str
    message: str


@dataclass(frozen=True)
class ImageScan:
    """What a folder or S3 prefix holds: the URIs of its image files, sorted, and the image
    files whose keys were refused."""

    uris: list[str]
    rejected: list[RejectedKey]


def scan_images(source: str, *, endpoint_url: str | None = None) -> ImageScan:
    """The image files under a folder or S3 prefix, and those whose keys are unsafe.

    Recursive; matches the extensions in :data:`IMAGE_EXTENSIONS`, case-insensitively, and
    skips hidden files. An S3 listing can return keys such as ``a/../../b.png`` or
    ``%2e%2e/x.png``; they land in ``rejected`` with the reason, unread. A folder that does not
    exist raises :class:`ImageError`.
    """
    location = StorageLocation(source, endpoint_url=endpoint_url)
    if not location.is_s3 and not os.path.isdir(location.root):
        raise ImageError(f"image folder {source!r} does not exist or is not a folder")
    uris: list[str] = []
    rejected: list[RejectedKey] = []
    for key in location.list(""):
        if not key.lower().endswith(IMAGE_EXTENSIONS):
            continue
        try:
            uris.append(location.uri(key))
        except UnsafeKeyError as err:
            rejected.append(RejectedKey(f"{location.root}/{key}", str(err)))
    return ImageScan(uris, rejected)


def list_images(source: str, *, endpoint_url: str | None = None) -> list[str]:
    """URIs (absolute paths or ``s3://``) of the image files under a folder or S3 prefix, sorted.

    Like :func:`scan_images`, but an unsafe key raises :class:`UnsafeKeyError` naming it.
    """
    scan = scan_images(source, endpoint_url=endpoint_url)
    if scan.rejected:
        first = scan.rejected[0]
        raise UnsafeKeyError(f"image source {source!r}: {first.message}")
    return scan.uris


def _to_rgb(image: object) -> np.ndarray:
    from PIL import Image

    assert isinstance(image, Image.Image)
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit gray: keep the full range by scaling 0..65535 to 0..255.
        wide = np.asarray(image, dtype=np.int64)
        gray = np.clip((wide + 128) // 257, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
