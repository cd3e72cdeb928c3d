"""Fuzzing every route of the live server from its own /openapi.json, plus hand-written hostile bodies.

The contract under test: never a 5xx other than 503 + Retry-After, and every error in the one error body
{"error": {"type", "message", "param"}}. CI runs a few examples per route with short generations; the wide
run (`-m slow`) lets Schemathesis pick any length the schema allows.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

pytestmark = pytest.mark.e2e

TIMEOUT = httpx.Timeout(300.0)
GENERATION_PATHS = ("/generate", "/generate/plan", "/v1/completions", "/v1/chat/completions")
LENGTH_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")
CI_MAX_TOKENS = 2
SETTINGS = {"deadline": None, "derandomize": True, "suppress_health_check": list(HealthCheck)}


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def error_body_problem(response: httpx.Response | object, status: int, text: str) -> str | None:
    """Why an error response breaks the contract's error body, or None when it keeps it."""
    if status < 400:
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return f"{status} with a body that is not JSON: {text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != {"type", "message", "param"}:
        return f"{status} without the contract's error body: {text[:200]!r}"
    if not isinstance(error["message"], str) or not error["message"] or "\n" in error["message"]:
        return f"{status} whose message is not one line: {error['message']!r}"
    if status == 503 and "retry-after" not in {k.lower() for k in response.headers}:
        return "503 without Retry-After"
    return None


@schemathesis.check
def contract_error_body(ctx, response, case) -> bool | None:
    problem = error_body_problem(response, response.status_code, response.text)
    if problem:
        raise AssertionError(problem)
    return None


def shorten(case) -> None:
    """Keep generated generations short in CI: a valid long length becomes CI_MAX_TOKENS."""
    if case.path in GENERATION_PATHS and isinstance(case.body, dict):
        for name in LENGTH_FIELDS:
            value = case.body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > CI_MAX_TOKENS:
                case.body[name] = CI_MAX_TOKENS
        if case.path.startswith("/v1/") and "max_tokens" not in case.body:
            case.body["max_tokens"] = CI_MAX_TOKENS


def fuzz(url: str, max_examples: int, short: bool) -> int:
    """Positive and negative cases for every operation; returns how many requests were sent."""
    sent = 0
    for operation in operations(url):
        # A route without parameters or body has no negative input to generate.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.body else [])
        for mode in modes:
            @settings(max_examples=max_examples, **SETTINGS)
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                nonlocal sent
                if short:
                    shorten(case)
                sent += 1
                case.call_and_validate(base_url=url, checks=[not_a_server_error, contract_error_body],
                                       timeout=600)

            run()
    return sent


def test_fuzz_every_route_quickly(live_server_url):
    assert fuzz(live_server_url, max_examples=5, short=True) >= 10 * 2


@pytest.mark.slow
def test_fuzz_every_route_widely(live_server_url):
    assert fuzz(live_server_url, max_examples=100, short=False) >= 10 * 2


def hostile_bodies(bit_set: list[int]) -> dict[str, bytes | dict]:
    """Request bodies a careless or hostile client might send to POST /generate."""
    ok = {"prompt": "Hi", "max_new_tokens": 1}
    return {
        "empty prompt": {**ok, "prompt": ""},
        "huge prompt (300k characters)": {**ok, "prompt": "word " * 60_000},
        "prompt as a number": {**ok, "prompt": 42},
        "prompt as an object": {**ok, "prompt": {"text": "Hi"}},
        "both prompt and messages": {**ok, "messages": [{"role": "user", "content": "Hi"}]},
        "neither prompt nor messages": {"max_new_tokens": 1},
        "messages with a bad role": {"messages": [{"role": "root", "content": "Hi"}], "max_new_tokens": 1},
        "max_new_tokens negative": {**ok, "max_new_tokens": -5},
        "max_new_tokens zero": {**ok, "max_new_tokens": 0},
        "max_new_tokens huge": {**ok, "max_new_tokens": 10**12},
        "max_new_tokens beyond int64": {**ok, "max_new_tokens": 10**30},
        "max_new_tokens as text": {**ok, "max_new_tokens": "many"},
        "temperature negative": {**ok, "temperature": -1},
        "temperature huge": {**ok, "temperature": 1e308},
        "top_p above one": {**ok, "top_p": 1.5},
        "seed negative": {**ok, "seed": -1},
        "seed beyond int64": {**ok, "seed": 2**64},
        "unknown precision": {**ok, "precision": "w42"},
        "precision outside the bit set": {**ok, "precision": f"w{max(bit_set) + 1}"},
        "mixed with no bits": {**ok, "precision": "mixed:"},
        "mixed below the bit set": {**ok, "precision": "mixed:0.5"},
        "mixed NaN": {**ok, "precision": "mixed:nan"},
        "min_precision unknown": {**ok, "min_precision": "w0"},
        "NaN latency budget": b'{"prompt": "Hi", "max_new_tokens": 1, "latency_budget_ms": NaN}',
        "Infinity memory budget": b'{"prompt": "Hi", "max_new_tokens": 1, "memory_budget_mb": -Infinity}',
        "negative latency budget": {**ok, "latency_budget_ms": -1},
        "zero memory budget": {**ok, "memory_budget_mb": 0},
        "tiny budget without degrading": {**ok, "latency_budget_ms": 1e-9, "allow_degrade": False},
        "invalid UTF-8": b'{"prompt": "\xff\xfe\xc3\x28", "max_new_tokens": 1}',
        "lone surrogate escape": b'{"prompt": "\\ud800", "max_new_tokens": 1}',
        "NUL in the prompt": {**ok, "prompt": "a\u0000b"},
        "not JSON": b"prompt=Hi",
        "JSON array": b"[1, 2, 3]",
        "JSON null": b"null",
        "deeply nested": b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "unknown field": {**ok, "temperature_celsius": 20},
        "1,000 stop strings": {**ok, "stop": [f"stop{i}" for i in range(1000)]},
        "an empty stop string": {**ok, "stop": [""]},
        "stream as text": {**ok, "stream": "yes"},
    }


