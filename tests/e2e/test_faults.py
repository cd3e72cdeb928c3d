"""Faults: clients that vanish mid-stream, SIGTERM under load, broken artifacts, a memory limit below one
plan, and a calibration killed mid-way. Servers that must fail or stop run as processes of their own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from quept_core.artifact.store import MANIFEST, STATE, default_artifact_dir
from quept_core.io.models import DEFAULT_MODEL
from tests.e2e.tiny_model import write_tiny_model
from tests.support import (
    REPO_ROOT,
    SERVE_COMMAND,
    STARTUP_TIMEOUT_S,
    WIKITEXT_TEST,
    ServerProcess,
    free_port,
    metric,
    wait_for,
)

pytestmark = pytest.mark.e2e

TIMEOUT = httpx.Timeout(300.0)
DEFAULT_PRESET = "fast"  # what `quept serve` calibrates on first start






def serve_until_exit(*flags: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """`quept serve` expected to refuse start-up: its exit status and output."""
    command = [*SERVE_COMMAND, "--host", "127.0.0.1", "--port", str(free_port()), *flags]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


# ---- clients that disconnect -------------------------------------------------------------------


def open_and_drop(url: str, path: str, body: dict) -> None:
    """Read the first streamed event, then close the connection."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200, response.read()
        next(line for line in response.iter_lines() if line.startswith("data: "))


def test_many_clients_dropping_mid_stream_free_every_slot(live_server_url):
    url = live_server_url
    dropped = metric(url, 'quept_request_failures_total{reason="dropped"}')
    native = {"prompt": "Write a long story.", "max_new_tokens": 400, "precision": "w4", "stream": True}
    model = httpx.get(f"{url}/info", timeout=30).json()["model"]
    chat = {"model": f"{model}@w8", "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 400, "stream": True}
    calls = [("/generate", native)] * 3 + [("/v1/chat/completions", chat)] * 3
    with ThreadPoolExecutor(len(calls)) as pool:
        list(pool.map(lambda call: open_and_drop(url, *call), calls))
    wait_for(lambda: metric(url, "quept_requests_running") == 0 and metric(url, "quept_requests_waiting") == 0)
    assert metric(url, 'quept_request_failures_total{reason="dropped"}') == dropped + len(calls)
    after = httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 2}, timeout=TIMEOUT)
    assert after.status_code == 200, after.text


# ---- SIGTERM under load --------------------------------------------------------------------------


def test_sigterm_under_load_finishes_in_flight_work_refuses_new_and_exits_zero(tmp_path):
    server = ServerProcess(tmp_path / "serve.log", "--max-running", "4",
                           env={"QUEPT_DRAIN_TIMEOUT_S": "120"})
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        url = server.url
        body = {"prompt": "Once upon a time", "max_new_tokens": 12, "precision": "w4"}
        with ThreadPoolExecutor(8) as pool:
            in_flight = [pool.submit(httpx.post, f"{url}/generate", json=body, timeout=TIMEOUT) for _ in range(8)]
            wait_for(lambda: metric(url, "quept_requests_running") >= 2 and metric(url, "quept_requests_waiting") >= 1)
            server.process.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(f"{url}/ready", timeout=30).status_code == 503)
            refused = httpx.post(f"{url}/generate", json=body, timeout=TIMEOUT)
            responses = [future.result() for future in in_flight]
        assert refused.status_code == 503 and "retry-after" in refused.headers, refused.text
        assert refused.json()["error"]["type"] == "draining"
        assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
        assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in responses)
        assert server.process.wait(120) == 0
    finally:
        server.stop()


def test_sigterm_with_a_short_drain_timeout_aborts_and_still_exits_zero(tmp_path):
    server = ServerProcess(tmp_path / "serve.log", env={"QUEPT_DRAIN_TIMEOUT_S": "1"})
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        outcome: dict = {}

        def long_request() -> None:
            try:
                outcome["response"] = httpx.post(f"{server.url}/generate", timeout=TIMEOUT,
                                                 json={"prompt": "Write a long story.", "max_new_tokens": 500,
                                                       "precision": "w4"})
            except httpx.HTTPError as error:
                outcome["error"] = error

        client = threading.Thread(target=long_request)
        client.start()
        wait_for(lambda: metric(server.url, "quept_requests_running") == 1)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        client.join(60)
        assert time.monotonic() - started < 30, "the drain timeout did not bound the shutdown"
        response = outcome.get("response")
        if response is not None:  # the aborted request answers in the error body, or ends early
            assert response.status_code in (200, 503), response.text
            if response.status_code == 200:
                assert response.json()["usage"]["completion_tokens"] < 500
    finally:
        server.stop()


