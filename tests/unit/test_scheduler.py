"""Scheduler behaviour with a scripted engine whose steps the test lets through one by one."""

from __future__ import annotations

import threading
import time

import pytest

from quept_core.runtime.protocol import SamplingParams
from service.engine.controller import Controller, PlanRequest, Prediction
from service.engine.costs import CostModel
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
from service.engine.threads import EXPLORE_EVERY, ThreadTuner
from service.errors import unavailable
from service.observability.metrics import Metrics
from tests.unit.fakes import FakeBackend, FakeClock, FakeEngine, expected_text, plan_cost


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
    def __init__(self, gated: bool = True, stale_after_s: float = 1000.0, probes: bool = True,
                 threads: ThreadTuner | None = None, **limits) -> None:
        self.clock = FakeClock()
        self.limits = SchedulerLimits(**limits)
        self.engine = FakeEngine(gated=gated, clock=self.clock, max_running=self.limits.max_running)
        self.backend = FakeBackend(self.engine)
        self.metrics = Metrics()
        self.costs = CostModel(self.backend.shapes, alpha=0.5, stale_after_s=stale_after_s)
        for precision in ("w4", "w6", "w8"):
            self.costs.record(self.backend.resolve(precision), plan_cost(0.001, 0.01, 0.0))
        self.scheduler = Scheduler(self.engine, self.limits, self.metrics, self.costs, self.clock, probes=probes,
                                   threads=threads)
        self.scheduler.start()

    def job(self, precision: str = "w4", max_new: int = 4, prompt: str = "hi", stop: tuple[str, ...] = (),
            deadline_s: float = 60.0, n: int = 1, temperature: float = 0.0,
            seed: int | None = None) -> tuple[Job, Collector]:
        tokenizer = self.engine.tokenizer
        ids = tokenizer(prompt).input_ids
        collector = Collector()
        now = self.clock()
        sampling = SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=seed)
        job = Job("req", ids, sampling, self.backend.resolve(precision),
                  [TextStream(tokenizer, ids, stop) for _ in range(n)], collector, now, now + deadline_s, work_s=0.1)
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


def finished_text(collector: Collector, choice: int = 0) -> str:
    finished = collector.last()
    assert isinstance(finished, Finished), finished
    return finished.outputs[choice].text


def test_a_request_joins_while_others_are_mid_generation_and_no_tokens_change(harness):
    h = harness()
    first = h.submit("w4", max_new=8)
    h.engine.allow(3)
    wait_until(lambda: len(first.tokens) == 3)
    joiners = [h.submit("w8", max_new=5), h.submit("w4", max_new=5, prompt="another prompt")]
    h.engine.allow(1000)
    assert finished_text(first) == expected_text("w4", 8)
    assert finished_text(joiners[0]) == expected_text("w8", 5)
    assert finished_text(joiners[1]) == expected_text("w4", 5)
    # The joiners were prefilled together in one step, beside one of the first request's tokens.
    joined = next(step for step in h.engine.steps if len(step.prefilled) == 2)
    assert set(joined.plans.values()) == {"w4", "w8"} and len(joined.plans) == 3
    assert [event.index for event in first.tokens] == list(range(8))


def test_requests_with_different_plans_share_steps(harness):
    h = harness()
    h.submit("w4", max_new=6)
    wait_until(lambda: len(h.engine.added) == 1)  # the worker is now held inside the first step
    others = [h.submit("w6", max_new=6), h.submit("w8", max_new=6)]
    h.engine.allow(1000)
    for collector, plan in zip(others, ("w6", "w8"), strict=True):
        assert finished_text(collector) == expected_text(plan, 6)
    plans = h.engine.plans_per_step()
    assert plans[0] == {"w4"} and plans[1:6] == [{"w4", "w6", "w8"}] * 5
    assert len(h.engine.steps) == 7  # no step runs one plan alone while another waits
    # The mix changed at the first, second and last step: each rebuild of the layout is observed.
    assert h.counter("quept_precision_switch_seconds_count") == 3


