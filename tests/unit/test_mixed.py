"""The bit allocator: one width per decoder block, exact against brute force, within budget, and a monotone
front."""

import itertools
import math

import numpy as np
import pytest

from quept_core.config import BitConfig
from quept_core.planning import allocator as mixed
from quept_core.planning.allocator import (
    Allocator,
    backtrack,
    block_index,
    knapsack,
    pareto_front,
    resolve_mixed,
)
from quept_core.planning.bits import storage_bits
from quept_core.planning.sensitivity import SensitivityTable
from quept_core.precision import PrecisionError

BIT_CONFIG = BitConfig()


def toy_table(seed: int = 0, layers: int = 6, per_block: int = 1) -> SensitivityTable:
    """`layers` linears, `per_block` of them in each decoder block."""
    rng = np.random.default_rng(seed)
    shapes = [(64, 64), (32, 64), (64, 128), (128, 64), (64, 64), (96, 128)][:layers]
    names = tuple(f"model.layers.{i // per_block}.l{i}" for i in range(layers))
    bits = BIT_CONFIG.bits
    # Sensitivity falls roughly 4x per extra bit, with per-layer scale and noise.
    values = np.array([[rng.uniform(0.5, 5) * 4.0 ** -(b - 3) * rng.uniform(0.7, 1.3) for b in bits]
                       for _ in names])
    return SensitivityTable("proxy", bits, names, values, dict(zip(names, shapes, strict=True)))


def brute_force(values, costs, capacity):
    best = (np.inf, None)
    for picks in itertools.product(range(values.shape[1]), repeat=values.shape[0]):
        rows = np.arange(len(picks))
        if costs[rows, picks].sum() <= capacity:
            best = min(best, (values[rows, picks].sum(), picks))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knapsack_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, 10, (5, 3))
    costs = rng.integers(1, 9, (5, 3))
    best, choice = knapsack(values, costs, capacity=40)
    reachable = [capacity for capacity in range(41) if np.isfinite(best[capacity])]
    all_picks = backtrack(choice, costs, np.array(reachable))  # every capacity in one pass
    for capacity in range(41):
        expected, _ = brute_force(values, costs, capacity)
        assert best[capacity] == pytest.approx(expected)
        if np.isfinite(expected):
            picks = all_picks[reachable.index(capacity)]
            rows = np.arange(5)
            assert costs[rows, picks].sum() <= capacity
            assert values[rows, picks].sum() == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 3])
def test_allocator_plan_is_the_brute_force_optimum_within_budget(seed):
    table = toy_table(seed, layers=4)
    allocator = Allocator(table, BIT_CONFIG)
    costs = mixed.cost_bits(table, BIT_CONFIG)
    total = sum(o * i for o, i in table.shapes.values())
    for target in (3.5, 4.2, 5.0, 6.6, 7.9):
        point = allocator.point(target)
        expected, _ = brute_force(table.values, costs, target * total)
        assert point.sensitivity == pytest.approx(expected)
        assert point.storage_bits <= target
        assert point.storage_bits == pytest.approx(storage_bits(point.plan, table.shapes, BIT_CONFIG))


@pytest.mark.parametrize("seed", [0, 3])
def test_every_linear_of_a_block_gets_the_blocks_width_the_brute_force_optimum_over_blocks(seed):
    table = toy_table(seed, layers=6, per_block=2)
    allocator = Allocator(table, BIT_CONFIG)
    costs = mixed.cost_bits(table, BIT_CONFIG)
    total = sum(o * i for o, i in table.shapes.values())
    # Brute force over one width per block: the block's rows summed.
    block_values = table.values.reshape(3, 2, -1).sum(1)
    block_costs = costs.reshape(3, 2, -1).sum(1)
    for target in (3.6, 4.4, 5.3, 6.6, 7.5):
        point = allocator.point(target)
        widths = list(point.plan.layer_bits.values())
        assert widths[0::2] == widths[1::2]  # the two linears of each block
        expected, _ = brute_force(block_values, block_costs, target * total)
        assert point.sensitivity == pytest.approx(expected)
        assert point.storage_bits <= target


def test_blocks_are_numbered_in_the_order_they_first_appear():
    names = ("model.layers.3.a", "model.layers.3.b", "model.layers.0.a", "model.layers.3.c")
    assert block_index(names).tolist() == [0, 0, 1, 0]


def test_coarse_cost_units_still_meet_the_budget(monkeypatch):
    monkeypatch.setattr(mixed, "MAX_UNITS", 500)
    table = toy_table(1)
    allocator = Allocator(table, BIT_CONFIG)
    assert allocator.unit > 1
    for target in np.arange(3.5, 8.0, 0.1):
        assert allocator.point(float(target)).storage_bits <= target + 1e-12


def test_plans_are_kept_per_hundredth_of_a_bit_not_as_the_programme():
    table = toy_table(0)
    allocator = Allocator(table, BIT_CONFIG)
    first, plans = allocator.solve()
    # one linear per block here: a pick per block is a pick per linear
    assert plans.dtype == np.int8 and plans.shape == (math.ceil(allocator.max_bits * 100) - first + 1, len(table.layers))
    # a budget between hundredths gets the plan of the hundredth it is named after
    assert allocator.plan(4.567).name == "mixed:4.57"
    assert allocator.plan(4.567).layer_bits == allocator.plan(4.57).layer_bits != allocator.plan(4.52).layer_bits
    assert allocator.point(4.567).storage_bits <= 4.57


def test_front_is_monotone_and_spaced_by_step():
    table = toy_table(2)
    front = pareto_front(table, BIT_CONFIG, step=0.25)
    targets = [float(p.plan.name.split(":")[1]) for p in front]
    assert np.allclose(np.diff(targets), 0.25)
    assert all(p.storage_bits <= t + 1e-12 for p, t in zip(front, targets, strict=True))
    sensitivities = [p.sensitivity for p in front]
    assert all(later <= earlier for earlier, later in itertools.pairwise(sensitivities))
    assert sensitivities[-1] < sensitivities[0]


def test_resolve_mixed_names_the_plan_and_covers_every_layer():
    table = toy_table(0)
    plan = resolve_mixed(4.5, table, BIT_CONFIG)
    assert plan.name == "mixed:4.50" and plan.mode == "mixed"
    assert set(plan.layer_bits) == set(table.layers)
    assert set(plan.layer_bits.values()) <= set(BIT_CONFIG.bits)


def test_budget_below_the_cheapest_plan_is_refused_with_the_range():
    with pytest.raises(PrecisionError, match=r"mixed:3.00 is below the cheapest plan; allowed .*: 3\.\d\d\.\.8\.\d\d"):
        resolve_mixed(3.0, toy_table(0), BIT_CONFIG)


def test_table_round_trips_through_json_types():
    table = toy_table(0)
    again = SensitivityTable.from_dict(table.to_dict())
    assert again.layers == table.layers and again.shapes == table.shapes
    assert np.array_equal(again.values, table.values)
