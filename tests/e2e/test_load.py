"""Bounded load on loopback with benchmarks/loadtest.py: beyond capacity the server sheds with 503 +
Retry-After or serves cheaper plans (brownout), never with timeouts, other 5xx or a crash, and its memory
stays bounded. CI runs a small server at 1x and 4x its capacity; `-m slow` runs 1x, 2x and 4x at the
default settings and prints the table that docs/reliability.md reports."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from benchmarks.loadtest import capacity, print_table, request_mix, run_level
from tests.support import STARTUP_TIMEOUT_S, ServerProcess

pytestmark = pytest.mark.e2e

# A small server (2 sequences at once, 2 waiting) so that 4x its capacity is only 8 clients.
SMALL_SERVER = ("--max-running", "2", "--max-queue", "2")
RSS_GROWTH_LIMIT = 1.25  # peak resident memory at 4x may exceed the 1x peak by at most this factor


def check_level(summary: dict) -> None:
    assert summary["errors"] == {}, summary  # timeouts, transport errors, 5xx other than 503 + Retry-After
    assert summary["ok"] >= 1, summary
    assert summary["ok"] + summary["rejected"] + summary["invalid"] == summary["sent"], summary
    # Every answered request with a latency budget (all of the mix's are auto) had its choice scored once.
    assert sum(summary["budget_choices"].values()) == summary["budgeted"], summary


def run_levels(server: ServerProcess, levels: list[int], requests: int, max_new_tokens: int) -> list[dict]:
    info = httpx.get(f"{server.url}/info", timeout=30).json()
    mix, at_once = request_mix(info), capacity(info)
    # Every plan of the mix serves once first: a plan's first request builds its packs (fp's alone are
    # 257 MiB), which would count as growth under load in whichever level happens to admit it first.
    for body in (body for body in mix if "latency_budget_ms" not in body):
        response = httpx.post(f"{server.url}/generate", json={"prompt": "Hello", "max_new_tokens": 2, **body},
                              timeout=120)
        assert response.status_code == 200, response.text
    rows = []
    for level in levels:
        result = asyncio.run(run_level(server.url, level * at_once, requests, max_new_tokens, deadline_s=600,
                                       mix=mix, seed=level, server_pid=server.process.pid))
        rows.append({"level": f"{level}x", **result.summary()})
    return rows


def assert_alive_and_idle(server: ServerProcess) -> None:
    assert server.process.poll() is None, server.log_tail()
    assert httpx.get(f"{server.url}/ready", timeout=30).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert "quept_requests_running 0.0" in metrics and "quept_requests_waiting 0.0" in metrics


def test_four_times_capacity_is_shed_or_browned_out_never_timed_out(tmp_path):
    server = ServerProcess(tmp_path / "serve.log", *SMALL_SERVER)
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        one, four = run_levels(server, [1, 4], requests=16, max_new_tokens=4)
        print_table([one, four])
        for row in (one, four):
            check_level(row)
        assert four["rejected"] + round(four["downgrade_rate"] * four["ok"]) >= 1, four
        assert four["peak_rss_mb"] <= one["peak_rss_mb"] * RSS_GROWTH_LIMIT, (one, four)
        assert_alive_and_idle(server)
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_one_two_and_four_times_capacity_at_default_settings(tmp_path):
    server = ServerProcess(tmp_path / "serve.log")
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        rows = run_levels(server, [1, 2, 4], requests=160, max_new_tokens=16)
        print_table(rows)
        for row in rows:
            check_level(row)
        assert rows[2]["peak_rss_mb"] <= rows[0]["peak_rss_mb"] * RSS_GROWTH_LIMIT, rows
        assert_alive_and_idle(server)
    finally:
        assert server.stop() == 0
