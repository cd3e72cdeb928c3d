"""Admission, batching, fair interleaving, cancellation and drain, in front of the engine.

The engine's `step()` is blocking CPU work, so one dedicated worker thread owns the engine: it
starts batches (waiting requests that share a plan, oldest request first), steps the running
batches in turn (one step each, so plans interleave fairly), applies cancellations between steps
(a disconnected client stops within one decode step) and hands each token to its request's
asyncio queue through `deliver` (which uses `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from quept_core.planning.plan import Plan
from quept_core.runtime.protocol import Engine, GenerationBatch, SamplingParams, SequenceRequest
from service.engine.controller import CostModel, Load
from service.engine.textstream import TextStream
from service.errors import ServiceError, unavailable
from service.observability.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenOut:
    index: int
    token_id: int
    text: str  # what this token added to the text
    released: str  # text now safe to show (held back while it could start a stop string)


@dataclass(frozen=True)
class Timing:
    queue_s: float
    ttft_s: float
    total_s: float
    decode_tokens_per_s: float | None


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "length", "stop" or "eos"
    text: str
    released: str  # held-back text released at the end
    completion_tokens: int
    timing: Timing


@dataclass(frozen=True)
class Failed:
    error: ServiceError


Event = TokenOut | Finished | Failed


class AdmissionError(Exception):
    def __init__(self, reason: str, error: ServiceError):
        super().__init__(error.message)
        self.reason = reason  # label value of quept_admission_rejections_total
        self.error = error


@dataclass(frozen=True)
class SchedulerLimits:
    max_queue: int = 64
    max_queue_tokens: int = 65536
    max_batch_size: int = 8
    max_running_batches: int = 4
    context_length: int = 8192

    @property
    def kv_capacity_tokens(self) -> int:
        """KV positions the running batches could hold at most: the denominator of the usage ratio."""
        return self.max_running_batches * self.max_batch_size * self.context_length


_WAITING, _RUNNING, _DONE = "waiting", "running", "done"


@dataclass(eq=False)
class Job:
    """One generation request as the scheduler sees it."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    plan: Plan
    text: TextStream
    deliver: Callable[[Event], None]  # thread-safe: called from the worker thread
    arrival: float  # clock() when the request arrived
    deadline: float  # clock() after which a still-queued request fails
    work_s: float = 0.0  # predicted compute seconds, for queue-wait estimates
    state: str = _WAITING
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    completion_tokens: int = 0
    seq: int = -1
    run: _Running | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.state == _DONE

    def remaining_work_s(self) -> float:
        return self.work_s * (1 - self.completion_tokens / max(1, self.sampling.max_new_tokens))


@dataclass(eq=False)
class _Running:
    batch: GenerationBatch
    jobs: list[Job]
    prefilled: bool = False


