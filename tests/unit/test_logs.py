import io
import json
import logging
import sys

from service.observability.logs import JsonFormatter


def test_access_log_is_one_json_object_per_line_with_the_request_id(make_client):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("quept.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        client = make_client()
        client.post("/generate", json={"prompt": "x", "max_new_tokens": 2}, headers={"x-request-id": "req-42"})
    finally:
        access.removeHandler(handler)
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    generate = [e for e in entries if e.get("path") == "/generate"]
    assert len(generate) == 1
    entry = generate[0]
    assert entry["request_id"] == "req-42" and entry["status"] == 200 and entry["level"] == "info"
    assert entry["message"] == "request" and entry["duration_ms"] >= 0


def test_exceptions_are_logged_in_the_same_object():
    record = logging.LogRecord("quept", logging.ERROR, __file__, 1, "failed %s", ("step",), None)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed step" and "RuntimeError: boom" in entry["exception"]
