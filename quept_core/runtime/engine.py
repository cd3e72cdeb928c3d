"""The elastic engine: one running set of sequences at any mix of plans, over one KV pool.

    engine = QueptEngine.from_calibrated(calibrated)      # or QueptEngine(serving_weights, tokenizer)
    ids = engine.add(SequenceRequest(prompt_ids, engine.plan("w4"), SamplingParams(max_new_tokens=32)))
    while engine.running:
        for event in engine.step(): ...                   # TokenEvent(seq_id, token_id, finish_reason, ...)

Packed weights live in an LRU cache keyed by (weight name, bits) and bounded by bytes; a plan is a
choice of packs, so switching precision rebuilds nothing that is resident. Each step prefills the
sequences added since the previous one (prompts of one plan in one padded call, `prefill_batches`),
then decodes one token for every running sequence in one pass over the layers, each linear called
once per bit-width present in the running set (runtime/model.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import count
from pathlib import Path

import torch

from quept_core.config import BitConfig
from quept_core.io.models import LoadedModel
from quept_core.layers import HEAD, fused_members
from quept_core.planning.plan import Plan, uniform_plan
from quept_core.precision import Precision, PrecisionError
from quept_core.quant.elastic import ElasticLinear
from quept_core.quant.grid import QuantizedWeight
from quept_core.runtime.kernels.formats import DenseWeight, PackedWeight, chosen, pack_weight
from quept_core.runtime.kvpool import KVPool, KVPoolFull
from quept_core.runtime.model import (
    HEAD_SITE,
    CompactLlama,
    Layout,
    Site,
    SiteLayout,
    linear_shape,
    site_part,
)
from quept_core.runtime.native_step import POOL_DTYPE as NATIVE_POOL_DTYPE
from quept_core.runtime.native_step import NativeStep
from quept_core.runtime.native_step import available as native_available
from quept_core.runtime.native_step import supports as native_supports
from quept_core.runtime.packcache import PackCache
from quept_core.runtime.packfiles import PackFiles
from quept_core.runtime.protocol import (
    SAME_THREADS,
    PrefillCall,
    SamplingParams,
    SequenceRequest,
    StepStats,
    StepThreads,
    TokenEvent,
)
from quept_core.runtime.sampling import Choice, RequestError, Sampler, check_sampling
from quept_core.runtime.weights import ElasticWeights, ServingWeights, group_size

PackKey = tuple[str, int | None]  # (weight name, bits); None: full precision
# The output head (a fifth of the model's weights) runs at 8 bits in quantized plans unless a plan says otherwise.
DEFAULT_HEAD_BITS = 8
DEFAULT_MAX_RUNNING = 16


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class _Step:
    """A layout and, where the native kernels run it, its native decode step."""

    generation: int  # the pack cache's generation it was built in
    layout: Layout
    native: NativeStep | None


def _use_threads(threads: int | None) -> None:
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


PADDING_LIMIT = 1.25  # a prefill batch computes at most this many token positions per prompt token


def prefill_batches(prompts: Sequence[tuple[Plan, int]]) -> list[list[int]]:
    """How a step prefills prompts (plan, tokens): the indices of each call. Prompts of one plan share a
    call, right-padded to the longest, as long as the padding stays within PADDING_LIMIT: one call of
    several short prompts costs little more than one of them. Plans never share a call (rows of
    different plans in one prefill cost what separate calls do, measured)."""
    by_plan: dict[Plan, list[int]] = {}
    for index, (plan, _) in enumerate(prompts):
        by_plan.setdefault(plan, []).append(index)
    batches: list[list[int]] = []
    for indices in by_plan.values():
        batch: list[int] = []
        for index in sorted(indices, key=lambda i: prompts[i][1]):
            tokens = sum(prompts[i][1] for i in batch) + prompts[index][1]
            if batch and (len(batch) + 1) * prompts[index][1] > PADDING_LIMIT * tokens:
                batches.append(batch)
                batch = []
            batch.append(index)
        batches.append(batch)
    return batches


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    slot: int
    plan: Plan
    sampling: SamplingParams
    prompt: list[int]
    position: int = 0  # where the next fed token goes (the prompt's length after prefill)
    generated: int = 0
    last_token: int = -1
    forks: list[_Sequence] = field(default_factory=list)  # sequences sharing this one's prefill


class QueptEngine:
    """Runs a LLaMA model at any mix of plans of an elastic (QuEPT) model; implements protocol.Engine."""

    def __init__(
        self,
        weights: ServingWeights,
        tokenizer,
        *,
        model_name: str = "model",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        memory_limit_bytes: int | None = None,
        head_bits: int | None = DEFAULT_HEAD_BITS,
        mixed_resolver: Callable[[float], Plan] | None = None,
        max_running: int = DEFAULT_MAX_RUNNING,
        native: bool = True,
        pack_dir: Path | None = None,
    ):
        self.model_name = model_name
        # Decode steps run as one native call where the kernels can (native_step.py); False keeps the
        # PyTorch step (the reference the native one is tested against).
        self.native = native
        self.tokenizer = tokenizer
        self.weights = weights
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        # The KV pool keeps the compute dtype's precision. On CPU, a bf16 engine's pool is what the native
        # step reads (attention over a long context is bound by reading it: half the bytes of float32);
        # elsewhere on CPU it is float32, where PyTorch's small single-query products run far faster.
        native_pool = native and native_available() and dtype == NATIVE_POOL_DTYPE
        self.kv_dtype = dtype if self.device.type != "cpu" or native_pool else torch.float32
        # The native step runs fp on weights in the compute dtype, as the server holds them (its serving
        # store is bf16): an engine over float32 masters copies them. The PyTorch step keeps a float32
        # master by reference (DenseWeight).
        self._fp_dtype = dtype if native_pool else None
        self.bit_config: BitConfig = weights.bit_config
        if head_bits is not None and head_bits not in self.bit_config.bits:
            raise ValueError(f"head_bits must be one of {self.bit_config.bits} or None, got {head_bits}")
        self.head_bits = head_bits
        self.mixed_resolver = mixed_resolver
        with torch.no_grad():
            self.model = CompactLlama(weights, self.device, dtype)
        d = self.model.dims
        self.linear_names = [m for sites in self.model.sites for site in sites.values() for m in site.members]
        self.linear_shapes = {name: linear_shape(d, name) for name in self.linear_names}
        numels = {name: out * inp for name, (out, inp) in self.linear_shapes.items()} | {HEAD: d.vocab * d.hidden}
        # Parameters behind each pack name (a fused site's or one linear's).
        self._pack_numels = {name: sum(numels[m] for m in site.members) if name == site.name else numels[name]
                             for site in self._sites() for name in (site.name, *site.members)}
        self.cache = PackCache(self._build_pack, memory_limit_bytes)
        # Packs read back from disk instead of built (packfiles.py); None: always built from the weights.
        self.pack_files = PackFiles(pack_dir, self.device) if pack_dir is not None else None
        self.eos_ids = eos_token_ids(tokenizer, weights.config)
        self.max_running = max_running
        self.pool = KVPool(d.n_layers, max_running, d.n_kv_heads, d.max_positions, d.head_dim, self.device,
                           self.kv_dtype)
        self.sampler = Sampler(max_running, d.vocab, self.device)
        self._ids = count()
        self._sequences: dict[int, _Sequence] = {}
        self._pending: list[_Sequence] = []  # awaiting their prefill, in arrival order
        self._running: list[_Sequence] = []  # decoding, in row order
        self._dirty = True  # the running set changed since its layout was built
        self._prepare_s = 0.0  # seconds spent preparing single plans' layouts and steps, all told (builds apart)
        self._steps: dict[Plan, _Step] = {}  # one plan's step, valid for a cache generation
        self._mixed: _Step | None = None  # the latest step of a mixed running set (its program is reused)
        self._step: _Step | None = None  # the running set's
        self._slots: list[int] = []  # the running set's KV slots, in row order
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # slots and positions of the rows (PyTorch step)
        self._last_step = StepStats()
        self._last_logits: list[tuple[list[int], torch.Tensor]] = []  # (seq ids, float32 logits rows)

    @classmethod
    def from_elastic(cls, loaded: LoadedModel, elastic: Mapping[str, ElasticLinear],
                     bit_config: BitConfig | None = None, **kwargs) -> QueptEngine:
        """Over a loaded model and its elastic linears, kept in memory (calibration, tests, evaluation)."""
        return cls(ElasticWeights(loaded, elastic, bit_config), loaded.tokenizer, model_name=loaded.name, **kwargs)

    @classmethod
    def from_calibrated(cls, calibrated, **kwargs) -> QueptEngine:
        """From a calibrated artifact in memory (anything with .loaded, .elastic and .bit_config)."""
        return cls.from_elastic(calibrated.loaded, calibrated.elastic, calibrated.bit_config, **kwargs)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token of one sequence occupies (keys and values, every layer)."""
        d = self.model.dims
        return 2 * d.n_layers * d.n_kv_heads * d.head_dim * self.kv_dtype.itemsize

    # ---- plans and packs ------------------------------------------------------------------------

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

    def check_plan(self, plan: Plan) -> None:
        allowed = self.bit_config.bits
        for name in self.linear_names:
            if name not in plan.layer_bits:
                raise PrecisionError(f"plan '{plan.name}' has no bit-width for layer '{name}'")
            bits = plan.layer_bits[name]
            if bits is not None and bits not in allowed:
                raise PrecisionError(f"plan '{plan.name}': layer '{name}' has bits {bits}; allowed: {allowed} or fp")
        if plan.lm_head_bits is not None and plan.lm_head_bits not in allowed:
            raise PrecisionError(f"plan '{plan.name}': lm_head_bits {plan.lm_head_bits}; allowed: {allowed} or fp")

    @staticmethod
    def _site_keys(site: Site, bits: tuple[int | None, ...]) -> list[PackKey]:
        """One fused pack where every member has the same width, else one pack per member."""
        if len(set(bits)) == 1:
            return [(site.name, bits[0])]
        return list(zip(site.members, bits, strict=True))

    def _site_bits(self, site: Site, plan: Plan) -> tuple[int | None, ...]:
        if site is HEAD_SITE:
            return (plan.lm_head_bits,)
        return tuple(plan.layer_bits[m] for m in site.members)

    def _sites(self) -> list[Site]:
        return [site for sites in self.model.sites for site in sites.values()] + [HEAD_SITE]

    def pack_keys(self, plan: Plan) -> list[PackKey]:
        """The (weight name, bits) packs a plan runs on."""
        self.check_plan(plan)
        return [key for site in self._sites() for key in self._site_keys(site, self._site_bits(site, plan))]

    def missing_shares(self, plan: Plan) -> dict[int | None, float]:
        """The share of a plan's parameters whose packs are not resident, by bit-width: what running it
        next builds (empty when all are resident)."""
        missing: dict[int | None, int] = {}
        total = 0
        for key in self.pack_keys(plan):
            numel = self._pack_numels[key[0]]
            total += numel
            if key not in self.cache:
                missing[key[1]] = missing.get(key[1], 0) + numel
        return {bits: numel / total for bits, numel in missing.items()}

    def weight_bytes(self, plan: Plan) -> int:
        """Resident bytes of the weights a plan runs on: its packs (built now if missing) plus the norms."""
        packs = self._resident(self.pack_keys(plan))
        return sum(p.nbytes for p in packs) + self.model.norm_bytes

    def stored_weight_bytes(self, plan: Plan) -> int | None:
        """`weight_bytes` of a plan whose packs are all resident or on disk, without building or reading
        any; None otherwise."""
        if self.pack_files is None:
            return None
        total = self.model.norm_bytes
        try:
            for key in self.pack_keys(plan):
                size = self.cache.nbytes(key) if key in self.cache else self.pack_files.nbytes(*key)
                if size is None:
                    return None
                total += size
        finally:
            self.pack_files.close()
        return total

    def _resident(self, keys: list[PackKey]) -> list[PackedWeight]:
        """The packs for `keys`, the missing ones built or read now (the pack files' maps closed after)."""
        try:
            return self.cache.ensure(keys)
        finally:
            if self.pack_files is not None:
                self.pack_files.close()

    def store_packs(self) -> None:
        """Write the pack file of every width whose packs (those its uniform plan runs on at that
        width) are all resident and not stored yet, so that a later engine reads them."""
        if self.pack_files is None:
            return
        for bits in (*self.bit_config.bits, None):
            plan = uniform_plan(self.linear_names, bits, None if bits is None else self.head_bits)
            keys = [key for key in self.pack_keys(plan) if key[1] == bits]
            names = [name for name, _ in keys]
            if all(key in self.cache for key in keys) and not self.pack_files.holds(bits, names):
                self.pack_files.write(bits, dict(zip(names, self.cache.ensure(keys), strict=True)))
        self.pack_files.close()

    def _stored_pack(self, key: PackKey) -> PackedWeight | None:
        """The pack as the pack files hold it, if they do and its format is still this machine's choice."""
        name, bits = key
        pack = self.pack_files.read(name, bits)
        if pack is None or bits is None:
            return pack
        choice = chosen(self.device, bits, group_size(self.bit_config, name, bits), pack.out_features,
                        pack.in_features, self.dtype)
        if choice is None or (choice.format, choice.prefill_dense) != (type(pack).__name__, pack.prefill_dense):
            self.pack_files.outdated(bits)
            return None
        return pack

    def _build_pack(self, key: PackKey) -> PackedWeight:
        stored = self._stored_pack(key) if self.pack_files is not None else None
        if stored is not None:
            return stored
        name, bits = key
        members = fused_members(name)
        with torch.no_grad():
            if bits is None:
                weight = torch.cat([self.weights.dense(m) for m in members]) if len(members) > 1 \
                    else self.weights.dense(name)
                return DenseWeight(weight.to(self.device, self._fp_dtype), self.dtype)
            parts = [self.weights.quantized(m, bits) for m in members]
            qw = QuantizedWeight(
                codes=torch.cat([q.codes for q in parts]).to(self.device),
                scale=torch.cat([q.scale for q in parts]).to(self.device),
                zero=torch.cat([q.zero for q in parts]).to(self.device),
                bits=bits,
                group_size=parts[0].group_size,
            )
            return pack_weight(qw, self.dtype)

    # ---- layouts --------------------------------------------------------------------------------

    def _layout(self, plans: list[Plan]) -> Layout:
        """The layout for rows whose plans are `plans` (row order), its packs made resident together."""
        sites = self._sites()
        rows_of: dict[Plan, list[int]] = {}
        for row, plan in enumerate(plans):
            rows_of.setdefault(plan, []).append(row)
        groups: list[dict[tuple, list[int]]] = []
        for site in sites:
            by_bits: dict[tuple, list[int]] = {}
            for plan, members in rows_of.items():
                by_bits.setdefault(self._site_bits(site, plan), []).extend(members)
            groups.append({bits: sorted(members) for bits, members in by_bits.items()})
        keys = list(dict.fromkeys(key for site, by_bits in zip(sites, groups, strict=True)
                                  for bits in by_bits for key in self._site_keys(site, bits)))
        packs = dict(zip(keys, self._resident(keys), strict=True))
        rows = len(plans)
        indices: dict[tuple[int, ...], torch.Tensor] = {}  # sites that group the rows alike share an index
        site_layouts = []
        for site, by_bits in zip(sites, groups, strict=True):
            parts = tuple(site_part([packs[key] for key in self._site_keys(site, bits)], members, rows, self.device,
                                    indices) for bits, members in by_bits.items())
            out_features = sum(self.linear_shapes[m][0] for m in site.members) if site is not HEAD_SITE \
                else self.model.dims.vocab
            site_layouts.append(SiteLayout(parts, out_features))
        embed = () if not self.model.tied else site_layouts[-1].parts
        per_block = len(self.model.sites[0])
        roles = list(self.model.sites[0])
        blocks = tuple(dict(zip(roles, site_layouts[i * per_block:(i + 1) * per_block], strict=True))
                       for i in range(self.model.dims.n_layers))
        return Layout(blocks, site_layouts[-1], embed)

    def prepare(self, plan: Plan) -> None:
        """Make a plan's packs resident and its step ready (what a switch to it costs)."""
        self._plan_step(plan)

    def release(self, plan: Plan) -> None:
        """Drop the packs only `plan` runs on, of the plans prepared or running; it stays servable, its
        packs are built again when it next runs."""
        others = {p for p in self._steps if p != plan} | {s.plan for s in self._sequences.values()}
        kept = {key for other in others for key in self.pack_keys(other)}
        self._steps.pop(plan, None)
        self.cache.drop([key for key in self.pack_keys(plan) if key not in kept])

    def _plan_layout(self, plan: Plan) -> Layout:
        return self._plan_step(plan).layout

    def _plan_step(self, plan: Plan) -> _Step:
        """A single plan's layout and native step, remembered while no pack has been evicted since."""
        cached = self._steps.get(plan)
        if cached is not None and cached.generation == self.cache.generation:
            self.cache.touch(self.pack_keys(plan))
            return cached
        self.check_plan(plan)
        started, built_before = time.perf_counter(), self.cache.build_s
        prepared = self._step_for(self._layout([plan]))
        self._prepare_s += time.perf_counter() - started - (self.cache.build_s - built_before)
        # Steps of an older generation may hold evicted packs: dropping them frees those packs.
        self._steps = {p: step for p, step in self._steps.items() if step.generation == self.cache.generation}
        self._steps[plan] = prepared
        return prepared

    def _mixed_step(self, layout: Layout) -> _Step:
        """The step of a running set of several plans. Its native program is kept while no pack is
        evicted and given each new layout: the running set changes at almost every step under load, and
        handing every pack over again cost more than the layout itself."""
        kept = self._mixed
        reuse = kept.native if kept is not None and kept.generation == self.cache.generation else None
        self._mixed = self._step_for(layout, reuse)
        return self._mixed

    def _step_for(self, layout: Layout, reuse: NativeStep | None = None) -> _Step:
        """A step for `layout`; its native program `reuse` given the layout, when one of this pack
        generation is at hand, else a new one."""
        if not (self.native and native_supports(layout, self.pool)):
            return _Step(self.cache.generation, layout, None)
        if reuse is None:
            reuse = NativeStep(self.model, layout, self.max_running)
        else:
            reuse.relayout(layout)
        return _Step(self.cache.generation, layout, reuse)

    # ---- the running set ------------------------------------------------------------------------

    @property
    def last_step(self) -> StepStats:
        return self._last_step

    @property
    def last_logits(self) -> dict[int, torch.Tensor]:
        """The float32 logits [vocab] each sequence's latest token was chosen from, by seq id."""
        return {seq_id: logits[row] for ids, logits in self._last_logits for row, seq_id in enumerate(ids)}

    @property
    def relayout_due(self) -> bool:
        return bool(self._running) and (self._dirty or self._step is None)

    @property
    def step_route(self) -> str:
        """How the running set's decode steps run: "native" (one call) or "pytorch" (op by op)."""
        return "native" if self._step is not None and self._step.native is not None else "pytorch"

    @property
    def free_slots(self) -> int:
        return self.pool.free

    @property
    def running(self) -> int:
        return len(self._sequences)

    @property
    def kv_usage(self) -> float:
        d = self.model.dims
        reserved = sum(min(len(s.prompt) + s.sampling.max_new_tokens, d.max_positions)
                       for s in self._sequences.values())
        return reserved / (self.pool.slots * d.max_positions)

    def add(self, request: SequenceRequest, n: int = 1) -> list[int]:
        self._check_request(request, n)
        self.check_plan(request.plan)
        if self.pool.free < n:
            raise KVPoolFull(f"{n} sequences asked for, {self.pool.free} of {self.pool.slots} KV slots free")
        sequences = []
        for index in range(n):
            sampling = request.sampling
            if index and sampling.seed is not None:
                sampling = replace(sampling, seed=sampling.seed + index)
            slot = self.pool.allocate()
            sequence = _Sequence(next(self._ids), slot, request.plan, sampling, list(request.prompt_ids))
            self.sampler.add(slot, sampling, sequence.prompt)
            self._sequences[sequence.seq_id] = sequence
            sequences.append(sequence)
        sequences[0].forks = sequences[1:]
        self._pending.append(sequences[0])
        return [s.seq_id for s in sequences]

    def abort(self, seq_id: int) -> None:
        sequence = self._sequences.get(seq_id)
        if sequence is None:
            return
        if sequence in self._pending:
            # Its forks keep the shared prefill: the first one inherits it.
            self._pending.remove(sequence)
            if sequence.forks:
                heir, *rest = sequence.forks
                heir.forks = rest
                self._pending.insert(0, heir)
        for pending in self._pending:
            if sequence in pending.forks:
                pending.forks.remove(sequence)
        self._leave(sequence)

    def _leave(self, sequence: _Sequence) -> None:
        del self._sequences[sequence.seq_id]
        if sequence in self._running:
            self._running.remove(sequence)
            self._dirty = True
        self.sampler.remove(sequence.slot)
        self.pool.release(sequence.slot)

    @torch.inference_mode()
    def step(self, threads: StepThreads = SAME_THREADS) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        self._last_logits = []
        started, setup_before = time.perf_counter(), self.cache.build_s + self._prepare_s
        decoding = list(self._running)
        joined: list[_Sequence] = []
        if self._pending:
            _use_threads(threads.prefill)
        calls = []
        for batch in prefill_batches([(s.plan, len(s.prompt)) for s in self._pending]):
            sequences, call_started = [self._pending[i] for i in batch], time.perf_counter()
            events += self._prefill(sequences, joined)
            calls.append(PrefillCall(sequences[0].plan, len(sequences), max(len(s.prompt) for s in sequences),
                                     time.perf_counter() - call_started))
        prefill_tokens = sum(len(s.prompt) for s in self._pending)
        self._pending = []
        prefilled = time.perf_counter()
        layout_s = 0.0
        if decoding:
            _use_threads(threads.decode)
            layout_s = self._ensure_step_layout(decoding)
            events += self._decode()
        if joined:
            self._running += joined
            self._dirty = True
        done = time.perf_counter()
        self._last_step = StepStats(prefill_tokens, prefilled - started, tuple(calls), len(decoding),
                                    done - prefilled - layout_s, layout_s,
                                    self.cache.build_s + self._prepare_s - setup_before)
        return events

    def _prefill(self, batch: list[_Sequence], joined: list[_Sequence]) -> list[TokenEvent]:
        """Run the prompts of sequences of one plan in one call (each for its sequence and its forks,
        right-padded to the longest); those not finished join `joined`."""
        layout = self._plan_layout(batch[0].plan)
        lengths = [len(s.prompt) for s in batch]
        tokens = torch.tensor([s.prompt + [0] * (max(lengths) - len(s.prompt)) for s in batch], device=self.device)
        logits = self.model.prefill(layout, tokens, self.pool, [s.slot for s in batch], lengths)
        events = []
        for row, (sequence, length) in enumerate(zip(batch, lengths, strict=True)):
            members = [sequence, *sequence.forks]
            last = logits[row:row + 1]
            self._last_logits.append(([m.seq_id for m in members], last.expand(len(members), -1)))
            for member in members:
                if member is not sequence:
                    self.pool.copy_prefix(sequence.slot, member.slot, length)
                member.position = length
                self.pool.lengths[member.slot] = length
                events.append(self._advance(member, self.sampler.sample_slot(last, member.slot)))
                if member.seq_id in self._sequences:
                    joined.append(member)
        return events

    def _ensure_step_layout(self, decoding: list[_Sequence]) -> float:
        """Rebuild the running set's step after a change; returns the seconds spent."""
        if not self._dirty and self._step is not None:
            return 0.0
        started = time.perf_counter()
        plans = [s.plan for s in decoding]
        self._step = self._plan_step(plans[0]) if len(set(plans)) == 1 else self._mixed_step(self._layout(plans))
        if self._step.native is None:
            slots = torch.tensor([s.slot for s in decoding], dtype=torch.long, device=self.device)
            positions = torch.tensor([s.position for s in decoding], dtype=torch.long, device=self.device)
            self._rows = (slots, positions)
        self._slots = [s.slot for s in decoding]
        self.sampler.set_order(self._slots)
        self._dirty = False
        return time.perf_counter() - started

    def _decode(self) -> list[TokenEvent]:
        decoding = list(self._running)
        tokens = [s.last_token for s in decoding]
        if self._step.native is not None:
            logits = self._step.native(tokens, [s.position for s in decoding], self._slots, self.pool)
        else:
            slots, positions = self._rows
            span = max(s.position for s in decoding) + 1
            logits = self.model.decode(self._step.layout, torch.tensor(tokens, device=self.device), positions, slots,
                                       self.pool, span)
            positions += 1
        self._last_logits.append(([s.seq_id for s in decoding], logits))
        events = []
        for sequence, choice in zip(decoding, self.sampler(logits), strict=True):
            sequence.position += 1
            self.pool.lengths[sequence.slot] = sequence.position
            events.append(self._advance(sequence, choice))
        return events

    def _advance(self, sequence: _Sequence, choice: Choice) -> TokenEvent:
        """Record a sequence's new token; it leaves the running set on its last one."""
        sequence.generated += 1
        sequence.last_token = choice.token_id
        reason = None
        if choice.token_id in self.eos_ids:
            reason = "eos"
        elif sequence.generated >= sequence.sampling.max_new_tokens or sequence.position >= self.pool.max_len:
            reason = "length"
        if reason is not None:
            self._leave(sequence)
        return TokenEvent(sequence.seq_id, choice.token_id, reason, choice.logprob, choice.top_logprobs)

    def _check_request(self, request: SequenceRequest, n: int) -> None:
        dims = self.model.dims
        prompt = request.prompt_ids
        if not prompt:
            raise RequestError("prompt_ids must not be empty")
        bad = [t for t in prompt if not 0 <= t < dims.vocab]
        if bad:
            raise RequestError(f"prompt_ids: token id {bad[0]} is outside 0..{dims.vocab - 1}")
        if len(prompt) >= dims.max_positions:
            raise RequestError(f"prompt_ids has {len(prompt)} tokens; the model allows {dims.max_positions - 1}")
        if n < 1:
            raise RequestError(f"n must be >= 1, got {n}")
        check_sampling(request.sampling)

    # ---- conveniences ---------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], plan: Plan, sampling: SamplingParams | None = None) -> list[int]:
        """Generate for one prompt (stepping everything running); returns its new token ids, EOS included."""
        (seq_id,) = self.add(SequenceRequest(prompt_ids, plan, sampling or SamplingParams()))
        tokens: list[int] = []
        while seq_id in self._sequences:
            tokens += [e.token_id for e in self.step() if e.seq_id == seq_id]
        return tokens

    def decode_nll(self, tokens: list[int], plan: Plan) -> float:
        """Mean next-token NLL of `tokens`, read one token per decode step (teacher-forced): the quality
        of the decode path that serves, kernels included (`logits` measures prefill's dense path)."""
        if self._sequences:
            raise RuntimeError("decode_nll needs an idle engine")
        if len(tokens) < 2:
            raise RequestError(f"decode_nll needs at least 2 tokens, got {len(tokens)}")
        (seq_id,) = self.add(SequenceRequest(tokens[:1], plan, SamplingParams(max_new_tokens=len(tokens))))
        sequence = self._sequences[seq_id]
        eos_ids, self.eos_ids = self.eos_ids, frozenset()  # the text goes on past end-of-sequence tokens
        total = 0.0
        try:
            for position in range(1, len(tokens)):
                self.step()
                total -= torch.log_softmax(self.last_logits[seq_id], -1)[tokens[position]].item()
                sequence.last_token = tokens[position]  # the next step reads the text's token, not the sampled one
        finally:
            self.eos_ids = eos_ids
            self.abort(seq_id)
        return total / (len(tokens) - 1)

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Float32 logits at every position of `tokens` [batch, seq] (no cache): for perplexity."""
        return self.model.prefill(self._plan_layout(plan), tokens.to(self.device))


def eos_token_ids(tokenizer, config) -> frozenset[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return frozenset(ids)
