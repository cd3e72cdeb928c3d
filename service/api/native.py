"""POST /generate and POST /generate/plan."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from quept_core.runtime.protocol import SamplingParams
from service.api.logprobs import TokenTexts, details, token_detail, token_texts
from service.api.precision import HEADER, asked_precision
from service.api.schemas import GenerateRequest, GenerateResponse, PlanResponse, StreamToken, TokenView, Usage
from service.api.streaming import Run, sse, start_run
from service.api.views import precision_view, prediction_view, timing_view
from service.engine.pipeline import GenerationSpec, Prepared
from service.engine.scheduler import Event, Failed, Finished, TokenOut
from service.state import ServiceState

router = APIRouter()


def to_spec(body: GenerateRequest, request: Request) -> GenerationSpec:
    state: ServiceState = request.app.state.service
    explicit = body.precision if "precision" in body.model_fields_set else None
    asked = asked_precision(state.ready_pipeline().backend.bit_set, explicit, request.headers.get(HEADER))
    sampling = SamplingParams(max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, repetition_penalty=body.repetition_penalty, seed=body.seed,
                              logprobs=body.engine_logprobs)
    messages = None if body.messages is None else [m.model_dump() for m in body.messages]
    return GenerationSpec(body.prompt, messages, sampling, tuple(body.stop), asked.text,
                          body.latency_budget_ms, body.memory_budget_mb, body.min_precision, body.allow_degrade,
                          precision_field=asked.field)


def response_body(run: Run, finished: Finished) -> GenerateResponse:
    prepared: Prepared = run.prepared
    output = finished.outputs[0]
    wants_details = prepared.sampling.logprobs is not None
    return GenerateResponse(
        generated_text=output.text,
        finish_reason=output.finish_reason,
        usage=Usage(prompt_tokens=len(prepared.prompt_ids), completion_tokens=finished.completion_tokens),
        precision=precision_view(prepared, run.pipeline.backend.shapes),
        timing=timing_view(finished),
        seed=prepared.sampling.seed,
        details=details(output.tokens, _texts(run)) if wants_details else None,
    )


def stream_token(event: TokenOut, body: GenerateRequest, texts: TokenTexts) -> StreamToken:
    logprob = event.logprob.logprob if body.details else None
    top = [token_detail(a, texts) for a in event.top_logprobs] if body.top_n_tokens is not None else None
    return StreamToken(token=TokenView(id=event.token_id, text=event.text, logprob=logprob), index=event.index,
                       top_tokens=top)


def _texts(run: Run) -> TokenTexts:
    return token_texts(run.pipeline.backend.tokenizer)


@router.post("/generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream"}})
async def generate(body: GenerateRequest, request: Request):
    run = await start_run(request, to_spec(body, request))
    if body.stream:
        async def render(event: Event) -> AsyncIterator[str]:
            if isinstance(event, TokenOut):
                yield sse(stream_token(event, body, _texts(run)).model_dump(exclude_none=True))
            elif isinstance(event, Finished):
                yield sse(response_body(run, event).model_dump())
            elif isinstance(event, Failed):
                yield sse(event.error.body(), event="error")

        return run.stream(render)
    finished = await run.finish()
    return JSONResponse(response_body(run, finished).model_dump(), headers=run.headers)


@router.post("/generate/plan", response_model=PlanResponse)
async def generate_plan(body: GenerateRequest, request: Request) -> PlanResponse:
    """The plan and its predicted latency and memory for this request, without generating."""
    state: ServiceState = request.app.state.service
    pipeline = state.ready_pipeline()
    prepared = pipeline.prepare(to_spec(body, request))
    return PlanResponse(precision=precision_view(prepared, pipeline.backend.shapes),
                        predicted=prediction_view(prepared.decision),
                        usage=Usage(prompt_tokens=len(prepared.prompt_ids), completion_tokens=0))
