"""Pure ASGI middleware: the body limit, and the per-request context (id, access log, request count).

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and client disconnects pass
through untouched.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError
from service.observability.logs import request_id_var
from service.observability.metrics import NO_PLAN, Metrics

log = logging.getLogger("quept.access")

GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
PROBE_ROUTES = ("/health", "/ready", "/metrics")  # polled every few seconds: logged at debug level
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the response ended


@dataclass
class RequestRecord:
    """What the routes learn about a request, read back when it ends."""

    request_id: str
    precision_requested: str = NO_PLAN
    precision_served: str = NO_PLAN
    dropped: bool = False


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            self.metrics.admission_rejections.labels("body_too_large").inc()
            error = ServiceError(413, "body_too_large", BodyTooLarge(self.limit).detail, None)
            body = json.dumps(error.body()).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # chunked bodies carry no content-length
                    self.metrics.admission_rejections.labels("body_too_large").inc()
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class RequestContext:
    """Request id (client's `x-request-id` if sane, else new), JSON access log, `quept_requests_total`."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        record = RequestRecord(given if _CLIENT_ID.match(given) else uuid.uuid4().hex)
        scope.setdefault("state", {})["record"] = record
        token = request_id_var.set(record.request_id)
        status = CLIENT_CLOSED
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", record.request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = 500
            raise
        finally:
            if record.dropped:
                status = CLIENT_CLOSED
            path = scope["path"]
            if path in GENERATION_ROUTES:
                self.metrics.requests.labels(path, str(status), record.precision_requested,
                                             record.precision_served).inc()
            level = logging.DEBUG if path in PROBE_ROUTES else logging.INFO
            log.log(level, "request", extra={"method": scope["method"], "path": path, "status": status,
                                             "duration_ms": round((time.perf_counter() - started) * 1000, 2)})
            request_id_var.reset(token)
