"""``plan-server pool web``: a read-only browser of the pool for coordinators and data-protection officers.

The app is a reader of the pool service (mutual TLS, the reader's own keys folder)
and serves, on loopback by default:

``/``                         bundles per site with provenance, counts, histograms, downloads
``/grid?cls=C[&site=S][&page=N]``  one class's images, a page at a time; hover shows the record
``/image?bundle=B&sha=H``     one image with its provenance and privacy record
``/hist.png?site=S``          DCR and identity-probability histograms of one site
``/img/<sha256>.png``         an image, fetched from the pool and checked against its sha256
``/download.zip[?site=S]``    the pool (or one site's part) as ``<class>/<sha256>.png`` + ``manifest.json``

Everything from the pool is untrusted: text goes through Jinja2's autoescape, names
reach URLs only as encoded query values and never become paths on disk, catalog
entries with unsafe names are set aside (:mod:`server.pool.reader_api`), and an image
is served only if its bytes match its sha256 and are a PNG. Pages carry a
Content-Security-Policy that allows no script and no other origin. There is no
authentication: anyone who reaches the listening address sees the whole pool, so a
non-loopback address needs ``--public``.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import re
import threading
import time
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Protocol, cast
from urllib.parse import urlencode

import jinja2

from plan_shared.manifest import is_safe_name
from server.pool.reader_api import Catalog

LOG = logging.getLogger("plan.pool.web")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SHA = re.compile(r"^[0-9a-f]{64}$")
FETCH_BATCH = 200
CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")


class Source(Protocol):
    """What the app needs from the pool (implemented by :class:`server.pool.reader_api.PoolReader`)."""

    pool: str

    def bundles(self) -> list[dict[str, Any]]: ...

    def catalog(self, site: str | None = None) -> Catalog: ...

    def fetch_images(self, shas: list[str], max_bytes: int = ...) -> dict[str, bytes]: ...


@dataclass(frozen=True)
class WebSettings:
    """Settings of the pool browser (defaults are the CLI's)."""

    page_size: int = 60          # images per grid page
    cache_mb: int = 128          # verified image bytes kept in memory
    refresh_s: float = 30.0      # the catalog is read again when older than this


# ------------------------------------------------------------------ listening address


def parse_listen(listen: str, public: bool) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); a non-loopback host needs ``public``."""
    m = re.match(r"^\[(?P<h6>[^\]]+)\]:(?P<p6>\d+)$|^(?P<h>[^:\[\]]+):(?P<p>\d+)$", listen.strip())
    if not m:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8061")
    host = m.group("h6") or m.group("h")
    port = int(m.group("p6") or m.group("p"))
    if not 0 <= port <= 65535:
        raise ValueError(f"--listen {listen!r}: port {port} is out of range")
    if host == "localhost":
        loopback = True
    else:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False  # a host name: where it resolves is not ours to guess
    if not loopback and not public:
        raise ValueError(f"--listen {listen!r} is not a loopback address. The pool browser has no "
                         "authentication: anyone who reaches it sees and downloads the whole pool. "
                         "Give --public to serve it there anyway (e.g. behind an authenticating proxy).")
    return host, port


# ------------------------------------------------------------------ the pool as seen by the app


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def fmt(v: Any, nd: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return "n/a" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def thresholds_text(t: Any) -> str:
    if not isinstance(t, dict):
        return "n/a"
    return f"τ_id {fmt(t.get('tau_id'), 3)} · τ_indep {fmt(t.get('tau_indep'), 3)} · δ {fmt(t.get('delta'), 3)}"


def record_checks(record: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(quantity, value, rule, passes) for the three filter criteria of a record."""
    raw = record.get("thresholds")
    t: dict[str, Any] = raw if isinstance(raw, dict) else {}
    rows = []
    for key, label, tk, sym in (("max_id_prob", "identity probability (φ_id, max)", "tau_id", "<"),
                                ("indep_id_prob", "identity probability (independent φ)", "tau_indep", "<"),
                                ("dcr", "distance to closest record (DCR)", "delta", ">")):
        v, thr = _num(record.get(key)), _num(t.get(tk))
        ok = None if v is None or thr is None else (v < thr if sym == "<" else v > thr)
        rows.append((label, fmt(record.get(key)), f"{sym} {tk} = {fmt(t.get(tk))}", ok))
    return rows


