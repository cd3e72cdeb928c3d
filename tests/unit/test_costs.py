"""The cost model against scripted step timings: relative costs per width times one host factor."""

import pytest

from quept_core.precision import uniform_name
from quept_core.runtime.kernels.formats import PACKED_MAX_TOKENS
from quept_core.runtime.protocol import PrefillCall, StepStats
from service.engine.costs import HOST_WINDOW, CostModel, Line, PlanCost
from tests.unit.fakes import FakeBackend, plan_cost

# Relative figures of each width (prefill s/token, decode fixed s, decode s/row), as warm-up would give.
FIGURES = {"fp": (0.0040, 0.060, 0.0060), "w8": (0.0030, 0.050, 0.0050), "w7": (0.0028, 0.045, 0.0045),
           "w6": (0.0026, 0.040, 0.0040), "w5": (0.0024, 0.035, 0.0035), "w4": (0.0022, 0.030, 0.0030),
           "w3": (0.0020, 0.028, 0.0028)}
SHARED = 0.010  # decode overhead of any step


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


def measured(backend: FakeBackend, alpha: float = 0.05, stale_after_s: float = 30.0, shared: float = SHARED,
             **overrides: tuple[float, float, float]) -> CostModel:
    costs = CostModel(backend.shapes, alpha=alpha, stale_after_s=stale_after_s)
    for name, figures in {**FIGURES, **overrides}.items():
        costs.record(backend.resolve(name), plan_cost(*figures))
    costs.record_shared(shared)
    return costs


def true_decode_s(backend: FakeBackend, rows: dict[str, int]) -> float:
    """What the scripted host's decode step takes at speed 1 (the model's own formula, by hand)."""
    plans = {backend.resolve(name): count for name, count in rows.items()}
    total = sum(backend.numels.values())
    presence, weighted = {}, {}
    for linear, numel in backend.numels.items():
        for label in {uniform_name(plan.layer_bits[linear]) for plan in plans}:
            presence[label] = presence.get(label, 0.0) + numel / total
        for plan, count in plans.items():
            label = uniform_name(plan.layer_bits[linear])
            weighted[label] = weighted.get(label, 0.0) + count * numel / total
    return SHARED + sum(p * (FIGURES[w][1] - SHARED) + weighted[w] * FIGURES[w][2] for w, p in presence.items())


def decode_step(backend: FakeBackend, costs: CostModel, rows: dict[str, int], slowdown: float,
                truth: dict[str, float] | None = None) -> None:
    seconds = true_decode_s(backend, rows) * slowdown
    for name, factor in (truth or {}).items():  # a width whose real cost differs from its figure
        if name in rows:
            seconds += (factor - 1) * (FIGURES[name][1] - SHARED + rows[name] * FIGURES[name][2]) * slowdown
    costs.observe(StepStats(decode_rows=sum(rows.values()), decode_s=seconds), {},
                  {backend.resolve(name): count for name, count in rows.items()})


def prefill_step(backend: FakeBackend, costs: CostModel, names: str, tokens: int, slowdown: float) -> None:
    """A step that prefills a prompt of `tokens` tokens for each plan in `names` (comma-separated)."""
    calls = tuple(PrefillCall(backend.resolve(name), 1, tokens, tokens * FIGURES[name][0] * slowdown)
                  for name in names.split(","))
    costs.observe(StepStats(prefill_tokens=tokens * len(calls), prefill_s=sum(c.seconds for c in calls),
                            prefill_calls=calls), {call.plan: [tokens] for call in calls}, {})


def predicted_alone(backend: FakeBackend, costs: CostModel, name: str, rows: int = 1) -> float:
    return costs.decode_step_s({backend.resolve(name): rows})


ALL = ["fp", "w8", "w7", "w6", "w5", "w4", "w3", "mixed:4.5", "mixed:6.5"]


