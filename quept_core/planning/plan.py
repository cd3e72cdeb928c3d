"""Precision plans: a bit-width per quantized linear and for the output head.

A plan is immutable, hashable and interned: building the same content twice gives the same object,
so the runtime and the scheduler may compare plans by identity or by equality alike, and use them
as dict keys. `fp`, `w<b>` and mixed plans differ only in their bits; `mode` is the precision's kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import ClassVar
from weakref import WeakValueDictionary

from quept_core.precision import FP, Precision


class Plan:
    __slots__ = ("__weakref__", "_hash", "_key", "layer_bits", "lm_head_bits", "precision")
    _interned: ClassVar[WeakValueDictionary[tuple, Plan]] = WeakValueDictionary()

    precision: Precision
    layer_bits: Mapping[str, int | None]  # linear name -> bits (None: full precision), model order
    lm_head_bits: int | None  # the tied embedding / output head; None: full precision

    def __new__(cls, precision: Precision, layer_bits: Mapping[str, int | None] | None = None,
                lm_head_bits: int | None = None) -> Plan:
        if not isinstance(precision, Precision) or precision.kind == "auto":
            raise TypeError(f"a plan needs a concrete Precision (fp, uniform or mixed), got {precision!r}")
        bits = dict(layer_bits or {})
        key = (precision, frozenset(bits.items()), lm_head_bits)
        plan = cls._interned.get(key)
        if plan is None:
            plan = super().__new__(cls)
            for name, value in (("precision", precision), ("layer_bits", MappingProxyType(bits)),
                                ("lm_head_bits", lm_head_bits), ("_key", key), ("_hash", hash(key))):
                object.__setattr__(plan, name, value)
            cls._interned[key] = plan
        return plan

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError("plans are immutable")

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Plan) and self._key == other._key)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Plan({self.name}, {len(self.layer_bits)} layers, head {self.lm_head_bits})"

    def __reduce__(self):
        return Plan, (self.precision, dict(self.layer_bits), self.lm_head_bits)

    @property
    def name(self) -> str:
        return self.precision.name

    @property
    def label(self) -> str:
        return self.precision.label

    @property
    def mode(self) -> str:
        """`fp`, `uniform` or `mixed`."""
        return self.precision.kind

    def with_head_bits(self, lm_head_bits: int | None) -> Plan:
        return Plan(self.precision, self.layer_bits, lm_head_bits)


def uniform_plan(linear_names: Iterable[str], width: int | None, lm_head_bits: int | None = None) -> Plan:
    """Every linear at `width` bits (None: the `fp` plan)."""
    precision = FP if width is None else Precision.uniform(width)
    return Plan(precision, dict.fromkeys(linear_names, width), lm_head_bits)
