"""Warm-up: build the packed weights of every uniform plan and measure its cost on this host.

Mixed plans need no run of their own: the cost model starts them from the uniform plans' costs
weighted by their bit mix, and real requests refine that.
"""

from __future__ import annotations

import logging
import statistics

from quept_core.planning.plan import Plan
from quept_core.runtime.protocol import Engine, SamplingParams, SequenceRequest, StepStats
from service.engine.controller import CostModel, PlanCost

log = logging.getLogger(__name__)

_TEXT = ("The quick brown fox jumps over the lazy dog while the river keeps flowing past the old mill "
         "and the farmers bring their harvest to the market in town. ")
PROMPT_TOKENS = 16
DECODE_STEPS = 3


def warmup_prompt(tokenizer) -> list[int]:
    ids: list[int] = []
    while len(ids) < PROMPT_TOKENS:
        ids += tokenizer(_TEXT, add_special_tokens=False).input_ids
    return ids[:PROMPT_TOKENS]


def _run_alone(engine: Engine, plan: Plan, prompt_ids: list[int], new_tokens: int) -> list[StepStats]:
    """One greedy sequence on an otherwise idle engine, to its end; the figures of each step."""
    engine.add(SequenceRequest(prompt_ids, plan, SamplingParams(max_new_tokens=new_tokens)))
    stats = []
    while engine.running:
        engine.step()
        stats.append(engine.last_step)
    return stats


def measure_plan(engine: Engine, plan: Plan, prompt_ids: list[int]) -> PlanCost:
    """Prefill seconds per token and the median decode step of one short greedy sequence.

    The plan's packs are built and its kernels run once before the timed run: first calls pay
    one-off costs that real requests do not see.
    """
    _run_alone(engine, plan, prompt_ids, 2)
    stats = _run_alone(engine, plan, prompt_ids, DECODE_STEPS + 1)
    prefill = next(s for s in stats if s.prefill_tokens > 0)
    decode = [s.decode_s for s in stats if s.decode_rows > 0]
    return PlanCost(prefill.prefill_s / prefill.prefill_tokens, statistics.median(decode))


def measure_costs(engine: Engine, plans: list[Plan], tokenizer, costs: CostModel) -> None:
    prompt_ids = warmup_prompt(tokenizer)
    for plan in plans:
        cost = measure_plan(engine, plan, prompt_ids)
        costs.record(plan.name, cost)
        log.info("measured plan cost", extra={"plan": plan.name,
                                              "prefill_tokens_per_s": round(1 / cost.prefill_s_per_token, 1),
                                              "decode_tokens_per_s": round(1 / cost.decode_s_per_step, 1)})
