"""How well the cheap sensitivity proxy ranks layers compared with the faithful KL probe.

    python benchmarks/sensitivity_check.py [--artifact DIR] [--out check.json]

Computes both tables for the calibrated artifact's weights (the default artifact when none is
given) on the artifact's calibration data, and prints Spearman rank correlations: over every
(layer, bit) pair, within each bit-width, and of the plans' total sensitivity along the front.
The KL table takes about 1,300 probes: minutes, not seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from quept_core.artifact.store import ensure_artifact, load_artifact
from quept_core.eval.plan_quality import calibration_data
from quept_core.io.models import load_model
from quept_core.planning.allocator import Allocator
from quept_core.planning.sensitivity import (
    kl_sensitivity,
    proxy_sensitivity,
    rank_correlation,
    sensitivity_tokens,
)
from quept_core.quant.sources import QueptWeights

log = logging.getLogger("sensitivity_check")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--text-file", type=Path, default=None, help="calibration text of a text-file artifact")
    parser.add_argument("--out", type=Path, default=None, help="write both tables and the correlations here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    loaded = load_model(args.model)
    loaded.model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    artifact_dir = args.artifact or ensure_artifact(loaded)
    calibrated = load_artifact(artifact_dir, loaded)
    calib = calibration_data(loaded, calibrated.manifest, args.text_file)
    proxy_tokens, probe_tokens = sensitivity_tokens(calib)
    source = QueptWeights(calibrated.elastic)
    bit_config = calibrated.bit_config

    start = time.perf_counter()
    proxy = proxy_sensitivity(loaded.model, source, bit_config, proxy_tokens, probe_tokens)
    proxy_seconds = time.perf_counter() - start
    start = time.perf_counter()
    kl = kl_sensitivity(loaded.model, source, bit_config, probe_tokens,
                        progress=lambda done, total: log.info("kl probe: %d/%d layers", done, total))
    kl_seconds = time.perf_counter() - start

    report = {
        "proxy_seconds": proxy_seconds,
        "kl_seconds": kl_seconds,
        "spearman_all": rank_correlation(proxy.values, kl.values),
        "spearman_per_bit": {str(b): rank_correlation(proxy.values[:, j], kl.values[:, j])
                             for j, b in enumerate(bit_config.bits)},
    }
    # Do the two tables lead to similar plans? Score each front plan under the faithful table.
    rows = np.arange(len(proxy.layers))
    front_kl = []
    for point in Allocator(proxy, bit_config).front(0.5):
        picks = [bit_config.bits.index(point.plan.layer_bits[name]) for name in proxy.layers]
        front_kl.append(float(kl.values[rows, picks].sum()))
    report["front_kl_of_proxy_plans"] = front_kl
    report["front_kl_of_kl_plans"] = [p.sensitivity for p in Allocator(kl, bit_config).front(0.5)]
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps({**report, "proxy": proxy.to_dict(), "kl": kl.to_dict()}))


if __name__ == "__main__":
    main()
