"""The backend's JSON rendering writes the same bytes as FastAPI's ``JSONResponse``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotation_ui.ml_backend.responses import PredictionResponse, render_json
from storage import brush

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_byte_lists = st.lists(st.integers(0, 255), max_size=300)
# Lists under a brush value's "rle" that are not byte lists must still come out as json.dumps.
_other_rles = st.one_of(
    st.lists(st.integers(-5, 600), max_size=20), st.lists(st.text(max_size=3), max_size=5)
)


@st.composite
def regions(draw: st.DrawFn) -> dict[str, Any]:
    rle = draw(st.one_of(_byte_lists, _other_rles))
    value = {"format": draw(st.sampled_from(["rle", "other"])), "rle": rle, "brushlabels": ["ä"]}
    return {"id": draw(st.text(max_size=8)), "type": "brushlabels", "value": value}


_json = st.recursive(
    st.one_of(_scalars, regions()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@_SETTINGS
@given(_json)
def test_render_json_writes_the_bytes_jsonresponse_writes(content: Any) -> None:
    assert render_json(content) == JSONResponse(content).body


def test_a_prediction_with_large_brush_rles_renders_like_jsonresponse() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((97, 131)) < 0.3
    rle = brush.encode_mask(mask)
    region = {"id": "a", "value": {"format": "rle", "rle": rle, "brushlabels": ["object"]}}
    content = {"results": [{"result": [region, region], "score": 0.5}], "model_version": "v1"}
    body = PredictionResponse(content).body
    assert body == JSONResponse(content).body
    assert json.loads(body)["results"][0]["result"][1]["value"]["rle"] == rle
    # A string equal to a marker's prefix is just a string.
    tricky = {"value": {"format": "rle", "rle": [1, 2]}, "text": '"brush-rle-0"'}
    assert render_json(tricky) == JSONResponse(tricky).body
