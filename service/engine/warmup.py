"""Warm-up: build the packed weights of every uniform plan and measure its relative cost on this host.

Each uniform plan runs alone: its prefill at four prompt lengths (a line for short prompts and one
for long ones, `PlanCost`), and its decode step at 1 and at `ROWS` rows (`fixed + per_row x rows`),
fewer when the KV pool holds fewer sequences; in rounds across the plans, the fastest of each
measurement counting. Then the two plans with the fewest weight bytes run together, for the
overhead every step pays whatever its widths. Mixed plans need no run of their own: the cost model
derives them from their bit mix.

The figures are relative costs: the cost model scales them by how fast the host is now. So they are
measured once per artifact and machine (CPU or GPU, thread count, torch and kernels) and kept in the
QuEPT cache with the seconds each plan's packs took to build; a later start reads them (build times
measured again where it builds) and only runs each resident plan once, for what first calls cost.
A kept file whose decode figures are several times what the later start's own first decode steps take
was measured while other work held the cores, and is measured again; delete the file to measure again
in any case (a figure measured wrong also converges under traffic, see costs.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from quept_core.io.atomic import write_json_atomic
from quept_core.io.paths import cache_dir
from quept_core.planning.plan import Plan
from quept_core.runtime.kernels.choices import machine_digest
from quept_core.runtime.kernels.formats import PACKED_MAX_TOKENS
from quept_core.runtime.packcache import MemoryLimitError
from quept_core.runtime.protocol import Engine, SamplingParams, SequenceRequest, StepStats
from service.engine.costs import CostModel, Line, PlanCost

log = logging.getLogger(__name__)

_TEXT = ("The quick brown fox jumps over the lazy dog while the river keeps flowing past the old mill "
         "and the farmers bring their harvest to the market in town. ")
PROMPT_TOKENS = 16  # the prompt of the decode measurements and of the first short prefill
# Each prefill line from two lengths: short prompts at PROMPT_TOKENS and PACKED_MAX_TOKENS, long ones at
# two and three times PACKED_MAX_TOKENS.
LONG_PROMPT_TOKENS = (2 * PACKED_MAX_TOKENS, 3 * PACKED_MAX_TOKENS)
DECODE_STEPS = 3
ROWS = 4  # the second running-set size of each decode measurement
REPEATS = 3  # rounds of measurements; the fastest of each counts
COSTS_VERSION = 3  # bump when what a plan's figures mean changes (3: two prefill lines, rounds across plans)
# A kept decode figure this many times what a later start's own first decode step of the plan took was
# measured while something else held the cores: the kept figures are measured again.
KEPT_CONTRADICTED = 3.0


def warmup_prompt(tokenizer, tokens: int = PROMPT_TOKENS) -> list[int]:
    ids: list[int] = []
    while len(ids) < tokens:
        ids += tokenizer.encode(_TEXT, add_special_tokens=False)
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


def _decode_s(stats: list[StepStats]) -> float:
    return min(s.decode_s for s in stats if s.decode_rows > 0)


def _prefill_s(stats: list[StepStats]) -> float:
    return min(s.prefill_s for s in stats if s.prefill_tokens > 0)


def _repeated(prompt_ids: list[int], tokens: int) -> list[int]:
    return (prompt_ids * -(-tokens // len(prompt_ids)))[:tokens]


@dataclass(frozen=True)
class _Timings:
    """One round of a plan's measurements, in seconds."""

    prefill_s: tuple[float, ...]  # a prompt of each of `_lengths` tokens
    decode_s: float  # a step of one row
    rows_decode_s: float  # a step of `rows` rows


def _lengths(prompt_ids: list[int]) -> tuple[int, ...]:
    return (len(prompt_ids), PACKED_MAX_TOKENS, *LONG_PROMPT_TOKENS)


def _measure_round(engine: Engine, plan: Plan, prompt_ids: list[int], rows: int) -> _Timings:
    def run(prompt: list[int], new_tokens: int, n: int = 1) -> list[StepStats]:
        return _run(engine, [(SequenceRequest(prompt, plan, SamplingParams(max_new_tokens=new_tokens)), n)])

    one = run(prompt_ids, DECODE_STEPS + 1)
    prefill = [_prefill_s(one)] + [_prefill_s(run(_repeated(prompt_ids, n), 1)) for n in _lengths(prompt_ids)[1:]]
    rows_decode_s = _decode_s(run(prompt_ids, DECODE_STEPS + 1, n=rows)) if rows > 1 else _decode_s(one)
    return _Timings(tuple(prefill), _decode_s(one), rows_decode_s)


def _line(units: tuple[int, int], seconds: tuple[float, float]) -> Line:
    """The line through two measurements (a slope of at least 0, a fixed part of at least 0)."""
    per_unit = max(0.0, (seconds[1] - seconds[0]) / (units[1] - units[0])) or seconds[0] / units[0]
    return Line(max(0.0, seconds[0] - per_unit * units[0]), per_unit)


