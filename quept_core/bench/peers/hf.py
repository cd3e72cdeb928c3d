"""transformers' own `generate` in full precision: the baseline row of `quept bench`."""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from quept_core.bench.results import BenchConfig, Speed


class _StepClock(LogitsProcessor):
    """Timestamps every generation step: the first comes right after the prefill forward pass."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def _hf_generate(model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second) of transformers' `generate`, greedy, fixed length."""
    clock = _StepClock()
    start = time.perf_counter()
    model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    decode = (len(clock.times) - 1) * prompts.shape[0] / max(clock.times[-1] - clock.times[0], 1e-9)
    return clock.times[0] - start, decode


@torch.inference_mode()
def hf_speed(model, prompts: torch.Tensor, config: BenchConfig, batch: int) -> Speed:
    """transformers' `generate` in full precision (the baseline), `batch` prompts at once."""
    prefill_s, decode = _hf_generate(model, prompts[:batch], config.new_tokens)
    return Speed.at_batch(batch, decode, prompts.shape[1] / prefill_s if batch == 1 else None)
