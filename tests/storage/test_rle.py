"""COCO RLE codec: golden comparisons with pycocotools, round trips, bad input, brush RLE."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pycocotools import mask as coco_mask

from storage import rle
from storage.errors import DataEngineError, MaskFormatError, RleError

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _pycocotools_counts(masks: np.ndarray) -> list[str]:
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    return [r["counts"].decode("ascii") for r in coco_mask.encode(fortran)]


def _runs(mask: np.ndarray) -> np.ndarray:
    """Runs of a 2-D mask in column-major order, zeros first: the spec, in numpy."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size])))
    return np.concatenate(([0], runs)) if flat.size and flat[0] == 1 else runs


@st.composite
def mask_batches(draw: st.DrawFn) -> np.ndarray:
    """Batches of masks: random, empty, full, one-pixel, blocky; odd and even sizes."""
    n = draw(st.integers(1, 3))
    h = draw(st.integers(1, 33))
    w = draw(st.integers(1, 33))
    kind = draw(st.sampled_from(["random", "empty", "full", "one_pixel", "block"]))
    if kind == "random":
        return draw(hnp.arrays(np.bool_, (n, h, w)))
    masks = np.zeros((n, h, w), dtype=bool)
    if kind == "full":
        masks[:] = True
    elif kind == "one_pixel":
        for i in range(n):
            masks[i, draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
    elif kind == "block":
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        masks[:, y0 : y0 + draw(st.integers(1, h)), x0 : x0 + draw(st.integers(1, w))] = True
    return masks


@_SETTINGS
@given(mask_batches())
def test_encode_matches_pycocotools_byte_for_byte_and_round_trips(masks: np.ndarray) -> None:
    encoded = rle.encode(masks)
    assert [r["counts"] for r in encoded] == _pycocotools_counts(masks)
    assert all(r["size"] == [masks.shape[1], masks.shape[2]] for r in encoded)
    assert all(isinstance(r["counts"], str) for r in encoded)
    decoded = rle.decode(encoded)
    assert decoded.dtype == np.bool_ and decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, masks)


@_SETTINGS
@given(mask_batches())
def test_counts_to_runs_parses_what_pycocotools_writes(masks: np.ndarray) -> None:
    for mask, encoded in zip(masks, rle.encode(masks), strict=True):
        np.testing.assert_array_equal(rle.counts_to_runs(encoded["counts"]), _runs(mask))


@_SETTINGS
@given(mask_batches())
def test_area_bbox_iou_agree_with_pycocotools(masks: np.ndarray) -> None:
    encoded = rle.encode(masks)
    coco = [{"size": r["size"], "counts": r["counts"].encode()} for r in encoded]
    np.testing.assert_array_equal(rle.area(encoded), masks.sum(axis=(1, 2)))
    np.testing.assert_array_equal(rle.to_bbox(encoded), coco_mask.toBbox(coco).astype(np.float32))
    expected = coco_mask.iou(coco, coco, [0] * len(coco))
    np.testing.assert_allclose(rle.iou(encoded, encoded), expected)


def test_odd_sized_large_mask_is_byte_identical() -> None:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:517, :263]
    masks = np.stack([(yy - 200) ** 2 + (xx - 100) ** 2 < 90**2, rng.random((517, 263)) < 0.3])
    assert [r["counts"] for r in rle.encode(masks)] == _pycocotools_counts(masks)
    np.testing.assert_array_equal(rle.decode(rle.encode(masks)), masks)


def test_bbox_is_xywh_and_iou_is_pairwise() -> None:
    masks = np.zeros((2, 10, 20), dtype=bool)
    masks[0, 2:5, 3:9] = True  # rows 2..4, columns 3..8
    masks[1, 2:5, 3:6] = True
    encoded = rle.encode(masks)
    np.testing.assert_array_equal(rle.to_bbox(encoded), [[3, 2, 6, 3], [3, 2, 3, 3]])
    iou = rle.iou(encoded[:1], encoded)
    assert iou.shape == (1, 2)
    np.testing.assert_allclose(iou, [[1.0, 0.5]])
    assert rle.iou([], encoded).shape == (0, 2)


