"""Malformed signed manifests and colliding blob kinds against a real pool process.

Issue 12 "Bad input, unclear errors" and the kind collision of "One bundle breaks
reading": each gets INVALID_ARGUMENT naming the field, and nothing is left on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import grpc
import pytest

from client.export import export
from plan_shared.credentials import load_client_credentials
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from server.pool.store import Store
from tests.pool_support import PoolServer, make_site_dir, rewrite_manifest
from tests.security.support import assert_refused_and_clean, attempt, index_copy, signed_raw, store_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    with PoolServer(work / "store", pki.certs, work) as srv:
        yield srv
    print(srv.log())


NEST = "@@nested@@"


def _raw_json(raw: dict, depth: int = 0) -> bytes:
    """Bytes a hostile site could sign: sorted compact JSON with NaN, huge integers, any nesting.

    The bundle_id is the sha256 of the body as written, so only the hostile value is wrong.
    A string NEST in ``raw`` becomes ``depth`` nested lists (json.dumps cannot write that deep).
    """
    def dump(obj) -> bytes:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
        return text.replace(f'"{NEST}"', "[" * depth + "1" + "]" * depth).encode()

    body = {k: v for k, v in raw.items() if k != "bundle_id"}
    return dump(dict(body, bundle_id=hashlib.sha256(dump(body)).hexdigest()))


def _bad(pki, server, tmp_path, seed, edit, want, site="site-a", depth=0):
    out = tmp_path / f"m{seed}"
    make_site_dir(out, site, 3, seed=seed)
    signed = signed_raw(out, pki.site(site), edit, dumps=lambda raw: _raw_json(raw, depth))
    got = attempt(signed, pki.site(site), server.address)
    assert_refused_and_clean(server, signed, *got, "INVALID_ARGUMENT", want)


def test_nan(pki, server, tmp_path):
    _bad(pki, server, tmp_path, 40, lambda raw: raw["images"][0].update(max_id_prob=float("nan")),
         "bundle manifest: images[0] (id 'site-a-40-00000'): key 'max_id_prob' = nan: must be a probability")


def test_infinity_threshold(pki, server, tmp_path):
    _bad(pki, server, tmp_path, 41, lambda raw: raw["images"][1]["thresholds"].update(delta=float("-inf")),
         "bundle manifest: images[1] (id 'site-a-41-00001'): key 'thresholds.delta' = -inf: must be a distance")


def test_ten_to_the_400(pki, server, tmp_path):
    _bad(pki, server, tmp_path, 42, lambda raw: raw["images"][2].update(dcr=10**400),
         "bundle manifest: images[2] (id 'site-a-42-00002'): key 'dcr' = 1000000000")


def test_two_to_the_64(pki, server, tmp_path):
    _bad(pki, server, tmp_path, 43, lambda raw: raw["images"][0].update(label=2**64),
         "bundle manifest: images[0] (id 'site-a-43-00000'): key 'label' = 18446744073709551616: must be an "
         "integer in [0, 9007199254740991]")


def test_deep_nesting(pki, server, tmp_path):
    def nest(raw):
        raw["images"][0]["thresholds"]["tau_id"] = NEST

    _bad(pki, server, tmp_path, 44, nest, "bundle manifest: images[0] (id 'site-a-44-00000'): key "
         "'thresholds.tau_id' = " + "[" * 40 + "1" + "]" * 19 + "…: must be a probability bound", depth=40)
    _bad(pki, server, tmp_path, 45, nest, "bundle manifest: JSON nested too deeply for the parser", depth=100_000)


def test_wrong_types(pki, server, tmp_path):
    _bad(pki, server, tmp_path, 46, lambda raw: raw.update(report={"sha256": 5, "size": "big"}),
         "bundle manifest: key 'report' = {'sha256': 5, 'size': 'big'}: must be null or")
    _bad(pki, server, tmp_path, 47, lambda raw: raw["images"][1].update(method=["plan"]),
         "bundle manifest: images[1] (id 'site-a-47-00001'): key 'method' = ['plan']: must be one of plan, linear")


def test_report_then_image_kind_collision(pki, server, tmp_path):
    """A blob stored as site-a's report.json, then named as an image by site-b, is refused."""
    first = tmp_path / "k1"
    make_site_dir(first, "site-a", 3, seed=48)
    res = export(first, server.address, pki.site("site-a"), progress=False)
    assert not res.duplicate
    report = (first / "report.json").read_bytes()
    sha = hashlib.sha256(report).hexdigest()
    second = tmp_path / "k2"
    make_site_dir(second, "site-b", 3, seed=49)
    (second / "report.json").write_text(json.dumps({"n_candidates": 7, "n_accepted": 3}))
    m = json.loads((second / "manifest.json").read_text())
    (second / m["images"][0]["file"]).write_bytes(report)
    rewrite_manifest(second, lambda mm: mm["images"][0].update(sha256=sha))
    signed = signed_raw(second, pki.site("site-b"), lambda raw: None)
    got = attempt(signed, pki.site("site-b"), server.address)
    assert_refused_and_clean(server, signed, *got, "INVALID_ARGUMENT",
                             f"images[0] (id 'site-b-49-00000'): sha256 {sha[:16]}… is stored in the pool as a "
                             "report, not as an image")
    # The reverse: an image stored by site-a, named as report.json by site-c.
    third = tmp_path / "k3"
    make_site_dir(third, "site-c", 3, seed=50)
    img = json.loads((first / "manifest.json").read_text())["images"][0]
    shutil.copyfile(first / img["file"], third / "report.json")
    signed = signed_raw(third, pki.site("site-c"), lambda raw: None)
    got = attempt(signed, pki.site("site-c"), server.address)
    assert_refused_and_clean(server, signed, *got, "INVALID_ARGUMENT",
                             f"report.json: sha256 {img['sha256'][:16]}… is stored in the pool as an image, "
                             "not as a report")
    # Every stored image can still be fetched.
    creds = load_client_credentials(pki.reader)
    chan = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
    with grpc.secure_channel(server.address, chan) as ch:
        stub = pool_pb2_grpc.PoolStub(ch)
        shas = [e.sha256 for r in stub.Catalog(pool_pb2.CatalogRequest(), timeout=30) for e in r.entries]
        got_shas = {c.sha256 for r in stub.Fetch(pool_pb2.FetchRequest(sha256=shas), timeout=30) for c in r.chunks}
    assert set(shas) == got_shas and sha not in got_shas


def test_pool_check_compares_kinds(pki, server, tmp_path):
    out = tmp_path / "c"
    make_site_dir(out, "site-a", 2, seed=51)
    export(out, server.address, pki.site("site-a"), progress=False)
    copy = tmp_path / "store-copy"
    shutil.copytree(server.store / "objects", copy / "objects")
    (copy / "staging").mkdir()
    index_copy(server.store, copy / "index.sqlite")
    st = Store(copy)
    try:
        assert st.check().problems == []
        img = json.loads((out / "manifest.json").read_text())["images"][0]["sha256"]
        st._db.execute("UPDATE objects SET kind='report' WHERE sha256=?", (img,))
        problems = st.check().problems
    finally:
        st.close()
    assert len(problems) == 1 and problems[0].endswith(": references a file indexed as a report, not an image")
    _, problems, _ = store_state(server.store)
    assert problems == []
