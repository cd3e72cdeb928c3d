"""The contract end to end: a real `quept serve` with the default model, over loopback HTTP.

Generations are kept to a few tokens: CI runs on two cores.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.support import metric

pytestmark = pytest.mark.e2e

# Asked for one word, the model answers "Paris" with a wide margin at every bit-width; the bare question
# leaves "The" and "L'" (L'Étoile) within 0.1 logits of each other, so kernel rounding could flip it.
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
TIMEOUT = httpx.Timeout(300.0)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)




def precisions(url: str) -> list[dict]:
    return httpx.get(f"{url}/precisions", timeout=30).json()["precisions"]


def a_mixed_plan(url: str) -> str:
    mixed = [row["precision"] for row in precisions(url) if row["mode"] == "mixed"]
    assert mixed, "the artifact offers no mixed plan"
    return mixed[len(mixed) // 2]


def test_health_ready_and_info(live_server_url):
    assert httpx.get(f"{live_server_url}/health").status_code == 200
    assert httpx.get(f"{live_server_url}/ready").status_code == 200
    info = httpx.get(f"{live_server_url}/info").json()
    assert info["model"] == "smollm2-135m" and info["artifact"] and info["bit_set"]
    assert info["limits"]["context_length"] == 8192


def test_greedy_chat_names_paris(live_server_url):
    response = post(live_server_url, "/generate", {"messages": CAPITAL, "max_new_tokens": 16})
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["generated_text"]


def test_every_uniform_plan_and_a_mixed_plan_serve_at_that_plan(live_server_url):
    bit_set = httpx.get(f"{live_server_url}/info").json()["bit_set"]
    for precision in [*(f"w{b}" for b in bit_set), a_mixed_plan(live_server_url)]:
        response = post(live_server_url, "/generate", {"prompt": "The capital of France is", "max_new_tokens": 2,
                                                       "precision": precision})
        assert response.status_code == 200, response.text
        assert response.headers["x-precision-served"] == precision
        assert response.json()["precision"]["served"] == precision


def test_a_tight_latency_budget_is_served_by_a_cheaper_plan(live_server_url):
    """The expectation comes from the server's own cost predictions: on a CPU the fastest plan is
    not always a low-bit one (int8 and int4 kernels run at about the same speed)."""
    body = {"prompt": "Tell me about the sea.", "max_new_tokens": 24}
    unbudgeted = post(live_server_url, "/generate/plan", body).json()
    default_plan, default_latency = unbudgeted["precision"]["served"], unbudgeted["predicted"]["latency_ms"]
    latency = {row["precision"]: post(live_server_url, "/generate/plan", {**body, "precision": row["precision"]})
               .json()["predicted"]["latency_ms"] for row in precisions(live_server_url) if row["auto_candidate"]}
    fastest = min(latency, key=latency.get)
    if latency[fastest] < default_latency:
        budget = (latency[fastest] + default_latency) / 2
        tight = post(live_server_url, "/generate", {**body, "latency_budget_ms": budget})
        assert tight.status_code == 200, tight.text
        served = tight.headers["x-precision-served"]
        assert served != default_plan and latency[served] < default_latency
        assert not tight.json()["precision"]["degraded"]  # auto chose it: no downgrade
    else:  # auto's own choice is already the fastest plan: nothing cheaper can meet a tighter budget
        refused = post(live_server_url, "/generate", {**body, "latency_budget_ms": default_latency / 2})
        assert refused.status_code == 422, refused.text
        assert f"the fastest plan, {fastest}," in refused.json()["error"]["message"]


def test_sixteen_concurrent_requests_each_get_their_own_plans_output(live_server_url):
    chosen = ["w3", "w4", "w8", a_mixed_plan(live_server_url)]
    body = {"prompt": "The three primary colours are", "max_new_tokens": 8, "allow_degrade": False}
    alone = {p: post(live_server_url, "/generate", {**body, "precision": p}).json()["generated_text"]
             for p in chosen}
    assert len(set(alone.values())) > 1, "the plans should not all say the same thing"
    order = [chosen[i % len(chosen)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda p: post(live_server_url, "/generate", {**body, "precision": p}), order))
    # Batched matmuls sum in another order than single-row ones, so a near-tie late in the text may flip a
    # token: each answer must follow its own plan's single-request answer for at least its first half.
    exact = 0
    for precision, response in zip(order, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.headers["x-precision-served"] == precision
        text = response.json()["generated_text"]
        exact += text == alone[precision]
        assert len(os.path.commonprefix([text, alone[precision]])) >= len(alone[precision]) // 2, \
            (precision, text, alone)
    assert exact >= len(order) // 2, "most answers should match their plan's single-request answer exactly"


def test_a_disconnected_stream_frees_its_slot(live_server_url):
    dropped = metric(live_server_url, 'quept_request_failures_total{reason="dropped"}')
    with httpx.stream("POST", f"{live_server_url}/generate", timeout=TIMEOUT,
                      json={"prompt": "Write a long story.", "max_new_tokens": 400, "precision": "w4",
                            "stream": True}) as response:
        first = next(response.iter_lines())
        assert json.loads(first.removeprefix("data: "))["index"] == 0
    after = post(live_server_url, "/generate", {"prompt": "Hi", "max_new_tokens": 2, "precision": "w4"})
    assert after.status_code == 200
    assert metric(live_server_url, 'quept_request_failures_total{reason="dropped"}') == dropped + 1
    assert metric(live_server_url, "quept_requests_running") == 0


def test_metrics_show_the_traffic_under_the_contract_names(live_server_url):
    post(live_server_url, "/generate", {"prompt": "Hi", "max_new_tokens": 3, "precision": "w8"})
    url = live_server_url
    assert metric(url, 'quept_requests_total{precision_requested="w8",precision_served="w8",route="/generate",'
                       'status="200"}') >= 1
    assert metric(url, 'quept_generation_tokens_total{precision_served="w8"}') >= 3
    assert metric(url, 'quept_time_to_first_token_seconds_count{precision_served="w8"}') >= 1
    assert metric(url, 'quept_inter_token_latency_seconds_count{precision_served="w8"}') >= 2
    assert metric(url, 'quept_controller_decisions_total{mode="uniform"}') >= 1
    assert metric(url, 'quept_weights_resident_bytes{precision="w8"}') > 0
    assert metric(url, "quept_queue_duration_seconds_count") >= 1


def test_the_openai_client_talks_to_the_server(live_server_url):
    client = openai.OpenAI(base_url=f"{live_server_url}/v1", api_key="unused", max_retries=0, timeout=300)
    ids = {model.id for model in client.models.list()}
    assert {"smollm2-135m", "smollm2-135m@w4", "smollm2-135m@fp"} <= ids
    chat = client.chat.completions.create(model="smollm2-135m@w8", messages=CAPITAL, max_tokens=16, temperature=0)
    assert "Paris" in chat.choices[0].message.content and chat.model == "smollm2-135m@w8"
    stream = client.completions.create(model="smollm2-135m@w4", prompt="The capital of France is", max_tokens=4,
                                       temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices).strip()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def _consistent(entries) -> None:
    """Each token's logprob is <= 0, equals its own entry among its alternatives, and they sum finitely."""
    assert entries
    for entry in entries:
        assert entry.logprob <= 0 and all(alt.logprob <= 0 for alt in entry.top_logprobs)
        same = [alt.logprob for alt in entry.top_logprobs if alt.token == entry.token]
        assert not same or same[0] == pytest.approx(entry.logprob, abs=1e-4)
    assert math.isfinite(sum(entry.logprob for entry in entries))


