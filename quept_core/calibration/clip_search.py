"""Clip-ratio grid search: a cheap starting point for the per-bit clip logits (QuEPT §9).

For every group of every row, pick the shrink ratio r (applied to both the group max and min)
that minimises the output error ‖X (W - Q_b,r(W))ᵀ‖² on cached block inputs. Cross terms between
groups of one row are ignored, so each group only needs its diagonal block of the Gram matrix XᵀX.

At the widths named for it (the lowest tiers by default), the symmetric ratio is then refined one
side at a time: the max's ratio moves up to 3 grid steps with the min's fixed, then the min's, twice
over, each group keeping a move only where it lowers the error. With 8 or 16 levels the best grid is
rarely centred on the group's range, and the clip logits' few training steps do not move it far
enough (docs/benchmarks.md, "Asymmetric clip search").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from quept_core.quant.elastic import ElasticLinear
from quept_core.quant.grid import fake_quantize_groups_into, grouped_weight, num_groups

RATIO_STEP = 0.025
# Logit used for "no shrink": sigmoid(9.2) = 0.9999, finite so that calibration can still move it.
NO_SHRINK_LOGIT = 9.2


def clip_ratios(count: int) -> tuple[float, ...]:
    """`count` shrink ratios from 1.0 down in steps of RATIO_STEP."""
    if not 1 <= count < 1 / RATIO_STEP:
        raise ValueError(f"clip ratio grid size must be in 1..{int(1 / RATIO_STEP) - 1}, got {count}")
    return tuple(round(1.0 - RATIO_STEP * i, 3) for i in range(count))


DEFAULT_RATIOS = clip_ratios(20)
# The asymmetric refinement: each side in turn, twice, tries these grid steps from where it stands.
REFINE_PASSES = ("up", "low", "up", "low")
REFINE_OFFSETS = (-3, -2, -1, 1, 2, 3)


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


def _errors_by_group(delta: torch.Tensor, blocks: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """‖X δᵀ‖² [n_groups, out] of a grouped weight error δ [n_groups, out, g] (Gram blocks [n_groups, g, g]);
    `work`, a tensor shaped as δ, holds the product instead of a fresh one."""
    return torch.bmm(delta, blocks, out=work).mul_(delta).sum(-1)


def group_errors(delta: torch.Tensor, blocks: torch.Tensor, group_size: int) -> torch.Tensor:
    """‖X δᵀ‖² per row and group [out, n_groups] for a weight error δ [out, in], with X's Gram reduced to
    its diagonal group blocks [n_groups, g, g] (`diagonal_blocks`)."""
    return _errors_by_group(grouped_weight(delta, group_size).transpose(0, 1), blocks).T


@torch.no_grad()
def best_clip_logits(
    weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int,
    ratios: Sequence[float] = DEFAULT_RATIOS, asymmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip logits (up, low) [out, n_groups] with the least output error per group: one symmetric
    ratio, then with `asymmetric` each side moved along the grid, near where it stands, with the
    other fixed."""
    blocks = diagonal_blocks(gram, group_size)
    # Groups first ([n_groups, out, g]): the error is then one batched product per candidate, no copies.
    groups = grouped_weight(weight, group_size).transpose(0, 1).contiguous()
    w_max, w_min = groups.amax(dim=-1), groups.amin(dim=-1)
    delta, work = torch.empty_like(groups), torch.empty_like(groups)
    logits = torch.tensor([ratio_to_logit(ratio) for ratio in ratios], device=weight.device)

    def error(up: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Error per group of the ratio indices (up, low) [n_groups, out]."""
        fake_quantize_groups_into(delta, groups, bits, w_max, w_min, logits[up], logits[low]).sub_(groups)
        return _errors_by_group(delta, blocks, work)

    best_error = torch.full(groups.shape[:2], math.inf, device=weight.device)
    up = low = torch.zeros(groups.shape[:2], dtype=torch.long, device=weight.device)

    def keep_where_better(up_candidate: torch.Tensor, low_candidate: torch.Tensor) -> None:
        nonlocal best_error, up, low
        candidate_error = error(up_candidate, low_candidate)
        better = candidate_error < best_error
        best_error = torch.where(better, candidate_error, best_error)
        up, low = torch.where(better, up_candidate, up), torch.where(better, low_candidate, low)

    for index in range(len(ratios)):
        candidate = torch.full_like(up, index)
        keep_where_better(candidate, candidate)
    for side in REFINE_PASSES if asymmetric else ():
        start = up if side == "up" else low
        for offset in REFINE_OFFSETS:
            candidate = (start + offset).clamp(0, len(ratios) - 1)
            if side == "up":
                keep_where_better(candidate, low)
            else:
                keep_where_better(up, candidate)
    return logits[up].T.contiguous(), logits[low].T.contiguous()


@torch.no_grad()
def init_clips(linears: Sequence[ElasticLinear], grams: Sequence[torch.Tensor], bits: Iterable[int],
               ratios: Sequence[float] = DEFAULT_RATIOS, asymmetric_bits: Iterable[int] = ()) -> None:
    """Set clip_up and clip_low of each linear, for each of `bits`, to the searched logits
    (refined one side at a time at `asymmetric_bits`)."""
    bits, asymmetric_bits = list(bits), set(asymmetric_bits)
    for linear, gram in zip(linears, grams, strict=True):
        for b in bits:
            target = linear.weight + linear.correction(b)
            up, low = best_clip_logits(target, gram, b, linear.bit_config.group_size_for(b), ratios,
                                       asymmetric=b in asymmetric_bits)
            linear.clip_up[str(b)].copy_(up)
            linear.clip_low[str(b)].copy_(low)


@torch.no_grad()
def start_unclipped(linears: Sequence[ElasticLinear], bits: Iterable[int]) -> None:
    """Set clip_up and clip_low of each linear, for each of `bits`, to no shrink (round-to-nearest's range)."""
    for linear in linears:
        for b in bits:
            linear.clip_up[str(b)].fill_(NO_SHRINK_LOGIT)
            linear.clip_low[str(b)].fill_(NO_SHRINK_LOGIT)
