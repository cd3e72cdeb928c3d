"""The comparison behind `quept eval`: perplexity per (method, precision), with bits per weight.

Methods: `quept` (the calibrated elastic model), `rtn` (round-to-nearest, no clipping) and `gptq`
(calibrated per bit-width on the same calibration tokens as QuEPT). Every method uses the same
asymmetric integer zero-point grid and the group size BitConfig gives each bit-width. `mixed:<b>`
rows run the allocator on the method's own sensitivity table. `quept` rows are scored on the
serving engine by default (bf16 packs, the output head at the bits the plan serves, next to an fp row
of the engine's own), so they describe what is served; `--quept-path reference` scores them like every
other method, on the float model with fake-quantized weights and a full-precision head.

Maintained baselines (the optional `baselines` extra; skipped with a message without it):
`llmc-gptq`, `llmc-gptq-act` and `llmc-awq` (llm-compressor, `baselines/llmc.py`) at the uniform
widths asked for, same groups and calibration tokens; `llamacpp-<type>` (`baselines/kquants.py`),
one row per llama.cpp type whatever --precision says, plus `llamacpp-f32`, the float model in
llama.cpp, whose perplexity checks llama.cpp's scoring against the fp row.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from quept_core.artifact.store import CalibratedModel, ensure_artifact, load_artifact, read_manifest
from quept_core.calibration.data import calibration_tokens
from quept_core.calibration.loop import CalibrationConfig
from quept_core.config import BitConfig
from quept_core.eval.baselines import kquants, llmc
from quept_core.eval.baselines.gptq import gptq_model
from quept_core.eval.perplexity import (
    engine_token_nll,
    make_windows,
    perplexity,
    perplexity_of,
    read_text,
    tokenize_text,
)
from quept_core.eval.plan_quality import calibration_data, ensure_mixed_extras
from quept_core.io import llamacpp
from quept_core.io.models import LoadedModel, load_model, resolve_model
from quept_core.layers import model_linear_names
from quept_core.planning.allocator import Allocator
from quept_core.planning.bits import FP_BITS, linear_shapes, storage_bits
from quept_core.planning.plan import Plan, uniform_plan
from quept_core.planning.sensitivity import (
    SensitivityTable,
    proxy_sensitivity,
    sensitivity_tokens,
)
from quept_core.precision import (
    AUTO,
    FP,
    Precision,
    PrecisionError,
    allowed_precisions,
    uniform_name,
    uniform_precisions,
)
from quept_core.quant.sources import (
    QueptWeights,
    RtnWeights,
    TableWeights,
    WeightSource,
    dequantized_weights,
    float_weights,
    use_weights,
)
from quept_core.runtime.engine import QueptEngine

log = logging.getLogger(__name__)

METHODS = ("quept", "rtn", "gptq", *llmc.LLMC_METHODS, *kquants.KQUANT_TYPES)
# How `quept` rows are scored: on the serving engine (packed weights in its dtype, the output head at the
# bits the plan serves: what is served), or on the float model with fake-quantized float32 weights and a
# full-precision head (the reference every other method's rows use).
ENGINE, REFERENCE = "engine", "reference"
PATHS = (ENGINE, REFERENCE)
# The preset of the default artifact (`ensure_artifact`): without an artifact, the baselines use its data.
DEFAULT_PRESET = "fast"
ALL = "all"


class ComparisonError(ValueError):
    """A bad --precision or --method value; the message names the field and what is allowed."""


@dataclass(frozen=True)
class EvalRow:
    precision: str
    method: str
    ppl: float
    storage_bits: float  # per weight, scales and zero-points included
    note: str = ""  # what a reader must know about the row (e.g. a llama.cpp file's tensor types)


def parse_precisions(text: str, bit_set: tuple[int, ...]) -> list[Precision]:
    """`fp`, `all` (fp and every bit-width), `w<b>` and `mixed:<budget>`, comma-separated, in order."""
    allowed = ", ".join([ALL, *(a for a in allowed_precisions(bit_set) if a != AUTO.name)])
    precisions: list[Precision] = []
    for entry in (part.strip().lower() for part in text.split(",")):
        if entry == ALL:
            expanded = uniform_precisions(bit_set)
        else:
            try:
                expanded = [Precision.parse(entry, bit_set)]
            except PrecisionError:
                expanded = [AUTO]
            if expanded == [AUTO]:
                raise ComparisonError(f"--precision: unknown entry '{entry}'; allowed: {allowed}")
        precisions.extend(p for p in expanded if p not in precisions)
    return precisions


def parse_methods(text: str) -> list[str]:
    methods: list[str] = []
    for entry in (part.strip().lower() for part in text.split(",")):
        if entry not in METHODS:
            raise ComparisonError(f"--method: unknown method '{entry}'; allowed: {', '.join(METHODS)}")
        if entry not in methods:
            methods.append(entry)
    return methods


@dataclass
class MethodSetup:
    """One method's model and weights: the model its weights are swapped into, and how to get them."""

    model: nn.Module
    source: WeightSource
    sensitivity: Callable[[], SensitivityTable]  # computed only if a mixed row asks for it
    engine: QueptEngine | None = None  # rows scored on the serving engine instead of `model` (PATHS)


