"""What one `quept bench` run measures: its settings, one row per (engine, precision), and the speeds."""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass, field


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 256
    new_tokens: int = 64
    batch: int = 8
    ppl_tokens: int = 4096
    seqlen: int = 512
    switches: int = 200
    repeats: int = 1  # rounds over every row; each row keeps its best


@dataclass
class BenchRow:
    engine: str  # "hf", "quept" or "llama.cpp"
    precision: str
    prefill_tok_s: float | None = None
    decode_tok_s_b1: float | None = None
    decode_tok_s_b8: float | None = None
    weight_bytes: int | None = None
    ppl: float | None = None


@dataclass
class BenchResult:
    rows: list[BenchRow]
    switch_ms: dict[str, float] | None
    reload_s: float | None
    uniform_resident_bytes: int | None = None  # all uniform plans' packs resident at once
    fp32_model_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(row) for row in self.rows],
            "switch_ms": self.switch_ms,
            "reload_s": self.reload_s,
            "uniform_resident_bytes": self.uniform_resident_bytes,
            "fp32_model_bytes": self.fp32_model_bytes,
            "notes": self.notes,
            "settings": self.settings,
        }


@dataclass
class Speed:
    prefill_tok_s: float | None = None
    decode_tok_s_b1: float | None = None
    decode_tok_s_b8: float | None = None

    def best(self, other: Speed) -> Speed:
        """The faster of two measurements, figure by figure (other load on the machine only slows)."""
        pick = [None if a is None and b is None else max(x for x in (a, b) if x is not None)
                for a, b in zip(astuple(self), astuple(other))]
        return Speed(*pick)
