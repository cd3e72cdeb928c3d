"""Token ids to text, one token at a time, with stop strings.

Decoding each new token alone breaks multi-byte characters and word-initial spaces, so the
stream decodes a short window ending at the new token and keeps only the text that window adds
(the incremental scheme of TGI and vLLM). Text that could be the start of a stop string is held
back from `released` until it is known not to be one.
"""

from __future__ import annotations

from dataclasses import dataclass

from quept_core.runtime.tokenizer import Tokenizer

_PROMPT_CONTEXT = 5  # prompt tokens that seed the window, so the first token decodes in context


@dataclass(frozen=True)
class Piece:
    token_text: str  # the text this token added ("" while a multi-byte character is incomplete)
    released: str  # new text that is safe to show: it can no longer become part of a stop string
    stopped: bool  # a stop string appeared; the text ends before it


class TextStream:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._text = ""
        self._released = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The generated text so far, ending before a stop string if one appeared."""
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> Piece:
        if self.stopped:
            return Piece("", "", True)
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return Piece("", "", False)
        token_text = after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        search_from = max(0, len(self._text) - max((len(s) for s in self._stop), default=0))
        self._text += token_text
        cut = self._first_stop(search_from)
        if cut is not None:
            self._text = self._text[:cut]
            self.stopped = True
            return Piece(token_text, self._release(len(self._text)), True)
        return Piece(token_text, self._release(len(self._text) - self._partial_stop_suffix()), False)

    def flush(self) -> str:
        """Release held-back text once generation has ended without a stop string."""
        return self._release(len(self._text))

    def _release(self, end: int) -> str:
        end = max(end, self._released)
        released, self._released = self._text[self._released:end], end
        return released

    def _first_stop(self, start: int) -> int | None:
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of the text that is a proper start of some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
