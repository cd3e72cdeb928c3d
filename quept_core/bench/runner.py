"""`quept bench`: the runtime side by side with transformers (and llama.cpp when installed).

Every figure of one run is measured on the same machine in the same process, so ratios between
rows are meaningful; absolute numbers depend on the machine and its load.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, astuple
from pathlib import Path

import torch
import torch.nn.functional as F

from quept_core.bench.peers import llamacpp
from quept_core.bench.peers.hf import hf_speed
from quept_core.bench.results import BenchConfig, BenchResult, BenchRow, Speed
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

def _generate_timed(engine: QueptEngine, prompts: torch.Tensor, plans: list[Plan], new_tokens: int
                    ) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second) for prompts [rows, tokens] joining one running set
    (row i at plans[i % len(plans)]), stopping only at the length."""
    sampling = SamplingParams(max_new_tokens=new_tokens)
    for row, prompt in enumerate(prompts):
        engine.add(SequenceRequest(prompt.tolist(), plans[row % len(plans)], sampling))
    prefill = _timed(engine.step)
    tokens, start = 0, time.perf_counter()
    while engine.running:
        tokens += len(engine.step())
    return prefill, tokens / max(time.perf_counter() - start, 1e-9)


def engine_speed(engine: QueptEngine, plan: Plan, prompts: torch.Tensor, config: BenchConfig) -> Speed:
    eos_ids = engine.eos_ids
    engine.eos_ids = frozenset()  # throughput is measured over a fixed number of tokens
    try:
        prefill, decode_b1 = _generate_timed(engine, prompts[:1], [plan], config.new_tokens)
        _, decode_b8 = _generate_timed(engine, prompts, [plan], config.new_tokens)
    finally:
        engine.eos_ids = eos_ids
    return Speed(prompts.shape[1] / prefill, decode_b1, decode_b8)


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
    tokens = text_tokens(loaded, text) if text is not None else None
    vocab = engine.model.dims.vocab
    needed = config.prompt_tokens * config.batch
    if tokens is None or tokens.numel() < needed:
        notes.append("no evaluation text: prompts are random token ids and perplexity is not measured")
        tokens = torch.randint(0, vocab, (needed,), generator=torch.Generator().manual_seed(0))
        ppl_tokens = None
    else:
        ppl_tokens = tokens[: config.ppl_tokens]
    prompts = tokens[:needed].view(config.batch, config.prompt_tokens)

    reload_s = _timed(lambda: load_model(model_spec))
    baseline = load_model(model_spec).model
    fp32_bytes = sum(p.numel() for p in baseline.parameters()) * 4
    plans = [engine.plan(p) for p in precisions]
    rows = [BenchRow("hf", "fp", weight_bytes=sum(p.numel() * p.element_size() for p in baseline.parameters()))]
    rows += [BenchRow("quept", plan.name, weight_bytes=engine.weight_bytes(plan)) for plan in plans]
    measures: list[Callable[[], Speed]] = [lambda: hf_speed(baseline, prompts, config)]
    measures += [lambda plan=plan: engine_speed(engine, plan, prompts, config) for plan in plans]
    peer = None
    if gguf is None:
        notes.append("llama.cpp: the model is not a GGUF file")
    elif not llamacpp.available():
        notes.append("llama.cpp: not installed (pip install 'quept-serve[bench]' adds llama-cpp-python)")
    else:
        peer = llamacpp.LlamaCppPeer(gguf, config.prompt_tokens, config.new_tokens)
        rows.append(BenchRow("llama.cpp", peer.precision, weight_bytes=gguf.stat().st_size))
        measures.append(lambda: peer.speed(prompts, config.new_tokens))
    for plan in plans:  # warm-up: kernel choice, packing, allocation
        _generate_timed(engine, prompts[:1, :32], [plan], 4)
    # Rounds over every row, keeping each row's best: load from other processes only slows a row down.
    speeds = [Speed() for _ in measures]
    for round_index in range(config.repeats):
        for index, measure in enumerate(measures):
            log.info("round %d: %s %s", round_index + 1, rows[index].engine, rows[index].precision)
            speeds[index] = speeds[index].best(measure())
    for row, speed in zip(rows, speeds):
        row.prefill_tok_s, row.decode_tok_s_b1, row.decode_tok_s_b8 = astuple(speed)
    if ppl_tokens is not None:
        with torch.inference_mode():
            rows[0].ppl = perplexity(lambda w: baseline(w).logits, ppl_tokens, config.seqlen)
        for row, plan in zip(rows[1:], plans):
            row.ppl = perplexity(lambda w, plan=plan: engine.logits(w, plan), ppl_tokens, config.seqlen)
        if peer is not None:
            rows[-1].ppl = peer.perplexity(ppl_tokens, config.seqlen)

    uniform = [engine.plan(Precision.uniform(b)) for b in engine.bit_config.bits]
    engine.cache.limit_bytes = None
    for plan in uniform:
        engine.prepare(plan)
    uniform_keys = {key for plan in uniform for key in engine.pack_keys(plan)}
    uniform_bytes = sum(engine.cache.nbytes(key) for key in uniform_keys)
    switch_ms = switch_latency(engine, uniform + plans, config.switches)
    settings = {**asdict(config), "threads": torch.get_num_threads(), "device": str(engine.device),
                "dtype": str(engine.dtype).removeprefix("torch."), "head_bits": engine.head_bits}
    return BenchResult(rows, switch_ms, reload_s, uniform_bytes, fp32_bytes, notes, settings)


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
