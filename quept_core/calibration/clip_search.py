"""Clip-ratio grid search: a cheap starting point for the per-bit clip logits (QuEPT §9).

For every group of every row, pick the shrink ratio r (applied to both the group max and min)
that minimises the output error ‖X (W - Q_b,r(W))ᵀ‖² on cached block inputs. Cross terms between
groups of one row are ignored, so each group only needs its diagonal block of the Gram matrix XᵀX.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from quept_core.quant.elastic import ElasticLinear
from quept_core.quant.grid import fake_quantize, num_groups

RATIO_STEP = 0.025
# Logit used for "no shrink": sigmoid(9.2) = 0.9999, finite so that calibration can still move it.
NO_SHRINK_LOGIT = 9.2


def clip_ratios(count: int) -> tuple[float, ...]:
    """`count` shrink ratios from 1.0 down in steps of RATIO_STEP."""
    if not 1 <= count < 1 / RATIO_STEP:
        raise ValueError(f"clip ratio grid size must be in 1..{int(1 / RATIO_STEP) - 1}, got {count}")
    return tuple(round(1.0 - RATIO_STEP * i, 3) for i in range(count))


DEFAULT_RATIOS = clip_ratios(20)


def ratio_to_logit(ratio: float) -> float:
    return NO_SHRINK_LOGIT if ratio >= 1.0 else math.log(ratio / (1.0 - ratio))


@torch.no_grad()
def input_grams(
    block: nn.Module, linears: Sequence[ElasticLinear], inputs: Iterable[torch.Tensor], block_kwargs: dict
) -> list[torch.Tensor]:
    """XᵀX [in, in] of each linear's input while `block` runs in full precision on `inputs`."""
    grams = [torch.zeros(m.in_features, m.in_features, device=m.weight.device) for m in linears]

    def hook_for(index: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            grams[index].addmm_(x.T, x)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(linears)]
    try:
        for x in inputs:
            block(x, **block_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def diagonal_blocks(gram: torch.Tensor, group_size: int) -> torch.Tensor:
    """[in, in] -> [n_groups, group, group]: the Gram blocks of each input group (zero-padded)."""
    in_features = gram.shape[0]
    if group_size == -1:
        return gram.unsqueeze(0)
    groups = num_groups(in_features, group_size)
    pad = groups * group_size - in_features
    padded = torch.nn.functional.pad(gram, (0, pad, 0, pad))
    return torch.stack([padded[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                        for g in range(groups)])


@torch.no_grad()
def best_clip_logits(
    weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int,
    ratios: Sequence[float] = DEFAULT_RATIOS,
) -> torch.Tensor:
    """Clip logit [out, n_groups] of the ratio with the least output error, per group."""
    out_features, in_features = weight.shape
    groups = num_groups(in_features, group_size)
    width = in_features if group_size == -1 else group_size
    blocks = diagonal_blocks(gram, group_size)
    pad = groups * width - in_features
    best_error = torch.full((out_features, groups), math.inf, device=weight.device)
    best_logit = torch.zeros(out_features, groups, device=weight.device)
    for ratio in ratios:
        logit = torch.full((out_features, groups), ratio_to_logit(ratio), device=weight.device)
        delta = fake_quantize(weight, bits, group_size, logit, logit) - weight
        delta = torch.nn.functional.pad(delta, (0, pad)).reshape(out_features, groups, width)
        error = (torch.einsum("ogi,gij->ogj", delta, blocks) * delta).sum(-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_logit = torch.where(better, logit, best_logit)
    return best_logit


@torch.no_grad()
def init_clips(linears: Sequence[ElasticLinear], grams: Sequence[torch.Tensor], bits: Iterable[int],
               ratios: Sequence[float] = DEFAULT_RATIOS) -> None:
    """Set clip_up and clip_low of each linear, for each of `bits`, to the searched logits."""
    bits = list(bits)
    for linear, gram in zip(linears, grams, strict=True):
        for b in bits:
            target = linear.weight + linear.correction(b)
            logits = best_clip_logits(target, gram, b, linear.bit_config.group_size_for(b), ratios)
            linear.clip_up[str(b)].copy_(logits)
            linear.clip_low[str(b)].copy_(logits)
