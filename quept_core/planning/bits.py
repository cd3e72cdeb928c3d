"""The two bit figures of a plan, each named after what it counts.

- nominal bits: the parameter-weighted mean bit-width of the codes (`w4` is 4.0); a full-precision
  linear counts as `FP_BITS`.
- storage bits (per weight): what the weights occupy, codes plus each group's 16-bit scale and
  8-bit zero-point (`w4` at groups of 64 is 4.375); the unit of a `mixed:<budget>` precision.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from quept_core.config import BitConfig
from quept_core.planning.plan import Plan
from quept_core.quant.grid import storage_bits_per_weight

# What a full-precision weight is counted as: fp16/bf16 storage, the serving format.
FP_BITS = 16.0

Shapes = Mapping[str, tuple[int, int]]  # linear name -> (out_features, in_features)


def linear_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    return {name: tuple(model.get_submodule(name).weight.shape) for name in names}


def layer_storage_bits(bits: int | None, in_features: int, bit_config: BitConfig) -> float:
    """Storage bits per weight of one linear at `bits` (None: full precision)."""
    if bits is None:
        return FP_BITS
    return storage_bits_per_weight(bits, bit_config.group_size_for(bits), in_features)


def _weighted_mean(plan: Plan, shapes: Shapes, per_layer) -> float:
    if not plan.layer_bits:
        return FP_BITS
    total = sum(shapes[name][0] * shapes[name][1] for name in plan.layer_bits)
    return sum(per_layer(name, bits) * shapes[name][0] * shapes[name][1]
               for name, bits in plan.layer_bits.items()) / total


def nominal_bits(plan: Plan, shapes: Shapes) -> float:
    """Parameter-weighted mean bit-width of the plan's linears (`FP_BITS` for full precision)."""
    return _weighted_mean(plan, shapes, lambda name, bits: FP_BITS if bits is None else bits)


def storage_bits(plan: Plan, shapes: Shapes, bit_config: BitConfig) -> float:
    """Parameter-weighted storage bits per weight of the plan's linears, scales and zero-points included."""
    return _weighted_mean(plan, shapes, lambda name, bits: layer_storage_bits(bits, shapes[name][1], bit_config))