def test_empty_batches() -> None:
    assert rle.encode(np.zeros((0, 4, 5), dtype=bool)) == []
    assert rle.decode([]).shape == (0, 0, 0)
    assert rle.area([]).shape == (0,)
    assert rle.to_bbox([]).shape == (0, 4)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 5), dtype=bool),  # 2-D
        np.zeros((1, 4, 5, 1), dtype=bool),  # 4-D
        np.zeros((1, 4, 5), dtype=np.uint8),  # not bool
        np.zeros((1, 4, 5), dtype=np.float32),
        [[[True]]],  # not an array
    ],
)
def test_encode_rejects_wrong_shape_or_dtype(bad: object) -> None:
    with pytest.raises(MaskFormatError, match="masks"):
        rle.encode(bad)  # type: ignore[arg-type]


def test_validate_rejects_counts_that_do_not_sum_to_h_times_w() -> None:
    good = rle.encode(np.ones((1, 4, 5), dtype=bool))[0]
    with pytest.raises(RleError, match=r"sum to 20 pixels; expected h\*w = 4\*6 = 24"):
        rle.validate({"size": [4, 6], "counts": good["counts"]})
    with pytest.raises(RleError, match="sum to 7"):
        rle.validate({"size": [2, 2], "counts": [3, 4]})


@pytest.mark.parametrize(
    ("counts", "reason"),
    [
        ("0`", "middle of a run"),  # the continuation bit is set on the last character
        ("~~", "outside"),  # characters past 'o'
        (" 1", "outside"),
        ("é1", "non-ASCII"),
        ("0" + "o" * 8 + "0", "longer than 32 bits"),
        ("0O", "outside 0"),  # the second run decodes to -1
    ],
)
def test_validate_rejects_corrupt_counts(counts: str, reason: str) -> None:
    with pytest.raises(RleError, match=reason):
        rle.validate({"size": [2, 2], "counts": counts})


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {"counts": "04"},
        {"size": [2], "counts": "04"},
        {"size": [2, -2], "counts": "04"},
        {"size": [2.0, 2], "counts": "04"},
        {"size": [2, 2], "counts": 4},
        {"size": [2, 2], "counts": [1.5, 2.5]},
    ],
)
def test_validate_rejects_malformed_dicts(bad: object) -> None:
    with pytest.raises(RleError):
        rle.validate(bad)


def test_decode_rejects_corrupt_rle_before_calling_pycocotools() -> None:
    # pycocotools would write past its buffer for these; validation must stop them first.
    with pytest.raises(RleError, match=r"rles\[1\]"):
        rle.decode([{"size": [2, 2], "counts": "04"}, {"size": [2, 2], "counts": "0o0"}])
    with pytest.raises(RleError, match="differs"):
        rle.decode([{"size": [2, 2], "counts": "04"}, {"size": [1, 4], "counts": "04"}])
    with pytest.raises(DataEngineError):
        rle.iou([{"size": [2, 2], "counts": "04"}], [{"size": [1, 4], "counts": "04"}])


def test_validate_normalises_bytes_and_uncompressed_counts() -> None:
    mask = np.zeros((1, 3, 4), dtype=bool)
    mask[0, 1, 1:3] = True
    expected = rle.encode(mask)[0]
    assert rle.validate({"size": [3, 4], "counts": expected["counts"].encode()}) == expected
    uncompressed = {"size": [3, 4], "counts": _runs(mask[0]).tolist()}
    assert rle.validate(uncompressed) == expected


@settings(max_examples=25, deadline=None)
@given(mask_batches())
def test_brush_round_trip(masks: np.ndarray) -> None:
    for mask, encoded in zip(masks, rle.encode(masks), strict=True):
        brush = rle.to_brush(encoded)
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in brush)
        assert rle.from_brush(brush, mask.shape[0], mask.shape[1]) == encoded


def test_brush_is_rgba_row_major_with_the_mask_in_alpha() -> None:
    from label_studio_sdk.converter import brush

    mask = np.zeros((3, 5), dtype=bool)
    mask[0, 4] = True  # last pixel of the first row: row-major index 4, column-major index 12
    pixels = brush.decode_rle(bytes(rle.to_brush(rle.encode(mask[None])[0])))
    rgba = pixels.reshape(3, 5, 4)
    assert rgba[0, 4].tolist() == [255, 255, 255, 255]
    assert int(rgba.sum()) == 4 * 255


