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
3. the IDAT stream inflated with an output bound of exactly the size IHDR implies
   (``height x (1 + width x channels)``): more or less data is refused;
4. a full decode with Pillow (filter bytes, row data) whose mode and size must
   match IHDR.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CANONICAL_CHUNKS = (b"IHDR", b"IDAT", b"IEND")
_CHANNELS = {0: 1, 2: 3}  # colour type -> channels (8-bit grey, 8-bit RGB)
_MODES = {1: "L", 3: "RGB"}


class PngError(ValueError):
    """The file is not the federation's canonical PNG; the message says what is wrong."""


@dataclass(frozen=True)
class PngInfo:
    width: int
    height: int
    channels: int


def _chunks(data: bytes):
    """(type, payload, offset) of every chunk; checks lengths, CRCs, order and the end."""
    if data[:8] != SIGNATURE:
        raise PngError("not a PNG file (no PNG signature)")
    pos, n = 8, len(data)
    seen_idat = ended_idat = False
    first = True
    while True:
        if pos + 12 > n:
            raise PngError(f"truncated: chunk header at byte {pos} runs past the end (no IEND)")
        length, ctype = struct.unpack(">I4s", data[pos: pos + 8])
        if length > 0x7FFFFFFF or pos + 12 + length > n:
            raise PngError(f"chunk at byte {pos} declares {length} bytes, past the end of the file")
        payload = data[pos + 8: pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length: pos + 12 + length])
        name = ctype.decode("latin-1")
        if zlib.crc32(ctype + payload) & 0xFFFFFFFF != crc:
            raise PngError(f"chunk {name!r} at byte {pos}: CRC mismatch")
        if ctype not in CANONICAL_CHUNKS:
            raise PngError(f"chunk {name!r} at byte {pos} not allowed: only IHDR, IDAT, IEND "
                           "(the site's exporter writes nothing else; text chunks could carry identifiers)")
        if first != (ctype == b"IHDR"):
            raise PngError(f"chunk {name!r} at byte {pos}: IHDR must come first, exactly once")
        first = False
        if ctype == b"IDAT":
            if ended_idat:
                raise PngError(f"chunk 'IDAT' at byte {pos}: IDAT chunks must be consecutive")
            seen_idat = True
        elif seen_idat:
            ended_idat = True
        yield ctype, payload, pos
        pos += 12 + length
        if ctype == b"IEND":
            if length:
                raise PngError(f"chunk 'IEND' at byte {pos - 12 - length}: must be empty")
            if pos != n:
                raise PngError(f"{n - pos} byte(s) after IEND")
            if not seen_idat:
                raise PngError("no IDAT chunk")
            return


def check_png(data: bytes, size: Optional[int] = None, channels: Optional[int] = None,
              max_pixels: int = 4096 * 4096) -> PngInfo:
    """Raise :class:`PngError` unless ``data`` is a canonical PNG of that shape (see module docstring)."""
    idat: list[bytes] = []
    info: Optional[PngInfo] = None
    for ctype, payload, pos in _chunks(data):
        if ctype == b"IHDR":
            info = _check_ihdr(payload, size, channels, max_pixels)
        elif ctype == b"IDAT":
            idat.append(payload)
    assert info is not None
    row = 1 + info.width * info.channels
    expected = info.height * row
    d = zlib.decompressobj()
    try:
        raw = d.decompress(b"".join(idat), expected + 1)
    except zlib.error as err:
        raise PngError(f"IDAT is not a valid zlib stream: {err}") from None
    if len(raw) != expected or not d.eof or d.unconsumed_tail or d.unused_data:
        raise PngError(f"IDAT inflates to {'more than ' if len(raw) > expected else ''}{len(raw)} bytes"
                       f"{'' if d.eof else ' (stream not finished)'}; "
                       f"{info.width}x{info.height}x{info.channels} needs exactly {expected}")
    bad_filters = {raw[i] for i in range(0, expected, row)} - {0, 1, 2, 3, 4}
    if bad_filters:
        raise PngError(f"invalid row filter type(s) {sorted(bad_filters)}")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            im.load()
            mode, dims = im.mode, im.size
    except Exception as err:  # noqa: BLE001 - Pillow raises several types for a bad stream
        raise PngError(f"does not decode: {err}") from None
    if mode != _MODES[info.channels] or dims != (info.width, info.height):
        raise PngError(f"decodes to {mode} {dims[0]}x{dims[1]}, IHDR says {_MODES[info.channels]} "
                       f"{info.width}x{info.height}")
    return info


def _check_ihdr(payload: bytes, size: Optional[int], channels: Optional[int], max_pixels: int) -> PngInfo:
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
