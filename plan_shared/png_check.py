"""Is this the canonical PNG of one synthetic image of the federation? (pool ingest check)

A site exports each accepted image with :func:`plan_shared.imaging.save_png`
(Pillow's PNG writer, default options), which writes exactly three chunk types:
``IHDR``, one or more consecutive ``IDAT``, ``IEND``; 8-bit grey (colour type 0)
or 8-bit RGB (colour type 2), no interlace. The pool accepts nothing else::

    info = check_png(data, size=28, channels=1, max_pixels=28 * 28)   # raises PngError

In this order, so that nothing hostile is ever decompressed:

1. the 8-byte signature, then a walk over the chunks: every length inside the
   file, every CRC right, only IHDR/IDAT/IEND (no text chunks that could carry
   identifiers, no palette, no metadata), IHDR first, IDATs consecutive, nothing
   after IEND;
2. IHDR: bit depth 8, colour type 0 or 2, standard compression/filter, no
   interlace; width and height exactly the federation's ``size`` and the channels
   its ``channels`` (when given); width x height at most ``max_pixels``: a
   decompression bomb (an IHDR claiming 16000 x 16000 behind a small IDAT) is
   refused from its 13 header bytes;
3. the decode: the IDAT stream inflated with an output bound of exactly the size IHDR
   implies (``height x (1 + width x channels)``; more or less data is refused) and every
   row's filter type valid. For 8-bit grey/RGB without interlace nothing else can be
   wrong with the pixels (un-filtering cannot fail), so this is a full decode; Pillow
   decodes every file accepted here (tested), at ~6x the cost per image, which the
   pool's push throughput would feel.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CANONICAL_CHUNKS = (b"IHDR", b"IDAT", b"IEND")
_CHANNELS = {0: 1, 2: 3}  # colour type -> channels (8-bit grey, 8-bit RGB)


class PngError(ValueError):
    """The file is not the federation's canonical PNG; the message says what is wrong."""


@dataclass(frozen=True)
class PngInfo:
    width: int
    height: int
    channels: int


_HEAD = struct.Struct(">I4s")
_CRC = struct.Struct(">I")


def check_png(data: bytes, size: int | None = None, channels: int | None = None,
              max_pixels: int = 4096 * 4096) -> PngInfo:
    """Raise :class:`PngError` unless ``data`` is a canonical PNG of that shape (see module docstring)."""
    if data[:8] != SIGNATURE:
        raise PngError("not a PNG file (no PNG signature)")
    pos, n = 8, len(data)
    info: PngInfo | None = None
    idat: list[bytes] = []
    idat_done = False
    crc32 = zlib.crc32
    while True:
        if pos + 12 > n:
            raise PngError(f"truncated: chunk header at byte {pos} runs past the end (no IEND)")
        length, ctype = _HEAD.unpack_from(data, pos)
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > n:
            raise PngError(f"chunk at byte {pos} declares {length} bytes, past the end of the file")
        if crc32(data[pos + 4: end - 4]) != _CRC.unpack_from(data, end - 4)[0]:
            raise PngError(f"chunk {ctype.decode('latin-1')!r} at byte {pos}: CRC mismatch")
        if ctype == b"IDAT":
            if info is None or idat_done:
                raise PngError(f"chunk 'IDAT' at byte {pos}: " + ("IHDR must come first, exactly once" if info is None
                                                                  else "IDAT chunks must be consecutive"))
            idat.append(data[pos + 8: end - 4])
        elif ctype == b"IHDR":
            if info is not None or pos != 8:
                raise PngError(f"chunk 'IHDR' at byte {pos}: IHDR must come first, exactly once")
            info = _check_ihdr(data[pos + 8: end - 4], size, channels, max_pixels)
        elif ctype == b"IEND":
            if info is None:
                raise PngError(f"chunk 'IEND' at byte {pos}: IHDR must come first, exactly once")
            if length:
                raise PngError(f"chunk 'IEND' at byte {pos}: must be empty")
            if end != n:
                raise PngError(f"{n - end} byte(s) after IEND")
            if not idat:
                raise PngError("no IDAT chunk")
            break
        else:
            name = ctype.decode("latin-1")
            raise PngError(f"chunk {name!r} at byte {pos} not allowed: only IHDR, IDAT, IEND "
                           "(the site's exporter writes nothing else; text chunks could carry identifiers)")
        if idat and ctype != b"IDAT":
            idat_done = True
        pos = end
    # The decode: inflate to exactly the size IHDR implies (never more), every row's filter type valid.
    # For 8-bit grey/RGB without interlace that is all that can be wrong with the pixel data: un-filtering
    # any such stream succeeds (Pillow decodes every file accepted here; tests/security/test_png_ingest.py).
    row = 1 + info.width * info.channels
    expected = info.height * row
    d = zlib.decompressobj()
    try:
        raw = d.decompress(idat[0] if len(idat) == 1 else b"".join(idat), expected + 1)
    except zlib.error as err:
        raise PngError(f"IDAT is not a valid zlib stream: {err}") from None
    if len(raw) != expected or not d.eof or d.unconsumed_tail or d.unused_data:
        raise PngError(f"IDAT inflates to {'more than ' if len(raw) > expected else ''}{len(raw)} bytes"
                       f"{'' if d.eof or len(raw) > expected else ' (stream not finished)'}; "
                       f"{info.width}x{info.height}x{info.channels} needs exactly {expected}")
    if max(raw[::row]) > 4:
        bad = sorted({f for f in raw[::row] if f > 4})
        raise PngError(f"invalid row filter type(s) {bad}")
    return info


def _check_ihdr(payload: bytes, size: int | None, channels: int | None, max_pixels: int) -> PngInfo:
    if len(payload) != 13:
        raise PngError(f"IHDR has {len(payload)} bytes, not 13")
    width, height, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", payload)
    if width == 0 or height == 0:
        raise PngError(f"IHDR: empty image {width}x{height}")
    if depth != 8:
        raise PngError(f"IHDR: bit depth {depth}, the federation's images are 8-bit")
    if ctype not in _CHANNELS:
        raise PngError(f"IHDR: colour type {ctype}; only 0 (8-bit grey) or 2 (8-bit RGB)")
    if comp != 0 or filt != 0:
        raise PngError(f"IHDR: compression {comp} / filter method {filt}, only 0 exists")
    if interlace != 0:
        raise PngError("IHDR: interlaced; the site's exporter writes non-interlaced images")
    ch = _CHANNELS[ctype]
    if size is not None and (width, height) != (size, size):
        raise PngError(f"IHDR: {width}x{height} pixels, the federation's images are {size}x{size}")
    if channels is not None and ch != channels:
        raise PngError(f"IHDR: {ch} channel(s), the federation's images have {channels}")
    if width * height > max_pixels:
        raise PngError(f"IHDR: {width}x{height} = {width * height} pixels, limit {max_pixels} "
                       "(checked before decompression)")
    return PngInfo(width, height, ch)


__all__ = ["SIGNATURE", "CANONICAL_CHUNKS", "PngError", "PngInfo", "check_png"]
