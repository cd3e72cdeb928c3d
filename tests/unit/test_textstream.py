from service.engine.textstream import TextStream
from tests.unit.fakes import byte_tokenizer


def push_all(stream: TextStream, text: str):
    tokenizer = byte_tokenizer()
    return [stream.push(token) for token in tokenizer(text, add_special_tokens=False).input_ids]


def test_multi_byte_characters_appear_once_complete():
    tokenizer = byte_tokenizer()
    stream = TextStream(tokenizer, tokenizer("Say:").input_ids)
    pieces = push_all(stream, "né €")
    assert [p.token_text for p in pieces] == ["n", "", "é", " ", "", "", "€"]
    assert "".join(p.released for p in pieces) == "né €" == stream.text


def test_stop_string_ends_the_text_before_it():
    tokenizer = byte_tokenizer()
    stream = TextStream(tokenizer, [65], stop=("END",))
    pieces = push_all(stream, "abcENDxyz")
    stopped_at = next(i for i, p in enumerate(pieces) if p.stopped)
    assert stopped_at == 5  # the "D" completes the stop string
    assert stream.text == "abc"
    assert "".join(p.released for p in pieces) == "abc"


def test_text_that_may_start_a_stop_string_is_held_back_then_released():
    tokenizer = byte_tokenizer()
    stream = TextStream(tokenizer, [65], stop=("END",))
    pieces = push_all(stream, "abEN")
    assert "".join(p.released for p in pieces) == "ab"  # "EN" could still become "END"
    assert stream.flush() == "EN"
    assert stream.text == "abEN"


def test_the_earliest_of_several_stop_strings_wins():
    tokenizer = byte_tokenizer()
    stream = TextStream(tokenizer, [65], stop=("xyz", "b"))
    push_all(stream, "abxyz")
    assert stream.text == "a" and stream.stopped


def test_special_tokens_add_no_text():
    tokenizer = byte_tokenizer()
    stream = TextStream(tokenizer, [65])
    push_all(stream, "hi")
    piece = stream.push(tokenizer.eos_token_id)
    assert piece.token_text == "" and stream.text == "hi"
