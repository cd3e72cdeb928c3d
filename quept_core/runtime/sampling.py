"""Next-token choice for every running sequence: greedy, or temperature / top-k / top-p sampling with
repetition penalty, and the log-probabilities a request asks for. Log-probabilities are those of the
raw model: the log-softmax of the logits before penalty, temperature, top-k and top-p (vLLM's default,
"raw_logprobs"), so they compare across requests whatever their sampling settings.

State lives per KV slot (a sequence's generator and the tokens it has seen), so sequences join and
leave the running set without touching each other. The common case, every row greedy with no
penalty and no log-probabilities, is one argmax on the device and one transfer of the chosen ids.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from quept_core.runtime.protocol import SamplingParams, TokenLogprob

MAX_TOP_LOGPROBS = 20
# Any temperature and repetition penalty the API accepts (positive floats, 5e-324 to 1.8e308) are applied
# within these bounds, which keep float32 logits finite (|logit| stays under about 1e3 * PENALTY_LIMIT /
# MIN_TEMPERATURE = 1e30): beyond them the draw is already the same, greedy or uniform among the repeats.
PENALTY_LIMIT = 1e20
MIN_TEMPERATURE = 1e-7


class RequestError(ValueError):
    """A generation request that cannot run; the message names the field and what is allowed."""


def check_sampling(params: SamplingParams) -> None:
    if params.max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise RequestError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise RequestError(f"top_k must be >= 0 (0: off), got {params.top_k}")
    if params.repetition_penalty <= 0:
        raise RequestError(f"repetition_penalty must be > 0, got {params.repetition_penalty}")
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS} (top alternatives), got {params.logprobs}")


@dataclass(frozen=True)
class Choice:
    token_id: int
    logprob: TokenLogprob | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()


class Sampler:
    """Per-slot sampling state and the choice of one token per row from float32 logits [rows, vocab]."""

    def __init__(self, slots: int, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.params: list[SamplingParams | None] = [None] * slots
        self.generators: list[torch.Generator | None] = [None] * slots
        self.seen: torch.Tensor | None = None  # bool [slots, vocab], allocated on the first penalty
        self._order: list[int] = []
        self._plain = True
        self._penalty: torch.Tensor | None = None
        self._slot_index: torch.Tensor | None = None

    def add(self, slot: int, params: SamplingParams, prompt_ids: list[int]) -> None:
        check_sampling(params)
        self.params[slot] = params = _within_bounds(params)
        sampled = params.temperature > 0
        self.generators[slot] = (torch.Generator(device=self.device).manual_seed(params.seed)
                                 if sampled and params.seed is not None else None)
        if params.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(len(self.params), self.vocab, dtype=torch.bool, device=self.device)
            self.seen[slot] = False
            self.seen[slot, torch.tensor(prompt_ids, device=self.device)] = True

    def remove(self, slot: int) -> None:
        self.params[slot] = None
        self.generators[slot] = None

    def set_order(self, slots: list[int]) -> None:
        """The slots of the rows of the next steps' logits, in row order (once per change of the set)."""
        self._order = list(slots)
        params = [self.params[s] for s in slots]
        self._plain = all(p.temperature == 0 and p.repetition_penalty == 1.0 and p.logprobs is None for p in params)
        penalties = [p.repetition_penalty for p in params]
        self._penalty = None
        if any(p != 1.0 for p in penalties):
            self._penalty = torch.tensor(penalties, device=self.device).unsqueeze(1)
        self._slot_index = torch.tensor(slots, dtype=torch.long, device=self.device)

    def sample_slot(self, logits: torch.Tensor, slot: int) -> Choice:
        """One token for one slot from logits [1, vocab] (a prefill's), leaving the rows' order as it is."""
        params, raw = self.params[slot], logits[0]
        row = raw
        if params.repetition_penalty != 1.0:
            row = torch.where(self.seen[slot], _penalised(raw, params.repetition_penalty), raw)
        choice = self._choose(row, raw, slot)
        if params.repetition_penalty != 1.0:
            self.seen[slot, choice.token_id] = True
        return choice

    def __call__(self, logits: torch.Tensor) -> list[Choice]:
        if self._plain:
            return [Choice(t) for t in logits.argmax(dim=-1).tolist()]
        raw = logits
        if self._penalty is not None:
            seen = self.seen.index_select(0, self._slot_index)
            logits = torch.where(seen, _penalised(logits, self._penalty), logits)
        choices = [self._choose(logits[row], raw[row], slot) for row, slot in enumerate(self._order)]
        if self._penalty is not None:
            chosen = torch.tensor([c.token_id for c in choices], device=self.device)
            self.seen[self._slot_index, chosen] = True
        return choices

    def _choose(self, logits: torch.Tensor, raw: torch.Tensor, slot: int) -> Choice:
        """The token drawn from the processed `logits`; log-probabilities from the `raw` ones."""
        params = self.params[slot]
        if params.temperature == 0:
            token = int(logits.argmax())
        else:
            logits = _filtered(logits / params.temperature, params)
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=self.generators[slot])[0])
        if params.logprobs is None:
            return Choice(token)
        return Choice(token, *_logprobs(raw, token, params.logprobs))


def _within_bounds(params: SamplingParams) -> SamplingParams:
    """`params` with the temperature (when sampling) and the repetition penalty inside the bounds above."""
    penalty = min(max(params.repetition_penalty, 1 / PENALTY_LIMIT), PENALTY_LIMIT)
    temperature = max(params.temperature, MIN_TEMPERATURE) if params.temperature > 0 else params.temperature
    return replace(params, repetition_penalty=penalty, temperature=temperature)


def _penalised(logits: torch.Tensor, penalty: torch.Tensor | float) -> torch.Tensor:
    """Repetition penalty (CTRL's): positive logits divided by it, negative ones multiplied."""
    return torch.where(logits > 0, logits / penalty, logits * penalty)


def _logprobs(raw: torch.Tensor, token: int, k: int) -> tuple[TokenLogprob, tuple[TokenLogprob, ...]]:
    """The chosen token's log-probability under the raw model, and the k likeliest tokens'."""
    logprobs = raw.log_softmax(-1)
    top = torch.topk(logprobs, k)
    alternatives = tuple(TokenLogprob(t, v) for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token])), alternatives


def _filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Top-k, then top-p: tokens outside them get -inf."""
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits
