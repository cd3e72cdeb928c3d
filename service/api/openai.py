"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

A model id is `<model>@<precision>` (`smollm2-135m@w4`); the bare `<model>` means `auto`. The
precision controls of the native API are accepted as extra body fields (`extra_body` in the
official client); `precision` there must agree with the id's suffix.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from quept_core.precision import Precision, PrecisionError, uniform_precisions
from quept_core.runtime.protocol import SamplingParams
from service.api.schemas import ChatCompletionRequest, CompletionRequest, OpenAIFields
from service.api.streaming import Run, sse, start_run
from service.api.views import precision_view, timing_view
from service.engine.pipeline import GenerationSpec
from service.engine.scheduler import ChoiceEnd, ChoiceOutput, Event, Finished, TokenOut
from service.errors import ServiceError, invalid
from service.state import ServiceState

router = APIRouter(prefix="/v1")
DONE = "data: [DONE]\n\n"


def model_ids(state: ServiceState) -> list[str]:
    backend = state.backend
    precisions = [p.name for p in uniform_precisions(backend.bit_set)]
    precisions += [c.plan.name for c in backend.candidates() if c.plan.name not in precisions]
    return [backend.model_id, *(f"{backend.model_id}@{p}" for p in precisions)]


def _precision(body: OpenAIFields, state: ServiceState) -> str:
    model_id = state.backend.model_id
    name, _, suffix = body.model.partition("@")
    if name != model_id:
        raise ServiceError(404, "model_not_found", f"model '{body.model}' is not served here; "
                                                   f"GET /v1/models lists the ids", "model")
    if suffix:
        try:
            state.backend.resolve(Precision.parse(suffix, state.backend.bit_set))
        except PrecisionError as error:
            raise invalid(f"model: {error}", "model") from None
    if suffix and body.precision and body.precision.strip().lower() != suffix.lower():
        raise invalid(f"precision: '{body.precision}' disagrees with the model id's '{suffix}'", "precision")
    return body.precision or suffix or "auto"


def _spec(body: OpenAIFields, state: ServiceState, prompt: str | None, messages: list[dict] | None,
          max_tokens: int) -> GenerationSpec:
    state.ready_pipeline()
    sampling = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, repetition_penalty=body.repetition_penalty, seed=body.seed)
    return GenerationSpec(prompt, messages, sampling, tuple(body.stop), _precision(body, state),
                          body.latency_budget_ms, body.memory_budget_mb, body.min_precision, body.allow_degrade,
                          max_tokens_field="max_tokens")


def _finish_reason(output: ChoiceOutput) -> str:
    return "length" if output.finish_reason == "length" else "stop"


def _common(run: Run, kind: str) -> dict:
    return {"id": f"{kind}-{run.record.request_id}", "created": int(time.time()),
            "model": f"{run.pipeline.backend.model_id}@{run.prepared.plan.name}"}


def _usage(run: Run, finished: Finished) -> dict:
    prompt = len(run.prepared.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": finished.completion_tokens,
            "total_tokens": prompt + finished.completion_tokens}


def _extensions(run: Run, finished: Finished) -> dict:
    return {"precision": precision_view(run.prepared, run.pipeline.backend.shapes).model_dump(),
            "timing": timing_view(finished).model_dump()}


def _stream(run: Run, body: OpenAIFields, prefix: str, obj: str, choice,
            head: dict | None = None) -> StreamingResponse:
    """SSE chunks of released text; `choice(text, finish_reason)` shapes the one choice of a chunk."""
    common = {**_common(run, prefix), "object": obj}

    async def render(event: Event) -> AsyncIterator[str]:
        if isinstance(event, TokenOut):
            if event.released:
                yield sse({**common, "choices": [choice(event.released, None)]})
        elif isinstance(event, ChoiceEnd):
            if event.output.released:
                yield sse({**common, "choices": [choice(event.output.released, None)]})
        elif isinstance(event, Finished):
            yield sse({**common, "choices": [choice(None, _finish_reason(event.outputs[0]))],
                       **_extensions(run, event)})
            if body.include_usage:
                yield sse({**common, "choices": [], "usage": _usage(run, event)})
        else:
            yield sse(event.error.body(), event="error")

    return run.stream(render, head=None if head is None else sse({**common, "choices": [head]}), tail=DONE)


@router.get("/models")
async def list_models(request: Request) -> dict:
    state: ServiceState = request.app.state.service
    state.ready_pipeline()
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "quept-serve"}
                                       for model_id in model_ids(state)]}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    state: ServiceState = request.app.state.service
    run = await start_run(request, _spec(body, state, body.prompt, None, body.max_tokens))
    if body.stream:
        return _stream(run, body, "cmpl", "text_completion",
                       lambda text, reason: {"index": 0, "text": text or "", "finish_reason": reason,
                                             "logprobs": None})
    finished = await run.finish()
    content = {**_common(run, "cmpl"), "object": "text_completion",
               "choices": [{"index": 0, "text": finished.outputs[0].text,
                            "finish_reason": _finish_reason(finished.outputs[0]),
                            "logprobs": None}],
               "usage": _usage(run, finished), **_extensions(run, finished)}
    return JSONResponse(content, headers=run.headers)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state: ServiceState = request.app.state.service
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    max_tokens = body.max_completion_tokens or body.max_tokens or state.settings.max_new_tokens_limit
    run = await start_run(request, _spec(body, state, None, messages, max_tokens))
    if body.stream:
        def choice(text: str | None, reason: str | None) -> dict:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}

        return _stream(run, body, "chatcmpl", "chat.completion.chunk", choice,
                       head={"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None})
    finished = await run.finish()
    content = {**_common(run, "chatcmpl"), "object": "chat.completion",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": finished.outputs[0].text},
                            "finish_reason": _finish_reason(finished.outputs[0]), "logprobs": None}],
               "usage": _usage(run, finished), **_extensions(run, finished)}
    return JSONResponse(content, headers=run.headers)
