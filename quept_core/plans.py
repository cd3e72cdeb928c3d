"""Precision plans: a bit-width per quantized linear (uniform plans and `fp` are special cases)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

FP = "fp"
_UNIFORM = re.compile(r"^w([2-8])$")
_MIXED = re.compile(r"^mixed:(\d+(?:\.\d+)?)$")


class PrecisionError(ValueError):
    """A precision string that names nothing servable; the message lists what is allowed."""


@dataclass(frozen=True)
class Plan:
    name: str  # "fp", "w4", "mixed:3.50"
    layer_bits: Mapping[str, int | None] = field(default_factory=dict)  # linear name -> bits (None: fp)
    lm_head_bits: int | None = None  # the tied embedding / output head; None: full precision

    @property
    def mode(self) -> str:
        if self.name == FP:
            return "fp"
        return "mixed" if self.name.startswith("mixed:") else "uniform"

    @property
    def label(self) -> str:
        """The metric label value: fp, w2..w8 or mixed (a small fixed set)."""
        return "mixed" if self.mode == "mixed" else self.name

    def average_bits(self, numels: Mapping[str, int]) -> float | None:
        """Parameter-weighted bits per weight over the quantized linears (None for fp)."""
        if self.mode == "fp":
            return None
        total = sum(numels[name] for name in self.layer_bits)
        return sum((self.layer_bits[name] or 16) * numels[name] for name in self.layer_bits) / total


@dataclass(frozen=True)
class PrecisionSpec:
    kind: str  # "auto", "fp", "uniform" or "mixed"
    bits: float | None = None  # uniform bit-width or mixed average bits


def allowed_precisions(bit_set: tuple[int, ...]) -> list[str]:
    return ["auto", FP, *[f"w{b}" for b in bit_set], f"mixed:<avg bits in {min(bit_set)}..{max(bit_set)}>"]


def parse_precision(text: str, bit_set: tuple[int, ...]) -> PrecisionSpec:
    """Parse `auto`, `fp`, `w<b>` or `mixed:<avg>` against the artifact's bit set."""
    value = text.strip().lower()
    if value == "auto":
        return PrecisionSpec("auto")
    if value == FP:
        return PrecisionSpec("fp")
    uniform = _UNIFORM.match(value)
    if uniform and int(uniform.group(1)) in bit_set:
        return PrecisionSpec("uniform", float(uniform.group(1)))
    mixed = _MIXED.match(value)
    if mixed and min(bit_set) <= float(mixed.group(1)) <= max(bit_set):
        return PrecisionSpec("mixed", float(mixed.group(1)))
    raise PrecisionError(f"unknown precision '{text}'; allowed: {', '.join(allowed_precisions(bit_set))}")


def uniform_plan(linear_names: list[str], bits: int | None, lm_head_bits: int | None = None) -> Plan:
    name = FP if bits is None else f"w{bits}"
    return Plan(name, {n: bits for n in linear_names}, lm_head_bits)
