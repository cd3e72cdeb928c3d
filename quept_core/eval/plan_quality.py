"""What an artifact knows about its plans: sensitivity, the mixed-precision front and measured quality.

`ensure_mixed_extras` computes, once per artifact, whichever is missing of:
- `sensitivity`: the per-layer table (`sensitivity.py`, the proxy unless asked for the KL probe);
- `plans`: the best mixed plan every `FRONT_STEP` bits per weight (`mixed.py`);
- `quality`: perplexity, its change against full precision and that change's interval for fp, every
  uniform bit-width and every stored mixed plan, measured on the packed engine that serves (bf16, the
  output head at the bits the plan serves) on held-out windows of the calibration data (never the
  evaluation text).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path

import torch

from quept_core.artifact.store import ArtifactError, CalibratedModel, read_extra, write_extra
from quept_core.calibration.data import calibration_tokens
from quept_core.config import BitConfig
from quept_core.eval.perplexity import engine_token_nll
from quept_core.io.models import LoadedModel
from quept_core.layers import model_linear_names
from quept_core.planning.allocator import Allocator
from quept_core.planning.bits import linear_shapes, storage_bits
from quept_core.planning.plan import Plan
from quept_core.planning.sensitivity import (
    SensitivityTable,
    kl_sensitivity,
    proxy_sensitivity,
    sensitivity_tokens,
)
from quept_core.precision import FP, Precision, uniform_name
from quept_core.quant.sources import QueptWeights
from quept_core.runtime.engine import QueptEngine

log = logging.getLogger(__name__)

FRONT_STEP = 0.5  # bits per weight between stored mixed plans
QUALITY_TOKENS = 1024  # held-out tokens behind each plan's perplexity
QUALITY_CHUNK = 64  # positions per chunk of the interval's spread
Z95 = 1.96
HELD_OUT_SEED_OFFSET = 1_000_003  # held-out windows come from another seed of the same data source
SENSITIVITY_KINDS = ("proxy", "kl")
# The layout of the stored `plans` and `quality` documents; a document of another format is measured again
# (4: quality with the output head on its own grid, runtime/weights.py; 5: plans of one width per block).
EXTRAS_FORMAT = 5


def measure_plan_quality(calibrated: CalibratedModel, plans: list[Plan], tokens: torch.Tensor
                         ) -> dict[str, dict[str, float]]:
    """Quality of `plans` on `tokens` [n, T] as they are served: on the packed engine, at their head bits."""
    return plan_quality(QueptEngine.from_calibrated(calibrated), plans, tokens)


def plan_quality(engine: QueptEngine, plans: list[Plan], tokens: torch.Tensor) -> dict[str, dict[str, float]]:
    """{plan name: {"ppl", "ppl_delta_pct", "ppl_delta_interval_pct", "lm_head_bits"}}, with full
    precision (bf16) as "fp". The interval is the 95 % half-width of ppl_delta_pct from the spread of
    the per-token loss difference over chunks of QUALITY_CHUNK positions (paired with fp's): plans
    whose difference lies inside it are not told apart by these tokens (None: too few tokens to say)."""
    reference = _token_nll(engine, engine.plan(FP), tokens)
    quality = {FP.name: {"ppl": math.exp(reference.mean().item()), "ppl_delta_pct": 0.0,
                         "ppl_delta_interval_pct": 0.0, "lm_head_bits": None}}
    for plan in plans:
        nll = _token_nll(engine, plan, tokens)
        excess = (nll - reference).mean().item()
        quality[plan.name] = {"ppl": math.exp(nll.mean().item()), "ppl_delta_pct": 100.0 * math.expm1(excess),
                              "ppl_delta_interval_pct": _interval_pct(nll - reference, excess),
                              "lm_head_bits": plan.lm_head_bits}
    return quality


def _interval_pct(difference: torch.Tensor, excess: float) -> float | None:
    """95 % half-width of 100 * (exp(mean difference) - 1), from the spread of the difference's means
    over whole chunks; None with fewer than two chunks."""
    chunks = difference[: difference.numel() // QUALITY_CHUNK * QUALITY_CHUNK].view(-1, QUALITY_CHUNK).mean(1)
    if chunks.numel() < 2:
        return None
    return 100.0 * math.exp(excess) * Z95 * chunks.std().item() / math.sqrt(chunks.numel())


def _token_nll(engine: QueptEngine, plan: Plan, tokens: torch.Tensor) -> torch.Tensor:
    """Every predicted position's NLL, windows concatenated; the plan's packs are released afterwards,
    so measuring many plans holds one plan's packs at a time."""
    nll = engine_token_nll(engine, plan, tokens).flatten()
    engine.release(plan)
    return nll


def calibration_data(loaded: LoadedModel, manifest: dict, text_file: Path | None = None) -> torch.Tensor:
    """The artifact's calibration tokens, checked against the manifest's checksum."""
    data, seed = manifest["data"], manifest["calibration"]["seed"]
    if data["source"] == "text-file" and text_file is None:
        raise ArtifactError(f"the artifact was calibrated on the text file '{data['file']}': pass that file "
                            f"(--calib-text) to reproduce its calibration data")
    tokens = calibration_tokens(loaded, text_file, n_samples=data["n_samples"], seqlen=data["seqlen"], seed=seed)
    if hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest() != data["sha256"]:
        raise ArtifactError(f"the calibration data does not match the artifact's (checksum differs); "
                            f"pass the text file it was calibrated on ('{data['file']}')")
    return tokens


def held_out_tokens(loaded: LoadedModel, manifest: dict, calib: torch.Tensor,
                    text_file: Path | None = None) -> torch.Tensor:
    """Windows of the same data source that calibration never saw (another seed, overlaps dropped)."""
    data, seed = manifest["data"], manifest["calibration"]["seed"]
    rows = -(-QUALITY_TOKENS // data["seqlen"])
    candidates = calibration_tokens(loaded, text_file, n_samples=rows, seqlen=data["seqlen"],
                                    seed=seed + HELD_OUT_SEED_OFFSET)
    seen = {tuple(row.tolist()) for row in calib}
    held_out = [row for row in candidates if tuple(row.tolist()) not in seen]
    if not held_out:
        raise ArtifactError("the calibration data has no window left to hold out for measuring quality")
    return torch.stack(held_out)


def front_points(table: SensitivityTable, bit_config: BitConfig) -> dict:
    points = [point.to_dict() for point in Allocator(table, bit_config).front(FRONT_STEP)]
    return {"format": EXTRAS_FORMAT, "points": points}


def stored_plans(document: dict) -> list[Plan]:
    """The mixed plans of a stored `plans` document (decoder linears only)."""
    return [Plan(Precision.mixed(entry["budget_bits"]), entry["layer_bits"]) for entry in document["points"]]


def served_plans(document: dict, engine: QueptEngine) -> list[Plan]:
    """The stored mixed plans as `engine` serves them: the output head at the engine's setting."""
    return [plan.with_head_bits(engine.head_bits) for plan in stored_plans(document)]


def _current(document: dict | list | None) -> dict | None:
    """A stored document in this version's format, or None (to be measured again)."""
    return document if isinstance(document, dict) and document.get("format") == EXTRAS_FORMAT else None


def stored_mixed_extras(artifact_dir: Path, sensitivity: str = "proxy") -> dict | None:
    """The three documents when the artifact holds all of them, current and of this sensitivity kind,
    else None; reads the artifact folder only (no model)."""
    table = read_extra(artifact_dir, "sensitivity")
    plans = _current(read_extra(artifact_dir, "plans"))
    quality = _current(read_extra(artifact_dir, "quality"))
    if table is None or table["kind"] != sensitivity or plans is None or quality is None:
        return None
    return {"sensitivity": table, "plans": plans, "quality": quality}


def ensure_mixed_extras(artifact_dir: Path, calibrated: CalibratedModel, text_file: Path | None = None,
                        sensitivity: str = "proxy") -> dict:
    """Compute and store whichever of `sensitivity`, `plans` and `quality` the artifact lacks.

    `text_file`: the calibration text, for artifacts calibrated on one. `sensitivity`: "proxy"
    (seconds) or "kl" (the faithful probe, minutes); a stored table of the other kind is replaced,
    and the plans and quality that depend on it with it. Returns the three documents.
    """
    if sensitivity not in SENSITIVITY_KINDS:
        raise ValueError(f"sensitivity must be one of {', '.join(SENSITIVITY_KINDS)}, got '{sensitivity}'")
    stored = stored_mixed_extras(artifact_dir, sensitivity)
    if stored is not None:
        return stored
    table = read_extra(artifact_dir, "sensitivity")
    plans = _current(read_extra(artifact_dir, "plans"))
    quality = _current(read_extra(artifact_dir, "quality"))

    start = time.perf_counter()
    loaded, bit_config = calibrated.loaded, calibrated.bit_config
    model = loaded.model
    calib = calibration_data(loaded, calibrated.manifest, text_file)
    source = QueptWeights(calibrated.elastic)
    if table is None or table["kind"] != sensitivity:
        proxy_tokens, probe_tokens = sensitivity_tokens(calib)
        if sensitivity == "proxy":
            computed = proxy_sensitivity(model, source, bit_config, proxy_tokens, probe_tokens)
        else:
            computed = kl_sensitivity(model, source, bit_config, probe_tokens)
        table, plans, quality = computed.to_dict(), None, None
        write_extra(artifact_dir, "sensitivity", table)
        log.info("sensitivity (%s): %.1f s", sensitivity, time.perf_counter() - start)
    if plans is None:
        plans, quality = front_points(SensitivityTable.from_dict(table), bit_config), None
        write_extra(artifact_dir, "plans", plans)
    if quality is None:
        tokens = held_out_tokens(loaded, calibrated.manifest, calib, text_file)
        names = model_linear_names(model)
        shapes = linear_shapes(model, names)
        engine = QueptEngine.from_calibrated(calibrated)
        every = [engine.plan(uniform_name(b)) for b in bit_config.bits] + served_plans(plans, engine)
        measured = plan_quality(engine, every, tokens)
        del engine
        for plan in [Plan(FP), *every]:
            measured[plan.name]["storage_bits"] = storage_bits(plan, shapes, bit_config)
        quality = {"format": EXTRAS_FORMAT, "tokens": int(tokens.numel()), "plans": measured}
        write_extra(artifact_dir, "quality", quality)
    log.info("mixed-precision extras: %.1f s", time.perf_counter() - start)
    return {"sensitivity": table, "plans": plans, "quality": quality}
