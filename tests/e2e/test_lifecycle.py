"""Start-up errors and the SIGTERM drain, each on a server process of its own."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import httpx
import pytest

from tests.support import REPO_ROOT, SERVE_COMMAND, STARTUP_TIMEOUT_S, ServerProcess, free_port, wait_for

pytestmark = pytest.mark.e2e




def serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE_COMMAND, *flags], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


def test_a_bad_setting_stops_start_up_with_one_line():
    result = serve("--max-queue", "0")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: QUEPT_MAX_QUEUE / --max-queue:")


def test_a_missing_artifact_stops_start_up_with_one_line(tmp_path):
    result = serve("--port", str(free_port()), "--artifact", str(tmp_path / "nothing-here"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nothing-here" in last


def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path):
    server = ServerProcess(tmp_path / "serve.log", env={"QUEPT_DRAIN_TIMEOUT_S": "20"})
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        outcome: dict = {}

        def long_stream() -> None:
            with httpx.stream("POST", f"{server.url}/generate", timeout=120,
                              json={"prompt": "Once upon a time", "max_new_tokens": 24, "precision": "w4",
                                    "stream": True}) as response:
                outcome["lines"] = [line for line in response.iter_lines() if line]

        client = threading.Thread(target=long_stream)
        client.start()
        wait_for(lambda: "quept_requests_running 1.0" in httpx.get(f"{server.url}/metrics").text)
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 503)
        assert client.is_alive()  # /ready refuses while the request is still being served
        assert httpx.get(f"{server.url}/ready").json()["error"]["type"] == "draining"
        refused = httpx.post(f"{server.url}/generate", json={"prompt": "Hi", "max_new_tokens": 2})
        assert refused.status_code == 503 and "retry-after" in refused.headers
        client.join(120)
        assert server.process.wait(60) == 0
        final = json.loads(outcome["lines"][-1].removeprefix("data: "))
        assert final["finish_reason"] in ("length", "eos") and final["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()


def test_sigterm_during_start_up_exits_zero_and_leaves_no_half_written_model(tmp_path):
    cache = tmp_path / "cache"  # empty: start-up spends its first seconds converting the GGUF file
    server = ServerProcess(tmp_path / "serve.log", env={"QUEPT_CACHE_DIR": str(cache)})
    try:
        def loading() -> bool:
            try:
                return httpx.get(f"{server.url}/health", timeout=2).json()["phase"] == "loading"
            except httpx.TransportError:
                return False

        wait_for(loading, 120)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0, server.log_tail()
        assert "stopped during start-up" in server.log_tail()
        assert not [p for p in (cache / "models").glob("*") if not p.name.endswith(".partial")]
    finally:
        server.stop()
