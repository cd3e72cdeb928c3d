"""A tiny random-weight LLaMA written as an F32 GGUF file llama.cpp loads, next to the same model in torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Rows of 256: llama.cpp's k-quants need a multiple of 256 columns, else it falls back to another type.
CONFIG = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0}


def tiny_gguf_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    model.requires_grad_(False)
    return model


def _to_llamacpp_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Transformers' rotate-half q/k rows to llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(CONFIG["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_token_scores([0.0] * config.vocab_size)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (config.vocab_size - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    tensors = {"token_embd.weight": model.model.embed_tokens.weight,
               "output_norm.weight": model.model.norm.weight, "output.weight": model.lm_head.weight}
    for index, layer in enumerate(model.model.layers):
        for path_in_block, name in names.items():
            weight = layer.get_submodule(path_in_block).weight
            if name == "attn_q":
                weight = _to_llamacpp_rope(weight, config.num_attention_heads)
            elif name == "attn_k":
                weight = _to_llamacpp_rope(weight, config.num_key_value_heads)
            tensors[f"blk.{index}.{name}.weight"] = weight
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.detach().float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