def test_the_running_set_is_bounded_and_the_oldest_waiting_request_joins_first(harness):
    h = harness(max_running=1)
    h.submit("w4", max_new=2)
    wait_until(lambda: len(h.engine.added) == 1)
    later = [h.submit("w8", max_new=2), h.submit("w6", max_new=2), h.submit("w8", max_new=2)]
    h.engine.allow(1000)
    for collector in later:
        collector.last()
    assert h.engine.added == [("w4", 1), ("w8", 1), ("w6", 1), ("w8", 1)]
    assert max(len(step.plans) for step in h.engine.steps) == 1


def test_a_request_of_n_waits_at_the_head_until_n_slots_are_free(harness):
    h = harness(max_running=2)
    h.submit("w4", max_new=3)
    wait_until(lambda: len(h.engine.added) == 1)
    pair = h.submit("w8", max_new=2, n=2)
    single = h.submit("w6", max_new=2)
    h.engine.allow(1000)
    assert len(pair.last().outputs) == 2 and isinstance(single.last(), Finished)
    assert h.engine.added == [("w4", 1), ("w8", 2), ("w6", 1)]


def test_n_sequences_share_one_add_and_differ_only_when_sampled(harness):
    h = harness(gated=False)
    greedy = h.submit("w4", max_new=6, n=2).last()
    assert [o.text for o in greedy.outputs] == [expected_text("w4", 6)] * 2
    assert greedy.completion_tokens == 12
    sampled = h.submit("w4", max_new=6, n=2, temperature=0.8, seed=3).last()
    assert [o.text for o in sampled.outputs] == [expected_text("w4", 6, 3), expected_text("w4", 6, 4)]
    assert h.engine.added[-1] == ("w4", 2)
    assert h.engine.steps[-6].prefilled and len(h.engine.steps[-6].plans) == 2


def test_abort_at_an_arbitrary_step_frees_the_slot_and_the_others_continue(harness):
    h = harness(max_running=2)
    job, aborted = h.job("w4", max_new=50)
    h.scheduler.submit(job)
    other = h.submit("w8", max_new=9)
    waiting = h.submit("w6", max_new=3)
    h.engine.allow(4)
    wait_until(lambda: len(aborted.tokens) == 4)
    h.scheduler.cancel(job)
    h.engine.allow(1000)
    assert finished_text(other) == expected_text("w8", 9)
    assert finished_text(waiting) == expected_text("w6", 3)
    assert job.choices[0].seq_id in h.engine.aborted
    assert len(aborted.tokens) <= 5  # at most the step that was already under way
    assert not any(isinstance(e, Finished | Failed) for e in aborted.events)
    assert h.counter("quept_request_failures_total", reason="dropped") == 1
    wait_until(lambda: h.scheduler.in_flight() == 0)


def test_cancel_stops_a_running_request_within_one_step_and_frees_its_slot(harness):
    h = harness(max_running=1)
    job, collector = h.job("w4", max_new=50)
    h.scheduler.submit(job)
    waiting = h.submit("w8", max_new=3)
    h.engine.allow(2)
    wait_until(lambda: len(collector.tokens) == 2)
    h.scheduler.cancel(job)
    h.engine.allow(1000)
    assert finished_text(waiting) == expected_text("w8", 3)
    assert len(collector.tokens) <= 3
    assert h.counter("quept_request_failures_total", reason="dropped") == 1
    assert h.scheduler.in_flight() == 0


def test_cancel_of_a_waiting_request_removes_it(harness):
    h = harness(max_running=1)
    h.submit("w4", max_new=3)
    job, collector = h.job("w8")
    h.scheduler.submit(job)
    h.scheduler.cancel(job)
    h.engine.allow(1000)
    wait_until(lambda: h.scheduler.in_flight() == 0)
    assert collector.events == [] and [p for p, _ in h.engine.added] == ["w4"]


