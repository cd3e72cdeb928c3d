"""Activation-aware equalization (AWQ-style), one transform shared by every bit-width.

Before a block's clip search, the input channels of each linear group are rescaled: its columns are
multiplied by s and the producer of its input is divided by s, so the float block computes the same
function while channels that carry large activations get finer quantization steps. For each group,
s = rms(x)^α (normalised to a geometric mean of 1 between its extremes), with α picked on a grid to
minimise the quantization output error ‖X (Q_b(W s) / s - W)ᵀ‖² summed over the bit set, each width's
error relative to its own error without scaling. As in the clip search, cross terms between groups of a
row are ignored, so the error reads only the diagonal blocks of the Gram matrix XᵀX.

The producers: each block's input RMSNorm for q|k|v, its post-attention RMSNorm for gate|up, and the
rows of up for down (SiLU(gate) * up is linear in up). v -> o is left alone: with grouped-query
attention one v row feeds several o columns.

Every consumer keeps its group's s in `ElasticLinear.input_scale`, so an artifact records the transform
and `fold_input_scales` applies it again to a freshly loaded base model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quept_core.calibration.clip_search import diagonal_blocks, group_errors
from quept_core.quant.elastic import ElasticLinear
from quept_core.quant.grid import fake_quantize_groups_into, grouped_weight, ungrouped

ALPHA_STEP = 0.05


@dataclass(frozen=True)
class ScaledPair:
    """A producer inside a block whose output is the input of a group of linears."""

    producer: str  # module path inside the block: an RMSNorm, or a linear whose rows are divided
    consumers: tuple[str, ...]


SCALED_PAIRS: tuple[ScaledPair, ...] = (
    ScaledPair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaledPair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaledPair("mlp.up_proj", ("mlp.down_proj",)),
)


def alphas(count: int) -> tuple[float, ...]:
    """`count` exponents from 0 (no scaling) up in steps of ALPHA_STEP."""
    if not 1 <= count <= round(1 / ALPHA_STEP):
        raise ValueError(f"equalization grid size must be in 1..{round(1 / ALPHA_STEP)}, got {count}")
    return tuple(round(ALPHA_STEP * i, 3) for i in range(count))


def _output_error(weight: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor, bits: int,
                  group_size: int) -> float:
    """‖X (Q_b(W s) / s - W)ᵀ‖² with X's Gram reduced to its diagonal group blocks [n_groups, g, g]."""
    groups = grouped_weight(weight * scale, group_size)
    quantized = fake_quantize_groups_into(groups, groups, bits, groups.amax(dim=-1), groups.amin(dim=-1))
    delta = ungrouped(quantized, weight.shape[1]).div_(scale).sub_(weight)
    return group_errors(delta, blocks, group_size).sum().item()


@torch.no_grad()
def best_scale(weight: torch.Tensor, gram: torch.Tensor, bit_groups: Sequence[tuple[int, int]],
               grid: Sequence[float]) -> torch.Tensor:
    """The input scale [in] that minimises the summed relative output error over
    `bit_groups` ((bits, group size) pairs) for `weight` [out, in] with input Gram `gram` [in, in]."""
    rms = torch.diagonal(gram).clamp(min=1e-12).sqrt()  # a constant factor cancels in the normalisation
    blocks = {g: diagonal_blocks(gram, g) for _, g in bit_groups}
    ones = torch.ones_like(rms)
    reference = [max(_output_error(weight, blocks[g], ones, b, g), 1e-30) for b, g in bit_groups]
    best, best_error = ones, float(len(bit_groups))
    for alpha in grid:
        if alpha == 0.0:
            continue
        scale = rms**alpha
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = sum(_output_error(weight, blocks[g], scale, b, g) / ref
                    for (b, g), ref in zip(bit_groups, reference))
        if error < best_error:
            best, best_error = scale, error
    return best


def _divide_producer(producer: nn.Module, scale: torch.Tensor) -> None:
    if isinstance(producer, ElasticLinear):
        producer.weight.div_(scale.unsqueeze(1))  # its output channel j is divided by s_j
    else:
        producer.weight.div_(scale)


@torch.no_grad()
def _apply(block: nn.Module, pair: ScaledPair, scale: torch.Tensor) -> None:
    for path in pair.consumers:
        block.get_submodule(path).weight.mul_(scale)
    _divide_producer(block.get_submodule(pair.producer), scale)


@torch.no_grad()
def equalize_block(block: nn.Module, linears: dict[str, ElasticLinear], grams: dict[str, torch.Tensor],
                   bits: Iterable[int], grid: Sequence[float]) -> None:
    """Search and fold the input scale of every pair of `block`, in place.

    `linears` and `grams` are keyed by module path inside the block; the Grams (of the unscaled inputs)
    are replaced by the scaled inputs' (G / s sᵀ).
    """
    bits = list(bits)
    for pair in SCALED_PAIRS:
        consumers = [linears[path] for path in pair.consumers]
        bit_config = consumers[0].bit_config
        bit_groups = [(b, bit_config.group_size_for(b)) for b in bits]
        stacked = torch.cat([m.weight for m in consumers])
        scale = best_scale(stacked, grams[pair.consumers[0]], bit_groups, grid)
        _apply(block, pair, scale)
        for path, linear in zip(pair.consumers, consumers):
            linear.input_scale.copy_(scale)
            grams[path] = grams[path] / torch.outer(scale, scale)


@torch.no_grad()
def fold_input_scales(layers: Sequence[nn.Module]) -> None:
    """Apply the scales stored in each block's elastic linears to weights loaded from the base model."""
    for block in layers:
        for pair in SCALED_PAIRS:
            scale = block.get_submodule(pair.consumers[0]).input_scale
            if not torch.equal(scale, torch.ones_like(scale)):
                _apply(block, pair, scale)