class CalibrationInputs:
    """The calibration tokens behind GPTQ and the sensitivity tables, produced on first use."""

    def __init__(self, produce: Callable[[], torch.Tensor]):
        self._produce = produce

    @cached_property
    def tokens(self) -> torch.Tensor:
        return self._produce()

    @property
    def proxy(self) -> torch.Tensor:
        return sensitivity_tokens(self.tokens)[0]

    @property
    def probe(self) -> torch.Tensor:
        return sensitivity_tokens(self.tokens)[1]


def _proxy_table(model: nn.Module, source: WeightSource, bit_config: BitConfig,
                 calib: CalibrationInputs) -> Callable[[], SensitivityTable]:
    return lambda: proxy_sensitivity(model, source, bit_config, calib.proxy, calib.probe)


def quept_setup(calibrated: CalibratedModel, calib_text: Path | None, path: str = ENGINE) -> MethodSetup:
    """The calibrated artifact's weights; its sensitivity table comes from (or is stored in) the artifact.
    `path`: ENGINE scores on the serving engine, REFERENCE on the float model with fake-quantized weights."""
    def table() -> SensitivityTable:
        extras = ensure_mixed_extras(calibrated.artifact_dir, calibrated, calib_text)
        return SensitivityTable.from_dict(extras["sensitivity"])

    engine = QueptEngine.from_calibrated(calibrated) if path == ENGINE else None
    return MethodSetup(calibrated.loaded.model, QueptWeights(calibrated.elastic), table, engine)


def rtn_setup(model: nn.Module, bit_config: BitConfig, calib: CalibrationInputs) -> MethodSetup:
    source = RtnWeights(float_weights(model, model_linear_names(model)), bit_config)
    return MethodSetup(model, source, _proxy_table(model, source, bit_config, calib))


def gptq_setup(model: nn.Module, bit_config: BitConfig, calib: CalibrationInputs, bits: list[int]) -> MethodSetup:
    """GPTQ at each of `bits`, each bit-width calibrated separately on the calibration tokens."""
    table = {}
    for b in bits:
        start = time.perf_counter()
        for name, weight in gptq_model(model, calib.tokens, b, bit_config).items():
            table[(name, b)] = weight
        log.info("gptq w%d: %.1f s", b, time.perf_counter() - start)
    source = TableWeights(table)
    return MethodSetup(model, source, _proxy_table(model, source, bit_config, calib))


def bits_needed(precisions: list[Precision], bit_config: BitConfig) -> list[int]:
    """The bit-widths a method must provide: every one if a mixed row is asked for."""
    if any(p.kind == "mixed" for p in precisions):
        return list(bit_config.bits)
    return [p.width for p in precisions if p.kind == "uniform"]


