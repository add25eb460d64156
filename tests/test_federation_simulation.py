"""Flower simulation (Ray) of 3 tiny sites x 2 rounds: FedAvg weighted by sample counts."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("flwr")

from plan_shared.config import config_from_dict  # noqa: E402
from tests.test_federation_util import make_npz, tiny_config  # noqa: E402


def _local_weights(state: dict, share: str) -> dict[str, torch.Tensor]:
    out = {f"g.{k}": v for k, v in state["generator"].items()}
    out.update({f"g_ema.{k}": v for k, v in state["generator_ema"].items()})
    if share == "gd":
        out.update({f"d.{k}": v for k, v in state["discriminator"].items()})
    return out


def test_simulation_waits_for_every_virtual_site_unless_told_otherwise(tmp_path):
    from server.simulate import simulation_config

    # Virtual sites share the cores and finish one after another: no straggler cut by default.
    cfg = simulation_config(None, sites=10, out=tmp_path)
    assert cfg.federation.straggler_grace is None and cfg.federation.min_nodes == 2
    cfg = simulation_config(None, sites=1, out=tmp_path, overrides={"federation.straggler_grace": 0.5})
    assert cfg.federation.straggler_grace == 0.5 and cfg.federation.min_nodes == 1


def test_every_virtual_site_gets_an_actor_at_once():
    from server.simulate import actor_resources

    # 3 sites on 2 cores: Ray is told 3 CPUs, so Flower makes 3 actors and no site queues behind another
    assert actor_resources(3, 1.0, 2) == (1, 3)
    assert actor_resources(2, 1.0, 8) == (1, 8)  # more cores than sites: as many as the machine has
    assert actor_resources(5, 0.5, 2) == (0.5, 3)  # 3 // 0.5 = 6 actors >= 5 sites
    cpus, ray = actor_resources(7, 2.0, 4)
    assert ray // cpus >= 7


@pytest.mark.slow
def test_simulation_3_sites_2_rounds_weighted_mean(tmp_path, monkeypatch):
    from server.coordinate import SERVERAPP_DONE
    from server.simulate import run_simulation

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    npz = make_npz(tmp_path / "data.npz", n_train=60)
    raw = tiny_config()
    raw["data"]["path"] = str(npz)
    raw["partition"].update(scheme="dirichlet", alpha=0.8, sites=3)
    out = tmp_path / "out"
    raw["site"] = {"state_dir": str(out)}  # the virtual sites' sites/NAME
    cfg = config_from_dict(raw)
    summary = run_simulation(cfg, out, num_cpus=2)
    assert summary["rounds_done"] == 2
    assert (out / SERVERAPP_DONE).is_file()  # the ServerApp's last step: its follower checks the status at once

    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2]
    last = recs[-1]
    assert last["sites_replied"] == 3 and not last["missing"]
    counts = {s["site"]: s["num-examples"] for s in last["sites"]}
    assert sum(counts.values()) == 60 and len(set(counts.values())) > 1, counts  # unequal sites

    # What each site returned in round 2 is its local state after round 2.
    total = sum(counts.values())
    watch = last["watch"]  # the per-round watch-points, weighted like FedAvg
    assert {"d_real", "d_fake", "d_gap", "r1", "loss_d", "loss_g"} <= watch.keys()
    assert watch["d_real"] == pytest.approx(sum(s["d_real"] * s["num-examples"] for s in last["sites"]) / total, rel=1e-5)
    assert watch["d_gap"] == pytest.approx(watch["d_real"] - watch["d_fake"])
    # gan.watch_fd_samples (on by default): each site's FD of the received G_ema, weighted like FedAvg
    assert all(math.isfinite(r["watch"]["fd"]) and r["watch"]["fd"] > 0 for r in recs)
    assert watch["fd"] == pytest.approx(sum(s["fd"] * s["num-examples"] for s in last["sites"]) / total, rel=1e-5)
    mean: dict[str, torch.Tensor] = {}
    for site, n in counts.items():
        st = torch.load(out / "sites" / site / "local_trainer.pt", weights_only=True)
        assert st["step"] == 2 * cfg.federation.local_steps
        for k, v in _local_weights(st, "gd").items():
            if v.is_floating_point():
                mean[k] = mean.get(k, 0) + v.double() * (n / total)
    glob = torch.load(out / "checkpoints" / "round-0002.pt", weights_only=True)
    gw = _local_weights(glob, "gd")
    assert mean.keys() <= gw.keys()
    for k, v in mean.items():
        torch.testing.assert_close(gw[k].double(), v, atol=1e-5, rtol=1e-5, msg=k)

    meta = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert meta["round"] == 2 and meta["d_shared"] is True
    assert (out / "samples" / "round-0002.png").is_file()


@pytest.mark.slow
def test_flwr_run_against_a_local_simulation_superlink(tmp_path):
    """`flwr run .` (the Flower App Bundle of pyproject.toml) as deploy/README.md documents it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    from tests.test_federation_util import flower_env, free_port, listening

    root = Path(__file__).resolve().parent.parent
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "flwr"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = flower_env(home)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    raw = tiny_config()
    raw["data"]["path"] = str(make_npz(tmp_path / "data.npz", n_train=30))
    state = str(tmp_path / "state")  # not plan-state/ in the checkout
    raw["site"], raw["coordinator"] = {"state_dir": state}, {"state_dir": state}
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    log = open(tmp_path / "superlink.log", "wb")
    sl = subprocess.Popen([str(bin_dir / "flower-superlink"), "--insecure", "--simulation",
                           "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
                           "--database", str(tmp_path / "sim.db")],
                          stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not listening(port):
            assert sl.poll() is None and time.monotonic() < deadline, (tmp_path / "superlink.log").read_text()[-3000:]
            time.sleep(0.2)
        r = subprocess.run([str(bin_dir / "flwr"), "run", ".", "--stream", "--federation-config",
                            "num-supernodes=3 client-resources-num-cpus=1", "--run-config",
                            f'plan-config="{tmp_path / "sim.yaml"}" out-dir="{out}" num-server-rounds=0'],
                           cwd=root, env=env, capture_output=True, text=True, timeout=400)
        # `flwr run --stream` exits 0 even when the ServerApp fails: judge by what the run wrote.
        text = r.stdout + r.stderr
        assert r.returncode == 0, text[-3000:]
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] \
            if (out / "metrics.jsonl").is_file() else []
        assert [x["round"] for x in recs] == [1, 2], text[-3000:]
        assert all(x["sites_replied"] == 3 for x in recs)
        assert json.loads((out / "checkpoints" / "latest.json").read_text())["round"] == 2
        assert "[tool.flwr.federations]" not in (root / "pyproject.toml").read_text()  # flwr did not rewrite it
    finally:
        os.killpg(sl.pid, signal.SIGTERM)
        try:
            sl.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(sl.pid, signal.SIGKILL)
        log.close()


