"""Round-to-nearest perplexity per (bit-width, group size): the measurement behind the default groups.

    python benchmarks/group_sizes.py --text ../shared/data/wikitext-2-raw/wiki.test.raw --max-tokens 16384

Every linear of the decoder blocks is quantized with the same asymmetric integer-zero-point quantizer
QuEPT uses (no clipping, no calibration); the output head stays in full precision. Prints a Markdown
table of perplexity and bits per weight (fp16 scale and 8-bit zero-point per group counted).
The default model's weights were Q4_1 (4-bit, groups of 32): a 4-bit g32 row reproduces them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from quept_core.eval.perplexity import make_windows, perplexity, read_text, tokenize_text
from quept_core.io.models import load_model
from quept_core.layers import model_linear_names
from quept_core.planning.plan import uniform_plan
from quept_core.quant.grid import quantize, storage_bits_per_weight
from quept_core.quant.sources import float_weights, use_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--bits", default="3,4,5,6,7,8")
    parser.add_argument("--groups", default="64,128,-1", help="comma list; -1 is one group per output row")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    windows = make_windows(tokenize_text(loaded.tokenizer, read_text(args.text)), args.seqlen, args.max_tokens)
    names = model_linear_names(loaded.model)
    weights = float_weights(loaded.model, names)
    groups = [int(g) for g in args.groups.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    fp = perplexity(loaded.model, windows).ppl
    print(f"{loaded.name}, WikiText-2 test, first {windows.numel()} tokens, seqlen {args.seqlen}; "
          f"round-to-nearest, asymmetric, integer zero-point; fp {fp:.2f}\n")
    print("| bits | " + " | ".join("per-channel" if g == -1 else f"g{g}" for g in groups) + " |")
    print("|---|" + "---|" * len(groups))
    for bits in bits_list:
        cells = []
        for group in groups:
            plan = uniform_plan(names, bits)
            quantized = {name: quantize(weights[name], bits, group).dequantize() for name in plan.layer_bits}
            with use_weights(loaded.model, quantized):
                ppl = perplexity(loaded.model, windows).ppl
            numels = {name: w.numel() for name, w in weights.items()}
            size = sum(numels[n] * storage_bits_per_weight(bits, group, weights[n].shape[1]) for n in names)
            size /= sum(numels.values())
            cells.append(f"{ppl:.2f} ({(ppl / fp - 1) * 100:+.1f} %, {size:.3f} b/w)")
        print(f"| {bits} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
