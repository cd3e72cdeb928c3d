"""Markdown table and perplexity-vs-bits plot from `quept eval --json` output.

    quept eval --text ../shared/data/wikitext-2-raw/wiki.test.raw --precision all,mixed:4.0 \
        --method rtn,gptq,quept --seqlen 512 --json > results.json
    python benchmarks/ppl_table.py results.json --plot docs/ppl_vs_bits.png

Several JSON files (for example one per method) are merged; they must share model, seqlen and tokens.
llama.cpp rows (`llamacpp-*`, one per llama.cpp type) get a table of their own: their types do not
line up with the uniform widths.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt

METHOD_ORDER = ("rtn", "gptq", "llmc-gptq", "llmc-gptq-act", "llmc-awq", "quept")
STYLE = {"rtn": ("tab:gray", "s"), "gptq": ("tab:blue", "^"), "llmc-gptq": ("tab:cyan", "v"),
         "llmc-gptq-act": ("tab:purple", "v"), "llmc-awq": ("tab:green", "D"), "quept": ("tab:red", "o")}
LLAMACPP = "llamacpp-"


def is_llamacpp(row: dict) -> bool:
    return row["method"].startswith(LLAMACPP)


def load(paths: list[Path]) -> tuple[dict, list[dict]]:
    header, rows = None, []
    for path in paths:
        data = json.loads(path.read_text())
        key = {k: data[k] for k in ("model", "seqlen", "tokens")}
        if header is not None and key != header:
            raise SystemExit(f"{path}: {key} differs from {header}; merge only runs on the same windows")
        header = key
        rows += [r for r in data["results"] if (r["precision"], r["method"]) not in
                 {(s["precision"], s["method"]) for s in rows}]
    return header, rows


def _precision_key(precision: str) -> tuple[int, float]:
    if precision == "fp":
        return (0, 0.0)
    if precision.startswith("w"):
        return (1, float(precision[1:]))
    return (2, float(precision.split(":")[1]))


def markdown(header: dict, rows: list[dict]) -> str:
    """One row per precision, one perplexity column per method; mixed cells add their bits per weight.

    Then the llama.cpp rows, one per type, with their measured bits per weight and note.
    """
    llamacpp = sorted((r for r in rows if is_llamacpp(r)), key=lambda r: r["storage_bits"])
    rows = [r for r in rows if not is_llamacpp(r)]
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    lines = [f"| precision | bits/weight | {' | '.join(methods)} |", f"|---|---|{'---|' * len(methods)}"]
    fp = next((r for r in rows if r["method"] == "fp"), None)
    if fp is not None:
        fp_cell = f"{fp['ppl']:.2f}"
        lines.append(f"| fp | {fp['storage_bits']:.0f} | {' | '.join(fp_cell for _ in methods)} |")
    for precision in sorted({r["precision"] for r in rows if r["method"] != "fp"}, key=_precision_key):
        found = {r["method"]: r for r in rows if r["precision"] == precision}
        mixed = precision.startswith("mixed:")
        bits = f"≤ {precision.split(':')[1]}" if mixed else f"{next(iter(found.values()))['storage_bits']:.3f}"
        cells = ["–" if m not in found else f"{found[m]['ppl']:.2f}" +
                 (f" ({found[m]['storage_bits']:.2f})" if mixed else "") for m in methods]
        lines.append(f"| {precision} | {bits} | {' | '.join(cells)} |")
    if llamacpp:
        lines += ["", "| llama.cpp | bits/weight | ppl | note |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['storage_bits']:.3f} | {r['ppl']:.2f} | {r.get('note', '')} |"
                  for r in llamacpp]
    return "\n".join(lines)


def plot(header: dict, rows: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in METHOD_ORDER:
        points = sorted((r["storage_bits"], r["ppl"], r["precision"]) for r in rows if r["method"] == method)
        if not points:
            continue
        color, marker = STYLE[method]
        uniform = [p for p in points if not p[2].startswith("mixed:")]
        mixed = [p for p in points if p[2].startswith("mixed:")]
        axis.plot([p[0] for p in uniform], [p[1] for p in uniform], color=color, marker=marker,
                  label=f"{method} uniform")
        if mixed:
            axis.plot([p[0] for p in mixed], [p[1] for p in mixed], color=color, marker=marker, linestyle="--",
                      markerfacecolor="white", label=f"{method} mixed")
    kquants = sorted((r["storage_bits"], r["ppl"]) for r in rows if is_llamacpp(r) and r["precision"] != "fp")
    if kquants:
        axis.plot([p[0] for p in kquants], [p[1] for p in kquants], color="tab:orange", marker="P",
                  linestyle=":", label="llama.cpp types")
    fp = next((r for r in rows if r["method"] == "fp"), None)
    if fp is not None:
        axis.axhline(fp["ppl"], color="black", linestyle="--", linewidth=1, label=f"fp ({fp['ppl']:.2f})")
    axis.set_yscale("log")
    axis.set_xlabel("bits per weight (scales and zero-points included)")
    axis.set_ylabel("perplexity (log scale)")
    axis.set_title(f"{header['model']}: WikiText-2 test, seqlen {header['seqlen']}, {header['tokens']} tokens\n"
                   "uniform w3..w8 (filled), mixed plans (open, dashed)", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="`quept eval --json` output files")
    parser.add_argument("--plot", type=Path, help="write the perplexity-vs-bits PNG here")
    args = parser.parse_args()
    header, rows = load(args.results)
    print(markdown(header, rows))
    if args.plot is not None:
        plot(header, rows, args.plot)


if __name__ == "__main__":
    main()