def test_a_host_slowing_five_times_and_recovering_moves_every_plan_within_a_few_steps(backend):
    costs = measured(backend)
    normal = {name: predicted_alone(backend, costs, name) for name in ALL}
    for _ in range(20):
        decode_step(backend, costs, {"w8": 2}, 1.0)
    assert costs.host_factor == pytest.approx(1.0)
    for _ in range(HOST_WINDOW // 2 + 1):  # only w4 runs while the host is slow
        decode_step(backend, costs, {"w4": 3}, 5.0)
    for name in ALL:  # also the plans that took no step in the slow phase
        assert predicted_alone(backend, costs, name) == pytest.approx(5 * normal[name])
    for _ in range(HOST_WINDOW // 2 + 1):  # the host recovers; w6 alone is served
        decode_step(backend, costs, {"w6": 1}, 1.0)
    for name in ALL:
        assert predicted_alone(backend, costs, name) == pytest.approx(normal[name], rel=0.01)


def test_prefill_and_decode_feed_one_host_factor(backend):
    costs = measured(backend)
    w5 = backend.resolve("w5")
    for _ in range(HOST_WINDOW):
        prefill_step(backend, costs, "w3", 20, 3.0)
    assert costs.prefill_s(w5, 10) == pytest.approx(3 * 10 * FIGURES["w5"][0])
    assert costs.decode_step_s({w5: 1}) == pytest.approx(3 * true_decode_s(backend, {"w5": 1}))


def test_one_outlier_step_moves_nothing(backend):
    costs = measured(backend)
    for _ in range(HOST_WINDOW):
        decode_step(backend, costs, {"w8": 1}, 2.0)
    before = costs.host_factor
    assert before > 1.5
    decode_step(backend, costs, {"w8": 1}, 40.0)  # a page fault, a collector pause
    assert costs.host_factor == pytest.approx(before)


def test_a_slow_first_step_after_a_start_does_not_set_the_hosts_speed(backend):
    costs = measured(backend)
    decode_step(backend, costs, {"w8": 1}, 12.0)  # first calls of a new shape
    assert costs.host_factor == 1.0
    for _ in range(2):
        decode_step(backend, costs, {"w8": 1}, 1.0)
    assert costs.host_factor == pytest.approx(1.0)  # the median of three outvotes it


def test_a_mixed_running_set_pays_the_shared_overhead_once_and_each_width_once(backend):
    costs = measured(backend)
    w4, w8, mixed = backend.resolve("w4"), backend.resolve("w8"), backend.resolve("mixed:4.5")
    assert costs.decode_step_s({w4: 2, w8: 1}) == pytest.approx(SHARED + (0.030 - SHARED) + (0.050 - SHARED)
                                                                + 2 * 0.003 + 0.005)
    # mixed:4.5 runs half its parameters at w4: beside w4 rows those kernel calls are already made.
    together = costs.decode_step_s({w4: 1, mixed: 1})
    assert together == pytest.approx(true_decode_s(backend, {"w4": 1, "mixed:4.5": 1}))
    assert together < costs.decode_step_s({w4: 1}) + costs.decode_step_s({mixed: 1}) - SHARED


def test_cost_of_an_unmeasured_mixed_plan_is_the_parameter_weighted_mix(backend):
    costs = CostModel(backend.shapes)
    costs.record(backend.resolve("w4"), plan_cost(0.001, 0.030, 0.002))
    costs.record(backend.resolve("w5"), plan_cost(0.003, 0.040, 0.004))
    plan = backend.resolve("mixed:4.5")
    share_w4 = sum(backend.numels[n] for n, b in plan.layer_bits.items() if b == 4) / sum(backend.numels.values())
    cost = costs.cost(plan)
    assert cost.decode_s(1) == pytest.approx(share_w4 * 0.032 + (1 - share_w4) * 0.044)
    for line in (cost.short_prefill, cost.long_prefill):
        assert line.per_unit == pytest.approx(share_w4 * 0.001 + (1 - share_w4) * 0.003)
    with pytest.raises(KeyError):
        costs.cost(backend.resolve("w6"))


def test_steps_of_one_plan_refine_its_relative_cost_normalized_by_the_host_factor(backend):
    costs = measured(backend, alpha=0.5)
    for _ in range(40):  # the host runs at a third of its speed; w4 really costs 1.5x its figure
        decode_step(backend, costs, {"w8": 1}, 3.0)
        decode_step(backend, costs, {"w8": 1}, 3.0)
        decode_step(backend, costs, {"w4": 1}, 3.0, truth={"w4": 1.5})
    assert costs.host_factor == pytest.approx(3.0, rel=0.02)
    relative_w4 = costs.decode_step_s({backend.resolve("w4"): 1}) / costs.host_factor
    assert relative_w4 == pytest.approx(SHARED + 1.5 * (0.030 - SHARED + 0.003), rel=0.03)
    relative_w8 = costs.decode_step_s({backend.resolve("w8"): 1}) / costs.host_factor
    assert relative_w8 == pytest.approx(true_decode_s(backend, {"w8": 1}), rel=0.02)


def test_a_width_whose_own_observations_contradict_its_figures_is_corrected(backend):
    # Warm-up measured w6 during a burst of other work (kept on disk, read by every later start): its
    # prefill at 6x its real cost, its decode at 4x. Traffic on a host 1.5x slower than at warm-up:
    # steps that prefill prompts of two plans (a call each), running sets of one plan or several.
    # Its prefill calls and its decode steps alone correct it within a few of each.
    prefill, fixed, per_row = FIGURES["w6"]
    costs = measured(backend, w6=(6 * prefill, 4 * fixed, 4 * per_row))
    sets = ({"w8": 3, "w4": 2, "w6": 1}, {"w6": 2}, {"w8": 1, "w6": 1}, {"w4": 2}, {"w8": 1})
    for step in range(40):
        decode_step(backend, costs, sets[step % len(sets)], 1.5)
        prefill_step(backend, costs, ("w4,w6", "w6,w8", "w8,w4")[step % 3], 10, 1.5)
    for name in ("w4", "w6", "w8"):
        plan = backend.resolve(name)
        assert costs.prefill_s(plan, 10) == pytest.approx(1.5 * 10 * FIGURES[name][0], rel=0.15)
        assert predicted_alone(backend, costs, name) == pytest.approx(1.5 * true_decode_s(backend, {name: 1}), rel=0.15)


def test_a_width_unseen_for_long_is_stale_and_an_idle_model_does_not_age(backend):
    costs = measured(backend, stale_after_s=1.0)
    assert costs.stalest() is None
    for _ in range(12):  # 12 steps of 0.055 s: 0.66 s of work, w8 alone
        decode_step(backend, costs, {"w8": 1}, 1.0)
    assert costs.stalest() is None
    for _ in range(8):
        decode_step(backend, costs, {"w8": 1}, 1.0)
    stale = costs.stalest()
    assert stale is not None and stale.name != "w8"
    assert costs.stalest(overdue=True) is None  # 1.1 s: not yet 1.5x the limit
    for _ in range(12):
        decode_step(backend, costs, {"w8": 1, stale.name: 1}, 1.0)
    assert costs.stalest() is not None and costs.stalest().name not in ("w8", stale.name)


def test_a_stale_width_is_re_measured_by_its_next_steps_in_a_mixed_running_set(backend):
    # Warm-up measured w6 during a burst of contention: three times its real cost.
    wrong = tuple(3 * x for x in FIGURES["w6"][1:])
    costs = measured(backend, stale_after_s=1.0, w6=(FIGURES["w6"][0], wrong[0], wrong[1]))
    for _ in range(30):
        decode_step(backend, costs, {"w8": 3, "w4": 2}, 2.0)
    assert costs.stalest(overdue=True) is not None
    w6 = backend.resolve("w6")
    before = costs.decode_step_s({w6: 1})
    for _ in range(3):  # a probe: three steps beside the running set
        decode_step(backend, costs, {"w8": 3, "w4": 2, "w6": 1}, 2.0)
    after = costs.decode_step_s({w6: 1})
    truth = 2.0 * true_decode_s(backend, {"w6": 1})
    assert before > 2.5 * truth
    assert after == pytest.approx(truth, rel=0.25)
    assert costs.host_factor == pytest.approx(2.0)  # the probe's steps did not bias the host factor


def test_full_precision_is_never_probed(backend):
    """Serving releases fp's packs after warm-up; a probe would rebuild them, and auto never picks fp."""
    costs = measured(backend, stale_after_s=1.0)
    quantized = {name: 1 for name in FIGURES if name != "fp"}
    for _ in range(40):  # every width but fp, for far longer than the limit
        decode_step(backend, costs, quantized, 1.0)
    assert costs.stalest() is None and costs.stalest(overdue=True) is None


def test_prompts_pay_the_prefill_calls_the_engine_makes(backend):
    costs = CostModel(backend.shapes)
    w4, w8 = backend.resolve("w4"), backend.resolve("w8")
    for plan in (w4, w8):
        costs.record(plan, plan_cost(0.001, 0.030, 0.002, prefill_s_per_call=0.020))
    call = 0.020 + 10 * 0.001
    assert costs.prefill_s(w4, 10) == pytest.approx(call)
    assert costs.prefill_s_of([(w4, 10), (w4, 10)]) == pytest.approx(0.020 + 20 * 0.001)  # one call, two rows
    assert costs.prefill_s_of([(w4, 10), (w8, 10)]) == pytest.approx(2 * call)  # plans never share a call
    assert costs.prefill_s_of([(w4, 10), (w4, 100)]) == pytest.approx(call + 0.020 + 100 * 0.001)  # too uneven
    for _ in range(HOST_WINDOW):
        costs.observe(StepStats(prefill_tokens=20, prefill_s=0.120), {w4: [10], w8: [10]}, {})  # 2x the two calls
    assert costs.host_factor == pytest.approx(2.0, rel=0.1)


def test_prompts_longer_than_the_packed_kernels_take_pay_the_long_prefill_line(backend):
    costs = measured(backend)
    w4 = backend.resolve("w4")
    short, long = Line(0.005, 0.001), Line(0.030, 0.0008)
    costs.record(w4, PlanCost(short, long, Line(0.030, 0.003)))
    assert costs.prefill_s(w4, PACKED_MAX_TOKENS) == pytest.approx(short.at(PACKED_MAX_TOKENS))
    assert costs.prefill_s(w4, PACKED_MAX_TOKENS + 1) == pytest.approx(long.at(PACKED_MAX_TOKENS + 1))
    # A call of three short prompts stays on the packed kernels, however many positions it computes.
    assert costs.prefill_s_of([(w4, PACKED_MAX_TOKENS)] * 3) == pytest.approx(short.at(3 * PACKED_MAX_TOKENS))


def test_steps_under_load_add_what_they_took_beyond_their_decode(backend):
    costs = measured(backend)
    w4 = backend.resolve("w4")
    alone = costs.decode_step_s({w4: 2})
    assert costs.step_period_s({w4: 2}) == pytest.approx(alone)  # nothing observed yet
    for extra in (0.0, 0.040):  # a plain step, then one that also prefilled others' prompts
        costs.observe_period(alone + extra, StepStats(), {}, {w4: 2})
    assert costs.step_period_s({w4: 2}) == pytest.approx(alone + 0.020)  # the mean: a request pays both
    costs.observe_period(alone / 2, StepStats(), {}, {w4: 2})  # faster than the model says: nothing is taken off
    assert costs.step_period_s({w4: 2}) == pytest.approx(alone + 0.040 / 3)


def test_a_pass_is_its_prompts_and_rows_plus_the_recent_overhead_and_a_rebuild_when_the_set_changed(backend):
    costs = measured(backend)
    w4, w8 = backend.resolve("w4"), backend.resolve("w8")
    rows, prompts = {w4: 2, w8: 1}, [(w4, 10)]
    modelled = costs.prefill_s_of(prompts) + costs.decode_step_s(rows)
    assert costs.pass_s(prompts, rows, rebuilds=True) == pytest.approx(modelled)  # nothing observed yet
    # Steps that took 5 ms beyond their model, half of them after a 20 ms layout rebuild.
    for rebuild in (0.020, 0.0) * 4:
        costs.observe_period(costs.prefill_s(w4, 10) + costs.decode_step_s(rows) + 0.005 + rebuild,
                             StepStats(layout_s=rebuild), {w4: [10]}, rows)
    assert costs.pass_s(prompts, rows, rebuilds=False) == pytest.approx(modelled + 0.005)
    assert costs.pass_s(prompts, rows, rebuilds=True) == pytest.approx(modelled + 0.025)
    assert costs.pass_s(prompts, rows, rebuilds=None) == pytest.approx(modelled + 0.015)  # as often as lately
    # A host twice as slow lengthens the overhead and the rebuild at once, as it does the model.
    for _ in range(HOST_WINDOW):
        decode_step(backend, costs, {"w4": 2, "w8": 1}, slowdown=2.0)
    assert costs.pass_s(prompts, rows, rebuilds=True) == pytest.approx(2 * (modelled + 0.025))


def test_a_step_that_set_plans_up_teaches_nothing(backend):
    costs = measured(backend)
    w4 = backend.resolve("w4")
    period = costs.step_period_s({w4: 1})
    costs.observe(StepStats(prefill_tokens=10, prefill_s=5.0, decode_rows=1, decode_s=5.0, setup_s=4.9),
                  {w4: [10]}, {w4: 1})
    costs.observe_period(10.0, StepStats(setup_s=4.9), {w4: [10]}, {w4: 1})
    assert costs.host_factor == 1.0 and costs.step_period_s({w4: 1}) == pytest.approx(period)


def test_a_step_run_on_other_threads_reports_its_ratios_and_teaches_nothing(backend):
    costs = measured(backend, alpha=0.5)
    w4 = backend.resolve("w4")
    before = costs.cost(w4)
    for _ in range(HOST_WINDOW):
        ratios = costs.observe(StepStats(prefill_tokens=10, prefill_s=10 * FIGURES["w4"][0] * 3,
                                         decode_rows=1, decode_s=(FIGURES["w4"][1] + FIGURES["w4"][2]) * 2),
                               {w4: [10]}, {w4: 1}, learn=False)
        assert ratios == {"prefill": pytest.approx(3.0), "decode": pytest.approx(2.0)}
    assert costs.host_factor == 1.0 and costs.cost(w4) == before
    taught = costs.observe(StepStats(decode_rows=1, decode_s=FIGURES["w4"][1] + FIGURES["w4"][2]), {}, {w4: 1})
    assert taught == {"decode": pytest.approx(1.0)}


def test_building_missing_packs_costs_their_share_of_each_widths_build(backend):
    costs = CostModel(backend.shapes)
    costs.record(backend.resolve("w4"), plan_cost(0.001, 0.030, 0.002, build_s=0.5))
    costs.record(backend.resolve("w8"), plan_cost(0.001, 0.050, 0.002, build_s=0.8))
    assert costs.build_s({}) == 0
    assert costs.build_s({4: 0.5, 8: 0.25}) == pytest.approx(0.5 * 0.5 + 0.25 * 0.8)
