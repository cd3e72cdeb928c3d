"""Bodies found by fuzzing that once broke the contract: each answers in the error body, never 500."""

from __future__ import annotations

import pytest

LONE_SURROGATE = b'{"prompt": "\\ud800", "max_new_tokens": 1}'


def post_raw(client, path: str, body: bytes):
    return client.post(path, content=body, headers={"content-type": "application/json"})


def test_a_lone_surrogate_in_the_prompt_is_422_naming_the_prompt(make_client):
    response = post_raw(make_client(), "/generate", LONE_SURROGATE)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "prompt"


def test_a_lone_surrogate_in_chat_messages_is_400_on_the_openai_route(make_client):
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}], "max_tokens": 1}'
    response = post_raw(make_client(), "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("body", [b'{"prompt": "\xff\xfe", "max_new_tokens": 1}',
                                  b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
@pytest.mark.parametrize(("path", "status"), [("/generate", 422), ("/v1/completions", 400)])
def test_an_undecodable_body_is_a_validation_error_of_the_body(make_client, body, path, status):
    response = post_raw(make_client(), path, body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == {"type": "invalid_request_error", "message": "body: not valid UTF-8 JSON",
                                        "param": "body"}


def test_a_precision_with_spaces_and_capitals_is_echoed_as_parsed(make_client):
    response = make_client().post("/generate", json={"prompt": "hi", "max_new_tokens": 1, "precision": " W4 "})
    assert response.status_code == 200, response.text
    assert response.headers["x-precision-requested"] == "w4"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_model_name_with_line_breaks_is_quoted_in_a_one_line_message(make_client, route):
    body = {"model": "tiny\nsecond line\r", "max_tokens": 1,
            **({"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})}
    response = make_client().post(route, json=body)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["param"] == "model" and "\n" not in error["message"] and "\r" not in error["message"]
    assert "tiny\\nsecond line\\r" in error["message"]
