"""What the service needs from a loaded, calibrated model: an engine plus facts about its plans."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from quept_core.generation import Engine
from quept_core.plans import Plan
from service.controller import Candidate


class Backend(Protocol):
    model_id: str  # e.g. "smollm2-135m"
    artifact_id: str  # content hash of the calibrated artifact
    device: str
    bit_set: tuple[int, ...]
    tokenizer: PreTrainedTokenizerBase
    engine: Engine
    context_length: int
    kv_bytes_per_token: int  # KV cache bytes one token of one sequence occupies
    numels: Mapping[str, int]  # parameters per quantized linear

    def resolve(self, precision: str) -> Plan:
        """`fp`, `w<b>` or `mixed:<avg>` to a plan; raises PrecisionError listing what is allowed."""

    def candidates(self) -> list[Candidate]:
        """The plans `auto` chooses among (the artifact's quality/cost front), best quality first."""

    def describe(self, plan: Plan) -> Candidate:
        """Average bits, resident weight bytes and measured quality of any servable plan."""

    def resident_bytes(self) -> dict[str, int]:
        """Weight bytes held in memory now, by precision label (fp, w2..w8); engine thread only."""
