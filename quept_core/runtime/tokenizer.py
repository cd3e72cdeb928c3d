"""The tokenizer a server runs: a saved Hugging Face tokenizer folder read with the `tokenizers` library
and the model's chat template rendered with jinja2, without transformers.

transformers' tokenizer classes and their imports cost a serving process about 40 MiB and half a second
of start-up for what serving asks of them: encode, decode, the chat template and the special tokens.
`Tokenizer` is that contract. A transformers fast tokenizer meets it too, so the engine runs either
(calibration, evaluation and tests pass the one they loaded the model with); `ServingTokenizer`
reads a folder that `save_pretrained` wrote and gives the same ids, text and prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

# transformers' named special tokens, in its order (its all_special_ids lists them first, then the extras).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer(Protocol):
    """What the engine and the service ask of a tokenizer (transformers' names and meanings)."""

    eos_token_id: int | None
    all_special_ids: list[int]
    backend_tokenizer: RustTokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def convert_ids_to_tokens(self, ids: int) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> str | list[int]: ...


class TokenizerError(Exception):
    """A tokenizer folder lacks what serving reads, or its chat template cannot be used."""


class ServingTokenizer:
    """A tokenizer folder (`tokenizer.json`, `tokenizer_config.json`, the chat template) as `Tokenizer`."""

    def __init__(self, folder: Path | str):
        folder = Path(folder)
        try:
            self.backend_tokenizer = RustTokenizer.from_file(str(folder / "tokenizer.json"))
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except Exception as error:  # noqa: BLE001 (tokenizers raises a bare Exception on a bad file)
            raise TokenizerError(f"{folder}: not a saved fast tokenizer ({error})") from None
        self.special_tokens = {key: _token_text(config[key]) for key in SPECIAL_TOKEN_KEYS if config.get(key)}
        extras = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        extras = list(extras.values()) if isinstance(extras, dict) else extras
        named = list(dict.fromkeys([*self.special_tokens.values(), *map(_token_text, extras)]))
        self.all_special_ids = [self._id(token) for token in named]
        eos = self.special_tokens.get("eos_token")
        self.eos_token_id = None if eos is None else self._id(eos)
        self.chat_template = _chat_template(folder, config)
        self._compiled: jinja2.Template | None = None

    def _id(self, token: str) -> int:
        found = self.backend_tokenizer.token_to_id(token)
        if found is None:
            raise TokenizerError(f"special token {token!r} is not in the vocabulary")
        return found

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int) -> str:
        return self.backend_tokenizer.id_to_token(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> str | list[int]:
        """The conversation as the model's chat template writes it (as transformers renders it: the
        special tokens by name, message keys whose value is None left out)."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template; send a prompt instead of messages")
        if self._compiled is None:
            self._compiled = _environment().from_string(self.chat_template)
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        text = self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **self.special_tokens)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _token_text(value: str | dict) -> str:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken's fields."""
    return value["content"] if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict) -> str | None:
    """`chat_template.jinja` (how transformers 5 saves it), else the config's template (older folders:
    one string, or named templates of which serving uses "default")."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template


class _GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}`, with which templates mark the assistant's text for
    training masks: rendered as its body."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: sandboxed (a template is code from the
    model's folder), blocks trimmed, loop controls, and the helpers templates call."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationBlocks, loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment
