"""Mixed precision: the bit allocator over the decoder blocks and its quality/cost front.

Choose b_k for every decoder block k, all its linears at that width, to minimise Σ S_i(b_k) over its
linears subject to Σ cost_i(b_k) ≤ budget_bits × Σ numel_i, where cost_i(b) = numel_i × storage bits
per weight (b bits plus a 16-bit scale and an 8-bit zero-point per group): a multiple-choice knapsack
over blocks, weighted by parameter count (QuEPT A8 fixed). Blocks, not single linears, because
calibration fits each block at one width at a time (block training, MB-ToMe): mixes inside a block are
plans no block was fitted for, and the per-linear sensitivities, which add up errors measured one
linear at a time, misjudged them (docs/benchmarks.md, "Mixed plans per block"). Costs are exact
integers in bits; the dynamic programme runs them in units of their greatest common divisor, so "≤"
holds exactly. One programme answers every budget: budgets come in hundredths of a bit (as
`mixed:<budget>` names them), and the plan of every hundredth is read off the programme once, so its
tables are not kept.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import reduce

import numpy as np

from quept_core.config import BitConfig
from quept_core.layers import block_of, linear_type
from quept_core.planning.bits import layer_storage_bits
from quept_core.planning.plan import Plan
from quept_core.planning.sensitivity import SensitivityTable
from quept_core.precision import Precision, PrecisionError

# Above this many cost units the costs are rounded up to a coarser unit (budgets still hold).
MAX_UNITS = 1 << 18


def cost_bits(table: SensitivityTable, bit_config: BitConfig) -> np.ndarray:
    """Exact storage cost in bits of each (linear, bit-width), int64 [n_layers, n_bits]."""
    costs = np.empty((len(table.layers), len(table.bits)), dtype=np.int64)
    for i, name in enumerate(table.layers):
        out_features, in_features = table.shapes[name]
        for j, b in enumerate(table.bits):
            costs[i, j] = round(layer_storage_bits(b, in_features, bit_config) * out_features * in_features)
    return costs


def knapsack(values: np.ndarray, costs: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiple-choice knapsack, one choice per row, minimising value with total cost ≤ capacity.

    Returns best[c] (the least total value with cost ≤ c, inf if none) for c = 0..capacity and
    the argmin table choice[i, c] used by `backtrack`.
    """
    n_items, n_choices = values.shape
    best = np.zeros(capacity + 1)
    choice = np.zeros((n_items, capacity + 1), dtype=np.int8)
    for i in range(n_items):
        # One pass per choice keeping the running minimum (an argmin over a [choices, capacity] array
        # walks it across rows and takes ten times as long); ties keep the first choice.
        row_best = np.full(capacity + 1, np.inf)
        for j in range(n_choices):
            cost = int(costs[i, j])
            if cost <= capacity:
                option = best[: capacity + 1 - cost] + values[i, j]
                better = option < row_best[cost:]
                row_best[cost:][better] = option[better]
                choice[i, cost:][better] = j
        best = row_best
    return best, choice


