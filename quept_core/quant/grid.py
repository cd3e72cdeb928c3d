"""Asymmetric uniform weight quantizer with per-bit learnable clipping (QuEPT §1.1).

Per group of `group_size` consecutive input features in each output row (or per row when
`group_size == -1`):

    M' = sigmoid(up) * max,  m' = sigmoid(low) * min
    s  = fp16(clamp((M' - m') / (2^b - 1), 1e-5, 1e4))  straight-through clamp and rounding
    z  = round(-m' / s)                                   no gradient
    q  = clamp(round(W / s) + z, 0, 2^b - 1)             straight-through round
    Ŵ  = (q - z) * s

Scale and zero are recomputed from the tensor every time; only the clip logits are learned. The scale
is rounded to the nearest float16 value, the precision the packs store it in, so that calibration
trains against the grid that is served and a pack holds its weight exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CLIP_LOGIT_INIT = 4.0  # sigmoid(4) ≈ 0.982, the reference initialisation
SCALE_MIN, SCALE_MAX = 1e-5, 1e4


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def grouped_weight(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group], zero-padding the last group if needed."""
    out_features, in_features = weight.shape
    if group_size == -1:
        return weight.reshape(out_features, 1, in_features)
    pad = num_groups(in_features, group_size) * group_size - in_features
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(out_features, -1, group_size)


def ungrouped(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, n_groups, group] -> [out, in], without the last group's padding (a view where it can be)."""
    return grouped.reshape(grouped.shape[0], -1)[:, :in_features]


def init_clip_logits(out_features: int, in_features: int, group_size: int) -> torch.Tensor:
    return torch.full((out_features, num_groups(in_features, group_size)), CLIP_LOGIT_INIT)


