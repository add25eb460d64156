"""The site worker (client/site_worker.py) as a real process, and what `plan-client start` sets up for it.

The ClientApp is called directly (as in tests/test_client_app.py): with ``worker-address``
in its node config its train handler runs in the worker process, which keeps torch and
the data loaded between messages; a wrong secret is refused before the worker reads
anything; a worker that is gone makes the ClientApp run the handler itself.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from multiprocessing.connection import Client
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.site_worker import ADDRESS_KEY, KEY_FILE_KEY, make_key, parse_address, read_key
from plan_shared.config import config_from_dict
from tests.test_federation_util import free_port, make_npz, tiny_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A real site worker process on a free loopback port; (address, key file, pid)."""
    tmp = tmp_path_factory.mktemp("worker")
    key = tmp / "worker.key"
    make_key(key)
    address = f"127.0.0.1:{free_port()}"
    ready = tmp / "ready"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(tmp / "worker.log", "wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "client.site_worker", "--address", address, "--key-file",
                              str(key), "--ready-file", str(ready)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            t0 = time.monotonic()
            while not ready.is_file():
                assert p.poll() is None and time.monotonic() - t0 < 120, (tmp / "worker.log").read_text()[-2000:]
                time.sleep(0.1)
            yield address, key, p.pid, tmp / "worker.log"
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(20)


def _ctx(tmp_path, **extra) -> Context:
    npz = make_npz(tmp_path / "a.npz", n_train=12)
    nc = {"site-id": "hospital-a", "data-source": "medmnist", "data-path": str(npz),
          "state-dir": str(tmp_path / "hospital-a"), **extra}
    return Context(run_id=1, node_id=7, node_config=nc, state=RecordDict(), run_config={})


def _train_msg(cfg: dict) -> Message:
    from plan_shared.gan import GanTrainer
    from plan_shared.protocol import ConfigRef, TrainTask

    pc = config_from_dict(cfg)
    glob = GanTrainer(pc, 1, 8)
    task = TrainTask(ArrayRecord(glob.weights("gd")), server_round=1, channels=1, size=8, local_steps=2, run_digest="x",
                     config=ConfigRef.full(pc))
    return Message(task.to_record(), message_type=TrainTask.MESSAGE_TYPE, dst_node_id=7)


def test_train_runs_in_the_worker_process(tmp_path, worker):
    from client.app import app

    address, key, _, log = worker
    ctx = _ctx(tmp_path, **{ADDRESS_KEY: address, KEY_FILE_KEY: str(key)})
    msg = _train_msg(tiny_config())
    rep = app(msg, ctx)
    assert not rep.has_error(), rep.error
    assert rep.metadata.reply_to_message_id == msg.metadata.message_id
    m = rep.content["metrics"]
    assert m["steps"] == 2 and m["num-examples"] == 12 and m["handler-s"] > 0
    assert any(k.startswith("g_ema.") for k in rep.content["arrays"].to_torch_state_dict())
    assert (tmp_path / "hospital-a" / "local_trainer.pt").is_file()
    assert "site worker: train handled" in log.read_text()


def test_handler_error_in_the_worker_is_raised_in_the_clientapp(tmp_path, worker):
    from client.app import app
    from client.site_worker import WorkerError

    address, key, _, _ = worker
    ctx = _ctx(tmp_path, **{ADDRESS_KEY: address, KEY_FILE_KEY: str(key)})
    msg = _train_msg(tiny_config())
    msg.content["round"]["size"] = 16  # the site's images are 8 px
    # flwr-clientapp turns what the handler raises into the error reply the coordinator logs
    with pytest.raises(WorkerError, match=r"ValueError: hospital-a: local images are \(1, 8, 8\)"):
        app(msg, ctx)


def test_wrong_secret_is_refused_and_the_worker_keeps_serving(tmp_path, worker):
    from multiprocessing import AuthenticationError

    address, key, pid, log = worker
    with pytest.raises(AuthenticationError):
        Client(parse_address(address), authkey=b"0" * 64)
    os.kill(pid, 0)  # still alive
    t0 = time.monotonic()  # the worker logs the refusal after the client has seen it
    while "refused a connection" not in log.read_text() and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    assert "refused a connection" in log.read_text()
    from client.site_worker import forward

    ctx = _ctx(tmp_path, **{ADDRESS_KEY: address, KEY_FILE_KEY: str(key)})
    rep = forward("train", _train_msg(tiny_config()), ctx)
    assert rep is not None and not rep.has_error()


def test_unreachable_worker_falls_back_to_this_process(tmp_path):
    from client.app import app

    key = tmp_path / "k"
    make_key(key)
    ctx = _ctx(tmp_path, **{ADDRESS_KEY: f"127.0.0.1:{free_port()}", KEY_FILE_KEY: str(key)})
    rep = app(_train_msg(tiny_config()), ctx)
    assert not rep.has_error(), rep.error
    assert rep.content["metrics"]["steps"] == 2


def test_key_file_and_address_checks(tmp_path):
    key = tmp_path / "sub" / "worker.key"
    k1 = make_key(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and read_key(key) == k1 and len(k1) == 64
    assert make_key(key) != k1  # a new secret each start
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(ValueError, match="short.*too short"):
        read_key(tmp_path / "short")
    assert parse_address("127.0.0.1:5") == ("127.0.0.1", 5)
    for bad in ("0.0.0.0:5", "10.0.0.1:5", "127.0.0.1:x"):
        with pytest.raises(ValueError, match="loopback only"):
            parse_address(bad)


# ---------------------------------------------------------------- plan-client start


def _site_yaml(tmp_path: Path, **own) -> Path:
    from server.certs import init_ca, issue

    certs = tmp_path / "certs"
    init_ca(certs)
    issue(certs, "hospital-a", "site", tmp_path / "keys")
    npz = make_npz(tmp_path / "a.npz", n_train=12)
    raw = {"site_id": "hospital-a", "data": {"source": "medmnist", "path": str(npz)},
           "site": {"superlink_address": "127.0.0.1:9", "keys_dir": str(tmp_path / "keys"),
                    "state_dir": str(tmp_path / "state"), **own}}
    p = tmp_path / "site.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _node_toml(state: Path) -> dict[str, str]:
    import tomllib

    return tomllib.loads((state / "node.toml").read_text())


def test_start_plan_sets_superexec_poll_and_announces_the_worker(tmp_path):
    from client.supernode import start_plan

    plan = start_plan(_site_yaml(tmp_path))
    assert plan.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.2"  # config default; Flower's own is 1.0
    nc = _node_toml(plan.state)
    assert parse_address(nc[ADDRESS_KEY])[0] == "127.0.0.1"
    assert Path(nc[KEY_FILE_KEY]) == plan.state / "worker.key" and len(read_key(plan.state / "worker.key")) == 64
    assert plan.worker is not None and plan.worker[1:3] == ["-m", "client.site_worker"]
    assert nc[ADDRESS_KEY] in plan.worker and str(plan.state / "worker.key") in plan.worker
    first = read_key(plan.state / "worker.key")
    assert read_key(start_plan(_site_yaml(tmp_path / "again")).state / "worker.key") != first


def test_start_plan_without_worker(tmp_path):
    from client.supernode import start_plan, supernode_command_line

    plan = start_plan(_site_yaml(tmp_path, worker=False, superexec_poll_s=1.0, supernode_poll_s=None,
                                 clientapp_forkserver=False))
    assert plan.worker is None and plan.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "1.0"
    assert ADDRESS_KEY not in _node_toml(plan.state)
    argv, env, state = supernode_command_line(tmp_path / "site.yaml")
    assert argv[0].endswith("flower-supernode") and state == plan.state  # Flower's own, nothing in front
    assert plan.forkserver is None and not (plan.state / "bin").exists()
    assert not env["PATH"].startswith(str(plan.state))


def test_start_plan_runs_the_supernode_runner_and_the_clientapp_fork_server(tmp_path):
    # fixedcost: site.supernode_poll_s and site.clientapp_forkserver (both on by default)
    from client.supernode import start_plan

    plan = start_plan(_site_yaml(tmp_path))
    i = plan.supernode.index("--")
    assert plan.supernode[1:i] == ["-m", "client.supernode_runner", "--poll-s", "0.25"]
    assert "--superlink" in plan.supernode[i + 1:] and "--node-config" in plan.supernode[i + 1:]
    assert plan.forkserver is not None and plan.forkserver[1:3] == ["-m", "client.clientapp_forkserver"]
    launcher = plan.state / "bin" / "flwr-clientapp"
    assert os.access(launcher, os.X_OK) and stat.S_IMODE((plan.state / "clientapp.key").stat().st_mode) == 0o600
    assert plan.env["PATH"].split(os.pathsep)[0] == str(plan.state / "bin")  # what the SuperExec runs by name
    sock = plan.forkserver[plan.forkserver.index("--socket") + 1]
    assert repr(sock) in launcher.read_text() and len(os.fsencode(sock)) <= 107
    long_state = tmp_path / ("x" * 100)
    (tmp_path / "long").mkdir()
    plan2 = start_plan(_site_yaml(tmp_path / "long", state_dir=str(long_state)))
    assert plan2.forkserver is not None
    sock2 = plan2.forkserver[plan2.forkserver.index("--socket") + 1]
    assert len(os.fsencode(sock2)) <= 107 and not sock2.startswith(str(long_state))  # AF_UNIX path limit


def test_supernode_poll_out_of_range_is_refused(tmp_path):
    from client.supernode import start_command

    assert start_command(str(_site_yaml(tmp_path, supernode_poll_s=5.0)), dry_run=True) == 2


def test_superexec_poll_out_of_flower_range_is_refused(tmp_path):
    from client.supernode import start_command

    assert start_command(str(_site_yaml(tmp_path, superexec_poll_s=0.001)), dry_run=True) == 2