@pytest.fixture(scope="module")
def bit_set(live_server_url) -> list[int]:
    return httpx.get(f"{live_server_url}/info", timeout=30).json()["bit_set"]


def send(url: str, body: bytes | dict, path: str = "/generate") -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)
    return httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=TIMEOUT)


@pytest.mark.parametrize("name", list(hostile_bodies([3, 4, 8])))
def test_a_hostile_body_gets_a_contract_answer(live_server_url, bit_set, name):
    body = hostile_bodies(bit_set)[name]
    response = send(live_server_url, body)
    assert response.status_code < 500 or response.status_code == 503, (name, response.status_code, response.text)
    assert error_body_problem(response, response.status_code, response.text) is None
    if response.status_code >= 400:
        assert response.status_code in (413, 422), (name, response.status_code, response.text)
        assert response.json()["error"]["type"] != "internal_error"
        if response.status_code == 422:
            assert response.json()["error"]["param"], "a validation error names its field"
    assert httpx.get(f"{live_server_url}/health", timeout=30).status_code == 200


def test_bad_precisions_are_422_naming_the_field_and_the_allowed_values(live_server_url, bit_set):
    for precision in ("w42", "fp16", "mixed:nan", "auto\x00"):
        response = send(live_server_url, {"prompt": "Hi", "max_new_tokens": 1, "precision": precision})
        assert response.status_code == 422, (precision, response.text)
        error = response.json()["error"]
        assert error["param"] == "precision"
        assert "auto" in error["message"] and f"w{bit_set[0]}" in error["message"], error["message"]


def test_a_precision_with_spaces_is_served_and_echoed_as_parsed(live_server_url):
    response = send(live_server_url, {"prompt": "Hi", "max_new_tokens": 1, "precision": " AUTO "})
    assert response.status_code == 200, response.text
    assert response.headers["x-precision-requested"] == "auto"


def test_a_10_mb_body_is_refused_with_413_on_every_generation_route(live_server_url):
    body = json.dumps({"prompt": "x" * (10 * 2**20), "max_new_tokens": 1}).encode()
    for path in GENERATION_PATHS:
        response = send(live_server_url, body, path)
        assert response.status_code == 413, (path, response.status_code)
        assert response.json()["error"]["type"] == "body_too_large"


def test_a_10_mb_chunked_body_without_length_is_refused(live_server_url):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 2**20
        yield b'"}'

    response = httpx.post(f"{live_server_url}/generate", content=chunks(), timeout=TIMEOUT,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert error_body_problem(response, response.status_code, response.text) is None


def test_openai_routes_answer_bad_input_with_400_in_the_error_body(live_server_url):
    cases = {
        "/v1/completions": [{"model": "x", "prompt": "Hi", "max_tokens": -1},
                            {"model": "x", "prompt": ["a", "b"], "max_tokens": 1},
                            {"prompt": "Hi"},
                            {"model": "x", "prompt": "Hi", "max_tokens": 1, "stop": ["s"] * 1000}],
        "/v1/chat/completions": [{"model": "x", "messages": []},
                                 {"model": "x", "messages": [{"role": "user", "content": [{"type": "image"}]}]},
                                 {"model": "x", "messages": [{"role": "user", "content": "Hi"}],
                                  "temperature": float("inf")}],
    }
    for path, bodies in cases.items():
        for body in bodies:
            response = httpx.post(f"{live_server_url}{path}", content=json.dumps(body).encode(), timeout=TIMEOUT,
                                  headers={"content-type": "application/json"})
            assert response.status_code == 400, (path, body, response.text)
            assert error_body_problem(response, 400, response.text) is None
