"""Admission, continuous batching, cancellation and drain, in front of the engine.

The engine's `step()` is blocking work, so one dedicated worker thread owns the engine. Each turn of
its loop applies cancellations (`engine.abort`, so a disconnected client stops within one step),
admits the oldest waiting requests while the engine has free slots (a request joins the running set
at any step, whatever its plan), calls `engine.step()` once and routes each token to its request by
sequence id. Tokens reach a request's asyncio queue through `deliver` (`loop.call_soon_threadsafe`).

Every step feeds the cost model with what it ran (prompt tokens and decode rows per plan) and what it
took. When the cost model reports a stale bit-width, the loop adds a short probe sequence of that
width's plan to the running set (the controller module says when and why); its tokens go nowhere.
"""

from __future__ import annotations

import heapq
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from quept_core.planning.plan import Plan
from quept_core.runtime.protocol import (
    SAME_THREADS,
    Engine,
    SamplingParams,
    SequenceRequest,
    TokenEvent,
    TokenLogprob,
)
from quept_core.runtime.sampling import RequestError
from service.engine.controller import Load, Prediction
from service.engine.costs import CostModel
from service.engine.textstream import TextStream
from service.engine.threads import ThreadChoice, ThreadTuner
from service.engine.warmup import warmup_prompt
from service.errors import ServiceError, invalid, unavailable
from service.observability.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenOut:
    choice: int  # which of the request's n sequences
    index: int  # position of the token in its choice
    token_id: int
    text: str  # what this token added to the text
    released: str  # text now safe to show (held back while it could start a stop string)
    logprob: TokenLogprob | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ChoiceOutput:
    choice: int
    finish_reason: str  # "length", "stop" or "eos"
    text: str
    released: str  # held-back text released at the end
    tokens: tuple[TokenOut, ...]

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Timing:
    queue_s: float
    ttft_s: float
    total_s: float
    decode_tokens_per_s: float | None
    predicted_total_s: float | None = None  # the controller's prediction for the tokens generated
    predicted_queue_s: float | None = None  # its prediction of the wait before the step that prefills it
    predicted_ttft_s: float | None = None  # its prediction of the first token (queue and prefill)


@dataclass(frozen=True)
class ChoiceEnd:
    """One of the request's sequences ended (every choice's end comes before `Finished`)."""

    output: ChoiceOutput


@dataclass(frozen=True)
class Finished:
    outputs: tuple[ChoiceOutput, ...]  # by choice
    timing: Timing

    @property
    def completion_tokens(self) -> int:
        return sum(output.completion_tokens for output in self.outputs)


@dataclass(frozen=True)
class Failed:
    error: ServiceError


Event = TokenOut | ChoiceEnd | Finished | Failed


class AdmissionError(Exception):
    def __init__(self, reason: str, error: ServiceError):
        super().__init__(error.message)
        self.reason = reason  # label value of quept_admission_rejections_total
        self.error = error


@dataclass(frozen=True)
class SchedulerLimits:
    max_queue: int = 64
    max_queue_tokens: int = 65536
    max_running: int = 16  # sequences in the engine's running set (its KV slots)


_WAITING, _RUNNING, _DONE = "waiting", "running", "done"
ARRIVAL_WINDOW = 16  # latest arrivals the arrival rate is taken over
LENGTH_WINDOW = 64  # latest finished sequences whose lengths predict how long running ones go on
PROBE_PROMPT_TOKENS = 4
UNTUNED = ThreadChoice(SAME_THREADS)  # the steps of a scheduler without a thread tuner
PROBE_NEW_TOKENS = 3  # a prefill and two decode steps: what the cost model re-measures a width from


@dataclass(eq=False)
class Choice:
    """One of a request's n sequences: its text, its tokens and its place in the engine."""

    index: int
    text: TextStream
    seq_id: int = -1
    tokens: list[TokenOut] = field(default_factory=list)
    last_token_at: float | None = None
    output: ChoiceOutput | None = None  # once it ended

    @property
    def done(self) -> bool:
        return self.output is not None


