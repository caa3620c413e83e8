"""Brush RLE codec: byte-identical to Label Studio SDK's converter, which stays the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from label_studio_sdk.converter import brush as sdk

from storage import brush, rle
from storage.errors import MaskFormatError, RleError

_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Run lengths on each side of the SDK's token boundaries (8, 16, 256, 65536 values).
_EDGE_LENGTHS = [1, 2, 7, 8, 9, 15, 16, 17, 255, 256, 257, 65535, 65536, 65537, 131072, 131073]


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    """2-D masks: random, empty, full, one pixel, rectangles, ellipses, stripes; odd and even
    sizes, bool or uint8 (0/255 or any byte values)."""
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["random", "empty", "full", "one_pixel", "box", "blob", "rows"]))
    mask = np.zeros((h, w), dtype=bool)
    if kind == "random":
        mask = draw(hnp.arrays(np.bool_, (h, w)))
    elif kind == "full":
        mask[:] = True
    elif kind == "one_pixel":
        mask[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
    elif kind == "box":
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        mask[y0 : y0 + draw(st.integers(1, h)), x0 : x0 + draw(st.integers(1, w))] = True
    elif kind == "blob":
        cy, cx = draw(st.floats(0, h)), draw(st.floats(0, w))
        ry, rx = draw(st.floats(0.5, h)), draw(st.floats(0.5, w))
        yy, xx = np.mgrid[:h, :w]
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    elif kind == "rows":
        mask[:: draw(st.integers(1, 4))] = True
    dtype = draw(st.sampled_from(["bool", "uint8_255", "uint8_any"]))
    if dtype == "uint8_255":
        return mask.astype(np.uint8) * np.uint8(255)
    if dtype == "uint8_any":
        return draw(hnp.arrays(np.uint8, (h, w), elements=st.sampled_from([0, 1, 128, 254, 255])))
    return mask


@st.composite
def value_runs(draw: st.DrawFn) -> np.ndarray:
    """Flat uint8 arrays as runs, many of them at the SDK's token boundaries."""
    length = st.one_of(st.sampled_from(_EDGE_LENGTHS), st.integers(1, 300))
    runs = draw(st.lists(st.tuples(st.integers(0, 255), length), min_size=1, max_size=12))
    values = np.array([v for v, _ in runs], dtype=np.uint8)
    return np.repeat(values, [n for _, n in runs])


@_SETTINGS
@given(masks())
def test_encode_mask_is_byte_identical_to_the_sdk(mask: np.ndarray) -> None:
    encoded = brush.encode_mask(mask)
    assert encoded == brush.sdk_encode_mask(mask)
    assert all(type(v) is int for v in encoded)


@_SETTINGS
@given(masks())
def test_decode_agrees_with_the_sdk_and_round_trips(mask: np.ndarray) -> None:
    encoded = brush.encode_mask(mask)
    decoded = brush.decode(encoded)
    np.testing.assert_array_equal(decoded, brush.sdk_decode(encoded))
    expected = mask.astype(np.uint8) * np.uint8(255) if mask.dtype == np.bool_ else mask
    np.testing.assert_array_equal(decoded, np.repeat(expected.ravel(), 4))
    assert decoded.dtype == np.uint8


@settings(max_examples=100, deadline=None)
@given(value_runs())
def test_encode_values_is_byte_identical_to_the_sdk_at_run_length_boundaries(
    values: np.ndarray,
) -> None:
    encoded = brush.encode(values)
    assert encoded == [int(v) for v in sdk.encode_rle(values)]
    np.testing.assert_array_equal(brush.decode(encoded), values)


def _bits(value: int, width: int) -> str:
    return format(value, f"0{width}b")