def measure_plans(engine: Engine, plans: list[Plan], prompt_ids: list[int]) -> dict[Plan, PlanCost]:
    """Each plan's prefill seconds at the `_lengths` of `prompt_ids` (repeating them), and its decode
    step at 1 and at up to `ROWS` rows of short greedy runs.

    Each figure is the fastest of `REPEATS` rounds, and a round measures every plan once: whatever else
    runs on the host only adds time, and a burst of it then spoils one round of several plans, not
    every run of one (figures measured during one would be kept for later starts). Each plan's packs
    are built and its kernels run once before the timed rounds: first calls pay one-off costs that
    real requests do not see.
    """
    rows = min(ROWS, engine.free_slots)
    lengths = _lengths(prompt_ids)
    for plan in plans:
        _first_calls(engine, plan, prompt_ids)
        _run(engine, [(SequenceRequest(_repeated(prompt_ids, lengths[-1]), plan, SamplingParams(max_new_tokens=1)), 1)])
    rounds: dict[Plan, list[_Timings]] = {plan: [] for plan in plans}
    for _ in range(REPEATS):
        for plan in plans:
            rounds[plan].append(_measure_round(engine, plan, prompt_ids, rows))
    costs = {}
    for plan, timings in rounds.items():
        prefill = [min(t.prefill_s[i] for t in timings) for i in range(len(lengths))]
        alone, at_rows = min(t.decode_s for t in timings), min(t.rows_decode_s for t in timings)
        per_row = max(0.0, (at_rows - alone) / (rows - 1)) if rows > 1 else 0.0  # one slot: never more rows
        costs[plan] = PlanCost(_line(lengths[:2], prefill[:2]), _line(lengths[2:], prefill[2:]),
                               Line(max(alone - per_row, 0.0), per_row))
    return costs


def measure_shared_overhead(engine: Engine, plans: list[Plan], costs: list[PlanCost], prompt_ids: list[int]) -> float:
    """What two plans in one step cost less than apart: the part of a step that no width adds.
    0 when the two do not fit the memory limit or the KV pool together."""
    if engine.free_slots < len(plans):
        return 0.0
    sampling = SamplingParams(max_new_tokens=DECODE_STEPS + 1)
    try:
        together = min(_decode_s(_run(engine, [(SequenceRequest(prompt_ids, plan, sampling), 1) for plan in plans]))
                       for _ in range(REPEATS))
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
        return {plan.name: PlanCost.from_dict(kept["plans"][plan.name]) for plan in plans}, float(kept["shared_s"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("plan costs at %s unreadable (%s); measuring again", path, error)
        return None


def _first_calls(engine: Engine, plan: Plan, prompt_ids: list[int]) -> float:
    """One short request of `plan`: its packs resident, its decode step built and its kernels called once.
    Returns the seconds of its decode step."""
    return _decode_s(_run(engine, [(SequenceRequest(prompt_ids, plan, SamplingParams(max_new_tokens=2)), 1)]))


def _contradicted_by_first_calls(engine: Engine, plans: list[Plan], figures: Mapping[str, PlanCost],
                                 prompt_ids: list[int]) -> dict[str, float]:
    """Run each resident plan's first calls (a plan built on first use pays them then); the plans whose
    kept decode figure is over KEPT_CONTRADICTED times what their first decode step took, with that ratio."""
    slow = {}
    for plan in plans:
        if not engine.missing_shares(plan):
            ratio = figures[plan.name].decode_s(1) / _first_calls(engine, plan, prompt_ids)
            if ratio > KEPT_CONTRADICTED:
                slow[plan.name] = round(ratio, 1)
    return slow


def measure_costs(engine: Engine, plans: list[Plan], tokenizer, costs: CostModel,
                  weight_bytes: Mapping[str, int], build_s: Mapping[str, float], kept: Path | None = None) -> None:
    """Record every uniform plan's figures (with the seconds its packs took to build, `build_s`), then
    the shared overhead from the two smallest plans; read from `kept` when an earlier start wrote them
    there, measured (and written there) otherwise."""
    prompt_ids = warmup_prompt(tokenizer)
    known = _read_costs(kept, plans) if kept is not None else None
    if known is not None:
        figures, shared = known
        slow = _contradicted_by_first_calls(engine, plans, figures, prompt_ids)
        if not slow:
            for plan in plans:
                cost = figures[plan.name]
                costs.record(plan, replace(cost, build_s=build_s.get(plan.name, cost.build_s)))
            costs.record_shared(shared)
            log.info("plan costs read", extra={"file": str(kept)})
            return
        log.warning("kept plan costs are several times what this start's first decode steps took (measured "
                    "under load?); measuring again", extra={"file": str(kept), "kept_over_now": slow})
    measured = {plan: replace(cost, build_s=build_s.get(plan.name, 0.0))
                for plan, cost in measure_plans(engine, plans, prompt_ids).items()}
    for plan, cost in measured.items():
        costs.record(plan, cost)
        log.info("measured plan cost", extra={
            "plan": plan.name, "build_s": round(cost.build_s, 3),
            **{f"prefill_ms_{tokens}_tokens": round(cost.prefill_s(1, tokens) * 1000, 2)
               for tokens in _lengths(prompt_ids)},
            "decode_ms": round(cost.decode_s(1) * 1000, 3), "decode_ms_per_row": round(cost.decode.per_unit * 1000, 3)})
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