def _scale_and_zero(grouped: torch.Tensor, bits: int, up_logit: torch.Tensor | None,
                    low_logit: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Scale and zero [out, n_groups, 1], plus what the backward pass needs: the group max and min
    [out, n_groups] and the clip ratios sigmoid(up), sigmoid(low) (None without clip logits)."""
    w_max, w_min = grouped.amax(dim=-1), grouped.amin(dim=-1)
    up, low = _clip_ratios(up_logit, low_logit)
    return *_grid_of_range(w_max, w_min, bits, up, low), w_max, w_min, up, low


def _clip_ratios(up_logit: torch.Tensor | None, low_logit: torch.Tensor | None) -> tuple:
    """The clip ratios sigmoid(up), sigmoid(low) (None where there is no logit)."""
    return tuple(None if logit is None else torch.sigmoid(logit) for logit in (up_logit, low_logit))


def _grid_of_range(w_max: torch.Tensor, w_min: torch.Tensor, bits: int, up: torch.Tensor | None,
                   low: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [..., 1] of groups with max and min [...] clipped by the ratios up, low [...]."""
    high_bound = w_max if up is None else up * w_max
    low_bound = w_min if low is None else low * w_min
    scale = ((high_bound - low_bound) / (2**bits - 1)).clamp(SCALE_MIN, SCALE_MAX)
    # No caller differentiates through this: _FakeQuantize passes the rounding straight through.
    scale = scale.to(torch.float16).to(scale.dtype)
    zero = (-low_bound / scale).round()
    return scale.unsqueeze(-1), zero.unsqueeze(-1)


class _FakeQuantize(torch.autograd.Function):
    """Fused fake quantization of grouped weights [out, n_groups, group] with a hand-written backward.

    Same numbers and gradients as autograd through the formulas of the module docstring (straight-through
    round and scale clamp), in far fewer passes over the weight: calibration re-quantizes every linear
    at every step.
    """

    @staticmethod
    def forward(ctx, grouped, up_logit, low_logit, bits: int):
        top = 2**bits - 1
        scale, zero, w_max, w_min, up, low = _scale_and_zero(grouped, bits, up_logit, low_logit)
        shifted = (grouped / scale).round_().add_(zero)  # round(W / s) + z, before the clamp
        out = shifted.clamp(0, top).sub_(zero).mul_(scale)
        ctx.save_for_backward(grouped, shifted, w_max, w_min, up, low, scale, zero)
        ctx.bits = bits
        return out

    @staticmethod
    def backward(ctx, grad):
        grouped, shifted, w_max, w_min, up, low, scale, zero = ctx.saved_tensors
        top = 2**ctx.bits - 1
        # Comparisons are slow on the CPU, so the masks below are built from float arithmetic.
        clamped = shifted.clamp(0, top)
        inside = (shifted - clamped).abs_().clamp_(max=1).neg_().add_(1)  # 1 in range, 0 where clamped
        codes = clamped.sub_(zero)  # q - z
        grad_grouped = grad * inside  # straight-through rounding inside the range
        # dŴ/ds = (q - z) - [inside] * W / s, summed over each group against the incoming gradient.
        grad_scale = (grad * codes).sum(dim=-1) - (grad_grouped * grouped).sum(dim=-1) / scale.squeeze(-1)
        grad_high = grad_scale / top  # s = (M' - m') / (2^b - 1), clamp passed straight through
        grad_up = grad_low = None
        grad_max, grad_min = grad_high, -grad_high
        if up is not None:
            grad_up = grad_high * w_max * up * (1 - up)
            grad_max = grad_high * up
        if low is not None:
            grad_low = -grad_high * w_min * low * (1 - low)
            grad_min = -grad_high * low
        # amax/amin hand their gradient to the extreme elements, shared evenly between ties.
        at_max = (grouped - w_max.unsqueeze(-1)).sign_().add_(1)
        at_min = (grouped - w_min.unsqueeze(-1)).sign_().neg_().add_(1)
        grad_grouped.addcmul_(at_max, (grad_max / at_max.sum(dim=-1)).unsqueeze(-1))
        grad_grouped.addcmul_(at_min, (grad_min / at_min.sum(dim=-1)).unsqueeze(-1))
        return grad_grouped, grad_up, grad_low, None


def fake_quantize_groups(groups: torch.Tensor, bits: int, up_logit: torch.Tensor | None = None,
                         low_logit: torch.Tensor | None = None) -> torch.Tensor:
    """`fake_quantize` of weights already in groups [..., group] (clip logits [...]): any layout of the
    leading dimensions, e.g. [n_groups, out, group] for a batched product with per-group matrices."""
    return _FakeQuantize.apply(groups, up_logit, low_logit, bits)


@torch.no_grad()
def fake_quantize_groups_into(out: torch.Tensor, groups: torch.Tensor, bits: int, w_max: torch.Tensor,
                              w_min: torch.Tensor, up_logit: torch.Tensor | None = None,
                              low_logit: torch.Tensor | None = None) -> torch.Tensor:
    """`fake_quantize_groups` written into `out` (which may be `groups`), the same numbers, for groups whose
    max and min [...] are given: the searches quantize one weight many ways, and this does one pass per
    operation in place, with no autograd and no fresh weight-sized tensors."""
    scale, zero = _grid_of_range(w_max, w_min, bits, *_clip_ratios(up_logit, low_logit))
    torch.div(groups, scale, out=out)
    return out.round_().add_(zero).clamp_(0, 2**bits - 1).sub_(zero).mul_(scale)


def fake_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    up_logit: torch.Tensor | None = None,
    low_logit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize and dequantize `weight` [out, in]; differentiable in the weight and the clip logits."""
    grouped = fake_quantize_groups(grouped_weight(weight, group_size), bits, up_logit, low_logit)
    return ungrouped(grouped, weight.shape[1])


@dataclass
class QuantizedWeight:
    """Integer codes with per-group scale and integer zero-point: Ŵ = (codes - zero) * scale."""

    codes: torch.Tensor  # uint8 [out, in], values in [0, 2^bits - 1]
    scale: torch.Tensor  # float32 [out, n_groups], float16 values
    zero: torch.Tensor  # float32 [out, n_groups], integer-valued (may lie outside the code range)
    bits: int
    group_size: int  # -1: one group per output row

    def dequantize(self) -> torch.Tensor:
        in_features = self.codes.shape[1]
        grouped = grouped_weight(self.codes.float(), self.group_size)
        return ungrouped((grouped - self.zero.unsqueeze(-1)) * self.scale.unsqueeze(-1), in_features)


@torch.no_grad()
def quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    up_logit: torch.Tensor | None = None,
    low_logit: torch.Tensor | None = None,
) -> QuantizedWeight:
    """The integer form of `fake_quantize` (same grid, same numbers)."""
    grouped = grouped_weight(weight.float(), group_size)
    scale, zero = _scale_and_zero(grouped, bits, up_logit, low_logit)[:2]
    codes = ((grouped / scale).round() + zero).clamp(0, 2**bits - 1)
    return QuantizedWeight(
        codes=ungrouped(codes, weight.shape[1]).to(torch.uint8),
        scale=scale.squeeze(-1).float(),
        zero=zero.squeeze(-1).float(),
        bits=bits,
        group_size=group_size,
    )


def storage_bits_per_weight(bits: int, group_size: int, in_features: int) -> float:
    """Bits per weight including one fp16 scale and one 8-bit zero-point per group."""
    group = in_features if group_size == -1 else group_size
    return bits + (16 + 8) / group
