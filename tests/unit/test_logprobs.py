"""Token texts and bytes of the logprob views: a token that holds part of a character keeps its exact bytes."""

from __future__ import annotations

from service.api.logprobs import TokenTexts
from tests.unit.fakes import byte_tokenizer


def test_a_token_with_part_of_a_character_has_its_exact_bytes():
    tokenizer = byte_tokenizer()
    texts = TokenTexts(tokenizer)
    ids = tokenizer("é!", add_special_tokens=False).input_ids
    assert [texts.bytes(i) for i in ids] == [b"\xc3", b"\xa9", b"!"]
    assert [texts.text(i) for i in ids] == ["\ufffd", "\ufffd", "!"]
    assert b"".join(texts.bytes(i) for i in ids).decode() == "é!"


def test_special_tokens_show_their_name():
    tokenizer = byte_tokenizer()
    texts = TokenTexts(tokenizer)
    assert texts.text(tokenizer.eos_token_id) == "<|im_end|>" and texts.special(tokenizer.eos_token_id)
    assert not texts.special(tokenizer("a", add_special_tokens=False).input_ids[0])
