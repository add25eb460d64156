"""Signed bundle format: build, sign, parse, verify, limits (plan_shared/bundle.py)."""

import json

import pytest

from plan_shared.bundle import (
    BundleError,
    BundleLimits,
    ThresholdPolicy,
    build_bundle,
    canonical_json,
    check_bundle,
    generate_signing_key,
    key_fingerprint,
    parse_bundle_manifest,
    public_key_raw,
    sha256_bytes,
    verify_signature,
)
from tests.pool_support import make_site_dir, rewrite_manifest


@pytest.fixture
def site(tmp_path):
    out = tmp_path / "out"
    make_site_dir(out, "site-a", 6, seed=1)
    return out


def test_build_parse_verify(site):
    key = generate_signing_key()
    signed = build_bundle(site, key, site_id="site-a")
    bm = signed.manifest
    assert bm.site_id == "site-a" and len(bm.images) == 6
    assert bm.signing_key_sha256 == key_fingerprint(public_key_raw(key.public_key()))
    assert bm.report_sha256 is not None and bm.report_size > 0
    raw = json.loads(signed.manifest_bytes)
    body = {k: v for k, v in raw.items() if k != "bundle_id"}
    assert raw["bundle_id"] == sha256_bytes(canonical_json(body)) == signed.bundle_id
    assert canonical_json(raw) == signed.manifest_bytes
    verify_signature(signed.manifest_bytes, signed.signature, public_key_raw(key.public_key()), "site-a")
    check_bundle(bm, BundleLimits())
    assert signed.image_path(0).is_file()


def test_same_dir_same_bundle(site):
    key = generate_signing_key()
    a, b = build_bundle(site, key), build_bundle(site, key)
    assert a.manifest_bytes == b.manifest_bytes and a.signature == b.signature


def test_forged_signature_and_wrong_key(site):
    key, other = generate_signing_key(), generate_signing_key()
    signed = build_bundle(site, key)
    pub = public_key_raw(key.public_key())
    with pytest.raises(BundleError, match="signature does not verify with the registered key of site 'site-a'"):
        verify_signature(signed.manifest_bytes, other.sign(signed.manifest_bytes), pub, "site-a")
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_signature(signed.manifest_bytes, b"\0" * 64, pub, "site-a")
    edited = signed.manifest_bytes.replace(b'"dcr":2.5', b'"dcr":9.5', 1)
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_signature(edited, signed.signature, pub, "site-a")


def test_edited_manifest_changes_bundle_id(site):
    signed = build_bundle(site, generate_signing_key())
    edited = signed.manifest_bytes.replace(b'"dcr":2.5', b'"dcr":9.5', 1)
    with pytest.raises(BundleError, match="'bundle_id' does not match its content"):
        parse_bundle_manifest(edited)


def test_build_refuses_altered_file(site):
    p = next((site / "images").rglob("*.png"))
    p.write_bytes(p.read_bytes() + b"x")
    with pytest.raises(BundleError, match="has sha256 .* manifest says"):
        build_bundle(site, generate_signing_key())


def test_build_refuses_failing_record_and_wrong_site(site):
    with pytest.raises(BundleError, match="is not this site's identity 'site-b'"):
        build_bundle(site, generate_signing_key(), site_id="site-b")
    rewrite_manifest(site, lambda m: m["images"][2].update(max_id_prob=0.9))
    with pytest.raises(BundleError, match=r"images\[2\] .* fails its own thresholds: max_id_prob 0.9 >= tau_id 0.5"):
        build_bundle(site, generate_signing_key())


def test_check_bundle_limits_and_policy(site):
    bm = build_bundle(site, generate_signing_key()).manifest
    with pytest.raises(BundleError, match="bundle has 6 images, limit 5"):
        check_bundle(bm, BundleLimits(max_images=5))
    with pytest.raises(BundleError, match=r"images\[0\] .* bytes, limit 10"):
        check_bundle(bm, BundleLimits(max_image_bytes=10))
    with pytest.raises(BundleError, match="bundle is .* bytes, limit 100"):
        check_bundle(bm, BundleLimits(max_bundle_bytes=100))
    with pytest.raises(BundleError, match="tau_id 0.5 above the pool's bound 0.3"):
        check_bundle(bm, BundleLimits(), ThresholdPolicy(max_tau_id=0.3))
    with pytest.raises(BundleError, match="delta 1 below the pool's bound 2"):
        check_bundle(bm, BundleLimits(), ThresholdPolicy(min_delta=2.0))
    with pytest.raises(BundleError, match="bundle manifest is .* bytes, limit 10"):
        parse_bundle_manifest(build_bundle(site, generate_signing_key()).manifest_bytes, BundleLimits(max_manifest_bytes=10))


def test_parse_refuses_a_failing_record_only_at_check(site):
    """A signed manifest whose record fails its thresholds parses, and check_bundle refuses it."""
    key = generate_signing_key()
    signed = build_bundle(site, key)
    raw = json.loads(signed.manifest_bytes)
    raw["images"][3]["dcr"] = 0.5
    from plan_shared.bundle import with_bundle_id

    data = with_bundle_id(raw)
    bm = parse_bundle_manifest(data)
    with pytest.raises(BundleError, match=r"images\[3\] .* fails its own privacy thresholds: dcr 0.5 <= delta 1"):
        check_bundle(bm, BundleLimits())


def test_parse_schema_errors():
    with pytest.raises(BundleError, match="not valid JSON"):
        parse_bundle_manifest(b"{")
    with pytest.raises(BundleError, match="key 'format'"):
        parse_bundle_manifest(b'{"format": "zip"}')
