"""The one place for the bit set, the tiers, the LoRA rank per tier and the group size per bit."""

from __future__ import annotations

from dataclasses import dataclass, field

# Tiers from the lowest bit-width to the highest; the lowest bit keeps its own tier (QuEPT §2, §9.6).
DEFAULT_TIERS: tuple[tuple[int, ...], ...] = ((3,), (4,), (5, 6), (7, 8))
# Cascaded LoRA ranks per tier, low -> high: low bits get the largest prefix slice (r_H <= r_M < r_L).
# A rank of 0 leaves a tier to its per-bit learned clipping (it still takes part in the joint loss and
# in MB-ToMe). On SmolLM2-135M the adapter prefix that {5,6} and {7,8} would share with the 3- and
# 4-bit tiers raised their perplexity above plain round-to-nearest; without it every tier beats RTN
# (docs/benchmarks.md, "Choosing the LoRA ranks").
DEFAULT_TIER_RANKS: tuple[int, ...] = (32, 24, 0, 0)
# Group size per bit-width (-1 = per output channel). Groups of 64 at <= 4 bits (576 = 9 x 64);
# see docs/benchmarks.md for the measurement behind the choice at 5-8 bits.
DEFAULT_GROUP_SIZES: dict[int, int] = {2: 64, 3: 64, 4: 64, 5: 64, 6: 64, 7: 128, 8: -1}


@dataclass(frozen=True)
class BitConfig:
    tiers: tuple[tuple[int, ...], ...] = DEFAULT_TIERS
    tier_ranks: tuple[int, ...] = DEFAULT_TIER_RANKS
    group_sizes: dict[int, int] = field(default_factory=lambda: dict(DEFAULT_GROUP_SIZES))

    def __post_init__(self) -> None:
        if len(self.tiers) != len(self.tier_ranks):
            raise ValueError("tiers and tier_ranks must have the same length")
        if list(self.tier_ranks) != sorted(self.tier_ranks, reverse=True):
            raise ValueError("tier_ranks must not grow from low to high tiers (r_H <= r_M <= r_L)")
        if self.tier_ranks[-1] < 0 or self.tier_ranks[0] < 1:
            raise ValueError("tier_ranks must be >= 0, and the lowest tier's rank >= 1")
        flat = [b for tier in self.tiers for b in tier]
        if flat != sorted(set(flat)) or not all(2 <= b <= 8 for b in flat):
            raise ValueError("tiers must list distinct bit-widths in 2..8 from low to high")
        missing = [b for b in flat if b not in self.group_sizes]
        if missing:
            raise ValueError(f"no group size for bit-widths {missing}")

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(b for tier in self.tiers for b in tier)

    @property
    def max_rank(self) -> int:
        return self.tier_ranks[0]

    def tier_of(self, bits: int) -> int:
        for index, tier in enumerate(self.tiers):
            if bits in tier:
                return index
        raise ValueError(f"bit-width {bits} is not in the bit set {self.bits}")

    def rank_for(self, bits: int) -> int:
        return self.tier_ranks[self.tier_of(bits)]

    def group_size_for(self, bits: int) -> int:
        return self.group_sizes[bits]

    def to_dict(self) -> dict:
        return {
            "tiers": [list(t) for t in self.tiers],
            "tier_ranks": list(self.tier_ranks),
            "group_sizes": {str(b): g for b, g in sorted(self.group_sizes.items())},
        }

    @classmethod
    def from_dict(cls, data: dict) -> BitConfig:
        return cls(
            tiers=tuple(tuple(t) for t in data["tiers"]),
            tier_ranks=tuple(data["tier_ranks"]),
            group_sizes={int(b): g for b, g in data["group_sizes"].items()},
        )
