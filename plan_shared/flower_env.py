"""The environment of a Flower process (SuperLink, SuperNode, ``flwr run``): the one place that sets it.

Every Flower process this toolkit starts gets its own ``FLWR_HOME`` (Flower keeps its
config, credentials cache and logs there, never in the user's ``~/.flwr``), no telemetry,
no update check, and this interpreter's ``bin`` folder first on ``PATH`` (so the
``flwr``/``flower-*`` executables of the same installation are the ones found)::

    subprocess.Popen(["flower-superlink", ...], env=flower_env(state / "flwr-home"))
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

FLOWER_FLAGS = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_env(home: str | Path, bin_dir: str | Path | None = None,
               base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default: ``os.environ``) set up for a Flower process whose home is ``home``.

    ``bin_dir`` goes first on PATH (default: the folder of ``sys.executable``).
    """
    env = dict(os.environ if base is None else base)
    env.update(FLWR_HOME=str(home), **FLOWER_FLAGS)
    first = Path(sys.executable).parent if bin_dir is None else Path(bin_dir)
    env["PATH"] = f"{first}{os.pathsep}{env.get('PATH', '')}"
    return env
