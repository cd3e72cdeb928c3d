"""Bounded load test against a running QuEPT-serve on loopback.

Drives `POST /generate` with a mix of precisions and budgeted `auto` requests at several
concurrency levels (multiples of what the server serves at once) and reports, per level: goodput,
time to first token p50/p99 per precision served, downgrade and rejection rates, timeouts and the
server's peak resident memory (the kernel's high-water mark with --server-pid, else sampled from
its `process_resident_memory_bytes`), and how far the controller's latency predictions were from
what each request measured (|predicted / measured - 1|, p50 and p90), the share of answered
requests with a latency budget that finished within it, and the share of budgeted `auto` requests
whose plan was the best-quality one that met the budget (the server's `quept_budget_choices_total`
over the level: within budget, and no plan of better quality would have been). With `--hog-s`, busy-loop
processes compete for the CPU for that many seconds, started `--hog-delay-s` into each level.

    python benchmarks/loadtest.py --url http://127.0.0.1:8000 --levels 1,2,4 --requests 48 \\
        [--server-pid PID] [--hog-s 60 --hog-procs 2] [--json]

Every loop is bounded by a request count and a wall-clock limit (the hog by its own duration), and
only loopback targets are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
from prometheus_client.parser import text_string_to_metric_families

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
PROMPTS = (
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn.",
    "List three uses of copper.",
    "What is the capital of France?",
    "Summarise the plot of Romeo and Juliet.",
)


def request_mix(info: dict) -> list[dict]:
    """Explicit uniform precisions, the artifact's mixed plans, full precision and budgeted `auto`
    requests, from the server's own /info (bit set and servable precisions)."""
    bit_set = info["bit_set"]
    mixed = [row["precision"] for row in info.get("precisions", []) if row["mode"] == "mixed"]
    return [
        *({"precision": f"w{b}"} for b in bit_set),
        *({"precision": name} for name in mixed[:2]),
        {"precision": "fp"},
        {"precision": "auto"},
        {"precision": "auto", "latency_budget_ms": 1500},
        {"precision": "auto", "latency_budget_ms": 4000, "min_precision": f"w{min(bit_set) + 1}"},
    ]


def capacity(info: dict) -> int:
    """Requests the server decodes at once: the sequences of its running set."""
    return info["limits"]["max_running"]


@dataclass
class LevelResult:
    concurrency: int
    sent: int = 0
    ok: int = 0
    rejected: int = 0  # 503 with Retry-After: shed on purpose
    invalid: int = 0  # 422: a budget no plan meets even on an idle server is the client's problem
    errors: Counter = field(default_factory=Counter)  # anything else: status code or exception name
    downgraded: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft_ms: dict = field(default_factory=lambda: defaultdict(list))
    budget_met: list = field(default_factory=list)  # per answered request with a latency budget: within it?
    budget_choices: Counter = field(default_factory=Counter)  # budgeted auto requests by outcome (server's count)
    peak_rss_bytes: float = 0.0
    records: list = field(default_factory=list)  # per request answered or refused: what was asked, served and timed

    def prediction_errors(self, steady: bool = False) -> list[float]:
        """|predicted / measured - 1| of each answered request's end-to-end latency. `steady`: only those
        sent after the first `concurrency` and before the last `concurrency` requests, while the running
        set was neither filling up nor draining (the load's own ramps, which no prediction foresees)."""
        records = sorted((r for r in self.records if r.get("predicted_total_ms")), key=lambda r: r["sent_at_s"])
        if steady:
            records = records[self.concurrency:-self.concurrency]
        return [abs(r["predicted_total_ms"] / r["total_ms"] - 1) for r in records]

    def summary(self) -> dict:
        def pct(values: list[float], q: float, digits: int = 1) -> float | None:
            if not values:
                return None
            return round(statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0], digits)

        return {
            "concurrency": self.concurrency,
            "sent": self.sent,
            "ok": self.ok,
            "goodput_req_s": round(self.ok / self.wall_s, 2),
            "goodput_tok_s": round(self.tokens / self.wall_s, 1),
            "rejected": self.rejected,
            "rejection_rate": round(self.rejected / self.sent, 3),
            "invalid": self.invalid,
            "downgrade_rate": round(self.downgraded / max(self.ok, 1), 3),
            "errors": dict(self.errors),
            "ttft_ms": {p: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for p, v in sorted(self.ttft_ms.items())},
            "prediction_error_p50": pct(errors := self.prediction_errors(), 50, 3),
            "prediction_error_p90": pct(errors, 90, 3),
            "steady_prediction_error_p50": pct(steady := self.prediction_errors(steady=True), 50, 3),
            "steady_prediction_error_p90": pct(steady, 90, 3),
            "budgeted": len(self.budget_met),
            "budget_met_rate": round(sum(self.budget_met) / len(self.budget_met), 3) if self.budget_met else None,
            "budget_choices": dict(self.budget_choices),
            "best_choice_rate": (round(self.budget_choices["best"] / self.budget_choices.total(), 3)
                                 if self.budget_choices.total() else None),
            "peak_rss_mb": round(self.peak_rss_bytes / 2**20, 1),
        }


def peak_rss_bytes(pid: int) -> float:
    """The kernel's high-water mark of a local process's resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    return 0.0


async def _resident_bytes(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    return 0.0


async def _budget_choices(client: httpx.AsyncClient) -> Counter:
    """The server's count of budgeted auto requests by outcome (read twice per level, so parsed in full)."""
    for metric in text_string_to_metric_families((await client.get("/metrics")).text):
        if metric.name == "quept_budget_choices":
            return Counter({s.labels["outcome"]: s.value for s in metric.samples})
    return Counter()


HOG = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


@dataclass(frozen=True)
class Hog:
    """Busy-loop processes that compete with the server for the CPU: `procs` of them for `seconds`,
    started `delay_s` into a level."""

    seconds: float = 0.0
    procs: int = 2
    delay_s: float = 5.0

    async def run(self) -> None:
        await asyncio.sleep(self.delay_s)
        hogs = [await asyncio.create_subprocess_exec(sys.executable, "-c", HOG, str(self.seconds))
                for _ in range(self.procs)]
        try:
            await asyncio.gather(*(h.wait() for h in hogs))
        finally:
            for h in hogs:
                if h.returncode is None:
                    h.kill()


async def run_level(url: str, concurrency: int, total: int, max_new_tokens: int, deadline_s: float,
                    mix: list[dict], seed: int, server_pid: int | None = None, hog: Hog | None = None) -> LevelResult:
    """Send `total` requests from `concurrency` clients; peak memory from /proc when the server's pid is
    known (a loopback server), else sampled from its `process_resident_memory_bytes`."""
    result = LevelResult(concurrency)
    rng = random.Random(seed)
    bodies = [{"prompt": rng.choice(PROMPTS), "max_new_tokens": max_new_tokens, "temperature": 0, **rng.choice(mix)}
              for _ in range(total)]
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    started = time.monotonic()
    stop_at = started + deadline_s
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=deadline_s, limits=limits) as client:

        async def worker() -> None:
            while time.monotonic() < stop_at:
                try:
                    body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                result.sent += 1
                sent_at = time.monotonic()
                try:
                    response = await client.post("/generate", json=body)
                except httpx.HTTPError as error:
                    result.errors[type(error).__name__] += 1
                    continue
                shed = response.status_code == 503 and "retry-after" in response.headers
                if shed or response.status_code == 422:
                    if shed:
                        result.rejected += 1
                    else:
                        result.invalid += 1
                    result.records.append({"level": concurrency, "sent_at_s": round(sent_at - started, 3),
                                           "requested": body["precision"], "budget_ms": body.get("latency_budget_ms"),
                                           "refused": response.status_code,
                                           "message": response.json().get("error", {}).get("message")})
                elif response.status_code == 200:
                    data = response.json()
                    result.ok += 1
                    result.tokens += data["usage"]["completion_tokens"]
                    result.downgraded += bool(data["precision"]["degraded"])
                    served = response.headers["x-precision-served"]
                    timing = data["timing"]
                    result.ttft_ms[served.split(":")[0]].append(timing["ttft_ms"])
                    if "latency_budget_ms" in body:
                        result.budget_met.append(timing["total_ms"] <= body["latency_budget_ms"])
                    result.records.append({"level": concurrency, "sent_at_s": round(sent_at - started, 3),
                                           "requested": body["precision"], "served": served,
                                           "budget_ms": body.get("latency_budget_ms"),
                                           "tokens": data["usage"]["completion_tokens"], **timing})
                else:
                    result.errors[str(response.status_code)] += 1

        async def sample_memory() -> None:
            while True:
                result.peak_rss_bytes = max(result.peak_rss_bytes, await _resident_bytes(client))
                await asyncio.sleep(0.5)

        choices_before = await _budget_choices(client)
        sampler = asyncio.create_task(sample_memory())
        competitor = asyncio.create_task(hog.run()) if hog and hog.seconds > 0 else None
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.monotonic() - started
        sampler.cancel()
        if competitor is not None:
            competitor.cancel()
        result.peak_rss_bytes = max(result.peak_rss_bytes, await _resident_bytes(client))
        result.budget_choices = Counter({outcome: round(n - choices_before[outcome])
                                         for outcome, n in (await _budget_choices(client)).items()})
    if server_pid is not None:
        result.peak_rss_bytes = peak_rss_bytes(server_pid)
    return result


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK_HOSTS and not (host or "").startswith("127."):
        raise SystemExit(f"error: --url must be a loopback address, got {host!r}")


