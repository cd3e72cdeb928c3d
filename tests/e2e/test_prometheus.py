"""A real Prometheus scrapes the live server and answers queries about its series."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

from tests.support import free_port

pytestmark = pytest.mark.e2e


def test_prometheus_scrapes_the_request_counter(live_server_url, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`)")
    target = live_server_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      f"scrape_configs:\n  - job_name: quept\n    static_configs:\n"
                      f"      - targets: ['{target}']\n")
    httpx.post(f"{live_server_url}/generate", json={"prompt": "Hi", "max_new_tokens": 2, "precision": "w4"},
               timeout=300).raise_for_status()
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        series = []
        deadline = time.monotonic() + 60
        while not series and time.monotonic() < deadline:
            time.sleep(1)
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                                   params={"query": "quept_requests_total"}, timeout=5).json()
            except httpx.TransportError:
                continue
            series = answer.get("data", {}).get("result", [])
        assert series, (tmp_path / "prometheus.log").read_text()[-2000:]
        labels = series[0]["metric"]
        assert labels["job"] == "quept" and labels["instance"] == target
        assert {"route", "status", "precision_requested", "precision_served"} <= set(labels)
    finally:
        process.terminate()
        process.wait(30)
        log.close()
