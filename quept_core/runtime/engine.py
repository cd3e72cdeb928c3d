"""The elastic runtime: one model, packed weights per (layer, bits), plans switched by pointer swaps.

    engine = QueptEngine(loaded, elastic)            # elastic: dict[name, ElasticLinear]
    plan = engine.plan("w4")
    tokens = engine.generate(prompt_ids, plan, SamplingParams(max_new_tokens=32))

The service drives `start_batch(requests, plan)` / `step()` (quept_core/generation.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from quept_core.config import BitConfig
from quept_core.io.models import LoadedModel
from quept_core.layers import FUSED, HEAD, LINEAR_KINDS, fused_members
from quept_core.planning.plan import Plan, uniform_plan
from quept_core.precision import Precision, PrecisionError
from quept_core.quant.elastic import ElasticLinear
from quept_core.quant.grid import QuantizedWeight, quantize
from quept_core.runtime.kernels.formats import DenseWeight, PackedWeight, pack_weight
from quept_core.runtime.model import CompactLlama, KVCache, Slot
from quept_core.runtime.packcache import PackCache
from quept_core.runtime.protocol import SamplingParams, SequenceRequest, TokenEvent
from quept_core.runtime.sampling import RequestError, Sampler, check_sampling

PackKey = tuple[str, int | None]  # (slot name, bits); None: full precision
# The output head (a fifth of the model's weights) runs at 8 bits in quantized plans unless a plan says otherwise.
DEFAULT_HEAD_BITS = 8
# Plans whose slot assignments are remembered for pointer-swap switching.
MAX_BOUND_PLANS = 32


@dataclass
class _Bound:
    generation: int  # the pack cache's generation the assignment is valid for
    keys: list[PackKey]
    assignment: list[tuple[Slot, PackedWeight | None]]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class QueptEngine:
    """Runs a LLaMA model at any plan of an elastic (QuEPT) model; implements generation.Engine."""

    def __init__(
        self,
        loaded: LoadedModel,
        elastic: Mapping[str, ElasticLinear],
        bit_config: BitConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        memory_limit_bytes: int | None = None,
        head_bits: int | None = DEFAULT_HEAD_BITS,
        mixed_resolver: Callable[[float], Plan] | None = None,
    ):
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        # Small single-query attention products run far faster in float32 than in bf16 on CPUs.
        self.kv_dtype = torch.float32 if self.device.type == "cpu" else dtype
        self.elastic = dict(elastic)
        self.bit_config = bit_config or next(iter(self.elastic.values())).bit_config
        if head_bits is not None and head_bits not in self.bit_config.bits:
            raise ValueError(f"head_bits must be one of {self.bit_config.bits} or None, got {head_bits}")
        self.head_bits = head_bits
        self.mixed_resolver = mixed_resolver
        with torch.no_grad():
            self.model = CompactLlama(loaded.model, self.device, dtype)
        self._head_weight = loaded.model.lm_head.weight.detach()
        self.linear_names = [slot.name for slot in self.model.linear_slots()]
        missing = [name for name in self.linear_names if name not in self.elastic]
        if missing:
            raise ValueError(f"no elastic linear for {len(missing)} layers, e.g. '{missing[0]}'")
        self.cache = PackCache(self._build_pack, memory_limit_bytes)
        self.eos_ids = _eos_ids(loaded)
        self.current_plan: Plan | None = None
        self._generation = -1
        self._all_slots = [getattr(block, attr) for block in self.model.blocks for attr in (*FUSED, *LINEAR_KINDS)]
        self._all_slots.append(self.model.head)
        self._bound: dict[Plan, _Bound] = {}

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token of one sequence occupies (keys and values, every layer)."""
        d = self.model.dims
        return 2 * d.n_layers * d.n_kv_heads * d.head_dim * self.kv_dtype.itemsize

    @classmethod
    def from_calibrated(cls, calibrated, **kwargs) -> QueptEngine:
        """From a calibrated artifact (anything with .loaded, .elastic and .bit_config)."""
        return cls(calibrated.loaded, calibrated.elastic, calibrated.bit_config, **kwargs)

    # Plans -----------------------------------------------------------------------------------------

    def plan(self, precision: Precision | str) -> Plan:
        """The plan for a precision (`fp`, `w<b>`, `mixed:<budget>`; text is parsed against the bit set)."""
        if isinstance(precision, str):
            precision = Precision.parse(precision, self.bit_config.bits)
        if precision.kind == "fp":
            return uniform_plan(self.linear_names, None, None)
        if precision.kind == "uniform":
            return uniform_plan(self.linear_names, precision.width, self.head_bits)
        if precision.kind == "mixed":
            if self.mixed_resolver is None:
                raise PrecisionError(f"precision '{precision}' needs a calibrated artifact with a mixed-precision front")
            plan = self.mixed_resolver(precision.budget_bits)
            # The allocator assigns the decoder linears; the output head follows the engine's setting.
            if plan.lm_head_bits is None and self.head_bits is not None:
                plan = plan.with_head_bits(self.head_bits)
            return plan
        raise PrecisionError(f"precision '{precision}' must be resolved to a concrete plan before it reaches the engine")

    def _check_plan(self, plan: Plan) -> None:
        allowed = self.bit_config.bits
        for name in self.linear_names:
            if name not in plan.layer_bits:
                raise PrecisionError(f"plan '{plan.name}' has no bit-width for layer '{name}'")
            bits = plan.layer_bits[name]
            if bits is not None and bits not in allowed:
                raise PrecisionError(f"plan '{plan.name}': layer '{name}' has bits {bits}; allowed: {allowed} or fp")
        if plan.lm_head_bits is not None and plan.lm_head_bits not in allowed:
            raise PrecisionError(f"plan '{plan.name}': lm_head_bits {plan.lm_head_bits}; allowed: {allowed} or fp")

    def _bindings(self, plan: Plan) -> list[tuple[Slot, PackKey]]:
        """(slot, pack key) for every slot a plan fills: fused q|k|v and gate|up where their bits agree."""
        self._check_plan(plan)
        bindings = []
        for block in self.model.blocks:
            for fused, members in FUSED.items():
                slots = [getattr(block, m) for m in members]
                bits = {plan.layer_bits[slot.name] for slot in slots}
                # Full precision runs the float32 masters by reference, which cannot be fused without a copy.
                if len(bits) == 1 and None not in bits:
                    bindings.append((getattr(block, fused), (getattr(block, fused).name, bits.pop())))
                else:
                    bindings.extend((slot, (slot.name, plan.layer_bits[slot.name])) for slot in slots)
            for attr in ("o", "down"):
                slot = getattr(block, attr)
                bindings.append((slot, (slot.name, plan.layer_bits[slot.name])))
        bindings.append((self.model.head, (HEAD, plan.lm_head_bits)))
        return bindings

    def pack_keys(self, plan: Plan) -> list[PackKey]:
        """The (slot name, bits) packs a plan runs on."""
        return [key for _, key in self._bindings(plan)]

    def set_plan(self, plan: Plan) -> None:
        """Make `plan` current: build its missing packs, then swap every slot's reference.

        Between resident plans this is a pointer swap: the slot assignments of recently used plans
        are kept while no pack has been evicted since.
        """
        if plan == self.current_plan and self._generation == self.cache.generation:
            return
        bound = self._bound.get(plan)
        if bound is not None and bound.generation == self.cache.generation:
            self.cache.touch(bound.keys)
        else:
            bindings = self._bindings(plan)
            keys = [key for _, key in bindings]
            packs = self.cache.ensure(keys)
            assignment = dict.fromkeys(self._all_slots)
            assignment.update((slot, pack) for (slot, _), pack in zip(bindings, packs))
            bound = _Bound(self.cache.generation, keys, list(assignment.items()))
            self._bound.pop(plan, None)
            self._bound[plan] = bound
            while len(self._bound) > MAX_BOUND_PLANS:
                del self._bound[next(iter(self._bound))]
        for slot, pack in bound.assignment:
            slot.pack = pack
        self.current_plan = plan
        self._generation = self.cache.generation

    def weight_bytes(self, plan: Plan) -> int:
        """Resident bytes of the weights a plan runs on: its packs plus the norms."""
        packs = self.cache.ensure(self.pack_keys(plan))
        norms = sum(b.attn_norm.numel() + b.mlp_norm.numel() for b in self.model.blocks) + self.model.final_norm.numel()
        embedding = self.model.embedding.nbytes if self.model.embedding is not None else 0
        return sum(p.nbytes for p in packs) + norms * self.model.final_norm.element_size() + embedding

    def _build_pack(self, key: PackKey) -> PackedWeight:
        name, bits = key
        with torch.no_grad():
            if name == HEAD:
                weight = self._head_weight.to(self.device)
                if bits is None:
                    return DenseWeight(weight, self.dtype)
                return pack_weight(quantize(weight, bits, self.bit_config.group_size_for(bits)), self.dtype)
            linears = [self.elastic[source] for source in fused_members(name)]
            if bits is None:
                weight = linears[0].weight if len(linears) == 1 else torch.cat([linear.weight for linear in linears])
                return DenseWeight(weight.to(self.device), self.dtype)
            parts = [linear.quantize(bits) for linear in linears]
            qw = QuantizedWeight(
                codes=torch.cat([q.codes for q in parts]).to(self.device),
                scale=torch.cat([q.scale for q in parts]).to(self.device),
                zero=torch.cat([q.zero for q in parts]).to(self.device),
                bits=bits,
                group_size=parts[0].group_size,
            )
            return pack_weight(qw, self.dtype)

    # Generation ------------------------------------------------------------------------------------

    def start_batch(self, requests: list[SequenceRequest], plan: Plan) -> QueptBatch:
        return QueptBatch(self, requests, plan)

    def generate(self, prompt_ids: list[int], plan: Plan, sampling: SamplingParams | None = None) -> list[int]:
        """Generate for one prompt; returns the new token ids (an end-of-sequence token included)."""
        batch = self.start_batch([SequenceRequest(prompt_ids, sampling or SamplingParams())], plan)
        tokens = []
        while not batch.done:
            tokens.extend(event.token_id for event in batch.step())
        return tokens

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Float32 logits at every position of `tokens` [batch, seq] (no cache): for perplexity."""
        self.set_plan(plan)
        return self.model.prefill(tokens.to(self.device), None, None)


class QueptBatch:
    """Sequences generated together under one plan; implements generation.GenerationBatch."""

    def __init__(self, engine: QueptEngine, requests: list[SequenceRequest], plan: Plan):
        if not requests:
            raise RequestError("requests must hold at least one sequence")
        dims = engine.model.dims
        for index, request in enumerate(requests):
            _check_request(index, request, dims.vocab, dims.max_positions)
        self.engine = engine
        self.plan = plan
        self._lengths = [len(r.prompt_ids) for r in requests]
        self._max_new = [r.sampling.max_new_tokens for r in requests]
        self._seqs = list(range(len(requests)))  # batch row -> sequence index
        self._positions: list[int] = []
        self._generated = [0] * len(requests)
        self._last: list[int] = []
        self._cancelled: set[int] = set()
        self._started = False
        self.last_logits: torch.Tensor | None = None  # float32 [live rows, vocab] of the latest step
        device = engine.device
        max_len = max(n + m for n, m in zip(self._lengths, self._max_new))
        self._cache = KVCache(dims, len(requests), min(max_len, dims.max_positions), device, engine.kv_dtype)
        self._sampler = Sampler([r.sampling for r in requests], [r.prompt_ids for r in requests], dims.vocab, device)
        self._prompts = [r.prompt_ids for r in requests]

    @property
    def done(self) -> bool:
        return not [s for s in self._seqs if s not in self._cancelled]

    def cancel(self, seq: int) -> None:
        if seq in self._seqs:
            self._cancelled.add(seq)

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        self._drop([row for row, seq in enumerate(self._seqs) if seq in self._cancelled])
        if not self._seqs:
            return []
        engine, model, device = self.engine, self.engine.model, self.engine.device
        engine.set_plan(self.plan)
        if not self._started:
            width = max(self._lengths)
            padded = [p + [0] * (width - len(p)) for p in self._prompts]
            tokens = torch.tensor(padded, device=device)
            last = torch.tensor([n - 1 for n in self._lengths], device=device)
            logits = model.prefill(tokens, self._cache, last)
            self._positions = list(self._lengths)
            self._started = True
        else:
            positions = torch.tensor(self._positions, device=device)
            span = max(self._positions) + 1
            shared = self._positions[0] if min(self._positions) == span - 1 else None
            mask = None
            if shared is None:
                future = torch.arange(span, device=device) > positions.unsqueeze(1)
                mask = torch.zeros(future.shape, device=device).masked_fill(future, float("-inf"))
                mask = mask.view(len(self._seqs), 1, 1, span)
            tokens = torch.tensor(self._last, device=device)
            logits = model.decode(tokens, positions, self._cache, span, mask, shared)
            self._positions = [p + 1 for p in self._positions]
        self.last_logits = logits
        chosen = self._sampler(logits)
        events, finished = [], []
        for row, (seq, token) in enumerate(zip(self._seqs, chosen)):
            self._generated[seq] += 1
            reason = None
            if token in engine.eos_ids:
                reason = "eos"
            elif self._generated[seq] >= self._max_new[seq] or self._positions[row] >= self._cache.max_len:
                reason = "length"
            events.append(TokenEvent(seq, token, reason))
            if reason is not None:
                finished.append(row)
        self._last = chosen
        self._drop(finished)
        return events

    def _drop(self, rows: list[int]) -> None:
        """Free the KV slots of finished or cancelled sequences."""
        if not rows:
            return
        keep = [r for r in range(len(self._seqs)) if r not in rows]
        self._seqs = [self._seqs[r] for r in keep]
        if not keep:
            return
        if self._started:
            self._positions = [self._positions[r] for r in keep]
            self._last = [self._last[r] for r in keep]
        else:
            self._lengths = [self._lengths[r] for r in keep]
            self._prompts = [self._prompts[r] for r in keep]
        self._cache.keep_rows(keep)
        self._sampler.keep_rows(keep)


def _check_request(index: int, request: SequenceRequest, vocab: int, max_positions: int) -> None:
    prompt = request.prompt_ids
    if not prompt:
        raise RequestError(f"requests[{index}].prompt_ids must not be empty")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"requests[{index}].prompt_ids: token id {bad[0]} is outside 0..{vocab - 1}")
    if len(prompt) >= max_positions:
        raise RequestError(f"requests[{index}].prompt_ids has {len(prompt)} tokens; the model allows {max_positions - 1}")
    check_sampling(request.sampling)


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return frozenset(ids)
