"""Tables, plot and the docs/benchmarks.md section for `quept bench` results."""

from __future__ import annotations

from pathlib import Path

from quept_core.bench.results import BATCHES, BenchResult, BenchRow, MixedSetRow

SECTION_BEGIN = "<!-- runtime-bench:begin -->"
SECTION_END = "<!-- runtime-bench:end -->"
_SPEEDS = ("prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b8", "decode_tok_s_b32")


def _ratio(value: float | None, base: float | None) -> str:
    if value is None:
        return "–"
    if not base:
        return f"{value:,.1f}"
    return f"{value:,.1f} ({value / base:.2f}×)"


def _mb(size: int | None) -> str:
    return "–" if size is None else f"{size / 2**20:.1f}"


def _row_label(row: BenchRow) -> str:
    return f"{row.engine} {row.precision}"


def _width(precision: str) -> int | None:
    """The bit-width of a uniform plan's name (`w4` -> 4); None for fp and mixed plans."""
    return int(precision[1:]) if precision.startswith("w") and precision[1:].isdigit() else None


def ratios(result: BenchResult) -> list[tuple[str, float]]:
    """Labelled ratios between figures of the same run (a missing figure drops its ratio)."""
    quept = {row.precision: row for row in result.rows if row.engine == "quept"}
    cpp = next((row for row in result.rows if row.engine == "llama.cpp"), None)
    out: list[tuple[str, float]] = []

    def add(label: str, value: float | None, base: float | None) -> None:
        if value and base:
            out.append((label, value / base))

    def b1(name: str) -> float | None:
        return quept[name].decode_tok_s_b1 if name in quept else None

    if cpp is not None:
        add("w4 b1 / llama.cpp b1", b1("w4"), cpp.decode_tok_s_b1)
    # Narrowest first, each against the next wider one; fp is the widest.
    ladder = sorted((n for n in quept if _width(n) is not None), key=_width) + (["fp"] if "fp" in quept else [])
    for narrow, wide in zip(ladder, ladder[1:]):
        add(f"{narrow} b1 / {wide} b1", b1(narrow), b1(wide))
    add("w3 b1 / w8 b1", b1("w3"), b1("w8"))
    if cpp is not None:
        for name, row in quept.items():
            add(f"{name} prefill / llama.cpp prefill", row.prefill_tok_s, cpp.prefill_tok_s)
    for name, row in quept.items():
        add(f"{name} b8 / {name} b1", row.decode_tok_s_b8, row.decode_tok_s_b1)
        add(f"{name} b32 / {name} b1", row.decode_tok_s_b32, row.decode_tok_s_b1)
    if result.mixed_set is not None:
        add("mixed set / per-plan turns", result.mixed_set.one_set_tok_s, result.mixed_set.turns_tok_s)
    return out


