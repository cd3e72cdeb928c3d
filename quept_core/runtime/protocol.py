"""The contract between the runtime and its callers (the service's scheduler, the CLI, benchmarks).

A caller starts a batch of sequences under one plan and steps it; each `step()` advances every
live sequence by one token (the first call runs the prefill). Stepping is how the scheduler
interleaves plans fairly and aborts a disconnected client within one decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from quept_core.planning.plan import Plan


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class SequenceRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenEvent:
    seq: int  # index of the sequence in the batch
    token_id: int
    finish_reason: str | None = None  # "eos" or "length" on a sequence's last token, else None


class GenerationBatch(Protocol):
    plan: Plan

    def step(self) -> list[TokenEvent]:
        """Advance every live sequence by one token (switching to this batch's plan if needed)."""

    def cancel(self, seq: int) -> None:
        """Stop a sequence now; it yields no further events and frees its KV slot."""

    @property
    def done(self) -> bool:
        """True when no sequence is live."""


class Engine(Protocol):
    model_name: str
    tokenizer: PreTrainedTokenizerBase

    def start_batch(self, requests: list[SequenceRequest], plan: Plan) -> GenerationBatch: ...

    def set_plan(self, plan: Plan) -> None:
        """Make `plan` current now (a step does it too); lets a caller time the switch on its own."""