def record_title(e: dict[str, Any]) -> str:
    """The privacy record of one image as plain text (the grid's hover ``title``)."""
    r = e["record"]
    lines = [f"id {fmt(r.get('id'))}", f"class {e['class_name']} (label {fmt(r.get('label'))})",
             f"method {fmt(r.get('method'))}"]
    for label, value, rule, ok in record_checks(r):
        lines.append(f"{label}: {value} ({rule}{'' if ok is None else ', passes' if ok else ', FAILS'})")
    lines += [f"site {e['site_id']}", f"bundle {e['bundle_id'][:16]}", f"sha256 {e['sha256'][:16]}"]
    return "\n".join(lines)


@dataclass
class Snapshot:
    """One reading of the pool: bundles, catalog and what is derived from them."""

    taken: datetime
    bundles: list[dict[str, Any]]
    entries: list[dict[str, Any]]
    refused: list[str]
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_class: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    shas: set[str] = field(default_factory=set)
    by_image: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    serial: int = 0

    @classmethod
    def build(cls, bundles: list[dict[str, Any]], catalog: Catalog, serial: int = 0) -> Snapshot:
        snap = cls(datetime.now(timezone.utc), [], catalog.entries, list(catalog.refused), serial=serial)
        by_bundle: dict[str, list[dict[str, Any]]] = {}
        for e in catalog.entries:
            by_bundle.setdefault(e["bundle_id"], []).append(e)
            snap.by_class.setdefault(e["class_name"], []).append(e)
            snap.shas.add(e["sha256"])
            snap.by_image.setdefault((e["bundle_id"], e["sha256"]), []).append(e)
        for b in sorted(bundles, key=lambda b: (str(b.get("site_id")), str(b.get("received")))):
            if not is_safe_name(b.get("site_id")):
                snap.refused.append(f"bundle {str(b.get('bundle_id'))[:16]!r}: site id "
                                    f"{str(b.get('site_id'))[:80]!r} is not a safe name")
                continue
            es = by_bundle.get(b["bundle_id"], [])
            rounds = sorted({e["generator_round"] for e in es if e["generator_round"] is not None})
            thr = Counter(thresholds_text(e["record"].get("thresholds")) for e in es)
            bd = dict(b, entries=es, generator_rounds=rounds, thresholds=sorted(thr.items()))
            snap.bundles.append(bd)
            site = snap.sites.setdefault(b["site_id"], {"bundles": [], "n_images": 0, "per_class": Counter(),
                                                        "per_method": Counter(), "n_bytes": 0})
            site["bundles"].append(bd)
            site["n_images"] += int(b["n_images"])
            site["n_bytes"] += int(b["n_bytes"])
            site["per_class"].update(b["per_class"])
            site["per_method"].update(b["per_method"])
        return snap

    def entry(self, bundle_id: str, sha: str) -> list[dict[str, Any]]:
        return self.by_image.get((bundle_id, sha), [])


