"""Concurrency sweep with an outside load tool, guidellm, against a running QuEPT-serve on loopback.

Runs guidellm's own CLI (the `loadgen` extra pins it) on the OpenAI chat route with synthetic prompts
of `--prompt-tokens` tokens and `--output-tokens` new tokens, one benchmark per concurrency, and prints
per concurrency: requests completed and failed, total output tokens/s and its ratio to concurrency 1
(or the first level), time to first token p50 and request latency p50. guidellm counts the tokens
with the server's own tokenizer, read from the model's local folder (no hub needed).

    python benchmarks/guidellm_sweep.py --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 48 \\
        [--model smollm2-135m] [--guidellm PATH] [--json out.json]

guidellm starts one worker process per stream by default; on a small host those processes compete with
the server for the CPU, so the sweep runs it with one worker process (`--workers`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

# A module of its own when run as a script: benchmarks/ is on sys.path then, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.loadtest import check_loopback  # noqa: E402


def find_guidellm(path: str | None = None) -> str | None:
    """The guidellm CLI: `path`, else the one beside this Python, else the one on PATH; None if absent."""
    candidates = [path] if path else [str(Path(sys.executable).with_name("guidellm")), shutil.which("guidellm")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def tokenizer_folder(model: str | None) -> Path:
    """A local folder with the model's tokenizer (its cached float folder), for guidellm to load."""
    from quept_core.io.models import float_folder, resolve_model

    return float_folder(resolve_model(model))[0]


def run_guidellm(cli: str, url: str, model_id: str, tokenizer: Path, concurrency: list[int], requests: int,
                 prompt_tokens: int, output_tokens: int, workers: int, out: Path) -> dict:
    command = [
        cli, "run",
        "--backend", f"kind=openai_http,target={url},model={model_id}",
        "--tokenizer", f"kind=hf_auto,model={tokenizer}",
        "--profile", "kind=concurrent,streams=1",
        "--override", "profile.streams", ",".join(str(c) for c in concurrency),
        "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
        "--constraint", f"kind=max_requests,count={requests}",
        "--output", f"kind=json,path={out}",
        "--disable-console-interactive",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GUIDELLM__MAX_WORKER_PROCESSES": str(workers)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def summarize(report: dict) -> list[dict]:
    rows = []
    for benchmark in report["benchmarks"]:
        metrics = benchmark["metrics"]
        totals = metrics["request_totals"]
        rows.append({
            "concurrency": benchmark["config"]["strategy"]["streams"],
            "completed": totals["successful"],
            "failed": totals["errored"] + totals["incomplete"],
            "output_tok_s": round(metrics["output_tokens_per_second"]["successful"]["mean"], 1),  # completed ones
            "ttft_ms_p50": round(metrics["time_to_first_token_ms"]["successful"]["median"]),
            "latency_s_p50": round(metrics["request_latency"]["successful"]["median"], 2),
        })
    base = rows[0]["output_tok_s"]
    for row in rows:
        row["vs_first"] = round(row["output_tok_s"] / base, 2) if base else None
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'conc':>4} {'done':>5} {'failed':>6} {'out tok/s':>9} {'vs first':>8} {'TTFT p50 ms':>11} {'latency p50 s':>13}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['completed']:>5} {r['failed']:>6} {r['output_tok_s']:>9} {r['vs_first']:>8} "
              f"{r['ttft_ms_p50']:>11} {r['latency_s_p50']:>13}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="guidellm worker processes")
    parser.add_argument("--model", default=None, help="the served model, for its tokenizer (default: the embedded one)")
    parser.add_argument("--guidellm", default=None, help="path of the guidellm CLI")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and guidellm's report here")
    args = parser.parse_args()
    check_loopback(args.url)
    cli = find_guidellm(args.guidellm)
    if cli is None:
        raise SystemExit("error: guidellm not found: install the `loadgen` extra (pip install -e '.[loadgen]') "
                         "or pass --guidellm PATH")
    model_id = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    with tempfile.TemporaryDirectory() as scratch:
        report = run_guidellm(cli, args.url, model_id, tokenizer_folder(args.model), args.concurrency, args.requests,
                              args.prompt_tokens, args.output_tokens, args.workers, Path(scratch) / "report.json")
    rows = summarize(report)
    print_table(rows)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "guidellm": report}))


if __name__ == "__main__":
    main()
