"""`quept bench`: the runtime side by side with transformers (and llama.cpp when installed).

Every figure of one run is measured on the same machine in the same process, so ratios between
rows are meaningful; absolute numbers depend on the machine and its load.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from quept_core.bench.peers import llamacpp
from quept_core.bench.peers.hf import hf_speed
from quept_core.bench.results import BATCHES, BenchConfig, BenchResult, BenchRow, MixedSetRow, Speed
from quept_core.io.models import LoadedModel, load_model
from quept_core.planning.plan import Plan
from quept_core.precision import Precision
from quept_core.runtime.engine import QueptEngine
from quept_core.runtime.protocol import SamplingParams, SequenceRequest

log = logging.getLogger(__name__)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def text_tokens(loaded: LoadedModel, path: Path) -> torch.Tensor:
    """The whole text, CRLF normalised, tokenized once (the project's perplexity convention)."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return torch.tensor(loaded.tokenizer(text)["input_ids"], dtype=torch.long)


def perplexity(window_logits: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, seqlen: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `seqlen` tokens (tail dropped)."""
    count = tokens.numel() // seqlen
    if count == 0:
        raise ValueError(f"perplexity needs at least seqlen={seqlen} tokens, got {tokens.numel()}")
    total, predicted = 0.0, 0
    for window in tokens[: count * seqlen].view(count, seqlen):
        logits = window_logits(window.unsqueeze(0))[0, :-1]
        total += F.cross_entropy(logits.float(), window[1:].to(logits.device), reduction="sum").item()
        predicted += seqlen - 1
    return math.exp(total / predicted)


# the runtime --------------------------------------------------------------------------------------

def resident_set_bytes() -> int | None:
    """The process's resident set size (Linux /proc; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class _Run:
    prefill_s: float
    decode_tokens: int
    decode_s: float

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / max(self.decode_s, 1e-9)


@contextmanager
def _fixed_length(engine: QueptEngine):
    """No end-of-sequence stop: throughput is measured over a fixed number of tokens."""
    eos_ids, engine.eos_ids = engine.eos_ids, frozenset()
    try:
        yield
    finally:
        engine.eos_ids = eos_ids


def _generate_timed(engine: QueptEngine, prompts: torch.Tensor, plans: list[Plan], new_tokens: int) -> _Run:
    """Prompts [rows, tokens] joining one running set (row i at plans[i % len(plans)]), run to their length:
    the step that prefills them all, then the decode steps."""
    sampling = SamplingParams(max_new_tokens=new_tokens)
    for row, prompt in enumerate(prompts):
        engine.add(SequenceRequest(prompt.tolist(), plans[row % len(plans)], sampling))
    prefill = _timed(engine.step)
    tokens, start = 0, time.perf_counter()
    while engine.running:
        tokens += len(engine.step())
    return _Run(prefill, tokens, time.perf_counter() - start)


def engine_speed(engine: QueptEngine, plan: Plan, prompts: torch.Tensor, config: BenchConfig, batch: int) -> Speed:
    """Decode tokens/s of a running set of `batch` prompts at one plan (and, at batch 1, the prompt's prefill)."""
    with _fixed_length(engine):
        run = _generate_timed(engine, prompts[:batch], [plan], config.new_tokens)
    prefill = prompts.shape[1] / run.prefill_s if batch == 1 else None
    return Speed.at_batch(batch, run.decode_tok_s, prefill, engine.step_route)


def mixed_set_speed(engine: QueptEngine, plans: list[Plan], prompts: torch.Tensor, config: BenchConfig
                    ) -> MixedSetRow:
    """The same sequences (config.mixed_set_rows per plan) decoded in one running set, then as one
    per-plan batch after another (the scheduler before continuous batching)."""
    batch = prompts[: len(plans) * config.mixed_set_rows]
    with _fixed_length(engine):
        one_set = _generate_timed(engine, batch, plans, config.new_tokens)
        route = engine.step_route
        turns = [_generate_timed(engine, batch[index::len(plans)], [plan], config.new_tokens)
                 for index, plan in enumerate(plans)]
    turns_tok_s = sum(t.decode_tokens for t in turns) / max(sum(t.decode_s for t in turns), 1e-9)
    return MixedSetRow([p.name for p in plans], len(batch), one_set.decode_tok_s, turns_tok_s, step_route=route)


def resident_weight_bytes(engine: QueptEngine, plans: list[Plan]) -> int:
    """Bytes of the packs the plans run on, each counted once, plus the norms."""
    keys = list(dict.fromkeys(key for plan in plans for key in engine.pack_keys(plan)))
    return sum(pack.nbytes for pack in engine.cache.ensure(keys)) + engine.model.norm_bytes


def switch_latency(engine: QueptEngine, plans: list[Plan], switches: int) -> dict[str, float]:
    """Median and p99 of making a resident plan ready to run (`prepare`), in milliseconds."""
    for plan in plans:
        engine.prepare(plan)
    times = []
    for index in range(switches):
        plan = plans[index % len(plans)]
        start = time.perf_counter()
        engine.prepare(plan)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"p50": statistics.median(times), "p99": times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)]}


