"""Label Studio's brush RLE, encoded and decoded with numpy.

Format spec (the bit stream of thi.ng's ``rle-pack``, which Label Studio's brush tool and
``label_studio_sdk.converter.brush`` read and write). Bits are packed most significant first into
bytes; every field is an unsigned big-endian integer.

- Header, 53 bits: ``num`` (32 bits, the number of values), ``word_size - 1`` (5 bits), then four
  run-length field widths, each as ``width - 1`` (4 bits).
- Then tokens until ``num`` values are produced. A token is a flag bit, a 2-bit index ``k`` into
  the four widths, and a count field ``c`` of that width, covering ``c + 1`` values: with the
  flag set, one ``word_size``-bit value repeated ``c + 1`` times; with it clear, ``c + 1``
  literal values of ``word_size`` bits each.
- The stream ends with zero bits up to a byte boundary. The SDK's encoder always adds at least
  one bit, so a stream that fills its last byte exactly gets a whole zero byte more.

The SDK's encoder (``encode_rle`` with its defaults; :func:`encode` here) writes word size 8 and
widths (3, 4, 8, 16), and chooses each run's token from the run's length ``L``:

====================  ==================================================================
``L == 1``            flag 0, ``k = 0``, count 0, the value (14 bits)
``2 <= L <= 8``       flag 1, ``k = 0``, 3-bit count (14 bits)
``9 <= L <= 16``      flag 1, ``k = 1``, 4-bit count (15 bits)
``17 <= L <= 256``    flag 1, ``k = 2``, 8-bit count (19 bits)
``L > 256``           flag 1, ``k = 3``, 16-bit count (27 bits) for every chunk: 65536 values
                      per chunk, the rest (1..65536) in the last one
====================  ==================================================================

A brush mask is an RGBA image, row-major, 4 values per pixel (:func:`encode_mask` repeats each
pixel of a grayscale mask four times, as the SDK's ``mask2rle`` does).

The SDK's converter is pure Python over every bit (about 0.4 s for a 1024x768 mask); this module
produces byte-identical output (property-tested against it in ``tests/storage/test_brush.py``) in
well under a millisecond for masks of a few thousand runs. The SDK stays the reference:
:func:`sdk_encode_mask` and :func:`sdk_decode` call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from storage.errors import MaskFormatError, RleError

__all__ = ["decode", "encode", "encode_mask", "sdk_decode", "sdk_encode_mask"]

# The SDK encoder's parameters: 8-bit words and these count-field widths (k = 0..3).
_WORD_BITS = 8
_COUNT_BITS = (3, 4, 8, 16)
_COUNT_BITS_ARRAY = np.array(_COUNT_BITS, dtype=np.int64)
_HEADER_BITS = 32 + 5 + 4 * len(_COUNT_BITS)
# The header's fields after `num` (32 bits): word size - 1, then each count width - 1.
_HEADER_WIDTHS = np.array([32, 5, *(4 for _ in _COUNT_BITS)], dtype=np.int64)
_HEADER_CODES = np.array([_WORD_BITS - 1, *(b - 1 for b in _COUNT_BITS)], dtype=np.int64)
# Longest run one 16-bit count token covers.
_CHUNK = 1 << _COUNT_BITS[-1]
_MAX_VALUES = (1 << 32) - 1
# Values a brush mask gives each pixel (RGBA).
_CHANNELS = 4


def encode(values: np.ndarray) -> list[int]:
    """Brush RLE of a flat ``uint8`` array: bytes (ints 0..255) identical to the SDK's
    ``encode_rle(values)``.

    An empty array gives the 7-byte header of zero values (the SDK's encoder fails on it).
    Raises :class:`MaskFormatError` for another dtype or shape, or more than 2**32 - 1 values.
    """
    if not isinstance(values, np.ndarray) or values.dtype != np.uint8 or values.ndim != 1:
        raise MaskFormatError(f"values must be a 1-D uint8 numpy array, got {_describe(values)}")
    starts, lengths = _runs(values)
    return _pack(values.size, lengths, values[starts])


def encode_mask(mask: np.ndarray) -> list[int]:
    """Brush RLE of a 2-D mask ``(H, W)``: each pixel becomes 4 equal RGBA values, row-major.

    ``mask`` is ``uint8`` (the values written; identical to the SDK's ``mask2rle(mask)``) or
    ``bool`` (written as 255 and 0, identical to ``mask2rle(mask.astype(np.uint8) * 255)``).
    Raises :class:`MaskFormatError` for another dtype or shape.
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype not in (np.bool_, np.uint8):
        raise MaskFormatError(
            f"mask must be a 2-D bool or uint8 numpy array, got {_describe(mask)}"
        )
    pixels = mask.reshape(-1)  # row-major, as the SDK's ravel()
    starts, lengths = _runs(pixels)
    run_values = pixels[starts]
    if mask.dtype == np.bool_:
        run_values = run_values.astype(np.uint8) * np.uint8(255)
    # A pixel run of n is a value run of 4n: the 4x repeated array is never built.
    return _pack(_CHANNELS * pixels.size, _CHANNELS * lengths, run_values)


def decode(data: bytes | Sequence[int] | np.ndarray) -> np.ndarray:
    """The flat ``uint8`` values of a brush RLE stream; equal to the SDK's ``decode_rle`` for any
    stream it reads correctly (any word size, any count widths, literal tokens).

    Raises :class:`RleError` when the stream ends inside a token or the header, a literal token
    runs past ``num`` values, a value is above 255, or a byte is outside 0..255.
    (Where the SDK reads a truncated last field as a shorter number, this raises.)
    """
    raw = _as_bytes(data)
    bits = (np.unpackbits(raw) + ord("0")).tobytes().decode("ascii")
    if len(bits) < _HEADER_BITS:
        raise RleError(f"brush RLE of {raw.size} bytes is shorter than its 7-byte header")
    num = int(bits[0:32], 2)
    word = int(bits[32:37], 2) + 1
    widths = [int(bits[37 + 4 * k : 41 + 4 * k], 2) + 1 for k in range(4)]
    field_at, field_count, field_repeat = _parse_tokens(bits, num, word, widths)
    values = _read_fields(raw, field_at, field_count, word)
    repeats = np.repeat(np.asarray(field_repeat, dtype=np.int64), field_count)
    out = np.repeat(values, repeats)[:num]  # a repeat token may overrun num; the SDK clips it
    return np.ascontiguousarray(out)


def sdk_encode_mask(mask: np.ndarray) -> list[int]:
    """The reference: Label Studio SDK's ``mask2rle`` (bool masks as 255/0), as ints."""
    from label_studio_sdk.converter import brush

    values = mask.astype(np.uint8) * np.uint8(255) if mask.dtype == np.bool_ else mask
    return [int(v) for v in brush.mask2rle(values)]


def sdk_decode(data: bytes | Sequence[int]) -> np.ndarray:
    """The reference: Label Studio SDK's ``decode_rle``."""
    from label_studio_sdk.converter import brush

    return np.asarray(brush.decode_rle(bytes(data)))


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length (int64) of each run of equal values of a 1-D array."""
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.append(starts, flat.size))
    return starts, lengths


def _pack(num: int, lengths: np.ndarray, run_values: np.ndarray) -> list[int]:
    """The SDK's stream for runs ``lengths`` of ``run_values`` (``num`` values in all)."""
    if num > _MAX_VALUES:
        raise MaskFormatError(f"{num} values do not fit the brush RLE's 32-bit length field")
    widths, codes = _tokens(lengths, run_values)
    widths = np.concatenate((_HEADER_WIDTHS, widths))
    codes = np.concatenate(([num], _HEADER_CODES, codes)).astype(np.uint64)
    offsets = np.cumsum(widths) - widths
    total_bits = int(offsets[-1] + widths[-1])
    # Write the stream as big-endian 32-bit words. A field (at most 32 bits) starting at bit
    # r = offset % 32 of word offset // 32 is moved to the top of a 64-bit window over that word
    # and the next; the window's halves are the parts of the two words. Fields never share bits,
    # so summing the parts (exact in float64: every word is below 2**32) is or-ing them.
    window = codes << (64 - (offsets & 31) - widths).astype(np.uint64)
    word = offsets >> 5
    n_words = total_bits // 32 + 2
    words = np.bincount(
        word, weights=(window >> np.uint64(32)).astype(np.float64), minlength=n_words
    )
    words += np.bincount(
        word + 1, weights=(window & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=n_words
    )
    stream = words.astype(">u4").view(np.uint8)
    # The SDK pads with 8 - (bits % 8) zero bits: a whole zero byte when the bits fill bytes.
    result: list[int] = stream[: total_bits // 8 + 1].tolist()
    return result


def _tokens(lengths: np.ndarray, run_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit width and code (right-aligned) of every token of the runs, both int64."""
    # Index k of the count width; the kind follows the whole run's length, also for the last
    # chunk of a run longer than 65536 values.
    k = (lengths > 8).astype(np.int64)
    k += lengths > 16
    k += lengths > 256
    flag = (lengths > 1).astype(np.int64)
    values = run_values.astype(np.int64)
    counts = lengths
    if lengths.size and lengths.max() > _CHUNK:
        chunks = (lengths - 1) // _CHUNK + 1
        run = np.repeat(np.arange(lengths.size), chunks)
        first = np.cumsum(chunks) - chunks
        last = np.arange(run.size) - first[run] == chunks[run] - 1
        counts = np.where(last, lengths[run] - (chunks[run] - 1) * _CHUNK, _CHUNK)
        k, flag, values = k[run], flag[run], values[run]
    count_bits = _COUNT_BITS_ARRAY[k]
    widths = count_bits + (3 + _WORD_BITS)
    codes = (
        (flag << (widths - 1))
        | (k << (count_bits + _WORD_BITS))
        | ((counts - 1) << _WORD_BITS)
        | values
    )
    return widths, codes


def _parse_tokens(
    bits: str, num: int, word: int, widths: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """Walk the tokens after the header (a sequential format: each token's length depends on
    its own first bits). Returns, per token, the bit offset of its first value field, how many
    value fields it has, and how often each is repeated. Values are read later, all at once."""
    field_at: list[int] = []
    field_count: list[int] = []
    field_repeat: list[int] = []
    end = len(bits)
    pos = _HEADER_BITS
    i = 0
    while i < num:
        if pos + 3 > end:
            raise RleError(f"brush RLE ends inside a token header at bit {pos} ({i} of {num})")
        width = widths[int(bits[pos + 1 : pos + 3], 2)]
        if pos + 3 + width > end:
            raise RleError(f"brush RLE ends inside a count at bit {pos} ({i} of {num} values)")
        n = int(bits[pos + 3 : pos + 3 + width], 2) + 1
        repeated = bits[pos] == "1"
        pos += 3 + width
        fields = 1 if repeated else n
        if pos + fields * word > end:
            raise RleError(f"brush RLE ends inside a value at bit {pos} ({i} of {num} values)")
        if not repeated and i + n > num:
            raise RleError(f"brush RLE has a literal token past its {num} values")
        field_at.append(pos)
        field_count.append(fields)
        field_repeat.append(n if repeated else 1)
        pos += fields * word
        i += n
    return field_at, field_count, field_repeat


def _read_fields(raw: np.ndarray, at: list[int], count: list[int], word: int) -> np.ndarray:
    """The ``word``-bit values at bit offsets ``at[t] + j * word`` (``j < count[t]``) as uint8."""
    if not at:
        return np.zeros(0, dtype=np.uint8)
    at_arr = np.asarray(at, dtype=np.int64)
    count_arr = np.asarray(count, dtype=np.int64)
    first = np.cumsum(count_arr) - count_arr
    index_in_token = np.arange(int(count_arr.sum())) - np.repeat(first, count_arr)
    offsets = np.repeat(at_arr, count_arr) + index_in_token * word
    # A value of up to 32 bits at any bit alignment lies within the 5 bytes from its first byte.
    byte = offsets >> 3
    padded = np.concatenate((raw, np.zeros(5, dtype=np.uint8))).astype(np.uint64)
    window = np.zeros(byte.size, dtype=np.uint64)
    for j in range(5):
        window = (window << np.uint64(8)) | padded[byte + j]
    shift = (np.int64(40 - word) - (offsets & 7)).astype(np.uint64)
    values = (window >> shift) & np.uint64((1 << word) - 1)
    if values.size and values.max() > 255:
        raise RleError(f"brush RLE has a value {int(values.max())}; expected 0..255 (uint8)")
    return values.astype(np.uint8)


def _as_bytes(data: Any) -> np.ndarray:
    if isinstance(data, bytes | bytearray):
        return np.frombuffer(data, dtype=np.uint8)
    arr = np.asarray(data)
    if arr.ndim != 1 or (
        arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255)
    ):
        raise RleError("brush RLE must be bytes or a flat list of ints in 0..255")
    return arr.astype(np.uint8)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
