"""One generation request from the route's point of view: admit it, wait for its first event,
then either collect the rest or stream it as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import StreamingResponse

from service.api.middleware import RequestRecord
from service.api.precision import HEADER as PRECISION_HEADER
from service.engine.controller import INFEASIBLE, OVERLOADED
from service.engine.pipeline import ClientGone, GenerationSpec, Pipeline, Prepared
from service.engine.scheduler import Event, Failed, Finished, Job
from service.errors import ServiceError
from service.state import ServiceState


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


@dataclass
class Run:
    pipeline: Pipeline
    prepared: Prepared
    job: Job
    record: RequestRecord
    first: Event
    _events: AsyncIterator[Event]

    @property
    def headers(self) -> dict[str, str]:
        """Known once the first token exists, so streams carry them too."""
        job = self.job
        return {
            "x-precision-requested": self.prepared.spec.precision.strip().lower(),  # as parsed
            "x-precision-served": self.prepared.plan.name,
            PRECISION_HEADER: self.prepared.plan.name,
            "x-queue-time-ms": f"{(job.started_at - job.arrival) * 1000:.1f}",
            "x-time-to-first-token-ms": f"{(job.first_token_at - job.arrival) * 1000:.1f}",
        }

    async def events(self) -> AsyncIterator[Event]:
        """Every event from the first on; a client that went away marks the request dropped."""
        try:
            event = self.first
            while True:
                if isinstance(event, Finished):
                    self.pipeline.check_budgets(self.prepared, event)
                yield event
                if isinstance(event, Finished | Failed):
                    return
                event = await anext(self._events)
        except (ClientGone, asyncio.CancelledError):
            self.record.dropped = True
            raise

    async def finish(self) -> Finished:
        """The final event of a non-streaming request; a failure raises its error."""
        last = [event async for event in self.events()][-1]
        if isinstance(last, Failed):
            raise last.error
        return last

    def stream(self, render: Callable[[Event], AsyncIterator[str]], head: str | None = None,
               tail: str | None = None) -> StreamingResponse:
        """SSE: `head`, each event as `render` writes it, then `tail` unless the stream failed."""
        async def body() -> AsyncIterator[str]:
            if head is not None:
                yield head
            try:
                async for event in self.events():
                    async for chunk in render(event):
                        yield chunk
                    if isinstance(event, Failed):
                        return
            except ClientGone:
                return
            if tail is not None:
                yield tail

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={**self.headers, "cache-control": "no-cache", "x-accel-buffering": "no"})


async def start_run(request: Request, spec: GenerationSpec) -> Run:
    """Validate, plan and queue a request, and wait for its first token (errors are HTTP statuses)."""
    state: ServiceState = request.app.state.service
    record: RequestRecord = request.state.record
    arrival = state.clock()
    pipeline = state.ready_pipeline()
    record.precision_requested = pipeline.requested_label(spec.precision)
    try:
        prepared = pipeline.prepare(spec, arrival)
    except ServiceError as error:
        if error.type in (INFEASIBLE, OVERLOADED):
            state.metrics.admission_rejections.labels("infeasible" if error.type == INFEASIBLE else "overloaded").inc()
        raise
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    job = pipeline.submit(prepared, record.request_id, arrival,
                          lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
    record.precision_served = prepared.plan.label
    events = pipeline.events(job, queue, request)
    try:
        first = await anext(events)
    except ClientGone:
        record.dropped = True
        raise
    if isinstance(first, Failed):
        raise first.error
    return Run(pipeline, prepared, job, record, first, events)
