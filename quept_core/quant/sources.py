"""Where a plan's quantized weights come from, and running a model with them materialized once.

A weight source answers `quantized(name, bits)` for one method: QuEPT (the calibrated elastic
linears), RTN (plain round-to-nearest of the float weight) or a precomputed table (GPTQ).
`use_weights` swaps dense copies of those weights into the model for the length of a `with`
block, so evaluating a plan costs one dequantization per linear, not one per forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from quept_core.config import BitConfig
from quept_core.quant.elastic import ElasticLinear
from quept_core.quant.grid import QuantizedWeight, quantize


class WeightSource(Protocol):
    def quantized(self, name: str, bits: int) -> QuantizedWeight:
        """The integer form of linear `name` at `bits`."""


class QueptWeights:
    """Q_b(W + R_tier(b)) from calibrated elastic linears, cached per (linear, bits)."""

    def __init__(self, elastic: Mapping[str, ElasticLinear]):
        self.elastic = elastic
        self._cache: dict[tuple[str, int], QuantizedWeight] = {}

    def quantized(self, name: str, bits: int) -> QuantizedWeight:
        key = (name, bits)
        if key not in self._cache:
            self._cache[key] = self.elastic[name].quantize(bits)
        return self._cache[key]


class RtnWeights:
    """Round-to-nearest of the float weight: the same grid and group size as QuEPT, no clipping."""

    def __init__(self, float_weights: Mapping[str, torch.Tensor], bit_config: BitConfig):
        self.float_weights = float_weights
        self.bit_config = bit_config
        self._cache: dict[tuple[str, int], QuantizedWeight] = {}

    def quantized(self, name: str, bits: int) -> QuantizedWeight:
        key = (name, bits)
        if key not in self._cache:
            weight = self.float_weights[name]
            self._cache[key] = quantize(weight, bits, self.bit_config.group_size_for(bits))
        return self._cache[key]


class TableWeights:
    """Weights computed ahead of time, e.g. by GPTQ: {(name, bits): QuantizedWeight}."""

    def __init__(self, table: Mapping[tuple[str, int], QuantizedWeight]):
        self.table = table

    def quantized(self, name: str, bits: int) -> QuantizedWeight:
        if (name, bits) not in self.table:
            raise KeyError(f"no {bits}-bit weight for {name}")
        return self.table[(name, bits)]


def float_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The float weight of each named linear (plain or elastic), without copying."""
    return {name: model.get_submodule(name).weight.detach() for name in names}


def dequantized_weights(source: WeightSource, layer_bits: Mapping[str, int | None]) -> dict[str, torch.Tensor]:
    """Dequantized float32 weights for every linear given a bit-width (None: left in full precision)."""
    return {name: source.quantized(name, bits).dequantize() for name, bits in layer_bits.items() if bits is not None}


class DenseLinear(nn.Module):
    """A linear with a fixed, already dequantized weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@contextmanager
def use_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Run `model` with `weights` in place of the named linears; the originals return on exit."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, weight in weights.items():
            parent_name, attr = name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            original = getattr(parent, attr)
            originals[name] = original
            device = original.weight.device
            setattr(parent, attr, DenseLinear(weight.to(device), original.bias))
        yield model
    finally:
        for name, original in originals.items():
            parent_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attr, original)
