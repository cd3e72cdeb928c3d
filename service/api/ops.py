"""Operations routes: /health, /ready, /info, /precisions, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from quept_core import __version__
from service.api.schemas import GenerateRequest
from service.engine.controller import MIB
from service.observability.metrics import CONTENT_TYPE
from service.state import READY, ServiceState

router = APIRouter()
DEFAULT_FIELDS = ("precision", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                  "allow_degrade", "stream")


def _state(request: Request) -> ServiceState:
    return request.app.state.service


@router.get("/health")
async def health(request: Request) -> dict:
    return {"status": "alive", "phase": _state(request).phase}


@router.get("/ready")
async def ready(request: Request) -> Response:
    state = _state(request)
    if state.phase == READY:
        return JSONResponse({"status": "ready"})
    error = state.not_ready_error()
    return JSONResponse(error.body(), status_code=503, headers=dict(error.headers))


def precisions(state: ServiceState) -> list[dict]:
    """Every servable precision with its measured cost on this host and its measured quality."""
    backend = state.backend
    auto = {c.plan.name for c in backend.candidates()}
    rows = []
    for plan in state.plans:
        candidate = backend.describe(plan)
        cost = state.costs.cost(plan)
        rows.append({
            "precision": plan.name,
            "mode": plan.mode,
            "nominal_bits": None if plan.mode == "fp" else round(candidate.nominal_bits, 3),
            "auto_candidate": plan.name in auto,
            "weight_bytes": candidate.weight_bytes,
            "prefill_tokens_per_s": round(1 / cost.long_prefill.per_unit, 1),
            "decode_tokens_per_s": round(1 / cost.decode_s(1), 1),
            "ppl_delta_pct": candidate.ppl_delta_pct,
        })
    return rows


@router.get("/precisions")
async def list_precisions(request: Request) -> dict:
    state = _state(request)
    state.ready_pipeline()
    return {"precisions": precisions(state)}


@router.get("/info")
async def info(request: Request) -> dict:
    state = _state(request)
    settings, backend = state.settings, state.backend
    fields = GenerateRequest.model_fields
    body = {
        "version": __version__,
        "phase": state.phase,
        "model": settings.model if backend is None else backend.model_id,
        "artifact": None if backend is None else backend.artifact_id,
        "device": None if backend is None else backend.device,
        "bit_set": None if backend is None else list(backend.bit_set),
        "defaults": {name: fields[name].default for name in DEFAULT_FIELDS},
        "limits": {
            "max_new_tokens": settings.max_new_tokens_limit,
            "max_body_bytes": settings.max_body_bytes,
            "max_queue": settings.max_queue,
            "max_queue_tokens": settings.max_queue_tokens,
            "max_running": settings.max_running,
            "queue_timeout_s": settings.queue_timeout_s,
            "memory_limit_mb": settings.memory_limit_mb,
            "context_length": None if backend is None else backend.context_length,
            "kv_cache_mb_per_token": None if backend is None else backend.kv_bytes_per_token / MIB,
        },
    }
    if state.phase == READY:
        body["precisions"] = precisions(state)
    return body


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.exposition(), media_type=CONTENT_TYPE)
