"""The controller's choice for each budget is the one a person would make from the cost table."""

from dataclasses import replace

import pytest

from quept_core.runtime.protocol import StepStats
from service.engine.controller import (
    BEST,
    BETTER_FITTED,
    BROWNOUT,
    LATENCY,
    MEMORY,
    OVER_BUDGET,
    Budget,
    Controller,
    Load,
    PlanRequest,
    budget_choice,
)
from service.engine.costs import CostModel
from service.errors import ServiceError
from tests.unit.fakes import FakeBackend, plan_cost

# Decode seconds per step of one row on the imaginary host; prefill is 1 ms per prompt token everywhere.
# mixed:4.50 (half its parameters at w4, half at w5) follows from its bit mix: about 0.0325 s.
DECODE = {"fp": 0.060, "w8": 0.050, "w7": 0.045, "w6": 0.040, "w5": 0.035, "w4": 0.030, "w3": 0.028}
# The prefill gives the first token, so latency = 0.01 s + 100 x decode: w6 4.01 s, w5 3.51 s, mixed 3.26 s,
# w4 3.01 s.
PROMPT, NEW = 10, 101


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


def measured_costs(backend: FakeBackend) -> CostModel:
    costs = CostModel(backend.shapes, alpha=0.5)
    for name, decode in DECODE.items():
        costs.record(backend.resolve(name), plan_cost(0.001, decode, 0.0))
    return costs


def make_controller(backend: FakeBackend, depth: int = 8) -> Controller:
    return Controller(backend.candidates(), measured_costs(backend), backend.kv_bytes_per_token, depth)


def auto(**kwargs) -> PlanRequest:
    return PlanRequest(None, PROMPT, NEW, **kwargs)


def explicit(backend: FakeBackend, precision: str, **kwargs) -> PlanRequest:
    return PlanRequest(backend.describe(backend.resolve(precision)), PROMPT, NEW, **kwargs)


def kv() -> int:
    return (PROMPT + NEW) * FakeBackend.kv_bytes_per_token


def test_auto_without_budget_takes_the_best_quality_plan(backend):
    decision = make_controller(backend).decide(auto(), Load())
    assert decision.plan.name == "w8" and not decision.degraded


def test_tight_latency_budget_takes_the_best_plan_that_fits(backend):
    decision = make_controller(backend).decide(auto(budget=Budget(latency_s=3.9)), Load())
    assert decision.plan.name == "w5"  # w6 needs 4.01 s
    assert decision.prediction.latency_s == pytest.approx(3.51)
    assert not decision.degraded


def test_quality_order_follows_measured_perplexity_not_bits(backend):
    # 3.3 s rules out w5 (3.51 s); mixed:4.50 (3.26 s, ppl +5) beats w4 (3.01 s, ppl +8).
    decision = make_controller(backend).decide(auto(budget=Budget(latency_s=3.3)), Load())
    assert decision.plan.name == "mixed:4.50"


