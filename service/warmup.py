"""Warm-up: build every candidate plan's weights once and measure its cost on this host."""

from __future__ import annotations

import logging
import statistics
import time

from quept_core.generation import Engine, SamplingParams, SequenceRequest
from quept_core.plans import Plan
from service.controller import CostModel, PlanCost

log = logging.getLogger(__name__)

_TEXT = ("The quick brown fox jumps over the lazy dog while the river keeps flowing past the old mill "
         "and the farmers bring their harvest to the market in town. ")
PROMPT_TOKENS = 32
DECODE_STEPS = 6


def warmup_prompt(tokenizer) -> list[int]:
    ids: list[int] = []
    while len(ids) < PROMPT_TOKENS:
        ids += tokenizer(_TEXT, add_special_tokens=False).input_ids
    return ids[:PROMPT_TOKENS]


def _step_times(engine: Engine, plan: Plan, request: SequenceRequest) -> list[float]:
    batch = engine.start_batch([request], plan)
    durations = []
    while not batch.done:
        started = time.perf_counter()
        batch.step()
        durations.append(time.perf_counter() - started)
    return durations


def measure_plan(engine: Engine, plan: Plan, prompt_ids: list[int]) -> PlanCost:
    """Prefill seconds per token and the median decode step of one short greedy sequence.

    A first, untimed run builds the plan's packed weights and warms the kernels.
    """
    request = SequenceRequest(prompt_ids, SamplingParams(max_new_tokens=DECODE_STEPS + 1))
    _step_times(engine, plan, request)
    durations = _step_times(engine, plan, request)
    return PlanCost(durations[0] / len(prompt_ids), statistics.median(durations[1:] or durations))


def measure_costs(engine: Engine, plans: list[Plan], tokenizer, costs: CostModel) -> None:
    prompt_ids = warmup_prompt(tokenizer)
    for plan in plans:
        cost = measure_plan(engine, plan, prompt_ids)
        costs.record(plan.name, cost)
        log.info("measured plan cost", extra={"plan": plan.name,
                                              "prefill_tokens_per_s": round(1 / cost.prefill_s_per_token, 1),
                                              "decode_tokens_per_s": round(1 / cost.decode_s_per_step, 1)})
