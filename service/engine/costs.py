"""The cost model: what a step of the engine costs on this host, now.

A prediction is a relative cost times one host-speed factor, learned at two speeds:

- Relative costs per bit-width, measured once at warm-up (warmup.py) with each uniform plan alone:
  the seconds to build its packs, prefill seconds per prompt (each prompt is its own call) and per
  prompt token, and the decode step as `fixed + per_row x rows` (measured at 1 and
  at a few rows), plus the overhead every step pays whatever its widths (measured once with two plans
  in one running set). The engine runs one kernel call per bit-width present at each linear, so a
  running set's decode step is predicted from the widths its plans use: the shared overhead, each
  width's fixed part times the share of parameters at which some row uses it, and each width's per-row
  part times its rows (weighted by each plan's parameter share at that width). A mixed plan needs no
  measurement of its own: its figures follow from its bit mix.
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

The relative costs are refined slowly (`alpha`) from steps of one uniform plan, normalized by the
host factor at the time. A width not seen in any step for `stale_after_s` seconds of engine work is
stale: its next few steps re-measure it (see the controller module for how it gets them).
"""

from __future__ import annotations

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
from quept_core.runtime.protocol import StepStats

HOST_WINDOW = 9  # observations in the host factor's median: it follows a change within about 5 steps
HOST_MIN_OBSERVATIONS = 3  # before that many, the host is taken to be as fast as at warm-up
EXTRA_WINDOW = 16  # steps in the mean of what steps take beyond their decode (a request's worth of them)
STALE_AFTER_S = 30.0  # seconds of engine work without a step of a width before it is re-measured
REMEASURE_STEPS = 3  # steps of a stale width that re-measure it (a probe's prefill and two decode steps)
REMEASURE_WEIGHT = 0.5  # weight of each of them (three steps: 7/8 of the way to the new figure)
MAX_REMEASURE_FACTOR = 4.0  # a re-measurement moves a figure at most this many times up or down
MAX_REFINE_FACTOR = 2.0  # the same for one slow refinement step, before its weight alpha
PREFILL, DECODE = "prefill", "decode"  # the phases of a step


@dataclass(frozen=True)
class PlanCost:
    """Seconds of one plan alone on an unloaded host (host factor 1)."""

    prefill_s_per_token: float
    decode_s_fixed: float  # a decode step at any number of rows
    decode_s_per_row: float
    prefill_s_per_prompt: float = 0.0  # a prompt's prefill at any length
    build_s: float = 0.0  # building all of the plan's packs (what its first step costs when none is resident)

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_s_per_prompt + self.prefill_s_per_token * tokens

    def decode_s(self, rows: int) -> float:
        return self.decode_s_fixed + self.decode_s_per_row * rows

    def scaled(self, factor: float) -> PlanCost:
        return PlanCost(self.prefill_s_per_token * factor, self.decode_s_fixed * factor, self.decode_s_per_row * factor,
                        self.prefill_s_per_prompt * factor, self.build_s * factor)


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
        self._busy_s = 0.0  # seconds of engine work observed so far: the clock of staleness
        self._last_seen: dict[str, float] = {}
        self._remeasuring: dict[str, int] = {}  # width -> steps of its re-measurement left
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
            self._shared_s = max(0.0, min([seconds, *(c.decode_s_fixed for c in self._widths.values())]))

    # ---- predictions ----------------------------------------------------------------------------

    @property
    def host_factor(self) -> float:
        """Measured over expected seconds now: 1 as at warm-up, 5 on a host five times slower."""
        with self._lock:
            return self._host()

    def cost(self, plan: Plan) -> PlanCost:
        """A plan's figures alone on the host as it is now (a mixed plan's by its bit mix)."""
        with self._lock:
            shares = self._shares_of(plan)
            parts = [(self._widths[label], share) for label, share in shares.items()]
            return PlanCost(sum(c.prefill_s_per_token * s for c, s in parts),
                            sum(c.decode_s_fixed * s for c, s in parts),
                            sum(c.decode_s_per_row * s for c, s in parts),
                            sum(c.prefill_s_per_prompt * s for c, s in parts),
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
            for phase in ratios:
                seconds, plans = measured[phase]
                self._learn(seconds, parts[phase], plans, phase)
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
            # A call computes every row at the longest prompt's length.
            positions = [len(batch) * max(lengths[i] for i in batch)
                         for batch in prefill_batches([(plan, n) for n in lengths])]
            for label, share in self._shares_of(plan).items():
                cost = self._widths[label]
                seconds = sum(cost.prefill_s(tokens) for tokens in positions)
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
            parts[label] = presence * (cost.decode_s_fixed - self._shared_s) + weighted[label] * cost.decode_s_per_row
        return parts, self._shared_s + sum(parts.values())

    def _learn(self, measured_s: float, parts: tuple[dict[str, float], float], plans: Mapping[Plan, object],
               kind: str) -> None:
        by_width, expected = parts
        if expected <= 0:
            return
        remeasured = {label: part for label, part in by_width.items() if label in self._remeasuring and part > 0}
        if not remeasured:
            self._ratios.append(measured_s / expected)
        relative = measured_s / self._host()
        if remeasured:  # what the step did not explain goes to the widths being re-measured
            unexplained = relative - expected
            total = sum(remeasured.values())
            for label, part in remeasured.items():
                wanted = part + unexplained * part / total
                self._scale(label, kind, wanted / part, MAX_REMEASURE_FACTOR, REMEASURE_WEIGHT)
        elif len(plans) == 1 and len(by_width) == 1 and self._settled(measured_s / expected):
            (label,) = by_width  # one uniform plan: the step is its own figure
            self._scale(label, kind, relative / expected, MAX_REFINE_FACTOR, self._alpha)

    def _settled(self, ratio: float) -> bool:
        """Is the host factor near this step's ratio? Far from it, the host is changing faster than the
        window follows, and the step says more about the host than about the width's figure."""
        return 1 / MAX_REFINE_FACTOR <= ratio / self._host() <= MAX_REFINE_FACTOR

    def _scale(self, label: str, kind: str, factor: float, limit: float, weight: float) -> None:
        """Move a width's prefill or decode figures toward `factor` times themselves, in log space."""
        step = math.exp(weight * math.log(min(limit, max(1 / limit, factor))))
        cost, shared = self._widths[label], self._shared_s
        if kind == PREFILL:
            self._widths[label] = replace(cost, prefill_s_per_token=cost.prefill_s_per_token * step,
                                          prefill_s_per_prompt=cost.prefill_s_per_prompt * step)
        else:
            self._widths[label] = replace(cost, decode_s_fixed=shared + (cost.decode_s_fixed - shared) * step,
                                          decode_s_per_row=cost.decode_s_per_row * step)


def _mean(values: deque[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _by_plan(prompts: Sequence[tuple[Plan, int]]) -> dict[Plan, list[int]]:
    by_plan: dict[Plan, list[int]] = {}
    for plan, tokens in prompts:
        by_plan.setdefault(plan, []).append(tokens)
    return by_plan
