"""GPTQ and AWQ from llm-compressor (vLLM's maintained implementation), the optional `baselines` extra.

Each bit-width quantizes its own copy of the float model with `oneshot` and the sequential pipeline
(one decoder block at a time, each block calibrated on the outputs of the already quantized ones),
weight-only, asymmetric integer, the group size BitConfig gives that width, on the same calibration
token windows as QuEPT. What comes back is llm-compressor's fake-quantized model; its block linears
are read out as `QuantizedWeight`s (codes, scale, integer zero-point) so they are evaluated and
counted like every other row. AWQ also rescales the RMSNorm weights, so the returned model, not only
its linears, is what gets evaluated.

- `llmc-gptq`: GPTQModifier without activation order (columns in natural order, group scales and
  zero-points from the unmodified weight, as llm-compressor always fixes them).
- `llmc-gptq-act`: the same with `actorder="static"`: columns by decreasing Hessian diagonal.
- `llmc-awq`: AWQModifier (activation-aware scale search) followed by round-to-nearest.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

if TYPE_CHECKING:  # `quept serve` imports this module through the CLI and never transformers
    from transformers import PreTrainedTokenizerBase

from quept_core.layers import model_linear_names
from quept_core.quant.grid import QuantizedWeight

DAMPING = 0.01  # GPTQ's damping, as a fraction of the mean Hessian diagonal (also our GPTQ's)
EXTRA_HINT = "install the baselines extra: bash deploy/install-baselines.sh"


@dataclass(frozen=True)
class LlmcMethod:
    algorithm: str  # "gptq" or "awq"
    actorder: str | None = None


LLMC_METHODS: dict[str, LlmcMethod] = {
    "llmc-gptq": LlmcMethod("gptq"),
    "llmc-gptq-act": LlmcMethod("gptq", actorder="static"),
    "llmc-awq": LlmcMethod("awq"),
}


def available() -> bool:
    return importlib.util.find_spec("llmcompressor") is not None


@functools.cache
def _quiet_logs() -> None:
    """llm-compressor logs every layer at INFO: only its warnings, on stderr."""
    from llmcompressor.logger import LoggerConfig, configure_logger
    from loguru import logger

    configure_logger(LoggerConfig(console_log_level=None))
    # Its per-layer METRIC level ranks above WARNING: keep it out by name.
    logger.add(sys.stderr, level="WARNING", filter=lambda record: record["level"].name != "METRIC")


def _weight_args(bits: int, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs

    if group_size == -1:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="channel")
    return QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                            group_size=group_size)


def _recipe(method: LlmcMethod, bits: int, group_size: int) -> list:
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    scheme = {"weights": QuantizationScheme(targets=["Linear"], weights=_weight_args(bits, group_size))}
    common = {"config_groups": scheme, "ignore": ["lm_head"]}
    if method.algorithm == "gptq":
        return [GPTQModifier(**common, actorder=method.actorder, dampening_frac=DAMPING)]
    return [AWQModifier(), QuantizationModifier(**common)]


def undivided_widths(model: nn.Module, group_size: int) -> list[int]:
    """The input widths of the model's block linears that `group_size` does not divide. llm-compressor's
    observers cut every row into whole groups, so it cannot quantize them (ours zero-pad a short last
    group: 128 at 7 bits on SmolLM2's 576 columns)."""
    if group_size == -1:
        return []
    widths = {model.get_submodule(name).in_features for name in model_linear_names(model)}
    return sorted(width for width in widths if width % group_size)


def _allow_cpu_only() -> None:
    """AWQ pins its cached activations for faster copies to an accelerator; without one, pinning raises.

    Pinning only changes transfer speed, so on a machine without an accelerator it is skipped.
    """
    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def read_quantized(module: nn.Module, bits: int, group_size: int) -> QuantizedWeight:
    """The integer form of a linear as llm-compressor quantizes it (signed codes shifted to 0..2^b-1)."""
    weight = module.weight.detach().float()
    scale = module.weight_scale.detach().float()
    zero = module.weight_zero_point.detach().float()
    in_features = weight.shape[1]
    group = in_features if group_size == -1 else group_size
    column_scale = scale.repeat_interleave(group, dim=1)[:, :in_features]
    column_zero = zero.repeat_interleave(group, dim=1)[:, :in_features]
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = (torch.round(weight / column_scale) + column_zero).clamp(low, high) - low
    return QuantizedWeight(codes.to(torch.uint8), scale, zero - low, bits, group_size)


def llmc_quantize(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, tokens: torch.Tensor, method: str, bits: int,
    group_size: int,
) -> tuple[nn.Module, dict[str, QuantizedWeight]]:
    """Quantize a copy of `model` with llm-compressor on calibration `tokens` [n, T].

    `model.config.name_or_path` must be its model folder (llm-compressor reads the config from it).
    Returns the quantized copy and {linear name: QuantizedWeight} of its decoder-block linears.
    """
    # llm-compressor logs to stdout, from its import on: keep stdout for `quept eval --json`.
    with contextlib.redirect_stdout(sys.stderr):
        from llmcompressor import oneshot

        _quiet_logs()
        _allow_cpu_only()
        quantized = copy.deepcopy(model)
        samples = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in tokens.cpu()]
        oneshot(model=quantized, processor=tokenizer, dataset=DataLoader(samples, batch_size=1),
                recipe=_recipe(LLMC_METHODS[method], bits, group_size), pipeline="sequential",
                num_calibration_samples=len(samples))
    table = {name: read_quantized(quantized.get_submodule(name), bits, group_size)
             for name in model_linear_names(quantized)}
    return quantized, table
