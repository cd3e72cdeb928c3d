"""The contract between the runtime and its callers (the service's scheduler, the CLI, benchmarks).

The engine owns one running set of sequences and a KV pool. A caller `add`s sequences (each with its
own plan: any mix of precisions shares a step), `abort`s them, and calls `step()`: every call first
prefills the sequences added since the last one, then decodes one token for every running sequence.
A sequence leaves the running set when it ends (its KV slot is free before the next step) and never
costs another sequence a copy. Stepping is how the scheduler keeps deadlines and fairness and aborts
a disconnected client within one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from quept_core.planning.plan import Plan
from quept_core.runtime.tokenizer import Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the k likeliest


@dataclass(frozen=True)
class SequenceRequest:
    prompt_ids: list[int]
    plan: Plan
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # natural log of the raw model's probability (before penalty, temperature and filters)


@dataclass(frozen=True)
class TokenEvent:
    seq_id: int
    token_id: int
    finish_reason: str | None = None  # "eos" or "length" on a sequence's last token, else None
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs set
    top_logprobs: tuple[TokenLogprob, ...] = ()  # the k likeliest tokens, likeliest first


@dataclass(frozen=True)
class PrefillCall:
    """One call of a step's prefill: prompts of one plan, padded to the longest."""

    plan: Plan
    rows: int
    longest: int
    seconds: float


@dataclass(frozen=True)
class StepStats:
    """What the latest `step()` did and how long each part took (for cost models and metrics)."""

    prefill_tokens: int = 0  # prompt tokens prefilled in this step
    prefill_s: float = 0.0
    prefill_calls: tuple[PrefillCall, ...] = ()  # what prefill_s went to, call by call
    decode_rows: int = 0  # sequences that decoded a token in this step
    decode_s: float = 0.0
    layout_s: float = 0.0  # rebuilding the running set's weight layout after its mix of plans changed
    # Of prefill_s and layout_s, one-off work: building packs that were not resident, preparing a plan's
    # layout and step on its first use.
    setup_s: float = 0.0


@dataclass(frozen=True)
class StepThreads:
    """CPU threads for each phase of one step; None leaves PyTorch's setting as it is."""

    prefill: int | None = None
    decode: int | None = None


SAME_THREADS = StepThreads()


class Engine(Protocol):
    model_name: str
    tokenizer: Tokenizer

    def add(self, request: SequenceRequest, n: int = 1) -> list[int]:
        """Queue `n` sequences of one prompt (they share one prefill; sampled ones draw the seeds seed,
        seed + 1, ...) and return their ids. Raises RequestError naming the field that cannot run, and
        KVPoolFull when fewer than `n` slots are free."""

    def abort(self, seq_id: int) -> None:
        """Stop a sequence now: it yields no further events and its KV slot is free. Ids that are
        unknown or already finished are ignored."""

    def step(self, threads: StepThreads = SAME_THREADS) -> list[TokenEvent]:
        """Prefill what was added since the last step, then one token for every running sequence (each
        phase on `threads` CPU threads where given)."""

    def missing_shares(self, plan: Plan) -> dict[int | None, float]:
        """The share of a plan's parameters whose packs are not resident, by bit-width (None: fp)."""

    @property
    def last_step(self) -> StepStats:
        """The figures of the latest step."""

    @property
    def free_slots(self) -> int:
        """Sequences that can still be added."""

    @property
    def running(self) -> int:
        """Sequences in the running set (those awaiting their prefill included)."""

    @property
    def relayout_due(self) -> bool:
        """Whether the next step rebuilds the running set's layout (sequences joined or left since the last)."""

    @property
    def kv_usage(self) -> float:
        """The share of the KV pool's positions that running sequences may fill (prompt + max_new_tokens)."""
