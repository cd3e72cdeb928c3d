"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

A model id is `<model>@<precision>` (`smollm2-135m@w4`); the bare `<model>` means `auto`. The
`x-quept-precision` header overrides the suffix. The precision controls of the native API are
accepted as extra body fields (`extra_body` in the official client); `precision` there must agree
with the header and the suffix. Every response's `model` names the precision that served it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from quept_core.precision import uniform_precisions
from quept_core.runtime.protocol import SamplingParams
from service.api.logprobs import chat_logprobs, completion_logprobs, token_texts
from service.api.precision import HEADER, asked_precision
from service.api.schemas import ChatCompletionRequest, CompletionRequest, OpenAIFields
from service.api.streaming import Run, sse, start_run
from service.api.views import precision_view, timing_view
from service.engine.pipeline import GenerationSpec
from service.engine.scheduler import ChoiceEnd, ChoiceOutput, Event, Finished, TokenOut
from service.errors import ServiceError
from service.state import ServiceState

router = APIRouter(prefix="/v1")
DONE = "data: [DONE]\n\n"

# `choice(index, text, finish_reason, logprobs)`: one choice of a response or a chunk, in a route's shape.
ChoiceShape = Callable[[int, str | None, str | None, dict | None], dict]
# `logprobs(tokens, start)`: the logprobs of tokens whose text begins at character `start` of the choice.
LogprobsShape = Callable[[list[TokenOut], int], dict]


def model_ids(state: ServiceState) -> list[str]:
    backend = state.backend
    precisions = [p.name for p in uniform_precisions(backend.bit_set)]
    precisions += [c.plan.name for c in backend.candidates() if c.plan.name not in precisions]
    return [backend.model_id, *(f"{backend.model_id}@{p}" for p in precisions)]


def _suffix(body: OpenAIFields, state: ServiceState) -> str | None:
    """The model id's precision suffix, None for the bare id; 404 for a model not served here."""
    name, at, suffix = body.model.partition("@")
    if name != state.backend.model_id:
        raise ServiceError(404, "model_not_found", f"model '{body.model}' is not served here; "
                                                   f"GET /v1/models lists the ids", "model")
    return suffix if at else None


def _spec(body: ChatCompletionRequest | CompletionRequest, request: Request, prompt: str | None,
          messages: list[dict] | None, max_tokens: int) -> GenerationSpec:
    state: ServiceState = request.app.state.service
    backend = state.ready_pipeline().backend
    asked = asked_precision(backend.bit_set, body.precision, request.headers.get(HEADER), _suffix(body, state))
    sampling = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, repetition_penalty=body.repetition_penalty, seed=body.seed,
                              logprobs=body.engine_logprobs)
    return GenerationSpec(prompt, messages, sampling, tuple(body.stop), asked.text,
                          body.latency_budget_ms, body.memory_budget_mb, body.min_precision, body.allow_degrade,
                          n=body.n, max_tokens_field="max_tokens", precision_field=asked.field)


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


def _logprobs_shape(run: Run, body: ChatCompletionRequest | CompletionRequest) -> LogprobsShape | None:
    """How this request's logprobs look, None when it asked for none."""
    if body.engine_logprobs is None:
        return None
    texts = token_texts(run.pipeline.backend.tokenizer)
    if isinstance(body, ChatCompletionRequest):
        return lambda tokens, _start: chat_logprobs(tokens, texts)
    return lambda tokens, start: completion_logprobs(tokens, texts, start)


def _choices(finished: Finished, choice: ChoiceShape, logprobs: LogprobsShape | None) -> list[dict]:
    return [choice(o.choice, o.text, _finish_reason(o), None if logprobs is None else logprobs(list(o.tokens), 0))
            for o in finished.outputs]


@dataclass
class _Pending:
    """A streamed choice's tokens whose logprobs wait for the chunk that shows their text."""

    tokens: list[TokenOut] = field(default_factory=list)
    start: int = 0  # characters of the choice's text covered by logprobs already sent

    def take(self, logprobs: LogprobsShape | None) -> dict | None:
        if logprobs is None:
            return None
        tokens, self.tokens = self.tokens, []
        start, self.start = self.start, self.start + sum(len(t.text) for t in tokens)
        return logprobs(tokens, start)


def _stream(run: Run, body: OpenAIFields, kind: str, obj: str, choice: ChoiceShape,
            logprobs: LogprobsShape | None, head: dict | None = None) -> StreamingResponse:
    """SSE chunks of released text, each with the logprobs of the tokens it completes; each choice's
    finish reason once all have ended, the last with the precision and timing extensions."""
    common = {**_common(run, kind), "object": obj}
    pending = [_Pending() for _ in range(body.n)]

    def chunk(index: int, text: str) -> str:
        return sse({**common, "choices": [choice(index, text, None, pending[index].take(logprobs))]})

    async def render(event: Event) -> AsyncIterator[str]:
        if isinstance(event, TokenOut):
            pending[event.choice].tokens.append(event)
            if event.released:
                yield chunk(event.choice, event.released)
        elif isinstance(event, ChoiceEnd):
            if event.output.released or pending[event.output.choice].tokens:
                yield chunk(event.output.choice, event.output.released)
        elif isinstance(event, Finished):
            last = len(event.outputs) - 1
            for i, output in enumerate(event.outputs):
                yield sse({**common, "choices": [choice(output.choice, None, _finish_reason(output), None)],
                           **(_extensions(run, event) if i == last else {})})
            if body.include_usage:
                yield sse({**common, "choices": [], "usage": _usage(run, event)})
        else:
            yield sse(event.error.body(), event="error")

    first = None if head is None else "".join(sse({**common, "choices": [{**head, "index": i}]})
                                              for i in range(body.n))
    return run.stream(render, head=first, tail=DONE)


@router.get("/models")
async def list_models(request: Request) -> dict:
    state: ServiceState = request.app.state.service
    state.ready_pipeline()
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "quept-serve"}
                                       for model_id in model_ids(state)]}


def _completion_choice(index: int, text: str | None, reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text or "", "finish_reason": reason, "logprobs": logprobs}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    run = await start_run(request, _spec(body, request, body.prompt, None, body.max_tokens))
    logprobs = _logprobs_shape(run, body)
    if body.stream:
        return _stream(run, body, "cmpl", "text_completion", _completion_choice, logprobs)
    finished = await run.finish()
    content = {**_common(run, "cmpl"), "object": "text_completion",
               "choices": _choices(finished, _completion_choice, logprobs),
               "usage": _usage(run, finished), **_extensions(run, finished)}
    return JSONResponse(content, headers=run.headers)


def _message_choice(index: int, text: str | None, reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
            "logprobs": logprobs}


def _delta_choice(index: int, text: str | None, reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "delta": {} if text is None else {"content": text}, "finish_reason": reason,
            "logprobs": logprobs}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state: ServiceState = request.app.state.service
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    max_tokens = body.max_completion_tokens or body.max_tokens or state.settings.max_new_tokens_limit
    run = await start_run(request, _spec(body, request, None, messages, max_tokens))
    logprobs = _logprobs_shape(run, body)
    if body.stream:
        return _stream(run, body, "chatcmpl", "chat.completion.chunk", _delta_choice, logprobs,
                       head={"delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None})
    finished = await run.finish()
    content = {**_common(run, "chatcmpl"), "object": "chat.completion",
               "choices": _choices(finished, _message_choice, logprobs),
               "usage": _usage(run, finished), **_extensions(run, finished)}
    return JSONResponse(content, headers=run.headers)