def _ppl(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _mixed_label(mixed: MixedSetRow) -> str:
    return f"{mixed.sequences} sequences over {'+'.join(mixed.plans)}"


def text_table(result: BenchResult) -> str:
    """A fixed-width table for the terminal."""
    lines = [f"{'engine':<10} {'precision':<11} {'prefill':>9} {'dec b1':>8} {'dec b8':>8} {'dec b32':>8} "
             f"{'MB':>7} {'RSS MB':>8} {'route':>8} {'ppl':>8} {'dec ppl':>8}"]
    for row in result.rows:
        shown = ["–" if getattr(row, name) is None else f"{getattr(row, name):.1f}" for name in _SPEEDS]
        ppl, decode_ppl = _ppl(row.ppl), _ppl(row.decode_ppl)
        lines.append(f"{row.engine:<10} {row.precision:<11} {shown[0]:>9} {shown[1]:>8} {shown[2]:>8} {shown[3]:>8} "
                     f"{_mb(row.weight_bytes):>7} {_mb(row.rss_bytes):>8} {row.step_route or '–':>8} {ppl:>8} "
                     f"{decode_ppl:>8}")
    lines.append("tokens/s; MB = resident weight bytes; RSS = the process's resident set after the row")
    mixed = result.mixed_set
    if mixed is not None:
        lines.append(f"mixed running set, {_mixed_label(mixed)}: one set {mixed.one_set_tok_s:.1f} tok/s, "
                     f"per-plan turns {mixed.turns_tok_s:.1f} tok/s; weights {_mb(mixed.weight_bytes)} MB, "
                     f"RSS {_mb(mixed.rss_bytes)} MB, route {mixed.step_route}")
    lines += [f"ratio {label}: {value:.2f}×" for label, value in ratios(result)]
    if result.switch_ms:
        lines.append(f"switch between resident plans: p50 {result.switch_ms['p50']:.3f} ms, "
                     f"p99 {result.switch_ms['p99']:.3f} ms; loading a separate model: {result.reload_s:.2f} s")
    if result.uniform_resident_bytes:
        lines.append(f"all uniform plans resident: {_mb(result.uniform_resident_bytes)} MB "
                     f"(one fp32 copy of the model: {_mb(result.fp32_model_bytes)} MB)")
    lines.extend(f"note: {note}" for note in result.notes)
    return "\n".join(lines)


def _speed_table(result: BenchResult) -> list[str]:
    """One line per row; speeds with their ratio to the HF full-precision row in parentheses."""
    hf = next((r for r in result.rows if r.engine == "hf"), None)
    out = [
        "| engine | precision | prefill tok/s | decode tok/s, batch 1 | batch 8 | batch 32 | weights MB | RSS MB "
        "| decode route | ppl | decode-path ppl |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in result.rows:
        cells = [_ratio(getattr(row, name), hf and getattr(hf, name)) for name in _SPEEDS]
        out.append(f"| {row.engine} | {row.precision} | {' | '.join(cells)} | {_mb(row.weight_bytes)} | "
                   f"{_mb(row.rss_bytes)} | {row.step_route or '–'} | {_ppl(row.ppl)} | {_ppl(row.decode_ppl)} |")
    return out


def _mixed_table(mixed: MixedSetRow) -> list[str]:
    return [
        f"Mixed running set: {_mixed_label(mixed)} ({mixed.sequences // len(mixed.plans)} each), decode tokens/s "
        "of the whole set: in one running set, against one per-plan batch after another (each run to "
        "completion; total tokens over total time).",
        "",
        "| running set | decode tok/s | weights MB | RSS MB | decode route |",
        "|---|---:|---:|---:|---|",
        f"| one set of {len(mixed.plans)} plans | {mixed.one_set_tok_s:,.1f} | {_mb(mixed.weight_bytes)} | "
        f"{_mb(mixed.rss_bytes)} | {mixed.step_route} |",
        f"| per-plan batches in turns | {mixed.turns_tok_s:,.1f} | {_mb(mixed.weight_bytes)} | – | – |",
    ]


def markdown(result: BenchResult, command: str, plot_name: str | None) -> str:
    """The docs section: ratios against HF full precision and llama.cpp measured in the same run."""
    s = result.settings
    out = [
        "## Runtime: speed, memory and switching",
        "",
        f"Command: `{command}`",
        "",
        (f"Device {s.get('device')}, {s.get('threads')} threads, compute dtype {s.get('dtype')}; prompt "
        f"{s.get('prompt_tokens')} tokens, {s.get('new_tokens')} new tokens (greedy, no early stop); batch b = b "
        f"prompts decoding in one running set (engine max_running {s.get('max_running')}), decode tokens/s of "
        f"the whole set; perplexity on the first {s.get('ppl_tokens')} tokens of WikiText-2 test, seqlen "
        f"{s.get('seqlen')} (prefill's dense path); decode-path perplexity on its first "
        f"{s.get('decode_ppl_tokens')} tokens read one per decode step (teacher-forced), the kernels that serve. "
        f"QuEPT rows run our runtime with packed weights (group sizes from BitConfig, "
        f"integer zero-points; output head at {s.get('head_bits')} bits in quantized plans). Ratios in "
        "parentheses are against the HF full-precision row of the same run. RSS is the process's resident "
        "set after the row ran (it only grows: packs and KV pages stay resident)."),
        "",
        *_speed_table(result),
        "",
    ]
    if result.mixed_set is not None:
        out += [*_mixed_table(result.mixed_set), ""]
    measured = ratios(result)
    if measured:
        out += ["Ratios, same run:", "", "| ratio | value |", "|---|---:|"]
        out += [f"| {label} | {value:.2f}× |" for label, value in measured]
        out.append("")
    if result.switch_ms:
        out.append(f"Switching between resident plans (`prepare`, {s.get('switches')} switches): median "
                   f"{result.switch_ms['p50']:.3f} ms, p99 {result.switch_ms['p99']:.3f} ms; loading a separate "
                   f"model from the float cache: {result.reload_s:.2f} s.")
        out.append("")
    if result.uniform_resident_bytes:
        out.append(f"All uniform plans resident at once: {_mb(result.uniform_resident_bytes)} MB of packed "
                   f"weights, against {_mb(result.fp32_model_bytes)} MB for one fp32 copy of the model "
                   f"({result.uniform_resident_bytes / result.fp32_model_bytes:.2f}×).")
        out.append("")
    out.extend(f"Note: {note}" for note in result.notes)
    if result.notes:
        out.append("")
    if plot_name:
        out.append(f"![decode and prefill speed per plan]({plot_name})")
        out.append("")
    return "\n".join(out)


def plot(result: BenchResult, path: Path) -> None:
    """Decode tokens/s per row grouped by batch size, prefill per row, and the mixed running set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in result.rows if r.decode_tok_s_b1 is not None]
    labels = [_row_label(r) for r in rows]
    x = np.arange(len(rows))
    mixed = result.mixed_set
    figure, axes = plt.subplots(1, 3 if mixed else 2, figsize=(16 if mixed else 12, 4.5),
                                gridspec_kw={"width_ratios": [3, 2, 1] if mixed else [3, 2]})
    width = 0.8 / len(BATCHES)
    for index, batch in enumerate(BATCHES):
        values = [getattr(r, f"decode_tok_s_b{batch}") or 0 for r in rows]
        axes[0].bar(x + (index - (len(BATCHES) - 1) / 2) * width, values, width, label=f"batch {batch}")
    axes[0].set_xticks(x, labels)
    axes[0].legend()
    axes[0].set_title("decode (tokens/s of the running set)")
    axes[1].bar(labels, [r.prefill_tok_s or 0 for r in rows], color="tab:orange")
    axes[1].set_title("prefill (tokens/s)")
    if mixed:
        axes[2].bar(["one set", "turns"], [mixed.one_set_tok_s or 0, mixed.turns_tok_s or 0], color="tab:green")
        axes[2].set_title(f"{mixed.sequences} sequences, {len(mixed.plans)} plans")
    for axis in axes[:2]:
        axis.tick_params(axis="x", rotation=60)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def update_docs(doc: Path, section: str) -> None:
    """Replace this benchmark's section in `doc` (between its markers), keeping every other section."""
    block = f"{SECTION_BEGIN}\n{section.rstrip()}\n{SECTION_END}\n"
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n\n"
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
