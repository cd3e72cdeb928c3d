"""llama.cpp on the same GGUF file, for `quept bench` only (the optional `bench` extra).

It reads the same token ids as the other rows. Its own extra buffer types are turned off: ggml's
AMX path crashes on the first token on some Xeons.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch

from quept_core.bench.results import Speed


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _load(path: Path, n_ctx: int, logits_all: bool):
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    # The Llama() constructor does not expose use_extra_bufts: patch the defaults it starts from.
    defaults = low_level.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=torch.get_num_threads(),
                               logits_all=logits_all, verbose=False)
    finally:
        low_level.llama_model_default_params = defaults


class LlamaCppPeer:
    """One GGUF file loaded in llama.cpp; batch-1 speed (llama-cpp-python has no batch decode) and perplexity."""

    def __init__(self, path: Path, prompt_tokens: int, new_tokens: int):
        self.path = path
        self.llama = _load(path, n_ctx=prompt_tokens + new_tokens + 8, logits_all=False)

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
        return Speed(len(prompt) / prefill, (new_tokens - 1) / (time.perf_counter() - start))

    def perplexity(self, tokens: torch.Tensor, seqlen: int) -> float:
        llama = _load(self.path, n_ctx=seqlen, logits_all=True)
        count = tokens.numel() // seqlen
        total = 0.0
        for window in tokens[: count * seqlen].view(count, seqlen).tolist():
            llama.reset()
            llama.eval(window)
            logits = torch.from_numpy(np.asarray(llama.scores[: seqlen - 1], dtype=np.float32))
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
        return math.exp(total / (count * (seqlen - 1)))

    @property
    def precision(self) -> str:
        """The GGUF file's quantization label from its name (e.g. `q4_1`), else `gguf`."""
        stem = self.path.stem.lower()
        for part in reversed(stem.replace("-", ".").split(".")):
            if part.startswith(("q", "f16", "bf16", "f32")) and any(c.isdigit() for c in part):
                return part
        return "gguf"
