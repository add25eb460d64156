"""client/supernode_runner.py: Flower's SuperNode main with its loop's sleeps capped (site.supernode_poll_s).

The check runs against the installed flwr: when an upgrade moves or renames the 3 s idle
sleep or the 0.5 s reply wait, the first test fails (and `plan-client start` would warn and
run Flower's SuperNode unchanged, as the fallback test shows on a module without them).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from client.supernode_runner import (
    FLOWER_SLEEPS,
    SUPERNODE_MODULE,
    CappedTime,
    cap_supernode_sleeps,
    check_supernode_sleeps,
    flower_main,
)

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):  # a module from a file, not registered in sys.modules
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_installed_flwr_has_the_sleeps_the_runner_caps():
    mod = importlib.import_module(SUPERNODE_MODULE)
    assert check_supernode_sleeps(mod) == []
    assert set(FLOWER_SLEEPS) == {"start_client_internal", "_push_messages"}
    assert callable(flower_main())


def test_cap_applies_to_a_copy_of_flowers_module_only(tmp_path):
    mod = _load(Path(importlib.import_module(SUPERNODE_MODULE).__file__), "supernode_copy")
    assert cap_supernode_sleeps(0.05, mod) == []
    assert isinstance(mod.time, CappedTime) and mod.time.cap_s == 0.05
    assert mod.time.monotonic is time.monotonic  # the rest is the real time module
    assert importlib.import_module(SUPERNODE_MODULE).time is time  # Flower's own module untouched by the copy
    assert check_supernode_sleeps(mod) == []  # applying twice is fine


def test_capped_sleep_waits_at_most_the_cap():
    t = CappedTime(0.01)
    t0 = time.monotonic()
    t.sleep(3)
    assert time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    t.sleep(0.0)
    assert time.monotonic() - t0 < 1.0


def test_a_changed_flwr_is_reported_and_left_unchanged(tmp_path):
    src = tmp_path / "fake_supernode.py"
    src.write_text("import time\n\ndef start_client_internal():\n    time.sleep(5)\n")  # 3 s sleep gone, no _push_messages
    mod = _load(src, "fake_supernode")
    problems = cap_supernode_sleeps(0.1, mod)
    assert any("start_client_internal no longer calls time.sleep(3)" in p for p in problems)
    assert any("_push_messages is gone" in p for p in problems)
    assert mod.time is time
    src2 = tmp_path / "fake_supernode2.py"
    src2.write_text("from time import sleep\n\ndef start_client_internal():\n    sleep(3)\n")
    assert any("no longer imports the time module" in p for p in cap_supernode_sleeps(0.1, _load(src2, "fake2")))


def test_runner_runs_flowers_supernode_main_and_checks_its_own_flag():
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    r = subprocess.run([sys.executable, "-m", "client.supernode_runner", "--poll-s", "0.2", "--", "--help"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--superlink" in r.stdout and "warning" not in r.stderr  # Flower's own usage text, patch applied
    bad = subprocess.run([sys.executable, "-m", "client.supernode_runner", "--poll-s", "5", "--", "--help"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "site.supernode_poll_s" in bad.stderr