def evaluate_method(
    method: str, setup: MethodSetup, precisions: list[Precision], windows: torch.Tensor, bit_config: BitConfig,
    batch_size: int = 4,
) -> list[EvalRow]:
    """One row per non-fp precision for one method."""
    names = model_linear_names(setup.model)
    shapes = linear_shapes(setup.model, names)
    allocator: Allocator | None = None
    rows = []
    for precision in precisions:
        if precision.kind == "fp":
            continue
        if precision.kind == "mixed":
            if allocator is None:
                allocator = Allocator(setup.sensitivity(), bit_config)
            plan = allocator.plan(precision.budget_bits)
        else:
            plan = uniform_plan(names, precision.width)
        rows.append(_evaluate_plan(method, setup, plan, windows, shapes, bit_config, batch_size))
    return rows


def _no_sensitivity() -> SensitivityTable:
    raise ComparisonError("--precision: mixed rows need a method with one model for every bit-width")


def llmc_rows(method: str, base: LoadedModel, calib: CalibrationInputs, precisions: list[Precision],
              windows: torch.Tensor, bit_config: BitConfig, batch_size: int) -> tuple[list[EvalRow], list[str]]:
    """One row per uniform width, each width quantized by llm-compressor on its own copy of the model;
    and why the other precisions were skipped."""
    rows, skipped = [], []
    for precision in precisions:
        reason = _llmc_unsupported(precision, base.model, bit_config)
        if reason is not None:
            skipped.append(f"{method} {precision.name} skipped: {reason}")
            log.warning("%s", skipped[-1])
            continue
        bits = precision.width
        start = time.perf_counter()
        model, table = llmc.llmc_quantize(base.model, base.tokenizer, calib.tokens, method, bits,
                                          bit_config.group_size_for(bits))
        log.info("%s w%d: quantized in %.1f s", method, bits, time.perf_counter() - start)
        source = TableWeights({(name, bits): weight for name, weight in table.items()})
        setup = MethodSetup(model, source, _no_sensitivity)
        rows += evaluate_method(method, setup, [precision], windows, bit_config, batch_size)
        del model, source, setup
        gc.collect()
    return rows, skipped


def _llmc_unsupported(precision: Precision, model: nn.Module, bit_config: BitConfig) -> str | None:
    """Why llm-compressor cannot give a row at `precision`, else None."""
    if precision.kind != "uniform":
        return "llm-compressor rows are uniform bit-widths only"
    group = bit_config.group_size_for(precision.width)
    undivided = llmc.undivided_widths(model, group)
    if undivided:
        return (f"llm-compressor needs groups that divide every row, and groups of {group} do not divide rows of "
                f"{', '.join(map(str, undivided))} columns")
    return None


def kquant_rows(methods: list[str], files: kquants.KQuantFiles, windows: torch.Tensor) -> list[EvalRow]:
    """The float GGUF first (the scoring check), then one row per llama.cpp type."""
    rows = []
    for method in [kquants.FLOAT_METHOD, *methods]:
        start = time.perf_counter()
        path = files.path(method)
        ppl = perplexity_of(kquants.llamacpp_window_nll(path, windows), windows).ppl
        bits = kquants.block_linear_bits(path)
        note = "block linears: " + ", ".join(f"{count} {kind}" for kind, count in bits.types.items())
        if method in kquants.REPRODUCES_SOURCE:
            note += f"; {kquants.SOURCE_NOTE}"
        precision = FP.name if method == kquants.FLOAT_METHOD else kquants.precision_label(method)
        log.info("%s: ppl %.3f at %.3f bits/weight (%.1f s)", method, ppl, bits.bits_per_weight,
                 time.perf_counter() - start)
        rows.append(EvalRow(precision, method, ppl, bits.bits_per_weight, note))
    return rows


