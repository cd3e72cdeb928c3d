"""The precision controller: which plan serves a request.

For every candidate plan it predicts `queue wait + prefill + max_new_tokens x decode` (the decode
step is measured on the running set, whatever it holds) and `weight bytes + KV bytes`, then picks the
best-quality plan that meets every budget and is not below `min_precision`. Under queue pressure
("brownout") auto and degradable requests step down to cheaper plans before anything is refused.

A budget no allowed plan meets is refused: with a 422 when no plan would meet it even on an idle
server (the client must change the request), with a 503 + Retry-After when only the current load
puts it out of reach (the client, or a load balancer, should try again or elsewhere).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from quept_core.planning.bits import Shapes
from quept_core.planning.plan import Plan
from quept_core.precision import FP, MIXED_LABEL, uniform_name
from service.errors import ServiceError, invalid, unavailable

MIB = 2**20
# Reasons a request is served by another plan than it asked for (label values of the downgrade metric).
LATENCY = "latency_budget"
MEMORY = "memory_budget"
BROWNOUT = "brownout"
DOWNGRADE_REASONS = (LATENCY, MEMORY, BROWNOUT)
INFEASIBLE = "infeasible_budget"  # error type of a budget no allowed plan can meet
OVERLOADED = "overloaded"  # error type of a latency budget that only the current queue puts out of reach


@dataclass(frozen=True)
class Candidate:
    """A servable plan with what the controller needs to compare it."""

    plan: Plan
    nominal_bits: float  # parameter-weighted bit-width of the codes; 16 for the unquantized reference
    weight_bytes: int  # resident weight bytes while this plan serves
    ppl_delta_pct: float | None = None  # measured perplexity increase over full precision, %; None: unknown


@dataclass(frozen=True)
class PlanCost:
    prefill_s_per_token: float
    decode_s_per_step: float


def bit_shares(plan: Plan, shapes: Shapes) -> dict[str, float]:
    """The share of parameters at each uniform precision name (fp, w2..w8) in a plan."""
    numels = {name: shapes[name][0] * shapes[name][1] for name in plan.layer_bits}
    total = sum(numels.values())
    shares: dict[str, float] = {}
    for name, bits in plan.layer_bits.items():
        label = uniform_name(bits)
        shares[label] = shares.get(label, 0.0) + numels[name] / total
    return shares


class CostModel:
    """Prefill and decode seconds per plan: measured at warm-up, then an EWMA of real requests.

    A plan never measured (a mixed plan) starts from the uniform plans' costs weighted by the
    share of parameters at each bit-width, and learns from its own requests from then on.
    """

    def __init__(self, shapes: Shapes, alpha: float = 0.2):
        self._shapes = dict(shapes)
        self._alpha = alpha
        self._costs: dict[str, PlanCost] = {}
        self._lock = threading.Lock()

    def record(self, plan_name: str, cost: PlanCost) -> None:
        with self._lock:
            self._costs[plan_name] = cost

    def measured(self, plan_name: str) -> PlanCost | None:
        with self._lock:
            return self._costs.get(plan_name)

    def observe_prefill(self, plan: Plan, seconds: float, tokens: int) -> None:
        if tokens > 0:
            self._blend(plan, seconds / tokens, None)

    def observe_decode(self, plan: Plan, seconds_per_step: float) -> None:
        self._blend(plan, None, seconds_per_step)

    def _blend(self, plan: Plan, prefill: float | None, decode: float | None) -> None:
        start = self.cost(plan)
        a = self._alpha
        with self._lock:
            old = self._costs.get(plan.name, start)
            self._costs[plan.name] = PlanCost(
                old.prefill_s_per_token if prefill is None else (1 - a) * old.prefill_s_per_token + a * prefill,
                old.decode_s_per_step if decode is None else (1 - a) * old.decode_s_per_step + a * decode,
            )

    def cost(self, plan: Plan) -> PlanCost:
        known = self.measured(plan.name)
        if known is not None:
            return known
        shares = bit_shares(plan, self._shapes)
        parts = {label: self.measured(label) for label in shares}
        missing = [label for label, cost in parts.items() if cost is None]
        if missing or not shares:
            raise KeyError(f"no measured cost for plan {plan.name} (missing: {', '.join(missing) or 'all'})")
        return PlanCost(
            sum(share * parts[label].prefill_s_per_token for label, share in shares.items()),
            sum(share * parts[label].decode_s_per_step for label, share in shares.items()),
        )


@dataclass(frozen=True)
class Load:
    """What the scheduler knows about the near future when a request arrives."""

    queue_wait_s: float = 0.0
    waiting: int = 0


@dataclass(frozen=True)
class Budget:
    latency_s: float | None = None
    memory_bytes: int | None = None


@dataclass(frozen=True)
class Prediction:
    queue_s: float
    prefill_s: float
    decode_s: float
    weight_bytes: int
    kv_bytes: int

    @property
    def latency_s(self) -> float:
        return self.queue_s + self.prefill_s + self.decode_s

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def work_s(self) -> float:
        """Compute time of the request (no queue)."""
        return self.prefill_s + self.decode_s


@dataclass(frozen=True)
class PlanRequest:
    requested: Candidate | None  # None: auto
    prompt_tokens: int
    max_new_tokens: int
    budget: Budget = Budget()
    floor_bits: float | None = None  # min_precision as average bits
    allow_degrade: bool = True
    sequences: int = 1  # n: each sequence holds its own KV positions


@dataclass(frozen=True)
class Decision:
    candidate: Candidate
    prediction: Prediction
    degraded: bool = False
    reason: str | None = None
    downgraded_from: Plan | None = None  # the plan it would have had without the downgrade

    @property
    def plan(self) -> Plan:
        return self.candidate.plan


class Controller:
    def __init__(self, candidates: list[Candidate], costs: CostModel, kv_bytes_per_token: int,
                 brownout_queue_depth: int):
        if not candidates:
            raise ValueError("the controller needs at least one candidate plan")
        self.candidates = list(candidates)
        self.costs = costs
        self.kv_bytes_per_token = kv_bytes_per_token
        self.brownout_queue_depth = brownout_queue_depth

    def downgrades(self) -> list[tuple[str, str, str]]:
        """Every (from, to, reason) label triple the downgrade metric can count for these candidates: a
        requested fp or mixed plan may step down to any candidate, a candidate to one of no more bits or
        no better measured quality (a superset of what budgets and load will pick)."""
        targets = {c.plan.label for c in self.candidates}
        pairs = {(source, target) for source in (FP.label, MIXED_LABEL) for target in targets}
        pairs |= {(source.plan.label, target.plan.label) for source in self.candidates for target in self.candidates
                  if target.plan != source.plan and _may_replace(target, source)}
        return sorted((source, target, reason) for source, target in pairs for reason in DOWNGRADE_REASONS)

    def predict(self, candidate: Candidate, request: PlanRequest, load: Load) -> Prediction:
        cost = self.costs.cost(candidate.plan)
        return Prediction(
            queue_s=load.queue_wait_s,
            prefill_s=request.prompt_tokens * cost.prefill_s_per_token,
            decode_s=request.max_new_tokens * cost.decode_s_per_step,
            weight_bytes=candidate.weight_bytes,
            kv_bytes=request.sequences * (request.prompt_tokens + request.max_new_tokens) * self.kv_bytes_per_token,
        )

    def decide(self, request: PlanRequest, load: Load) -> Decision:
        pool = [c for c in self.candidates if request.floor_bits is None or c.nominal_bits >= request.floor_bits]
        quality = _quality_key(pool + ([request.requested] if request.requested else []))
        predictions = {c.plan.name: self.predict(c, request, load) for c in pool}

        def meets(prediction: Prediction) -> bool:
            return _violated(prediction, request.budget) is None

        feasible = [c for c in pool if meets(predictions[c.plan.name])]
        requested = request.requested
        if requested is None:
            if not feasible:
                raise self._refusal(request, pool, predictions, load)
            chosen, reason, origin = max(feasible, key=quality), None, None
        else:
            if request.floor_bits is not None and requested.nominal_bits < request.floor_bits:
                raise invalid(f"min_precision: {request.floor_bits:g} average bits is above the requested "
                              f"precision {requested.plan.name}", "min_precision")
            own = self.predict(requested, request, load)
            predictions[requested.plan.name] = own
            violated = _violated(own, request.budget)
            if violated is None:
                chosen, reason, origin = requested, None, None
            elif not request.allow_degrade:
                raise self._refusal(request, pool, predictions, load, requested)
            else:
                cheaper = [c for c in feasible if quality(c) <= quality(requested)]
                if not cheaper:
                    raise self._refusal(request, pool, predictions, load, requested)
                chosen, reason, origin = max(cheaper, key=quality), violated, requested.plan
        if request.allow_degrade:  # brownout: auto included, unless the client refuses any downgrade
            level = load.waiting // self.brownout_queue_depth
            latency, ceiling = predictions[chosen.plan.name].latency_s, quality(chosen)
            cheaper = sorted((c for c in feasible
                              if predictions[c.plan.name].latency_s < latency and quality(c) <= ceiling),
                             key=quality, reverse=True)
            if level > 0 and cheaper:
                origin = origin or chosen.plan
                chosen, reason = cheaper[min(level, len(cheaper)) - 1], BROWNOUT
        return Decision(chosen, predictions[chosen.plan.name], degraded=origin is not None, reason=reason,
                        downgraded_from=origin)

    def _refusal(self, request: PlanRequest, pool: list[Candidate], predictions: dict[str, Prediction],
                 load: Load, requested: Candidate | None = None) -> ServiceError:
        """503 when some allowed plan would meet every budget on an idle server, else the 422."""
        idle = Load()
        allowed = pool if request.allow_degrade or requested is None else [requested]
        if load != idle and any(_violated(self.predict(c, request, idle), request.budget) is None for c in allowed):
            fastest = min(allowed, key=lambda c: predictions[c.plan.name].latency_s)
            return unavailable(OVERLOADED, f"latency_budget_ms {request.budget.latency_s * 1000:g} cannot be met "
                               f"under the current load: the fastest allowed plan, {fastest.plan.name}, is "
                               f"predicted at {_describe(predictions[fastest.plan.name], LATENCY)}",
                               max(1.0, load.queue_wait_s))
        return self._infeasible(request, pool, predictions, requested)

    def _infeasible(self, request: PlanRequest, pool: list[Candidate], predictions: dict[str, Prediction],
                    requested: Candidate | None = None) -> ServiceError:
        field = _violated(predictions[requested.plan.name], request.budget) if requested else None
        if field is None:
            field = LATENCY if not any(_meets_latency(predictions[c.plan.name], request.budget) for c in pool) \
                else MEMORY
        param = "latency_budget_ms" if field == LATENCY else "memory_budget_mb"
        given = request.budget.latency_s * 1000 if field == LATENCY else request.budget.memory_bytes / MIB
        head = f"{param} {given:g} cannot be met"
        if requested is not None:
            head += (f" by {requested.plan.name} ({_describe(predictions[requested.plan.name], field)})"
                     + ("" if request.allow_degrade else " and allow_degrade is false"))
        if not pool:
            return _infeasible_error(f"{head}; no plan is at or above min_precision", param)
        if field == LATENCY:
            best = min(pool, key=lambda c: predictions[c.plan.name].latency_s)
            tail = f"the fastest plan, {best.plan.name}, is predicted at {_describe(predictions[best.plan.name], LATENCY)}"
        else:
            best = min(pool, key=lambda c: predictions[c.plan.name].memory_bytes)
            tail = f"the smallest plan, {best.plan.name}, needs {_describe(predictions[best.plan.name], MEMORY)}"
        return _infeasible_error(f"{head}: {tail}", param)


def _infeasible_error(message: str, param: str) -> ServiceError:
    return ServiceError(422, INFEASIBLE, message, param)


def _meets_latency(prediction: Prediction, budget: Budget) -> bool:
    return budget.latency_s is None or prediction.latency_s <= budget.latency_s


def _violated(prediction: Prediction, budget: Budget) -> str | None:
    if not _meets_latency(prediction, budget):
        return LATENCY
    if budget.memory_bytes is not None and prediction.memory_bytes > budget.memory_bytes:
        return MEMORY
    return None


def _describe(prediction: Prediction, field: str) -> str:
    if field == LATENCY:
        return (f"{prediction.latency_s * 1000:.0f} ms (queue {prediction.queue_s * 1000:.0f} ms, prefill "
                f"{prediction.prefill_s * 1000:.0f} ms, decode {prediction.decode_s * 1000:.0f} ms)")
    return (f"{prediction.memory_bytes / MIB:.1f} MiB (weights {prediction.weight_bytes / MIB:.1f} MiB, "
            f"KV cache {prediction.kv_bytes / MIB:.1f} MiB)")


def _may_replace(target: Candidate, source: Candidate) -> bool:
    """Could `target` serve in place of `source` as a downgrade, by either quality key of `_quality_key`?"""
    measured = target.ppl_delta_pct is not None and source.ppl_delta_pct is not None
    return target.nominal_bits <= source.nominal_bits or (measured and target.ppl_delta_pct >= source.ppl_delta_pct)


def _quality_key(candidates: list[Candidate]):
    """Higher is better: minus the perplexity delta when every plan has one, else average bits."""
    by_ppl = all(c.ppl_delta_pct is not None for c in candidates)

    def key(candidate: Candidate) -> tuple[float, float]:
        primary = -candidate.ppl_delta_pct if by_ppl else candidate.nominal_bits
        return (primary, candidate.nominal_bits)

    return key