def test_run_log_filter_shows_our_lines_and_first_lines_of_errors(tmp_path, capsys):
    """What of the ServerApp's streamed log reaches the terminal (quiet) and what stays in OUT/run.log."""
    import io
    from types import SimpleNamespace

    from server.simulate import _follow_log

    lines = [
        "INFO :      Starting Flower Simulation",
        "21:00:01 DEBUG flwr: Pre-registering run with id 1",
        "21:00:02 WARNING flwr: DEPRECATED FEATURE: something",
        "21:00:03 INFO plan.federation: round 1/4 done in 30.1s: 3/3 sites",
        "21:00:04 ERROR flwr: An exception was raised when processing a message by RayBackend",
        "21:00:04 ERROR flwr: Traceback (most recent call last):",
        "21:00:04 ERROR flwr: \x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1, ip=1)",
        "Traceback (most recent call last):",
        "ValueError: boom",
        "21:00:05 WARNING plan.phases: site-1: synthesis failed: boom",
        "21:00:06 ERROR flwr: ServerApp thread raised an exception",
        "/x/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray",
    ]
    shown = []
    for verbose in (False, True):
        log = tmp_path / f"run-{verbose}.log"
        _follow_log(SimpleNamespace(stdout=io.StringIO("".join(x + "\n" for x in lines))), log, verbose,
                    lambda: shown.append(1))
        assert log.read_text().splitlines() == lines  # the whole log is kept
    err = capsys.readouterr().err.splitlines()
    quiet, loud = err[:3], err[3:]
    assert quiet == [lines[3], lines[9], lines[10]]
    assert loud == lines and len(shown) == 3 + len(lines)


def test_a_run_follower_checks_the_status_rarely_until_the_run_is_ending(tmp_path):
    import subprocess
    import sys

    from server.coordinate import (
        SERVERAPP_DONE,
        STATUS_ENDING_S,
        STATUS_EVERY_S,
        clear_run_markers,
        status_check_due,
    )

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not status_check_due(STATUS_EVERY_S - 1, tmp_path, alive)  # the run goes on: every 30 s
        assert status_check_due(STATUS_EVERY_S, tmp_path, alive)
        for marker in ("error.json", SERVERAPP_DONE):
            (tmp_path / marker).write_text("")
            assert status_check_due(STATUS_ENDING_S, tmp_path, alive) and not status_check_due(1.0, tmp_path, alive)
            clear_run_markers(tmp_path)  # a reused OUT: the older run's end is gone
            assert not (tmp_path / marker).exists() and not status_check_due(STATUS_ENDING_S, tmp_path, alive)
    finally:
        alive.kill()
        alive.wait()
    assert status_check_due(STATUS_ENDING_S, tmp_path, alive)  # the log stream ended with the run
