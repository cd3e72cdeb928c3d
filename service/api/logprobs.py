"""Log-probability views of generated tokens, in each route family's shape.

OpenAI chat: `logprobs.content[{token, logprob, bytes, top_logprobs}]`; legacy completions:
`logprobs{tokens, token_logprobs, top_logprobs, text_offset}`; native (TGI's `details: true`):
`details{tokens[{id, text, logprob, special}], top_tokens}`. The values are the raw model's natural
log-probabilities (before penalty, temperature and top-k/top-p), as the engine reports them.
"""

from __future__ import annotations

from functools import lru_cache

from quept_core.runtime.protocol import TokenLogprob
from quept_core.runtime.tokenizer import Tokenizer
from service.api.schemas import Details, TokenDetail
from service.engine.scheduler import TokenOut


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a token's string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return {char: b for b, char in chars.items()}


_BYTE_OF = _byte_decoder()


class TokenTexts:
    """A token id's bytes and text: a token of a byte-level tokenizer may hold part of a character, so
    its bytes come from its byte-level string, not from decoding it alone."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        decoder = tokenizer.backend_tokenizer.decoder
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._special = frozenset(tokenizer.all_special_ids)
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        found = self._bytes.get(token_id)
        if found is None:
            found = self._bytes[token_id] = self._lookup(token_id)
        return found

    def _lookup(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_level and token_id not in self._special and all(char in _BYTE_OF for char in piece):
            return bytes(_BYTE_OF[char] for char in piece)
        return self._tokenizer.decode([token_id]).encode()

    def text(self, token_id: int) -> str:
        """Its bytes as text; an incomplete character shows as U+FFFD (its bytes are exact)."""
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def special(self, token_id: int) -> bool:
        return token_id in self._special


@lru_cache(maxsize=4)
def token_texts(tokenizer: Tokenizer) -> TokenTexts:
    return TokenTexts(tokenizer)


def _openai_token(entry: TokenLogprob, texts: TokenTexts) -> dict:
    return {"token": texts.text(entry.token_id), "logprob": entry.logprob, "bytes": list(texts.bytes(entry.token_id))}


def chat_logprobs(tokens: list[TokenOut], texts: TokenTexts) -> dict:
    """OpenAI chat's `choices[i].logprobs`: per token, its log-probability and the likeliest alternatives."""
    content = [{**_openai_token(t.logprob, texts), "top_logprobs": [_openai_token(a, texts) for a in t.top_logprobs]}
               for t in tokens]
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[TokenOut], texts: TokenTexts, start: int = 0) -> dict:
    """Legacy completions' `choices[i].logprobs`; `text_offset` counts characters of the completion from
    `start` (where these tokens begin), and each `top_logprobs` map holds the chosen token too, as OpenAI's."""
    offsets = []
    for token in tokens:
        offsets.append(start)
        start += len(token.text)
    return {"tokens": [texts.text(t.token_id) for t in tokens],
            "token_logprobs": [t.logprob.logprob for t in tokens],
            "top_logprobs": [{texts.text(a.token_id): a.logprob for a in (*t.top_logprobs, t.logprob)}
                             for t in tokens],
            "text_offset": offsets}


def token_detail(entry: TokenLogprob, texts: TokenTexts) -> TokenDetail:
    return TokenDetail(id=entry.token_id, text=texts.text(entry.token_id), logprob=entry.logprob,
                       special=texts.special(entry.token_id))


def details(tokens: tuple[TokenOut, ...], texts: TokenTexts) -> Details:
    """The native route's `details` (TGI's shape): each token, and its `top_n_tokens` alternatives."""
    return Details(tokens=[token_detail(t.logprob, texts) for t in tokens],
                   top_tokens=[[token_detail(a, texts) for a in t.top_logprobs] for t in tokens])
