"""The runtime's RoPE tables are transformers' own, for the default rope and a scaled one."""

import pytest
import torch
from tiny_llama import tiny_config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from quept_core.runtime.model import _rope_frequencies

SCALED = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope", [None, SCALED], ids=["default", "llama3"])
def test_rope_frequencies_match_transformers(rope):
    config = tiny_config(**({} if rope is None else {"rope_parameters": rope}))
    head_dim = config.hidden_size // config.num_attention_heads
    ours, scaling = _rope_frequencies(config, head_dim)
    reference = LlamaRotaryEmbedding(config=config)
    assert config.rope_parameters["rope_type"] == ("default" if rope is None else "llama3")
    torch.testing.assert_close(ours, reference.inv_freq, rtol=0, atol=0)
    assert scaling == reference.attention_scaling