def test_memory_budget_counts_weights_and_this_requests_kv_cache(backend):
    w6 = backend.describe(backend.resolve("w6")).weight_bytes
    w7 = backend.describe(backend.resolve("w7")).weight_bytes
    budget = Budget(memory_bytes=kv() + (w6 + w7) // 2)
    decision = make_controller(backend).decide(auto(budget=budget), Load())
    assert decision.plan.name == "w6"
    assert decision.prediction.memory_bytes == w6 + kv()


def test_both_budgets_must_hold(backend):
    w6 = backend.describe(backend.resolve("w6")).weight_bytes
    decision = make_controller(backend).decide(auto(budget=Budget(3.9, kv() + w6)), Load())
    assert decision.plan.name == "w5"  # memory allows w6, latency only w5


def test_queue_wait_counts_against_the_latency_budget(backend):
    controller = make_controller(backend)
    assert controller.decide(auto(budget=Budget(latency_s=4.3)), Load()).plan.name == "w6"  # 4.01 s
    waited = controller.decide(auto(budget=Budget(latency_s=4.3)), Load(queue_wait_s=1.0))
    assert waited.plan.name == "mixed:4.50"  # w6 5.01 s, w5 4.51 s, mixed 4.26 s
    assert waited.prediction.queue_s == 1.0


def test_a_budget_only_the_queue_puts_out_of_reach_is_a_503_with_retry_after(backend):
    controller = make_controller(backend)
    with pytest.raises(ServiceError) as raised:  # w3 alone takes 2.81 s; 2 s of queue makes 4.81 s
        controller.decide(auto(budget=Budget(latency_s=3.0)), Load(queue_wait_s=2.0))
    error = raised.value
    assert error.status == 503 and error.type == "overloaded" and error.headers["Retry-After"] == "2"
    assert "the fastest allowed plan, w3, is predicted at 4810 ms (queue 2000 ms" in error.message
    with pytest.raises(ServiceError) as still:  # pinned to w8 (5.01 s alone): only the queue is in the way
        controller.decide(explicit(backend, "w8", budget=Budget(latency_s=5.5), allow_degrade=False),
                          Load(queue_wait_s=1.0))
    assert still.value.status == 503
    with pytest.raises(ServiceError) as never:  # 2 s is out of reach of every plan even when idle
        controller.decide(auto(budget=Budget(latency_s=2.0)), Load(queue_wait_s=2.0))
    assert never.value.status == 422 and never.value.type == "infeasible_budget"


def test_a_budget_only_the_recent_steps_under_load_put_out_of_reach_is_a_503(backend):
    controller = make_controller(backend)
    w8 = backend.resolve("w8")
    for _ in range(4):  # steps that took 0.2 s beyond their decode (others' prompts, switches)
        controller.costs.observe_period(controller.costs.decode_step_s({w8: 2}) + 0.2, StepStats(), {}, {w8: 2})
    # w3 alone takes 2.81 s and its one step 0.2 s beyond the model: within 3.1 s on an idle server.
    with pytest.raises(ServiceError) as raised:
        controller.decide(auto(budget=Budget(latency_s=3.1)), Load(running={w8: 2}))
    assert raised.value.status == 503 and raised.value.type == "overloaded"


def test_min_precision_is_a_floor_for_auto(backend):
    controller = make_controller(backend)
    decision = controller.decide(auto(budget=Budget(latency_s=4.5), floor_bits=6.0), Load())
    assert decision.plan.name == "w6"
    with pytest.raises(ServiceError) as raised:
        controller.decide(auto(budget=Budget(latency_s=3.9), floor_bits=6.0), Load())
    error = raised.value
    assert error.status == 422 and error.param == "latency_budget_ms"
    assert "the fastest plan, w6" in error.message and "4010 ms" in error.message


def test_infeasible_memory_budget_names_the_smallest_plan(backend):
    with pytest.raises(ServiceError) as raised:
        make_controller(backend).decide(auto(budget=Budget(memory_bytes=1000)), Load())
    assert raised.value.param == "memory_budget_mb"
    assert "the smallest plan, w3" in raised.value.message


def test_explicit_precision_is_served_as_asked(backend):
    decision = make_controller(backend).decide(explicit(backend, "w4"), Load())
    assert decision.plan.name == "w4" and not decision.degraded  # never "upgraded" either


def test_explicit_precision_over_budget_degrades_when_allowed(backend):
    decision = make_controller(backend).decide(explicit(backend, "w8", budget=Budget(latency_s=3.9)), Load())
    assert decision.plan.name == "w5"
    assert decision.degraded and decision.reason == LATENCY and decision.downgraded_from.name == "w8"


def test_explicit_precision_over_memory_budget_degrades_for_memory(backend):
    w5 = backend.describe(backend.resolve("w5")).weight_bytes
    decision = make_controller(backend).decide(explicit(backend, "w8", budget=Budget(memory_bytes=kv() + w5)),
                                               Load())
    assert decision.plan.name == "w5" and decision.reason == MEMORY


def test_explicit_precision_over_budget_without_degrade_is_refused_with_the_cheapest_cost(backend):
    request = explicit(backend, "w8", budget=Budget(latency_s=3.9), allow_degrade=False)
    with pytest.raises(ServiceError) as raised:
        make_controller(backend).decide(request, Load())
    message = raised.value.message
    assert raised.value.status == 422 and raised.value.param == "latency_budget_ms"
    assert "by w8 (5010 ms" in message and "allow_degrade is false" in message
    assert "the fastest plan, w3, is predicted at 2810 ms" in message


def test_requested_precision_below_min_precision_is_invalid(backend):
    with pytest.raises(ServiceError) as raised:
        make_controller(backend).decide(explicit(backend, "w4", floor_bits=6.0), Load())
    assert raised.value.param == "min_precision"


def test_brownout_steps_auto_down_one_plan_per_queue_depth_multiple(backend):
    controller = make_controller(backend, depth=8)
    assert controller.decide(auto(), Load(waiting=7)).plan.name == "w8"
    first = controller.decide(auto(), Load(waiting=8))
    assert first.plan.name == "w7" and first.reason == BROWNOUT and first.downgraded_from.name == "w8"
    assert controller.decide(auto(), Load(waiting=16)).plan.name == "w6"
    # A burst that the free slots take at the next step is no queue pressure; the rest is.
    w4 = backend.resolve("w4")
    assert controller.decide(auto(), Load(waiting=12, joining=((w4, 10, 1),) * 12)).plan.name == "w8"
    assert controller.decide(auto(), Load(waiting=12, joining=((w4, 10, 1),) * 4)).plan.name == "w7"


def test_brownout_respects_allow_degrade_and_min_precision(backend):
    controller = make_controller(backend, depth=8)
    kept = controller.decide(explicit(backend, "w8", allow_degrade=False), Load(waiting=40))
    assert kept.plan.name == "w8" and not kept.degraded
    degraded = controller.decide(explicit(backend, "w6"), Load(waiting=8))
    assert degraded.plan.name == "w5" and degraded.reason == BROWNOUT
    floored = controller.decide(auto(floor_bits=7.0), Load(waiting=40))
    assert floored.plan.name == "w7"
    assert controller.decide(auto(allow_degrade=False), Load(waiting=40)).plan.name == "w8"


def test_quality_falls_back_to_bits_when_a_plan_has_no_measurement(backend):
    costs = measured_costs(backend)
    unmeasured = [c.__class__(c.plan, c.nominal_bits, c.weight_bytes, None) if c.plan.name == "w5" else c
                  for c in backend.candidates()]
    controller = Controller(unmeasured, costs, backend.kv_bytes_per_token, 8)
    # By bits, w5 (5.0) ranks above mixed:4.50 although mixed's perplexity is known.
    assert controller.decide(auto(budget=Budget(latency_s=3.6)), Load()).plan.name == "w5"


@pytest.mark.parametrize("requested", [None, "fp", "w8", "w6", "w4", "mixed:4.5", "mixed:6"])
def test_every_downgrade_made_is_among_the_series_preset_at_zero(backend, requested):
    controller = make_controller(backend, depth=2)
    known = set(controller.downgrades())
    made = set()
    for latency_s in (None, 5.5, 4.5, 3.9, 3.3, 3.05):
        for waiting in (0, 2, 4, 8, 40):
            request = auto if requested is None else lambda **kw: explicit(backend, requested, **kw)
            try:
                decision = controller.decide(request(budget=Budget(latency_s=latency_s)), Load(waiting=waiting))
            except ServiceError:
                continue
            if decision.degraded:
                made.add((decision.downgraded_from.label, decision.plan.label, decision.reason))
    assert made and made <= known


def with_quality(backend: FakeBackend, quality: dict[str, tuple[float, float | None]]) -> list:
    """The fake's candidates with other perplexity deltas and intervals (name -> (delta, half-width))."""
    return [replace(c, ppl_delta_pct=quality[c.plan.name][0], ppl_interval_pct=quality[c.plan.name][1])
            if c.plan.name in quality else c for c in backend.candidates()]


def test_plans_whose_perplexity_differs_within_their_intervals_tie_and_the_cheaper_wins(backend):
    costs = measured_costs(backend)
    apart = Controller(with_quality(backend, {"w8": (0.05, 0.1), "w7": (0.4, 0.1)}), costs,
                       backend.kv_bytes_per_token, 8)
    assert apart.decide(auto(), Load()).plan.name == "w8"  # 0.35 apart, intervals of 0.1: w8 is better
    tied = Controller(with_quality(backend, {"w8": (0.05, 0.1), "w7": (0.4, 0.5)}), costs,
                      backend.kv_bytes_per_token, 8)
    assert tied.decide(auto(), Load()).plan.name == "w7"  # inside w7's 0.5: equal quality, fewer bytes
    unknown = Controller(with_quality(backend, {"w8": (0.05, None), "w7": (0.4, None)}), costs,
                         backend.kv_bytes_per_token, 8)
    assert unknown.decide(auto(), Load()).plan.name == "w8"


@pytest.mark.parametrize("requested", [None, "w7", "w6"])
def test_a_downgrade_never_raises_bits_even_when_the_higher_plan_looks_better_and_cheaper(backend, requested):
    # Noisy figures: w8 measured worse than w7, and w8 already fills the running set, so adding a w8 row
    # is predicted cheaper than starting the w7 or w6 kernels.
    candidates = with_quality(backend, {"w8": (0.6, 0.05), "w7": (0.4, 0.05), "w6": (0.5, 0.05)})
    controller = Controller(candidates, measured_costs(backend), backend.kv_bytes_per_token, 2)
    w8 = backend.resolve("w8")
    made = 0
    for latency_s in (None, 8.0, 6.0, 5.0, 4.0, 3.5):
        for waiting in (0, 2, 4, 8):
            request = auto if requested is None else lambda **kw: explicit(backend, requested, **kw)
            try:
                decision = controller.decide(request(budget=Budget(latency_s=latency_s)),
                                             Load(waiting=waiting, running={w8: 8}))
            except ServiceError:
                continue
            if decision.degraded:
                made += 1
                source = backend.describe(decision.downgraded_from)
                assert decision.candidate.nominal_bits <= source.nominal_bits, (latency_s, waiting)
                assert decision.plan.name != "w8"
    assert made


def test_a_prediction_under_load_waits_for_the_step_in_flight_and_joins_the_next_with_the_others(backend):
    controller = make_controller(backend)
    costs, w8, w4, w6 = controller.costs, backend.resolve("w8"), backend.resolve("w4"), backend.resolve("w6")
    load = Load(running={w8: 2}, joining=((w4, 20, 1),), in_flight_s=0.030, elapsed_s=0.002)
    prediction = controller.predict(backend.describe(w6), auto(), load)
    running_step = costs.decode_step_s({w8: 2})
    assert prediction.queue_s == pytest.approx(0.002 + 0.030)  # planning it so far, then the step in flight
    assert prediction.prefill_s == pytest.approx(0.020 + 0.010 + running_step)  # w4's prompt, its own, the others
    assert prediction.decode_s == pytest.approx((NEW - 1) * costs.decode_step_s({w8: 2, w4: 1, w6: 1}))
    # A slot it waits for comes free at the end of a step: the longer of the two waits counts.
    assert controller.predict(backend.describe(w6), auto(), replace(load, queue_wait_s=0.5)).queue_s == \
        pytest.approx(0.002 + 0.5)
    # Requests expected to arrive before the step in flight ends join the next step too, each like this one.
    arriving = controller.predict(backend.describe(w6), auto(), replace(load, arriving=1.5))
    assert arriving.prefill_s == pytest.approx(prediction.prefill_s + 1.5 * 0.010)
    idle = controller.predict(backend.describe(w6), auto(), Load())
    assert idle.queue_s == 0 and idle.prefill_s == pytest.approx(0.010)


def test_a_plan_whose_packs_are_not_resident_waits_for_their_build(backend):
    costs = measured_costs(backend)
    w6 = backend.resolve("w6")
    costs.record(w6, plan_cost(0.001, DECODE["w6"], 0.0, build_s=2.0))
    resident = Controller(backend.candidates(), costs, backend.kv_bytes_per_token, 8)
    evicted = Controller(backend.candidates(), costs, backend.kv_bytes_per_token, 8,
                         lambda plan: {6: 0.5} if plan == w6 else {})
    candidate = backend.describe(w6)
    assert evicted.predict(candidate, auto(), Load()).prefill_s == pytest.approx(
        resident.predict(candidate, auto(), Load()).prefill_s + 1.0)
    # A 4.5 s budget: w6 (4.01 s) when resident; with half its packs to build (5.01 s) the next best.
    assert resident.decide(auto(budget=Budget(latency_s=4.5)), Load()).plan.name == "w6"
    assert evicted.decide(auto(budget=Budget(latency_s=4.5)), Load()).plan.name != "w6"


def test_a_budgeted_auto_choice_keeps_the_fastest_better_plan_it_ruled_out(backend):
    decision = make_controller(backend).decide(auto(budget=Budget(latency_s=3.9)), Load())
    assert decision.plan.name == "w5" and decision.budgeted_auto
    assert decision.better_latency_s == pytest.approx(4.01)  # w6; w7 and w8 are slower still
    top = make_controller(backend).decide(auto(budget=Budget(latency_s=100.0)), Load())
    assert top.plan.name == "w8" and top.budgeted_auto and top.better_latency_s is None
    assert not make_controller(backend).decide(auto(), Load()).budgeted_auto
    assert not make_controller(backend).decide(explicit(backend, "w5", budget=Budget(latency_s=3.9)),
                                               Load()).budgeted_auto


def test_a_budgeted_choice_is_scored_with_the_better_plans_prediction_scaled_as_the_served_one_erred(backend):
    decision = make_controller(backend).decide(auto(budget=Budget(latency_s=3.9)), Load())
    # As predicted: w6 at 4.01 s would not have fitted.
    assert budget_choice(decision, 3.9, measured_s=3.51, predicted_s=3.51) == BEST
    # The host ran 15 % faster than predicted: w6 would have taken about 3.43 s.
    assert budget_choice(decision, 3.9, measured_s=3.0, predicted_s=3.51) == BETTER_FITTED
    assert budget_choice(decision, 3.9, measured_s=4.2, predicted_s=3.51) == OVER_BUDGET
    top = make_controller(backend).decide(auto(budget=Budget(latency_s=100.0)), Load())
    assert budget_choice(top, 100.0, measured_s=1.0, predicted_s=5.0) == BEST


def test_a_brownout_choice_within_budget_is_scored_as_brownout(backend):
    decision = make_controller(backend, depth=8).decide(auto(budget=Budget(latency_s=100.0)), Load(waiting=8))
    assert decision.reason == BROWNOUT
    assert budget_choice(decision, 100.0, measured_s=5.0, predicted_s=5.0) == BROWNOUT
