"""Asymmetric uniform weight quantizer with per-bit learnable clipping (QuEPT §1.1).

Per group of `group_size` consecutive input features in each output row (or per row when
`group_size == -1`):

    M' = sigmoid(up) * max,  m' = sigmoid(low) * min
    s  = clamp((M' - m') / (2^b - 1), 1e-5, 1e4)        straight-through clamp
    z  = round(-m' / s)                                   no gradient
    q  = clamp(round_ste(W / s) + z, 0, 2^b - 1)
    Ŵ  = (q - z) * s

Scale and zero are recomputed from the tensor every time; only the clip logits are learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CLIP_LOGIT_INIT = 4.0  # sigmoid(4) ≈ 0.982, the reference initialisation
SCALE_MIN, SCALE_MAX = 1e-5, 1e4


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def clamp_ste(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return (x.clamp(low, high) - x).detach() + x


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group], zero-padding the last group if needed."""
    out_features, in_features = weight.shape
    if group_size == -1:
        return weight.reshape(out_features, 1, in_features)
    pad = num_groups(in_features, group_size) * group_size - in_features
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(out_features, -1, group_size)


def _ungrouped(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    return grouped.reshape(grouped.shape[0], -1)[:, :in_features]


def init_clip_logits(out_features: int, in_features: int, group_size: int) -> torch.Tensor:
    return torch.full((out_features, num_groups(in_features, group_size)), CLIP_LOGIT_INIT)


def _scale_and_zero(
    grouped: torch.Tensor, bits: int, up_logit: torch.Tensor | None, low_logit: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    w_max = grouped.amax(dim=-1)
    w_min = grouped.amin(dim=-1)
    if up_logit is not None:
        w_max = torch.sigmoid(up_logit) * w_max
    if low_logit is not None:
        w_min = torch.sigmoid(low_logit) * w_min
    scale = clamp_ste((w_max - w_min) / (2**bits - 1), SCALE_MIN, SCALE_MAX)
    zero = (-w_min / scale).round().detach()
    return scale.unsqueeze(-1), zero.unsqueeze(-1)


def fake_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    up_logit: torch.Tensor | None = None,
    low_logit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize and dequantize `weight` [out, in]; differentiable in the weight and the clip logits."""
    grouped = _grouped(weight, group_size)
    scale, zero = _scale_and_zero(grouped, bits, up_logit, low_logit)
    codes = (round_ste(grouped / scale) + zero).clamp(0, 2**bits - 1)
    return _ungrouped((codes - zero) * scale, weight.shape[1])


@dataclass
class QuantizedWeight:
    """Integer codes with per-group scale and integer zero-point: Ŵ = (codes - zero) * scale."""

    codes: torch.Tensor  # uint8 [out, in], values in [0, 2^bits - 1]
    scale: torch.Tensor  # float32 [out, n_groups]
    zero: torch.Tensor  # float32 [out, n_groups], integer-valued (may lie outside the code range)
    bits: int
    group_size: int  # -1: one group per output row

    def dequantize(self) -> torch.Tensor:
        in_features = self.codes.shape[1]
        grouped = _grouped(self.codes.float(), self.group_size)
        return _ungrouped((grouped - self.zero.unsqueeze(-1)) * self.scale.unsqueeze(-1), in_features)


@torch.no_grad()
def quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    up_logit: torch.Tensor | None = None,
    low_logit: torch.Tensor | None = None,
) -> QuantizedWeight:
    """The integer form of `fake_quantize` (same grid, same numbers)."""
    grouped = _grouped(weight.float(), group_size)
    scale, zero = _scale_and_zero(grouped, bits, up_logit, low_logit)
    codes = ((grouped / scale).round() + zero).clamp(0, 2**bits - 1)
    return QuantizedWeight(
        codes=_ungrouped(codes, weight.shape[1]).to(torch.uint8),
        scale=scale.squeeze(-1).float(),
        zero=zero.squeeze(-1).float(),
        bits=bits,
        group_size=group_size,
    )


def storage_bits_per_weight(bits: int, group_size: int, in_features: int) -> float:
    """Bits per weight including one fp16 scale and one 8-bit zero-point per group."""
    group = in_features if group_size == -1 else group_size
    return bits + (16 + 8) / group
