"""Test doubles for the service: a byte-level tokenizer, a scripted engine (the runtime protocol), a backend,
a clock."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from quept_core.layers import linear_names, linear_type
from quept_core.planning.bits import nominal_bits
from quept_core.planning.plan import Plan, uniform_plan
from quept_core.precision import FP, Precision, PrecisionError
from quept_core.runtime.protocol import (
    SAME_THREADS,
    PrefillCall,
    SequenceRequest,
    StepStats,
    StepThreads,
    TokenEvent,
    TokenLogprob,
)
from service.engine.controller import Candidate
from service.engine.costs import Line, PlanCost

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


def plan_cost(prefill_s_per_token: float, decode_s_fixed: float, decode_s_per_row: float,
              prefill_s_per_call: float = 0.0, build_s: float = 0.0) -> PlanCost:
    """A plan's figures with one prefill line for prompts of any length."""
    prefill = Line(prefill_s_per_call, prefill_s_per_token)
    return PlanCost(prefill, prefill, Line(decode_s_fixed, decode_s_per_row), build_s)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte, plus <|im_start|> (bos) and <|im_end|> (eos)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


ALPHABET = "abcdefghijklmnopqrstuvwxyz"
# The fake's chosen token is always its likeliest; the alternatives follow it in the alphabet.
CHOSEN_LOGPROB = math.log(0.6)
ALTERNATIVE_LOGPROBS = tuple(math.log(p) for p in (0.2, 0.1, 0.05, 0.03, 0.01))


def expected_text(plan_name: str, n: int, seed: int | None = None) -> str:
    """What the fake engine generates under a plan: the plan's name, then the alphabet (rotated by the
    seed for a sampled sequence, so that sequences with other seeds differ)."""
    shift = 0 if seed is None else seed % len(ALPHABET)
    letters = ALPHABET[shift:] + ALPHABET[:shift]
    return (f"[{plan_name}]" + letters * 20)[:n]


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


@dataclass
class FakeSequence:
    request: SequenceRequest
    seed: int | None  # the seed this sequence samples with (seed + i for the i-th of n); None: greedy
    prefilled: bool = False
    produced: int = 0

    @property
    def text(self) -> str:
        return expected_text(self.request.plan.name, self.request.sampling.max_new_tokens, self.seed)


@dataclass(frozen=True)
class FakeStep:
    plans: dict[int, str]  # seq id -> plan name, for every sequence that got a token in this step
    prefilled: tuple[int, ...]  # seq ids prefilled in this step