class ImageCache:
    """Verified image bytes by sha256, least recently used dropped first, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._d: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, sha: str) -> bytes | None:
        with self._lock:
            data = self._d.get(sha)
            if data is not None:
                self._d.move_to_end(sha)
            return data

    def put(self, sha: str, data: bytes) -> None:
        with self._lock:
            if sha in self._d or len(data) > self.max_bytes:
                return
            self._d[sha] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, old = self._d.popitem(last=False)
                self._size -= len(old)

    def __contains__(self, sha: str) -> bool:
        with self._lock:
            return sha in self._d


class NotAPng(RuntimeError):
    pass


def check_png(sha: str, data: bytes) -> bytes:
    """``data`` if it is a PNG that Pillow can read (its sha256 was checked on arrival)."""
    from PIL import Image

    if not data.startswith(PNG_MAGIC):
        raise NotAPng(f"image {sha[:12]}… from the pool is not a PNG")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as err:  # Pillow raises many kinds for a damaged file
        raise NotAPng(f"image {sha[:12]}… from the pool is a damaged PNG ({err})") from None
    return data


class PoolView:
    """The app's state: a snapshot of the pool refreshed when stale, an image cache, histograms."""

    def __init__(self, source: Source, settings: WebSettings = WebSettings(), reader_name: str = ""):
        self.source, self.settings, self.reader_name = source, settings, reader_name
        self.images = ImageCache(settings.cache_mb * 1024 * 1024)
        self._snap: Snapshot | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()
        self._plots: dict[tuple[int, str], bytes] = {}
        self._plot_lock = threading.Lock()  # matplotlib's font cache and pyplot state are not thread-safe

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._snap is None or time.monotonic() - self._read_at > self.settings.refresh_s:
                serial = 0 if self._snap is None else self._snap.serial + 1
                self._snap = Snapshot.build(self.source.bundles(), self.source.catalog(), serial)
                self._read_at = time.monotonic()
                with self._plot_lock:
                    self._plots.clear()
                for why in self._snap.refused:
                    LOG.warning("set aside: %s", why)
            return self._snap

    def image_bytes(self, shas: list[str]) -> dict[str, bytes]:
        """Verified PNG bytes of these images, fetching what the cache lacks in batches."""
        out = {s: d for s in shas if (d := self.images.get(s)) is not None}
        todo = [s for s in dict.fromkeys(shas) if s not in out]
        for i in range(0, len(todo), FETCH_BATCH):
            for sha, data in self.source.fetch_images(todo[i: i + FETCH_BATCH]).items():
                out[sha] = check_png(sha, data)
                self.images.put(sha, data)
        return out

    def histogram_png(self, snap: Snapshot, site: str) -> bytes:
        key = (snap.serial, site)
        with self._plot_lock:
            if key not in self._plots:
                entries = [e for b in snap.sites[site]["bundles"] for e in b["entries"]]
                self._plots[key] = histogram_png(site, [e["record"] for e in entries])
            return self._plots[key]