async def main_async(args: argparse.Namespace) -> list[dict]:
    async with httpx.AsyncClient(base_url=args.url, timeout=30) as client:
        ready = await client.get("/ready")
        if ready.status_code != 200:
            raise SystemExit(f"error: the server at {args.url} is not ready yet (GET /ready: {ready.text})")
        info = (await client.get("/info")).json()
    served_at_once = args.capacity or capacity(info)
    mix = request_mix(info)
    results, records = [], []
    for level in args.levels:
        result = await run_level(args.url, level * served_at_once, args.requests, args.max_new_tokens,
                                 args.deadline_s, mix, args.seed, args.server_pid,
                                 Hog(args.hog_s, args.hog_procs, args.hog_delay_s))
        results.append({"level": f"{level}x", **result.summary()})
        records.extend(result.records)
    if args.records:
        args.records.write_text("".join(json.dumps(r) + "\n" for r in records))
    return results


def print_table(rows: list[dict]) -> None:
    header = (f"{'level':>5} {'conc':>4} {'sent':>4} {'ok':>4} {'req/s':>6} {'tok/s':>6} {'reject':>6} "
              f"{'degrade':>7} {'errors':>8} {'RSS MB':>7} {'pred err p50/p90':>16} {'steady':>11} {'budget met':>10} "
              f"{'best plan':>9}  ttft p50/p99 ms")
    print(header)
    for r in rows:
        ttft = ", ".join(f"{p} {v['p50']:.0f}/{v['p99']:.0f}" for p, v in r["ttft_ms"].items())
        error = f"{r['prediction_error_p50']}/{r['prediction_error_p90']}"
        steady = f"{r['steady_prediction_error_p50']}/{r['steady_prediction_error_p90']}"
        print(f"{r['level']:>5} {r['concurrency']:>4} {r['sent']:>4} {r['ok']:>4} {r['goodput_req_s']:>6} "
              f"{r['goodput_tok_s']:>6} {r['rejection_rate']:>6} {r['downgrade_rate']:>7} "
              f"{sum(r['errors'].values()):>8} {r['peak_rss_mb']:>7} {error:>16} {steady:>11} {r['budget_met_rate']!s:>10} "
              f"{r['best_choice_rate']!s:>9}  {ttft}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4],
                        help="concurrency as multiples of the server's running set")
    parser.add_argument("--capacity", type=int, default=0,
                        help="requests served at once (default: max_running from /info)")
    parser.add_argument("--requests", type=int, default=48, help="requests per level")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--deadline-s", type=float, default=180.0, help="wall-clock limit per level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-pid", type=int, default=None,
                        help="the server's process id, for its peak resident memory from /proc")
    parser.add_argument("--hog-s", type=float, default=0.0,
                        help="seconds of competing busy-loop processes in each level (0: none)")
    parser.add_argument("--hog-procs", type=int, default=2, help="busy-loop processes of the hog")
    parser.add_argument("--hog-delay-s", type=float, default=5.0, help="seconds into each level the hog starts")
    parser.add_argument("--records", type=Path, default=None,
                        help="write each request here as JSON lines: answered (precision asked and served, timing) or refused (status, message)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    check_loopback(args.url)
    rows = asyncio.run(main_async(args))
    print(json.dumps({"levels": rows}, indent=2) if args.json else "", end="")
    if not args.json:
        print_table(rows)


if __name__ == "__main__":
    main()
