"""Storage cost of a plan: bits per weight over the quantized linears, scales and zero-points included."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from quept_core.bitconfig import BitConfig
from quept_core.plans import Plan
from quept_core.quantizer import storage_bits_per_weight

# What a full-precision weight is counted as: fp16/bf16 storage, the serving format.
FP_BITS = 16.0

Shapes = Mapping[str, tuple[int, int]]  # linear name -> (out_features, in_features)


def linear_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    return {name: tuple(model.get_submodule(name).weight.shape) for name in names}


def layer_bits_per_weight(bits: int | None, in_features: int, bit_config: BitConfig) -> float:
    if bits is None:
        return FP_BITS
    return storage_bits_per_weight(bits, bit_config.group_size_for(bits), in_features)


def plan_bits_per_weight(plan: Plan, shapes: Shapes, bit_config: BitConfig) -> float:
    """Parameter-weighted storage bits per weight of the plan's linears (an fp plan counts 16)."""
    if not plan.layer_bits:
        return FP_BITS
    total_bits = 0.0
    total_weights = 0
    for name, bits in plan.layer_bits.items():
        out_features, in_features = shapes[name]
        total_bits += layer_bits_per_weight(bits, in_features, bit_config) * out_features * in_features
        total_weights += out_features * in_features
    return total_bits / total_weights
