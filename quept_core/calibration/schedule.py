"""The learning-rate schedule both training stages use: cosine decay from 1 to 1 / min_factor."""

from __future__ import annotations

import math


def cosine_factor(total: int, min_factor: float):
    """The LambdaLR factor at each step of `total`: cosine from 1.0 down to 1 / min_factor."""
    floor = 1.0 / min_factor

    def factor(step: int) -> float:
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    return factor
