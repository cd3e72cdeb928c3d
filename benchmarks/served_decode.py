"""Decode tokens/s of the engine `quept serve` serves, per plan and running-set size.

Loads the engine as the server does (its serving store and packs; the same settings, `QUEPT_*` and
flags after `--`, e.g. `-- --max-running 32`), then for --rounds rounds, each plan and each batch in
turn: batch prompts of --prompt-tokens tokens prefilled in one step and --new-tokens decode steps of
them all. Prints the best rate of each (plan, batch) and its ratio to the same plan at batch 1.
`quept bench` builds its engine from the calibrated float masters instead, next to transformers and
llama.cpp in the same run; this one reads what a running server reads, at any running-set size.

    python benchmarks/served_decode.py [--precisions fp,w4,w8] [--batches 1,8,16] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from service.engine.loading import load_backend
from service.settings import load_settings

# A module of its own when run as a script: benchmarks/ is on sys.path then, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.threads_under_contention import run_round  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", type=lambda s: s.split(","), default=["fp", "w8", "w4", "w3"])
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 16])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args, serve_args = parser.parse_known_args()
    backend = load_backend(load_settings([a for a in serve_args if a != "--"]))
    engine = backend.engine
    engine.eos_ids = frozenset()  # every round decodes all its tokens
    plans = {name: backend.resolve(name) for name in args.precisions}
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    threads = torch.get_num_threads()
    for plan in plans.values():
        run_round(engine, plan, 1, prompt, 2, threads)  # builds packs not resident yet, first calls
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for name, plan in plans.items():
            for batch in args.batches:
                _, steps = run_round(engine, plan, batch, prompt, args.new_tokens, threads)
                rate = batch * len(steps) / sum(steps)
                best[name, batch] = max(best.get((name, batch), 0.0), rate)
    rows = [{"precision": name, "batch": batch, "tokens_per_s": round(best[name, batch], 1),
             "vs_batch_1": round(best[name, batch] / best[name, 1], 2) if (name, 1) in best else None}
            for name in plans for batch in args.batches]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"decode tokens/s of the whole running set, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, "
          f"{threads} threads, best of {args.rounds} rounds")
    print("| precision | batch | tokens/s | vs batch 1 |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['precision']} | {r['batch']} | {r['tokens_per_s']} | {r['vs_batch_1'] or '–'} |")


if __name__ == "__main__":
    main()