# ---- broken artifacts ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_artifact(live_server_url) -> Path:
    """The artifact the servers of this run use: QUEPT_ARTIFACT, else the default model's cached one
    (calibrated by the first server start, which the live server fixture ensures)."""
    given = os.environ.get("QUEPT_ARTIFACT")
    folder = Path(given) if given else default_artifact_dir(DEFAULT_MODEL, DEFAULT_PRESET)
    if not (folder / MANIFEST).is_file():
        pytest.skip(f"no local artifact at {folder} (the live server is external)")
    return folder


def corrupt(folder: Path) -> str:
    path = folder / STATE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return STATE


def truncate(folder: Path) -> str:
    path = folder / STATE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return STATE


def rebind(folder: Path) -> str:
    """Bind the artifact to another base model's checksum."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["model"]["checksum"] = "f" * 64
    path.write_text(json.dumps(manifest))
    return MANIFEST


def drop_manifest(folder: Path) -> str:
    (folder / MANIFEST).unlink()
    return MANIFEST


def future_format(folder: Path) -> str:
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    return MANIFEST


@pytest.mark.parametrize("damage", [corrupt, truncate, rebind, drop_manifest, future_format],
                         ids=lambda damage: damage.__name__)
def test_a_broken_artifact_stops_start_up_with_one_line(cached_artifact, tmp_path, damage):
    copy = tmp_path / "artifact"
    shutil.copytree(cached_artifact, copy)
    damaged_file = damage(copy)
    result = serve_until_exit("--artifact", str(copy))
    assert result.returncode != 0
    line = last_line(result)
    assert line.startswith("error: ") and str(copy / damaged_file) in line, result.stderr[-2000:]
    assert "quept calibrate" in line, line
    assert "Traceback" not in result.stderr


# ---- the resident-memory limit -------------------------------------------------------------------


def test_a_memory_limit_below_one_plan_stops_start_up_with_one_line():
    result = serve_until_exit("--memory-limit-mb", "1")
    assert result.returncode != 0
    line = last_line(result)
    assert line.startswith("error: ") and "QUEPT_MEMORY_LIMIT_MB" in line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_memory_limit_that_fits_one_plan_at_a_time_evicts_and_stays_within_it(live_server_url, tmp_path):
    sizes = {row["precision"]: row["weight_bytes"]
             for row in httpx.get(f"{live_server_url}/precisions", timeout=30).json()["precisions"]}
    largest = max(sizes.values())
    limit_mb = largest * 1.1 / 2**20
    assert largest * 1.1 < sizes["fp"] + sizes["w8"] + sizes["w3"], "the limit would hold several plans"
    server = ServerProcess(tmp_path / "serve.log", "--memory-limit-mb", f"{limit_mb:.3f}")
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        for precision in ("w8", "w3", "fp", "w3"):
            response = httpx.post(f"{server.url}/generate", timeout=TIMEOUT,
                                  json={"prompt": "Hi", "max_new_tokens": 2, "precision": precision})
            assert response.status_code == 200, response.text
            resident = sum(float(line.split()[-1]) for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                           if line.startswith("quept_weights_resident_bytes{"))
            assert 0 < resident <= limit_mb * 2**20, (precision, resident)
    finally:
        assert server.stop() == 0


# ---- calibration killed mid-way ------------------------------------------------------------------

CALIBRATE = """
import json, sys
import torch
from quept_core.artifact.store import calibrate_artifact
from quept_core.calibration.loop import CalibrationConfig
from quept_core.io.models import load_model

torch.set_num_threads(1)
config = CalibrationConfig(n_samples=4, seqlen=64, batch_size=2, clip_search_grid=4, clip_search_samples=2)
result = calibrate_artifact(load_model(sys.argv[1]), config, sys.argv[2], text_file=sys.argv[3], progress=False)
print(json.dumps({"resumed_from": result.resumed_from}))
"""
TINY_LAYERS = 6


def calibrate_command(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", CALIBRATE, str(model), str(out), str(WIKITEXT_TEST)]


def test_calibration_killed_after_a_block_resumes_to_the_same_artifact(tmp_path):
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"{WIKITEXT_TEST} is missing")
    model = write_tiny_model(tmp_path / "tiny", layers=TINY_LAYERS)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(calibrate_command(model, reference), cwd=REPO_ROOT, check=True, capture_output=True, timeout=600)

    progress = killed.with_name(f".{killed.name}.partial") / "progress.json"
    process = subprocess.Popen(calibrate_command(model, killed), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: progress.is_file() or process.poll() is not None, timeout_s=600)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(60)
    assert process.returncode == -signal.SIGKILL, "the calibration ended before it could be killed"
    assert not killed.exists()
    assert 1 <= json.loads(progress.read_text())["next_block"] < TINY_LAYERS

    resumed = subprocess.run(calibrate_command(model, killed), cwd=REPO_ROOT, check=True, capture_output=True,
                             text=True, timeout=600)
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from"] >= 1
    assert (killed / STATE).read_bytes() == (reference / STATE).read_bytes()
    assert (killed / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()
    assert not progress.parent.exists()
