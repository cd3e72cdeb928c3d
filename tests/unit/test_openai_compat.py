"""The OpenAI-compatible routes, called with the official openai client as a user would."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.unit.fakes import ALTERNATIVE_LOGPROBS, CHOSEN_LOGPROB, expected_text


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


CHAT = [{"role": "user", "content": "Hi"}]


def test_chat_logprobs_name_each_token_with_its_alternatives(served):
    client, _, _ = served
    chat = client.chat.completions.create(model="tiny@w4", messages=CHAT, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content == expected_text("w4", 5)
    for entry in content:
        assert entry.logprob == pytest.approx(CHOSEN_LOGPROB) and entry.bytes == list(entry.token.encode())
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx([CHOSEN_LOGPROB,
                                                                            *ALTERNATIVE_LOGPROBS[:2]])
        assert entry.top_logprobs[0].token == entry.token
    plain = client.chat.completions.create(model="tiny@w4", messages=CHAT, max_tokens=2, temperature=0,
                                           logprobs=True)
    assert [entry.top_logprobs for entry in plain.choices[0].logprobs.content] == [[], []]
    assert client.chat.completions.create(model="tiny@w4", messages=CHAT, max_tokens=2).choices[0].logprobs is None


def test_streamed_chat_logprobs_are_those_of_the_whole_response(served):
    client, _, _ = served
    kwargs = {"model": "tiny@w5", "messages": CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True,
              "top_logprobs": 2, "stop": ["cd"]}
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs
                for entry in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]
    assert chunks[-1].usage.completion_tokens == len(whole)


def test_completion_logprobs_in_the_legacy_shape(served):
    client, _, _ = served
    completion = client.completions.create(model="tiny@w6", prompt="Hi", max_tokens=4, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == list(expected_text("w6", 4)) and logprobs.text_offset == [0, 1, 2, 3]
    assert logprobs.token_logprobs == pytest.approx([CHOSEN_LOGPROB] * 4)
    assert all(len(top) == 2 and top[token] == pytest.approx(CHOSEN_LOGPROB)
               for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True))
    only_chosen = client.completions.create(model="tiny@w6", prompt="Hi", max_tokens=2, temperature=0, logprobs=0)
    assert only_chosen.choices[0].logprobs.top_logprobs == [{"[": pytest.approx(CHOSEN_LOGPROB)},
                                                            {"w": pytest.approx(CHOSEN_LOGPROB)}]


def test_streamed_completion_logprobs_continue_the_text_offsets(served):
    client, _, _ = served
    stream = client.completions.create(model="tiny@w6", prompt="Hi", max_tokens=6, temperature=0, logprobs=1,
                                       stream=True)
    offsets, tokens = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            offsets += chunk.choices[0].logprobs.text_offset
            tokens += chunk.choices[0].logprobs.tokens
    assert tokens == list(expected_text("w6", 6)) and offsets == list(range(6))


def test_n_choices_differ_when_sampled_with_a_seed_and_agree_when_greedy(served):
    client, _, _ = served
    sampled = client.completions.create(model="tiny@w4", prompt="Hi", max_tokens=8, n=2, seed=3, temperature=1)
    assert [c.index for c in sampled.choices] == [0, 1]
    assert [c.text for c in sampled.choices] == [expected_text("w4", 8, 3), expected_text("w4", 8, 4)]
    assert sampled.usage.completion_tokens == 16
    greedy = client.chat.completions.create(model="tiny@w4", messages=CHAT, max_tokens=6, n=2, temperature=0)
    assert [c.message.content for c in greedy.choices] == [expected_text("w4", 6)] * 2
    stream = client.chat.completions.create(model="tiny@w4", messages=CHAT, max_tokens=8, n=2, seed=3,
                                            temperature=1, stream=True)
    texts, reasons = {0: "", 1: ""}, {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert texts == {0: expected_text("w4", 8, 3), 1: expected_text("w4", 8, 4)}
    assert reasons == {0: "length", 1: "length"}


def test_precision_from_the_header_the_suffix_or_the_body_and_named_in_the_response(served):
    client, url, _ = served
    header = client.with_options(default_headers={"x-quept-precision": "w5"})
    raw = header.completions.with_raw_response.create(model="tiny@w4", prompt="Hi", max_tokens=2, temperature=0)
    assert raw.headers["x-quept-precision"] == "w5" and raw.parse().model == "tiny@w5"  # the header overrides
    agreeing = header.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body={"precision": "W5"})
    assert agreeing.model == "tiny@w5"
    assert client.completions.create(model="tiny@mixed:4.5", prompt="Hi", max_tokens=2).model == "tiny@mixed:4.50"
    auto = client.completions.with_raw_response.create(model="tiny@auto", prompt="Hi", max_tokens=2)
    assert auto.parse().model == "tiny@w8" and auto.headers["x-quept-precision"] == "w8"
    stream = httpx.post(f"{url}/v1/chat/completions", headers={"x-quept-precision": "w3"},
                        json={"model": "tiny", "messages": CHAT, "max_tokens": 2, "stream": True})
    assert stream.headers["x-quept-precision"] == "w3" and '"model":"tiny@w3"' in stream.text


def test_precision_conflicts_and_unknown_values_are_400_naming_them(served):
    client, _, _ = served
    header = client.with_options(default_headers={"x-quept-precision": "w5"})
    with pytest.raises(openai.BadRequestError) as raised:
        header.completions.create(model="tiny", prompt="x", extra_body={"precision": "w4"})
    assert raised.value.body["param"] == "precision"
    assert "x-quept-precision" in raised.value.body["message"] and "'w5'" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.with_options(default_headers={"x-quept-precision": "w11"}).completions.create(model="tiny", prompt="x")
    assert raised.value.body["param"] == "x-quept-precision" and "w4" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny@turbo", prompt="x")
    assert raised.value.body["param"] == "model" and "allowed: auto, fp, w3" in raised.value.body["message"]


@pytest.mark.parametrize(("route", "body", "param"), [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"top_logprobs": 0}, "top_logprobs"),
    ("chat", {"logprobs": 3}, "logprobs"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": -1}, "logprobs"),
    ("completions", {"n": 0}, "n"),
    ("chat", {"n": 17}, "n"),
    ("completions", {"seed": -1}, "seed"),
])
def test_bad_logprobs_n_and_seed_are_400_naming_the_field(served, route, body, param):
    _, url, _ = served
    base = ({"model": "tiny", "messages": CHAT} if route == "chat" else {"model": "tiny", "prompt": "x"})
    response = httpx.post(f"{url}/v1/{'chat/completions' if route == 'chat' else 'completions'}",
                          json={**base, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
