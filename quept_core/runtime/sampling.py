"""Next-token choice per sequence: greedy, or temperature / top-k / top-p sampling with repetition penalty."""

from __future__ import annotations

import torch

from quept_core.runtime.protocol import SamplingParams


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


class Sampler:
    """Chooses the next token of every sequence in a batch from float32 logits [batch, vocab]."""

    def __init__(self, params: list[SamplingParams], prompts: list[list[int]], vocab: int, device: torch.device):
        self.params = params
        self.device = device
        self.greedy = all(p.temperature == 0 for p in params)
        penalties = [p.repetition_penalty for p in params]
        self.penalty = None
        if any(p != 1.0 for p in penalties):
            self.penalty = torch.tensor(penalties, device=device).unsqueeze(1)
            self.seen = torch.zeros(len(params), vocab, dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                self.seen[row, torch.tensor(prompt, device=device)] = True
        self.generators = []
        for p in params:
            generator = None
            if p.temperature > 0 and p.seed is not None:
                generator = torch.Generator(device=device).manual_seed(p.seed)
            self.generators.append(generator)

    def keep_rows(self, rows: list[int]) -> None:
        self.params = [self.params[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        if self.penalty is not None:
            index = torch.tensor(rows, device=self.device)
            self.penalty = self.penalty[index]
            self.seen = self.seen[index]

    def __call__(self, logits: torch.Tensor) -> list[int]:
        if self.penalty is not None:
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.greedy:
            chosen = logits.argmax(dim=-1)
        else:
            chosen = torch.stack([self._sample_row(logits[row], row) for row in range(logits.shape[0])])
        if self.penalty is not None:
            self.seen[torch.arange(len(chosen), device=self.device), chosen] = True
        return chosen.tolist()

    def _sample_row(self, logits: torch.Tensor, row: int) -> torch.Tensor:
        params = self.params[row]
        if params.temperature == 0:
            return logits.argmax()
        logits = logits / params.temperature
        if params.top_k > 0:
            kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Drop a token once the mass before it already reaches top_p (the first token always stays).
            drop = cumulative - sorted_logits.softmax(-1) >= params.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generators[row])[0]
