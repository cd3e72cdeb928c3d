"""Engine steps on every CPU thread and on one, on a quiet host and with busy loops competing for the cores.

Loads the engine `quept serve` serves (the same settings, `QUEPT_*` and flags after `--`), then for each
host condition (quiet; --hog-procs busy-loop processes) and each thread count runs --rounds rounds,
alternating the counts, of: --batch prompts of --prompt-tokens tokens prefilled in one step, then
--new-tokens decode steps of them all. Prints the median prefill step and the median and p90 decode
step per (host, threads), each against all threads on the same host. This is what the server's thread
tuner chooses between (docs/controller.md, "Threads under contention").

    python benchmarks/threads_under_contention.py [--precision w4] [--hog-procs 2] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from quept_core.runtime.protocol import SamplingParams, SequenceRequest
from service.engine.loading import load_backend
from service.settings import load_settings

# A module of its own when run as a script: benchmarks/ is on sys.path then, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.loadtest import HOG  # noqa: E402

HOG_BOUND_S = 600  # the busy loops end by themselves after this long, whatever happens to this script


def run_round(engine, plan, batch: int, prompt: list[int], new_tokens: int, threads: int) -> tuple[float, list[float]]:
    """(prefill step seconds, decode step seconds) of one round on `threads` threads."""
    torch.set_num_threads(threads)
    for _ in range(batch):
        engine.add(SequenceRequest(prompt, plan, SamplingParams(max_new_tokens=new_tokens + 1)))
    start = time.perf_counter()
    engine.step()
    prefill_s = time.perf_counter() - start
    steps = []
    while engine.running:
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    return prefill_s, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="w4")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hog-procs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args, serve_args = parser.parse_known_args()
    backend = load_backend(load_settings([a for a in serve_args if a != "--"]))
    engine, plan = backend.engine, backend.resolve(args.precision)
    engine.eos_ids = frozenset()  # every round decodes all its tokens
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    every = torch.get_num_threads()
    counts = sorted({every, 1}, reverse=True)
    run_round(engine, plan, args.batch, prompt, 2, every)  # first calls of these shapes
    rows = []
    for host, procs in (("quiet", 0), (f"{args.hog_procs} busy loops", args.hog_procs)):
        hogs = [subprocess.Popen([sys.executable, "-c", HOG, str(HOG_BOUND_S)]) for _ in range(procs)]
        try:
            time.sleep(0.5 if procs else 0.0)
            runs: dict[int, list[tuple[float, list[float]]]] = {n: [] for n in counts}
            for _ in range(args.rounds):
                for n in counts:
                    runs[n].append(run_round(engine, plan, args.batch, prompt, args.new_tokens, n))
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        for n in counts:
            decode = sorted(s for _, steps in runs[n] for s in steps)
            rows.append({"host": host, "threads": n,
                         "prefill_ms": statistics.median(p for p, _ in runs[n]) * 1e3,
                         "decode_ms": statistics.median(decode) * 1e3,
                         "decode_p90_ms": decode[int(0.9 * (len(decode) - 1))] * 1e3})
    torch.set_num_threads(every)
    for row in rows:
        base = next(r for r in rows if r["host"] == row["host"] and r["threads"] == every)
        row["prefill_vs_all"] = row["prefill_ms"] / base["prefill_ms"]
        row["decode_vs_all"] = row["decode_ms"] / base["decode_ms"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.precision}, {args.batch} prompts of {args.prompt_tokens} tokens, {args.new_tokens} decode steps, "
          f"{args.rounds} rounds (seconds: lower is faster; ratios against {every} threads on the same host)")
    print("| host | threads | prefill step ms (vs all) | decode step ms p50 (vs all) | decode p90 ms |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['host']} | {r['threads']} | {r['prefill_ms']:.0f} ({r['prefill_vs_all']:.2f}) | "
              f"{r['decode_ms']:.1f} ({r['decode_vs_all']:.2f}) | {r['decode_p90_ms']:.1f} |")


if __name__ == "__main__":
    main()
