"""``plan-server demo``: the whole product on one machine.

N simulated hospitals (Flower simulation engine) partitioned from one data set train a
generator together; each runs PLAN on its own images and exports only filtered images,
signed, to a real pool service (a child process, mutual TLS); the coordinator pulls
the pool, trains phi_down and the hospitals score it on their real test splits; the
report is written to ``OUT/report.json`` and ``OUT/report.md``, the pooled data set to
``OUT/pool/``.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

LOG = logging.getLogger("plan.demo")
DEMO_PRESET = "presets/demo.yaml"
READER = "coordinator"  # the reader identity the demo's coordinator pulls the pool as


def demo_preset_path() -> Path:
    return Path(str(resources.files("server").joinpath(DEMO_PRESET)))


def preset_path(name: str) -> Path:
    """``server/presets/<name>.yaml``: demo (the default, ~15 min on 2 cores) or quality (64 px, longer rounds)."""
    root = Path(str(resources.files("server").joinpath("presets")))
    known = sorted(q.stem for q in root.glob("*.yaml"))
    if name not in known:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(known)}")
    return root / f"{name}.yaml"


def make_credentials(certs: Path, keys: Path, sites: list[str], reader: str = READER) -> None:
    """CA + server certificate for loopback in ``certs``; each site's and the reader's own keys under ``keys``.

    The identities are enrolled the way a hospital's are (``keys init`` in
    ``keys/sites/NAME`` or ``keys/readers/NAME``, ``certs enroll``, ``keys install``),
    only on one machine: ``certs`` ends up with public keys alone. Reused when present.
    """
    from plan_shared.credentials import CLIENT_CERT, identity_dir
    from server.certs import init_ca, issue, read_registry

    if not (certs / "ca.key").is_file():
        init_ca(certs, ["localhost", "127.0.0.1"])
    known = read_registry(certs).get("identities", {})
    for name, role in [*((s, "site") for s in sites), (reader, "reader")]:
        folder = identity_dir(keys, name, role)
        if name in known and (folder / CLIENT_CERT).is_file():
            continue
        issue(certs, name, role, folder, force=name in known)


def run_demo(
    out: Path,
    sites: int = 3,
    dataset: str | None = "pneumoniamnist",
    data: str | None = None,
    method: str | None = None,
    k: int | None = None,
    rounds: int | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    from plan_shared.credentials import identity_dir
    from server.pool.process import PoolProcess
    from server.simulate import run_simulation, simulation_config

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    certs, keys = out / "certs", out / "keys"
    names = [f"site-{i}" for i in range(sites)]
    make_credentials(certs, keys, names)
    ov: dict[str, Any] = dict(overrides or {})
    # The virtual sites find their own folders in keys/sites/NAME, the coordinator its reader in
    # keys/readers/NAME; the pool service checks them against the CA folder `certs`.
    ov.update({"site.keys_dir": str(keys), "coordinator.ca_dir": str(certs),
               "coordinator.reader_dir": str(identity_dir(keys, READER, "reader")), "federation.post_training": True,
               "synthesis.method": method, "anchors.k": k, "federation.min_nodes": sites})
    cfg = simulation_config(config or str(demo_preset_path()), sites=sites, rounds=rounds,
                            dataset=None if data else dataset, data=data, out=out,
                            overrides={k_: v for k_, v in ov.items() if v is not None})
    from plan_shared.policy import policy_from_config, write_policy_file

    policy_file = write_policy_file(out / "pool-policy.json", policy_from_config(cfg))
    with PoolProcess(out / "pool-store", certs, out / "logs", extra=("--policy", str(policy_file))) as pool:
        cfg = cfg.model_copy(update={
            "pool": cfg.pool.model_copy(update={"policy_file": str(policy_file)}),
            "site": cfg.site.model_copy(update={"pool_address": pool.address}),
            "coordinator": cfg.coordinator.model_copy(update={"pool_address": pool.address})})
        LOG.info("pool service on %s (mutual TLS), store %s", pool.address, out / "pool-store")
        run_simulation(cfg, out, verbose=verbose)
    report_path = out / "report.json"
    if not report_path.is_file():
        raise RuntimeError(f"the federation finished without a report; see {out}/error.json and the log above")
    report = json.loads(report_path.read_text())
    report["timing"]["demo_total_s"] = round(time.perf_counter() - t0, 2)
    report_path.write_text(json.dumps(report, indent=1))
    return report
