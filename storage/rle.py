"""COCO run-length encoding (RLE) for batches of binary masks, and Label Studio's brush RLE.

Format spec (the COCO one, as pycocotools writes it; this module never changes it):

- An RLE is a dict ``{"size": [h, w], "counts": str}``: ``size`` is [height, width] in pixels
  (height first), ``counts`` is an ASCII string.
- The mask is flattened in **column-major (Fortran) order**: pixel (row y, column x) is element
  ``x * h + y``. The runs alternate 0, 1, 0, 1, ... and **always start with zeros**, so the first
  run is 0 when pixel (0, 0) is foreground. The runs sum to ``h * w``.
- Compression (pycocotools' variant of LEB128): each run is written as 5-bit groups, least
  significant first, as the characters ``chr(48 + group)``; bit 0x20 of a group means "more
  groups follow" and bit 0x10 of the last group is the sign. From the fourth run on (index >= 3)
  the value stored is the difference to the run two places earlier, which makes the string
  shorter for smooth shapes.
- ``counts`` is ``str`` here and in every stored table; pycocotools speaks ``bytes``. This module
  is the one place that converts (along with the transposes pycocotools needs: it takes
  ``(H, W, N)`` Fortran-ordered ``uint8`` and returns the same).
- Masks in this project are boolean arrays ``(N, H, W)`` (C order); boxes are XYWH in pixels.

Label Studio's brush RLE is a different format: a list of byte values (0-255), a bit stream
run-length encoding the image **RGBA, row-major, 4 bytes per pixel** (spec in :mod:`storage.brush`,
whose numpy codec writes exactly the bytes ``label_studio_sdk.converter.brush`` writes, and reads
what it reads). Masks are written with 255 in every channel; when reading, the alpha channel
decides, with a pixel foreground when alpha >= 128 (the brush canvas can antialias edges).

Everything that reads an RLE validates it first (:func:`validate`), because pycocotools' C
decoder does not bounds-check counts: a corrupt string would write past its buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import numpy as np
from pycocotools import mask as _coco_mask

from storage import brush as _brush
from storage.errors import MaskFormatError, RleError

__all__ = [
    "Rle",
    "area",
    "counts_to_runs",
    "decode",
    "encode",
    "from_brush",
    "iou",
    "to_bbox",
    "to_brush",
    "validate",
    "validate_many",
]

# Alpha at or above this is foreground when reading Label Studio brush masks.
_BRUSH_ALPHA_THRESHOLD = 128
# A run fits in uint32 (pycocotools' `uint`); seven 5-bit groups are enough for that.
_MAX_GROUPS_PER_RUN = 7


class Rle(TypedDict):
    """A COCO RLE: ``size`` is [height, width] in pixels, ``counts`` the compressed string."""

    size: list[int]
    counts: str


def encode(masks: np.ndarray) -> list[Rle]:
    """Encode boolean masks ``(N, H, W)`` to COCO RLEs (one per mask, counts as ``str``).

    Any memory layout works. A C-ordered array (the usual) costs one transpose per mask; an
    array whose masks are column-major in memory (strides ``(H*W, 1, H)``, e.g.
    ``t.transpose(1, 2).contiguous().numpy().transpose(0, 2, 1)`` from a torch tensor ``t``) is
    handed to pycocotools without any copy. The RLEs returned are dicts that later validation
    skips while they are left unmodified.
    """
    _check_masks(masks)
    n, h, w = masks.shape
    if n == 0:
        return []
    as_bytes = masks.view(np.uint8)  # bool and uint8 share a layout (0/1)
    if as_bytes.transpose(0, 2, 1).flags.c_contiguous:
        # Already (H, W, N) Fortran-ordered once the axes are moved: zero-copy.
        encoded = _coco_mask.encode(as_bytes.transpose(1, 2, 0))
        return [_trusted(h, w, r["counts"].decode("ascii")) for r in encoded]
    # pycocotools wants (H, W) in Fortran order, i.e. the mask transposed in C order. One
    # reused buffer per batch: the transpose stays in cache and no N-mask copy is allocated.
    transposed = np.empty((w, h), dtype=np.uint8)
    out: list[Rle] = []
    for mask in as_bytes:
        _transpose_into(mask, transposed)
        counts = _coco_mask.encode(transposed.T[:, :, None])[0]["counts"]
        out.append(_trusted(h, w, counts.decode("ascii")))
    return out


def decode(rles: Sequence[Rle]) -> np.ndarray:
    """Decode COCO RLEs of one size to a boolean array ``(N, H, W)``.

    Raises :class:`RleError` for a corrupt RLE or RLEs of different sizes. An empty sequence
    gives an array of shape ``(0, 0, 0)``.
    """
    if len(rles) == 0:
        return np.zeros((0, 0, 0), dtype=bool)
    coco = _to_coco(rles, "rles")
    h, w = coco[0]["size"]
    if h * w == 0:
        return np.zeros((len(coco), h, w), dtype=bool)
    # pycocotools gives (H, W, N) Fortran, i.e. (N, W, H) in C order: one transpose-copy.
    decoded = _coco_mask.decode(coco)
    return _swap_last_axes(decoded.transpose(2, 1, 0)).view(bool)


def area(rles: Sequence[Rle]) -> np.ndarray:
    """Foreground pixel count of each RLE, ``int64`` of shape ``(N,)``."""
    if len(rles) == 0:
        return np.zeros(0, dtype=np.int64)
    return _coco_area(_to_coco(rles, "rles", same_size=False))


def to_bbox(rles: Sequence[Rle]) -> np.ndarray:
    """Tight boxes ``(N, 4)`` float32, XYWH in pixels ([0, 0, 0, 0] for an empty mask)."""
    if len(rles) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    boxes = _coco_mask.toBbox(_to_coco(rles, "rles", same_size=False))
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def iou(a: Sequence[Rle], b: Sequence[Rle]) -> np.ndarray:
    """Mask IoU of every pair, float64 ``(len(a), len(b))``; all RLEs must share one size.

    Two empty masks have IoU 0 (pycocotools' convention).
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    coco_a = _to_coco(a, "a")
    coco_b = _to_coco(b, "b")
    if coco_a[0]["size"] != coco_b[0]["size"]:
        raise RleError(
            f"iou: a has size {coco_a[0]['size']} but b has size {coco_b[0]['size']}; "
            "expected masks of one image size"
        )
    result = _coco_mask.iou(coco_a, coco_b, [0] * len(coco_b))
    return np.asarray(result, dtype=np.float64).reshape(len(a), len(b))


def validate(rle: Any, *, name: str = "rle") -> Rle:
    """Check an RLE and return it normalised to ``{"size": [h, w], "counts": str}``.

    Accepts counts as ``str`` or ``bytes`` (compressed) or a list of ints (COCO's uncompressed
    form, which is compressed on the way). Raises :class:`RleError` naming ``name`` when the
    size is not two non-negative ints, the counts string is corrupt, a run is negative or too
    large, or the runs do not sum to ``h * w``.
    """
    return _validate_all([rle], lambda _: name)[0]


def validate_many(rles: Sequence[Any], *, name: str = "rles", suffix: str = "") -> list[Rle]:
    """:func:`validate` for a batch in one vectorised pass; errors name ``f"{name}[i]{suffix}"``."""
    return _validate_all(rles, lambda i: f"{name}[{i}]{suffix}")


def counts_to_runs(counts: str, *, name: str = "rle") -> np.ndarray:
    """Parse a compressed counts string into its runs (int64, zeros first), vectorised.

    Raises :class:`RleError` for characters outside the alphabet, a string that ends in the
    middle of a run, a run longer than seven groups, or a negative run.
    """
    if not isinstance(counts, str):
        raise RleError(f"{name}: counts is {type(counts).__name__}; expected a str")
    runs, _ = _parse_counts([counts], lambda _: name)
    return runs


def _validate_all(rles: Sequence[Any], label: Callable[[int], str]) -> list[Rle]:
    out: list[Rle] = []
    sizes: list[tuple[int, int]] = []
    strings: list[str] = []
    unchecked: list[int] = []  # positions in `out` whose counts must be parsed
    for i, rle in enumerate(rles):
        if _is_untouched(rle):
            out.append(rle)
            continue
        h, w = _check_size(rle, label(i))
        counts = _counts_string(rle.get("counts"), h, w, label(i))
        out.append({"size": [h, w], "counts": counts})
        sizes.append((h, w))
        strings.append(counts)
        unchecked.append(i)
    if not unchecked:
        return out
    runs, owner = _parse_counts(strings, lambda j: label(unchecked[j]))
    # Exact in float64: every sum is at most h * w < 2**53.
    totals = np.bincount(owner, weights=runs, minlength=len(strings))
    expected = np.array([h * w for h, w in sizes], dtype=np.float64)
    wrong = np.flatnonzero(totals != expected)
    if wrong.size:
        j = int(wrong[0])
        h, w = sizes[j]
        raise RleError(
            f"{label(unchecked[j])}: counts sum to {int(totals[j])} pixels; "
            f"expected h*w = {h}*{w} = {h * w}"
        )
    return out


class _EncodedRle(dict[str, Any]):
    """An RLE :func:`encode` produced. It is a plain dict to everyone else; validation skips
    it while its ``counts`` is still the very string encode made (strings are immutable, so
    identity means unchanged) and its ``size`` is unchanged. Copies are validated as usual.
    """

    __slots__ = ("_counts", "_size")
    _counts: str
    _size: tuple[int, int]


def _trusted(h: int, w: int, counts: str) -> Rle:
    rle = _EncodedRle(size=[h, w], counts=counts)
    rle._counts = counts
    rle._size = (h, w)
    return rle  # type: ignore[return-value]


def _is_untouched(rle: Any) -> bool:
    if type(rle) is not _EncodedRle:
        return False
    counts = getattr(rle, "_counts", None)
    size = getattr(rle, "_size", None)
    if counts is None or size is None:
        return False
    return rle.get("counts") is counts and rle.get("size") == [size[0], size[1]]


def _counts_string(counts: Any, h: int, w: int, name: str) -> str:
    """The compressed counts of one RLE as ``str`` (compressing COCO's uncompressed lists)."""
    if isinstance(counts, str):
        return counts
    if isinstance(counts, bytes):
        try:
            return counts.decode("ascii")
        except UnicodeDecodeError:
            raise RleError(f"{name}: counts bytes are not ASCII; expected a COCO RLE") from None
    if isinstance(counts, list | tuple | np.ndarray):
        runs = _check_run_list(counts, name)
        _check_sum(runs, h, w, name)
        coco = _coco_mask.frPyObjects({"size": [h, w], "counts": [int(c) for c in runs]}, h, w)
        return str(coco["counts"].decode("ascii"))
    raise RleError(
        f"{name}: counts is {type(counts).__name__}; expected a str, bytes or list of ints"
    )


def _parse_counts(
    strings: Sequence[str], label: Callable[[int], str]
) -> tuple[np.ndarray, np.ndarray]:
    """Runs of many compressed counts strings at once, and the index of the string of each run.

    One numpy pass over the concatenated characters: checking a batch costs about as much as
    checking one string, which keeps validation off the write path's profile.
    """
    joined = "".join(strings)
    if not joined.isascii():
        i = next(i for i, s in enumerate(strings) if not s.isascii())
        raise RleError(f"{label(i)}: counts has non-ASCII characters; expected a COCO RLE")
    if not joined:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=len(strings))
    char_owner = np.repeat(np.arange(len(strings)), lengths)
    codes = np.frombuffer(joined.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    bad = (codes < 0) | (codes > 63)
    if bad.any():
        i = int(char_owner[np.argmax(bad)])
        raise RleError(f"{label(i)}: counts has characters outside '0'..'o'; expected a COCO RLE")
    more = (codes & 0x20) != 0
    last_chars = np.cumsum(lengths)[lengths > 0] - 1
    truncated = more[last_chars]
    if truncated.any():
        i = int(char_owner[last_chars[np.argmax(truncated)]])
        raise RleError(f"{label(i)}: counts ends in the middle of a run; the string is truncated")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    groups = ends - starts + 1
    if groups.max() > _MAX_GROUPS_PER_RUN:
        i = int(char_owner[ends[np.argmax(groups > _MAX_GROUPS_PER_RUN)]])
        raise RleError(f"{label(i)}: counts has a run longer than 32 bits; the string is corrupt")
    # Each character holds 5 bits of its run, least significant group first.
    run_of_char = np.repeat(np.arange(ends.size), groups)
    shift = 5 * (np.arange(codes.size) - starts[run_of_char])
    values = np.add.reduceat((codes & 0x1F) << shift, starts)
    negative = (codes[ends] & 0x10) != 0
    values[negative] -= np.int64(1) << (5 * groups[negative])
    owner = char_owner[ends]
    runs = _undo_delta(values, owner, len(strings))
    bad = (runs < 0) | (runs >= 2**32)
    if bad.any():
        i = int(owner[np.argmax(bad)])
        raise RleError(f"{label(i)}: counts decodes to a run outside 0..2^32-1; it is corrupt")
    return runs, owner


def _undo_delta(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Runs from index 3 on are stored as the difference to the run two places earlier.

    Within each string that makes two chains (runs 1, 3, 5, ... and runs 2, 4, 6, ...) whose
    running sums are the runs; computed for all strings at once as segmented cumulative sums.
    """
    first_run = np.searchsorted(owner, np.arange(n))
    index = np.arange(values.size) - first_run[owner]
    runs = values.copy()
    for parity, first in ((1, 1), (0, 2)):
        chain = np.flatnonzero((index >= first) & ((index & 1) == parity))
        if chain.size == 0:
            continue
        chain_values = values[chain]
        total = np.cumsum(chain_values)
        seg_starts = np.concatenate(([0], np.flatnonzero(np.diff(owner[chain])) + 1))
        seg_lengths = np.diff(np.concatenate((seg_starts, [chain.size])))
        before = total[seg_starts] - chain_values[seg_starts]
        runs[chain] = total - np.repeat(before, seg_lengths)
    return runs


def to_brush(rle: Rle) -> list[int]:
    """Convert a COCO RLE to Label Studio brush RLE (list of byte values, RGBA all 255).

    The bytes are those of the SDK's ``mask2rle(mask * 255)`` (:func:`storage.brush.encode_mask`;
    :func:`storage.brush.sdk_encode_mask` is the SDK itself, the reference).
    """
    return _brush.encode_mask(decode([validate(rle)])[0])


def from_brush(brush_rle: Sequence[int], height: int, width: int) -> Rle:
    """Convert Label Studio brush RLE of an image ``height`` x ``width`` pixels to a COCO RLE.

    Foreground is alpha >= 128. Raises :class:`RleError` when the brush data is corrupt or does
    not hold exactly ``height * width`` RGBA pixels.
    """
    if height < 0 or width < 0:
        raise RleError(f"from_brush: size {height}x{width}; expected non-negative height, width")
    if not isinstance(brush_rle, Sequence | np.ndarray) or len(brush_rle) < 7:
        raise RleError("from_brush: brush RLE must be a list of at least 7 byte values")
    data = np.asarray(brush_rle)
    if data.dtype.kind not in "iu" or data.min() < 0 or data.max() > 255:
        raise RleError("from_brush: brush RLE must hold ints in 0..255")
    data = data.astype(np.uint8)
    # The header's first 32 bits give the number of values; check it before decoding so a
    # corrupt header cannot make the decoder allocate gigabytes.
    expected = height * width * 4
    declared = int.from_bytes(data[:4].tobytes(), "big")
    if declared != expected:
        raise RleError(
            f"from_brush: brush RLE holds {declared} values; expected {expected} "
            f"(RGBA for {height}x{width} pixels)"
        )
    try:
        flat = _brush.decode(data)
    except RleError as err:
        raise RleError(f"from_brush: corrupt brush RLE ({err})") from None
    alpha = flat.reshape(height, width, 4)[:, :, 3]
    return encode((alpha >= _BRUSH_ALPHA_THRESHOLD)[None])[0]


def _area_and_bbox_of_valid(rles: Sequence[Rle]) -> tuple[np.ndarray, np.ndarray]:
    """Areas (int64) and XYWH boxes (float32) of RLEs that already passed :func:`validate`.

    For the store's write path, which validates each RLE once and must not pay for it twice.
    """
    if len(rles) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.float32)
    coco = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    areas = _coco_area(coco)
    boxes = np.asarray(_coco_mask.toBbox(coco), dtype=np.float32).reshape(-1, 4)
    return areas, boxes


# pycocotools' area() counts its input in a uint8 (2.0.11: OverflowError above 255 RLEs).
_COCO_AREA_CHUNK = 255


def _coco_area(coco: list[dict[str, Any]]) -> np.ndarray:
    """pycocotools' area for any number of RLEs, in chunks it can count; ``int64`` ``(N,)``."""
    parts = [
        np.asarray(_coco_mask.area(coco[i : i + _COCO_AREA_CHUNK]), dtype=np.int64).reshape(-1)
        for i in range(0, len(coco), _COCO_AREA_CHUNK)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _swap_last_axes(arrays: np.ndarray) -> np.ndarray:
    """Copy ``(N, A, B)`` uint8 into a new C-ordered ``(N, B, A)`` array."""
    n, a, b = arrays.shape
    out = np.empty((n, b, a), dtype=np.uint8)
    for i in range(n):
        _transpose_into(arrays[i], out[i])
    return out


def _transpose_into(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[...] = src.T`` for 2-D uint8, ``dst`` C-contiguous.

    The transpose costs more than pycocotools' encoding itself (about 1.6 ms against 0.45 ms
    for a 1024x1024 mask with numpy's strided copy), so OpenCV's cache-blocked transpose is
    used when available (about 0.2 ms); numpy is the fallback.
    """
    cv2 = _opencv()
    if cv2 is None or src.size == 0:
        np.copyto(dst, src.T)
        return
    if not src.flags.c_contiguous:
        src = np.ascontiguousarray(src)
    cv2.transpose(src, dst)


@functools.cache
def _opencv() -> Any:
    try:
        import cv2
    except ImportError:  # opencv is a project dependency, but storage must not need it
        return None
    return cv2


def _check_masks(masks: Any) -> None:
    if not isinstance(masks, np.ndarray):
        raise MaskFormatError(f"masks is {type(masks).__name__}; expected a numpy bool array")
    if masks.ndim != 3:
        raise MaskFormatError(f"masks has shape {masks.shape}; expected (N, H, W)")
    if masks.dtype != np.bool_:
        raise MaskFormatError(
            f"masks has dtype {masks.dtype}; expected bool (threshold first, e.g. logits > 0)"
        )


def _check_size(rle: Any, name: str) -> tuple[int, int]:
    if not isinstance(rle, dict):
        raise RleError(f"{name}: is {type(rle).__name__}; expected a dict with size and counts")
    size = rle.get("size")
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(s, int | np.integer) and not isinstance(s, bool) for s in size)
        or min(size) < 0
    ):
        raise RleError(f"{name}: size is {size!r}; expected [height, width] as non-negative ints")
    return int(size[0]), int(size[1])


def _check_run_list(counts: Any, name: str) -> np.ndarray:
    runs = np.asarray(counts)
    if runs.ndim != 1 or (runs.size and runs.dtype.kind not in "iu"):
        raise RleError(f"{name}: uncompressed counts must be a flat list of ints")
    runs = runs.astype(np.int64)
    if runs.size and (runs.min() < 0 or runs.max() >= 2**32):
        raise RleError(f"{name}: uncompressed counts has a run outside 0..2^32-1")
    return runs


def _check_sum(runs: np.ndarray, h: int, w: int, name: str) -> None:
    total = int(runs.sum())
    if total != h * w:
        raise RleError(f"{name}: counts sum to {total} pixels; expected h*w = {h}*{w} = {h * w}")


def _to_coco(rles: Sequence[Any], name: str, *, same_size: bool = True) -> list[dict[str, Any]]:
    """Validate RLEs and give pycocotools' form (counts as bytes)."""
    checked = validate_many(rles, name=name)
    out = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in checked]
    if same_size:
        first = out[0]["size"]
        for i, rle in enumerate(out):
            if rle["size"] != first:
                raise RleError(
                    f"{name}[{i}]: size {rle['size']} differs from {name}[0]'s {first}; "
                    "expected RLEs of one image size"
                )
    return out
