"""Warm-up: build the packed weights of every uniform plan and measure its relative cost on this host.

Each uniform plan runs alone: its prefill at two prompt lengths (`per_prompt + per_token x tokens`),
and its decode step at 1 and at `ROWS` rows (`fixed + per_row x rows`), fewer when the KV pool holds
fewer sequences. Then the two plans with the fewest weight bytes run together once, for the
overhead every step pays whatever its widths. Mixed plans need no run of their own: the cost model
derives them from their bit mix.

The figures are relative costs: the cost model scales them by how fast the host is now. So they are
measured once per artifact and machine (CPU or GPU, thread count, torch and kernels) and kept in the
QuEPT cache with the seconds each plan's packs took to build; a later start reads them (build times
measured again where it builds) and only runs each resident plan once, for what first calls cost.
Delete the file to measure again (for instance after a start under heavy load).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import torch

from quept_core.io.atomic import write_json_atomic
from quept_core.io.paths import cache_dir
from quept_core.planning.plan import Plan
from quept_core.runtime.kernels.choices import machine_digest
from quept_core.runtime.packcache import MemoryLimitError
from quept_core.runtime.protocol import Engine, SamplingParams, SequenceRequest, StepStats
from service.engine.costs import CostModel, PlanCost

log = logging.getLogger(__name__)

_TEXT = ("The quick brown fox jumps over the lazy dog while the river keeps flowing past the old mill "
         "and the farmers bring their harvest to the market in town. ")
PROMPT_TOKENS = 16
LONG_PROMPT_TOKENS = 64  # the second prefill length
DECODE_STEPS = 3
ROWS = 4  # the second running-set size of each decode measurement
REPEATS = 3  # timed runs of each measurement; the fastest counts
COSTS_VERSION = 2  # bump when what a plan's figures mean changes (2: the fastest of REPEATS runs, not one)


def warmup_prompt(tokenizer, tokens: int = PROMPT_TOKENS) -> list[int]:
    ids: list[int] = []
    while len(ids) < tokens:
        ids += tokenizer(_TEXT, add_special_tokens=False).input_ids
    return ids[:tokens]


def _run(engine: Engine, requests: list[tuple[SequenceRequest, int]]) -> list[StepStats]:
    """Greedy sequences (request, n) on an otherwise idle engine, to their end; the figures of each step."""
    ids = [seq_id for request, n in requests for seq_id in engine.add(request, n)]
    stats = []
    try:
        while engine.running:
            engine.step()
            stats.append(engine.last_step)
    finally:
        for seq_id in ids:
            engine.abort(seq_id)
    return stats


def _decode_s(runs: list[list[StepStats]]) -> float:
    return min(s.decode_s for stats in runs for s in stats if s.decode_rows > 0)


def _prefill_s(runs: list[list[StepStats]]) -> float:
    return min(s.prefill_s for stats in runs for s in stats if s.prefill_tokens > 0)


def measure_plan(engine: Engine, plan: Plan, prompt_ids: list[int]) -> PlanCost:
    """Prefill seconds of `prompt_ids` and of a prompt `LONG_PROMPT_TOKENS` long (it repeats them), and
    the decode step at 1 and at up to `ROWS` rows of short greedy runs.

    Each figure is the fastest of `REPEATS` runs (of their steps, for decode): whatever else runs on
    the host only adds time, and figures measured during a burst of it would be kept for later starts.
    The plan's packs are built and its kernels run once before the timed runs: first calls pay
    one-off costs that real requests do not see.
    """
    def runs(new_tokens: int, prompt: list[int] = prompt_ids, n: int = 1) -> list[list[StepStats]]:
        request = SequenceRequest(prompt, plan, SamplingParams(max_new_tokens=new_tokens))
        return [_run(engine, [(request, n)]) for _ in range(REPEATS)]

    rows = min(ROWS, engine.free_slots)
    long_prompt = (prompt_ids * -(-LONG_PROMPT_TOKENS // len(prompt_ids)))[:LONG_PROMPT_TOKENS]
    _first_calls(engine, plan, prompt_ids)
    _run(engine, [(SequenceRequest(long_prompt, plan, SamplingParams(max_new_tokens=1)), 1)])
    one = runs(DECODE_STEPS + 1)
    short, long = len(prompt_ids), len(long_prompt)
    short_s, long_s = _prefill_s(one), _prefill_s(runs(1, long_prompt))
    per_token = max(0.0, (long_s - short_s) / (long - short)) or short_s / short
    per_prompt = max(0.0, short_s - per_token * short)
    alone = _decode_s(one)
    per_row = 0.0  # a one-slot pool never steps more than one row
    if rows > 1:
        per_row = max(0.0, (_decode_s(runs(DECODE_STEPS + 1, n=rows)) - alone) / (rows - 1))
    return PlanCost(per_token, max(alone - per_row, 0.0), per_row, per_prompt)


def measure_shared_overhead(engine: Engine, plans: list[Plan], costs: list[PlanCost], prompt_ids: list[int]) -> float:
    """What two plans in one step cost less than apart: the part of a step that no width adds.
    0 when the two do not fit the memory limit or the KV pool together."""
    if engine.free_slots < len(plans):
        return 0.0
    sampling = SamplingParams(max_new_tokens=DECODE_STEPS + 1)
    try:
        together = _decode_s([_run(engine, [(SequenceRequest(prompt_ids, plan, sampling), 1) for plan in plans])
                              for _ in range(REPEATS)])
    except MemoryLimitError:
        return 0.0
    return sum(cost.decode_s(1) for cost in costs) - together


def costs_file(artifact_id: str, device: torch.device, slots: int, memory_limit_bytes: int | None) -> Path:
    """Where the figures of an artifact on this machine, device and thread count are kept. The KV
    slots and the memory limit are part of the name: they bound the rows and the plans the warm-up
    can run together."""
    digest = machine_digest(device, artifact_id, f"rows={min(ROWS, slots)}", f"limit={memory_limit_bytes}")
    return cache_dir() / "costs" / f"costs-{digest}.json"


def _read_costs(path: Path, plans: list[Plan]) -> tuple[dict[str, PlanCost], float] | None:
    """The kept figures of every plan in `plans` and the shared overhead, or None (then they are measured)."""
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text())
        if kept["version"] != COSTS_VERSION:
            return None
        return {plan.name: PlanCost(**kept["plans"][plan.name]) for plan in plans}, float(kept["shared_s"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("plan costs at %s unreadable (%s); measuring again", path, error)
        return None


def _first_calls(engine: Engine, plan: Plan, prompt_ids: list[int]) -> None:
    """One short request of `plan`: its packs resident, its decode step built and its kernels called once."""
    _run(engine, [(SequenceRequest(prompt_ids, plan, SamplingParams(max_new_tokens=2)), 1)])


def measure_costs(engine: Engine, plans: list[Plan], tokenizer, costs: CostModel,
                  weight_bytes: Mapping[str, int], build_s: Mapping[str, float], kept: Path | None = None) -> None:
    """Record every uniform plan's figures (with the seconds its packs took to build, `build_s`), then
    the shared overhead from the two smallest plans; read from `kept` when an earlier start wrote them
    there, measured (and written there) otherwise."""
    prompt_ids = warmup_prompt(tokenizer)
    known = _read_costs(kept, plans) if kept is not None else None
    if known is not None:
        figures, shared = known
        for plan in plans:
            if not engine.missing_shares(plan):  # a plan built on first use pays its first calls then
                _first_calls(engine, plan, prompt_ids)
            cost = figures[plan.name]
            costs.record(plan, replace(cost, build_s=build_s.get(plan.name, cost.build_s)))
        costs.record_shared(shared)
        log.info("plan costs read", extra={"file": str(kept)})
        return
    measured = {}
    for plan in plans:
        cost = measured[plan] = replace(measure_plan(engine, plan, prompt_ids), build_s=build_s.get(plan.name, 0.0))
        costs.record(plan, cost)
        log.info("measured plan cost", extra={"plan": plan.name,
                                              "prefill_tokens_per_s": round(1 / cost.prefill_s_per_token, 1),
                                              "prefill_ms_per_prompt": round(cost.prefill_s_per_prompt * 1000, 3),
                                              "decode_tokens_per_s": round(1 / cost.decode_s(1), 1),
                                              "decode_ms_per_row": round(cost.decode_s_per_row * 1000, 3),
                                              "build_s": round(cost.build_s, 3)})
    if len(plans) > 1:
        smallest = sorted(plans, key=lambda p: weight_bytes[p.name])[:2]
        shared = measure_shared_overhead(engine, smallest, [measured[p] for p in smallest], prompt_ids)
        costs.record_shared(shared)
        log.info("measured step overhead", extra={"shared_ms": round(shared * 1000, 3)})
    else:
        shared = 0.0
    if kept is not None:
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(kept, {"version": COSTS_VERSION, "shared_s": shared,
                                     "plans": {plan.name: asdict(cost) for plan, cost in measured.items()}})
        except OSError as error:
            log.warning("plan costs not kept at %s (%s); later starts measure them again", kept, error)
