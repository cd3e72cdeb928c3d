"""Per-layer sensitivity to quantization: S[i][b] for every quantized linear i and bit-width b.

Two measures (QuEPT §6 and §9, with A7 and A9 fixed):

- `proxy_sensitivity` (the default, seconds): the relative output error of each linear on its
  calibration inputs, E_i(b) = ||X_i Ŵ_{i,b}ᵀ − X_i W_iᵀ||² / ||X_i W_iᵀ||², times a per-block factor that converts a block's summed error into the KL
  divergence it causes: each block is quantized alone at the lowest bit and the KL of the
  output distribution (softmax over the vocabulary, averaged over tokens) is measured.
- `kl_sensitivity` (faithful, minutes): that KL probe for every (linear, bit) alone.

Layers other than the probed ones stay in full precision (A9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quept_core.config import BitConfig
from quept_core.layers import BLOCK_LINEARS, INPUT_GROUP_PATHS, block_of, model_linear_names
from quept_core.planning.bits import linear_shapes
from quept_core.quant.blockwise import (
    captured_inputs,
    decoder_layers,
    embed,
    head_logits,
    input_basis,
    run_block,
)
from quept_core.quant.sources import WeightSource, use_weights

Progress = Callable[[int, int], None]

# Tokens for the output errors (the basis keeps the cost bounded, the forward pass grows with
# them) and for the KL probes (every probe runs the output head over the whole vocabulary).
PROXY_TOKENS = 512
PROBE_SEQUENCES, PROBE_SEQLEN = 2, 128


@dataclass(frozen=True)
class SensitivityTable:
    kind: str  # "proxy" or "kl"
    bits: tuple[int, ...]
    layers: tuple[str, ...]
    values: np.ndarray  # float64 [n_layers, n_bits]
    shapes: dict[str, tuple[int, int]]  # layer -> (out_features, in_features)
    block_factors: tuple[float, ...] = field(default=())  # proxy only

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "bits": list(self.bits),
            "layers": list(self.layers),
            "values": self.values.tolist(),
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "block_factors": list(self.block_factors),
        }

    @classmethod
    def from_dict(cls, data: dict) -> SensitivityTable:
        return cls(
            kind=data["kind"],
            bits=tuple(data["bits"]),
            layers=tuple(data["layers"]),
            values=np.asarray(data["values"], dtype=np.float64),
            shapes={name: (shape[0], shape[1]) for name, shape in data["shapes"].items()},
            block_factors=tuple(data.get("block_factors", ())),
        )


def sensitivity_tokens(calib_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading calibration windows that feed the output errors, and the short probe sequences."""
    rows = max(1, -(-PROXY_TOKENS // calib_tokens.shape[1]))
    return calib_tokens[:rows], calib_tokens[:PROBE_SEQUENCES, :PROBE_SEQLEN]


class KLProbe:
    """KL(p_fp || p_q) of the next-token distribution when some linears of one block are quantized.

    Keeps every block's full-precision input for `tokens`, so a probe of block k only runs
    blocks k..L-1 and the output head.
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int = 8):
        self.model = model
        self.batch_size = batch_size
        hidden, self.context = embed(model, tokens)
        self.block_inputs = []
        with torch.no_grad():
            for layer in decoder_layers(model):
                self.block_inputs.append(hidden)
                hidden = run_block(layer, hidden, self.context, batch_size)
            self.fp_logprobs = F.log_softmax(head_logits(model, hidden).float(), dim=-1)
            self.fp_probs = self.fp_logprobs.exp()

    @torch.no_grad()
    def kl(self, block: int, weights: dict[str, torch.Tensor]) -> float:
        layers = decoder_layers(self.model)
        with use_weights(self.model, weights):
            hidden = self.block_inputs[block]
            for layer in layers[block:]:
                hidden = run_block(layer, hidden, self.context, self.batch_size)
            logprobs = F.log_softmax(head_logits(self.model, hidden).float(), dim=-1)
        kl = (self.fp_probs * (self.fp_logprobs - logprobs)).sum(dim=-1)
        return float(kl.mean())


@torch.no_grad()
def relative_errors(
    model: nn.Module, source: WeightSource, tokens: torch.Tensor, bits: tuple[int, ...], batch_size: int = 8,
    progress: Progress | None = None,
) -> np.ndarray:
    """E_i(b) for every linear (model order) and bit, float64 [n_layers, n_bits].

    ||X (Ŵ−W)ᵀ||² / ||X Wᵀ||² with X the linear's inputs on the full-precision chain, through a
    basis of at most in_features rows so the cost does not grow with the token count.
    """
    hidden, context = embed(model, tokens)
    layers = decoder_layers(model)
    rows = []
    for index, layer in enumerate(layers):
        with captured_inputs(layer) as inputs:
            next_hidden = run_block(layer, hidden, context, batch_size)
        bases = {leader: input_basis(batches) for leader, batches in inputs.items()}
        for path in BLOCK_LINEARS:
            basis = bases[next(group[0] for group in INPUT_GROUP_PATHS if path in group)]
            weight = layer.get_submodule(path).weight.detach().float()
            reference = float((basis @ weight.T).square().sum())
            row = []
            for b in bits:
                delta = source.quantized(f"model.layers.{index}.{path}", b).dequantize().to(weight.device) - weight
                row.append(float((basis @ delta.T).square().sum()) / reference)
            rows.append(row)
        hidden = next_hidden
        if progress is not None:
            progress(index + 1, len(layers))
    return np.asarray(rows, dtype=np.float64)


def proxy_sensitivity(
    model: nn.Module,
    source: WeightSource,
    bit_config: BitConfig,
    tokens: torch.Tensor,
    probe_tokens: torch.Tensor,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> SensitivityTable:
    """Block-weighted relative output error (the default, cheap sensitivity).

    `tokens` [n, T]: calibration inputs for the output errors; `probe_tokens`: a couple of short
    sequences for the per-block KL factors.
    """
    names = model_linear_names(model)
    errors = relative_errors(model, source, tokens, bit_config.bits, batch_size, progress)
    probe = KLProbe(model, probe_tokens, batch_size)
    lowest = bit_config.bits[0]
    per_block = len(BLOCK_LINEARS)
    factors = []
    values = np.empty_like(errors)
    for block in range(len(decoder_layers(model))):
        rows = slice(block * per_block, (block + 1) * per_block)
        weights = {name: source.quantized(name, lowest).dequantize() for name in names[rows]}
        block_kl = probe.kl(block, weights)
        # The block's summed error at the lowest bit maps onto the KL it causes there.
        factor = max(block_kl, 0.0) / max(float(errors[rows, 0].sum()), 1e-30)
        factors.append(factor)
        values[rows] = factor * errors[rows]
    return SensitivityTable("proxy", bit_config.bits, tuple(names), values, linear_shapes(model, names),
                            tuple(factors))


def kl_sensitivity(
    model: nn.Module,
    source: WeightSource,
    bit_config: BitConfig,
    probe_tokens: torch.Tensor,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> SensitivityTable:
    """The faithful probe: one KL measurement per (linear, bit), every other linear in full precision."""
    names = model_linear_names(model)
    probe = KLProbe(model, probe_tokens, batch_size)
    values = np.empty((len(names), len(bit_config.bits)))
    for i, name in enumerate(names):
        for j, b in enumerate(bit_config.bits):
            values[i, j] = probe.kl(block_of(name), {name: source.quantized(name, b).dequantize()})
        if progress is not None:
            progress(i + 1, len(names))
    return SensitivityTable("kl", bit_config.bits, tuple(names), values, linear_shapes(model, names))


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks starting at 0, ties given their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long sequences."""
    ra, rb = _ranks(np.ravel(a)), _ranks(np.ravel(b))
    return float(np.corrcoef(ra, rb)[0, 1])
