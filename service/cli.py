"""The `quept` command: serve, calibrate, eval, bench, plan."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from quept_core.artifact.store import ArtifactError
from quept_core.calibration.data import CalibrationDataError
from quept_core.eval.comparison import ComparisonError, EvalRequest, run_comparison
from quept_core.eval.perplexity import EvaluationError
from quept_core.io.models import DEFAULT_MODEL, ModelError, load_model, resolve_model
from quept_core.precision import PrecisionError

app = typer.Typer(help="QuEPT-serve: one calibrated model, every precision.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


def fail(message: str) -> None:
    """Exit with a one-line error, never a stack trace."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def prepare(model: str = typer.Option(DEFAULT_MODEL, help="model name, .gguf file or Hugging Face folder")) -> None:
    """Convert and cache a base model (the first load of a GGUF file dequantizes it once)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        loaded = load_model(model)
    except ModelError as error:
        fail(str(error))
    typer.echo(f"{loaded.name}: {loaded.folder} (sha256 {loaded.checksum[:12]}) in {time.perf_counter() - start:.1f} s")


@app.command("eval")
def eval_command(
    text: Annotated[Path, typer.Option(help="text file to measure perplexity on (e.g. wiki.test.raw)")],
    model: Annotated[str, typer.Option(help="model name, .gguf file or Hugging Face folder")] = DEFAULT_MODEL,
    precision: Annotated[str, typer.Option(help="comma list of fp, all, w<b>, mixed:<avg bits per weight>")] = "fp",
    method: Annotated[str, typer.Option(help="comma list of quept, rtn, gptq, llmc-gptq, llmc-gptq-act, "
                                        "llmc-awq, llamacpp-<type> (q3_k_s, q3_k_m, q4_k_m, q5_k_m, q6_k, q8_0: "
                                        "one row each, whatever --precision says)")] = "quept",
    seqlen: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    max_tokens: Annotated[int | None, typer.Option(help="use only the first N tokens of the text")] = None,
    artifact: Annotated[Path | None, typer.Option(help="calibrated artifact folder (default: the cached one)")] = None,
    batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 4,
    calib_text: Annotated[Path | None, typer.Option(
        "--calib-text", help="the calibration text, when the artifact was calibrated on one (GPTQ and the "
        "sensitivity tables use the artifact's calibration data)")] = None,
    quept_path: Annotated[str, typer.Option(help="how quept rows are scored: engine (the serving engine: "
                                            "its packs and output head as served) or reference (fake-quantized float "
                                            "model, as the other methods)")] = "engine",
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")] = False,
) -> None:
    """Perplexity per (method, precision): fp, QuEPT, RTN, GPTQ and maintained baselines on the same windows."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    request = EvalRequest(text, model, precision, method, seqlen, max_tokens, artifact, batch_size, calib_text,
                          quept_path)
    try:
        result = run_comparison(request)
    except (ArtifactError, CalibrationDataError, ComparisonError, EvaluationError, ModelError,
            PrecisionError) as error:
        fail(str(error))
    typer.echo(json.dumps(result.to_json()) if json_output else result.table())


