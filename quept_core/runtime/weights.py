"""What the engine reads from a calibrated model: its config, norms and every (linear, bits) weight.

Two sources answer the same questions:
- `ElasticWeights` quantizes the calibrated elastic linears on demand (the float masters and LoRA
  factors stay in memory): for calibration-time checks, tests and evaluation;
- `ServingStore` (`quept_core/artifact/serving.py`) reads a folder on disk holding the integer codes
  of every (linear, bits) and the bf16 weights once, so a serving process needs neither the
  transformers model nor the masters.

Names: a linear's full module name (`model.layers.3.self_attn.q_proj`), `HEAD` (the output head, tied
to the embedding in small LLaMAs), `EMBEDDING` (the input embedding of an untied model), and norms
by module name (`model.layers.3.input_layernorm`, `model.layers.3.post_attention_layernorm`, `model.norm`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # a serving process never imports transformers (runtime/tokenizer.py says why)
    from transformers import PretrainedConfig

from quept_core.config import BitConfig
from quept_core.io.models import LoadedModel
from quept_core.layers import HEAD
from quept_core.quant.elastic import ElasticLinear
from quept_core.quant.grid import QuantizedWeight, quantize

EMBEDDING = "model.embed_tokens"
FINAL_NORM = "model.norm"
# The output head's (and tied embedding's) group size at every width. It is rounded to nearest when a
# store or an engine is built, never calibrated, so it is no setting of the bit config. Served at 8
# bits, one group per row cost +0.06-0.07 perplexity at w6 and w8 against a full-precision head, groups
# of 64 nothing measurable (docs/benchmarks.md, "The output head's grid"); serving stores of format 3
# and later hold the head on this grid.
HEAD_GROUP_SIZE = 64


def group_size(bit_config: BitConfig, name: str, bits: int) -> int:
    """The group size of a weight's grid at `bits`: the output head's, or a calibrated linear's."""
    return HEAD_GROUP_SIZE if name == HEAD else bit_config.group_size_for(bits)


def norm_names(n_layers: int) -> list[str]:
    """Every RMSNorm weight: each block's input and post-attention norms, then the final norm."""
    return [f"model.layers.{i}.{kind}" for i in range(n_layers)
            for kind in ("input_layernorm", "post_attention_layernorm")] + [FINAL_NORM]


class ServingWeights(Protocol):
    config: PretrainedConfig  # the transformers config (dimensions, RoPE)
    bit_config: BitConfig
    tied: bool  # the output head shares the input embedding's weight

    def quantized(self, name: str, bits: int) -> QuantizedWeight:
        """A linear (or HEAD) at `bits`, on the bit config's grid."""

    def dense(self, name: str) -> torch.Tensor:
        """A linear's, HEAD's or EMBEDDING's full-precision weight [out, in] (float32 or bf16)."""

    def norm(self, name: str) -> torch.Tensor:
        """An RMSNorm weight [hidden]."""


class ElasticWeights:
    """ServingWeights over a loaded model and its calibrated elastic linears (kept in memory)."""

    def __init__(self, loaded: LoadedModel, elastic: Mapping[str, ElasticLinear], bit_config: BitConfig | None = None):
        self.model = loaded.model
        self.config = loaded.model.config
        self.elastic = dict(elastic)
        self.bit_config = bit_config or next(iter(self.elastic.values())).bit_config
        inner = loaded.model.model
        self.tied = loaded.model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()

    def quantized(self, name: str, bits: int) -> QuantizedWeight:
        if name == HEAD:
            return quantize(self.model.lm_head.weight.detach(), bits, HEAD_GROUP_SIZE)
        return self.elastic[name].quantize(bits)

    def dense(self, name: str) -> torch.Tensor:
        if name == HEAD:
            return self.model.lm_head.weight.detach()
        if name == EMBEDDING:
            return self.model.model.embed_tokens.weight.detach()
        return self.elastic[name].weight.detach()

    def norm(self, name: str) -> torch.Tensor:
        return self.model.get_submodule(name).weight.detach()
