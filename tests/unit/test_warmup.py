"""Warm-up measures every plan on a real (tiny) engine, whatever the size of its KV pool."""

import pytest
from tiny_llama import tiny_elastic, tiny_loaded

from quept_core.runtime.engine import QueptEngine
from service.engine.warmup import ROWS, measure_plan, measure_shared_overhead, warmup_prompt


def engine_with(max_running: int) -> QueptEngine:
    loaded = tiny_loaded()
    return QueptEngine.from_elastic(loaded, tiny_elastic(loaded), device="cpu", max_running=max_running)


@pytest.mark.parametrize("max_running", [1, 2, ROWS + 1])
def test_warm_up_fits_the_kv_pool_and_leaves_it_free(max_running):
    engine = engine_with(max_running)
    prompt = warmup_prompt(engine.tokenizer)
    plans = [engine.plan("w4"), engine.plan("w8")]
    costs = [measure_plan(engine, plan, prompt) for plan in plans]
    shared = measure_shared_overhead(engine, plans, costs, prompt)
    for cost in costs:
        assert cost.prefill_s_per_token > 0 and cost.prefill_s_per_prompt >= 0 and cost.decode_s(1) > 0
        assert cost.decode_s_per_row >= 0
    if max_running == 1:
        assert all(cost.decode_s_per_row == 0 for cost in costs)  # one slot: never more than one row
        assert shared == 0.0  # two plans cannot run together
    assert engine.free_slots == max_running and engine.running == 0
