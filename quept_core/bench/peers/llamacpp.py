"""llama.cpp on the same GGUF file, for `quept bench` only (the optional `bench` extra).

It reads the same token ids as the other rows (loading: `quept_core.io.llamacpp`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from quept_core.bench.results import Speed
from quept_core.io.llamacpp import available, load_llama, window_nll

__all__ = ["LlamaCppPeer", "available"]


class LlamaCppPeer:
    """One GGUF file loaded in llama.cpp; batch-1 speed (llama-cpp-python has no batch decode) and perplexity."""

    def __init__(self, path: Path, prompt_tokens: int, new_tokens: int):
        self.path = path
        self.llama = load_llama(path, n_ctx=prompt_tokens + new_tokens + 8, logits_all=False)

    def speed(self, prompts: torch.Tensor, new_tokens: int) -> Speed:
        prompt = prompts[0].tolist()
        llama = self.llama
        llama.reset()
        start = time.perf_counter()
        llama.eval(prompt)
        prefill = time.perf_counter() - start
        token = int(np.argmax(llama.scores[llama.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            llama.eval([token])
            token = int(np.argmax(llama.scores[llama.n_tokens - 1]))
        return Speed.at_batch(1, (new_tokens - 1) / (time.perf_counter() - start), len(prompt) / prefill)

    def perplexity(self, tokens: torch.Tensor, seqlen: int) -> float:
        count = tokens.numel() // seqlen
        windows = tokens[: count * seqlen].view(count, seqlen)
        nll = window_nll(load_llama(self.path, n_ctx=seqlen, logits_all=True), windows)
        return math.exp(float(nll.sum()) / (count * (seqlen - 1)))

    @property
    def precision(self) -> str:
        """The GGUF file's quantization label from its name (e.g. `q4_1`), else `gguf`."""
        stem = self.path.stem.lower()
        for part in reversed(stem.replace("-", ".").split(".")):
            if part.startswith(("q", "f16", "bf16", "f32")) and any(c.isdigit() for c in part):
                return part
        return "gguf"
