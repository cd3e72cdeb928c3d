"""Calibrate one variant of a preset into its own artifact folder, for ablations scored with `quept eval`.

    python benchmarks/calibrate_variant.py --preset fast --set '{"equalize": false}' --out runs/no-equalize
    quept eval --text ../shared/data/wikitext-2-raw/wiki.test.raw --precision all --method quept \\
        --max-tokens 32768 --artifact runs/no-equalize

`--set` is a JSON object of `CalibrationConfig` fields (lists stand for tuples), applied over the preset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quept_core.artifact.store import calibrate_artifact
from quept_core.calibration.loop import CalibrationConfig
from quept_core.io.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--set", dest="overrides", default="{}", help="JSON object of CalibrationConfig fields")
    parser.add_argument("--calib-text", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    try:
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.overrides).items()}
        config = CalibrationConfig.from_preset(args.preset, **overrides)
    except (ValueError, TypeError, AttributeError) as error:
        parser.error(f"--set: {error}")
    result = calibrate_artifact(load_model(), config, args.out, text_file=args.calib_text)
    print(f"{args.out}: calibrated in {result.seconds:.1f} s ({args.preset} preset, {overrides or 'no overrides'})")


if __name__ == "__main__":
    main()