@st.composite
def foreign_streams(draw: st.DrawFn) -> bytes:
    """Streams any rle-pack encoder may write (Label Studio's brush tool is one): any word size
    and count widths, literal and repeat tokens, any padding after the last token."""
    word = draw(st.integers(1, 8))
    widths = draw(st.lists(st.integers(1, 16), min_size=4, max_size=4))
    tokens = []
    num = 0
    for _ in range(draw(st.integers(0, 20))):
        k = draw(st.integers(0, 3))
        count = draw(st.integers(1, min(1 << widths[k], 40)))
        repeated = draw(st.booleans())
        n_values = 1 if repeated else count
        values = draw(
            st.lists(st.integers(0, (1 << word) - 1), min_size=n_values, max_size=n_values)
        )
        tokens.append(
            ("1" if repeated else "0")
            + _bits(k, 2)
            + _bits(count - 1, widths[k])
            + "".join(_bits(v, word) for v in values)
        )
        num += count
    header = _bits(num, 32) + _bits(word - 1, 5) + "".join(_bits(w - 1, 4) for w in widths)
    stream = header + "".join(tokens)
    stream += "0" * ((-len(stream)) % 8 + 8 * draw(st.integers(0, 2)))
    return int(stream, 2).to_bytes(len(stream) // 8, "big")


@_SETTINGS
@given(foreign_streams())
def test_decode_reads_any_rle_pack_stream_like_the_sdk(stream: bytes) -> None:
    np.testing.assert_array_equal(brush.decode(stream), sdk.decode_rle(stream))


_H, _W = 768, 1024


def _large_masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[:_H, :_W]
    blobs = np.zeros((_H, _W), dtype=bool)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, _H), rng.uniform(0, _W), rng.uniform(5, 150)
        blobs |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    return {
        "disk": (yy - 300) ** 2 + (xx - 500) ** 2 <= 200**2,
        "blobs": blobs,
        "noise_5pct": rng.random((_H, _W)) < 0.05,
        "full": np.ones((_H, _W), dtype=bool),  # one run of 3 145 728 values: 48 chunks
        "empty": np.zeros((_H, _W), dtype=bool),
        "odd_width": blobs[:767, :1023],
        "one_long_row": np.ones((1, 40_001), dtype=bool),
    }


@pytest.mark.parametrize("name", list(_large_masks()))
def test_large_masks_are_byte_identical_to_the_sdk(name: str) -> None:
    mask = _large_masks()[name]
    encoded = brush.encode_mask(mask)
    assert encoded == brush.sdk_encode_mask(mask)
    np.testing.assert_array_equal(brush.decode(encoded), brush.sdk_decode(encoded))


def test_rle_to_brush_and_from_brush_use_the_same_bytes_as_the_sdk() -> None:
    mask = _large_masks()["blobs"]
    coco = rle.encode(mask[None])[0]
    assert rle.to_brush(coco) == brush.sdk_encode_mask(mask)
    assert rle.from_brush(brush.sdk_encode_mask(mask), _H, _W) == coco


def test_a_stream_filling_its_last_byte_gets_a_zero_byte_more_as_in_the_sdk() -> None:
    # 53 header bits + one 19-bit token (a run of 17..256 values) = 72 bits: a whole 9 bytes.
    values = np.full(20, 7, dtype=np.uint8)
    encoded = brush.encode(values)
    assert encoded == [int(v) for v in sdk.encode_rle(values)]
    assert len(encoded) == 10 and encoded[-1] == 0


def test_an_empty_mask_is_a_header_of_zero_values() -> None:
    encoded = brush.encode_mask(np.zeros((0, 5), dtype=bool))
    assert len(encoded) == 7
    assert brush.decode(encoded).size == 0
    assert brush.sdk_decode(encoded).size == 0


def test_encode_rejects_other_dtypes_and_shapes() -> None:
    with pytest.raises(MaskFormatError, match="2-D bool or uint8"):
        brush.encode_mask(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(MaskFormatError, match="2-D bool or uint8"):
        brush.encode_mask(np.zeros((1, 2, 2), dtype=bool))
    with pytest.raises(MaskFormatError, match="1-D uint8"):
        brush.encode(np.zeros(4, dtype=np.int16))


def test_decode_rejects_truncated_and_corrupt_streams() -> None:
    encoded = brush.encode_mask(_large_masks()["disk"][:40, 480:520])
    with pytest.raises(RleError, match="header"):
        brush.decode(encoded[:5])
    for cut in (8, 9, len(encoded) - 2):
        with pytest.raises(RleError, match="ends inside"):
            brush.decode(encoded[:cut])
    with pytest.raises(RleError, match=r"0\.\.255"):
        brush.decode([*encoded[:-1], 256])
    # A literal token of 2 values in a stream that declares 1 value (the SDK: IndexError).
    literal = _bits(1, 32) + _bits(7, 5) + _bits(2, 4) * 4 + "0" + "00" + "001" + "0" * 16
    literal += "0" * ((-len(literal)) % 8)
    with pytest.raises(RleError, match="literal token past"):
        brush.decode(int(literal, 2).to_bytes(len(literal) // 8, "big"))
    # 16-bit words holding a value above 255 (the SDK: OverflowError).
    wide = _bits(1, 32) + _bits(15, 5) + _bits(2, 4) * 4 + "1" + "00" + "000" + _bits(300, 16)
    wide += "0" * ((-len(wide)) % 8)
    with pytest.raises(RleError, match=r"value 300; expected 0\.\.255"):
        brush.decode(int(wide, 2).to_bytes(len(wide) // 8, "big"))