def unavailable(method: str, model: str) -> str | None:
    """Why a method cannot run here (a missing optional package, a model without a GGUF file), else None."""
    if method in llmc.LLMC_METHODS and not llmc.available():
        return f"{method} skipped: llm-compressor is not installed ({llmc.EXTRA_HINT})"
    if method in kquants.KQUANT_TYPES:
        if not llamacpp.available():
            return f"{method} skipped: llama-cpp-python is not installed ({llmc.EXTRA_HINT})"
        if resolve_model(model).kind != "gguf":
            return f"{method} skipped: llama.cpp rows need a GGUF model (the default model or a .gguf file)"
    return None


def fp_row(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> EvalRow:
    start = time.perf_counter()
    ppl = perplexity(model, windows, batch_size).ppl
    log.info("fp: ppl %.3f (%.1f s)", ppl, time.perf_counter() - start)
    return EvalRow(FP.name, FP.name, ppl, FP_BITS)


def _evaluate_plan(method: str, setup: MethodSetup, plan: Plan, windows: torch.Tensor,
                   shapes: dict[str, tuple[int, int]], bit_config: BitConfig, batch_size: int) -> EvalRow:
    start = time.perf_counter()
    note = ""
    if setup.engine is not None:
        served = plan.with_head_bits(setup.engine.head_bits) if plan.mode != "fp" else plan
        ppl = engine_perplexity(setup.engine, served, windows)
        note = serving_note(setup.engine, served)
    else:
        with use_weights(setup.model, dequantized_weights(setup.source, plan.layer_bits)):
            ppl = perplexity(setup.model, windows, batch_size).ppl
    bits = storage_bits(plan, shapes, bit_config)
    log.info("%s %s: ppl %.3f at %.3f bits/weight (%.1f s)", method, plan.name, ppl, bits,
             time.perf_counter() - start)
    return EvalRow(plan.name, method, ppl, bits, note)


def engine_perplexity(engine: QueptEngine, plan: Plan, windows: torch.Tensor) -> float:
    ppl = perplexity_of(engine_token_nll(engine, plan, windows).sum(1), windows).ppl
    engine.release(plan)  # one plan's packs at a time
    return ppl


def serving_note(engine: QueptEngine, plan: Plan) -> str:
    head = "fp" if plan.lm_head_bits is None else f"{plan.lm_head_bits}-bit"
    return f"serving engine: {str(engine.dtype).removeprefix('torch.')} packs, {head} output head"


def engine_fp_row(engine: QueptEngine, windows: torch.Tensor) -> EvalRow:
    """Full precision as the engine serves it (its dtype, full-precision head): the engine rows' reference."""
    plan = engine.plan(FP)
    return EvalRow(FP.name, "quept", engine_perplexity(engine, plan, windows), FP_BITS, serving_note(engine, plan))


def grid_description(bit_config: BitConfig) -> str:
    """The quantization grid in words, stated next to every table."""
    groups = ", ".join(f"{uniform_name(b)} " + ("per-channel" if bit_config.group_size_for(b) == -1
                                   else f"g{bit_config.group_size_for(b)}") for b in bit_config.bits)
    return (f"asymmetric uniform, integer zero-point; groups: {groups}; bits/weight include a 16-bit scale "
            f"and an 8-bit zero-point per group; embeddings and output head in full precision (fp counted as 16)")


@dataclass(frozen=True)
class ComparisonResult:
    model: str
    seqlen: int
    tokens: int  # tokens in the evaluated windows
    rows: list[EvalRow]
    bit_config: BitConfig
    skipped: tuple[str, ...] = ()  # one message per requested method (or method and precision) that could not run

    def to_json(self) -> dict:
        return {"model": self.model, "seqlen": self.seqlen, "tokens": self.tokens,
                "results": [asdict(row) for row in self.rows], "skipped": list(self.skipped)}

    def table(self) -> str:
        lines = [
            f"{self.model}: perplexity at seqlen {self.seqlen} over {self.tokens} tokens",
            f"grid: {grid_description(self.bit_config)}",
            "",
            f"{'precision':<12} {'method':<15} {'bits/weight':>11} {'ppl':>10}  note",
        ]
        lines += [f"{r.precision:<12} {r.method:<15} {r.storage_bits:>11.3f} {r.ppl:>10.3f}  {r.note}"
                  .rstrip() for r in self.rows]
        lines += list(self.skipped)
        return "\n".join(lines)


@dataclass(frozen=True)
class EvalRequest:
    text: Path
    model: str
    precision: str = FP.name
    method: str = "quept"
    seqlen: int = 512
    max_tokens: int | None = None
    artifact: Path | None = None
    batch_size: int = 4
    calib_text: Path | None = None  # the calibration text, when the artifact was calibrated on one
    quept_path: str = ENGINE  # one of PATHS


def run_comparison(request: EvalRequest) -> ComparisonResult:
    """Load the model, cut the text into windows and measure every requested row."""
    methods = parse_methods(request.method)
    if request.quept_path not in PATHS:
        raise ComparisonError(f"--quept-path must be one of {', '.join(PATHS)}, got '{request.quept_path}'")
    reasons = {method: unavailable(method, request.model) for method in methods}
    skipped = [reason for reason in reasons.values() if reason is not None]
    for reason in skipped:
        log.warning("%s", reason)
    methods = [method for method in methods if reasons[method] is None]
    manifest = read_manifest(request.artifact) if request.artifact is not None else None
    bit_config = BitConfig.from_dict(manifest["bit_config"]) if manifest is not None else BitConfig()
    precisions = parse_precisions(request.precision, bit_config.bits)
    if request.batch_size < 1:
        raise ComparisonError(f"--batch-size must be at least 1, got {request.batch_size}")
    if request.calib_text is not None and not Path(request.calib_text).is_file():
        raise ComparisonError(f"--calib-text: file not found: {request.calib_text}")
    text = read_text(request.text)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_model(request.model)
    base.model.to(device)
    windows = make_windows(tokenize_text(base.tokenizer, text), request.seqlen, request.max_tokens)
    rows = [fp_row(base.model, windows, request.batch_size)] if FP in precisions else []
    quantized = [p for p in precisions if p != FP]
    llamacpp_methods = [m for m in methods if m in kquants.KQUANT_TYPES]
    methods = [m for m in methods if m not in kquants.KQUANT_TYPES]
    if llamacpp_methods:
        files = kquants.KQuantFiles(resolve_model(request.model).path, base.folder / "llamacpp")
        rows += kquant_rows(llamacpp_methods, files, windows)
    if not quantized or not methods:
        return ComparisonResult(base.name, request.seqlen, windows.numel(), rows, bit_config, tuple(skipped))

    calibrated = None
    if "quept" in methods:
        loaded = load_model(request.model)
        loaded.model.to(device)
        calibrated = load_artifact(request.artifact or ensure_artifact(loaded, DEFAULT_PRESET), loaded)
        manifest, bit_config = calibrated.manifest, calibrated.bit_config
    if manifest is not None:
        calib = CalibrationInputs(lambda: calibration_data(base, manifest, request.calib_text))
    else:
        config = CalibrationConfig.from_preset(DEFAULT_PRESET)
        calib = CalibrationInputs(lambda: calibration_tokens(
            base, request.calib_text, n_samples=config.n_samples, seqlen=config.seqlen, seed=config.seed))
    for method in methods:
        if method in llmc.LLMC_METHODS:
            method_rows, method_skipped = llmc_rows(method, base, calib, quantized, windows, bit_config,
                                                    request.batch_size)
            rows += method_rows
            skipped += method_skipped
            continue
        if method == "quept":
            setup = quept_setup(calibrated, request.calib_text, request.quept_path)
            if setup.engine is not None and FP in precisions:
                rows.append(engine_fp_row(setup.engine, windows))
        elif method == "rtn":
            setup = rtn_setup(base.model, bit_config, calib)
        else:
            setup = gptq_setup(base.model, bit_config, calib, bits_needed(quantized, bit_config))
        rows += evaluate_method(method, setup, quantized, windows, bit_config, request.batch_size)
        del setup
        gc.collect()
    return ComparisonResult(base.name, request.seqlen, windows.numel(), rows, bit_config, tuple(skipped))