@dataclass(eq=False)
class Job:
    """One generation request (n sequences of one prompt) as the scheduler sees it."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    plan: Plan
    texts: list[TextStream]  # one per choice
    deliver: Callable[[Event], None]  # thread-safe: called from the worker thread
    arrival: float  # clock() when the request arrived
    deadline: float  # clock() after which a still-queued request fails
    work_s: float = 0.0  # predicted compute seconds of one choice, for queue-wait estimates
    prediction: Prediction | None = None  # the controller's, to compare with the measured latency
    state: str = _WAITING
    started_at: float | None = None
    first_token_at: float | None = None
    choices: list[Choice] = field(init=False)

    def __post_init__(self) -> None:
        self.choices = [Choice(i, text) for i, text in enumerate(self.texts)]

    @property
    def n(self) -> int:
        return len(self.choices)

    @property
    def finished(self) -> bool:
        return self.state == _DONE

    def remaining_s(self, length_shares: Sequence[float] = ()) -> list[float]:
        """Predicted seconds until each of its unfinished sequences ends. `length_shares`: how much of
        their `max_new_tokens` recent requests generated (a stop or eos ends many early); a sequence
        with k tokens is expected to reach the mean length of those that went beyond k (its
        `max_new_tokens` when none did, or with no history)."""
        longest = max(1, self.sampling.max_new_tokens)
        p = self.prediction
        # The prefill gives the first token and each decode step one more; without the controller's
        # prediction, the work is spread evenly over the tokens.
        first_s, per_token = (p.prefill_s, p.decode_s / max(1, longest - 1)) if p else (0.0, self.work_s / longest)
        remaining = []
        for choice in self.choices:
            if choice.done:
                continue
            generated = len(choice.tokens)
            beyond = [share * longest for share in length_shares if share * longest > generated]
            expected = statistics.fmean(beyond) if beyond else longest
            if p and generated == 0:
                remaining.append(first_s + per_token * max(0.0, expected - 1))
            else:
                remaining.append(max(0.0, per_token * (expected - generated)))
        return remaining

    def predicted_latency_s(self) -> float:
        """The prediction for the tokens the request generated (a stop or eos ends it early)."""
        generated = max(c.output.completion_tokens for c in self.choices)
        p = self.prediction
        decoded = max(0, generated - 1)  # the prefill gives the first token
        return p.queue_s + p.prefill_s + p.decode_s * decoded / max(1, self.sampling.max_new_tokens - 1)


@dataclass
class _Probe:
    seq_id: int
    plan: Plan
    prefilling: bool = True


class Scheduler:
    def __init__(self, engine: Engine, limits: SchedulerLimits, metrics: Metrics, costs: CostModel,
                 clock: Callable[[], float] = time.monotonic,
                 on_layout_change: Callable[[], None] = lambda: None, probes: bool = True,
                 threads: ThreadTuner | None = None):
        self.engine = engine
        self.threads = threads  # None: every step on PyTorch's threads as they are
        self.on_layout_change = on_layout_change  # after a step rebuilt the weight layout, in the engine's thread
        self.limits = limits
        self.metrics = metrics
        self.costs = costs
        self.clock = clock
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._running: dict[int, tuple[Job, Choice]] = {}  # seq id -> its request and choice
        self._prefilling: list[Job] = []  # added since the last step
        self._cancels: list[tuple[Job, Failed | None, str]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Off under a memory limit: a probe's packs might not fit beside the running set's.
        self._probes = probes
        self._probe: _Probe | None = None
        self._pass_ends_at: float | None = None  # predicted end of the loop's pass in flight (None: idle)
        self._arrivals: deque[float] = deque(maxlen=ARRIVAL_WINDOW)  # when the latest requests were queued
        # Of the latest finished sequences, the share of their max_new_tokens they generated.
        self._length_shares: deque[float] = deque(maxlen=LENGTH_WINDOW)
        self._probe_prompt = warmup_prompt(engine.tokenizer, PROBE_PROMPT_TOKENS)

    # ---- called from the event loop -------------------------------------------------------------

    def start(self) -> None:
        if self.threads:
            self._update_thread_gauges()
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
            self._arrivals.append(job.arrival)
            self._update_queue_gauges()
            self._cond.notify()

    def cancel(self, job: Job, reason: str = "dropped") -> None:
        """Stop a request: at once if still queued, else before the engine's next step."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.state = _DONE
                self.metrics.request_failures.labels(reason).inc()
                self._update_queue_gauges()
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
            self._cancels.extend((job, Failed(error), "dropped") for job in self._running_jobs())
            self._update_queue_gauges()
            self._cond.notify()

    def in_flight(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self._running_jobs())

    def load(self, since: float | None = None) -> Load:
        """What a request arriving now meets (`since`: when it arrived, if before now)."""
        with self._cond:
            joining = tuple((job.plan, len(job.prompt_ids), job.n)  # they join at the next step
                            for job in self._fitting(self.limits.max_running - len(self._running)))
            now = self.clock()
            in_flight = 0.0 if self._pass_ends_at is None else max(0.0, self._pass_ends_at - now)
            # Requests that arrive before the step in flight ends join the next step too, as far as slots are free.
            free = self.limits.max_running - len(self._running) - sum(n for _, _, n in joining) - 1
            arriving = min(max(0, free), self._arrival_rate(now) * in_flight)
            return Load(self._wait_estimate(), len(self._waiting), self._rows_by_plan(), joining, in_flight, arriving,
                        0.0 if since is None else max(0.0, now - since))

    def _arrival_rate(self, now: float) -> float:
        """Requests per second recently (0 before two arrivals). Call with the lock held."""
        if len(self._arrivals) < 2:
            return 0.0
        return (len(self._arrivals) - 1) / max(now - self._arrivals[0], 1e-3)

    def _rows_by_plan(self, skip: Collection[Job] = ()) -> dict[Plan, int]:
        """Running sequences per plan, those of the jobs in `skip` apart."""
        rows: dict[Plan, int] = {}
        for job, _ in self._running.values():
            if job not in skip:
                rows[job.plan] = rows.get(job.plan, 0) + 1
        return rows

    def _fitting(self, free: int) -> list[Job]:
        """The oldest waiting requests that fit `free` slots; the first that does not fit stops the list
        (so a request with n > 1 is not overtaken for ever). Call with the lock held."""
        jobs = []
        for job in self._waiting:
            if job.n > free:
                break
            jobs.append(job)
            free -= job.n
        return jobs

    def _running_jobs(self) -> list[Job]:
        """Call with the lock held."""
        return list({id(job): job for job, _ in self._running.values() if job.state == _RUNNING}.values())

    def _wait_estimate(self) -> float:
        """Seconds until a new request starts: when the first slot is free after the waiting requests
        (oldest first) took theirs, each slot freeing when its sequence's predicted work ends (for the
        length recent requests reached, `Job.remaining_s`). Zero while slots are free for all. Call with
        the lock held."""
        busy = [s for job in self._running_jobs() for s in job.remaining_s(self._length_shares)]
        free_at = [0.0] * max(0, self.limits.max_running - len(busy)) + busy
        heapq.heapify(free_at)
        for job in self._waiting:
            slots = [heapq.heappop(free_at) for _ in range(min(job.n, len(free_at)))]
            start = max(slots, default=0.0)
            for work_s in job.remaining_s(self._length_shares)[:len(slots)]:
                heapq.heappush(free_at, start + work_s)
        return free_at[0] if free_at else 0.0

    # ---- the worker thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        ended: float | None = None  # when the previous pass ended, unless the loop waited for work since
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running or self._cancels or self._probe):
                    self._pass_ends_at = ended = None
                    self._cond.wait()
                cancels, self._cancels = self._cancels, []
                stopping = self._stopping
            # Back to back, a pass starts where the previous one ended: the time the loop waits for the
            # GIL or the lock (the HTTP side runs in the same process) is part of what steps take.
            started = self.clock() if ended is None else ended
            for job, failure, reason in cancels:
                self._cancel_running(job, failure, reason)
            if stopping:
                return
            overdue = self._probe_due(overdue=True)  # goes ahead of the queue
            with self._cond:
                self._expire_waiting()
                admitted = self._take_admissible(reserved=1 if overdue else 0)
                idle_slot = not self._waiting
            if overdue:
                self._add_probe(overdue)
            for job in admitted:
                self._add(job)
            probe = self._probe_due(overdue=False) if idle_slot else None
            if probe:
                self._add_probe(probe)
            if self._running or self._probe:
                ended = self._step(started)

    def _probe_due(self, overdue: bool) -> Plan | None:
        """The plan of a stale width, when a probe may join now."""
        if not self._probes or self._probe is not None or self.engine.free_slots < 1:
            return None
        return self.costs.stalest(overdue)

    def _add_probe(self, plan: Plan) -> None:
        sampling = SamplingParams(max_new_tokens=PROBE_NEW_TOKENS)
        try:
            (seq_id,) = self.engine.add(SequenceRequest(self._probe_prompt, plan, sampling))
        except Exception:
            log.exception("adding a cost probe failed; probes are off", extra={"plan": plan.name})
            self._probes = False
            return
        self._probe = _Probe(seq_id, plan)

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
        self._update_queue_gauges()

    def _take_admissible(self, reserved: int = 0) -> list[Job]:
        """The waiting requests that fit the free slots (less `reserved`), out of the queue."""
        admitted = self._fitting(self.engine.free_slots - reserved)
        del self._waiting[:len(admitted)]
        for job in admitted:
            job.state = _RUNNING
        self._update_queue_gauges()
        return admitted

    def _add(self, job: Job) -> None:
        try:
            seq_ids = self.engine.add(SequenceRequest(job.prompt_ids, job.plan, job.sampling), job.n)
        except RequestError as error:
            self._fail([job], invalid(str(error), None), "error")
            return
        except Exception:
            log.exception("adding a request to the engine failed", extra={"request_id": job.request_id})
            self._fail([job], _internal_error(), "error")
            return
        job.started_at = self.clock()
        self.metrics.queue_duration.observe(job.started_at - job.arrival)
        with self._cond:
            for seq_id, choice in zip(seq_ids, job.choices, strict=True):
                choice.seq_id = seq_id
                self._running[seq_id] = (job, choice)
            self._prefilling.append(job)
            self._update_queue_gauges()

    def _step(self, started: float) -> float:
        """One engine step and the routing of its tokens; `started`: when this pass of the loop began.
        Returns when it ended."""
        prefilled, self._prefilling = self._prefilling, []
        prompts, decode_rows = self._composition(prefilled)
        predicted_s = self.costs.pass_s([(plan, n) for plan, lengths in prompts.items() for n in lengths], decode_rows,
                                        self.engine.relayout_due)
        with self._cond:
            self._pass_ends_at = started + predicted_s
        choice = (self.threads.next_step(bool(prompts), bool(decode_rows), may_try=self._probe is None)
                  if self.threads else UNTUNED)
        try:
            events = self.engine.step(choice.threads)
        except Exception:
            with self._cond:
                jobs = self._running_jobs()
            log.exception("a generation step failed", extra={"request_ids": [j.request_id for j in jobs]})
            for job in jobs:
                self._abort_choices(job)
            self._abort_probe()
            self._fail(jobs, _internal_error(), "error")
            self._update_engine_gauges()
            return self.clock()
        stats = self.engine.last_step
        ratios = self.costs.observe(stats, prompts, decode_rows, learn=not choice.trying)
        if self.threads and self.threads.observe(choice, ratios):
            self._update_thread_gauges()
        self.metrics.host_speed.set(1 / self.costs.host_factor)
        if stats.layout_s > 0:
            self.metrics.precision_switch.observe(stats.layout_s)
            self.on_layout_change()
        now = self.clock()
        for event in events:
            if self._probe is not None and event.seq_id == self._probe.seq_id:
                if event.finish_reason is not None:
                    self._probe = None
                continue
            self._route(event, now)
        self._update_engine_gauges()
        ended = self.clock()
        period = ended - started
        if not choice.trying:
            self.costs.observe_period(period, stats, prompts, decode_rows)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step", extra={"ms": round(period * 1000, 2), "predicted_ms": round(predicted_s * 1000, 2),
                                     "prefill_ms": round(stats.prefill_s * 1000, 2), "decode_ms": round(stats.decode_s * 1000, 2),
                                     "layout_ms": round(stats.layout_s * 1000, 2), "prompt_tokens": stats.prefill_tokens,
                                     "rows": stats.decode_rows, "host_factor": round(self.costs.host_factor, 3),
                                     "threads": [choice.threads.prefill, choice.threads.decode]})
        return ended

    def _composition(self, prefilled: list[Job]) -> tuple[dict[Plan, list[int]], dict[Plan, int]]:
        """What the coming step runs: the prompt lengths per plan (each prompt once, however many choices
        share it) and decode rows per plan (every running sequence not prefilled in it)."""
        prompts: dict[Plan, list[int]] = {}
        for job in prefilled:
            prompts.setdefault(job.plan, []).append(len(job.prompt_ids))
        decode_rows = self._rows_by_plan(skip=prefilled)
        probe = self._probe
        if probe is not None:
            if probe.prefilling:
                prompts.setdefault(probe.plan, []).append(len(self._probe_prompt))
            else:
                decode_rows[probe.plan] = decode_rows.get(probe.plan, 0) + 1
            probe.prefilling = False
        return prompts, decode_rows

    def _abort_probe(self) -> None:
        if self._probe is not None:
            self.engine.abort(self._probe.seq_id)
            self._probe = None

    def _route(self, event: TokenEvent, now: float) -> None:
        running = self._running.get(event.seq_id)
        if running is None:
            return
        job, choice = running
        if job.state != _RUNNING or choice.done:
            return
        piece = choice.text.push(event.token_id)
        label = job.plan.label
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.time_to_first_token.labels(label).observe(now - job.arrival)
        if choice.last_token_at is not None:
            self.metrics.inter_token_latency.labels(label).observe(now - choice.last_token_at)
        choice.last_token_at = now
        token = TokenOut(choice.index, len(choice.tokens), event.token_id, piece.token_text, piece.released,
                         event.logprob, event.top_logprobs)
        choice.tokens.append(token)
        job.deliver(token)
        if piece.stopped:
            if event.finish_reason is None:
                self.engine.abort(event.seq_id)
            self._end_choice(job, choice, "stop", now)
        elif event.finish_reason is not None:
            self._end_choice(job, choice, event.finish_reason, now)

    def _end_choice(self, job: Job, choice: Choice, reason: str, now: float) -> None:
        with self._cond:
            self._running.pop(choice.seq_id, None)
        tail = "" if choice.text.stopped else choice.text.flush()
        choice.output = ChoiceOutput(choice.index, reason, choice.text.text, tail, tuple(choice.tokens))
        job.deliver(ChoiceEnd(choice.output))
        if all(c.done for c in job.choices):
            self._finish(job, now)

    def _finish(self, job: Job, now: float) -> None:
        job.state = _DONE
        outputs = tuple(c.output for c in job.choices)
        with self._cond:
            self._length_shares.extend(o.completion_tokens / max(1, job.sampling.max_new_tokens) for o in outputs)
        generated = sum(o.completion_tokens for o in outputs)
        decode_s = now - job.first_token_at
        timing = Timing(
            queue_s=job.started_at - job.arrival,
            ttft_s=job.first_token_at - job.arrival,
            total_s=now - job.arrival,
            decode_tokens_per_s=(generated - job.n) / decode_s if decode_s > 0 else None,
            predicted_total_s=None if job.prediction is None else job.predicted_latency_s(),
            predicted_queue_s=None if job.prediction is None else job.prediction.queue_s,
            predicted_ttft_s=None if job.prediction is None else job.prediction.queue_s + job.prediction.prefill_s,
        )
        label = job.plan.label
        self.metrics.request_duration.labels(label).observe(timing.total_s)
        if timing.predicted_total_s:
            self.metrics.latency_prediction.labels(label).observe(timing.total_s / timing.predicted_total_s)
        self.metrics.prompt_tokens.labels(label).inc(len(job.prompt_ids))
        self.metrics.generation_tokens.labels(label).inc(generated)
        job.deliver(Finished(outputs, timing))
        with self._cond:
            self._update_queue_gauges()

    def _cancel_running(self, job: Job, failure: Failed | None, reason: str) -> None:
        if job.state != _RUNNING:
            return
        job.state = _DONE
        self._abort_choices(job)
        self.metrics.request_failures.labels(reason).inc()
        if failure is not None:
            job.deliver(failure)
        with self._cond:
            self._update_queue_gauges()
        self._update_engine_gauges()

    def _abort_choices(self, job: Job) -> None:
        for choice in job.choices:
            with self._cond:
                running = self._running.pop(choice.seq_id, None)
            if running is not None:
                self.engine.abort(choice.seq_id)

    def _fail(self, jobs: list[Job], error: ServiceError, reason: str) -> None:
        for job in jobs:
            job.state = _DONE
            job.deliver(Failed(error))
            self.metrics.request_failures.labels(reason).inc()
        with self._cond:
            self._update_queue_gauges()

    def _update_thread_gauges(self) -> None:
        for phase, threads in self.threads.chosen.items():
            self.metrics.engine_threads.labels(phase).set(threads)

    def _update_queue_gauges(self) -> None:
        """Call with the lock held."""
        self.metrics.requests_waiting.set(len(self._waiting))
        self.metrics.requests_running.set(len(self._running_jobs()))

    def _update_engine_gauges(self) -> None:
        """Engine thread only."""
        self.metrics.kv_cache_usage.set(self.engine.kv_usage)


def _internal_error() -> ServiceError:
    return ServiceError(500, "internal_error", "generation failed; the server logged the details")
