"""Warm-up measures every plan on a real (tiny) engine, whatever the size of its KV pool, and a later
start reads the figures it kept."""

import json
from dataclasses import replace

import pytest
import torch
from tiny_llama import tiny_elastic, tiny_loaded

from quept_core.runtime.engine import QueptEngine
from service.engine.costs import CostModel
from service.engine.warmup import (
    ROWS,
    costs_file,
    measure_costs,
    measure_plans,
    measure_shared_overhead,
    warmup_prompt,
)


def engine_with(max_running: int) -> QueptEngine:
    loaded = tiny_loaded()
    return QueptEngine.from_elastic(loaded, tiny_elastic(loaded), device="cpu", max_running=max_running)


@pytest.mark.parametrize("max_running", [1, 2, ROWS + 1])
def test_warm_up_fits_the_kv_pool_and_leaves_it_free(max_running):
    engine = engine_with(max_running)
    prompt = warmup_prompt(engine.tokenizer)
    plans = [engine.plan("w4"), engine.plan("w8")]
    costs = list(measure_plans(engine, plans, prompt).values())
    shared = measure_shared_overhead(engine, plans, costs, prompt)
    for cost in costs:
        for line in (cost.short_prefill, cost.long_prefill):
            assert line.per_unit > 0 and line.fixed >= 0
        assert cost.decode_s(1) > 0 and cost.decode.per_unit >= 0
    if max_running == 1:
        assert all(cost.decode.per_unit == 0 for cost in costs)  # one slot: never more than one row
        assert shared == 0.0  # two plans cannot run together
    assert engine.free_slots == max_running and engine.running == 0


def test_a_later_start_reads_the_kept_figures_and_only_runs_each_resident_plan_once(tmp_path):
    engine = engine_with(ROWS + 1)
    plans = [engine.plan("w4"), engine.plan("w8")]
    shapes, kept = dict(engine.linear_shapes), tmp_path / "costs.json"
    first = CostModel(shapes)
    measure_costs(engine, plans, engine.tokenizer, first, {"w4": 1, "w8": 2}, {"w4": 0.5, "w8": 0.25}, kept)
    assert kept.is_file()

    steps = []
    step = engine.step
    engine.step = lambda: steps.append(1) or step()
    later = CostModel(shapes)
    measure_costs(engine, plans, engine.tokenizer, later, {"w4": 1, "w8": 2}, {"w4": 0.125}, kept)
    assert len(steps) == 2 * len(plans)  # one prefill and one decode step per plan: no measurement
    # This start's build time where it built, the kept one where it did not.
    for plan, build_s in ((plans[0], 0.125), (plans[1], first.cost(plans[1]).build_s)):
        assert later.cost(plan).build_s == pytest.approx(build_s)
        assert replace(later.cost(plan), build_s=0.0) == replace(first.cost(plan), build_s=0.0)
    both = {plans[0]: 1, plans[1]: 1}
    assert later.decode_step_s(both) == pytest.approx(first.decode_step_s(both))  # the shared overhead too


def test_kept_figures_measured_under_load_are_measured_again(tmp_path, caplog):
    """A start under contention kept decode figures several times what the plans take: the next start's
    own first decode steps contradict them, and it measures again and keeps what it measured."""
    engine = engine_with(ROWS + 1)
    plans = [engine.plan("w4"), engine.plan("w8")]
    shapes, kept = dict(engine.linear_shapes), tmp_path / "costs.json"
    measure_costs(engine, plans, engine.tokenizer, CostModel(shapes), {"w4": 1, "w8": 2}, {}, kept)
    honest = json.loads(kept.read_text())
    slowed = json.loads(kept.read_text())
    # Far beyond KEPT_CONTRADICTED: a tiny model's steps take under a millisecond, and a busy test host
    # can make one of them several times slower than the figure measured a moment before.
    slowed["plans"]["w4"]["decode"] = {key: 1000 * value for key, value in slowed["plans"]["w4"]["decode"].items()}
    kept.write_text(json.dumps(slowed))

    steps = []
    step = engine.step
    engine.step = lambda: steps.append(1) or step()
    later = CostModel(shapes)
    with caplog.at_level("WARNING"):
        measure_costs(engine, plans, engine.tokenizer, later, {"w4": 1, "w8": 2}, {}, kept)
    assert len(steps) > 2 * len(plans) and "measuring again" in caplog.text
    again = json.loads(kept.read_text())["plans"]["w4"]["decode"]
    assert again["fixed"] + again["per_unit"] < 100 * sum(honest["plans"]["w4"]["decode"].values())  # not the kept
    assert later.cost(plans[0]).decode_s(1) == pytest.approx(again["fixed"] + again["per_unit"])


def test_unreadable_kept_figures_are_measured_again(tmp_path, caplog):
    engine = engine_with(2)
    plans = [engine.plan("w4")]
    kept = tmp_path / "costs.json"
    kept.write_text("{not json")
    costs = CostModel(dict(engine.linear_shapes))
    with caplog.at_level("WARNING"):
        measure_costs(engine, plans, engine.tokenizer, costs, {"w4": 1}, {}, kept)
    assert "unreadable" in caplog.text and costs.cost(plans[0]).decode_s(1) > 0
    assert json.loads(kept.read_text())["plans"]["w4"]["decode"]["fixed"] == pytest.approx(costs.cost(plans[0]).decode.fixed)


def test_kept_figures_are_per_running_set_size_and_memory_limit():
    """A one-slot or memory-limited warm-up cannot measure rows or plans together: its figures are
    never read by a server without those bounds."""
    cpu = torch.device("cpu")
    name = costs_file("a" * 16, cpu, 16, None)
    assert name == costs_file("a" * 16, cpu, ROWS + 1, None)  # both measure ROWS rows
    assert len({name, costs_file("a" * 16, cpu, 1, None), costs_file("a" * 16, cpu, 16, 150 << 20),
                costs_file("b" * 16, cpu, 16, None)}) == 4
