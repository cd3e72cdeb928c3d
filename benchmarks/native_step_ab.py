"""The native decode step of this checkout against another revision's, alternating in one process.

On a shared host the speed of the machine drifts by 10-25 % within minutes, more than most kernel
changes are worth, so two builds timed one after the other in separate processes cannot be compared.
Here the other revision's kernel sources (`git show REV:...`) are compiled under another operator
namespace and loaded next to this checkout's; both programs run the same layout over the same KV pool,
rows and positions, one step each in turn (the order flipping every call), and each cell reports the
median step of both and their ratio. The engine is the one `quept serve` loads (its settings and
flags after `--`); the baseline's `DecodeProgram` must take the same calls as this checkout's, except
for the dtypes of the packs' scales and zero-points, which `--baseline-grid-dtypes` converts (e.g.
`float32,int16` for revisions before the packs held float16 scales and uint8 zero-points).

    python benchmarks/native_step_ab.py --baseline HEAD [--cells w4:8:256,w4:1:1024] [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from quept_core.runtime import native_step
from quept_core.runtime.kernels.formats import BitPlanes, LutPlanes
from quept_core.runtime.kernels.native import CFLAGS, CSRC, load_kernels
from quept_core.runtime.protocol import SamplingParams, SequenceRequest
from service.engine.loading import load_backend
from service.settings import load_settings

NAMESPACE = "quept_baseline"


def build_baseline(revision: str, folder: Path) -> type:
    """The DecodeProgram class of `revision`'s kernel sources, compiled into `folder`."""
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                               check=True, cwd=CSRC).stdout.strip())
    prefix = CSRC.relative_to(root).as_posix()
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{revision}:{prefix}"], capture_output=True,
                           text=True, check=True, cwd=root).stdout.split()
    source = folder / "csrc"
    source.mkdir(parents=True)
    for name in names:
        content = subprocess.run(["git", "show", f"{revision}:{prefix}/{name}"], capture_output=True, check=True,
                                 cwd=root).stdout
        (source / name).write_bytes(content)
    load_kernels(folder, NAMESPACE, source, (*CFLAGS, f"-DQUEPT_OPS={NAMESPACE}"))
    return getattr(torch.classes, NAMESPACE).DecodeProgram


@contextmanager
def grid_dtypes(layout, dtypes: tuple[torch.dtype, torch.dtype] | None):
    """The layout's bit-plane packs with their scales and zero-points in `dtypes` while the block runs."""
    packs = {id(p): p for p in layout.packs() if isinstance(p, (BitPlanes, LutPlanes))}
    kept = {key: (p.scale, p.zero) for key, p in packs.items()}
    if dtypes is not None:
        for p in packs.values():
            p.scale, p.zero = p.scale.to(dtypes[0]), p.zero.to(dtypes[1])
    try:
        yield
    finally:
        for key, (scale, zero) in kept.items():
            packs[key].scale, packs[key].zero = scale, zero


def step_ms(backend, baseline_class: type, precision: str, rows: int, context: int, calls: int,
            baseline_dtypes: tuple[torch.dtype, torch.dtype] | None) -> tuple[float, float]:
    """Median milliseconds of one step of `rows` rows at position `context`: (baseline, this checkout)."""
    engine, plan = backend.engine, backend.resolve(precision)
    for _ in range(rows):
        engine.add(SequenceRequest(list(range(1000, 1000 + context)), plan, SamplingParams(max_new_tokens=2)))
    engine.step()  # prefill: every row's slot holds `context` positions
    layout = engine._plan_layout(plan)  # the engine's own program is left alone: both builds get fresh ones
    current = native_step.NativeStep(engine.model, layout, engine.max_running)
    own_class = native_step.decode_program_class
    native_step.decode_program_class = lambda: baseline_class
    try:
        with grid_dtypes(layout, baseline_dtypes):
            baseline = native_step.NativeStep(engine.model, layout, engine.max_running)
    finally:
        native_step.decode_program_class = own_class
    tokens, positions = [1000 + row for row in range(rows)], [context] * rows
    slots = [sequence.slot for sequence in engine._running]
    times: dict[str, list[float]] = {"baseline": [], "current": []}
    for call in range(calls):
        order = (("baseline", baseline), ("current", current))
        for name, step in order if call % 2 else order[::-1]:
            start = time.perf_counter()
            step(tokens, positions, slots, engine.pool)
            times[name].append(time.perf_counter() - start)
    while engine.running:
        engine.step()
    return statistics.median(times["baseline"]) * 1e3, statistics.median(times["current"]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision whose kernel sources are the baseline")
    parser.add_argument("--cells", type=lambda s: [c.split(":") for c in s.split(",")],
                        default=[["w4", "1", "64"], ["w4", "8", "64"], ["w4", "8", "256"], ["w4", "1", "1024"],
                                 ["w4", "8", "1024"]],
                        help="precision:rows:context, comma separated")
    parser.add_argument("--calls", type=int, default=200, help="steps of each build per cell")
    parser.add_argument("--baseline-grid-dtypes", type=lambda s: tuple(getattr(torch, d) for d in s.split(",")),
                        help="SCALE,ZERO: the dtypes the baseline's kernels read the packs' grids in (e.g. float32,int16)")
    args, serve_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as folder:
        baseline_class = build_baseline(args.baseline, Path(folder))
        backend = load_backend(load_settings([a for a in serve_args if a != "--"]))
        print(f"native decode step, median of {args.calls} steps each, alternating, {torch.get_num_threads()} threads; "
              f"baseline {args.baseline}")
        print("| precision | rows | context | baseline ms | this checkout ms | this / baseline |")
        print("|---|---:|---:|---:|---:|---:|")
        for precision, rows, context in args.cells:
            old, new = step_ms(backend, baseline_class, precision, int(rows), int(context), args.calls,
                               args.baseline_grid_dtypes)
            print(f"| {precision} | {rows} | {context} | {old:.2f} | {new:.2f} | {new / old:.3f} |")


if __name__ == "__main__":
    main()
