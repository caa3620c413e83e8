"""Point grids, crop boxes, mask boxes and the crop-edge test against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.amg.boxes import masks_to_boxes_xyxy, xyxy_inclusive_to_xywh
from engine.amg.crops import box_near_crop_edge, crop_box_xywh, generate_crop_boxes
from engine.amg.point_grids import build_all_layer_point_grids, build_point_grid
from storage import rle
from storage.errors import ConfigError


@pytest.mark.parametrize("n", [1, 2, 5, 32])
def test_point_grid_is_cell_centres_x_fastest(n: int) -> None:
    grid = build_point_grid(n)
    expected = [((col + 0.5) / n, (row + 0.5) / n) for row in range(n) for col in range(n)]
    np.testing.assert_allclose(grid, np.array(expected), rtol=0, atol=1e-12)


def test_layer_grids_shrink_by_the_factor() -> None:
    grids = build_all_layer_point_grids(32, 2, 2)
    assert [len(g) for g in grids] == [32 * 32, 16 * 16, 8 * 8]
    assert [len(g) for g in build_all_layer_point_grids(7, 2, 2)] == [49, 9, 1]


def test_layer_grids_refuse_layers_without_points() -> None:
    with pytest.raises(ConfigError, match="no points"):
        build_all_layer_point_grids(3, 2, 2)
    with pytest.raises(ConfigError):
        build_point_grid(0)


def _brute_force_crops(h: int, w: int, layers: int, ratio: float) -> list[list[int]]:
    """Layer i: n = 2**i crops per side of the smallest length L with n*L - (n-1)*overlap >= side,
    starting every L - overlap pixels, clipped to the image."""
    boxes = [[0, 0, w, h]]
    for layer in range(1, layers + 1):
        n = 2**layer
        overlap = int(ratio * min(h, w) * 2 / n)
        lengths = []
        for side in (w, h):
            length = 1
            while n * length - (n - 1) * overlap < side:
                length += 1
            lengths.append(length)
        cw, ch = lengths
        for i in range(n):
            for j in range(n):
                x0, y0 = (cw - overlap) * i, (ch - overlap) * j
                if x0 < w and y0 < h:  # a crop past the edge would be empty
                    boxes.append([x0, y0, min(x0 + cw, w), min(y0 + ch, h)])
    return boxes


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(16, 3000),
    w=st.integers(16, 3000),
    layers=st.integers(0, 3),
    ratio=st.sampled_from([0.0, 0.1, 512 / 1500, 0.5]),
)
def test_crop_boxes_match_brute_force_and_cover_the_image(
    h: int, w: int, layers: int, ratio: float
) -> None:
    boxes, layer_of = generate_crop_boxes((h, w), layers, ratio)
    assert boxes == _brute_force_crops(h, w, layers, ratio)
    assert layer_of == sorted(layer_of) and layer_of[0] == 0 and len(layer_of) == len(boxes)
    if min(h, w) >= 2**layers * 8:  # room for every crop: 4**i of them in layer i
        assert layer_of == [0] + [i for i in range(1, layers + 1) for _ in range(4**i)]
    for layer in range(1, layers + 1):
        covered = np.zeros((h, w), dtype=bool)
        for box, lay in zip(boxes, layer_of, strict=True):
            if lay == layer:
                x0, y0, x1, y1 = box
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
                covered[y0:y1, x0:x1] = True
        assert covered.all()


def test_crop_boxes_of_a_known_image() -> None:
    boxes, _ = generate_crop_boxes((683, 1024), 1, 512 / 1500)
    overlap = int(512 / 1500 * 683)  # 233
    cw = math.ceil((1024 + overlap) / 2)
    ch = math.ceil((683 + overlap) / 2)
    assert boxes[1] == [0, 0, cw, ch]
    assert boxes[4] == [cw - overlap, ch - overlap, 1024, 683]
    assert crop_box_xywh(boxes[4]) == [
        cw - overlap,
        ch - overlap,
        1024 - cw + overlap,
        683 - ch + overlap,
    ]


def test_crop_boxes_refuse_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        generate_crop_boxes((10, 10), -1, 0.3)
    with pytest.raises(ConfigError):
        generate_crop_boxes((10, 10), 1, 1.5)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_mask_boxes_match_nonzero_extent(data: st.DataObject) -> None:
    n, h, w = (
        data.draw(st.integers(1, 4)),
        data.draw(st.integers(1, 12)),
        data.draw(st.integers(1, 12)),
    )
    seed = data.draw(st.integers(0, 2**31))
    masks = np.random.default_rng(seed).random((n, h, w)) < data.draw(st.floats(0, 0.3))
    boxes = masks_to_boxes_xyxy(masks)
    for mask, box in zip(masks, boxes, strict=True):
        ys, xs = np.nonzero(mask)
        expected = [xs.min(), ys.min(), xs.max(), ys.max()] if xs.size else [0, 0, 0, 0]
        assert box.tolist() == [int(v) for v in expected]
    # The stored bbox (of a non-empty mask) is pycocotools' tight box.
    filled = masks.any(axis=(1, 2))
    xywh = xyxy_inclusive_to_xywh(boxes[filled])
    np.testing.assert_array_equal(xywh, rle.to_bbox(rle.encode(masks[filled])))


def test_box_near_crop_edge_matches_per_side_definition() -> None:
    rng = np.random.default_rng(3)
    image_box = [0, 0, 400, 300]
    crop = [100, 50, 300, 250]
    boxes = rng.integers(0, 400, size=(500, 4))
    got = box_near_crop_edge(boxes, crop, image_box)
    for box, flag in zip(boxes, got, strict=True):
        expected = any(
            abs(box[s] - crop[s]) <= 20 and not abs(box[s] - image_box[s]) <= 20 for s in range(4)
        )
        assert flag == expected
    # The whole image as the crop: nothing is an inner edge.
    assert not box_near_crop_edge(boxes, image_box, image_box).any()