def test_chat_logprobs_are_consistent_also_when_streamed(live_server_url):
    client = _client(live_server_url)
    kwargs = {"model": "smollm2-135m@w8", "messages": CAPITAL, "max_tokens": 4, "temperature": 0,
              "logprobs": True, "top_logprobs": 3}
    chat = client.chat.completions.create(**kwargs)
    content = chat.choices[0].logprobs.content
    _consistent(content)
    assert all(entry.top_logprobs[0].token == entry.token for entry in content)  # greedy takes the likeliest
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-3)
    assert chunks[-1].usage.completion_tokens == len(content)


def test_completion_logprobs_and_n_choices_with_a_seed(live_server_url):
    client = _client(live_server_url)
    prompt = "Once upon a time"
    sampled = client.completions.create(model="smollm2-135m@w4", prompt=prompt, max_tokens=6, n=2, seed=11,
                                        temperature=1, logprobs=2)
    assert len({choice.text for choice in sampled.choices}) == 2
    for choice in sampled.choices:
        logprobs = choice.logprobs
        assert all(lp <= 0 for lp in logprobs.token_logprobs) and math.isfinite(sum(logprobs.token_logprobs))
        for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
            assert top[token] == pytest.approx(logprob, abs=1e-4)
    again = client.completions.create(model="smollm2-135m@w4", prompt=prompt, max_tokens=6, n=2, seed=11,
                                      temperature=1)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]
    greedy = client.completions.create(model="smollm2-135m@w4", prompt=prompt, max_tokens=6, n=2, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text
