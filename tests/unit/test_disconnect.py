"""A client that goes away stops its generation within one decode step and frees its slot."""

from __future__ import annotations

import httpx

from tests.support import metric, wait_for
from tests.unit.fakes import FakeEngine, expected_text


def gated_server(live_fake_server) -> tuple[str, FakeEngine]:
    engine = FakeEngine()
    url, _ = live_fake_server(engine, max_running=1)
    engine.gated = True  # after warm-up: from now on each step waits for allow()
    return url, engine


def test_a_closed_stream_is_cancelled_within_one_step_and_frees_its_slot(live_fake_server):
    url, engine = gated_server(live_fake_server)
    engine.allow(3)
    with httpx.stream("POST", f"{url}/generate", json={"prompt": "x", "max_new_tokens": 400, "stream": True,
                                                        "precision": "w4"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # The server notices the disconnect while the engine is held inside the next step.
    wait_for(lambda: metric(url, 'quept_requests_total{precision_requested="w4",precision_served="w4",'
                                 'route="/generate",status="499"}') == 1)
    steps_at_disconnect = engine.steps_with("w4")
    engine.allow(1000)
    after = httpx.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": 3, "precision": "w8"}, timeout=10)
    assert after.json()["generated_text"] == expected_text("w8", 3)
    assert engine.steps_with("w4") <= steps_at_disconnect + 1
    assert metric(url, 'quept_request_failures_total{reason="dropped"}') == 1
    assert metric(url, "quept_requests_running") == 0


def test_an_abandoned_plain_request_is_cancelled_within_one_step(live_fake_server):
    url, engine = gated_server(live_fake_server)
    engine.allow(2)
    try:
        httpx.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": 400, "precision": "w6"}, timeout=0.5)
    except httpx.ReadTimeout:
        pass
    wait_for(lambda: metric(url, 'quept_requests_total{precision_requested="w6",precision_served="w6",'
                                 'route="/generate",status="499"}') == 1)
    steps_at_disconnect = engine.steps_with("w6")
    engine.allow(1000)
    wait_for(lambda: metric(url, 'quept_request_failures_total{reason="dropped"}') == 1)
    assert engine.steps_with("w6") <= steps_at_disconnect + 1
