"""The HTTP contract of the native and operations routes, on the real app with a fake backend."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.support import wait_for
from tests.unit.fakes import ALTERNATIVE_LOGPROBS, CHOSEN_LOGPROB, FakeBackend, FakeEngine, expected_text


def sse_events(text: str) -> list[tuple[str | None, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = line[len("data: "):]
        events.append((name, data))
    return events


def test_ready_is_503_until_the_model_is_loaded_and_health_is_always_200():
    release = threading.Event()

    def slow_loader(_):
        release.wait(10)
        return FakeBackend()

    with TestClient(create_app(Settings(), loader=slow_loader)) as client:
        assert client.get("/health").status_code == 200
        not_ready = client.get("/ready")
        assert not_ready.status_code == 503 and "Retry-After" in not_ready.headers
        assert not_ready.json()["error"]["type"] == "not_ready"
        refused = client.post("/generate", json={"prompt": "hi"})
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        assert client.get("/info").json()["phase"] == "loading"
        release.set()
        wait_for(lambda: client.get("/ready").status_code == 200, timeout_s=10)


def test_a_failed_start_up_reports_once_and_stays_unready():
    reported: list[str] = []

    def broken(_):
        raise ValueError("artifact /x/manifest.json is truncated; run `quept calibrate`")

    with TestClient(create_app(Settings(), loader=broken, on_fatal=reported.append)) as client:
        wait_for(lambda: reported, timeout_s=10)
        assert reported == ["artifact /x/manifest.json is truncated; run `quept calibrate`"]
        assert "truncated" in client.get("/ready").json()["error"]["message"]


def test_generate_serves_the_requested_precision_with_body_and_headers(make_client):
    client = make_client()
    response = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 6, "precision": "w4"},
                           headers={"x-request-id": "abc-123"})
    assert response.status_code == 200
    body = response.json()
    assert body["generated_text"] == expected_text("w4", 6)
    assert body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 6}
    precision = body["precision"]
    assert precision["requested"] == "w4" and precision["served"] == "w4" and not precision["degraded"]
    assert precision["plan"]["mode"] == "uniform" and precision["plan"]["nominal_bits"] == 4.0
    assert set(precision["plan"]["bits_by_layer_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"}
    assert body["timing"]["total_ms"] >= body["timing"]["ttft_ms"] >= body["timing"]["queue_ms"] >= 0
    timing = body["timing"]
    assert timing["predicted_total_ms"] > timing["predicted_ttft_ms"] >= timing["predicted_queue_ms"] >= 0
    headers = response.headers
    assert headers["x-request-id"] == "abc-123"
    assert headers["x-precision-requested"] == "w4" and headers["x-precision-served"] == "w4"
    assert float(headers["x-queue-time-ms"]) >= 0 and float(headers["x-time-to-first-token-ms"]) >= 0


def test_mixed_precision_is_served_with_its_per_type_bits(make_client):
    body = make_client().post("/generate", json={"prompt": "Hi", "max_new_tokens": 3,
                                                 "precision": "mixed:4.5"}).json()
    plan = body["precision"]["plan"]
    assert body["precision"]["served"] == "mixed:4.50" and plan["mode"] == "mixed"
    assert 4.0 < plan["nominal_bits"] < 5.0
    assert body["generated_text"] == expected_text("mixed:4.50", 3)


def test_chat_messages_use_the_chat_template(make_client):
    client = make_client()
    body = client.post("/generate", json={"messages": [{"role": "user", "content": "hi"}],
                                          "max_new_tokens": 2}).json()
    template = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert body["usage"]["prompt_tokens"] == len(client.backend.tokenizer.encode(template, add_special_tokens=False))


def test_a_chat_template_that_refuses_the_messages_is_a_422_naming_them(make_client):
    client = make_client()
    client.backend.tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    response = client.post("/generate", json={"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2})
    error = response.json()["error"]
    assert response.status_code == 422 and error["param"] == "messages"
    assert "chat template refused them: roles must alternate user/assistant" in error["message"]


def test_auto_takes_the_best_plan_and_a_sampled_request_reports_its_seed(make_client):
    body = make_client().post("/generate", json={"prompt": "x", "max_new_tokens": 2, "temperature": 0.7}).json()
    assert body["precision"]["requested"] == "auto" and body["precision"]["served"] == "w8"
    assert isinstance(body["seed"], int)


def test_stream_sends_one_event_per_token_then_the_whole_body(make_client):
    response = make_client().post("/generate", json={"prompt": "Hi", "max_new_tokens": 4, "stream": True,
                                                     "precision": "w6"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-precision-served"] == "w6"
    events = sse_events(response.text)
    tokens = [json.loads(data) for _, data in events[:-1]]
    assert [t["index"] for t in tokens] == [0, 1, 2, 3]
    assert "".join(t["token"]["text"] for t in tokens) == expected_text("w6", 4)
    final = json.loads(events[-1][1])
    assert final["generated_text"] == expected_text("w6", 4) and final["precision"]["served"] == "w6"


def test_validation_errors_name_the_field(make_client):
    client = make_client()
    cases = [
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 10_000}, "max_new_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "surprise": 1}, "surprise"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "precision": "w9"}, "precision"),
        ({"prompt": "x", "min_precision": "auto"}, "min_precision"),
        ({"prompt": "x", "messages": None, "stop": [""]}, "stop"),
        ({"messages": [{"role": "robot", "content": "y"}]}, "messages.0.role"),
    ]
    for body, field in cases:
        response = client.post("/generate", json=body)
        assert response.status_code == 422, body
        error = response.json()["error"]
        assert error["param"] == field and field.split(".")[0] in error["message"], (body, error)
        assert error["type"] == "invalid_request_error"
    unknown = client.post("/generate", json={"prompt": "x", "precision": "w9"}).json()["error"]["message"]
    assert "w4" in unknown and "mixed:" in unknown  # lists what is allowed


def test_malformed_json_is_a_422_with_the_error_body(make_client):
    response = make_client().post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "body"


def test_body_over_the_limit_is_413(make_client):
    client = make_client(max_body_bytes=2048)
    response = client.post("/generate", json={"prompt": "x" * 5000})
    assert response.status_code == 413 and response.json()["error"]["type"] == "body_too_large"

    def chunks():
        yield b'{"prompt": "'
        yield b"y" * 5000
        yield b'"}'

    chunked = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def test_infeasible_budget_without_degrade_is_422_with_the_cheapest_cost(make_client):
    client = make_client()
    body = {"prompt": "x", "precision": "w8", "memory_budget_mb": 0.01, "allow_degrade": False}
    response = client.post("/generate", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "infeasible_budget" and error["param"] == "memory_budget_mb"
    assert "the smallest plan, w3, needs" in error["message"]
    assert client.post("/generate/plan", json=body).status_code == 422  # a dry run is not a rejection
    assert 'quept_admission_rejections_total{reason="infeasible"} 1.0' in client.get("/metrics").text


def test_plans_larger_than_the_memory_limit_are_not_served_and_their_requests_name_both_sizes():
    backend = FakeBackend()
    limit = backend.describe(backend.resolve("w5")).weight_bytes
    backend.memory_limit_bytes = limit
    with TestClient(create_app(Settings(), loader=lambda _: backend)) as client:
        wait_for(lambda: client.get("/ready").status_code == 200, timeout_s=10)
        listed = {row["precision"] for row in client.get("/precisions").json()["precisions"]}
        assert listed == {"w3", "w4", "w5", "mixed:4.50"}
        for precision in ("fp", "w6"):
            response = client.post("/generate", json={"prompt": "Hello", "precision": precision})
            assert response.status_code == 422
            error = response.json()["error"]
            assert error["param"] == "precision" and f"memory limit is {limit / 2**20:.1f} MiB" in error["message"]
        served = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 2}).json()["precision"]["served"]
        assert backend.describe(backend.resolve(served)).weight_bytes <= limit


def test_plan_route_predicts_without_generating(make_client):
    client = make_client()
    added = len(client.backend.engine.added)
    response = client.post("/generate/plan", json={"prompt": "Hello", "max_new_tokens": 10, "precision": "w5"})
    assert response.status_code == 200
    body = response.json()
    assert body["precision"]["served"] == "w5"
    predicted = body["predicted"]
    assert predicted["latency_ms"] > 0 and predicted["memory_mb"] == predicted["weights_mb"] + predicted[
        "kv_cache_mb"]
    assert predicted["kv_cache_mb"] * 2**20 == (5 + 10) * FakeBackend.kv_bytes_per_token
    assert len(client.backend.engine.added) == added


def test_info_and_precisions_describe_every_servable_plan(make_client):
    client = make_client()
    info = client.get("/info").json()
    assert info["model"] == "tiny" and info["artifact"] == "0123456789ab" and info["bit_set"] == [3, 4, 5, 6, 7, 8]
    assert info["defaults"]["precision"] == "auto" and info["limits"]["max_new_tokens"] == 512
    rows = {row["precision"]: row for row in client.get("/precisions").json()["precisions"]}
    assert {"fp", "w3", "w4", "w5", "w6", "w7", "w8", "mixed:4.50"} == set(rows)
    assert rows["w4"]["decode_tokens_per_s"] > 0 and rows["w4"]["weight_bytes"] < rows["w8"]["weight_bytes"]
    assert rows["fp"]["auto_candidate"] is False and rows["w4"]["auto_candidate"] is True
    assert rows["w8"]["ppl_delta_pct"] == 0.05


def test_an_engine_failure_is_a_500_with_the_error_body(make_client):
    engine = FakeEngine()
    client = make_client(engine)
    engine.fail_on = "w7"
    response = client.post("/generate", json={"prompt": "x", "precision": "w7"})
    assert response.status_code == 500 and response.json()["error"]["type"] == "internal_error"


def test_metrics_count_requests_by_route_status_and_precision(make_client):
    client = make_client()
    client.post("/generate", json={"prompt": "x", "max_new_tokens": 2, "precision": "w4"})
    client.post("/generate", json={"prompt": "x", "precision": "w9"})
    text = client.get("/metrics").text
    assert ('quept_requests_total{precision_requested="w4",precision_served="w4",route="/generate",'
            'status="200"} 1.0') in text
    assert ('quept_requests_total{precision_requested="invalid",precision_served="none",route="/generate",'
            'status="422"} 1.0') in text
    assert 'quept_controller_decisions_total{mode="uniform"} 1.0' in text
    assert 'quept_build_info{artifact="0123456789ab",model="tiny",version="0.1.0"} 1.0' in text


def test_details_list_each_token_with_its_logprob_and_top_n_alternatives(make_client):
    client = make_client()
    body = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 3, "precision": "w4", "details": True,
                                          "top_n_tokens": 2}).json()
    tokens = body["details"]["tokens"]
    assert "".join(t["text"] for t in tokens) == body["generated_text"] == expected_text("w4", 3)
    assert all(t["logprob"] == pytest.approx(CHOSEN_LOGPROB) and not t["special"] for t in tokens)
    tops = body["details"]["top_tokens"]
    assert [[t["logprob"] for t in top] for top in tops] == [pytest.approx([CHOSEN_LOGPROB,
                                                                            ALTERNATIVE_LOGPROBS[0]])] * 3
    assert [top[0]["id"] for top in tops] == [t["id"] for t in tokens]
    assert client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}).json()["details"] is None


def test_streamed_tokens_carry_their_logprob_with_details(make_client):
    response = make_client().post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "stream": True,
                                                     "details": True, "top_n_tokens": 1})
    events = [json.loads(data) for _, data in sse_events(response.text)]
    assert [e["token"]["logprob"] for e in events[:-1]] == pytest.approx([CHOSEN_LOGPROB] * 2)
    assert [len(e["top_tokens"]) for e in events[:-1]] == [1, 1]
    assert len(events[-1]["details"]["tokens"]) == 2
    plain = make_client().post("/generate", json={"prompt": "Hi", "max_new_tokens": 1, "stream": True})
    assert set(json.loads(sse_events(plain.text)[0][1])) == {"token", "index"}


def test_the_precision_header_applies_unless_the_body_names_another(make_client):
    client = make_client()
    headers = {"x-quept-precision": "w5"}
    response = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=headers)
    assert response.json()["precision"]["served"] == "w5" and response.headers["x-quept-precision"] == "w5"
    assert client.post("/generate/plan", json={"prompt": "Hi"}, headers=headers).json()["precision"]["served"] == "w5"
    agreeing = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "precision": "w5"},
                           headers=headers)
    assert agreeing.status_code == 200
    conflict = client.post("/generate", json={"prompt": "Hi", "precision": "w4"}, headers=headers)
    assert conflict.status_code == 422
    error = conflict.json()["error"]
    assert error["param"] == "precision" and "x-quept-precision" in error["message"] and "'w5'" in error["message"]
    unknown = client.post("/generate", json={"prompt": "Hi"}, headers={"x-quept-precision": "w1"}).json()["error"]
    assert unknown["param"] == "x-quept-precision" and "mixed:" in unknown["message"]


def test_a_seeded_sampled_request_is_served_with_that_seed(make_client):
    body = make_client().post("/generate", json={"prompt": "x", "max_new_tokens": 5, "temperature": 1.0,
                                                 "seed": 7, "precision": "w4"}).json()
    assert body["seed"] == 7 and body["generated_text"] == expected_text("w4", 5, 7)


def test_bad_details_fields_are_422_naming_them(make_client):
    client = make_client()
    for body, field in [({"top_n_tokens": 2}, "top_n_tokens"), ({"details": True, "top_n_tokens": 21}, "top_n_tokens"),
                        ({"details": "maybe"}, "details")]:
        response = client.post("/generate", json={"prompt": "x", **body})
        assert response.status_code == 422, body
        assert response.json()["error"]["param"] == field
