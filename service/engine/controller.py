"""The precision controller: which plan serves a request.

For every candidate plan it predicts `queue wait + prefill + max_new_tokens x decode step` and
`weight bytes + KV bytes`, then picks the best-quality plan that meets every budget and is not below
`min_precision`; plans of equal quality within their perplexity intervals go to the cheaper one. The
decode step is the step of the running set as it is now with the request's rows added: every step
of a request is a step of the whole set. Under queue pressure ("brownout") auto and degradable
requests step down to cheaper plans, never to more bits, before anything is refused.

A budget no allowed plan meets is refused: with a 422 when no plan would meet it even on an idle
server (the client must change the request), with a 503 + Retry-After when only the current load
puts it out of reach (the client, or a load balancer, should try again or elsewhere).

Predictions come from the cost model (costs.py): relative costs per bit-width from warm-up times one
host factor learned from every step, so a host that slows down or recovers moves the prediction of
every plan within a few steps, also of plans nobody is served with. What the host factor cannot fix
is a wrong relative figure (a width measured during a burst of contention): the plan looks slow, is
never chosen and so never corrects itself. Hence staleness, in the simplest form that bounds it: a
width that took part in no step for 30 s of engine work (an idle server does not age) is stale, and
the scheduler, in its own thread, adds a probe of that width's uniform plan to the running set (a
4-token prompt, 2 new tokens) when a slot is free after the waiting requests were admitted, or ahead
of them once the width has been unseen for 45 s. The probe joins the steps the engine runs anyway:
it costs one slot for three steps and one more kernel call per linear, and its steps re-measure the
width (the time the other plans' figures do not explain is the stale width's). A real request of a
stale width re-measures it the same way. So no plan stays unchosen for more than about a minute of
load because of a stale figure. Whether the host factor moved meanwhile is no condition: a figure
measured wrong at warm-up needs its re-measurement however steady the host has been since.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from quept_core.planning.plan import Plan
from quept_core.precision import FP, MIXED_LABEL
from service.engine.costs import CostModel
from service.errors import ServiceError, invalid, unavailable

MIB = 2**20
# Reasons a request is served by another plan than it asked for (label values of the downgrade metric).
LATENCY = "latency_budget"
MEMORY = "memory_budget"
BROWNOUT = "brownout"
DOWNGRADE_REASONS = (LATENCY, MEMORY, BROWNOUT)
# How auto's choice under a latency budget turned out (label values of the budget-choice metric).
BEST = "best"  # within budget, and no plan of better quality would have been
OVER_BUDGET = "over_budget"
BETTER_FITTED = "better_plan_fitted"  # within budget, but a plan of better quality would have been too
BUDGET_CHOICES = (BEST, OVER_BUDGET, BETTER_FITTED, BROWNOUT)
INFEASIBLE = "infeasible_budget"  # error type of a budget no allowed plan can meet
OVERLOADED = "overloaded"  # error type of a latency budget that only the current queue puts out of reach


@dataclass(frozen=True)
class Candidate:
    """A servable plan with what the controller needs to compare it."""

    plan: Plan
    nominal_bits: float  # parameter-weighted bit-width of the codes; 16 for the unquantized reference
    weight_bytes: int  # resident weight bytes while this plan serves
    ppl_delta_pct: float | None = None  # measured perplexity increase over full precision, %; None: unknown
    # Half-width of the interval on ppl_delta_pct (from its spread over evaluation windows); None: unknown.
    ppl_interval_pct: float | None = None


@dataclass(frozen=True)
class Load:
    """What the scheduler knows about the near future when a request arrives."""

    queue_wait_s: float = 0.0
    waiting: int = 0
    running: Mapping[Plan, int] = field(default_factory=dict)  # rows per plan in the engine's running set
    # The waiting requests that fit beside them: they join at the next step, as (plan, prompt tokens, sequences).
    joining: tuple[tuple[Plan, int, int], ...] = ()
    in_flight_s: float = 0.0  # predicted seconds left of the engine's step in flight (0: idle)
    arriving: float = 0.0  # requests expected to arrive before it ends, that join the next step too
    elapsed_s: float = 0.0  # seconds since the request arrived (reading and planning it so far)


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
    # auto with a latency budget, whose choice is scored when it ends (`budget_choice`): better_latency_s is
    # the lowest predicted latency among the plans of better quality than the chosen one that only the
    # latency budget ruled out (None: no such plan).
    budgeted_auto: bool = False
    better_latency_s: float | None = None

    @property
    def plan(self) -> Plan:
        return self.candidate.plan


class Controller:
    def __init__(self, candidates: list[Candidate], costs: CostModel, kv_bytes_per_token: int,
                 brownout_queue_depth: int,
                 missing_shares: Callable[[Plan], Mapping[int | None, float]] = lambda plan: {}):
        """`missing_shares(plan)`: the share of the plan's parameters whose packs are not resident, per
        bit-width (`Engine.missing_shares`): a request of that plan first waits for them to be built."""
        if not candidates:
            raise ValueError("the controller needs at least one candidate plan")
        self.candidates = list(candidates)
        self.costs = costs
        self.missing_shares = missing_shares
        self.kv_bytes_per_token = kv_bytes_per_token
        self.brownout_queue_depth = brownout_queue_depth

    def downgrades(self) -> list[tuple[str, str, str]]:
        """Every (from, to, reason) label triple the downgrade metric can count for these candidates: a
        requested fp or mixed plan may step down to any candidate, a candidate to one of no more bits (a
        superset of what budgets and load will pick)."""
        targets = {c.plan.label for c in self.candidates}
        pairs = {(source, target) for source in (FP.label, MIXED_LABEL) for target in targets}
        pairs |= {(source.plan.label, target.plan.label) for source in self.candidates for target in self.candidates
                  if target.plan != source.plan and target.nominal_bits <= source.nominal_bits}
        return sorted((source, target, reason) for source, target in pairs for reason in DOWNGRADE_REASONS)

    def predict(self, candidate: Candidate, request: PlanRequest, load: Load, alone: bool = False) -> Prediction:
        """Every decode step of the request is a step of the whole running set, with its rows in it, plus
        what steps under load add (the prompts of others, switches, the server's own work). It waits for
        the step in flight to end (or for a slot, when none is free); the next step builds its packs if
        they are not resident, prefills it and those joining with it, decodes the running set, and gives
        its first token. `alone`: on an idle server that stays idle (without what recent steps took
        beyond their model under load)."""
        plan, running = candidate.plan, load.running
        prompts = [(p, tokens) for p, tokens, _ in (*load.joining, (plan, request.prompt_tokens, 1))]
        rows = dict(running)
        for p, _, sequences in (*load.joining, (plan, request.prompt_tokens, request.sequences)):
            rows[p] = rows.get(p, 0) + sequences
        # Those expected to arrive meanwhile are taken to be like this request.
        arriving = load.arriving * self.costs.prefill_s(plan, request.prompt_tokens)
        return Prediction(
            # A slot frees when a running sequence ends, at the end of a step: the one in flight at the earliest.
            queue_s=load.elapsed_s + max(load.queue_wait_s, load.in_flight_s),
            prefill_s=self.costs.build_s(self.missing_shares(plan)) + self.costs.pass_s(prompts, running, None) + arriving,
            # The prefill gives the first token.
            decode_s=(request.max_new_tokens - 1) * self.costs.step_period_s(rows, under_load=not alone),
            weight_bytes=candidate.weight_bytes,
            kv_bytes=request.sequences * (request.prompt_tokens + request.max_new_tokens) * self.kv_bytes_per_token,
        )

    def decide(self, request: PlanRequest, load: Load) -> Decision:
        pool = [c for c in self.candidates if request.floor_bits is None or c.nominal_bits >= request.floor_bits]
        quality = _Quality(pool + ([request.requested] if request.requested else []))
        predictions = {c.plan.name: self.predict(c, request, load) for c in pool}

        def meets(prediction: Prediction) -> bool:
            return _violated(prediction, request.budget) is None

        feasible = [c for c in pool if meets(predictions[c.plan.name])]
        requested = request.requested
        if requested is None:
            if not feasible:
                raise self._refusal(request, pool, predictions, load)
            chosen, reason, origin = quality.best(feasible, predictions), None, None
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
                cheaper = [c for c in feasible if _may_replace(c, requested, quality)]
                if not cheaper:
                    raise self._refusal(request, pool, predictions, load, requested)
                chosen, reason, origin = quality.best(cheaper, predictions), violated, requested.plan
        if request.allow_degrade:  # brownout: auto included, unless the client refuses any downgrade
            # Queue pressure: the waiting requests the next step cannot admit (a burst that fits the
            # free slots is no pressure: it joins at once).
            level = (load.waiting - len(load.joining)) // self.brownout_queue_depth
            latency = predictions[chosen.plan.name].latency_s
            cheaper = sorted((c for c in feasible
                              if predictions[c.plan.name].latency_s < latency and _may_replace(c, chosen, quality)),
                             key=quality.key, reverse=True)
            if level > 0 and cheaper:
                origin = origin or chosen.plan
                chosen, reason = cheaper[min(level, len(cheaper)) - 1], BROWNOUT
        budgeted_auto, better = requested is None and request.budget.latency_s is not None, None
        if budgeted_auto:
            memory_only = Budget(memory_bytes=request.budget.memory_bytes)
            better = min((predictions[c.plan.name].latency_s for c in pool
                          if quality.key(c) > quality.key(chosen) and not quality.tied(c, chosen)
                          and _violated(predictions[c.plan.name], memory_only) is None), default=None)
        return Decision(chosen, predictions[chosen.plan.name], degraded=origin is not None, reason=reason,
                        downgraded_from=origin, budgeted_auto=budgeted_auto, better_latency_s=better)

    def _refusal(self, request: PlanRequest, pool: list[Candidate], predictions: dict[str, Prediction],
                 load: Load, requested: Candidate | None = None) -> ServiceError:
        """503 when some allowed plan would meet every budget on an idle server, else the 422."""
        allowed = pool if request.allow_degrade or requested is None else [requested]
        if any(_violated(self.predict(c, request, Load(), alone=True), request.budget) is None for c in allowed):
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


def budget_choice(decision: Decision, budget_s: float, measured_s: float, predicted_s: float) -> str:
    """How auto's choice under a latency budget turned out, one of BUDGET_CHOICES. The better plans'
    predictions are scaled by how far the served plan's prediction was off (measured over predicted for
    the tokens it generated): the host and the load they would have met are the ones it met."""
    if measured_s > budget_s:
        return OVER_BUDGET
    if decision.reason == BROWNOUT:
        return BROWNOUT
    if decision.better_latency_s is not None and decision.better_latency_s * measured_s / predicted_s <= budget_s:
        return BETTER_FITTED
    return BEST


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


def _may_replace(target: Candidate, source: Candidate, quality: _Quality) -> bool:
    """May `target` serve in place of `source` as a downgrade? Never with more bits (noisy perplexity or
    costs must not turn a downgrade into w7 -> w8), nor with better quality."""
    return (target.plan != source.plan and target.nominal_bits <= source.nominal_bits
            and (quality.key(target) <= quality.key(source) or quality.tied(target, source)))


class _Quality:
    """Higher is better: minus the perplexity delta when every plan has one, else average bits. Plans whose
    deltas differ by no more than the larger of their two intervals are of equal quality: the cheaper wins."""

    def __init__(self, candidates: list[Candidate]):
        self.by_ppl = all(c.ppl_delta_pct is not None for c in candidates)

    def key(self, candidate: Candidate) -> tuple[float, float]:
        primary = -candidate.ppl_delta_pct if self.by_ppl else candidate.nominal_bits
        return (primary, candidate.nominal_bits)

    def tied(self, a: Candidate, b: Candidate) -> bool:
        if not self.by_ppl:
            return self.key(a) == self.key(b)
        margin = max(a.ppl_interval_pct or 0.0, b.ppl_interval_pct or 0.0)
        return abs(a.ppl_delta_pct - b.ppl_delta_pct) <= margin

    def best(self, pool: list[Candidate], predictions: dict[str, Prediction]) -> Candidate:
        """The best quality, and of the plans tied with it the one with the fewest weight bytes (then the
        lowest predicted compute)."""
        top = max(pool, key=self.key)
        return min((c for c in pool if self.tied(c, top)),
                   key=lambda c: (c.weight_bytes, predictions[c.plan.name].work_s))
