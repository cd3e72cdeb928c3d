"""Prefill milliseconds of one prompt in the engine `quept serve` serves, per plan and prompt length.

Loads the engine as the server does (its serving store and packs; the same settings, `QUEPT_*` and
flags after `--`), then for --rounds rounds, each plan and each length in turn: one prompt of that many
tokens prefilled alone. Prints the fastest of the rounds. `--packed-max-tokens N` sets, for this
process, the prompt length up to which a call takes the packed kernels instead of dequantizing every
weight for a dense matmul (`formats.PACKED_MAX_TOKENS`): compare two values in separate processes,
alternating (one process switching back and forth measured the dense path twice as slow as it is).

    python benchmarks/served_prefill.py [--precisions w3,w4,w8] [--lengths 16,32,64,128] \\
        [--rounds 5] [--packed-max-tokens N] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from quept_core.runtime.kernels import formats
from service.engine.loading import load_backend
from service.settings import load_settings

# A module of its own when run as a script: benchmarks/ is on sys.path then, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.threads_under_contention import run_round  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", type=lambda s: s.split(","), default=["w3", "w4", "w8"])
    parser.add_argument("--lengths", type=lambda s: [int(n) for n in s.split(",")], default=[16, 32, 64, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--packed-max-tokens", type=int, default=formats.PACKED_MAX_TOKENS)
    parser.add_argument("--json", action="store_true")
    args, serve_args = parser.parse_known_args()
    formats.PACKED_MAX_TOKENS = args.packed_max_tokens
    backend = load_backend(load_settings([a for a in serve_args if a != "--"]))
    engine = backend.engine
    plans = {name: backend.resolve(name) for name in args.precisions}
    threads = torch.get_num_threads()
    for plan in plans.values():
        run_round(engine, plan, 1, list(range(1000, 1000 + max(args.lengths))), 0, threads)  # builds, first calls
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for name, plan in plans.items():
            for tokens in args.lengths:
                prefill_s, _ = run_round(engine, plan, 1, list(range(1000, 1000 + tokens)), 0, threads)
                best[name, tokens] = min(best.get((name, tokens), float("inf")), prefill_s)
    rows = [{"precision": name, "tokens": tokens, "ms": round(best[name, tokens] * 1000, 1)}
            for name in plans for tokens in args.lengths]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"prefill ms of one prompt, {threads} threads, packed kernels up to {args.packed_max_tokens} tokens, "
          f"best of {args.rounds} rounds")
    print("| precision | " + " | ".join(f"{n} tokens" for n in args.lengths) + " |")
    print("|---|" + "---:|" * len(args.lengths))
    for name in plans:
        print(f"| {name} | " + " | ".join(str(round(best[name, n] * 1000, 1)) for n in args.lengths) + " |")


if __name__ == "__main__":
    main()
