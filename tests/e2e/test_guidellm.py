"""An outside load tool, guidellm (the `loadgen` extra), against a real server: every request completes,
and the output tokens it counts are the ones the server's own metrics count."""

from __future__ import annotations

import os

import httpx
import pytest

from benchmarks.guidellm_sweep import find_guidellm, run_guidellm, summarize, tokenizer_folder
from tests.support import STARTUP_TIMEOUT_S, ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def guidellm_cli() -> str:
    cli = find_guidellm(os.environ.get("QUEPT_GUIDELLM"))
    if cli is None:
        pytest.skip("guidellm is not installed (the `loadgen` extra; or set QUEPT_GUIDELLM)")
    return cli


def summed(url: str, name: str, *label_parts: str) -> float:
    """The sum of a counter's series whose labels contain every one of `label_parts`."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") and all(part in line for part in label_parts):
            total += float(line.split()[-1])
    return total


def test_guidellm_sweep_completes_and_counts_what_the_server_counts(tmp_path):
    cli = guidellm_cli()
    server = ServerProcess(tmp_path / "serve.log", "--max-running", "4")
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        before = summed(server.url, "quept_generation_tokens_total")
        report = run_guidellm(cli, server.url, "smollm2-135m", tokenizer_folder(None), [1, 4], requests=8,
                              prompt_tokens=64, output_tokens=8, workers=1, out=tmp_path / "report.json")
        rows = summarize(report)
        assert [row["concurrency"] for row in rows] == [1, 4]
        assert all(row["completed"] == 8 and row["failed"] == 0 for row in rows), rows
        counted = sum(b["metrics"]["output_token_count"]["successful"]["total_sum"] for b in report["benchmarks"])
        assert counted == summed(server.url, "quept_generation_tokens_total") - before
        assert summed(server.url, "quept_requests_total", 'route="/v1/chat/completions"', 'status="200"') == 16
    finally:
        assert server.stop() == 0
