"""Multi-bit token merging (MB-ToMe, QuEPT §4): the next block's calibration input.

A trained block is run once per tier (one sampled bit each). Tokens whose lowest- and
highest-tier outputs agree most (cosine similarity, top `ratio` of each sequence) keep the
high-bit output; every other token takes the λ-weighted mix of all tiers. Calibration only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def default_tome_weights(n_tiers: int) -> tuple[float, ...]:
    """λ per tier, low -> high: 0.4/0.3/0.3 for three tiers (reference WA), equal weights otherwise."""
    if n_tiers == 3:
        return (0.4, 0.3, 0.3)
    return tuple(1.0 / n_tiers for _ in range(n_tiers))


def keep_mask(similarity: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask [B, N] marking the floor(ratio * N) most similar tokens of each sequence."""
    batch, tokens = similarity.shape
    keep = int(ratio * tokens)
    mask = torch.zeros(batch, tokens, dtype=torch.bool, device=similarity.device)
    if keep > 0:
        mask.scatter_(1, similarity.topk(keep, dim=1).indices, True)
    return mask


def merge_tiers(outputs: Sequence[torch.Tensor], weights: Sequence[float], ratio: float = 0.5) -> torch.Tensor:
    """Merge per-tier block outputs (low -> high, each [B, N, C]) into one [B, N, C] tensor."""
    if len(outputs) != len(weights):
        raise ValueError(f"merge_tiers: {len(outputs)} tier outputs but {len(weights)} weights")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"merge_tiers: ratio must be in [0, 1], got {ratio}")
    low, high = outputs[0], outputs[-1]
    similarity = F.cosine_similarity(low, high, dim=-1)  # [B, N]
    mixed = sum(weight * output for weight, output in zip(weights, outputs, strict=True))
    return torch.where(keep_mask(similarity, ratio).unsqueeze(-1), high, mixed)