def histogram_png(site: str, records: list[dict[str, Any]]) -> bytes:
    """Two panels: DCR (with δ) and identity probabilities (with τ_id, τ_indep), as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def values(key: str) -> list[float]:
        return [v for r in records if (v := _num(r.get(key))) is not None]

    def thresholds(key: str) -> list[float]:
        return sorted({v for r in records if isinstance(r.get("thresholds"), dict)
                       and (v := _num(r["thresholds"].get(key))) is not None})

    fig = Figure(figsize=(7.2, 2.6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    dcr = values("dcr")
    ax1.hist(dcr, bins=30, color="tab:blue", alpha=0.8)
    for d in thresholds("delta"):
        ax1.axvline(d, color="tab:red", lw=1.2, ls="--", label=f"δ = {d:.3g}")
    ax1.set_title(f"{site}: DCR (n = {len(dcr)}), kept if > δ", fontsize=9)
    ax1.set_xlabel("distance to closest real record", fontsize=8)
    ax2.hist([values("max_id_prob"), values("indep_id_prob")], bins=30, range=(0, 1),
             color=["tab:purple", "tab:orange"], label=["φ_id max", "independent φ"], alpha=0.8)
    for t in thresholds("tau_id"):
        ax2.axvline(t, color="tab:purple", lw=1.2, ls="--", label=f"τ_id = {t:.3g}")
    for t in thresholds("tau_indep"):
        ax2.axvline(t, color="tab:orange", lw=1.2, ls=":", label=f"τ_indep = {t:.3g}")
    ax2.set_title(f"{site}: identity probability, kept if < τ", fontsize=9)
    ax2.set_xlabel("probability of the most likely real identity", fontsize=8)
    for ax in (ax1, ax2):
        ax.set_ylabel("images", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------ HTML


def when(iso: Any) -> str:
    """An ISO 8601 time as ``YYYY-MM-DD HH:MM:SS`` (+ ``UTC`` or its offset); other text unchanged."""
    try:
        t = datetime.fromisoformat(str(iso))
    except ValueError:
        return str(iso)
    off = t.utcoffset()
    zone = "" if off is None else " UTC" if not off else " " + t.strftime("%z")
    return t.strftime("%Y-%m-%d %H:%M:%S") + zone


def url(path: str, **params: Any) -> str:
    q = {k: v for k, v in params.items() if v is not None and v != ""}
    return path + ("?" + urlencode(q) if q else "")


BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}{% endblock %} · PLAN pool</title>
<style>
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:baseline;flex-wrap:wrap}
header a{color:#fff;text-decoration:none;font-weight:600}
header .meta{font-size:12px;opacity:.85}
main{padding:16px 20px;max-width:1400px}
h1{font-size:20px;margin:4px 0 12px} h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #d5d9e0;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;background:#fff;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d5d9e0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.nw,span.nw{white-space:nowrap} .scroll{overflow-x:auto}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.card{background:#fff;border:1px solid #d5d9e0;border-radius:6px;padding:10px 14px;margin:10px 0}
.pill{display:inline-block;background:#e6edf7;border-radius:10px;padding:1px 8px;margin:1px 3px 1px 0;font-size:12px}
a.pill{color:#1f3a5f;text-decoration:none} a.pill:hover{background:#cddcf0}
.warn{background:#fff4e5;border:1px solid #f0b95c;padding:8px 12px;border-radius:6px}
.grid{display:flex;flex-wrap:wrap;gap:8px}
.grid figure{margin:0;background:#fff;border:1px solid #d5d9e0;border-radius:4px;padding:4px;width:118px;text-align:center}
.grid img{width:96px;height:96px;image-rendering:pixelated;background:#000;display:block;margin:0 auto}
.grid figcaption{font-size:11px;color:#4a5566;line-height:1.25;margin-top:2px}
.pager{margin:10px 0;display:flex;gap:12px;align-items:center}
.pass{color:#17692b;font-weight:600} .fail{color:#b00020;font-weight:600}
.big{width:256px;height:256px;image-rendering:pixelated;background:#000;border:1px solid #d5d9e0}
.row{display:flex;gap:20px;flex-wrap:wrap;align-items:flex-start}
.hist{max-width:100%;border:1px solid #d5d9e0;background:#fff}
.dl{font-weight:600}
</style></head><body>
<header><a href="/">PLAN synthetic-image pool</a>
<span class="meta">pool {{ pool }} · reader {{ reader }} · catalog read {{ taken|when }} · read-only</span></header>
<main>{% block body %}{% endblock %}</main></body></html>
"""

