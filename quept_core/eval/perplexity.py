"""Perplexity, following the project's convention (shared/data/README.md).

The whole text is one string with `\\r\\n` normalised to `\\n`, tokenized once, cut into
non-overlapping windows of `seqlen` tokens with the tail dropped; perplexity is exp of the mean
token negative log-likelihood over every predicted token of every window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from quept_core.quant.blockwise import model_device
from quept_core.runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    from quept_core.planning.plan import Plan
    from quept_core.runtime.engine import QueptEngine

# Rows of the output head evaluated at once: bounds the [rows, vocab] logits held in memory.
HEAD_CHUNK = 2048


class EvaluationError(ValueError):
    """The text or the window settings cannot produce a perplexity; the message says why."""


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    mean_nll: float
    predicted_tokens: int  # windows x (seqlen - 1)


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"--text: file not found: {path}")
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def tokenize_text(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once, as a 1-D LongTensor."""
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def make_windows(token_ids: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] from the first `max_tokens` tokens, tail dropped."""
    if seqlen < 2:
        raise EvaluationError(f"--seqlen must be at least 2, got {seqlen}")
    if max_tokens is not None:
        if max_tokens < seqlen:
            raise EvaluationError(f"--max-tokens ({max_tokens}) must be at least --seqlen ({seqlen})")
        token_ids = token_ids[:max_tokens]
    count = token_ids.numel() // seqlen
    if count == 0:
        raise EvaluationError(
            f"--seqlen {seqlen} is larger than the text ({token_ids.numel()} tokens); "
            f"allowed: 2..{token_ids.numel()}"
        )
    return token_ids[: count * seqlen].reshape(count, seqlen)


@torch.inference_mode()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Summed next-token NLL of each window, float64 [n_windows]."""
    device = model_device(model)
    head = model.get_output_embeddings()
    sums = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        hidden = model.model(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
        targets = batch[:, 1:]
        per_token = torch.empty(targets.shape, dtype=torch.float64, device=device)
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_out = per_token.view(-1)
        flat_targets = targets.reshape(-1)
        for row in range(0, flat_hidden.shape[0], HEAD_CHUNK):
            logits = head(flat_hidden[row : row + HEAD_CHUNK]).float()
            flat_out[row : row + HEAD_CHUNK] = F.cross_entropy(
                logits, flat_targets[row : row + HEAD_CHUNK], reduction="none"
            ).double()
        sums.append(per_token.sum(dim=1).cpu())
    return torch.cat(sums)


def perplexity_of(nll: torch.Tensor, windows: torch.Tensor) -> Perplexity:
    """Perplexity from each window's summed NLL [n]: every predicted token of every window counts once."""
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    mean = float(nll.sum()) / predicted
    return Perplexity(math.exp(mean), mean, predicted)


@torch.inference_mode()
def engine_token_nll(engine: QueptEngine, plan: Plan, windows: torch.Tensor) -> torch.Tensor:
    """Next-token NLL [n, seqlen - 1] (float64) of each window on the serving engine: its packed
    weights in its dtype, the output head at `plan`'s head bits (prefill's path, one window at a time)."""
    rows = []
    for window in windows:
        logits = engine.logits(window.unsqueeze(0), plan)[0, :-1]
        rows.append(F.cross_entropy(logits.double(), window[1:].to(logits.device), reduction="none").cpu())
    return torch.stack(rows)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> Perplexity:
    return perplexity_of(window_nll(model, windows, batch_size), windows)
