"""create_app(settings): wiring only (routers, middleware, error handlers, the start-up task)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from quept_core import __version__
from service.api import native, openai, ops
from service.api.middleware import CLIENT_CLOSED, BodyLimit, RequestContext
from service.engine.pipeline import ClientGone
from service.errors import ServiceError, from_validation, invalid, status_for_path
from service.observability.metrics import Metrics
from service.settings import Settings
from service.state import Loader, ServiceState

log = logging.getLogger(__name__)

_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def _error_response(request: Request, error: ServiceError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=status_for_path(error, request.url.path),
                        headers=dict(error.headers))


def create_app(settings: Settings, loader: Loader | None = None,
               on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The HTTP app. `loader` builds the backend (default: the real model and artifact); it runs in
    the background so /health and /ready answer while the model loads. `on_fatal` hears about a
    failed start-up (the `serve` command stops the server with it)."""
    if loader is None:
        from service.engine.loading import load_backend

        loader = load_backend
    metrics = Metrics()
    state = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(state.start(loader, on_fatal))
        yield
        await state.drain()
        starting.cancel()
        await state.close()

    app = FastAPI(title="QuEPT-serve", version=__version__, lifespan=lifespan)
    app.state.service = state
    for module in (ops, native, openai):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, metrics=metrics)
    app.add_middleware(RequestContext, metrics=metrics)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return _error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(request, from_validation(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 400:  # FastAPI could not decode the body: bad UTF-8 or JSON nested too deep
            return _error_response(request, invalid("body: not valid UTF-8 JSON", "body"))
        kind = _HTTP_TYPES.get(error.status_code, "http_error")
        return _error_response(request, ServiceError(error.status_code, kind, str(error.detail), None,
                                                     dict(error.headers or {})))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        request_id = request.state.record.request_id
        log.error("unhandled error", exc_info=error, extra={"request_id": request_id, "path": request.url.path})
        body = ServiceError(500, "internal_error", f"internal error; quote request id {request_id}").body()
        return JSONResponse(body, status_code=500, headers={"x-request-id": request_id})

    return app
