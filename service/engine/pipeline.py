"""From a validated request to events: prompt tokens, the controller's decision, the queue.

Both route families (native and OpenAI-compatible) turn their bodies into a `GenerationSpec`
and share everything below it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from jinja2 import TemplateError
from starlette.requests import Request

from quept_core.planning.plan import Plan
from quept_core.precision import Precision, PrecisionError
from quept_core.runtime.protocol import SamplingParams
from quept_core.runtime.tokenizer import TokenizerError
from service.engine.backend import Backend
from service.engine.controller import MIB, Budget, Controller, Decision, PlanRequest, budget_choice
from service.engine.scheduler import AdmissionError, Event, Failed, Finished, Job, Scheduler
from service.engine.textstream import TextStream
from service.errors import invalid
from service.observability.metrics import Metrics, requested_label

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class GenerationSpec:
    prompt: str | None
    messages: list[dict[str, str]] | None
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    precision: str = "auto"
    latency_budget_ms: float | None = None
    memory_budget_mb: float | None = None
    min_precision: str | None = None
    allow_degrade: bool = True
    n: int = 1  # sequences generated from the prompt (they share its prefill)
    max_tokens_field: str = "max_new_tokens"  # how the route family names it, for error messages
    precision_field: str = "precision"  # where the request named its precision: body field, header or model id


@dataclass(frozen=True)
class Prepared:
    spec: GenerationSpec
    prompt_ids: list[int]
    sampling: SamplingParams  # with the seed drawn for sampled requests
    decision: Decision

    @property
    def plan(self) -> Plan:
        return self.decision.plan


class ClientGone(Exception):
    """The client disconnected before its response was complete."""


def _is_utf8(text: str) -> bool:
    """JSON may carry lone surrogate escapes that no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Pipeline:
    def __init__(self, backend: Backend, controller: Controller, scheduler: Scheduler, metrics: Metrics,
                 max_new_tokens_limit: int, queue_timeout_s: float, max_running: int):
        self.backend = backend
        self.controller = controller
        self.scheduler = scheduler
        self.metrics = metrics
        self.max_new_tokens_limit = max_new_tokens_limit
        self.queue_timeout_s = queue_timeout_s
        self.max_running = max_running

    def requested_label(self, precision: str) -> str:
        return requested_label(precision, self.backend.bit_set)

    def prompt_ids(self, spec: GenerationSpec) -> list[int]:
        tokenizer = self.backend.tokenizer
        if (spec.prompt is None) == (spec.messages is None):
            raise invalid("give exactly one of prompt and messages", "prompt")
        field = "prompt" if spec.prompt is not None else "messages"
        texts = [spec.prompt] if spec.prompt is not None else [m["content"] for m in spec.messages]
        if not all(_is_utf8(text) for text in texts):
            raise invalid(f"{field}: contains a lone surrogate escape (\\ud800-\\udfff), not text", field)
        if spec.messages is not None:
            try:
                text = tokenizer.apply_chat_template(spec.messages, add_generation_prompt=True, tokenize=False)
            except (TemplateError, TokenizerError) as error:  # e.g. a template that refuses a role order
                raise invalid(f"messages: the model's chat template refused them: {error}", "messages") from None
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(spec.prompt)
        if not ids:
            raise invalid("the prompt is empty", field)
        return ids

    def _parse(self, text: str, field: str) -> Precision:
        try:
            return Precision.parse(text, self.backend.bit_set)
        except PrecisionError as error:
            raise invalid(f"{field}: {error}", field) from None

    def _resolve(self, precision: Precision, field: str) -> Plan:
        try:
            return self.backend.resolve(precision)
        except PrecisionError as error:
            raise invalid(f"{field}: {error}", field) from None

    def prepare(self, spec: GenerationSpec, arrival: float | None = None) -> Prepared:
        """Validate against this model and server, and choose the plan (no side effects)."""
        sampling, field = spec.sampling, spec.max_tokens_field
        if sampling.max_new_tokens > self.max_new_tokens_limit:
            raise invalid(f"{field}: at most {self.max_new_tokens_limit} on this server", field)
        if spec.n > self.max_running:
            raise invalid(f"n: at most {self.max_running} on this server (its running set)", "n")
        ids = self.prompt_ids(spec)
        if len(ids) + sampling.max_new_tokens > self.backend.context_length:
            raise invalid(f"{field}: the prompt's {len(ids)} tokens plus {sampling.max_new_tokens} new "
                          f"tokens exceed the context length {self.backend.context_length}", field)
        requested = None
        precision = self._parse(spec.precision, spec.precision_field)
        if precision.kind != "auto":
            requested = self.backend.describe(self._resolve(precision, spec.precision_field))
            if not self.backend.fits(requested):
                raise invalid(f"{spec.precision_field}: {requested.plan.name} needs "
                              f"{requested.weight_bytes / MIB:.1f} MiB of packed weights; this server's memory "
                              f"limit is {self.backend.memory_limit_bytes / MIB:.1f} MiB", spec.precision_field)
        floor = None
        if spec.min_precision is not None:
            minimum = self._parse(spec.min_precision, "min_precision")
            if minimum.kind == "auto":
                raise invalid("min_precision: give fp, w<b> or mixed:<storage bits>, not auto", "min_precision")
            floor = self.backend.describe(self._resolve(minimum, "min_precision")).nominal_bits
        budget = Budget(
            None if spec.latency_budget_ms is None else spec.latency_budget_ms / 1000,
            None if spec.memory_budget_mb is None else int(spec.memory_budget_mb * MIB),
        )
        request = PlanRequest(requested, len(ids), sampling.max_new_tokens, budget, floor, spec.allow_degrade, spec.n)
        load = self.scheduler.load(since=arrival)
        decision = self.controller.decide(request, load)
        if log.isEnabledFor(logging.DEBUG):
            p = decision.prediction
            log.debug("planned", extra={"plan": decision.plan.name, "queue_ms": round(p.queue_s * 1000, 1),
                                        "prefill_ms": round(p.prefill_s * 1000, 1), "decode_ms": round(p.decode_s * 1000, 1),
                                        "in_flight_ms": round(load.in_flight_s * 1000, 1),
                                        "slot_wait_ms": round(load.queue_wait_s * 1000, 1),
                                        "running": sum(load.running.values()), "joining": len(load.joining),
                                        "arriving": round(load.arriving, 2)})
        if sampling.temperature > 0 and sampling.seed is None:
            sampling = replace(sampling, seed=secrets.randbelow(2**31))
        return Prepared(spec, ids, sampling, decision)

    def submit(self, prepared: Prepared, request_id: str, arrival: float,
               deliver: Callable[[Event], None]) -> Job:
        """Queue a prepared request; raises a 503 ServiceError when the queue is full."""
        decision = prepared.decision
        deadline = arrival + self.queue_timeout_s
        if prepared.spec.latency_budget_ms is not None:
            deadline = min(deadline, arrival + prepared.spec.latency_budget_ms / 1000)
        texts = [TextStream(self.backend.tokenizer, prepared.prompt_ids, prepared.spec.stop)
                 for _ in range(prepared.spec.n)]
        job = Job(request_id, prepared.prompt_ids, prepared.sampling, decision.plan, texts, deliver,
                  arrival, deadline, work_s=decision.prediction.work_s, prediction=decision.prediction)
        try:
            self.scheduler.submit(job)
        except AdmissionError as error:
            self.metrics.admission_rejections.labels(error.reason).inc()
            raise error.error from None
        mode = "mixed" if decision.plan.mode == "mixed" else "uniform"
        self.metrics.controller_decisions.labels(mode).inc()
        if decision.degraded:
            self.metrics.precision_downgrades.labels(decision.downgraded_from.label, decision.plan.label,
                                                     decision.reason).inc()
        return job

    def check_budgets(self, prepared: Prepared, finished: Finished) -> None:
        """Count served requests that exceeded their latency or memory budget, and how auto's choice
        under a latency budget turned out."""
        spec, timing = prepared.spec, finished.timing
        if spec.latency_budget_ms is not None:
            budget_s = spec.latency_budget_ms / 1000
            if timing.total_s > budget_s:
                self.metrics.budget_violations.labels("latency").inc()
            if prepared.decision.budgeted_auto and timing.predicted_total_s:
                outcome = budget_choice(prepared.decision, budget_s, timing.total_s, timing.predicted_total_s)
                self.metrics.budget_choices.labels(outcome).inc()
        if spec.memory_budget_mb is not None:
            tokens = prepared.spec.n * len(prepared.prompt_ids) + finished.completion_tokens
            used = self.backend.describe(prepared.plan).weight_bytes + tokens * self.backend.kv_bytes_per_token
            if used > spec.memory_budget_mb * MIB:
                self.metrics.budget_violations.labels("memory").inc()

    async def events(self, job: Job, queue: asyncio.Queue, request: Request) -> AsyncIterator[Event]:
        """The job's events until it ends; a client disconnect cancels the job."""
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while True:
                event = await _first(queue.get(), disconnect)
                yield event
                if isinstance(event, Finished | Failed):
                    return
        finally:
            disconnect.cancel()
            if not job.finished:
                self.scheduler.cancel(job, "dropped")


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first(awaitable, disconnect: asyncio.Future) -> T:
    """The awaitable's result, or ClientGone if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise ClientGone
