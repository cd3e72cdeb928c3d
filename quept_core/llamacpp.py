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


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _load(path: Path, n_ctx: int, logits_all: bool):
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=torch.get_num_threads(),
                            logits_all=logits_all, verbose=False, use_extra_bufts=False)
    return llama


def measure(path: Path, prompts: torch.Tensor, config, ppl_tokens: torch.Tensor | None):
    """Prefill and batch-1 decode speed, file size and perplexity; llama-cpp-python has no batch decode."""
    from quept_core.bench import BenchRow

    prompt = prompts[0].tolist()
    llama = _load(path, n_ctx=len(prompt) + config.new_tokens + 8, logits_all=False)
    llama.eval(prompt[:16])  # warm-up
    llama.reset()
    start = time.perf_counter()
    llama.eval(prompt)
    prefill = time.perf_counter() - start
    token = int(np.argmax(llama.scores[llama.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(config.new_tokens - 1):
        llama.eval([token])
        token = int(np.argmax(llama.scores[llama.n_tokens - 1]))
    decode = (config.new_tokens - 1) / (time.perf_counter() - start)
    ppl = None
    if ppl_tokens is not None:
        ppl = _perplexity(path, ppl_tokens, config.seqlen)
    return BenchRow("llama.cpp", _file_type(path), len(prompt) / prefill, decode, None, path.stat().st_size, ppl)


def _perplexity(path: Path, tokens: torch.Tensor, seqlen: int) -> float:
    llama = _load(path, n_ctx=seqlen, logits_all=True)
    count = tokens.numel() // seqlen
    total = 0.0
    for window in tokens[: count * seqlen].view(count, seqlen).tolist():
        llama.reset()
        llama.eval(window)
        logits = torch.from_numpy(np.asarray(llama.scores[: seqlen - 1], dtype=np.float32))
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
    return math.exp(total / (count * (seqlen - 1)))


def _file_type(path: Path) -> str:
    """The GGUF file's quantization label from its name (e.g. `q4_1`), else `gguf`."""
    stem = path.stem.lower()
    for part in reversed(stem.replace("-", ".").split(".")):
        if part.startswith(("q", "f16", "bf16", "f32")) and any(c.isdigit() for c in part):
            return part
    return "gguf"
