"""A tiny random-weight LLaMA wrapped as a LoadedModel, with non-zero LoRA so that packs see W + R."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quept_core.config import BitConfig
from quept_core.io.models import LoadedModel
from quept_core.quant.elastic import ElasticLinear, make_elastic

VOCAB = 256


def tiny_config(**overrides) -> LlamaConfig:
    values = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 256, "tie_word_embeddings": True,
                  "eos_token_id": VOCAB - 1, "bos_token_id": 1, "pad_token_id": 0}
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tokenizer.eos_token = f"t{VOCAB - 1}"
    return tokenizer


def tiny_loaded(seed: int = 0, **overrides) -> LoadedModel:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval()
    model.requires_grad_(False)
    return LoadedModel("tiny", model, tiny_tokenizer(), "0" * 64, None)


def tiny_elastic(loaded: LoadedModel, seed: int = 0) -> dict[str, ElasticLinear]:
    """Elastic linears with a small random LoRA correction, as after calibration."""
    elastic = make_elastic(loaded.model, BitConfig(), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for linear in elastic.values():
        linear.lora_B.data.normal_(0, 0.002, generator=generator)
        for logits in list(linear.clip_up.values()) + list(linear.clip_low.values()):
            logits.data.uniform_(2.0, 6.0, generator=generator)
    return elastic
