"""Model resolution and loading: the errors a user meets, and a local Hugging Face folder."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quept_core.io.models import ModelError, load_model, resolve_model


def _tiny_tokenizer(folder: Path) -> None:
    vocab = {f"t{i}": i for i in range(64)} | {"<unk>": 64}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelError, match="smollm2-135m"):
        resolve_model("no-such-model")


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "absent.gguf"))


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_non_llama_folder_is_rejected(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=65)).save_pretrained(tmp_path)
    _tiny_tokenizer(tmp_path)
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported"):
        load_model(str(tmp_path))


def test_local_llama_folder_loads_with_checksum(tmp_path):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=65)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    _tiny_tokenizer(tmp_path)
    first = load_model(str(tmp_path))
    second = load_model(str(tmp_path))
    assert first.name == tmp_path.name
    assert len(first.checksum) == 64 and first.checksum == second.checksum
    assert not any(p.requires_grad for p in first.model.parameters())
