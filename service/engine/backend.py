"""What the service needs from a loaded, calibrated model: an engine plus facts about its plans."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from quept_core.planning.bits import Shapes
from quept_core.planning.plan import Plan
from quept_core.precision import Precision
from quept_core.runtime.protocol import Engine
from quept_core.runtime.tokenizer import Tokenizer
from service.engine.controller import Candidate


class Backend(Protocol):
    model_id: str  # e.g. "smollm2-135m"
    artifact_id: str  # content hash of the calibrated artifact
    device: str
    bit_set: tuple[int, ...]
    tokenizer: Tokenizer
    engine: Engine
    context_length: int
    kv_bytes_per_token: int  # KV cache bytes one token of one sequence occupies
    shapes: Shapes  # (out_features, in_features) per quantized linear
    build_s: Mapping[str, float]  # seconds that building each uniform plan's packs took at start-up
    kept_costs: Path | None  # where warm-up's figures are kept between starts (None: measured at every start)
    memory_limit_bytes: int | None  # the packed weights that may be resident at once (None: no limit)

    def fits(self, candidate: Candidate) -> bool:
        """Whether a plan's packed weights fit the memory limit: a plan that does not can never serve."""

    def resolve(self, precision: Precision) -> Plan:
        """A concrete precision (fp, uniform, mixed) to a plan; raises PrecisionError listing what is allowed."""

    def candidates(self) -> list[Candidate]:
        """The plans `auto` chooses among (the artifact's quality/cost front), best quality first."""

    def describe(self, plan: Plan) -> Candidate:
        """Nominal bits, resident weight bytes and measured quality of any servable plan."""

    def release_after_warmup(self) -> None:
        """Drop what serving need not keep resident once every plan is measured (packs, the KV pages warm-up
        wrote); engine thread only."""

    def resident_bytes(self) -> dict[str, int]:
        """Weight bytes held in memory now, by precision label (fp, w2..w8); engine thread only."""
