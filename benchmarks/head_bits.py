"""The output head's bit-width and grid: perplexity and decode speed per (body width, head bits, head group).

Perplexity runs on the serving engine's prefill path (`engine.logits`) over the first --tokens of a
text in windows of 512; speed is the best of --rounds interleaved runs of 64 greedy tokens after a
64-token prompt, at --batch sequences, reported against the same body width with an 8-bit head on the
first of --head-groups (the served grid, `HEAD_GROUP_SIZE`, by default). Each head group is an engine
of its own over the same calibrated weights.

    python benchmarks/head_bits.py --text ../shared/data/wikitext-2-raw/wiki.test.raw [--artifact DIR]
        [--heads 8,6,5,4] [--head-groups 64,-1] [--batch 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import quept_core as qc
from quept_core.bench.runner import _fixed_length, perplexity, text_tokens
from quept_core.io.paths import cache_dir
from quept_core.layers import HEAD
from quept_core.planning.plan import uniform_plan
from quept_core.quant.grid import QuantizedWeight, quantize
from quept_core.runtime.protocol import SamplingParams, SequenceRequest
from quept_core.runtime.weights import HEAD_GROUP_SIZE, ElasticWeights

SEQLEN = 512
NEW_TOKENS = 64


class HeadGrid(ElasticWeights):
    """The calibrated weights with the output head in groups of `group` (-1: one per row) at every width."""

    def __init__(self, calibrated, group: int):
        super().__init__(calibrated.loaded, calibrated.elastic, calibrated.bit_config)
        self.group = group

    def quantized(self, name: str, bits: int) -> QuantizedWeight:
        if name == HEAD:
            return quantize(self.model.lm_head.weight.detach(), bits, self.group)
        return super().quantized(name, bits)


def decode_tok_s(engine: qc.QueptEngine, plan, prompt: list[int], batch: int) -> float:
    with _fixed_length(engine):
        engine.add(SequenceRequest(prompt, plan, SamplingParams(max_new_tokens=NEW_TOKENS)), batch)
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
    parser.add_argument("--head-groups", default=str(HEAD_GROUP_SIZE),
                        help="comma list of the head's group sizes (-1: one group per row)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoding together in the speed runs")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    loaded = qc.load_model("smollm2-135m")
    calibrated = qc.load_artifact(args.artifact, loaded)
    groups = [int(g) for g in args.head_groups.split(",")]
    engines = {g: qc.QueptEngine(HeadGrid(calibrated, g), loaded.tokenizer, model_name=loaded.name, head_bits=None)
               for g in groups}
    tokens = text_tokens(loaded, args.text)[: args.tokens]
    prompt = tokens[:64].tolist()
    combos = [(int(w), int(h), g) for w in args.widths.split(",") for h in args.heads.split(",") for g in groups]
    plans = {c: uniform_plan(engines[c[2]].linear_names, c[0], c[1]) for c in combos}
    ppl = {c: perplexity(lambda x, c=c: engines[c[2]].logits(x, plans[c]), tokens, SEQLEN) for c in combos}
    speed = dict.fromkeys(combos, 0.0)
    for _ in range(args.rounds):
        for c in combos:
            speed[c] = max(speed[c], decode_tok_s(engines[c[2]], plans[c], prompt, args.batch))
    print(f"cpu threads {torch.get_num_threads()}; perplexity on {tokens.numel()} tokens; decode at batch "
          f"{args.batch}, best of {args.rounds} rounds; head groups: -1 is one per row")
    print(f"| body | head | head group | perplexity | vs 8-bit head, group {groups[0]} | decode tok/s | vs 8-bit head, group {groups[0]} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for width, head, group in combos:
        base = (width, max(h for w, h, _ in combos if w == width), groups[0])
        c = (width, head, group)
        print(f"| w{width} | {head} | {group} | {ppl[c]:.2f} | {ppl[c] / ppl[base] - 1:+.1%} | "
              f"{speed[c]:.1f} | {speed[c] / speed[base]:.2f}x |")


if __name__ == "__main__":
    main()