def test_queue_is_bounded_by_requests(harness):
    h = harness(max_running=1, max_queue=2)
    h.submit("w4", max_new=2)
    wait_until(lambda: len(h.engine.added) == 1)
    h.submit("w4")
    h.submit("w4")
    with pytest.raises(AdmissionError) as raised:
        h.submit("w4")
    assert raised.value.reason == "queue_full"
    assert raised.value.error.status == 503 and int(raised.value.error.headers["Retry-After"]) >= 1


def test_queue_is_bounded_by_prompt_tokens(harness):
    h = harness(max_running=1, max_queue_tokens=30)
    h.submit("w4", max_new=2)
    wait_until(lambda: len(h.engine.added) == 1)
    h.submit("w4", prompt="x" * 20)
    with pytest.raises(AdmissionError) as raised:
        h.submit("w4", prompt="y" * 20)
    assert raised.value.reason == "queue_tokens"
    h.submit("w4", prompt="z" * 10)  # still fits


def test_a_request_queued_past_its_deadline_fails_with_503(harness):
    h = harness(max_running=1)
    h.submit("w4", max_new=3)
    wait_until(lambda: len(h.engine.added) == 1)
    late = h.submit("w8", deadline_s=1.0)
    h.clock.advance(2.0)
    h.engine.allow(1000)
    failed = late.last()
    assert isinstance(failed, Failed) and failed.error.status == 503
    assert failed.error.type == "deadline_exceeded" and "Retry-After" in failed.error.headers
    assert h.counter("quept_request_failures_total", reason="deadline") == 1


def test_abort_all_fails_queued_and_running_requests(harness):
    h = harness(max_running=1)
    running = h.submit("w4", max_new=50)
    queued = h.submit("w8")
    wait_until(lambda: len(h.engine.added) == 1)
    h.scheduler.abort_all(unavailable("draining", "shutting down", 5))
    assert isinstance(queued.last(), Failed)
    h.engine.allow(1000)
    assert isinstance(running.last(), Failed) and running.last().error.type == "draining"
    wait_until(lambda: h.scheduler.in_flight() == 0)
    assert h.engine.running == 0


def test_an_engine_failure_fails_the_running_requests_and_the_worker_goes_on(harness):
    h = harness(gated=False)
    h.engine.fail_on = "w6"
    broken = h.submit("w6")
    failed = broken.last()
    assert isinstance(failed, Failed) and failed.error.status == 500
    assert isinstance(h.submit("w4").last(), Finished)
    assert h.counter("quept_request_failures_total", reason="error") == 1


def test_a_host_where_one_thread_runs_faster_moves_the_steps_to_one_thread(harness):
    h = harness(gated=False, threads=ThreadTuner(2))
    assert h.counter("quept_engine_threads", phase="decode") == 2
    h.engine.thread_slowdown = {2: 3.0}  # two threads wait for each other on a busy host
    h.submit("w4", max_new=4 * EXPLORE_EVERY).last()
    ran = [(t.prefill, t.decode) for t in h.engine.threads]
    assert ran[0] == (2, 2) and ran[-8:] == [(2, 1)] * 8  # this request's one prefill never got tried
    assert h.counter("quept_engine_threads", phase="decode") == 1
    assert h.costs.host_factor == pytest.approx(1.0)  # the host as the chosen threads run on it


def test_stop_string_and_eos_end_a_request(harness):
    h = harness(gated=False)
    stopped = h.submit("w4", max_new=20, stop=("c",)).last().outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == "[w4]ab"
    assert h.engine.running == 0  # the stop string aborted the sequence in the engine
    h.engine.eos_after = 2
    ended = h.submit("w4", max_new=20).last().outputs[0]
    assert ended.finish_reason == "eos" and ended.text == "[w" and ended.completion_tokens == 3