def test_from_brush_reads_alpha_only_and_thresholds_at_half() -> None:
    from label_studio_sdk.converter import brush

    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = [0, 0, 0, 255]  # black but opaque: foreground
    rgba[0, 1] = [255, 0, 0, 127]  # faint edge: background
    rgba[1, 2] = [9, 9, 9, 128]
    encoded = rle.from_brush(brush.encode_rle(rgba.ravel()), 2, 3)
    expected = np.zeros((1, 2, 3), dtype=bool)
    expected[0, 0, 0] = expected[0, 1, 2] = True
    np.testing.assert_array_equal(rle.decode([encoded]), expected)


def test_from_brush_rejects_wrong_size_and_garbage() -> None:
    brush = rle.to_brush(rle.encode(np.ones((1, 4, 4), dtype=bool))[0])
    with pytest.raises(RleError, match="holds 64 values; expected 80"):
        rle.from_brush(brush, 4, 5)
    with pytest.raises(RleError):
        rle.from_brush([300, 1, 2, 3, 4, 5, 6, 7], 1, 1)
    with pytest.raises(RleError):
        rle.from_brush([1, 2], 1, 1)
    with pytest.raises(RleError):
        rle.from_brush([*brush[:6], 0], 4, 4)


@_SETTINGS
@given(st.lists(mask_batches(), min_size=1, max_size=4))
def test_batch_validation_parses_every_rle_like_one_at_a_time(batches: list[np.ndarray]) -> None:
    encoded = [r for masks in batches for r in rle.encode(masks)]
    assert rle.validate_many(encoded) == encoded
    masks = [m for batch in batches for m in batch]
    for mask, r in zip(masks, encoded, strict=True):
        np.testing.assert_array_equal(rle.counts_to_runs(r["counts"]), _runs(mask))


def test_batch_validation_names_the_bad_element() -> None:
    good = rle.encode(np.ones((3, 4, 5), dtype=bool))
    corrupt = [good[0], good[1], {"size": [4, 5], "counts": "0`"}]
    with pytest.raises(RleError, match=r"^masks\[2\]\.segmentation: counts ends"):
        rle.validate_many(corrupt, name="masks", suffix=".segmentation")
    short = [good[0], {"size": [4, 6], "counts": good[1]["counts"]}, good[2]]
    with pytest.raises(RleError, match=r"^rles\[1\]: counts sum to 20"):
        rle.validate_many(short)


@settings(max_examples=50, deadline=None)
@given(mask_batches())
def test_column_major_input_encodes_identically(masks: np.ndarray) -> None:
    column_major = np.ascontiguousarray(masks.transpose(0, 2, 1)).transpose(0, 2, 1)
    assert rle.encode(column_major) == rle.encode(masks)
    assert rle.encode(masks[:, ::-1, :]) == rle.encode(np.ascontiguousarray(masks[:, ::-1, :]))


def test_encoded_rles_are_revalidated_once_modified() -> None:
    import copy
    import json

    mask = np.zeros((1, 4, 5), dtype=bool)
    mask[0, 1:3, 2:4] = True
    encoded = rle.encode(mask)[0]
    assert rle.validate(encoded) == {"size": [4, 5], "counts": encoded["counts"]}
    assert json.loads(json.dumps(encoded)) == encoded
    assert rle.validate(copy.deepcopy(encoded)) == encoded
    encoded["size"][1] = 6  # the same counts no longer fit
    with pytest.raises(RleError, match="sum to 20"):
        rle.validate(encoded)
    encoded["size"][1] = 5
    encoded["counts"] = "0`"
    with pytest.raises(RleError, match="middle of a run"):
        rle.decode([encoded])


def test_area_and_bbox_of_more_than_255_masks() -> None:
    # pycocotools 2.0.11 counts area()'s input in a uint8; a stage-3 batch has hundreds of masks.
    masks = np.zeros((300, 8, 9), dtype=bool)
    masks[:, 2:5, 2:6] = True
    masks[299, 0, 0] = True
    rles = rle.encode(masks)
    areas = rle.area(rles)
    assert areas.shape == (300,)
    assert areas[0] == 12 and areas[299] == 13
    assert rle.to_bbox(rles)[299].tolist() == [0.0, 0.0, 6.0, 5.0]
