"""Fixed cost of a deployment round: real SuperLink + SuperNodes on loopback, TLS + node auth.

For each mode, in one run (a fresh CA, coordinator state and site folders each):

* ``before``: Flower's waiting as it was: the SuperExec polls every 1 s
  (``site.superexec_poll_s: 1.0``), the ServerApp pulls replies every 1 s
  (``federation.reply_poll_s: 1.0``), no site worker: every message starts a
  ``flwr-clientapp`` process that imports torch, the models and the site's images,
  and every tensor of the weights its own Flower object (``federation.pack_weights: false``);
* ``unpacked``: the defaults but one Flower object per tensor, as before plan_shared/packing.py;
* ``packed``: the defaults but Flower's SuperNode as it is (``site.supernode_poll_s: null``: 3 s
  idle sleep after an empty pull) and a fresh interpreter per ClientApp message
  (``site.clientapp_forkserver: false``): the state before client/supernode_runner.py and
  client/clientapp_forkserver.py;
* ``after``: the defaults: SuperExec poll 0.2 s, reply poll 0.2 s, the site worker
  that ``plan-client start`` runs next to the SuperNode (client/site_worker.py), to which the
  per-message ClientApp process forwards the train message, and the weights packed into one
  array (``federation.pack_weights``): a handful of objects per message instead of ~2 per tensor,
  each of which costs a request on every hop (ServerApp, SuperLink, SuperNode, ClientApp);
  the SuperNode's loop sleeps capped at 0.25 s (``site.supernode_poll_s``) and each per-message
  ClientApp process forked from a warm server with Flower imported (``site.clientapp_forkserver``).

``plan-server coordinate`` (SuperLink with TLS and ``--enable-supernode-auth``, node keys
registered) and ``plan-client start`` per site, as in deploy/smoke.sh without the proxy and
the post-training phases; a tiny GAN so that the handlers' compute is small. Per round,
from ``metrics.jsonl``: wall (push to checkpoint written), the reply collection, the
slowest site's handler seconds (``handler-s``, measured inside the handler) and GAN steps
(``train-s``); **fixed cost = wall − max handler**. The first round also pays the FAB
install and the worker's first call; the summary is the median over rounds 2..R.

    python benchmarks/deploy_round.py                 # 3 sites, 4 rounds, before + after
    python benchmarks/deploy_round.py --modes unpacked,after
    python benchmarks/deploy_round.py --modes packed,after --rounds 3   # what the SuperNode runner + fork server buy
    python benchmarks/deploy_round.py --modes after --rounds 3 --keep --work /tmp/dr
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

#: Mode -> (coordinator federation overrides, site section overrides).
MODES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "before": ({"reply_poll_s": 1.0, "pack_weights": False},
               {"superexec_poll_s": 1.0, "worker": False, "supernode_poll_s": None, "clientapp_forkserver": False}),
    "unpacked": ({"pack_weights": False}, {}),
    "packed": ({}, {"supernode_poll_s": None, "clientapp_forkserver": False}),
    "after": ({}, {}),
}

TINY = {
    "seed": 0, "device": "cpu", "threads": 1,
    "data": {"source": "medmnist", "name": None, "size": 8, "channels": 1},
    "generator": {"z_dim": 8, "w_dim": 8, "mapping_layers": 1, "base_channels": 16, "min_channels": 8},
    "discriminator": {"base_channels": 8, "max_channels": 16, "mbstd_group": 2},
    "gan": {"batch_size": 4, "augment": [], "r1_every": 2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_npz(path: Path, n_train: int, seed: int, size: int = 8) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.int64)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def env_for(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _kill(p: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(15)
            if sig == signal.SIGTERM:  # the group may still hold SuperExec/ClientApp/worker children
                continue
        except subprocess.TimeoutExpired:
            continue


def run_mode(mode: str, work: Path, sites: int, rounds: int, local_steps: int,
             timeout_s: float) -> tuple[list[dict[str, Any]], str | None]:
    """One deployment of ``sites`` sites for ``rounds`` rounds: the round records of metrics.jsonl, and why
    the run failed (None when it completed; the rounds done before a failure are still returned)."""
    from server.certs import init_ca, issue

    coord_over, site_over = MODES[mode]
    work.mkdir(parents=True, exist_ok=True)
    names = [f"hospital-{chr(ord('a') + i)}" for i in range(sites)]
    certs = work / "certs"
    init_ca(certs)
    for s in names:
        issue(certs, s, "site", work / "keys" / s)
    port = free_port()
    coord = {**TINY, "federation": {"rounds": rounds, "local_steps": local_steps, "min_nodes": sites,
                                    "wait_for_nodes_s": 180, "round_timeout_s": 300, "sample_grid": 4, **coord_over},
             "coordinator": {"state_dir": str(work / "coord"), "ca_dir": str(certs), "superlink_port": port}}
    (work / "coordinator.yaml").write_text(yaml.safe_dump(coord))
    procs: list[subprocess.Popen[bytes]] = []
    error: str | None = None
    try:
        clog = work / "coordinator.log"
        cp = subprocess.Popen([str(BIN / "plan-server"), "coordinate", "--config", str(work / "coordinator.yaml")],
                              stdout=open(clog, "ab"), stderr=subprocess.STDOUT, env=env_for(work / "h"),
                              start_new_session=True)
        procs.append(cp)
        t0 = time.monotonic()
        while "submitted" not in clog.read_text():
            if cp.poll() is not None or time.monotonic() - t0 > 180:
                raise RuntimeError(f"{mode}: coordinator did not submit the run\n{clog.read_text()[-3000:]}")
            time.sleep(0.5)
        for i, s in enumerate(names):
            site = {"site_id": s, "device": "cpu", "threads": 1,
                    "data": {"source": "medmnist", "path": str(make_npz(work / f"{s}.npz", 16 + 8 * i, i))},
                    "site": {"superlink_address": f"127.0.0.1:{port}", "keys_dir": str(work / "keys" / s),
                             "state_dir": str(work / s), "supernode_port": free_port(), **site_over}}
            y = work / f"site-{s}.yaml"
            y.write_text(yaml.safe_dump(site))
            procs.append(subprocess.Popen([str(BIN / "plan-client"), "start", "--config", str(y)],
                                          stdout=open(work / f"{s}.log", "ab"), stderr=subprocess.STDOUT,
                                          env=env_for(work / "h"), start_new_session=True))
        try:
            rc = cp.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{mode}: run not finished after {timeout_s:.0f}s\n{clog.read_text()[-3000:]}") from None
        if rc != 0:
            error = f"{mode}: coordinator exited {rc}: " + " | ".join(clog.read_text().splitlines()[-3:])
    finally:
        for p in reversed(procs):
            _kill(p)
        pid_file = work / "coord" / "superlink.pid"  # the coordinator's own SuperLink session, if it was left
        if pid_file.is_file():
            pid = int(pid_file.read_text())
            try:  # only that very SuperLink (its command line names this work folder), never a reused pid
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                cmdline = ""
            if "flower-superlink" in cmdline and str(work) in cmdline:
                from server.coordinate import kill_tree

                kill_tree(pid)
    metrics = work / "coord" / "run" / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    return records, error


def round_rows(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    rows = []
    for r in records:
        handler = max(float(s.get("handler-s", 0.0)) for s in r["sites"])
        train = max(float(s.get("train-s", 0.0)) for s in r["sites"])
        rows.append({"round": r["round"], "sites": r["sites_replied"], "wall_s": r["wall_s"],
                     "collect_s": r["collect_s"], "server_s": round(r["wall_s"] - r["collect_s"], 3),
                     "max_handler_s": round(handler, 3), "max_train_s": round(train, 3),
                     "fixed_s": round(r["wall_s"] - handler, 3)})
    return rows


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STAMP = re.compile(r"^(?:[A-Z]+ +)?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
#: (segment, log text that marks it) in the order a train message passes them at a site.
_MARKS = (("recv", "Receiving: train message"), ("recvd", "Received successfully"),
          ("capp", "Start `flwr-clientapp` process"), ("confirm", "Runtime.ConfirmMessageReceived"),
          ("hend", "site worker: train handled in"), ("sent", "Sent successfully"))
#: Breakdown rows: (label, from mark, to mark); "push" is the round's start at the ServerApp.
SEGMENTS = (
    ("ServerApp push -> SuperNode pulled it (SuperLink store + the SuperNode's 3 s idle sleep)", "push", "recv"),
    ("SuperNode pulls the message's objects from the SuperLink", "recv", "recvd"),
    ("SuperExec poll + flwr-clientapp process start (imports)", "recv", "capp"),
    ("ClientApp pulls the message from the SuperNode (waits for the line above)", "capp", "confirm"),
    ("ClientApp loads the app, forwards to the worker, handler runs", "confirm", "hend"),
    ("reply: ClientApp -> SuperNode -> SuperLink (push objects)", "hend", "sent"),
)


def _stamp(line: str) -> float | None:
    import datetime as dt

    m = _STAMP.match(_ANSI.sub("", line))
    if not m:
        return None
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=dt.timezone.utc).timestamp()


def site_marks(log: Path) -> list[dict[str, float]]:
    """Per train message a SuperNode log shows (FLWR_LOG_LEVEL=DEBUG: Flower's lines carry a time): mark -> time."""
    out: list[dict[str, float]] = []
    for line in log.read_text(errors="replace").splitlines():
        t = _stamp(line)
        if t is None:
            continue
        for name, text in _MARKS:
            if text in line:
                if name == "recv":
                    out.append({})
                if out and name not in out[-1]:
                    out[-1][name] = t
    return out


def trace_table(work: Path, records: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(segment, median over rounds 2..R and sites, slowest site's median) from a kept mode folder."""
    marks = {p.stem: site_marks(p) for p in sorted(work.glob("hospital-*.log"))}
    per: dict[str, list[float]] = {label: [] for label, _, _ in SEGMENTS}
    slow: dict[str, dict[str, list[float]]] = {label: {} for label, _, _ in SEGMENTS}
    server: dict[str, list[float]] = {"last reply pushed -> ServerApp has all replies (poll + pull objects)": [],
                                      "aggregation + checkpoint + sample grid + metrics line": []}
    for r in records[1:]:
        push = float(r["time"]) - float(r["wall_s"])
        collected = push + float(r["collect_s"])
        sent = []
        for site, ms in marks.items():
            if len(ms) < r["round"]:
                continue
            m = {"push": push, **ms[r["round"] - 1]}
            for label, a, b in SEGMENTS:
                if a in m and b in m:
                    per[label].append(m[b] - m[a])
                    slow[label].setdefault(site, []).append(m[b] - m[a])
            if "sent" in m:
                sent.append(m["sent"])
        if sent:
            server["last reply pushed -> ServerApp has all replies (poll + pull objects)"].append(collected - max(sent))
        server["aggregation + checkpoint + sample grid + metrics line"].append(float(r["wall_s"]) - float(r["collect_s"]))
    rows = []
    for label, _, _ in SEGMENTS:
        if per[label]:
            rows.append((label, statistics.median(per[label]),
                         max(statistics.median(v) for v in slow[label].values())))
    for label, v in server.items():
        if v:
            rows.append((label, statistics.median(v), statistics.median(v)))
    return rows


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    steady = rows[1:] or rows
    return {k: round(statistics.median(r[k] for r in steady), 3)
            for k in ("wall_s", "collect_s", "server_s", "max_handler_s", "max_train_s", "fixed_s")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="before,after",
                    help=f"comma-separated, from {', '.join(MODES)}; each mode's fixed cost is compared with the last's")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per mode")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, help="write the rows and summaries here")
    ap.add_argument("--trace", action="store_true",
                    help="Flower DEBUG logs (timestamps) and a breakdown of where a round's time goes; the logging "
                         "itself costs time, most where messages have many objects")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})")
    if args.trace:
        os.environ["FLWR_LOG_LEVEL"] = "DEBUG"
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="plan-deploy-round-")
        work = Path(tmp.name)
    else:
        work = args.work.resolve()
    out: dict[str, Any] = {"sites": args.sites, "rounds": args.rounds, "local_steps": args.local_steps,
                           "load_before": os.getloadavg(), "modes": {}}
    try:
        for m in modes:
            t0 = time.perf_counter()
            records, error = run_mode(m, work / m, args.sites, args.rounds, args.local_steps, args.timeout_s)
            rows = round_rows(records)
            if not rows:
                print(f"\n[{m}] no round completed: {error}", flush=True)
                out["modes"][m] = {"rows": [], "error": error}
                continue
            out["modes"][m] = {"rows": rows, "median_rounds_2_on": summarise(rows), "error": error,
                               "mode_wall_s": round(time.perf_counter() - t0, 1)}
            if error:
                print(f"\n[{m}] run failed after {len(rows)} round(s): {error}", flush=True)
            print(f"\n[{m}] {args.sites} sites, {args.rounds} rounds x {args.local_steps} local steps")
            print(f"{'round':>5} {'wall':>7} {'collect':>8} {'server':>7} {'handler':>8} {'gan':>6} {'fixed':>7}")
            for r in rows:
                print(f"{r['round']:>5} {r['wall_s']:>7.2f} {r['collect_s']:>8.2f} {r['server_s']:>7.2f} "
                      f"{r['max_handler_s']:>8.2f} {r['max_train_s']:>6.2f} {r['fixed_s']:>7.2f}")
            print(f"fixed cost per round = wall - max handler = {out['modes'][m]['median_rounds_2_on']['fixed_s']:.2f} s"
                  " (median of rounds 2..R)", flush=True)
            if args.trace:
                table = trace_table(work / m, records)
                out["modes"][m]["trace"] = [{"segment": k, "median_s": round(v, 3), "slowest_site_s": round(w, 3)}
                                            for k, v, w in table]
                print(f"{'median s':>9} {'slowest':>8}  segment (rounds 2..R)")
                for k, v, w in table:
                    print(f"{v:>9.2f} {w:>8.2f}  {k}")
    finally:
        out["load_after"] = os.getloadavg()
        if tmp is not None and not args.keep:
            tmp.cleanup()
        elif tmp is not None:
            print(f"work folder kept: {work}")
    last = modes[-1]
    ref = out["modes"].get(last, {}).get("rows")
    for m in modes[:-1]:
        if ref and out["modes"].get(m, {}).get("rows"):
            b = out["modes"][m]["median_rounds_2_on"]["fixed_s"]
            a = out["modes"][last]["median_rounds_2_on"]["fixed_s"]
            key = "fixed_ratio" if (m, last) == ("before", "after") else f"fixed_ratio_{m}_{last}"
            out[key] = round(b / a, 2) if a > 0 else None
            print(f"\nfixed cost per round: {m} {b:.2f} s, {last} {a:.2f} s, ratio {out[key]}x "
                  f"(load {out['load_before'][0]:.2f} -> {out['load_after'][0]:.2f})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