INDEX = """{% extends "base.html" %}{% block title %}overview{% endblock %}{% block body %}
<h1>{{ sites|length }} site(s), {{ n_bundles }} bundle(s), {{ n_images }} image(s)</h1>
<p><a class="dl" href="{{ url('/download.zip') }}" download>Download the whole pool (zip, with manifest.json)</a>
{% if classes %} · classes:
{% for c, n in classes %}<a class="pill" href="{{ url('/grid', cls=c) }}">{{ c }}: {{ n }}</a>{% endfor %}{% endif %}</p>
{% if refused %}<div class="warn"><b>{{ refused|length }} catalog entr{{ 'y' if refused|length == 1 else 'ies' }} set aside</b>
(unsafe names or malformed records from the pool):<ul>{% for r in refused[:20] %}<li>{{ r }}</li>{% endfor %}</ul></div>{% endif %}
{% if not sites %}<p>The pool holds no bundles yet.</p>{% endif %}
{% for name, s in sites %}
<section class="card" id="site-{{ loop.index }}">
<h2>{{ name }}</h2>
<p>{{ s.bundles|length }} bundle(s), <b>{{ s.n_images }}</b> image(s), {{ '%.2f'|format(s.n_bytes / 1e6) }} MB ·
<a class="dl" href="{{ url('/download.zip', site=name) }}" download>download this site's part</a></p>
<p>per class: {% for c, n in s.per_class|dictsort %}<a class="pill" href="{{ url('/grid', cls=c, site=name) }}">{{ c }}: {{ n }}</a>{% endfor %}
· per method: {% for m, n in s.per_method|dictsort %}<span class="pill">{{ m }}: {{ n }}</span>{% endfor %}</p>
<div class="scroll"><table><tr><th>bundle</th><th>created</th><th>received</th><th>generator round</th><th>generator digest</th>
<th>config digest</th><th>method(s)</th><th>thresholds</th><th>per class</th><th>images</th><th>MB</th></tr>
{% for b in s.bundles %}<tr>
<td class="mono" title="{{ b.bundle_id }}">{{ b.bundle_id[:16] }}</td>
<td class="nw" title="{{ b.created }}">{{ b.created|when }}</td><td class="nw" title="{{ b.received }}">{{ b.received|when }}</td>
<td>{{ b.generator_rounds|join(', ') if b.generator_rounds else 'n/a' }}</td>
<td class="mono" title="{{ b.generator_sha256 }}">{{ b.generator_sha256[:16] }}</td>
<td class="mono" title="{{ b.config_sha256 }}">{{ b.config_sha256[:16] }}</td>
<td class="nw">{% for m, n in b.per_method|dictsort %}{{ m }}: {{ n }}{% if not loop.last %}<br>{% endif %}{% endfor %}</td>
<td>{% for t, n in b.thresholds %}{% for part in t.split(' · ') %}<span class="nw">{{ part }}</span> {% endfor %}{% if b.thresholds|length > 1 %} ({{ n }}){% endif %}{% if not loop.last %}<br>{% endif %}{% endfor %}</td>
<td class="nw">{% for c, n in b.per_class|dictsort %}{{ c }}: {{ n }}{% if not loop.last %}<br>{% endif %}{% endfor %}</td>
<td class="num">{{ b.n_images }}</td><td class="num">{{ '%.2f'|format(b.n_bytes / 1e6) }}</td></tr>{% endfor %}
</table></div>
<img class="hist" src="{{ url('/hist.png', site=name) }}" alt="DCR and identity-probability histograms of {{ name }}">
</section>{% endfor %}
{% endblock %}"""

GRID = """{% extends "base.html" %}{% block title %}{{ cls }}{% endblock %}{% block body %}
<h1>class {{ cls }}{% if site %} · site {{ site }}{% else %} · all sites{% endif %}</h1>
<p>{{ total }} image(s). Hover over an image for its privacy record, click it for the details.
{% if site %}<a href="{{ url('/grid', cls=cls) }}">all sites</a>{% endif %}
{% for s in sites %}{% if s != site %} · <a href="{{ url('/grid', cls=cls, site=s) }}">{{ s }}</a>{% endif %}{% endfor %}</p>
{% macro pager() %}<div class="pager">
{% if page > 1 %}<a href="{{ url('/grid', cls=cls, site=site, page=page - 1) }}" rel="prev">← previous</a>{% endif %}
<span>page {{ page }} of {{ pages }} · images {{ first }}–{{ last }} of {{ total }}</span>
{% if page < pages %}<a href="{{ url('/grid', cls=cls, site=site, page=page + 1) }}" rel="next">next →</a>{% endif %}
</div>{% endmacro %}
{{ pager() }}
<div class="grid">{% for e in items %}
<figure><a href="{{ url('/image', bundle=e.bundle_id, sha=e.sha256) }}">
<img src="/img/{{ e.sha256 }}.png" alt="{{ cls }} image {{ e.sha256[:12] }}" title="{{ e.title }}" width="96" height="96"></a>
<figcaption>{{ fmt(e.record.get('method')) }} · DCR {{ fmt(e.record.get('dcr'), 2) }}<br>id p {{ fmt(e.record.get('max_id_prob'), 2) }} · {{ e.site_id }}</figcaption>
</figure>{% endfor %}</div>
{{ pager() }}
{% endblock %}"""

