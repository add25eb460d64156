"""``plan-server pool web`` against a real pool service process, driven by headless Chromium.

Two sites push three signed bundles into a real pool (mutual TLS); the pool browser
runs as its own process; Chromium (selenium) checks what a coordinator sees: sites,
counts, a class grid whose images really loaded, the privacy record on hover and on
the detail page. The zip download is checked over plain HTTP. The escaping test and
the address checks need no browser and no pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plan_shared.pool_proto import pool_pb2
from server.pool.reader_api import Catalog, entry_dict
from server.pool.web import PNG_MAGIC, Snapshot, grid_page, histogram_png, parse_listen, render_detail, render_grid, render_index
from tests.pool_support import ROOT, Pki, PoolServer, free_port, make_site_dir, rewrite_manifest, run_cli

PAGE_SIZE = 8
# site -> [(seed, n images)]; classes alternate normal/pneumonia (make_site_dir)
BUNDLES = {"site-a": [(1, 14), (2, 6)], "site-b": [(3, 9)]}
ROUND = {"site-a": 3, "site-b": 4}


def _vary_records(seed: int, round_: int):
    """Spread the privacy values (all passing) so that the histograms show something."""
    rng = np.random.default_rng(seed)

    def fn(m: dict) -> None:
        m["generator_round"] = round_
        for r in m["images"]:
            r["dcr"] = float(rng.uniform(1.2, 6.0))
            r["max_id_prob"] = float(rng.uniform(0.02, 0.45))
            r["indep_id_prob"] = float(rng.uniform(0.02, 0.45))
    return fn


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from client.export import export

    root = tmp_path_factory.mktemp("poolweb")
    pki = Pki(root)
    with PoolServer(root / "store", pki.certs, root) as srv:
        manifests = {}
        for site, parts in BUNDLES.items():
            for seed, n in parts:
                out = root / f"{site}-{seed}"
                make_site_dir(out, site, n, seed=seed)
                rewrite_manifest(out, _vary_records(seed, ROUND[site]))
                export(out, srv.address, pki.site(site), progress=False)
                manifests[(site, seed)] = json.loads((out / "manifest.json").read_text())
        yield pki, srv, manifests
    print(srv.log())


def _get(url: str, timeout: float = 30) -> tuple[int, Any, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


@contextlib.contextmanager
def web_process(srv, pki, log: Path, *extra: str):
    """``python -m server.pool web`` on a free loopback port; yields its base URL."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "server.pool", "web", "--pool", srv.address,
                                 "--credentials", str(pki.reader), "--listen", f"127.0.0.1:{port}", *extra],
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"pool web exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if _get(base + "/", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"pool web did not answer within 60 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        print(log.read_text())


@pytest.fixture(scope="module")
def web(pool, tmp_path_factory):
    pki, srv, _ = pool
    with web_process(srv, pki, tmp_path_factory.mktemp("weblog") / "web.log", "--page-size", str(PAGE_SIZE)) as base:
        yield base


def _expected(manifests, site=None, cls=None):
    return [r for (s, _), m in manifests.items() if site in (None, s) for r in m["images"] if cls in (None, r["class_name"])]


# ---------------------------------------------------------------- over HTTP


@pytest.mark.slow
def test_zip_download_whole_pool_and_one_site(pool, web):
    _, _, manifests = pool
    for site in (None, "site-b"):
        status, headers, body = _get(web + ("/download.zip" + (f"?site={site}" if site else "")))
        assert status == 200 and headers["Content-Type"] == "application/zip"
        assert headers["Content-Disposition"] == f'attachment; filename="{"pool-" + site if site else "pool"}.zip"'
        zf = zipfile.ZipFile(io.BytesIO(body))
        assert zf.testzip() is None
        want = _expected(manifests, site)
        names = set(zf.namelist())
        assert names == {f"{r['class_name']}/{r['sha256']}.png" for r in want} | {"manifest.json"}
        for n in names - {"manifest.json"}:
            assert hashlib.sha256(zf.read(n)).hexdigest() == n.split("/")[1][:-4]
        man = json.loads(zf.read("manifest.json"))
        assert man["format"] == "plan-pool-pull/1" and man["n_images"] == len(want)
        assert {i["site_id"] for i in man["images"]} == ({site} if site else set(BUNDLES))
        assert {b["generator_round"] for b in man["bundles"]} == {ROUND[s] for s in BUNDLES if site in (None, s)}
        rec = {r["sha256"]: r for r in want}
        for i in man["images"]:
            assert i["record"]["dcr"] == pytest.approx(rec[i["sha256"]]["dcr"])


