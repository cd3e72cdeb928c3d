"""Scheduler behaviour with a scripted engine whose steps the test lets through one by one."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from quept_core.runtime.protocol import SamplingParams
from service.engine.controller import CostModel, PlanCost
from service.engine.scheduler import (
    AdmissionError,
    Failed,
    Finished,
    Job,
    Scheduler,
    SchedulerLimits,
    TokenOut,
)
from service.engine.textstream import TextStream
from service.errors import unavailable
from service.observability.metrics import Metrics
from tests.unit.fakes import FakeBackend, FakeClock, FakeEngine, expected_text


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


class Collector:
    def __init__(self) -> None:
        self.events: list = []
        self.ended = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Finished | Failed):
            self.ended.set()

    @property
    def tokens(self) -> list[TokenOut]:
        return [e for e in self.events if isinstance(e, TokenOut)]

    def last(self):
        assert self.ended.wait(10), "the request never ended"
        return self.events[-1]


class Harness:
    def __init__(self, gated: bool = True, **limits) -> None:
        self.clock = FakeClock()
        self.engine = FakeEngine(gated=gated, clock=self.clock)
        self.backend = FakeBackend(self.engine)
        self.metrics = Metrics()
        self.costs = CostModel(self.backend.shapes, alpha=0.5)
        for precision in ("w4", "w6", "w8"):
            self.costs.record(precision, PlanCost(0.001, 0.03))
        self.scheduler = Scheduler(self.engine, SchedulerLimits(**limits), self.metrics, self.costs, self.clock)
        self.scheduler.start()

    def job(self, precision: str = "w4", max_new: int = 4, prompt: str = "hi", stop: tuple[str, ...] = (),
            deadline_s: float = 60.0) -> tuple[Job, Collector]:
        tokenizer = self.engine.tokenizer
        ids = tokenizer(prompt).input_ids
        collector = Collector()
        now = self.clock()
        job = Job("req", ids, SamplingParams(max_new_tokens=max_new), self.backend.resolve(precision),
                  TextStream(tokenizer, ids, stop), collector, now, now + deadline_s, work_s=0.1)
        return job, collector

    def submit(self, *args, **kwargs) -> Collector:
        job, collector = self.job(*args, **kwargs)
        self.scheduler.submit(job)
        return collector

    def counter(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.engine.gated = False
        self.engine.allow(1000)
        self.scheduler.stop()


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(**kwargs) -> Harness:
        made.append(Harness(**kwargs))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_requests_that_share_a_plan_are_batched(harness):
    h = harness()
    first = h.submit("w4")
    wait_until(lambda: len(h.engine.batches) == 1)  # the worker is now blocked in the first step
    w4 = [h.submit("w4") for _ in range(2)]
    w8 = [h.submit("w8") for _ in range(2)]
    h.engine.allow(1000)
    for collector, plan in [(first, "w4"), *((c, "w4") for c in w4), *((c, "w8") for c in w8)]:
        finished = collector.last()
        assert isinstance(finished, Finished)
        assert finished.text == expected_text(plan, 4) and finished.finish_reason == "length"
    assert h.engine.batches == [("w4", 1), ("w4", 2), ("w8", 2)]


def test_batch_size_is_bounded(harness):
    h = harness(max_batch_size=2)
    h.submit("w4")
    wait_until(lambda: len(h.engine.batches) == 1)
    rest = [h.submit("w4") for _ in range(3)]
    h.engine.allow(1000)
    for collector in rest:
        collector.last()
    assert h.engine.batches == [("w4", 1), ("w4", 2), ("w4", 1)]


def test_different_plans_interleave_one_step_each(harness):
    h = harness()
    h.submit("w4", max_new=6)
    wait_until(lambda: len(h.engine.batches) == 1)
    others = [h.submit("w6", max_new=6), h.submit("w8", max_new=6)]
    h.engine.allow(1000)
    for collector in others:
        collector.last()
    order = [plan for plan, _ in h.engine.steps]
    # After the first (lone) step, the three running batches take turns until w4 is done.
    rounds = order[1:10]
    assert all(len(set(rounds[i:i + 3])) == 3 for i in range(0, 9, 3)), order
    # Each change of plan between steps is one timed switch.
    changes = 1 + sum(a != b for a, b in itertools.pairwise(order))
    assert len(h.engine.switches) == changes
    assert h.counter("quept_precision_switch_seconds_count") == changes


def test_oldest_waiting_request_picks_the_next_batch(harness):
    h = harness(max_running_batches=1)
    h.submit("w4", max_new=2)
    wait_until(lambda: len(h.engine.batches) == 1)
    first_w8 = h.submit("w8", max_new=2)
    later = [h.submit("w6", max_new=2), h.submit("w8", max_new=2)]
    h.engine.allow(1000)
    for collector in [first_w8, *later]:
        collector.last()
    assert h.engine.batches == [("w4", 1), ("w8", 2), ("w6", 1)]


def test_cancel_stops_a_running_request_within_one_step_and_frees_its_slot(harness):
    h = harness(max_running_batches=1)
    job, collector = h.job("w4", max_new=50)
    h.scheduler.submit(job)
    waiting = h.submit("w8", max_new=3)
    h.engine.allow(2)
    wait_until(lambda: len(collector.tokens) == 2)
    h.scheduler.cancel(job)
    h.engine.allow(1000)
    finished = waiting.last()
    assert isinstance(finished, Finished) and finished.text == expected_text("w8", 3)
    assert len(collector.tokens) <= 3  # at most the step that was already under way
    assert not any(isinstance(e, Finished | Failed) for e in collector.events)
    assert h.counter("quept_request_failures_total", reason="dropped") == 1
    assert h.scheduler.in_flight() == 0


def test_cancel_of_a_waiting_request_removes_it(harness):
    h = harness(max_running_batches=1)
    h.submit("w4", max_new=3)
    job, collector = h.job("w8")
    h.scheduler.submit(job)
    h.scheduler.cancel(job)
    h.engine.allow(1000)
    wait_until(lambda: h.scheduler.in_flight() == 0)
    assert collector.events == [] and [p for p, _ in h.engine.batches] == ["w4"]


def test_queue_is_bounded_by_requests(harness):
    h = harness(max_running_batches=1, max_queue=2)
    h.submit("w4", max_new=2)
    wait_until(lambda: len(h.engine.batches) == 1)
    h.submit("w4")
    h.submit("w4")
    with pytest.raises(AdmissionError) as raised:
        h.submit("w4")
    assert raised.value.reason == "queue_full"
    assert raised.value.error.status == 503 and int(raised.value.error.headers["Retry-After"]) >= 1


def test_queue_is_bounded_by_prompt_tokens(harness):
    h = harness(max_running_batches=1, max_queue_tokens=30)
    h.submit("w4", max_new=2)
    wait_until(lambda: len(h.engine.batches) == 1)
    h.submit("w4", prompt="x" * 20)
    with pytest.raises(AdmissionError) as raised:
        h.submit("w4", prompt="y" * 20)
    assert raised.value.reason == "queue_tokens"
    h.submit("w4", prompt="z" * 10)  # still fits


def test_a_request_queued_past_its_deadline_fails_with_503(harness):
    h = harness(max_running_batches=1)
    h.submit("w4", max_new=3)
    wait_until(lambda: len(h.engine.batches) == 1)
    late = h.submit("w8", deadline_s=1.0)
    h.clock.advance(2.0)
    h.engine.allow(1000)
    failed = late.last()
    assert isinstance(failed, Failed) and failed.error.status == 503
    assert failed.error.type == "deadline_exceeded" and "Retry-After" in failed.error.headers
    assert h.counter("quept_request_failures_total", reason="deadline") == 1


def test_abort_all_fails_queued_and_running_requests(harness):
    h = harness(max_running_batches=1)
    running = h.submit("w4", max_new=50)
    queued = h.submit("w8")
    wait_until(lambda: len(h.engine.batches) == 1)
    h.scheduler.abort_all(unavailable("draining", "shutting down", 5))
    assert isinstance(queued.last(), Failed)
    h.engine.allow(1000)
    assert isinstance(running.last(), Failed) and running.last().error.type == "draining"
    wait_until(lambda: h.scheduler.in_flight() == 0)


def test_an_engine_failure_fails_its_batch_and_the_worker_goes_on(harness):
    h = harness(gated=False)
    h.engine.fail_on = "w6"
    broken = h.submit("w6")
    failed = broken.last()
    assert isinstance(failed, Failed) and failed.error.status == 500
    assert isinstance(h.submit("w4").last(), Finished)
    assert h.counter("quept_request_failures_total", reason="error") == 1


def test_stop_string_and_eos_end_a_request(harness):
    h = harness(gated=False)
    stopped = h.submit("w4", max_new=20, stop=("c",)).last()
    assert stopped.finish_reason == "stop" and stopped.text == "[w4]ab"
    h.engine.eos_after = 2
    ended = h.submit("w4", max_new=20).last()
    assert ended.finish_reason == "eos" and ended.text == "[w" and ended.completion_tokens == 3


def test_steps_feed_the_cost_model(harness):
    h = harness(gated=False)
    h.engine.step_s["w8"] = 0.2
    h.submit("w8", max_new=6).last()
    decode = h.costs.measured("w8").decode_s_per_step
    assert 0.03 < decode <= 0.2


def test_timing_metrics_and_gauges(harness):
    h = harness(max_running_batches=1)
    h.submit("w4", max_new=3)
    wait_until(lambda: len(h.engine.batches) == 1)
    waiting = h.submit("w8", max_new=2)
    assert h.counter("quept_requests_waiting") == 1 and h.counter("quept_requests_running") == 1
    reserved = len(h.engine.tokenizer("hi").input_ids) + 3  # the running request's prompt and new tokens
    assert h.counter("quept_kv_cache_usage_ratio") == reserved / h.scheduler.limits.kv_capacity_tokens
    load = h.scheduler.load()
    assert load.waiting == 1 and load.queue_wait_s > 0
    h.engine.allow(1000)
    finished = waiting.last()
    assert finished.timing.queue_s > 0 and finished.timing.ttft_s >= finished.timing.queue_s
    wait_until(lambda: h.counter("quept_requests_running") == 0)
    assert h.counter("quept_kv_cache_usage_ratio") == 0
    assert h.counter("quept_generation_tokens_total", precision_served="w4") == 3
    assert h.counter("quept_time_to_first_token_seconds_count", precision_served="w8") == 1
    assert h.counter("quept_inter_token_latency_seconds_count", precision_served="w4") == 2
    assert h.scheduler.load().queue_wait_s == 0
