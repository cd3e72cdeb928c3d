"""Shared by the test suites: free loopback ports, readiness polling, `quept serve` as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # the evaluation text (its README: the perplexity convention)
WIKITEXT_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
# The first start may calibrate the default model's artifact (cached afterwards) before warming up.
STARTUP_TIMEOUT_S = float(os.environ.get("QUEPT_E2E_STARTUP_TIMEOUT_S", "3600"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# `quept serve` as a subprocess, before its flags.
SERVE_COMMAND = [sys.executable, "-m", "service", "serve"]


def wait_for(condition: Callable[[], object], timeout_s: float = 60, interval_s: float = 0.02) -> None:
    """Poll `condition()` until it is true; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(interval_s)


def metric(url: str, sample: str) -> float:
    """The value of one exposition line (`name{labels}`) of GET /metrics; 0 when it is absent."""
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def wait_ready(url: str, timeout_s: float, alive=lambda: True) -> None:
    """Poll GET /ready until 200; `alive()` False (the process died) fails at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready after {timeout_s:.0f} s")


class ServerProcess:
    """`quept serve` as a subprocess on a free loopback port, its log kept in a file."""

    def __init__(self, log_path: Path, *flags: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [*SERVE_COMMAND, "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})

    def wait_ready(self, timeout_s: float) -> None:
        try:
            wait_ready(self.url, timeout_s, lambda: self.process.poll() is None)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}; last log lines:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._log.close()