DETAIL = """{% extends "base.html" %}{% block title %}image {{ e.sha256[:12] }}{% endblock %}{% block body %}
<h1>image {{ e.sha256[:16] }}… · class {{ e.class_name }}</h1>
<p><a href="{{ url('/grid', cls=e.class_name, site=e.site_id) }}">← class {{ e.class_name }} of {{ e.site_id }}</a></p>
<div class="row"><img class="big" src="/img/{{ e.sha256 }}.png" alt="image {{ e.sha256[:12] }}">
<div><h3>privacy record</h3>
<table id="record"><tr><th>criterion</th><th>value</th><th>kept if</th><th></th></tr>
{% for label, value, rule, ok in checks %}<tr><td>{{ label }}</td><td class="num">{{ value }}</td><td>{{ rule }}</td>
<td>{% if ok is none %}n/a{% elif ok %}<span class="pass">passes</span>{% else %}<span class="fail">FAILS</span>{% endif %}</td></tr>{% endfor %}
</table>
<table><tr><th>key</th><th>value</th></tr>{% for k, v in record %}<tr><td>{{ k }}</td><td class="mono">{{ v }}</td></tr>{% endfor %}</table>
</div>
<div><h3>provenance</h3>
<table><tr><th>site</th><td>{{ e.site_id }}</td></tr><tr><th>bundle</th><td class="mono">{{ e.bundle_id }}</td></tr>
<tr><th>created</th><td>{{ e.created|when }}</td></tr><tr><th>generator round</th><td>{{ fmt(e.generator_round) }}</td></tr>
<tr><th>generator sha256</th><td class="mono">{{ e.generator_sha256 }}</td></tr>
<tr><th>config sha256</th><td class="mono">{{ e.config_sha256 }}</td></tr>
<tr><th>image sha256</th><td class="mono">{{ e.sha256 }}</td></tr><tr><th>size</th><td>{{ e.size }} bytes</td></tr></table>
{% if others %}<p>The same image is also in {{ others }} other record(s) of this bundle.</p>{% endif %}
</div></div>
{% endblock %}"""

ERROR = """{% extends "base.html" %}{% block title %}error{% endblock %}{% block body %}
<h1>{{ status }}</h1><p class="warn">{{ message }}</p><p><a href="/">overview</a></p>{% endblock %}"""

_ENV = jinja2.Environment(
    loader=jinja2.DictLoader({"base.html": BASE, "index.html": INDEX, "grid.html": GRID, "detail.html": DETAIL,
                              "error.html": ERROR}),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
)
_ENV.globals.update(url=url, fmt=fmt)
_ENV.filters["when"] = when


def _chrome(snap: Snapshot | None, pool: str, reader: str) -> dict[str, Any]:
    taken = snap.taken.isoformat(timespec="seconds") if snap else "n/a"
    return {"pool": pool, "reader": reader or "n/a", "taken": taken}


def render_index(snap: Snapshot, pool: str, reader: str = "") -> str:
    classes = sorted(Counter({c: len(es) for c, es in snap.by_class.items()}).items())
    return _ENV.get_template("index.html").render(
        **_chrome(snap, pool, reader), sites=sorted(snap.sites.items()), n_bundles=len(snap.bundles),
        n_images=sum(s["n_images"] for s in snap.sites.values()), classes=classes, refused=snap.refused)


