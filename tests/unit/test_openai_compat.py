"""The OpenAI-compatible routes, called with the official openai client as a user would."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.unit.fakes import expected_text


@pytest.fixture
def served(live_fake_server):
    url, backend = live_fake_server()
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), url, backend


def test_models_list_one_id_per_precision_plus_the_bare_id(served):
    client, _, _ = served
    ids = {model.id for model in client.models.list()}
    assert ids == {"tiny", "tiny@fp", "tiny@w3", "tiny@w4", "tiny@w5", "tiny@w6", "tiny@w7", "tiny@w8",
                   "tiny@mixed:4.50"}


def test_completion_at_the_precision_of_the_model_id(served):
    client, _, _ = served
    raw = client.completions.with_raw_response.create(model="tiny@w4", prompt="Hi", max_tokens=5, temperature=0)
    assert raw.headers["x-precision-served"] == "w4"
    completion = raw.parse()
    assert completion.choices[0].text == expected_text("w4", 5)
    assert completion.choices[0].finish_reason == "length"
    assert completion.model == "tiny@w4"
    assert completion.usage.completion_tokens == 5 and completion.usage.total_tokens == 7


def test_chat_completion_and_precision_as_an_extra_field(served):
    client, _, _ = served
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, extra_body={"precision": "w6"})
    assert chat.choices[0].message.content == expected_text("w6", 4)
    assert chat.model == "tiny@w6"
    assert chat.model_extra["precision"]["served"] == "w6"


def test_streamed_chat_ends_with_done(served):
    client, url, _ = served
    chunks = list(client.chat.completions.create(model="tiny@w5", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, stream=True, temperature=0,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text("w5", 6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6
    raw = httpx.post(f"{url}/v1/completions", json={"model": "tiny@w4", "prompt": "x", "max_tokens": 2,
                                                    "stream": True})
    assert raw.text.endswith("data: [DONE]\n\n")


def test_stop_strings_end_the_text_before_them_also_when_streamed(served):
    client, _, _ = served
    completion = client.completions.create(model="tiny@w4", prompt="Hi", max_tokens=20, stop=["cd"], temperature=0)
    assert completion.choices[0].text == "[w4]ab" and completion.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="tiny@w4", prompt="Hi", max_tokens=20, stop=["cd"], stream=True,
                                       temperature=0)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "[w4]ab"


def test_bad_requests_are_400_with_the_field_named(served):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny@w4", prompt="x", max_tokens=0)
    assert raised.value.status_code == 400 and raised.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny@w4", prompt="x", extra_body={"precision": "w5"})
    assert raised.value.body["param"] == "precision"
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny@w11", prompt="x")
    assert raised.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_budget_fields_pass_through_extra_body(served):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny@w8", prompt="x", max_tokens=4,
                                  extra_body={"memory_budget_mb": 0.01, "allow_degrade": False})
    assert raised.value.body["param"] == "memory_budget_mb"
