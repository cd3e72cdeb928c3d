"""The serving tokenizer gives what transformers gives for the same saved folder (ids, text, special
tokens, chat prompts), says clearly what a folder lacks, and a serving process never imports transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import byte_tokenizer
from jinja2 import TemplateError
from tokenizers import AddedToken
from transformers import AutoTokenizer

from quept_core.runtime.tokenizer import ServingTokenizer, TokenizerError

# Uses what templates in the wild use: the special tokens by name, loop controls, raise_exception,
# tojson (without HTML escaping) and the {% generation %} marks of training templates.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% if m['role'] == 'system' and loop.first %}[sys]{{ m['content'] | tojson }}\n{% continue %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}{% if m.name is defined %} ({{ m.name }}){% endif %}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be <brief> & \"exact\""}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "¿y 3+3? 日本語 🙂", "name": None}],
    [{"role": "user", "content": "named", "name": "ann"}],
]
TEXTS = ["", "hello world", "  leading and trailing  ", "<|im_start|>user\nhi<|im_end|>", "ünïcödé 日本語 🙂\n\t"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    hf = byte_tokenizer()
    hf.add_special_tokens({"extra_special_tokens": [AddedToken("<tool>", special=True)]})
    hf.pad_token = "<|im_end|>"
    hf.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("tokenizer")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(folder):
    return AutoTokenizer.from_pretrained(folder), ServingTokenizer(folder)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("special", [True, False])
def test_encode_matches_transformers(pair, text, special):
    hf, ours = pair
    assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(pair, text, skip):
    hf, ours = pair
    ids = hf.encode(text, add_special_tokens=False) + [hf.eos_token_id]
    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert [ours.convert_ids_to_tokens(i) for i in ids] == [hf.convert_ids_to_tokens(i) for i in ids]


def test_special_tokens_match_transformers(pair):
    hf, ours = pair
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.all_special_ids == hf.all_special_ids
    assert len(ours.all_special_ids) == 3  # bos, eos (also pad), the extra <tool>


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_prompts_match_transformers(pair, conversation, generation_prompt):
    hf, ours = pair
    expected = hf.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False)
    assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False) == expected
    assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt) == \
        ours.encode(expected, add_special_tokens=False)


def test_a_template_that_refuses_a_conversation_raises_its_message(pair):
    _, ours = pair
    with pytest.raises(TemplateError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_an_older_folder_with_the_template_in_its_config_is_read(folder, tmp_path, pair):
    older = tmp_path / "older"
    older.mkdir()
    (older / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": TEMPLATE}]
    (older / "tokenizer_config.json").write_text(json.dumps(config))
    conversation = CONVERSATIONS[1]
    assert ServingTokenizer(older).apply_chat_template(conversation, tokenize=False) == \
        pair[1].apply_chat_template(conversation, tokenize=False)


def test_what_a_folder_lacks_is_named(folder, tmp_path):
    with pytest.raises(TokenizerError, match="not a saved fast tokenizer"):
        ServingTokenizer(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(TokenizerError, match="no chat template"):
        ServingTokenizer(bare).apply_chat_template([{"role": "user", "content": "hi"}])
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<missing>"}))
    with pytest.raises(TokenizerError, match="'<missing>' is not in the vocabulary"):
        ServingTokenizer(bare)


def test_a_serving_process_never_imports_transformers(folder):
    """What `quept serve` imports and builds after its first start, in a fresh interpreter."""
    script = (
        "import sys\n"
        "import service.cli, service.app, service.engine.loading\n"
        "from quept_core.runtime.tokenizer import ServingTokenizer\n"
        f"tokenizer = ServingTokenizer({str(folder)!r})\n"
        "tokenizer.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'transformers'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