class Scheduler:
    def __init__(self, engine: Engine, limits: SchedulerLimits, metrics: Metrics, costs: CostModel,
                 clock: Callable[[], float] = time.monotonic, on_switch: Callable[[], None] = lambda: None):
        self.engine = engine
        self.on_switch = on_switch  # after a plan switch or a finished batch, in the thread that owns the engine
        self.limits = limits
        self.metrics = metrics
        self.costs = costs
        self.clock = clock
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._running: list[_Running] = []
        self._cancels: list[tuple[Job, Failed | None, str]] = []
        self._turn = 0
        self._current_plan: Plan | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- called from the event loop -------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="quept-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Fail whatever is left and end the worker thread."""
        self.abort_all(unavailable("shutting_down", "the server stopped before the request finished", 1))
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.limits.max_queue:
                raise AdmissionError("queue_full", unavailable(
                    "overloaded", f"the queue is full ({self.limits.max_queue} requests waiting)",
                    self._wait_estimate()))
            queued_tokens = sum(len(j.prompt_ids) for j in self._waiting)
            if queued_tokens + len(job.prompt_ids) > self.limits.max_queue_tokens:
                raise AdmissionError("queue_tokens", unavailable(
                    "overloaded", f"the queue holds {queued_tokens} prompt tokens; this request's "
                    f"{len(job.prompt_ids)} would pass the limit of {self.limits.max_queue_tokens}",
                    self._wait_estimate()))
            self._waiting.append(job)
            self._update_gauges()
            self._cond.notify()

    def cancel(self, job: Job, reason: str = "dropped") -> None:
        """Stop a request: at once if still queued, else before its batch's next step."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.state = _DONE
                self.metrics.request_failures.labels(reason).inc()
                self._update_gauges()
            elif job.state == _RUNNING:
                self._cancels.append((job, None, reason))
                self._cond.notify()

    def abort_all(self, error: ServiceError) -> None:
        """Fail every queued and running request with `error` (the drain timeout passed)."""
        with self._cond:
            for job in self._waiting:
                job.state = _DONE
                job.deliver(Failed(error))
                self.metrics.request_failures.labels("dropped").inc()
            self._waiting.clear()
            for run in self._running:
                self._cancels.extend((job, Failed(error), "dropped") for job in run.jobs if job.state == _RUNNING)
            self._update_gauges()
            self._cond.notify()

    def in_flight(self) -> int:
        with self._cond:
            return len(self._waiting) + sum(j.state == _RUNNING for run in self._running for j in run.jobs)

    def load(self) -> Load:
        with self._cond:
            sharing = min(len(self._running) + 1, self.limits.max_running_batches)
            return Load(self._wait_estimate(), len(self._waiting), sharing)

    def _wait_estimate(self) -> float:
        """Seconds until a new request starts: zero with a free batch slot, else the work ahead
        spread over the batch slots. Call with the lock held."""
        if len(self._running) < self.limits.max_running_batches and not self._waiting:
            return 0.0
        ahead = sum(j.remaining_work_s() for run in self._running for j in run.jobs if j.state == _RUNNING)
        ahead += sum(j.work_s for j in self._waiting)
        return ahead / self.limits.max_running_batches

    # ---- the worker thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running or self._cancels):
                    self._cond.wait()
                cancels, self._cancels = self._cancels, []
                stopping = self._stopping
                if not stopping:
                    self._expire_waiting()
                starts = [] if stopping else self._take_batches()
            for job, failure, reason in cancels:
                self._cancel_running(job, failure, reason)
            if stopping:
                return
            for plan, jobs in starts:
                self._start_batch(plan, jobs)
            run = self._next_run()
            if run is not None:
                self._step(run)

    def _expire_waiting(self) -> None:
        now = self.clock()
        for job in [j for j in self._waiting if now > j.deadline]:
            self._waiting.remove(job)
            job.state = _DONE
            waited = now - job.arrival
            job.deliver(Failed(unavailable("deadline_exceeded",
                                           f"the request waited {waited:.1f} s in the queue, past its deadline",
                                           self._wait_estimate())))
            self.metrics.request_failures.labels("deadline").inc()
        self._update_gauges()

    def _take_batches(self) -> list[tuple[Plan, list[Job]]]:
        """Oldest waiting request first; its batch takes every waiting request with the same plan."""
        starts: list[tuple[Plan, list[Job]]] = []
        while self._waiting and len(self._running) + len(starts) < self.limits.max_running_batches:
            plan = self._waiting[0].plan
            jobs = [j for j in self._waiting if j.plan == plan][: self.limits.max_batch_size]
            for job in jobs:
                self._waiting.remove(job)
                job.state = _RUNNING
            starts.append((plan, jobs))
        return starts

    def _start_batch(self, plan: Plan, jobs: list[Job]) -> None:
        now = self.clock()
        requests = [SequenceRequest(job.prompt_ids, job.sampling) for job in jobs]
        try:
            batch = self.engine.start_batch(requests, plan)
        except Exception:
            log.exception("starting a batch failed", extra={"request_ids": [j.request_id for j in jobs]})
            self._fail(jobs, "error")
            return
        run = _Running(batch, jobs)
        for seq, job in enumerate(jobs):
            job.seq, job.run, job.started_at = seq, run, now
            self.metrics.queue_duration.observe(now - job.arrival)
        with self._cond:
            self._running.append(run)
            self._update_gauges()

    def _next_run(self) -> _Running | None:
        with self._cond:
            if not self._running:
                return None
            self._turn = (self._turn + 1) % len(self._running)
            return self._running[self._turn]

    def _step(self, run: _Running) -> None:
        try:
            self._switch(run.batch.plan)
            started = self.clock()
            events = run.batch.step()
        except Exception:
            log.exception("a generation step failed", extra={"request_ids": [j.request_id for j in run.jobs]})
            self._fail([j for j in run.jobs if j.state == _RUNNING], "error")
            self._retire(run)
            return
        now = self.clock()
        if run.prefilled:
            self.costs.observe_decode(run.batch.plan, now - started)
        else:
            run.prefilled = True
            self.costs.observe_prefill(run.batch.plan, now - started, sum(len(j.prompt_ids) for j in run.jobs))
        for event in events:
            job = run.jobs[event.seq]
            if job.state != _RUNNING:
                continue
            piece = job.text.push(event.token_id)
            label = job.plan.label
            if job.first_token_at is None:
                job.first_token_at = now
                self.metrics.time_to_first_token.labels(label).observe(now - job.arrival)
            else:
                self.metrics.inter_token_latency.labels(label).observe(now - job.last_token_at)
            job.last_token_at = now
            job.completion_tokens += 1
            job.deliver(TokenOut(job.completion_tokens - 1, event.token_id, piece.token_text, piece.released))
            if piece.stopped:
                if event.finish_reason is None:
                    run.batch.cancel(event.seq)
                self._finish(job, "stop", now)
            elif event.finish_reason is not None:
                self._finish(job, event.finish_reason, now)
        if run.batch.done:
            self._retire(run)

    def _switch(self, plan: Plan) -> None:
        """Make the batch's plan current, timed apart from the step it precedes."""
        if plan == self._current_plan:
            return
        started = self.clock()
        self.engine.set_plan(plan)
        self.metrics.precision_switch.observe(self.clock() - started)
        self._current_plan = plan
        self.on_switch()

    def _finish(self, job: Job, reason: str, now: float) -> None:
        job.state = _DONE
        decode_s = now - job.first_token_at
        timing = Timing(
            queue_s=job.started_at - job.arrival,
            ttft_s=job.first_token_at - job.arrival,
            total_s=now - job.arrival,
            decode_tokens_per_s=(job.completion_tokens - 1) / decode_s if decode_s > 0 else None,
        )
        label = job.plan.label
        self.metrics.request_duration.labels(label).observe(timing.total_s)
        self.metrics.prompt_tokens.labels(label).inc(len(job.prompt_ids))
        self.metrics.generation_tokens.labels(label).inc(job.completion_tokens)
        tail = "" if job.text.stopped else job.text.flush()
        job.deliver(Finished(reason, job.text.text, tail, job.completion_tokens, timing))
        with self._cond:
            self._update_gauges()

    def _cancel_running(self, job: Job, failure: Failed | None, reason: str) -> None:
        if job.state != _RUNNING:
            return
        job.state = _DONE
        job.run.batch.cancel(job.seq)
        self.metrics.request_failures.labels(reason).inc()
        if failure is not None:
            job.deliver(failure)
        if job.run.batch.done:
            self._retire(job.run)
        else:
            with self._cond:
                self._update_gauges()

    def _fail(self, jobs: list[Job], reason: str) -> None:
        error = ServiceError(500, "internal_error", "generation failed; the server logged the details")
        for job in jobs:
            job.state = _DONE
            job.deliver(Failed(error))
            self.metrics.request_failures.labels(reason).inc()

    def _retire(self, run: _Running) -> None:
        with self._cond:
            if run in self._running:
                self._running.remove(run)
            self._update_gauges()
        self.on_switch()

    def _update_gauges(self) -> None:
        """Call with the lock held."""
        running = [j for run in self._running for j in run.jobs if j.state == _RUNNING]
        self.metrics.requests_waiting.set(len(self._waiting))
        self.metrics.requests_running.set(len(running))
        reserved = sum(len(j.prompt_ids) + j.sampling.max_new_tokens for j in running)
        self.metrics.kv_cache_usage.set(reserved / self.limits.kv_capacity_tokens)