def run_bench(
    model_spec: str,
    make_engine: Callable[[LoadedModel], QueptEngine],
    precisions: list[str],
    config: BenchConfig,
    text: Path | None,
    gguf: Path | None,
) -> BenchResult:
    """Measure every row of the comparison; `text` feeds the prompts and the perplexity."""
    notes = []
    loaded = load_model(model_spec)
    engine = make_engine(loaded)
    if engine.max_running < max(BATCHES):
        raise ValueError(f"quept bench decodes batches of {max(BATCHES)}: the engine needs max_running >= "
                         f"{max(BATCHES)}, it has {engine.max_running}")
    tokens = text_tokens(loaded, text) if text is not None else None
    vocab = engine.model.dims.vocab
    needed = config.prompt_tokens * max(BATCHES)
    if tokens is None or tokens.numel() < needed:
        notes.append("no evaluation text: prompts are random token ids and perplexity is not measured")
        tokens = torch.randint(0, vocab, (needed,), generator=torch.Generator().manual_seed(0))
        ppl_tokens = None
    else:
        ppl_tokens = tokens[: config.ppl_tokens]
    prompts = tokens[:needed].view(max(BATCHES), config.prompt_tokens)

    reload_s = _timed(lambda: load_model(model_spec))
    baseline = load_model(model_spec).model
    fp32_bytes = sum(p.numel() for p in baseline.parameters()) * 4
    plans = [engine.plan(p) for p in precisions]
    rows = [BenchRow("hf", "fp", weight_bytes=sum(p.numel() * p.element_size() for p in baseline.parameters()))]
    rows += [BenchRow("quept", plan.name, weight_bytes=engine.weight_bytes(plan)) for plan in plans]
    # One measurement of a row at one batch size; None where the row has no such batch.
    measures: list[Callable[[int], Speed | None]] = [lambda batch: hf_speed(baseline, prompts, config, batch)]
    measures += [lambda batch, plan=plan: engine_speed(engine, plan, prompts, config, batch) for plan in plans]
    peer = None
    if gguf is None:
        notes.append("llama.cpp: the model is not a GGUF file")
    elif not llamacpp.available():
        notes.append("llama.cpp: not installed (pip install 'quept-serve[bench]' adds llama-cpp-python)")
    else:
        peer = llamacpp.LlamaCppPeer(gguf, config.prompt_tokens, config.new_tokens)
        rows.append(BenchRow("llama.cpp", peer.precision, weight_bytes=gguf.stat().st_size))
        measures.append(lambda batch: peer.speed(prompts, config.new_tokens) if batch == 1 else None)
    set_plans = [engine.plan(p) for p in config.mixed_set]
    mixed = MixedSetRow([p.name for p in set_plans], len(set_plans) * config.mixed_set_rows,
                        weight_bytes=resident_weight_bytes(engine, set_plans)) if set_plans else None
    _warm_up(engine, plans, set_plans, prompts, config)
    # Rounds over every row, keeping each row's best: load from other processes only slows a row down. Within
    # a round, one batch size at a time across all rows: this host's speed drifts by 10-25 % within minutes,
    # and rows measured seconds apart (not a whole row's batches apart) are what the ratios compare.
    speeds = [Speed() for _ in measures]
    for round_index in range(config.repeats):
        for batch in BATCHES:
            for index, measure in enumerate(measures):
                log.info("round %d, batch %d: %s %s", round_index + 1, batch, rows[index].engine, rows[index].precision)
                measured = measure(batch)
                if measured is not None:
                    speeds[index] = speeds[index].best(measured)
                    rows[index].rss_bytes = resident_set_bytes()
        if mixed is not None:
            log.info("round %d: mixed running set %s", round_index + 1, "+".join(mixed.plans))
            mixed = mixed.best(replace(mixed_set_speed(engine, set_plans, prompts, config),
                                       weight_bytes=mixed.weight_bytes, rss_bytes=resident_set_bytes()))
    for row, speed in zip(rows, speeds):
        row.take(speed)
    if ppl_tokens is not None:
        with torch.inference_mode():
            rows[0].ppl = perplexity(lambda w: baseline(w).logits, ppl_tokens, config.seqlen)
        for row, plan in zip(rows[1:], plans):
            row.ppl = perplexity(lambda w, plan=plan: engine.logits(w, plan), ppl_tokens, config.seqlen)
            row.decode_ppl = math.exp(engine.decode_nll(ppl_tokens[: config.decode_ppl_tokens].tolist(), plan))
        if peer is not None:
            rows[-1].ppl = peer.perplexity(ppl_tokens, config.seqlen)

    uniform = [engine.plan(Precision.uniform(b)) for b in engine.bit_config.bits]
    engine.cache.limit_bytes = None
    for plan in uniform:
        engine.prepare(plan)
    uniform_keys = {key for plan in uniform for key in engine.pack_keys(plan)}
    uniform_bytes = sum(engine.cache.nbytes(key) for key in uniform_keys)
    switch_ms = switch_latency(engine, uniform + plans, config.switches)
    settings = {**asdict(config), "mixed_set": list(config.mixed_set), "batches": list(BATCHES), "threads": torch.get_num_threads(),
                "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
                "head_bits": engine.head_bits, "max_running": engine.max_running}
    return BenchResult(rows, switch_ms, reload_s, uniform_bytes, fp32_bytes, notes, settings, mixed)


