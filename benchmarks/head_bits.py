"""The output head's bit-width: perplexity and batch-1 decode speed per (body width, head bits).

Perplexity runs on the serving engine's prefill path (`engine.logits`) over the first --tokens of a
text in windows of 512; speed is the best of --rounds interleaved runs of 64 greedy tokens after a
64-token prompt, at batch 1, reported against the same body width with an 8-bit head.

    python benchmarks/head_bits.py --text ../shared/data/wikitext-2-raw/wiki.test.raw [--artifact DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import quept_core as qc
from quept_core.bench.runner import _fixed_length, perplexity, text_tokens
from quept_core.io.paths import cache_dir
from quept_core.planning.plan import uniform_plan
from quept_core.runtime.protocol import SamplingParams, SequenceRequest

SEQLEN = 512
NEW_TOKENS = 64


def decode_tok_s(engine: qc.QueptEngine, plan, prompt: list[int]) -> float:
    with _fixed_length(engine):
        engine.add(SequenceRequest(prompt, plan, SamplingParams(max_new_tokens=NEW_TOKENS)))
        engine.step()  # the prefill
        start, tokens = time.perf_counter(), 0
        while engine.running:
            tokens += len(engine.step())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--artifact", type=Path, default=cache_dir() / "artifacts" / "smollm2-135m-fast")
    parser.add_argument("--widths", default="8,6,4,3")
    parser.add_argument("--heads", default="8,6,5,4")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    loaded = qc.load_model("smollm2-135m")
    engine = qc.QueptEngine.from_calibrated(qc.load_artifact(args.artifact, loaded), head_bits=None)
    tokens = text_tokens(loaded, args.text)[: args.tokens]
    prompt = tokens[:64].tolist()
    combos = [(int(w), int(h)) for w in args.widths.split(",") for h in args.heads.split(",")]
    plans = {c: uniform_plan(engine.linear_names, *c) for c in combos}
    ppl = {c: perplexity(lambda x, plan=plans[c]: engine.logits(x, plan), tokens, SEQLEN) for c in combos}
    speed = dict.fromkeys(combos, 0.0)
    for _ in range(args.rounds):
        for c in combos:
            speed[c] = max(speed[c], decode_tok_s(engine, plans[c], prompt))
    print(f"cpu threads {torch.get_num_threads()}; perplexity on {tokens.numel()} tokens; best of {args.rounds} rounds")
    print("| body | head | perplexity | vs 8-bit head | decode tok/s b1 | vs 8-bit head |")
    print("|---|---:|---:|---:|---:|---:|")
    for width, head in combos:
        base = (width, max(h for w, h in combos if w == width))
        print(f"| w{width} | {head} | {ppl[(width, head)]:.2f} | {ppl[(width, head)] / ppl[base] - 1:+.1%} | "
              f"{speed[(width, head)]:.1f} | {speed[(width, head)] / speed[base]:.2f}x |")


if __name__ == "__main__":
    main()
