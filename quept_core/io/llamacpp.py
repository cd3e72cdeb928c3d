"""llama.cpp (llama-cpp-python) on a GGUF file: loading it, and each window's next-token NLL.

Used by `quept bench` (speed against the same GGUF file) and `quept eval` (the k-quant rows). Its
extra buffer types are turned off: ggml's AMX path crashes on the first token on some Xeons.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load_llama(path: Path, n_ctx: int, logits_all: bool, n_threads: int | None = None):
    """A `llama_cpp.Llama` on `path`; `logits_all` keeps the logits of every position, not only the last."""
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
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512,
                               n_threads=n_threads or torch.get_num_threads(), logits_all=logits_all,
                               verbose=False)
    finally:
        low_level.llama_model_default_params = defaults


def window_nll(llama, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window [n, T], float64 [n]: positions 0..T-2 predict tokens 1..T-1.

    `llama` must be loaded with `logits_all=True` and `n_ctx >= T`. Each window starts from an empty
    context, as in `quept_core.eval.perplexity`.
    """
    sums = []
    for window in windows.tolist():
        llama.reset()
        llama.eval(window)
        logits = torch.from_numpy(np.asarray(llama.scores[: len(window) - 1], dtype=np.float32))
        nll = torch.nn.functional.cross_entropy(logits.double(), torch.tensor(window[1:]), reduction="sum")
        sums.append(nll)
    return torch.stack(sums)
