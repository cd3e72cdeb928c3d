"""The cost model on a noisy host: a CPU hog slows the server for a while; once it is gone the host-speed
factor comes back and every plan's predicted decode speed is within 2x of what a request measures."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.support import STARTUP_TIMEOUT_S, ServerProcess, metric

# Slow: it owns a server and a 10 s CPU hog, and on a host shared with other work the 2x bounds are not
# guaranteed (one run of three here saw a plan outside them).
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PLANS = ("w8", "w6", "w5", "w4", "w3", "mixed:4.5")
HOG_S = 10.0
HOG = f"import time\nend = time.monotonic() + {HOG_S}\nwhile time.monotonic() < end:\n    pass\n"


def cycle_plans(url: str, stop: threading.Event, speeds: list[float]) -> None:
    """Requests through every plan in turn until `stop`, noting the host speed after each."""
    with httpx.Client(base_url=url, timeout=60) as client:
        i = 0
        while not stop.is_set():
            body = {"prompt": "The river keeps flowing past the old mill", "max_new_tokens": 8,
                    "precision": PLANS[i % len(PLANS)]}
            assert client.post("/generate", json=body).status_code == 200
            speeds.append(metric(url, "quept_host_speed_ratio"))
            i += 1


def test_after_a_cpu_hog_the_host_factor_recovers_and_every_prediction_holds(tmp_path):
    server = ServerProcess(tmp_path / "serve.log", "--max-running", "4")
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        stop, speeds = threading.Event(), []
        clients = [threading.Thread(target=cycle_plans, args=(server.url, stop, speeds)) for _ in range(2)]
        for client in clients:
            client.start()
        time.sleep(4)
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(2)]
        hog_start = len(speeds)
        for hog in hogs:
            hog.wait(timeout=HOG_S + 30)
        hog_end = len(speeds)
        time.sleep(6)  # recovery, under the same traffic
        stop.set()
        for client in clients:
            client.join(timeout=60)
        during = min(speeds[hog_start:hog_end], default=None)
        after = metric(server.url, "quept_host_speed_ratio")
        assert 0.5 <= after <= 2.0, f"host speed after the hog {after}, lowest during it {during}"

        predicted = {row["precision"]: row["decode_tokens_per_s"]
                     for row in httpx.get(f"{server.url}/precisions", timeout=30).json()["precisions"]}
        for plan in PLANS:
            body = {"prompt": "The river keeps flowing past the old mill", "max_new_tokens": 16, "precision": plan}
            answer = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
            measured = answer["timing"]["decode_tokens_per_s"]
            served = answer["precision"]["served"]
            assert 0.5 <= measured / predicted[served] <= 2.0, (plan, measured, predicted[served], during)
    finally:
        assert server.stop() == 0