def test_steps_feed_the_cost_model_and_a_slow_host_slows_every_plan(harness):
    h = harness(gated=False)
    h.engine.step_s["w8"] = 0.05  # five times what warm-up measured, prefill too
    h.engine.prefill_s_per_token = 0.005
    h.submit("w8", max_new=8).last()
    assert h.costs.host_factor == pytest.approx(5.0)
    assert h.counter("quept_host_speed_ratio") == pytest.approx(0.2)
    for name in ("w8", "w4"):  # w4 took no step meanwhile
        cost = h.costs.cost(h.backend.resolve(name))
        assert cost.decode_s(1) == pytest.approx(0.05) and cost.prefill_s(1, 10) == pytest.approx(0.05)


def test_timing_metrics_and_gauges(harness):
    h = harness(max_running=1)
    h.submit("w4", max_new=3)
    wait_until(lambda: len(h.engine.added) == 1)
    waiting = h.submit("w8", max_new=2)
    assert h.counter("quept_requests_waiting") == 1 and h.counter("quept_requests_running") == 1
    h.engine.allow(1)
    wait_until(lambda: len(h.engine.steps) == 1 and h.counter("quept_kv_cache_usage_ratio") > 0)
    assert h.counter("quept_kv_cache_usage_ratio") == h.engine.kv_usage
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


def test_a_width_unseen_for_long_gets_a_probe_that_leaves_the_requests_untouched(harness):
    h = harness(gated=False, stale_after_s=0.05)  # 0.05 s of engine work: five fake steps
    served = h.submit("w4", max_new=20)
    assert finished_text(served) == expected_text("w4", 20)
    probes = [(name, n) for name, n in h.engine.added if name != "w4"]
    assert probes and set(probes) <= {("w6", 1), ("w8", 1)}
    assert h.engine.steps_with("w6") + h.engine.steps_with("w8") >= 3  # a prefill and two decode steps
    assert [e for e in served.events if isinstance(e, TokenOut) and "[w6]" in e.text] == []
    wait_until(lambda: h.engine.running == 0)  # the probe ends by itself


def test_a_stale_probe_waits_behind_the_queue_and_an_overdue_one_goes_first(harness):
    h = harness(gated=False, stale_after_s=0.1, max_running=1)
    first, second = h.submit("w4", max_new=12), h.submit("w4", max_new=12)  # 0.12 s: stale, not overdue
    assert isinstance(first.last(), Finished) and isinstance(second.last(), Finished)
    assert [name for name, _ in h.engine.added][:2] == ["w4", "w4"]
    late = harness(gated=False, stale_after_s=0.1, max_running=1)
    first, second = late.submit("w4", max_new=20), late.submit("w4", max_new=4)  # 0.2 s: overdue
    assert isinstance(first.last(), Finished) and isinstance(second.last(), Finished)
    assert [name for name, _ in late.engine.added][1] in ("w6", "w8")


def test_no_probe_when_probes_are_off(harness):
    h = harness(gated=False, stale_after_s=0.05, probes=False)
    h.submit("w4", max_new=20).last()
    assert {name for name, _ in h.engine.added} == {"w4"}


def test_a_finished_request_observes_its_latency_over_the_prediction(harness):
    h = harness(gated=False)
    controller = Controller(h.backend.candidates(), h.costs, h.backend.kv_bytes_per_token, 8)
    job, collector = h.job("w8", max_new=6)
    job.prediction = controller.predict(h.backend.describe(job.plan), PlanRequest(None, len(job.prompt_ids), 6),
                                        h.scheduler.load())
    h.scheduler.submit(job)
    finished = collector.last()
    ratio = finished.timing.total_s / job.prediction.latency_s
    assert finished.timing.predicted_total_s == pytest.approx(job.prediction.latency_s)  # all 6 tokens generated
    assert h.counter("quept_latency_prediction_ratio_count", precision_served="w8") == 1
    assert h.counter("quept_latency_prediction_ratio_sum", precision_served="w8") == pytest.approx(ratio)
    assert 0.5 < ratio < 2