@app.command()
def plan(
    model: Annotated[str, typer.Option(help="model name, .gguf file or Hugging Face folder")] = DEFAULT_MODEL,
    artifact: Annotated[Path | None, typer.Option(help="calibrated artifact folder (default: the cached one)")] = None,
    calib_text: Annotated[Path | None, typer.Option(
        "--calib-text", help="the calibration text, when the artifact was calibrated on one")] = None,
    sensitivity: Annotated[str, typer.Option(help="proxy (seconds) or kl (the faithful probe, minutes)")] = "proxy",
    bits: Annotated[float | None, typer.Option(help="show the best plan for this many bits per weight")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")] = False,
) -> None:
    """Mixed precision: compute (once) and show the artifact's plan front and each plan's measured quality."""
    from quept_core.artifact.store import ensure_artifact, load_artifact
    from quept_core.eval.plan_quality import SENSITIVITY_KINDS, ensure_mixed_extras
    from quept_core.layers import model_linear_names
    from quept_core.planning.allocator import bits_by_linear_type, resolve_mixed
    from quept_core.planning.bits import linear_shapes
    from quept_core.planning.sensitivity import SensitivityTable

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if sensitivity not in SENSITIVITY_KINDS:
        fail(f"--sensitivity must be one of {', '.join(SENSITIVITY_KINDS)}; got '{sensitivity}'")
    try:
        loaded = load_model(model)
        calibrated = load_artifact(artifact or ensure_artifact(loaded), loaded)
        extras = ensure_mixed_extras(calibrated.artifact_dir, calibrated, calib_text, sensitivity)
        chosen = None if bits is None else resolve_mixed(
            bits, SensitivityTable.from_dict(extras["sensitivity"]), calibrated.bit_config)
    except (ArtifactError, CalibrationDataError, ModelError, PrecisionError) as error:
        fail(str(error))
    quality = extras["quality"]["plans"]
    if chosen is not None:
        shapes = linear_shapes(loaded.model, model_linear_names(loaded.model))
        by_type = bits_by_linear_type(chosen, shapes)
        if json_output:
            typer.echo(json.dumps({"name": chosen.name, "layer_bits": dict(chosen.layer_bits), "by_type": by_type}))
        else:
            typer.echo(f"{chosen.name}: " + ", ".join(f"{kind} {value:.2f}" for kind, value in by_type.items()))
        return
    if json_output:
        typer.echo(json.dumps({"sensitivity": extras["sensitivity"]["kind"], "quality": extras["quality"]}))
        return
    typer.echo(f"{calibrated.artifact_dir}: sensitivity {extras['sensitivity']['kind']}, quality on "
               f"{extras['quality']['tokens']} held-out calibration tokens, on the serving engine")
    typer.echo(f"{'plan':<12} {'bits/weight':>11} {'head bits':>9} {'ppl':>9} {'vs fp':>8} {'± 95 %':>7}")
    # By bits; a mixed plan that is a uniform one (one width in every block) comes after it.
    ordered = sorted(quality.items(), key=lambda item: (item[0] != "fp", item[1]["storage_bits"],
                                                         item[0].startswith("mixed:")))
    for name, entry in ordered:
        head, interval = entry["lm_head_bits"] or "fp", entry["ppl_delta_interval_pct"]
        interval_text = "–" if interval is None else f"{interval:.2f}%"
        typer.echo(f"{name:<12} {entry['storage_bits']:>11.3f} {head:>9} {entry['ppl']:>9.3f} "
                   f"{entry['ppl_delta_pct']:>+7.2f}% {interval_text:>7}")


@app.command()
def calibrate(
    model: Annotated[str, typer.Option(help="model name, .gguf file or Hugging Face folder")] = DEFAULT_MODEL,
    calib_text: Annotated[Path | None, typer.Option("--calib-text", help="calibrate on windows of this text "
                                                    "file (default: text the model generates itself)")] = None,
    preset: Annotated[str, typer.Option(help="fast or default")] = "default",
    out: Annotated[Path | None, typer.Option(help="artifact folder (default: the cache folder "
                                             "`quept serve` uses)")] = None,
    seed: Annotated[int, typer.Option(help="seed for the data windows, the LoRA init and the bit sampling")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Calibrate a model once for every bit-width (QuEPT) and write the artifact; resumes if interrupted."""
    import torch

    from quept_core.artifact.store import calibrate_artifact, default_artifact_dir, partial_dir
    from quept_core.calibration.data import CalibrationDataError
    from quept_core.calibration.loop import CalibrationConfig, summary_lines

    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device must be one of auto, cpu, cuda; got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available; use --device cpu")
    chosen = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if calib_text is not None and not calib_text.is_file():
        fail(f"--calib-text: file not found: {calib_text}")
    try:
        config = CalibrationConfig.from_preset(preset, seed=seed)
        loaded = load_model(model)
    except (ModelError, ValueError) as error:
        fail(str(error))
    out_dir = out if out is not None else default_artifact_dir(loaded.name, preset)
    if partial_dir(out_dir).exists():
        typer.echo(f"resuming the interrupted calibration in {partial_dir(out_dir)}", err=True)
    try:
        result = calibrate_artifact(loaded, config, out_dir, text_file=calib_text, device=chosen)
    except CalibrationDataError as error:
        fail(str(error))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: run the same command again to resume after the last finished block or "
                   f"end-to-end checkpoint ({partial_dir(out_dir)})", err=True)
        raise typer.Exit(130) from None
    typer.echo("\n".join(summary_lines(result, config)))
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    typer.echo(f"artifact: {out_dir} ({size / 1e6:.1f} MB), {loaded.name}, preset {preset}, device {chosen}")


@app.command()
def bench(
    model: Annotated[str, typer.Option(help="model name, .gguf file or Hugging Face folder")] = DEFAULT_MODEL,
    precisions: Annotated[str, typer.Option(help="comma list of fp, w<b>")] = "fp,w8,w7,w6,w5,w4,w3",
    mixed: Annotated[str, typer.Option(help="comma list of average bits for mixed plans, e.g. 3.5,4.5")] = "",
    mixed_set: Annotated[str, typer.Option(help="comma list of plans decoding in one running set, 2 sequences "
                                                "each, against per-plan batches in turns; empty: no such row")
                         ] = "w8,w6,w4,w3",
    artifact: Annotated[Path | None, typer.Option(help="calibrated artifact folder (default: the one "
                                                       "`quept serve` uses, calibrated first if missing)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    text: Annotated[Path | None, typer.Option(help="evaluation text for prompts and perplexity (e.g. "
                                                   "wiki.test.raw); without it, no perplexity column")] = None,
    prompt_tokens: Annotated[int, typer.Option(min=8)] = 256,
    new_tokens: Annotated[int, typer.Option(min=2)] = 64,
    ppl_tokens: Annotated[int, typer.Option(min=2)] = 4096,
    seqlen: Annotated[int, typer.Option(min=2)] = 512,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads")] = 2,
    repeats: Annotated[int, typer.Option(min=1, help="rounds, each one batch size at a time across every row; "
                                                     "each figure keeps its best (4 settle the ratios on a "
                                                     "shared host)")] = 1,
    docs: Annotated[Path | None, typer.Option(help="update the runtime section of DOCS/benchmarks.md and "
                                                    "write its plot there (e.g. docs)")] = None,
) -> None:
    """Speed, memory, switching and perplexity: HF generate, our runtime per plan, llama.cpp."""
    import json
    import shlex
    import sys

    import torch

    from quept_core.artifact.store import ensure_artifact, load_artifact
    from quept_core.bench import report as bench_report
    from quept_core.bench import runner
    from quept_core.runtime.engine import QueptEngine

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("quept_core.bench.runner").setLevel(logging.INFO)  # progress on stderr
    torch.set_num_threads(threads)
    config = runner.BenchConfig(prompt_tokens=prompt_tokens, new_tokens=new_tokens, ppl_tokens=ppl_tokens,
                                seqlen=seqlen, repeats=repeats,
                                mixed_set=tuple(p.strip() for p in mixed_set.split(",") if p.strip()))

    def make_engine(loaded):
        """The served model: the calibrated artifact's weights, not plain quantization."""
        engine = QueptEngine.from_calibrated(load_artifact(artifact or ensure_artifact(loaded), loaded),
                                             max_running=max(runner.BATCHES))
        engine.mixed_resolver = runner.allocator_resolver(loaded, engine)
        return engine

    names = [p.strip() for p in precisions.split(",") if p.strip()]
    if mixed:
        names += [f"mixed:{m.strip()}" for m in mixed.split(",") if m.strip()]
    try:
        source = resolve_model(model)
        result = runner.run_bench(model, make_engine, names, config, text,
                                  source.path if source.kind == "gguf" else None)
    except (ModelError, ArtifactError, PrecisionError, ValueError) as error:
        fail(str(error))
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(bench_report.text_table(result))
    if docs is not None:
        bench_report.plot(result, docs / "benchmarks-runtime.png")
        command = "quept " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        bench_report.update_docs(docs / "benchmarks.md", bench_report.markdown(result, command, "benchmarks-runtime.png"))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def serve(ctx: typer.Context) -> None:
    """Serve the model over HTTP: load, ensure the artifact, warm up, then turn ready.

    Every setting is a QUEPT_* environment variable and a flag (`quept serve --help` lists them).
    """
    # The service depends on quept_core, never the reverse at import time.
    from service.serve import run_server
    from service.settings import SettingsError, load_settings

    try:
        settings = load_settings(ctx.args)
    except SettingsError as error:
        fail(str(error))
    failure = run_server(settings)
    if failure:
        fail(failure)
