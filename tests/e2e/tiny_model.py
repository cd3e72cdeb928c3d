"""A tiny random-weight LLaMA saved as a Hugging Face folder with the default model's tokenizer.

`quept calibrate` and `quept serve` take it like any local model folder; the fault tests use it where
the default model's size would only cost time (calibration kill and resume).

    python -m tests.e2e.tiny_model OUT_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from quept_core.io.models import DEFAULT_MODEL, float_folder, resolve_model


def write_tiny_model(folder: Path, layers: int = 4, seed: int = 0) -> Path:
    """Save a 4-layer, hidden-64 LLaMA with the default model's tokenizer and vocabulary to `folder`."""
    tokenizer = AutoTokenizer.from_pretrained(float_folder(resolve_model(DEFAULT_MODEL))[0])
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(write_tiny_model(Path(sys.argv[1])))