def test_the_wait_estimate_is_when_a_slot_frees_after_those_waiting_ahead(harness):
    h = harness(max_running=2)  # every job's predicted work is 0.1 s
    with h.scheduler._cond:  # both are admitted in one pass; the gated engine holds their first step
        h.submit("w4", max_new=4)
        h.submit("w8", max_new=4)
    wait_until(lambda: len(h.engine.added) == 2)
    assert h.scheduler.load().queue_wait_s == pytest.approx(0.1)  # the first of the two slots to free
    h.submit("w6", max_new=4)  # takes that slot when it frees, until 0.2 s
    load = h.scheduler.load()
    assert load.waiting == 1 and load.queue_wait_s == pytest.approx(0.1)  # the second slot frees at 0.1 s
    assert {plan.name: rows for plan, rows in load.running.items()} == {"w4": 1, "w8": 1} and not load.joining
    h.submit("w6", max_new=4)
    assert h.scheduler.load().queue_wait_s == pytest.approx(0.2)


def test_waiting_requests_that_fit_count_among_the_rows_of_the_coming_steps(harness):
    h = harness(max_running=2)
    h.submit("w4", max_new=4)
    wait_until(lambda: len(h.engine.added) == 1)
    with h.scheduler._cond:  # the loop cannot admit while the test holds its lock (re-entrant)
        h.scheduler.submit(h.job("w8", max_new=4)[0])
        h.scheduler.submit(h.job("w6", max_new=4)[0])
        load = h.scheduler.load()
    assert load.waiting == 2 and {plan.name: rows for plan, rows in load.running.items()} == {"w4": 1}
    assert [(plan.name, sequences) for plan, _, sequences in load.joining] == [("w8", 1)]  # w6 finds no slot


def test_a_request_waits_for_the_predicted_rest_of_the_step_in_flight_and_those_arriving_meanwhile_join_it(harness):
    h = harness()
    w4 = h.backend.resolve("w4")
    h.costs.record(w4, plan_cost(0.1, 0.01, 0.0))  # a 2-token prompt's prefill: 0.2 s
    start = h.clock()
    h.submit("w4")  # its step is in flight, held by the gated engine
    wait_until(lambda: h.scheduler.load().in_flight_s > 0)
    assert h.scheduler.load().in_flight_s == pytest.approx(0.2)
    for _ in range(2):  # two more arrive 50 ms apart: 20 requests a second
        h.clock.advance(0.05)
        h.submit("w4")
    load = h.scheduler.load(since=start + 0.05)
    assert load.elapsed_s == pytest.approx(0.05) and len(load.joining) == 2
    assert load.in_flight_s == pytest.approx(0.1)
    assert load.arriving == pytest.approx(20 * 0.1)  # expected before the step ends, beside the two waiting
    h.clock.advance(0.2)  # past the step's predicted end: nothing more to wait for, as far as the model knows
    assert h.scheduler.load().in_flight_s == 0 and h.scheduler.load().arriving == 0


def test_a_running_request_is_expected_to_reach_the_length_recent_requests_reached_beyond_its_own(harness):
    h = harness()
    job, _ = h.job("w4", max_new=16)
    job.prediction = Prediction(queue_s=0.0, prefill_s=0.1, decode_s=1.5, weight_bytes=0, kv_bytes=0)  # 0.1 s a step
    assert job.remaining_s() == pytest.approx([0.1 + 15 * 0.1])  # no history: all 16 tokens
    shares = [1 / 16] * 4 + [1.0] * 4  # half the recent requests stopped at their first token
    assert job.remaining_s(shares) == pytest.approx([0.1 + 7.5 * 0.1])  # the mean length, 8.5 tokens
    job.choices[0].tokens = [None, None]  # past its first token: those that went on reached 16
    assert job.remaining_s(shares) == pytest.approx([14 * 0.1])
