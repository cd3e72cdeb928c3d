"""The typed precision a caller asks for: `auto`, `fp`, a uniform width `w<b>` or a `mixed:<budget>`.

Text is parsed once, at the edge (HTTP, CLI), into a `Precision`; everything behind the edge passes
the typed value. Every precision label (`w4`, `mixed:3.50`, the metric label `mixed`) is built here.

A mixed budget is in storage bits per weight (codes plus each group's 16-bit scale and 8-bit
zero-point), the unit the bit allocator fills; a uniform width is the nominal bit-width of the codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_UNIFORM = re.compile(r"^w([2-8])$")
_MIXED = re.compile(r"^mixed:(\d+(?:\.\d+)?)$")

Kind = Literal["auto", "fp", "uniform", "mixed"]
KINDS: tuple[Kind, ...] = ("auto", "fp", "uniform", "mixed")
MIXED_LABEL = "mixed"  # the metric label of every mixed plan, whatever its budget


class PrecisionError(ValueError):
    """A precision that names nothing servable; the message lists what is allowed."""


@dataclass(frozen=True)
class Precision:
    kind: Kind
    width: int | None = None  # uniform: the bit-width of every quantized linear
    budget_bits: float | None = None  # mixed: storage bits per weight the plan may spend

    def __post_init__(self) -> None:
        if (self.width is not None) != (self.kind == "uniform"):
            raise ValueError(f"a {self.kind} precision {'needs' if self.kind == 'uniform' else 'has no'} width")
        if (self.budget_bits is not None) != (self.kind == "mixed"):
            raise ValueError(f"a {self.kind} precision {'needs' if self.kind == 'mixed' else 'has no'} budget")

    @classmethod
    def uniform(cls, width: int) -> Precision:
        return cls("uniform", width=width)

    @classmethod
    def mixed(cls, budget_bits: float) -> Precision:
        return cls("mixed", budget_bits=round(float(budget_bits), 2))

    @classmethod
    def parse(cls, text: str, bit_set: tuple[int, ...]) -> Precision:
        """`auto`, `fp`, `w<b>` (b in the bit set) or `mixed:<budget>` (within the bit set's range)."""
        value = text.strip().lower()
        if value in ("auto", "fp"):
            return cls(value)
        uniform = _UNIFORM.match(value)
        if uniform and int(uniform.group(1)) in bit_set:
            return cls.uniform(int(uniform.group(1)))
        mixed = _MIXED.match(value)
        if mixed and min(bit_set) <= float(mixed.group(1)) <= max(bit_set):
            return cls.mixed(float(mixed.group(1)))
        raise PrecisionError(f"unknown precision '{text}'; allowed: {', '.join(allowed_precisions(bit_set))}")

    @property
    def name(self) -> str:
        """`auto`, `fp`, `w4` or `mixed:3.50`: how responses and plan tables name it."""
        if self.kind == "uniform":
            return uniform_name(self.width)
        if self.kind == "mixed":
            return f"mixed:{self.budget_bits:.2f}"
        return self.kind

    @property
    def label(self) -> str:
        """The metric label value: `fp`, `w2`..`w8` or `mixed` (a small fixed set)."""
        return MIXED_LABEL if self.kind == "mixed" else self.name

    def __str__(self) -> str:
        return self.name


FP = Precision("fp")
AUTO = Precision("auto")


def uniform_name(width: int | None) -> str:
    """`w<b>`, or `fp` for None (a full-precision layer)."""
    return FP.name if width is None else f"w{width}"


def uniform_precisions(bit_set: tuple[int, ...]) -> list[Precision]:
    """`fp` then every uniform width of the bit set, narrowest first."""
    return [FP, *(Precision.uniform(b) for b in sorted(bit_set))]


def allowed_precisions(bit_set: tuple[int, ...]) -> list[str]:
    return ["auto", *(p.name for p in uniform_precisions(bit_set)),
            f"mixed:<storage bits per weight in {min(bit_set)}..{max(bit_set)}>"]


def metric_labels(bit_set: tuple[int, ...]) -> list[str]:
    """Every value the `precision` metric label can take for this bit set."""
    return [p.label for p in uniform_precisions(bit_set)] + [MIXED_LABEL]
