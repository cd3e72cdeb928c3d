"""What one `quept bench` run measures: its settings, one row per (engine, precision), and the speeds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

# Decode batch sizes measured per plan; the bench engine needs max_running >= the largest.
BATCHES = (1, 8, 32)


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 256
    new_tokens: int = 64
    ppl_tokens: int = 4096
    decode_ppl_tokens: int = 512  # teacher-forced through the decode step, one token per step
    seqlen: int = 512
    switches: int = 200
    repeats: int = 1  # rounds, each one batch size at a time across every row; each figure keeps its best
    mixed_set: tuple[str, ...] = ("w8", "w6", "w4", "w3")  # plans sharing one running set; () skips the row
    mixed_set_rows: int = 2  # sequences per plan in the mixed set


def _best(a: float | None, b: float | None) -> float | None:
    """The larger of two figures, either of which may be missing."""
    present = [x for x in (a, b) if x is not None]
    return max(present) if present else None


@dataclass
class Speed:
    prefill_tok_s: float | None = None
    decode_tok_s_b1: float | None = None
    decode_tok_s_b8: float | None = None
    decode_tok_s_b32: float | None = None
    step_route: str | None = None  # the engine's decode route ("native" or "pytorch"); None for peers

    @classmethod
    def at_batch(cls, batch: int, decode_tok_s: float, prefill_tok_s: float | None = None,
                 step_route: str | None = None) -> Speed:
        """One measurement: decode tokens/s of a running set of `batch` sequences (and the prefill figure,
        which comes with the batch-1 run)."""
        return cls(prefill_tok_s=prefill_tok_s, **{f"decode_tok_s_b{batch}": decode_tok_s}, step_route=step_route)

    def best(self, other: Speed) -> Speed:
        """The faster of two measurements, figure by figure (other load on the machine only slows)."""
        figures = {f.name: _best(getattr(self, f.name), getattr(other, f.name))
                   for f in fields(self) if f.name != "step_route"}
        return Speed(**figures, step_route=other.step_route or self.step_route)


@dataclass
class BenchRow:
    engine: str  # "hf", "quept" or "llama.cpp"
    precision: str
    prefill_tok_s: float | None = None
    decode_tok_s_b1: float | None = None
    decode_tok_s_b8: float | None = None
    decode_tok_s_b32: float | None = None
    weight_bytes: int | None = None
    rss_bytes: int | None = None  # the process's resident set after the row's latest measurement
    step_route: str | None = None
    ppl: float | None = None  # prefill's path (dense matmuls over windows of seqlen)
    decode_ppl: float | None = None  # the decode path, kernels included, on the first decode_ppl_tokens tokens

    def take(self, speed: Speed) -> None:
        """Copy a measurement's figures into the row."""
        for f in fields(speed):
            setattr(self, f.name, getattr(speed, f.name))


@dataclass
class MixedSetRow:
    """The same sequences decoded in one running set of several plans, and as per-plan batches in turns."""

    plans: list[str]
    sequences: int
    one_set_tok_s: float | None = None  # every sequence in one running set
    turns_tok_s: float | None = None  # one per-plan batch to completion after another: total tokens / total time
    weight_bytes: int | None = None  # every plan's packs resident together
    rss_bytes: int | None = None
    step_route: str | None = None  # the mixed running set's

    @property
    def ratio(self) -> float | None:
        return self.one_set_tok_s / self.turns_tok_s if self.one_set_tok_s and self.turns_tok_s else None

    def best(self, other: MixedSetRow) -> MixedSetRow:
        """`other` (the latest measurement) with the faster of each speed."""
        return replace(other, one_set_tok_s=_best(self.one_set_tok_s, other.one_set_tok_s),
                       turns_tok_s=_best(self.turns_tok_s, other.turns_tok_s))


@dataclass
class BenchResult:
    rows: list[BenchRow]
    switch_ms: dict[str, float] | None
    reload_s: float | None
    uniform_resident_bytes: int | None = None  # all uniform plans' packs resident at once
    fp32_model_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    mixed_set: MixedSetRow | None = None

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(row) for row in self.rows],
            "mixed_set": None if self.mixed_set is None else {**asdict(self.mixed_set), "ratio": self.mixed_set.ratio},
            "switch_ms": self.switch_ms,
            "reload_s": self.reload_s,
            "uniform_resident_bytes": self.uniform_resident_bytes,
            "fp32_model_bytes": self.fp32_model_bytes,
            "notes": self.notes,
            "settings": self.settings,
        }
