"""GPTQ (Frantar et al., 2023): second-order weight rounding, the textbook algorithm.

Each column is rounded on the same asymmetric integer zero-point grid as `quantizer.py` (same
group size per bit, no clipping), and the rounding error is spread over the columns not yet
rounded through the inverse Hessian H = X^T X of the layer's inputs (damped by 1 % of its mean
diagonal), with lazy updates in blocks of columns. The model is quantized block by block: each
decoder block's Hessians come from the outputs of the already quantized blocks before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from quept_core.config import BitConfig
from quept_core.layers import INPUT_GROUP_PATHS
from quept_core.quant.blockwise import (
    captured_inputs,
    decoder_layers,
    embed,
    input_gram,
    run_block,
)
from quept_core.quant.grid import QuantizedWeight, quantize
from quept_core.quant.sources import use_weights

DAMPING = 0.01
LAZY_BLOCK = 128


def _group_params(columns: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point [out] of one group of columns [out, <= group], by quantizer.py's rule.

    A short last group is zero-padded, as quantizer.py pads it, so the zeros count in its min/max.
    """
    if columns.shape[1] < group:
        columns = torch.nn.functional.pad(columns, (0, group - columns.shape[1]))
    grid = quantize(columns, bits, -1)
    return grid.scale[:, 0], grid.zero[:, 0]


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run the column loop's many small CPU ops on one thread: a thread team costs more than they do."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, act_order: bool = False,
    damping: float = DAMPING,
) -> QuantizedWeight:
    """GPTQ-round `weight` [out, in] given the input Hessian [in, in]; codes on quantizer.py's grid.

    With `act_order`, columns are visited by decreasing Hessian diagonal and each group's scale
    and zero-point are fixed from the unmodified weight first (static groups), so the codes keep
    the contiguous group layout of `QuantizedWeight`.
    """
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    n_groups = -(-in_features // group)
    max_code = 2**bits - 1
    # Work on the transpose: a weight column is then a contiguous row, which the column loop reads.
    Wt = weight.detach().float().T.clone()  # [in, out]
    H = hessian.detach().clone().double()
    device = Wt.device
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    Wt[dead] = 0.0

    scales = torch.zeros(n_groups, out_features, device=device)
    zeros = torch.zeros(n_groups, out_features, device=device)
    if act_order or group_size == -1:
        for g in range(n_groups):
            scales[g], zeros[g] = _group_params(Wt[g * group : (g + 1) * group].T, bits, group)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_features, device=device)
    Wt = Wt[order]
    H = H[order][:, order]
    H += damping * torch.mean(torch.diag(H)) * torch.eye(in_features, dtype=H.dtype, device=device)
    # Upper Cholesky factor of H^-1: row i holds the update coefficients for column i onward.
    # (cholesky_solve against I, not cholesky_inverse: the latter is ~30x slower on CPU for these sizes.)
    identity = torch.eye(in_features, dtype=H.dtype, device=device)
    Hinv = torch.linalg.cholesky(torch.cholesky_solve(identity, torch.linalg.cholesky(H)), upper=True).float()

    codes = torch.zeros(in_features, out_features, device=device)
    group_of = (order // group).tolist()
    # Lazy blocks aligned to groups, so a dynamic group's columns are all inside the current block.
    step = max(group, LAZY_BLOCK // group * group) if group_size != -1 else LAZY_BLOCK
    for i1 in range(0, in_features, step):
        i2 = min(i1 + step, in_features)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with _one_thread(device):
            for i in range(i2 - i1):
                column = i1 + i
                g = group_of[column]
                if not act_order and group_size != -1 and column % group == 0:
                    scales[g], zeros[g] = _group_params(W1[i : i + group].T, bits, group)
                scale, zero = scales[g], zeros[g]
                w = W1[i]
                q = (torch.round(w / scale) + zero).clamp_(0, max_code)
                codes[column] = q
                err = (w - (q - zero) * scale) / Hinv1[i, i]
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
                Err1[i] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ Err1

    codes = codes[torch.argsort(order)].T
    scales, zeros = scales.T.contiguous(), zeros.T.contiguous()
    return QuantizedWeight(codes.to(torch.uint8).contiguous(), scales, zeros, bits, group_size)


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    tokens: torch.Tensor,
    bits: int,
    bit_config: BitConfig,
    act_order: bool = False,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """GPTQ every decoder-block linear at `bits` on calibration `tokens` [n, T], block by block.

    The model's own weights are left untouched; returns {full linear name: QuantizedWeight}.
    """
    group_size = bit_config.group_size_for(bits)
    hidden, context = embed(model, tokens)
    layers = decoder_layers(model)
    result: dict[str, QuantizedWeight] = {}
    for index, layer in enumerate(layers):
        with captured_inputs(layer) as inputs:
            run_block(layer, hidden, context, batch_size)
        block_weights: dict[str, torch.Tensor] = {}
        for group in INPUT_GROUP_PATHS:
            # Linears sharing an input share H: GPTQ is row-independent, so stack them.
            stacked = torch.cat([layer.get_submodule(path).weight.detach().float() for path in group])
            qweight = gptq_quantize(stacked, input_gram(inputs[group[0]]), bits, group_size, act_order)
            row = 0
            for path in group:
                rows = layer.get_submodule(path).weight.shape[0]
                part = QuantizedWeight(qweight.codes[row : row + rows], qweight.scale[row : row + rows],
                                       qweight.zero[row : row + rows], bits, group_size)
                result[f"model.layers.{index}.{path}"] = part
                block_weights[path] = part.dequantize()
                row += rows
        with use_weights(layer, block_weights):
            hidden = run_block(layer, hidden, context, batch_size)
        if progress is not None:
            progress(index + 1, len(layers))
    return result
