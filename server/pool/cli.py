"""``plan-server pool serve|check|ls|pull|web`` (registered in server/cli.py).

Also runnable alone, without the rest of the server CLI: ``python -m server.pool serve ...``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from plan_shared.config import PoolConfig, PoolLimitsConfig

_L = PoolLimitsConfig()  # the documented defaults (plan_shared/config.py)

app = typer.Typer(
    help="The shared pool of synthetic images: serve it, check it, list and pull it.\n\n"
    "Example: plan-server pool serve --store pool --certs certs --address 0.0.0.0:50061",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(msg: str, code: int = 1) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@app.command("serve")
def serve_cmd(
    store: Path = typer.Option(..., "--store", help="Store folder (created): objects/, index.sqlite."),
    certs: Path = typer.Option(..., "--certs", help="Credentials folder made by `plan-server certs init`."),
    address: str = typer.Option("127.0.0.1:50061", "--address", help="HOST:PORT to listen on (port 0: any free port)."),
    max_images: int = typer.Option(100_000, "--max-images", min=1, help="Most images in one bundle."),
    max_image_kb: int = typer.Option(8192, "--max-image-kb", min=1, help="Largest image file, KiB."),
    max_bundle_mb: int = typer.Option(4096, "--max-bundle-mb", min=1, help="Largest bundle (images + report), MiB."),
    max_tau_id: float | None = typer.Option(None, "--max-tau-id", help="Refuse records whose tau_id is above this."),
    max_tau_indep: float | None = typer.Option(None, "--max-tau-indep", help="Refuse records whose tau_indep is above this."),
    min_delta: float | None = typer.Option(None, "--min-delta", help="Refuse records whose delta is below this."),
    policy_file: Path | None = typer.Option(
        None, "--policy", help="The federation's policy file (JSON, plan_shared/policy.py; written by `coordinate`), "
        "re-read whenever it changes. Replaces --max-tau-id/--max-tau-indep/--min-delta."),
    workers: int = typer.Option(_L.workers, "--workers", min=2, help="Threads serving calls."),
    max_streams: int = typer.Option(_L.max_streams_per_identity, "--max-streams-per-identity", min=1,
                                    help="Open streams per certificate identity (below --workers)."),
    idle_timeout_s: float = typer.Option(_L.idle_timeout_s, "--idle-timeout-s", help="Abort an Offer/Push stream idle this long."),
    call_timeout_s: float = typer.Option(_L.call_timeout_s, "--call-timeout-s", help="Abort an Offer/Push stream open this long."),
    site_quota_mb: float = typer.Option(_L.site_quota_mb, "--site-quota-mb", help="MiB one site may store."),
    site_quota_images: int = typer.Option(_L.site_quota_images, "--site-quota-images", help="Images one site may store."),
    max_manifest_kb: int = typer.Option(_L.max_manifest_kb, "--max-manifest-kb", min=1,
                                        help="Largest bundle manifest, KiB (checked while it arrives)."),
    max_field_chars: int = typer.Option(_L.max_field_chars, "--max-field-chars", help="Longest text field of a bundle."),
    keep_interrupted_s: float = typer.Option(_L.keep_interrupted_s, "--keep-interrupted-s",
                                             help="Keep a cut push's verified files this long for a retry (0: remove at once)."),
    page_kb: int = typer.Option(_L.page_kb, "--page-kb", help="List page / Catalog batch size, KiB."),
    port_file: Path | None = typer.Option(None, "--port-file", help="Write the bound port here once listening."),
) -> None:
    """Run the pool service (gRPC, mutual TLS) until Ctrl-C / SIGTERM.

    Example: plan-server pool serve --store pool --certs certs --address 0.0.0.0:50061
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from pydantic import ValidationError

    from plan_shared.bundle import BundleLimits, ThresholdPolicy
    from plan_shared.credentials import CredentialsError
    from server.pool.service import serve

    limits = BundleLimits(max_images=max_images, max_image_bytes=max_image_kb * 1024,
                          max_bundle_bytes=max_bundle_mb * 1024 * 1024, max_manifest_bytes=max_manifest_kb * 1024)
    from plan_shared.policy import PolicyFileError

    if policy_file is not None and any(v is not None for v in (max_tau_id, max_tau_indep, min_delta)):
        _fail("--policy replaces --max-tau-id/--max-tau-indep/--min-delta: put the bounds in the policy file", 2)
    policy = ThresholdPolicy(max_tau_id=max_tau_id, max_tau_indep=max_tau_indep, min_delta=min_delta)
    try:
        pool_limits = PoolLimitsConfig(
            workers=workers, max_streams_per_identity=max_streams, idle_timeout_s=idle_timeout_s,
            call_timeout_s=call_timeout_s, site_quota_mb=site_quota_mb, site_quota_images=site_quota_images,
            max_manifest_kb=max_manifest_kb, max_field_chars=max_field_chars, keep_interrupted_s=keep_interrupted_s,
            page_kb=page_kb)
    except ValidationError as err:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'limits'}: {e['msg']}" for e in err.errors()))
    try:
        serve(store, certs, address, limits, policy, pool_limits, port_file, policy_file)
    except (CredentialsError, RuntimeError, PolicyFileError) as err:
        _fail(str(err))


