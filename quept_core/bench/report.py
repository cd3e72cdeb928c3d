"""Tables, plot and the docs/benchmarks.md section for `quept bench` results."""

from __future__ import annotations

from pathlib import Path

from quept_core.bench.runner import BenchResult, BenchRow

SECTION_BEGIN = "<!-- runtime-bench:begin -->"
SECTION_END = "<!-- runtime-bench:end -->"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None:
        return "–"
    if not base:
        return f"{value:,.1f}"
    return f"{value:,.1f} ({value / base:.2f}×)"


def _row_label(row: BenchRow) -> str:
    return f"{row.engine} {row.precision}"


def text_table(result: BenchResult) -> str:
    """A fixed-width table for the terminal."""
    lines = [f"{'engine':<10} {'precision':<11} {'prefill':>9} {'dec b1':>8} {'dec b8':>8} {'MB':>7} {'ppl':>8}"]
    for row in result.rows:
        cells = [row.prefill_tok_s, row.decode_tok_s_b1, row.decode_tok_s_b8]
        shown = ["–" if c is None else f"{c:.1f}" for c in cells]
        mb = "–" if row.weight_bytes is None else f"{row.weight_bytes / 2**20:.1f}"
        ppl = "–" if row.ppl is None else f"{row.ppl:.2f}"
        lines.append(f"{row.engine:<10} {row.precision:<11} {shown[0]:>9} {shown[1]:>8} {shown[2]:>8} {mb:>7} {ppl:>8}")
    lines.append("tokens/s; MB = resident weight bytes")
    if result.switch_ms:
        lines.append(f"switch between resident plans: p50 {result.switch_ms['p50']:.3f} ms, "
                     f"p99 {result.switch_ms['p99']:.3f} ms; loading a separate model: {result.reload_s:.2f} s")
    if result.uniform_resident_bytes:
        lines.append(f"all uniform plans resident: {result.uniform_resident_bytes / 2**20:.1f} MB "
                     f"(one fp32 copy of the model: {result.fp32_model_bytes / 2**20:.1f} MB)")
    lines.extend(f"note: {note}" for note in result.notes)
    return "\n".join(lines)


def markdown(result: BenchResult, command: str, plot_name: str | None) -> str:
    """The docs section: ratios against HF full precision (and llama.cpp) measured in the same run."""
    hf = next((r for r in result.rows if r.engine == "hf"), None)
    cpp = next((r for r in result.rows if r.engine == "llama.cpp"), None)
    s = result.settings
    out = [
        "## Runtime: speed, memory and switching",
        "",
        f"Command: `{command}`",
        "",
        (f"Device {s.get('device')}, {s.get('threads')} threads, compute dtype {s.get('dtype')}; prompt "
        f"{s.get('prompt_tokens')} tokens, {s.get('new_tokens')} new tokens (greedy, no early stop), batch 8 = "
        f"{s.get('batch')} prompts of {s.get('prompt_tokens')} tokens; perplexity on the first {s.get('ppl_tokens')} "
        f"tokens of WikiText-2 test, seqlen {s.get('seqlen')}. QuEPT rows run our runtime with packed weights "
        f"(group sizes from BitConfig, integer zero-points; output head at {s.get('head_bits')} bits in "
        "quantized plans). Ratios in parentheses are against the HF full-precision row of the same run."),
        "",
        "| engine | precision | prefill tok/s | decode tok/s, batch 1 | decode tok/s, batch 8 | weights MB | ppl |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        mb = "–" if row.weight_bytes is None else f"{row.weight_bytes / 2**20:.1f}"
        ppl = "–" if row.ppl is None else f"{row.ppl:.2f}"
        out.append(
            f"| {row.engine} | {row.precision} | {_ratio(row.prefill_tok_s, hf and hf.prefill_tok_s)} | "
            f"{_ratio(row.decode_tok_s_b1, hf and hf.decode_tok_s_b1)} | "
            f"{_ratio(row.decode_tok_s_b8, hf and hf.decode_tok_s_b8)} | {mb} | {ppl} |"
        )
    out.append("")
    if cpp is not None:
        out.append("Against llama.cpp on the same GGUF file, same run:")
        out.append("")
        for row in result.rows:
            if row.engine == "quept" and row.decode_tok_s_b1 and cpp.decode_tok_s_b1 and cpp.prefill_tok_s:
                out.append(f"- {row.precision}: decode {row.decode_tok_s_b1 / cpp.decode_tok_s_b1:.2f}×, "
                           f"prefill {row.prefill_tok_s / cpp.prefill_tok_s:.2f}×")
        out.append("")
    if result.switch_ms:
        out.append(f"Switching between resident plans (`prepare`, {s.get('switches')} switches): median "
                   f"{result.switch_ms['p50']:.3f} ms, p99 {result.switch_ms['p99']:.3f} ms; loading a separate "
                   f"model from the float cache: {result.reload_s:.2f} s.")
        out.append("")
    if result.uniform_resident_bytes:
        out.append(f"All uniform plans resident at once: {result.uniform_resident_bytes / 2**20:.1f} MB of packed "
                   f"weights, against {result.fp32_model_bytes / 2**20:.1f} MB for one fp32 copy of the model "
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.decode_tok_s_b1 is not None]
    labels = [_row_label(r) for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].bar(labels, [r.decode_tok_s_b1 for r in rows], color="tab:blue")
    axes[0].set_title("decode, batch 1 (tokens/s)")
    axes[1].bar(labels, [r.prefill_tok_s or 0 for r in rows], color="tab:orange")
    axes[1].set_title("prefill (tokens/s)")
    for axis in axes:
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
