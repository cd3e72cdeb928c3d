"""The one error shape of every route: {"error": {"type", "message", "param"}}.

Native routes answer validation problems with 422, OpenAI-compatible routes with 400.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi.exceptions import RequestValidationError

OPENAI_PREFIX = "/v1/"


@dataclass
class ServiceError(Exception):
    status: int
    type: str
    message: str
    param: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        # One line whatever the client sent: messages quote fields such as `model` as they came.
        message = self.message.replace("\r", "\\r").replace("\n", "\\n")
        return {"error": {"type": self.type, "message": message, "param": self.param}}

    def __str__(self) -> str:
        return self.message


def invalid(message: str, param: str | None) -> ServiceError:
    """A request the server will never serve as sent; the status is set per route family."""
    return ServiceError(422, "invalid_request_error", message, param)


def unavailable(kind: str, message: str, retry_after_s: float) -> ServiceError:
    """503 with Retry-After (whole seconds, at least 1)."""
    seconds = str(max(1, math.ceil(retry_after_s)))
    return ServiceError(503, kind, message, None, {"Retry-After": seconds})


def status_for_path(error: ServiceError, path: str) -> int:
    """OpenAI clients expect 400 where the native routes send 422."""
    if error.status == 422 and path.startswith(OPENAI_PREFIX):
        return 400
    return error.status


def _field_path(location: tuple) -> str:
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def from_validation(error: RequestValidationError) -> ServiceError:
    """The first pydantic problem as a one-line message naming the field."""
    first = error.errors()[0]
    kind = first.get("type")
    if kind == "json_invalid":  # its location is a character offset, not a field
        return invalid("body: not valid JSON", "body")
    param = _field_path(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing" and param == "body":
        message = "the body must be a JSON object"
    return invalid(f"{param}: {message}", param)