@app.command("check")
def check_cmd(
    store: Path = typer.Option(..., "--store", help="Store folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Verify every stored file against the index; exit 1 on any problem.

    Files of interrupted uploads (collected at the next start) are listed but are not problems.

    Example: plan-server pool check --store pool
    """
    from tqdm import tqdm

    from server.pool.store import Store, StoreError

    try:
        st = Store(store, create=False, readonly=True)
    except StoreError as err:
        _fail(str(err), 2)
    bar = tqdm(unit="file", desc="check", disable=not progress)

    def tick(i: int, n: int) -> None:
        bar.total = n
        bar.update(1)

    rep = st.check(progress=tick)
    bar.close()
    st.close()
    for g in rep.garbage:
        typer.echo(f"garbage: {g}")
    for p in rep.problems:
        typer.echo(f"PROBLEM: {p}")
    typer.echo(f"{rep.n_bundles} bundles, {rep.n_objects} files, {len(rep.problems)} problems, "
               f"{len(rep.garbage)} garbage entries")
    if rep.problems:
        raise typer.Exit(1)


@app.command("quarantine")
def quarantine_cmd(
    store: Path = typer.Option(..., "--store", help="Store folder."),
    site: str | None = typer.Option(None, "--site", help="Site to hide; without it: list the quarantine."),
    reason: str = typer.Option("quarantined by the operator", "--reason", help="Why (shown by the list)."),
) -> None:
    """Hide a site's bundles from List, Catalog and pull (kept on disk); works while the service runs.

    The service does this by itself for a site that `plan-server certs revoke` revoked.

    Example: plan-server pool quarantine --store pool --site hospital-b --reason "audit"
    """
    from server.pool.store import Store, StoreError

    try:
        st = Store(store, create=False)
    except StoreError as err:
        _fail(str(err), 2)
    try:
        if site is None:
            rows = st.quarantine_list()
            for r in rows:
                state = "quarantined" if r["quarantined"] else "visible"
                typer.echo(f"{r['site_id']}: {state} ({r['reason']}) since {r['since']}")
            if not rows:
                typer.echo("no site is quarantined")
            return
        changed = st.quarantine(site, reason)
    finally:
        st.close()
    typer.echo(f"{site}: quarantined ({reason})" if changed else f"{site}: was already quarantined")


@app.command("restore")
def restore_cmd(
    store: Path = typer.Option(..., "--store", help="Store folder."),
    site: str = typer.Option(..., "--site", help="Site whose bundles become visible again."),
) -> None:
    """Lift a site's quarantine (also one the service set on revocation); works while the service runs.

    Example: plan-server pool restore --store pool --site hospital-b
    """
    from server.pool.store import Store, StoreError

    try:
        st = Store(store, create=False)
    except StoreError as err:
        _fail(str(err), 2)
    try:
        n_bundles, n_images = st.restore(site)
    except StoreError as err:
        _fail(str(err))
    finally:
        st.close()
    typer.echo(f"{site}: restored ({n_bundles} bundle(s), {n_images} images visible again)")


@app.command("ls")
def ls_cmd(
    pool: str = typer.Option(..., "--pool", help="HOST:PORT of the pool service."),
    credentials: Path = typer.Option(..., "--credentials", help="A reader's own keys folder (`plan-client keys init --role reader` + `keys install`)."),
    site: str | None = typer.Option(None, "--site", help="Only this site."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    server_name: str | None = typer.Option(None, "--server-name", help="Expected name in the server certificate."),
) -> None:
    """List the stored bundles per site, with image counts.

    Example: plan-server pool ls --pool pool.example.org:9444 --credentials alice
    """
    import json

    from plan_shared.credentials import CredentialsError
    from server.pool.client import PoolClientError, list_bundles

    try:
        bundles = list_bundles(pool, credentials, site, server_name=server_name)
    except (PoolClientError, CredentialsError) as err:
        _fail(str(err))
    if as_json:
        typer.echo(json.dumps(bundles, indent=1))
        return
    by_site: dict[str, list[dict]] = {}
    for b in bundles:
        by_site.setdefault(b["site_id"], []).append(b)
    total = 0
    for s, bs in sorted(by_site.items()):
        n = sum(b["n_images"] for b in bs)
        total += n
        typer.echo(f"{s}: {len(bs)} bundle(s), {n} images")
        for b in bs:
            classes = ", ".join(f"{k}={v}" for k, v in sorted(b["per_class"].items()))
            methods = ", ".join(f"{k}={v}" for k, v in sorted(b["per_method"].items()))
            typer.echo(f"  {b['bundle_id'][:16]}  {b['n_images']:6d} images  {b['n_bytes'] / 1e6:8.2f} MB  "
                       f"received {b['received']}  [{classes}] [{methods}]")
    typer.echo(f"total: {len(bundles)} bundle(s), {total} images, {len(by_site)} site(s)")


@app.command("pull")
def pull_cmd(
    pool: str = typer.Option(..., "--pool", help="HOST:PORT of the pool service."),
    credentials: Path = typer.Option(..., "--credentials", help="A reader's own keys folder (`plan-client keys init --role reader` + `keys install`)."),
    out: Path = typer.Option(..., "--out", help="Output folder: <class>/<sha256>.png, manifest.json, DATASHEET.md."),
    fmt: str = typer.Option("imagefolder", "--format",
                            help="imagefolder: the folder only; npz: also OUT/pool.npz in the MedMNIST format "
                                 "(all images in train_*, val_*/test_* empty, class_names)."),
    site: str | None = typer.Option(None, "--site", help="Only this site's images."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash files already present instead of trusting name+size."),
    retries: int = typer.Option(PoolConfig().retries, "--retries", min=0,
                                help="Retries of a failed call (exponential backoff; config pool.retries)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    server_name: str | None = typer.Option(None, "--server-name", help="Expected name in the server certificate."),
) -> None:
    """Pull the pooled data set; a second pull into the same folder fetches only what is new.

    Every image must arrive complete and verified, otherwise the exit status is 1 and the
    message names what is missing. The folder reads back as a data set: --data OUT (or
    --data OUT/pool.npz with --format npz), or plan_shared.pool_dataset.PooledDataset(OUT).

    Example: plan-server pool pull --pool pool.example.org:9444 --credentials alice --out pooled --format npz
    """
    from plan_shared.credentials import CredentialsError
    from server.pool.client import PoolClientError, pull

    try:
        res = pull(pool, credentials, out, site, retries=retries, progress=progress, verify=verify,
                   server_name=server_name, log=lambda m: typer.echo(m, err=True), fmt=fmt)
    except (PoolClientError, CredentialsError) as err:
        _fail(str(err))
    typer.echo(f"pulled {res.n_fetched} new file(s), {res.bytes_fetched / 1e6:.2f} MB in {res.seconds:.1f} s; "
               f"{out} now holds {res.n_files} file(s) for {res.n_images} image record(s)")
    if res.npz is not None:
        typer.echo(f"MedMNIST-format copy: {res.npz} (read it with --data {res.npz})")


@app.command("web")
def web_cmd(
    pool: str = typer.Option(..., "--pool", help="HOST:PORT of the pool service."),
    credentials: Path = typer.Option(..., "--credentials", help="A reader's own keys folder (`plan-client keys init --role reader` + `keys install`)."),
    listen: str = typer.Option("127.0.0.1:8061", "--listen", help="HOST:PORT to serve on (loopback unless --public)."),
    public: bool = typer.Option(False, "--public", help="Allow a non-loopback --listen. The page has NO "
                                "authentication: anyone who reaches it sees and downloads the whole pool."),
    page_size: int = typer.Option(60, "--page-size", min=1, max=1000, help="Images per page of a class grid."),
    cache_mb: int = typer.Option(128, "--cache-mb", min=1, help="Memory for verified images, MiB."),
    refresh_s: float = typer.Option(30.0, "--refresh-s", min=0, help="Read the catalog again when older than this."),
    server_name: str | None = typer.Option(None, "--server-name", help="Expected name in the server certificate."),
) -> None:
    """Serve a read-only web page of the pool: bundles per site with provenance, class grids,
    privacy records, histograms and zip downloads.

    Example: plan-server pool web --pool pool.example.org:9444 --credentials alice --listen 127.0.0.1:8061
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from plan_shared.credentials import CredentialsError
    from server.pool.client import PoolClientError
    from server.pool.web import WebSettings, parse_listen, serve_web

    try:
        parse_listen(listen, public)
    except ValueError as err:
        _fail(str(err), 2)
    try:
        serve_web(pool, credentials, listen, public, WebSettings(page_size=page_size, cache_mb=cache_mb,
                                                                 refresh_s=refresh_s),
                  server_name=server_name, log=lambda m: typer.echo(m, err=True))
    except (PoolClientError, CredentialsError, OSError) as err:
        _fail(str(err))
