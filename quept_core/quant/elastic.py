"""The elastic linear: one frozen weight, one cascaded LoRA pair, per-bit clip logits (QuEPT §3).

A b-bit weight is always Q_b(W + B[:, :r] @ A[:r]) with r the rank of b's tier: bits share the
frozen W and a prefix of the LoRA factors, never integer codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quept_core.config import BitConfig
from quept_core.layers import BLOCK_LINEARS
from quept_core.quant.grid import QuantizedWeight, fake_quantize, init_clip_logits, quantize


class ElasticLinear(nn.Module):
    def __init__(self, linear: nn.Linear, bit_config: BitConfig, generator: torch.Generator | None = None):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.bit_config = bit_config
        self.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        rank = bit_config.max_rank
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        bound = math.sqrt(6.0 / (rank + in_features))  # Xavier-uniform
        self.lora_A = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator))
        self.clip_up = nn.ParameterDict()
        self.clip_low = nn.ParameterDict()
        for bits in bit_config.bits:
            group = bit_config.group_size_for(bits)
            self.clip_up[str(bits)] = nn.Parameter(init_clip_logits(out_features, in_features, group))
            self.clip_low[str(bits)] = nn.Parameter(init_clip_logits(out_features, in_features, group))
        # The activation-aware input scale folded into this linear's columns (calibration/equalize.py);
        # ones when the model was not equalized.
        self.register_buffer("input_scale", torch.ones(in_features))
        self.bits: int | None = None  # None: full precision
        # The LoRA init is drawn on the CPU generator (the same on every device), then moved.
        self.to(linear.weight.device)

    def correction(self, bits: int) -> torch.Tensor:
        """R_tier(b) = B[:, :r] @ A[:r], the tier's prefix of the cascaded LoRA."""
        rank = self.bit_config.rank_for(bits)
        return self.lora_B[:, :rank] @ self.lora_A[:rank]

    def _quantizer_inputs(self, bits: int) -> tuple:
        """(W + R_tier(b), bits, group size, clip logits): what every quantizer entry point takes."""
        return (self.weight + self.correction(bits), bits, self.bit_config.group_size_for(bits),
                self.clip_up[str(bits)], self.clip_low[str(bits)])

    def fake_quant_weight(self, bits: int) -> torch.Tensor:
        """Differentiable Q_b(W + R_tier(b)), used during calibration."""
        return fake_quantize(*self._quantizer_inputs(bits))

    @torch.no_grad()
    def quantize(self, bits: int) -> QuantizedWeight:
        """The integer codes, scales and zero-points of Q_b(W + R_tier(b))."""
        return quantize(*self._quantizer_inputs(bits))

    @torch.no_grad()
    def materialize(self, bits: int) -> torch.Tensor:
        """The dequantized b-bit weight, float32 [out, in]."""
        return self.quantize(bits).dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.bits is None else self.fake_quant_weight(self.bits)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, rank={self.bit_config.max_rank}"


def make_elastic(model: nn.Module, bit_config: BitConfig, seed: int = 0) -> dict[str, ElasticLinear]:
    """Replace every decoder-block linear of a LLaMA model by an ElasticLinear, in place.

    Returns the elastic linears by their full module name (e.g. `model.layers.0.self_attn.q_proj`).
    """
    generator = torch.Generator().manual_seed(seed)
    elastic: dict[str, ElasticLinear] = {}
    for index, layer in enumerate(model.model.layers):
        for path in BLOCK_LINEARS:
            parent_path, attr = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            module = ElasticLinear(getattr(parent, attr), bit_config, generator)
            setattr(parent, attr, module)
            elastic[f"model.layers.{index}.{path}"] = module
    return elastic


def trainable_state(elastic: dict[str, ElasticLinear]) -> dict[str, torch.Tensor]:
    """The calibrated state (LoRA factors, clip logits and input scales, not the frozen weights) by flat
    key: `<linear>.lora_A`, `<linear>.lora_B`, `<linear>.clip_up.<bits>`, `<linear>.clip_low.<bits>`,
    `<linear>.input_scale`."""
    state: dict[str, torch.Tensor] = {}
    for name, linear in elastic.items():
        state[f"{name}.input_scale"] = linear.input_scale.detach().cpu().contiguous()
        state[f"{name}.lora_A"] = linear.lora_A.detach().cpu().contiguous()
        state[f"{name}.lora_B"] = linear.lora_B.detach().cpu().contiguous()
        for bits in linear.bit_config.bits:
            state[f"{name}.clip_up.{bits}"] = linear.clip_up[str(bits)].detach().cpu().contiguous()
            state[f"{name}.clip_low.{bits}"] = linear.clip_low[str(bits)].detach().cpu().contiguous()
    return state


@torch.no_grad()
def load_trainable_state(elastic: dict[str, ElasticLinear], state: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_state` into the elastic linears; every key must be present with its shape."""
    expected = trainable_state(elastic)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KeyError(f"state lacks {len(missing)} tensors, first: {missing[0]}")
    for name, linear in elastic.items():
        targets = {"input_scale": linear.input_scale, "lora_A": linear.lora_A, "lora_B": linear.lora_B}
        for bits in linear.bit_config.bits:
            targets[f"clip_up.{bits}"] = linear.clip_up[str(bits)]
            targets[f"clip_low.{bits}"] = linear.clip_low[str(bits)]
        for suffix, parameter in targets.items():
            value = state[f"{name}.{suffix}"]
            if value.shape != parameter.shape:
                raise ValueError(f"{name}.{suffix}: shape {tuple(value.shape)}, expected {tuple(parameter.shape)}")
            parameter.copy_(value)


def elastic_linears(module: nn.Module) -> dict[str, ElasticLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, ElasticLinear)}


def set_bits(module: nn.Module, bits: int | None) -> None:
    """Switch every elastic linear inside `module` to `bits` (None: full precision)."""
    for linear in elastic_linears(module).values():
        linear.bits = bits