@pytest.mark.slow
def test_images_and_refusals_over_http(pool, web):
    _, _, manifests = pool
    r = _expected(manifests, "site-a")[0]
    status, headers, body = _get(f"{web}/img/{r['sha256']}.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert hashlib.sha256(body).hexdigest() == r["sha256"]
    assert "script-src" not in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    assert _get(f"{web}/img/{'0' * 64}.png")[0] == 404          # well-formed, not in the pool
    assert _get(f"{web}/img/..%2F..%2Fetc%2Fpasswd")[0] == 404
    status, _, body = _get(f"{web}/grid?cls=nosuchclass")
    assert status == 404 and b"no class &#39;nosuchclass&#39;" in body
    assert _get(f"{web}/download.zip?site=site-zz")[0] == 404
    assert _get(f"{web}/hist.png?site=site-a")[1]["Content-Type"] == "image/png"
    assert _get(f"{web}/grid?cls=normal&page=0")[0] == 422    # page >= 1
    # Read-only: nothing but GET.
    req = urllib.request.Request(f"{web}/", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=10)
    assert ei.value.code == 405


@pytest.mark.slow
def test_damaged_object_in_the_pool_is_not_served(pool, tmp_path):
    """A stored file altered on the pool's disk (same size) is refused by its sha256; the rest still loads."""
    from server.pool.store import Store

    pki, srv, manifests = pool
    bad, good = _expected(manifests, "site-b", "pneumonia")[:2]
    st = Store(srv.store, create=False, readonly=True)
    try:
        path = st.object_path(bad["sha256"])
    finally:
        st.close()
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        with web_process(srv, pki, tmp_path / "web.log") as base:  # a fresh process: nothing cached
            status, _, body = _get(f"{base}/img/{bad['sha256']}.png")
            assert status == 502 and b"does not match its sha256" in body
            status, _, body = _get(f"{base}/grid?cls=pneumonia&site=site-b")
            assert status == 200 and bad["sha256"].encode() in body
            status, _, body = _get(f"{base}/img/{good['sha256']}.png")
            assert status == 200 and hashlib.sha256(body).hexdigest() == good["sha256"]
            assert _get(f"{base}/img/{bad['sha256']}.png")[0] == 502  # never cached
    finally:
        path.write_bytes(original)


@pytest.mark.slow
def test_refuses_to_start_without_a_readable_pool(pool):
    pki, _, _ = pool
    r = run_cli("server.pool", "web", "--pool", f"127.0.0.1:{free_port()}", "--credentials", str(pki.reader),
                "--listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "error: pool at 127.0.0.1:" in r.stderr and "unavailable" in r.stderr, r.stderr
    r = run_cli("server.pool", "web", "--pool", pool[1].address, "--credentials", str(pki.site("site-a")),
                "--listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "these are site credentials" in r.stderr, r.stderr


# ---------------------------------------------------------------- in a real browser


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no Chromium/chromedriver binary (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary, driver_path = _chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not download a browser or driver

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def _loaded_images(drv, timeout: float = 30) -> list[int]:
    """naturalWidth of every grid image once all have finished loading."""
    deadline = time.monotonic() + timeout
    script = "return Array.from(document.querySelectorAll('.grid img')).map(i => [i.complete, i.naturalWidth]);"
    while True:
        state = drv.execute_script(script)
        if all(done for done, _ in state) or time.monotonic() > deadline:
            return [w for _, w in state]
        time.sleep(0.1)


@pytest.mark.slow
def test_browser_overview_grid_detail(browser, pool, web, tmp_path):  # browser first: skip before the pool starts
    from selenium.webdriver.common.by import By

    _, _, manifests = pool
    drv = browser
    drv.get(web + "/")
    text = drv.find_element(By.TAG_NAME, "body").text
    assert "2 site(s), 3 bundle(s), 29 image(s)" in text
    sections = {s.find_element(By.TAG_NAME, "h2").text: s for s in drv.find_elements(By.CSS_SELECTOR, "section.card")}
    assert set(sections) == {"site-a", "site-b"}
    a = sections["site-a"].text
    assert "2 bundle(s), 20 image(s)" in a and "normal: 10" in a and "pneumonia: 10" in a
    assert "τ_id 0.500 τ_indep 0.500 δ 1.000" in a
    b_rows = sections["site-b"].find_elements(By.CSS_SELECTOR, "table tr")
    assert len(b_rows) == 2  # header + one bundle
    cells = [c.text for c in b_rows[1].find_elements(By.TAG_NAME, "td")]
    assert cells[3] == "4" and cells[4] == manifests[("site-b", 3)]["generator_sha256"][:16] and cells[9] == "9"
    hist = drv.execute_script("return Array.from(document.querySelectorAll('img.hist')).map(i => i.naturalWidth);")
    assert len(hist) == 2 and all(w > 0 for w in hist)
    shot = tmp_path / "pool-web.png"
    _full_page_screenshot(drv, shot)
    assert shot.stat().st_size > 10_000
    _publish(shot, "pool-web.png")

    # Class grid of one site, paged.
    sections["site-a"].find_element(By.LINK_TEXT, "normal: 10").click()
    assert "class normal · site site-a" in drv.find_element(By.TAG_NAME, "h1").text
    widths = _loaded_images(drv)
    assert len(widths) == PAGE_SIZE and all(w == 28 for w in widths), widths
    assert "page 1 of 2 · images 1–8 of 10" in drv.find_element(By.CLASS_NAME, "pager").text
    want = {r["sha256"]: r for r in _expected(manifests, "site-a", "normal")}
    first = drv.find_element(By.CSS_SELECTOR, ".grid img")
    sha = first.get_attribute("src").rsplit("/", 1)[1][:-4]
    title = first.get_attribute("title")
    assert sha in want and f"id {want[sha]['id']}" in title
    assert f"distance to closest record (DCR): {want[sha]['dcr']:.3f} (> delta = 1.000, passes)" in title
    grid_shot = tmp_path / "pool-web-grid.png"
    drv.save_screenshot(str(grid_shot))
    _publish(grid_shot, "pool-web-grid.png")
    drv.find_element(By.CSS_SELECTOR, "a[rel=next]").click()
    assert len(_loaded_images(drv)) == 10 - PAGE_SIZE and "page 2 of 2" in drv.find_element(By.CLASS_NAME, "pager").text
    drv.find_element(By.CSS_SELECTOR, "a[rel=prev]").click()

    # Detail page of the first image: record and provenance visible.
    drv.find_element(By.CSS_SELECTOR, ".grid a").click()
    record = drv.find_element(By.ID, "record")
    assert record.is_displayed()
    rows = [r.text for r in record.find_elements(By.TAG_NAME, "tr")[1:]]
    assert len(rows) == 3 and all(r.endswith("passes") for r in rows)
    assert f"{want[sha]['max_id_prob']:.3f}" in rows[0]
    body = drv.find_element(By.TAG_NAME, "body").text
    assert sha in body and manifests[("site-a", 1)]["generator_sha256"] in body  # both bundles: same generator
    big = drv.execute_script("return document.querySelector('img.big').naturalWidth;")
    assert big == 28
    detail_shot = tmp_path / "pool-web-detail.png"
    drv.save_screenshot(str(detail_shot))
    _publish(detail_shot, "pool-web-detail.png")


def _full_page_screenshot(drv, path: Path) -> None:
    """The whole page, not only the window (Chromium's DevTools capture beyond the viewport)."""
    import base64


    shot = drv.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))


def _publish(shot: Path, name: str) -> None:
    """Copy a screenshot to runs/test-artifacts/ when that folder can be written."""
    dest_dir = ROOT / "runs" / "test-artifacts"
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest_dir / name)
        print(f"screenshot: {dest_dir / name}")
    except OSError as err:
        print(f"screenshot: {shot} (runs/test-artifacts not writable: {err})")


# ---------------------------------------------------------------- no browser, no pool

HOSTILE = "<script>alert(1)</script>"


def _entry(**kw) -> pool_pb2.CatalogEntry:
    record = {"id": "x", "label": 0, "class_name": "normal", "method": "plan", "max_id_prob": 0.1,
              "indep_id_prob": 0.1, "dcr": 2.0, "thresholds": {"tau_id": 0.5, "tau_indep": 0.5, "delta": 1.0}}
    record.update(kw.pop("record", {}))
    base = dict(bundle_id="b" * 64, site_id="site-a", sha256="a" * 64, class_name="normal", size=10,
                record_json=json.dumps(record), generator_sha256="c" * 64, config_sha256="d" * 64,
                generator_round=2, created="2025-01-01T00:00:00+00:00")
    base.update(kw)
    return pool_pb2.CatalogEntry(**base)


def test_hostile_names_are_set_aside_and_everything_is_escaped():
    bad = [_entry(site_id=HOSTILE), _entry(class_name='"><img src=x onerror=alert(1)>'),
           _entry(class_name="../../etc"), _entry(sha256="../" + "a" * 61), _entry(record_json="[1]")]
    reasons = [entry_dict(e)[1] for e in bad]
    assert all(r is not None for r in reasons)
    assert "site id" in reasons[0] and "class name" in reasons[1] and "class name" in reasons[2]
    assert "sha256" in reasons[3] and "not a JSON object" in reasons[4]
    # What passes the name checks can still carry hostile text in its record and in List's counts.
    good, why = entry_dict(_entry(record={"id": HOSTILE, "method": "<b>plan</b>", "dcr": "<i>"}))
    assert why is None
    bundles = [{"bundle_id": "b" * 64, "site_id": "site-a", "n_images": 1, "n_bytes": 10, "created": HOSTILE,
                "received": "r", "generator_sha256": "c" * 64, "config_sha256": "d" * 64,
                "per_class": {"normal": 1, HOSTILE: 0}, "per_method": {"<b>plan</b>": 1}},
               {"bundle_id": "e" * 64, "site_id": HOSTILE, "n_images": 0, "n_bytes": 0, "created": "", "received": "",
                "generator_sha256": "", "config_sha256": "", "per_class": {}, "per_method": {}}]
    snap = Snapshot.build(bundles, Catalog([good], [r for r in reasons if r]))
    assert set(snap.sites) == {"site-a"} and any("is not a safe name" in r for r in snap.refused[-1:])
    pages = [render_index(snap, "pool:1", HOSTILE),
             render_grid(snap, "pool:1", "r", grid_page(snap, "normal", None, 1, 10)),
             render_detail(snap, "pool:1", "r", snap.entry("b" * 64, "a" * 64))]
    for html in pages:
        assert "<script>" not in html and "<b>plan" not in html and "<img src=x" not in html and "<i>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "cls=%3Cscript%3Ealert%281%29%3C%2Fscript%3E" in pages[0]   # names reach URLs encoded
    assert "&lt;b&gt;plan&lt;/b&gt;" in pages[1] and "&lt;i&gt;" in pages[2]


def test_listen_address_rules():
    assert parse_listen("127.0.0.1:8061", False) == ("127.0.0.1", 8061)
    assert parse_listen("[::1]:0", False) == ("::1", 0)
    assert parse_listen("localhost:9", False) == ("localhost", 9)
    for addr in ("0.0.0.0:8061", "10.1.2.3:80", "pool.example.org:80"):
        with pytest.raises(ValueError, match="no authentication"):
            parse_listen(addr, False)
        assert parse_listen(addr, True)[0] == addr.rsplit(":", 1)[0]
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_listen("8061", False)
    r = run_cli("server.pool", "web", "--pool", "127.0.0.1:1", "--credentials", "/nonexistent",
                "--listen", "0.0.0.0:8061")
    assert r.returncode == 2 and "no authentication" in r.stderr and "--public" in r.stderr
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = run_cli("server.pool", "web", "--pool", "127.0.0.1:1", "--credentials", "/nonexistent",
                    "--listen", f"127.0.0.1:{port}")
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr


def test_empty_pool_and_malformed_values_still_render():
    assert "The pool holds no bundles yet." in render_index(Snapshot.build([], Catalog([])), "pool:1")
    for records in ([], [{"dcr": "x", "max_id_prob": None, "thresholds": 5}], [{"dcr": 2.0, "thresholds": {}}]):
        assert histogram_png("site-a", records).startswith(PNG_MAGIC)
