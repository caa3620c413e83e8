"""JSON responses of the ML backend, with brush RLEs written by numpy.

A brush region's ``value.rle`` is a list of byte values, several hundred thousand of them for a
ragged 1024x768 mask. ``json.dumps`` spends about 100 ns on each int (25-70 ms a click), and
FastAPI's ``jsonable_encoder``, which a route returning a dict goes through, several times that.
:class:`PredictionResponse` writes those lists from a table of the 256 byte values' digits
instead, and everything else with ``json.dumps``; the bytes are the same as
``JSONResponse(content)``'s.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse

__all__ = ["PredictionResponse", "render_json"]


def _digits_table() -> np.ndarray:
    """Row v: the ASCII text of ``v`` followed by a comma, zero-padded to 4 bytes."""
    table = np.zeros((256, 4), dtype=np.uint8)
    for value in range(256):
        text = f"{value},".encode("ascii")
        table[value, : len(text)] = np.frombuffer(text, dtype=np.uint8)
    return table.view(np.uint32).reshape(256)


_DIGITS = _digits_table()


class PredictionResponse(JSONResponse):
    """A ``JSONResponse`` rendered by :func:`render_json`."""

    def render(self, content: Any) -> bytes:
        return render_json(content)


def render_json(content: Any) -> bytes:
    """``content`` (plain JSON types) as compact UTF-8 JSON, exactly as ``JSONResponse`` writes
    it. The ``rle`` list of each dict with ``"format": "rle"`` (a brush value) must hold ints
    0..255 only (not bools); other lists go through ``json.dumps``."""
    marker = f"brush-rle-{secrets.token_hex(16)}-"
    arrays: list[bytes] = []
    swapped = _swap_brush(content, marker, arrays)
    text = json.dumps(
        swapped, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")
    if not arrays:
        return text
    # The markers are JSON strings "<marker><i>"; split keeps each index between the pieces.
    pieces = re.split(rb'"' + re.escape(marker.encode("ascii")) + rb'(\d+)"', text)
    out = [pieces[0]]
    for i in range(1, len(pieces), 2):
        out.append(arrays[int(pieces[i])])
        out.append(pieces[i + 1])
    return b"".join(out)


def _swap_brush(obj: Any, marker: str, arrays: list[bytes]) -> Any:
    """A copy of ``obj`` with each brush ``rle`` list replaced by ``marker + index`` and its
    JSON text appended to ``arrays``."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            rendered = None
            if key == "rle" and obj.get("format") == "rle" and isinstance(value, list):
                rendered = _byte_list_json(value)
            if rendered is not None:
                out[key] = f"{marker}{len(arrays)}"
                arrays.append(rendered)
            else:
                out[key] = _swap_brush(value, marker, arrays)
        return out
    if isinstance(obj, list | tuple):
        return [_swap_brush(item, marker, arrays) for item in obj]
    return obj


def _byte_list_json(values: list[Any]) -> bytes | None:
    """``json.dumps(values)`` for a list of ints 0..255, or None for any other list."""
    try:
        data = bytes(values)  # C speed; raises for anything but ints (or bools) 0..255
    except (TypeError, ValueError):
        return None
    body = _DIGITS[np.frombuffer(data, dtype=np.uint8)].tobytes().translate(None, b"\x00")
    return b"[" + body[:-1] + b"]"
