"""LoRA ranks and learning rate: calibrate one variant, then its perplexity at a few bit-widths.

    python benchmarks/rank_ablation.py --ranks 32,24,16,8 --lora-lr 1e-3 \
        --text ../shared/data/wikitext-2-raw/wiki.test.raw --out ablation-runs

Each variant is calibrated with the given preset (fast by default) into `--out/<ranks>-lr<lr>` (kept,
so a rerun only evaluates) on the same model-written calibration text, and evaluated on the first
`--max-tokens` tokens of the text. `quept eval --method rtn` on the same windows gives the baseline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from quept_core.artifact.store import calibrate_artifact, load_artifact
from quept_core.calibration.loop import CalibrationConfig
from quept_core.config import BitConfig
from quept_core.eval.perplexity import make_windows, perplexity, read_text, tokenize_text
from quept_core.io.models import load_model
from quept_core.quant.elastic import set_bits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", required=True, help="LoRA rank per tier, low -> high, e.g. 32,24,0,0")
    parser.add_argument("--lora-lr", type=float, required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--bits", default="3,4,6,8")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(2)

    ranks = tuple(int(r) for r in args.ranks.split(","))
    config = CalibrationConfig.from_preset(args.preset, bit_config=BitConfig(tier_ranks=ranks), lora_lr=args.lora_lr)
    folder = args.out / f"{'-'.join(map(str, ranks))}-lr{args.lora_lr:g}"
    if not (folder / "manifest.json").is_file():
        calibrate_artifact(load_model(), config, folder)
    loaded = load_model()
    load_artifact(folder, loaded)
    windows = make_windows(tokenize_text(loaded.tokenizer, read_text(args.text)), args.seqlen, args.max_tokens)
    cells = []
    for bits in (int(b) for b in args.bits.split(",")):
        set_bits(loaded.model, bits)
        cells.append(f"w{bits} {perplexity(loaded.model, windows).ppl:.2f}")
    set_bits(loaded.model, None)
    print(f"ranks {ranks}, lora lr {args.lora_lr:g}, {args.preset} preset, first {windows.numel()} tokens: "
          + ", ".join(cells))


if __name__ == "__main__":
    main()
