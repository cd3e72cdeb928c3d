"""Start-up: how long `quept serve` takes to turn ready, and what it holds once ready.

Starts the server the way the image does (`python -m service serve`) on a free loopback port, polls
`GET /ready` until it answers 200, then reads the process's resident memory (VmRSS) and its
high-water mark (VmHWM) from /proc, and stops it with SIGTERM. Each configuration runs --runs times
after one start that is not counted (it builds what a first start builds: the kernels, the serving
store, the kernel choices).

    python benchmarks/startup.py [--runs 3] [--memory-limit-mb 0,140] [--json]

A memory limit of 0 means none. Extra arguments after `--` go to `quept serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import httpx

READY_TIMEOUT_S = 900.0  # a first start may calibrate


@dataclass
class Start:
    memory_limit_mb: float
    ready_s: float
    rss_mb: float
    peak_mb: float


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_once(memory_limit_mb: float, serve_args: list[str]) -> Start:
    port = _free_port()
    command = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    if memory_limit_mb:
        command += ["--memory-limit-mb", f"{memory_limit_mb:g}"]
    begin = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(timeout=2.0) as client:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with {server.returncode}: {server.stderr.read()[-2000:]}")
                try:
                    if client.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() - begin > READY_TIMEOUT_S:
                    raise SystemExit(f"the server was not ready within {READY_TIMEOUT_S:.0f} s")
                time.sleep(0.05)
        ready_s = time.perf_counter() - begin
        rss, peak = _memory_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return Start(memory_limit_mb, ready_s, rss, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-limit-mb", default="0", help="comma list; 0: no limit")
    parser.add_argument("--json", action="store_true")
    args, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    limits = [float(v) for v in args.memory_limit_mb.split(",")]
    start_once(limits[0], serve_args)  # builds what a first start builds; not counted
    starts = [start_once(limit, serve_args) for limit in limits for _ in range(args.runs)]
    if args.json:
        print(json.dumps([asdict(s) for s in starts], indent=2))
        return
    print(f"cpu threads {os.cpu_count()}; {args.runs} starts per row; median (min-max)")
    print("| memory limit (MiB) | ready (s) | RSS at ready (MiB) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|")
    for limit in limits:
        rows = [s for s in starts if s.memory_limit_mb == limit]

        def cell(values: list[float], digits: int) -> str:
            return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

        print(f"| {limit:g} |" if limit else "| none |", cell([s.ready_s for s in rows], 1), "|",
              cell([s.rss_mb for s in rows], 0), "|", cell([s.peak_mb for s in rows], 0), "|")


if __name__ == "__main__":
    main()
