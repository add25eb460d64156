"""The pool service as a child process (used by ``plan-server demo`` and ``coordinate``).

``python -m server.pool serve`` binds port 0 when asked and writes the bound port to
a file; :class:`PoolProcess` waits for it, exposes the address and stops the service
(SIGTERM, then SIGKILL) when the context ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from plan_shared.config import PoolLimitsConfig


def limits_args(limits: PoolLimitsConfig) -> list[str]:
    """``pool serve`` options for the limits of a config's ``pool.limits`` section."""
    out: list[str] = []
    for name, value in limits.model_dump().items():
        flag = "--max-streams-per-identity" if name == "max_streams_per_identity" else "--" + name.replace("_", "-")
        out += [flag, str(value)]
    return out


class PoolProcess:
    def __init__(self, store: Path, certs: Path, log_dir: Path, host: str = "127.0.0.1", port: int = 0,
                 extra: Sequence[str] = (), env: dict[str, str] | None = None):
        self.store, self.certs, self.log_dir = Path(store), Path(certs), Path(log_dir)
        self.host, self.port = host, port
        self.extra = list(extra)
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.log_dir / "pool-service.log"
        self._log: BinaryIO | None = None

    def start(self, timeout: float = 60.0) -> PoolProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.log_dir / f".pool-port-{os.getpid()}-{time.monotonic_ns()}"
        port_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.pool", "serve", "--store", str(self.store), "--certs", str(self.certs),
             "--address", f"{self.host}:{self.port}", "--port-file", str(port_file), *self.extra],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"pool service exited with {self.proc.returncode}; log:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pool service did not start within {timeout:.0f}s; log:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        port_file.unlink(missing_ok=True)
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut would (no clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PoolProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
