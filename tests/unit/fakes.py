"""Test doubles for the service: a byte-level tokenizer, a scripted engine, a backend, a clock."""

from __future__ import annotations

import threading

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from quept_core.layers import linear_names, linear_type
from quept_core.planning.bits import nominal_bits
from quept_core.planning.plan import Plan, uniform_plan
from quept_core.precision import FP, Precision, PrecisionError
from quept_core.runtime.protocol import SequenceRequest, TokenEvent
from service.engine.controller import Candidate

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte, plus <|im_start|> (bos) and <|im_end|> (eos)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def expected_text(plan_name: str, n: int) -> str:
    """What the fake engine generates under a plan: the plan's name, then the alphabet."""
    return (f"[{plan_name}]" + "abcdefghijklmnopqrstuvwxyz" * 20)[:n]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class FakeBatch:
    def __init__(self, engine: FakeEngine, requests: list[SequenceRequest], plan: Plan):
        self.engine, self.requests, self.plan = engine, requests, plan
        self.produced = [0] * len(requests)
        self.live = set(range(len(requests)))
        self.cancelled: list[int] = []

    def step(self) -> list[TokenEvent]:
        self.engine.wait_for_turn()
        if self.engine.fail_on == self.plan.name:
            raise RuntimeError("engine failure")
        self.engine.steps.append((self.plan.name, sorted(self.live)))
        if self.engine.clock is not None:
            self.engine.clock.advance(self.engine.step_s.get(self.plan.name, 0.01))
        events = []
        tokenizer = self.engine.tokenizer
        for seq in sorted(self.live):
            request = self.requests[seq]
            n = self.produced[seq]
            text = expected_text(self.plan.name, request.sampling.max_new_tokens)
            eos_at = self.engine.eos_after
            if eos_at is not None and n == eos_at:
                token, reason = tokenizer.eos_token_id, "eos"
            else:
                token = tokenizer(text[n], add_special_tokens=False).input_ids[0]
                reason = "length" if n + 1 == request.sampling.max_new_tokens else None
            self.produced[seq] += 1
            events.append(TokenEvent(seq, token, reason))
            if reason:
                self.live.discard(seq)
        return events

    def cancel(self, seq: int) -> None:
        self.cancelled.append(seq)
        self.live.discard(seq)

    @property
    def done(self) -> bool:
        return not self.live


class FakeEngine:
    """Generates `expected_text(plan)` one byte-token per step; optionally waits for `allow()` per step."""

    model_name = "tiny"

    def __init__(self, gated: bool = False, clock: FakeClock | None = None):
        self.tokenizer = byte_tokenizer()
        self.gated = gated
        self._gate = threading.Semaphore(0)
        self.clock = clock
        self.step_s: dict[str, float] = {}
        self.batches: list[tuple[str, int]] = []  # (plan name, sequences) per started batch
        self.steps: list[tuple[str, list[int]]] = []  # (plan name, live sequences) per step
        self.switches: list[str] = []  # plan names, one per set_plan call
        self.eos_after: int | None = None
        self.fail_on: str | None = None

    def set_plan(self, plan: Plan) -> None:
        self.switches.append(plan.name)

    def start_batch(self, requests: list[SequenceRequest], plan: Plan) -> FakeBatch:
        self.batches.append((plan.name, len(requests)))
        return FakeBatch(self, requests, plan)

    def allow(self, steps: int = 1) -> None:
        for _ in range(steps):
            self._gate.release()

    def wait_for_turn(self) -> None:
        if self.gated and not self._gate.acquire(timeout=30):
            raise TimeoutError("the test never allowed this step")


# Measured quality of the fake plans: perplexity increase over full precision, in percent.
PPL_DELTA = {"w3": 40.0, "w4": 8.0, "w5": 4.0, "w6": 1.0, "w7": 0.4, "w8": 0.05, "mixed:4.50": 5.0, FP.name: 0.0}


class FakeBackend:
    model_id = "tiny"
    artifact_id = "0123456789ab"
    device = "cpu"
    bit_set = (3, 4, 5, 6, 7, 8)
    context_length = 512
    kv_bytes_per_token = 1024

    def __init__(self, engine: FakeEngine | None = None):
        self.engine = engine or FakeEngine()
        self.tokenizer = self.engine.tokenizer
        names = linear_names(2)
        self.shapes = {name: SHAPES[linear_type(name)] for name in names}
        self.numels = {name: out * inp for name, (out, inp) in self.shapes.items()}

    def resolve(self, precision: Precision | str) -> Plan:
        if isinstance(precision, str):
            precision = Precision.parse(precision, self.bit_set)
        names = list(self.shapes)
        if precision.kind == "fp":
            return uniform_plan(names, None)
        if precision.kind == "uniform":
            return uniform_plan(names, precision.width)
        if precision.kind == "mixed":
            low = int(precision.budget_bits)
            half = len(names) // 2
            bits = {n: (low if i < half else min(low + 1, 8)) for i, n in enumerate(names)}
            return Plan(precision, bits)
        raise PrecisionError(f"unknown precision '{precision}'")

    def describe(self, plan: Plan) -> Candidate:
        if plan.mode == "fp":
            return Candidate(plan, 16.0, sum(self.numels.values()) * 4, PPL_DELTA[FP.name])
        bits = nominal_bits(plan, self.shapes)
        size = sum(self.numels[n] * b for n, b in plan.layer_bits.items()) // 8
        return Candidate(plan, bits, size, PPL_DELTA.get(plan.name))

    def candidates(self) -> list[Candidate]:
        plans = [self.resolve(p) for p in ("w8", "w7", "w6", "w5", "mixed:4.5", "w4", "w3")]
        return [self.describe(p) for p in plans]

    def resident_bytes(self) -> dict[str, int]:
        return {Precision.uniform(b).name: 1000 * b for b in self.bit_set}