def _warm_up(engine: QueptEngine, plans: list[Plan], set_plans: list[Plan], prompts: torch.Tensor,
             config: BenchConfig) -> None:
    """Kernel choice, packing and allocation before anything is timed; the full-size batch commits the
    KV pool's pages (allocated uninitialised) for every slot the rows will use."""
    with _fixed_length(engine):
        for plan in plans:
            _generate_timed(engine, prompts[:1, :32], [plan], 4)
        if set_plans:
            _generate_timed(engine, prompts[: len(set_plans), :32], set_plans, 4)
        if plans:
            _generate_timed(engine, prompts, plans[:1], config.new_tokens)


def allocator_resolver(loaded: LoadedModel, engine: QueptEngine) -> Callable[[float], Plan]:
    """`mixed:<avg>` through the bit allocator on a proxy sensitivity table of the engine's weights."""
    from quept_core.calibration.data import calibration_tokens
    from quept_core.planning.allocator import Allocator
    from quept_core.planning.sensitivity import proxy_sensitivity, sensitivity_tokens

    allocator: list[Allocator] = []

    def resolve(avg_bits: float) -> Plan:
        if not allocator:
            tokens = calibration_tokens(loaded, n_samples=8, seqlen=256, seed=0)
            proxy, probe = sensitivity_tokens(tokens)
            table = proxy_sensitivity(loaded.model, engine.weights, engine.bit_config, proxy, probe)
            allocator.append(Allocator(table, engine.bit_config))
        return allocator[0].plan(avg_bits)

    return resolve