class FakeEngine:
    """Implements runtime/protocol.Engine: each sequence generates `expected_text(plan)` one byte-token
    per step, at any mix of plans; optionally each step waits for `allow()`."""

    model_name = "tiny"
    prefill_s_per_token = 0.001

    def __init__(self, gated: bool = False, clock: FakeClock | None = None, max_running: int = 16):
        self.tokenizer = byte_tokenizer()
        self.gated = gated
        self._gate = threading.Semaphore(0)
        self.clock = clock
        self.max_running = max_running
        self.step_s: dict[str, float] = {}  # decode seconds of a step by plan name (default 0.01)
        self.added: list[tuple[str, int]] = []  # (plan name, n) per add call
        self.aborted: list[int] = []
        self.steps: list[FakeStep] = []
        self.eos_after: int | None = None
        self.fail_on: str | None = None  # a step with a sequence of this plan raises
        self._sequences: dict[int, FakeSequence] = {}
        self._next_id = 0
        self._layout: frozenset[str] = frozenset()
        self._last = StepStats()
        self.ran: set[str] = set()  # plans of every step so far
        self.threads: list[StepThreads] = []  # what every step was asked to run on
        self.thread_slowdown: dict[int, float] = {}  # how much slower a phase runs on this many threads

    def add(self, request: SequenceRequest, n: int = 1) -> list[int]:
        if n > self.free_slots:
            raise RuntimeError(f"KV pool full: {n} sequences asked, {self.free_slots} slots free")
        self.added.append((request.plan.name, n))
        sampled = request.sampling.temperature > 0 and request.sampling.seed is not None
        ids = []
        for i in range(n):
            self._sequences[self._next_id] = FakeSequence(request, request.sampling.seed + i if sampled else None)
            ids.append(self._next_id)
            self._next_id += 1
        return ids

    def abort(self, seq_id: int) -> None:
        if self._sequences.pop(seq_id, None) is not None:
            self.aborted.append(seq_id)

    @property
    def relayout_due(self) -> bool:
        return bool(self._sequences) and frozenset(s.request.plan.name for s in self._sequences.values()) != self._layout

    def step(self, threads: StepThreads = SAME_THREADS) -> list[TokenEvent]:
        self.threads.append(threads)
        self.wait_for_turn()
        running = dict(self._sequences)
        plans = {seq_id: seq.request.plan.name for seq_id, seq in running.items()}
        if self.fail_on in plans.values():
            raise RuntimeError("engine failure")
        fresh = [seq_id for seq_id, seq in running.items() if not seq.prefilled]
        # Sequences of one add share their prefill (a call each): count each prompt once.
        requests = {id(running[seq_id].request): running[seq_id].request for seq_id in fresh}
        per_token = self.prefill_s_per_token * self.thread_slowdown.get(threads.prefill, 1.0)
        calls = tuple(PrefillCall(r.plan, 1, len(r.prompt_ids), len(r.prompt_ids) * per_token) for r in requests.values())
        layout = frozenset(plans.values())
        self._last = StepStats(
            prefill_tokens=sum(call.longest for call in calls),
            prefill_s=sum(call.seconds for call in calls),
            prefill_calls=calls,
            decode_rows=len(running) - len(fresh),
            decode_s=max((self.step_s.get(name, 0.01) for name in layout), default=0.0)
            * self.thread_slowdown.get(threads.decode, 1.0),
            layout_s=0.0005 if layout != self._layout else 0.0)
        self._layout = layout
        self.ran |= layout
        if self.clock is not None:
            self.clock.advance(self._last.prefill_s + self._last.decode_s + self._last.layout_s)
        self.steps.append(FakeStep(plans, tuple(fresh)))
        return [self._next_token(seq_id, seq) for seq_id, seq in running.items()]

    def _next_token(self, seq_id: int, seq: FakeSequence) -> TokenEvent:
        seq.prefilled = True
        n, limit = seq.produced, seq.request.sampling.max_new_tokens
        if self.eos_after is not None and n == self.eos_after:
            token, reason = self.tokenizer.eos_token_id, "eos"
        else:
            token = self.tokenizer(seq.text[n], add_special_tokens=False).input_ids[0]
            reason = "length" if n + 1 == limit else None
        seq.produced += 1
        if reason:
            del self._sequences[seq_id]
        k = seq.request.sampling.logprobs
        if k is None:
            return TokenEvent(seq_id, token, reason)
        chosen = TokenLogprob(token, CHOSEN_LOGPROB)
        others = [TokenLogprob((token + 1 + i) % 256, logprob) for i, logprob in enumerate(ALTERNATIVE_LOGPROBS)]
        return TokenEvent(seq_id, token, reason, chosen, tuple([chosen, *others][:k]))

    def missing_shares(self, plan: Plan) -> dict[int | None, float]:
        """The packs of a plan that never ran are all missing (its share per width is not modelled: the
        bit-width of its first linear)."""
        if plan.name in self.ran:
            return {}
        return {plan.layer_bits[next(iter(plan.layer_bits))]: 1.0}

    @property
    def last_step(self) -> StepStats:
        return self._last

    @property
    def free_slots(self) -> int:
        return self.max_running - len(self._sequences)

    @property
    def running(self) -> int:
        return len(self._sequences)

    @property
    def kv_usage(self) -> float:
        reserved = sum(len(s.request.prompt_ids) + s.request.sampling.max_new_tokens for s in self._sequences.values())
        return reserved / (self.max_running * FakeBackend.context_length)

    def plans_per_step(self) -> list[set[str]]:
        return [set(step.plans.values()) for step in self.steps]

    def steps_with(self, plan_name: str) -> int:
        return sum(plan_name in plans for plans in self.plans_per_step())

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
        self.build_s: dict[str, float] = {}
        self.kept_costs = None
        self.memory_limit_bytes: int | None = None

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
        return [c for c in (self.describe(p) for p in plans) if self.fits(c)]

    def fits(self, candidate: Candidate) -> bool:
        return self.memory_limit_bytes is None or candidate.weight_bytes <= self.memory_limit_bytes

    def release_after_warmup(self) -> None:
        self.released_after_warmup = True

    def resident_bytes(self) -> dict[str, int]:
        return {Precision.uniform(b).name: 1000 * b for b in self.bit_set}
