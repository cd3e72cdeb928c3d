"""The cost model: what a step of the engine costs on this host, now.

A prediction is a relative cost times one host-speed factor, learned at two speeds:

- Relative costs per bit-width, measured once at warm-up (warmup.py) with each uniform plan alone:
  the seconds to build its packs, a prefill call as `fixed + per_position x positions` for short
  prompts and for long ones (`PlanCost`), and the decode step as `fixed + per_row x rows`, plus the
  overhead every step pays whatever its widths (measured once with two plans in one running set).
  The engine runs one kernel call per bit-width present at each linear, so a running set's decode
  step is predicted from the widths its plans use: the shared overhead, each width's fixed part
  times the share of parameters at which some row uses it, and each width's per-row part times its
  rows (weighted by each plan's parameter share at that width). A mixed plan needs no measurement of
  its own: its figures follow from its bit mix.
- One host factor, measured over expected seconds of every observed step of every plan (its prefill and
  its decode count as one observation each), the median of the latest few: a busy host slows the
  prediction of every plan at once, also of plans not served meanwhile, and one outlier (a page fault,
  a collector pause) moves nothing.

- What a step takes beyond its modelled decode (the prompts that join it, layout switches, the
  server's own work between steps): the mean over the latest steps of their wall time beyond their
  decode prediction. Under load a request's decode steps take the decode plus this. Apart from it,
  for the step in flight and a request's first step: the layout rebuild a step makes after sequences
  joined or left the running set (the mean of the latest rebuilds), and what a step takes beyond its
  modelled prefill, decode and rebuild (the routing of tokens, the server's own work). All three are
  kept relative to the host factor: a busy host lengthens them at once, and once it is quiet again
  the steps it slowed do not keep the predictions long.

The relative costs are refined slowly (`alpha`) from observations of one width alone (each prefill
call of a uniform plan, as the engine reports its calls, and a decode step of one), against the host
factor of the steps around each: an observation teaches once the steps after it ran, so a host that
slows or recovers at once teaches no width that it is slow or fast, and one more than
MAX_REFINE_FACTOR off teaches nothing (under a CPU hog single steps stall for several times their
time, and every such stall would raise the figures a little). A width whose own observations took
more than MAX_REFINE_FACTOR times its figure, or less than its inverse, against both the host factor
and the widths' recent observations alone, CONTRADICTIONS times in a row is contradicted (warm-up
measured it during a burst of other work, and the figures are kept for later starts): its figure is
set to what they measured. A width not seen in any step for `stale_after_s` seconds of engine work
is stale: its next few steps re-measure it, in whatever running set they run (see the controller
module for how it gets them).
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from quept_core.planning.bits import Shapes
from quept_core.planning.plan import Plan
from quept_core.precision import FP, uniform_name
from quept_core.runtime.engine import prefill_batches
from quept_core.runtime.kernels.formats import PACKED_MAX_TOKENS
from quept_core.runtime.protocol import PrefillCall, StepStats

HOST_WINDOW = 9  # observations in the host factor's median: it follows a change within about 5 steps
HOST_MIN_OBSERVATIONS = 3  # before that many, the host is taken to be as fast as at warm-up
EXTRA_WINDOW = 48  # steps in the mean of what steps take beyond their decode: three requests' worth (a few slow ones move it little)
STALE_AFTER_S = 30.0  # seconds of engine work without a step of a width before it is re-measured
REMEASURE_STEPS = 3  # steps of a stale width that re-measure it (a probe's prefill and two decode steps)
REMEASURE_WEIGHT = 0.5  # weight of each of them (three steps: 7/8 of the way to the new figure)
MAX_REMEASURE_FACTOR = 4.0  # a re-measurement step or a correction moves a figure at most this many times up or down
MAX_REFINE_FACTOR = 2.0  # an observation further from its figure than this refines nothing
LEARN_DELAY = HOST_WINDOW // 2  # observations after a step before it refines a figure: the host factor is centred on it
CONTRADICTIONS = 3  # observations in a row of a width alone beyond MAX_REFINE_FACTOR of its figure: corrected
PREFILL, DECODE = "prefill", "decode"  # the phases of a step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Line:
    """Seconds of a call: `fixed`, plus `per_unit` for each of its units (a prefill's positions, a
    decode step's rows)."""

    fixed: float
    per_unit: float

    def at(self, units: float) -> float:
        return self.fixed + self.per_unit * units

    def scaled(self, factor: float) -> Line:
        return Line(self.fixed * factor, self.per_unit * factor)


@dataclass(frozen=True)
class PlanCost:
    """Seconds of one plan alone on an unloaded host (host factor 1).

    A prefill call computes its prompts padded to the longest; up to PACKED_MAX_TOKENS tokens a prompt
    runs the packed kernels (as decode does), a longer one dequantizes every weight first for a dense
    matmul: two lines, apart where they meet (at 64 tokens the packed kernels took 43-72 ms, the
    dense path 69-84, w3-w8 on a 2-core Zen 4).
    """

    short_prefill: Line  # a prefill call of prompts of up to PACKED_MAX_TOKENS tokens, per position
    long_prefill: Line  # of longer prompts
    decode: Line  # a decode step, per row
    build_s: float = 0.0  # building all of the plan's packs (what its first step costs when none is resident)

    def prefill_s(self, rows: int, longest: int) -> float:
        """Seconds of a prefill call of `rows` prompts, the longest `longest` tokens."""
        line = self.short_prefill if longest <= PACKED_MAX_TOKENS else self.long_prefill
        return line.at(rows * longest)

    def decode_s(self, rows: int) -> float:
        return self.decode.at(rows)

    def scaled(self, factor: float) -> PlanCost:
        return PlanCost(self.short_prefill.scaled(factor), self.long_prefill.scaled(factor),
                        self.decode.scaled(factor), self.build_s * factor)

    @classmethod
    def from_dict(cls, figures: Mapping) -> PlanCost:
        """The inverse of `dataclasses.asdict`."""
        return cls(*(Line(**figures[name]) for name in ("short_prefill", "long_prefill", "decode")),
                   float(figures["build_s"]))


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
    def __init__(self, shapes: Shapes, alpha: float = 0.05, stale_after_s: float = STALE_AFTER_S):
        self._shapes = dict(shapes)
        self._alpha = alpha
        self.stale_after_s = stale_after_s
        self._widths: dict[str, PlanCost] = {}  # relative figures by uniform plan name
        self._plans: dict[str, Plan] = {}  # the uniform plan of each width, for probes
        self._shared_s = 0.0  # decode overhead of every step, part of each width's fixed figure
        self._ratios: deque[float] = deque(maxlen=HOST_WINDOW)
        # Host-relative seconds of steps beyond their modelled decode; of those, beyond the modelled prefill
        # and the layout rebuild too; and the layout rebuilds of the steps that made one.
        self._extras: deque[float] = deque(maxlen=EXTRA_WINDOW)
        self._overheads: deque[float] = deque(maxlen=EXTRA_WINDOW)
        self._rebuilds: deque[float] = deque(maxlen=EXTRA_WINDOW)
        self._rebuilt: deque[float] = deque(maxlen=EXTRA_WINDOW)  # 1 for each recent step that rebuilt, else 0
        self._observed = 0  # observations the host factor has been taken over
        self._pending: deque[_Observed] = deque()  # observations of one width not yet LEARN_DELAY observations old
        self._busy_s = 0.0  # seconds of engine work observed so far: the clock of staleness
        self._last_seen: dict[str, float] = {}
        self._remeasuring: dict[str, int] = {}  # width -> steps of its re-measurement left
        # (phase, width) -> how far its latest observations alone in a row were from its figure, if beyond
        # MAX_REFINE_FACTOR each
        self._contradictions: dict[tuple[str, str], list[float]] = {}
        # (phase, width) -> its latest observation alone: (its place among the observations, its ratio)
        self._latest: dict[tuple[str, str], tuple[int, float]] = {}
        self._shares: dict[Plan, dict[str, float]] = {}
        self._presence: dict[frozenset[Plan], dict[str, float]] = {}
        self._lock = threading.Lock()

    # ---- warm-up --------------------------------------------------------------------------------

    def record(self, plan: Plan, cost: PlanCost) -> None:
        """A uniform plan's figures, measured alone on this host."""
        with self._lock:
            self._widths[plan.name] = cost
            self._plans[plan.name] = plan
            self._last_seen[plan.name] = self._busy_s

    def record_shared(self, seconds: float) -> None:
        """The decode overhead of any step, whatever its widths (kept below every width's fixed figure)."""
        with self._lock:
            self._shared_s = max(0.0, min([seconds, *(c.decode.fixed for c in self._widths.values())]))

    # ---- predictions ----------------------------------------------------------------------------

    @property
    def host_factor(self) -> float:
        """Measured over expected seconds now: 1 as at warm-up, 5 on a host five times slower."""
        with self._lock:
            return self._host()

    def cost(self, plan: Plan) -> PlanCost:
        """A plan's figures alone on the host as it is now (a mixed plan's by its bit mix)."""
        with self._lock:
            parts = [(self._widths[label], share) for label, share in self._shares_of(plan).items()]

            def mix(line: str) -> Line:
                return Line(sum(getattr(c, line).fixed * s for c, s in parts),
                            sum(getattr(c, line).per_unit * s for c, s in parts))

            return PlanCost(mix("short_prefill"), mix("long_prefill"), mix("decode"),
                            sum(c.build_s * s for c, s in parts)).scaled(self._host())

    def prefill_s(self, plan: Plan, tokens: int) -> float:
        """Seconds of one prompt's prefill."""
        return self.prefill_s_of([(plan, tokens)])

    def prefill_s_of(self, prompts: Sequence[tuple[Plan, int]]) -> float:
        """Seconds of the prefill of these prompts (plan, tokens), in one step."""
        with self._lock:
            return self._prefill_parts(_by_plan(prompts))[1] * self._host()

    def build_s(self, missing: Mapping[int | None, float]) -> float:
        """Seconds to build the packs a plan lacks, from the share of its parameters missing per bit-width
        (`Engine.missing_shares`)."""
        with self._lock:
            costs = [(self._widths.get(uniform_name(bits)), share) for bits, share in missing.items()]
            return sum(cost.build_s * share for cost, share in costs if cost is not None) * self._host()

    def decode_step_s(self, rows: Mapping[Plan, int]) -> float:
        """Seconds of one decode step of a running set with these rows per plan."""
        with self._lock:
            return self._decode_parts(rows)[1] * self._host()

    def step_period_s(self, rows: Mapping[Plan, int], under_load: bool = True) -> float:
        """Wall seconds of one step of the server's loop with these decode rows, under the recent load
        (`under_load=False`: the decode step alone, as on an otherwise idle server)."""
        with self._lock:
            # The mean, not the median: the steps that carry a burst of prompts are few and long, and a
            # request's decode pays for all of them.
            extra = _mean(self._extras) if under_load else 0.0
            return (self._decode_parts(rows)[1] + extra) * self._host()

    def pass_s(self, prompts: Sequence[tuple[Plan, int]], rows: Mapping[Plan, int], rebuilds: bool | None) -> float:
        """Wall seconds of one step of the server's loop that prefills these prompts (plan, tokens),
        decodes these rows and, if `rebuilds`, first rebuilds the layout of a changed running set (None:
        not known yet, as often as recent steps did): their modelled seconds, the recent overhead of a
        step and of a rebuild, on the host as it is now."""
        with self._lock:
            prefill = self._prefill_parts(_by_plan(prompts))[1]
            decode = self._decode_parts(rows)[1]
            share = _mean(self._rebuilt) if rebuilds is None else float(rebuilds)
            return (prefill + decode + _mean(self._overheads) + share * _mean(self._rebuilds)) * self._host()

    # ---- observations (the engine's thread) -----------------------------------------------------

    def observe_period(self, seconds: float, stats: StepStats, prompts: Mapping[Plan, Sequence[int]],
                       decode_rows: Mapping[Plan, int]) -> None:
        """The wall time of one pass of the server's loop that made the step `stats` measured, which
        prefilled these prompt lengths and decoded these rows (the routing of its tokens and the server's
        work between steps included)."""
        rows = {p: r for p, r in decode_rows.items() if r > 0}
        if not rows or stats.setup_s > 0:  # a step that set plans up says nothing of what steps take
            return
        rebuild_s = stats.layout_s
        with self._lock:
            try:
                decode = self._decode_parts(rows)[1]
                prefill = self._prefill_parts({p: lengths for p, lengths in prompts.items() if lengths})[1]
            except KeyError:
                return
            host = self._host()
            self._extras.append(max(0.0, seconds / host - decode))
            self._overheads.append(max(0.0, seconds / host - decode - prefill - rebuild_s / host))
            self._rebuilt.append(float(rebuild_s > 0))
            if rebuild_s > 0:
                self._rebuilds.append(rebuild_s / host)

    def observe(self, stats: StepStats, prompts: Mapping[Plan, Sequence[int]], decode_rows: Mapping[Plan, int],
                learn: bool = True) -> dict[str, float]:
        """One engine step: the lengths of the prompts it prefilled and its decode rows per plan, and what
        it measured. Returns the measured over modelled seconds (at host factor 1) of each phase it could
        model, by PREFILL and DECODE. `learn=False`: a step run differently on purpose (on other CPU
        threads) keeps the clock of staleness and teaches nothing."""
        with self._lock:
            seen_at = self._busy_s
            self._busy_s += stats.prefill_s + stats.decode_s + stats.layout_s
            prefill = {p: lengths for p, lengths in prompts.items() if lengths}
            rows = {p: r for p, r in decode_rows.items() if r > 0}
            if stats.decode_rows != sum(rows.values()):
                rows = {}  # the step did not run the set the caller saw: its time says nothing
            try:
                parts = {PREFILL: self._prefill_parts(prefill), DECODE: self._decode_parts(rows)}
            except KeyError:  # a plan of a width never measured: nothing to learn from this step
                return {}
            present = {label for by_width, _ in parts.values() for label in by_width}
            for label in present:
                if self._stale(label, seen_at):
                    self._remeasuring[label] = REMEASURE_STEPS
                self._last_seen[label] = self._busy_s
            if stats.setup_s > 0:  # its time went to one-off work (builds are predicted apart): nothing to learn
                return {}
            measured = {PREFILL: (stats.prefill_s, prefill), DECODE: (stats.decode_s, rows)}
            ratios = {phase: seconds / parts[phase][1] for phase, (seconds, plans) in measured.items()
                      if plans and seconds > 0 and parts[phase][1] > 0}
            if not learn:
                return ratios
            # The observations of one width alone, its figure's own: each prefill call of a uniform plan
            # (plans never share a call), and a decode step of one.
            alone = {PREFILL: self._calls_alone(stats.prefill_calls), DECODE: []}
            if len(parts[DECODE][0]) == 1 and DECODE in ratios:
                alone[DECODE] = [(next(iter(parts[DECODE][0])), ratios[DECODE])]
            for phase in ratios:
                self._learn(measured[phase][0], parts[phase], phase, alone[phase])
            for label in present & self._remeasuring.keys():
                self._remeasuring[label] -= 1
                if self._remeasuring[label] == 0:
                    del self._remeasuring[label]
            return ratios

    def stalest(self, overdue: bool = False) -> Plan | None:
        """The uniform plan of the width unseen for longest, if stale (`overdue`: for 1.5x as long)."""
        limit = self.stale_after_s * (1.5 if overdue else 1.0)
        with self._lock:
            # fp is never probed: `auto` never picks it, and a probe would rebuild the packs serving
            # releases after warm-up.
            probed = [width for width in self._widths if width != FP.name]
            label = min(probed, key=lambda w: self._last_seen[w], default=None)
            if label is None or self._busy_s - self._last_seen[label] <= limit:
                return None
            return self._plans[label]

    # ---- the model (call with the lock held) ----------------------------------------------------

    def _host(self) -> float:
        # As at warm-up until a median can outvote one step: the first steps after a start include
        # first calls of new shapes, and one of them alone must not set the host's speed.
        return statistics.median(self._ratios) if len(self._ratios) >= HOST_MIN_OBSERVATIONS else 1.0

    def _stale(self, label: str, now: float) -> bool:
        return now - self._last_seen.get(label, now) > self.stale_after_s

    def _shares_of(self, plan: Plan) -> dict[str, float]:
        shares = self._shares.get(plan)
        if shares is None:
            shares = bit_shares(plan, self._shapes)
            missing = [label for label in shares if label not in self._widths]
            if missing:
                raise KeyError(f"no measured cost for plan {plan.name} (missing: {', '.join(missing)})")
            if len(self._shares) > 256:  # requests may name any mixed budget: keep the cache bounded
                self._shares.clear()
            self._shares[plan] = shares
        return shares

    def _presence_of(self, plans: frozenset[Plan]) -> dict[str, float]:
        """Share of parameters at which some plan of the set uses each width (one kernel call each)."""
        presence = self._presence.get(plans)
        if presence is None:
            numels = {name: out * inp for name, (out, inp) in self._shapes.items()}
            total = sum(numels[name] for name in next(iter(plans)).layer_bits)
            presence = {}
            for name in next(iter(plans)).layer_bits:
                for label in {uniform_name(plan.layer_bits[name]) for plan in plans}:
                    presence[label] = presence.get(label, 0.0) + numels[name] / total
            if len(self._presence) > 256:
                self._presence.clear()
            self._presence[plans] = presence
        return presence

    def _prefill_parts(self, prompts: Mapping[Plan, Sequence[int]]) -> tuple[dict[str, float], float]:
        """Relative prefill seconds by width of prompts of these lengths, and their sum: in the engine's
        calls (`prefill_batches`), each a fixed part and the positions of its prompts padded to the longest."""
        parts: dict[str, float] = {}
        for plan, lengths in prompts.items():
            calls = [(len(batch), max(lengths[i] for i in batch))
                     for batch in prefill_batches([(plan, n) for n in lengths])]
            for label, share in self._shares_of(plan).items():
                cost = self._widths[label]
                seconds = sum(cost.prefill_s(rows, longest) for rows, longest in calls)
                parts[label] = parts.get(label, 0.0) + share * seconds
        return parts, sum(parts.values())

    def _decode_parts(self, rows: Mapping[Plan, int]) -> tuple[dict[str, float], float]:
        """Relative decode seconds of one step by width (the shared overhead apart), and the total."""
        if not rows:
            return {}, 0.0
        weighted: dict[str, float] = {}
        for plan, count in rows.items():
            for label, share in self._shares_of(plan).items():
                weighted[label] = weighted.get(label, 0.0) + count * share
        parts = {}
        for label, presence in self._presence_of(frozenset(rows)).items():
            cost = self._widths[label]
            parts[label] = presence * (cost.decode.fixed - self._shared_s) + weighted[label] * cost.decode.per_unit
        return parts, self._shared_s + sum(parts.values())

    def _calls_alone(self, calls: Sequence[PrefillCall]) -> list[tuple[str, float]]:
        """(width, measured over modelled seconds) of each prefill call of a uniform plan."""
        alone = []
        for call in calls:
            shares = self._shares_of(call.plan)
            if len(shares) == 1 and call.seconds > 0:
                (label,) = shares
                alone.append((label, call.seconds / self._widths[label].prefill_s(call.rows, call.longest)))
        return alone

    def _learn(self, measured_s: float, parts: tuple[dict[str, float], float], kind: str,
               alone: list[tuple[str, float]]) -> None:
        """Learn from one phase of a step and the observations of one width alone in it (width, measured
        over modelled seconds)."""
        by_width, expected = parts
        if expected <= 0:
            return
        remeasured = {label: part for label, part in by_width.items() if label in self._remeasuring and part > 0}
        if remeasured:  # what the step did not explain goes to the widths being re-measured
            unexplained = measured_s / self._host() - expected
            total = sum(remeasured.values())
            for label, part in remeasured.items():
                wanted = part + unexplained * part / total
                self._scale(label, kind, REMEASURE_WEIGHT * _log_clipped(wanted / part, MAX_REMEASURE_FACTOR))
            return
        # Where widths share a step, how much each took is not measured: only observations of one alone teach.
        if len(self._ratios) >= HOST_MIN_OBSERVATIONS:
            self._pending.extend(_Observed(self._observed, label, kind, ratio) for label, ratio in alone)
        self._ratios.append(measured_s / expected)
        self._observed += 1
        while self._pending and self._observed - self._pending[0].index > LEARN_DELAY:
            self._refine(self._pending.popleft())

    def _refine(self, step: _Observed) -> None:
        """Refine a width's figures from an observation of it alone, LEARN_DELAY observations old, against
        the host factor now: the median of the steps around it. The CONTRADICTIONS-th in a row beyond
        MAX_REFINE_FACTOR of the width's figure sets the figure to what they measured."""
        host_error = step.ratio / self._host()
        if not _beyond(host_error, MAX_REFINE_FACTOR):  # further off: a stall (the tail of a busy host), or a contradiction
            self._scale(step.label, step.kind, self._alpha * math.log(host_error))
        # Beyond the factor both against the host factor (not when the host just changed) and against
        # the median of the widths' recent observations alone: a width wrong in most steps drags the
        # host factor with it, and every other width would look wrong against that alone.
        self._latest[step.kind, step.label] = (step.index, step.ratio)
        recent = [ratio for (kind, _), (index, ratio) in self._latest.items()
                  if kind == step.kind and step.index - index <= HOST_WINDOW]
        error = step.ratio / statistics.median(recent) if len(recent) >= 3 else host_error
        errors = self._contradictions.setdefault((step.kind, step.label), [])
        if not all(_beyond(e, MAX_REFINE_FACTOR) and (e > 1) == (error > 1) for e in (host_error, error)):
            errors.clear()
            return
        errors.append(error)
        if len(errors) < CONTRADICTIONS:
            return
        correction = statistics.median(errors)
        errors.clear()
        self._scale(step.label, step.kind, _log_clipped(correction, MAX_REMEASURE_FACTOR))
        log.info("plan cost contradicted by its own steps: corrected",
                 extra={"width": step.label, "phase": step.kind, "measured_over_figure": round(correction, 2)})

    def _scale(self, label: str, kind: str, log_step: float) -> None:
        """Multiply a width's prefill or decode figures by exp(log_step)."""
        step = math.exp(log_step)
        cost, shared = self._widths[label], self._shared_s
        if kind == PREFILL:
            self._widths[label] = replace(cost, short_prefill=cost.short_prefill.scaled(step),
                                          long_prefill=cost.long_prefill.scaled(step))
        else:
            decode = Line(shared + (cost.decode.fixed - shared) * step, cost.decode.per_unit * step)
            self._widths[label] = replace(cost, decode=decode)


def _beyond(factor: float, limit: float) -> bool:
    return not 1 / limit <= factor <= limit


def _log_clipped(factor: float, limit: float) -> float:
    return math.log(min(limit, max(1 / limit, factor)))


@dataclass(frozen=True)
class _Observed:
    """An observation of one width alone, kept until the host factor around it is known."""

    index: int  # its place in the sequence of observations the host factor is taken over
    label: str  # its one width
    kind: str  # PREFILL or DECODE
    ratio: float  # measured over modelled seconds at host factor 1


def _mean(values: deque[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _by_plan(prompts: Sequence[tuple[Plan, int]]) -> dict[Plan, list[int]]:
    by_plan: dict[Plan, list[int]] = {}
    for plan, tokens in prompts:
        by_plan.setdefault(plan, []).append(tokens)
    return by_plan
