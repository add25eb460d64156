"""plan_shared/flower_env.py: the environment every Flower process gets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from plan_shared.flower_env import flower_env


def test_own_home_no_telemetry_and_this_installation_first_on_path(tmp_path):
    env = flower_env(tmp_path / "flwr-home", base={"PATH": "/usr/bin", "KEEP": "1", "FLWR_HOME": "/root/.flwr"})
    assert env["FLWR_HOME"] == str(tmp_path / "flwr-home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["PATH"] == f"{Path(sys.executable).parent}{os.pathsep}/usr/bin"
    assert env["KEEP"] == "1"


def test_explicit_bin_dir_and_the_process_environment_untouched(tmp_path):
    before = dict(os.environ)
    env = flower_env(tmp_path, bin_dir=tmp_path / "bin")
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")
    assert dict(os.environ) == before  # a copy: the caller's environment is not changed
