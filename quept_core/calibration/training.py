"""What both training stages share: the learning-rate schedule and the parameters trained for a while."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def cosine_factor(total: int, min_factor: float):
    """The LambdaLR factor at each step of `total`: cosine from 1.0 down to 1 / min_factor."""
    floor = 1.0 / min_factor

    def factor(step: int) -> float:
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    return factor


@contextmanager
def trained(parameters: Sequence[torch.Tensor]) -> Iterator[None]:
    """Let `parameters` take gradients inside the block; frozen again, their gradients dropped, after."""
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)
            parameter.grad = None
