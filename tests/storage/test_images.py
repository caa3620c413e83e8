"""Image decoding (formats, bad files), listing under folders and S3 prefixes, content ids."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.errors import ImageError
from storage.images import decode_image, image_id_for, list_images
from storage.location import StorageLocation
from tests.fixtures.s3 import S3Root


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


def _rgb(h: int = 12, w: int = 17) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_rgb_is_exact() -> None:
    pixels = _rgb()
    out = decode_image(_encode(pixels, "PNG"), name="a.png")
    assert out.dtype == np.uint8 and out.shape == (12, 17, 3)
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF", "WEBP"])
def test_other_formats_decode_to_rgb(fmt: str) -> None:
    out = decode_image(_encode(_rgb(), fmt), name=f"a.{fmt.lower()}")
    assert out.shape == (12, 17, 3) and out.dtype == np.uint8


def test_gray_rgba_and_palette_convert() -> None:
    gray = np.arange(12 * 17, dtype=np.uint8).reshape(12, 17)
    out = decode_image(_encode(gray, "PNG"), name="gray.png")
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))
    rgba = np.dstack([_rgb(), np.full((12, 17), 7, np.uint8)])
    np.testing.assert_array_equal(decode_image(_encode(rgba, "PNG"), name="a.png"), _rgb())
    palette = Image.fromarray(_rgb()).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), name="p.png"), expected)


def test_16_bit_gray_is_scaled_not_clipped() -> None:
    wide = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    out = decode_image(buffer.getvalue(), name="16.png")
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied() -> None:
    image = Image.fromarray(_rgb(4, 6))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), name="r.jpg").shape == (6, 4, 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "known image format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image"),
    ],
)
def test_bad_bytes_raise_image_error_naming_the_file(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=rf"'bad.png'.*{reason}|{reason}.*'bad.png'"):
        decode_image(data, name="bad.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_raise(fmt: str) -> None:
    data = _encode(_rgb(64, 64), fmt)
    with pytest.raises(ImageError, match=r"trunc\.png"):
        decode_image(data[: len(data) // 2], name="trunc.png")


def test_over_the_pixel_limit_raises_before_decoding() -> None:
    data = _encode(_rgb(100, 100), "PNG")
    with pytest.raises(ImageError, match=r"big.png.*10000 pixels; the limit is 9999"):
        decode_image(data, name="big.png", max_pixels=9999)
    assert decode_image(data, name="big.png", max_pixels=10000).shape == (100, 100, 3)


def test_zero_size_png_raises() -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)  # width 0, height 5
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    with pytest.raises(ImageError, match=r"zero\.png"):
        decode_image(data, name="zero.png")


def test_image_id_is_a_content_hash() -> None:
    a = _encode(_rgb(), "PNG")
    assert image_id_for(a) == image_id_for(bytes(a)) and len(image_id_for(a)) == 24
    assert image_id_for(a) != image_id_for(_encode(_rgb(5, 5), "PNG"))
    with pytest.raises(ImageError, match="bytes"):
        image_id_for("images/a.png")  # type: ignore[arg-type]


def test_list_images_local(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ["b.PNG", "a.jpg", "sub/c.webp", "notes.txt", ".hidden.png", "d.jpeg"]:
        (tmp_path / name).write_bytes(b"x")
    found = list_images(str(tmp_path))
    assert found == [str(tmp_path / n) for n in ["a.jpg", "b.PNG", "d.jpeg", "sub/c.webp"]]
    with pytest.raises(ImageError, match="does not exist"):
        list_images(str(tmp_path / "missing"))


def test_list_images_s3(s3_root: S3Root) -> None:
    location = StorageLocation(s3_root.root, endpoint_url=s3_root.endpoint_url)
    for name in ["imgs/b.png", "imgs/a.tif", "imgs/x.json", "other/c.png"]:
        location.put_bytes(name, b"x")
    found = list_images(f"{s3_root.root}/imgs", endpoint_url=s3_root.endpoint_url)
    assert found == [f"{s3_root.root}/imgs/a.tif", f"{s3_root.root}/imgs/b.png"]