def backtrack(choice: np.ndarray, costs: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """The choices of the best plan within each capacity: int [len(capacities), n_items]."""
    capacities = np.array(capacities, dtype=np.int64)
    picks = np.empty((len(capacities), choice.shape[0]), dtype=np.int64)
    for i in range(choice.shape[0] - 1, -1, -1):
        picks[:, i] = choice[i, capacities]
        capacities = capacities - costs[i, picks[:, i]]
    return picks


@dataclass(frozen=True)
class FrontPoint:
    plan: Plan
    storage_bits: float  # storage bits per weight, scales and zero-points included
    sensitivity: float  # Σ S_i(b_i)

    def to_dict(self) -> dict:
        return {
            "name": self.plan.name,
            "budget_bits": self.plan.precision.budget_bits,
            "storage_bits": self.storage_bits,
            "sensitivity": self.sensitivity,
            "layer_bits": dict(self.plan.layer_bits),
        }


def block_index(layers: tuple[str, ...]) -> np.ndarray:
    """Each table row's decoder block, numbered 0.. in the order the blocks first appear."""
    numbers: dict[int, int] = {}
    return np.array([numbers.setdefault(block_of(name), len(numbers)) for name in layers], dtype=np.int64)


def _block_sums(per_linear: np.ndarray, index: np.ndarray) -> np.ndarray:
    sums = np.zeros((int(index.max()) + 1, per_linear.shape[1]), dtype=per_linear.dtype)
    np.add.at(sums, index, per_linear)
    return sums


class Allocator:
    """Best plan for any budget of storage bits per weight, from one sensitivity table."""

    def __init__(self, table: SensitivityTable, bit_config: BitConfig):
        self.table = table
        self.block_index = block_index(table.layers)
        # Per block and bit-width: the summed sensitivity and the exact cost in bits of its linears.
        self.values = _block_sums(table.values, self.block_index)
        self.costs = _block_sums(cost_bits(table, bit_config), self.block_index)
        self.total_weights = sum(table.shapes[name][0] * table.shapes[name][1] for name in table.layers)
        unit = reduce(math.gcd, self.costs.ravel().tolist())
        if int(self.costs.max(axis=1).sum()) // unit > MAX_UNITS:
            unit = -(-int(self.costs.max(axis=1).sum()) // MAX_UNITS)
        self.unit = unit
        self.unit_costs = -(-self.costs // unit)  # rounded up: a plan within budget in units is within it in bits
        self.capacity = int(self.unit_costs.max(axis=1).sum())
        self._plans: tuple[int, np.ndarray] | None = None  # first hundredth with a plan, picks per hundredth
        self._lock = threading.Lock()

    def _capacity(self, hundredths: int) -> int:
        return min(int(hundredths / 100 * self.total_weights) // self.unit, self.capacity)

    def solve(self) -> tuple[int, np.ndarray]:
        """The picks of every budget in hundredths of a bit, from the cheapest plan's to the dearest's, and
        the first such budget; computed on first use (about 20 ms for SmolLM2-135M's 30 blocks)."""
        with self._lock:
            if self._plans is None:
                best, choice = knapsack(self.values, self.unit_costs, self.capacity)
                budgets = range(math.floor(self.min_bits * 100), math.ceil(self.max_bits * 100) + 1)
                capacities = np.array([self._capacity(h) for h in budgets])
                reachable = np.isfinite(best[capacities])
                first = budgets[int(np.argmax(reachable))]
                self._plans = first, backtrack(choice, self.unit_costs, capacities[reachable]).astype(np.int8)
            return self._plans

    @property
    def min_bits(self) -> float:
        """The cheapest plan's storage bits per weight (every block at the lowest bit-width)."""
        return float(self.unit_costs.min(axis=1).sum() * self.unit) / self.total_weights

    @property
    def max_bits(self) -> float:
        return float(self.costs.max(axis=1).sum()) / self.total_weights

    def _picks(self, budget_bits: float) -> np.ndarray:
        hundredths = round(Precision.mixed(budget_bits).budget_bits * 100)  # the budget the plan is named after
        first, plans = self.solve()
        if hundredths < first:
            raise PrecisionError(
                f"{Precision.mixed(budget_bits)} is below the cheapest plan; allowed storage bits per weight "
                f"(scales and zero-points included): {first / 100:.2f}..{self.max_bits:.2f}"
            )
        return plans[min(hundredths - first, len(plans) - 1)]

    def point(self, budget_bits: float) -> FrontPoint:
        picks = self._picks(budget_bits)
        choices = picks[self.block_index]  # every linear takes its block's pick
        layer_bits = {name: self.table.bits[j] for name, j in zip(self.table.layers, choices, strict=True)}
        blocks = np.arange(len(picks))
        return FrontPoint(
            Plan(Precision.mixed(budget_bits), layer_bits),
            float(self.costs[blocks, picks].sum()) / self.total_weights,
            float(self.values[blocks, picks].sum()),
        )

    def plan(self, budget_bits: float) -> Plan:
        return self.point(budget_bits).plan

    def front(self, step: float = 0.25) -> list[FrontPoint]:
        """Best plans every `step` bits per weight from the cheapest plan to the dearest."""
        start = math.ceil(self.min_bits / step - 1e-9) * step
        targets = np.arange(start, self.max_bits + 1e-9, step)
        return [self.point(float(t)) for t in targets]


def resolve_mixed(budget_bits: float, table: SensitivityTable, bit_config: BitConfig) -> Plan:
    """The least-sensitive plan of one width per block within `budget_bits` storage bits per weight,
    named `mixed:<budget>`."""
    return Allocator(table, bit_config).plan(budget_bits)


def pareto_front(table: SensitivityTable, bit_config: BitConfig, step: float = 0.25) -> list[FrontPoint]:
    return Allocator(table, bit_config).front(step)


def bits_by_linear_type(plan: Plan, shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Parameter-weighted mean bit-width per linear type (q_proj, ..., down_proj) of a plan."""
    totals: dict[str, list[float]] = {}
    for name, bits in plan.layer_bits.items():
        kind = linear_type(name)
        numel = shapes[name][0] * shapes[name][1]
        entry = totals.setdefault(kind, [0.0, 0.0])
        entry[0] += (bits or 16) * numel
        entry[1] += numel
    return {kind: weighted / count for kind, (weighted, count) in totals.items()}
