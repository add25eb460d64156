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
from typing import Any, Optional

LOG = logging.getLogger("plan.demo")
DEMO_PRESET = "presets/demo.yaml"


def demo_preset_path() -> Path:
    return Path(str(resources.files("server").joinpath(DEMO_PRESET)))


def preset_path(name: str) -> Path:
    """``server/presets/<name>.yaml``: demo (the default, ~15 min on 2 cores) or quality (64 px, longer rounds)."""
    root = Path(str(resources.files("server").joinpath("presets")))
    known = sorted(q.stem for q in root.glob("*.yaml"))
    if name not in known:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(known)}")
    return root / f"{name}.yaml"


def make_credentials(certs: Path, sites: list[str], reader: str = "coordinator") -> None:
    """CA + server certificate for loopback, one identity per site, one reader; reused when present."""
    from server.certs import init_ca, issue, read_registry

    if not (certs / "ca.key").is_file():
        init_ca(certs, ["localhost", "127.0.0.1"])
    known = read_registry(certs).get("identities", {})
    for s in sites:
        if s not in known:
            issue(certs, s, "site")
    if reader not in known:
        issue(certs, reader, "reader")


def run_demo(
    out: Path,
    sites: int = 3,
    dataset: Optional[str] = "pneumoniamnist",
    data: Optional[str] = None,
    method: Optional[str] = None,
    k: Optional[int] = None,
    rounds: Optional[int] = None,
    config: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    from server.pool.process import PoolProcess
    from server.simulate import run_simulation, simulation_config

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    certs = out / "certs"
    names = [f"site-{i}" for i in range(sites)]
    make_credentials(certs, names)
    ov: dict[str, Any] = dict(overrides or {})
    ov.update({"federation.certs_dir": str(certs), "federation.post_training": True, "pool.credentials": None,
               "synthesis.method": method, "anchors.k": k, "federation.min_nodes": sites})
    cfg = simulation_config(config or str(demo_preset_path()), sites=sites, rounds=rounds,
                            dataset=None if data else dataset, data=data, out=out,
                            overrides={k_: v for k_, v in ov.items() if v is not None})
    with PoolProcess(out / "pool-store", certs, out / "logs") as pool:
        cfg = cfg.model_copy(update={"pool": cfg.pool.model_copy(update={"address": pool.address})})
        LOG.info("pool service on %s (mutual TLS), store %s", pool.address, out / "pool-store")
        run_simulation(cfg, out)
    report_path = out / "report.json"
    if not report_path.is_file():
        raise RuntimeError(f"the federation finished without a report; see {out}/error.json and the log above")
    report = json.loads(report_path.read_text())
    report["timing"]["demo_total_s"] = round(time.perf_counter() - t0, 2)
    report_path.write_text(json.dumps(report, indent=1))
    return report