def grid_page(snap: Snapshot, cls: str, site: str | None, page: int, page_size: int) -> dict[str, Any]:
    """The entries of one page of a class grid (page is clamped into range)."""
    es = [e for e in snap.by_class.get(cls, []) if site is None or e["site_id"] == site]
    pages = max(1, -(-len(es) // page_size))
    page = min(max(1, page), pages)
    items = es[(page - 1) * page_size: page * page_size]
    sites = sorted({e["site_id"] for e in snap.by_class.get(cls, [])})
    return {"cls": cls, "site": site, "page": page, "pages": pages, "total": len(es), "sites": sites,
            "first": (page - 1) * page_size + 1 if items else 0, "last": (page - 1) * page_size + len(items),
            "items": [dict(e, title=record_title(e)) for e in items]}


def render_grid(snap: Snapshot, pool: str, reader: str, page: dict[str, Any]) -> str:
    return _ENV.get_template("grid.html").render(**_chrome(snap, pool, reader), **page)


def render_detail(snap: Snapshot, pool: str, reader: str, entries: list[dict[str, Any]]) -> str:
    e = entries[0]
    record = [(k, json.dumps(v) if isinstance(v, (dict, list)) else fmt(v, 6)) for k, v in e["record"].items()]
    return _ENV.get_template("detail.html").render(**_chrome(snap, pool, reader), e=e, checks=record_checks(e["record"]),
                                                   record=record, others=len(entries) - 1)


def render_error(status: int, message: str, pool: str, reader: str = "", snap: Snapshot | None = None) -> str:
    return _ENV.get_template("error.html").render(**_chrome(snap, pool, reader), status=status, message=message)


# ------------------------------------------------------------------ zip download


def pull_manifest(pool: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``manifest.json`` of a download: the layout and keys of ``pool pull``'s manifest."""
    images: list[dict[str, Any]] = []
    bundles: dict[str, Any] = {}
    for e in entries:
        r = e["record"]
        images.append({"file": f"{e['class_name']}/{e['sha256']}.png", "sha256": e["sha256"],
                       "class_name": e["class_name"], "label": r.get("label"), "method": r.get("method"),
                       "site_id": e["site_id"], "bundle_id": e["bundle_id"], "generator_sha256": e["generator_sha256"],
                       "config_sha256": e["config_sha256"], "generator_round": e["generator_round"], "record": r})
        b = bundles.setdefault(e["bundle_id"], {
            "bundle_id": e["bundle_id"], "site_id": e["site_id"], "created": e["created"],
            "generator_sha256": e["generator_sha256"], "config_sha256": e["config_sha256"],
            "generator_round": e["generator_round"], "n_images": 0})
        b["n_images"] += 1
    return {"format": "plan-pool-pull/1", "pool": pool,
            "pulled": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "n_images": len(images), "n_files": len({i["file"] for i in images}),
            "bundles": list(bundles.values()), "images": images}


class _Sink:
    """A write-only file for :class:`zipfile.ZipFile` whose bytes are taken out as they come."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, b: bytes) -> int:
        self.buf += b
        return len(b)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


def zip_stream(entries: list[dict[str, Any]], fetch: Callable[[list[str]], dict[str, bytes]],
               pool: str) -> Iterator[bytes]:
    """The images of ``entries`` as ``<class>/<sha256>.png`` plus ``manifest.json``, streamed."""
    files: dict[str, str] = {}  # zip path -> sha (identical content under one class: once)
    for e in entries:
        files.setdefault(f"{e['class_name']}/{e['sha256']}.png", e["sha256"])
    sink = _Sink()
    paths = list(files)
    with zipfile.ZipFile(cast(IO[bytes], sink), "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
        for i in range(0, len(paths), FETCH_BATCH):
            chunk = paths[i: i + FETCH_BATCH]
            got = fetch([files[p] for p in chunk])
            for p in chunk:
                zf.writestr(zipfile.ZipInfo(p, date_time=(2020, 1, 1, 0, 0, 0)), got[files[p]])
            yield sink.take()
        zf.writestr("manifest.json", json.dumps(pull_manifest(pool, entries), indent=1) + "\n",
                    compress_type=zipfile.ZIP_DEFLATED)
    yield sink.take()


# ------------------------------------------------------------------ the app


def create_app(view: PoolView):
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import HTMLResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from server.pool.client import PoolClientError

    app = FastAPI(title="PLAN pool browser", docs_url=None, redoc_url=None, openapi_url=None)
    pool, reader = view.source.pool, view.reader_name

    @app.middleware("http")
    async def headers(request: Request, call_next):
        resp = await call_next(request)
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Frame-Options"] = "DENY"
        return resp

    def error(status: int, message: str) -> HTMLResponse:
        return HTMLResponse(render_error(status, message, pool, reader), status_code=status)

    @app.exception_handler(PoolClientError)
    async def pool_error(request: Request, err: PoolClientError):
        LOG.warning("%s %s: %s", request.method, request.url.path, err)
        return error(502, f"the pool could not be read: {err}")

    @app.exception_handler(NotAPng)
    async def not_png(request: Request, err: NotAPng):
        LOG.warning("%s", err)
        return error(502, str(err))

    @app.get("/", response_class=HTMLResponse)
    def index():
        return render_index(view.snapshot(), pool, reader)

    @app.get("/grid", response_class=HTMLResponse)
    def grid(cls: str, site: str | None = None, page: int = Query(1, ge=1)):
        snap = view.snapshot()
        if cls not in snap.by_class:
            return error(404, f"no class {cls!r} in the pool")
        if site is not None and site not in snap.sites:
            return error(404, f"no site {site!r} in the pool")
        pg = grid_page(snap, cls, site, page, view.settings.page_size)
        try:  # one batched fetch warms the page's images
            view.image_bytes([e["sha256"] for e in pg["items"]])
        except (PoolClientError, NotAPng) as err:  # each image then fails or loads on its own
            LOG.warning("prefetch of a page of class %r: %s", cls, err)
        return render_grid(snap, pool, reader, pg)

    @app.get("/image", response_class=HTMLResponse)
    def image(bundle: str, sha: str):
        snap = view.snapshot()
        entries = snap.entry(bundle, sha)
        if not entries:
            return error(404, f"no image {sha[:64]!r} in bundle {bundle[:64]!r}")
        return render_detail(snap, pool, reader, entries)

    @app.get("/img/{name}")
    def img(name: str):
        sha = name[:-4] if name.endswith(".png") else ""
        if not _SHA.match(sha) or sha not in view.snapshot().shas:
            return Response(status_code=404)
        data = view.image_bytes([sha])[sha]
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400, immutable"})

    @app.get("/hist.png")
    def hist(site: str):
        snap = view.snapshot()
        if site not in snap.sites:
            return Response(status_code=404)
        return Response(view.histogram_png(snap, site), media_type="image/png")

    @app.get("/download.zip")
    async def download(site: str | None = None):
        snap = await run_in_threadpool(view.snapshot)
        if site is not None and site not in snap.sites:
            return error(404, f"no site {site!r} in the pool")
        entries = [e for e in snap.entries if site is None or e["site_id"] == site]
        name = f"pool-{site}.zip" if site else "pool.zip"  # site ids are safe names (reader_api)
        return StreamingResponse(zip_stream(entries, view.image_bytes, pool), media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="{name}"'})

    return app


def listen_socket(host: str, port: int):
    """A bound, listening TCP socket (port 0: any free port); OSError names the address."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve_web(pool: str, credentials, listen: str = "127.0.0.1:8061", public: bool = False,
              settings: WebSettings = WebSettings(), server_name: str | None = None,
              log: Callable[[str], None] = print) -> None:
    """Run the pool browser until Ctrl-C / SIGTERM (see the module docstring)."""
    import uvicorn

    from server.pool.reader_api import PoolReader

    host, port = parse_listen(listen, public)
    sock = listen_socket(host, port)
    try:
        with PoolReader(pool, credentials, server_name=server_name) as source:
            view = PoolView(source, settings, reader_name=source.creds.name)
            view.snapshot()  # fail now, with the pool's reason, if the pool cannot be read
            bound = sock.getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            if public:
                log(f"WARNING: serving on {shown}:{bound} with --public: the pool browser has no authentication; "
                    "anyone who reaches this address can see and download the whole pool")
            log(f"pool browser for {pool} at http://{shown}:{bound}/ (read-only; Ctrl-C stops)")
            server = uvicorn.Server(uvicorn.Config(create_app(view), log_level="warning", access_log=False))
            server.run(sockets=[sock])
    finally:
        sock.close()
