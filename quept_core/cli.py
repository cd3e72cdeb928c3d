"""The `quept` command: serve, calibrate, eval, bench, plan."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from quept_core.models import DEFAULT_MODEL, ModelError, load_model

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

    from quept_core.artifact import calibrate_artifact, default_artifact_dir, partial_dir
    from quept_core.calib_data import CalibrationDataError
    from quept_core.calibrate import CalibrationConfig, summary_lines

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
        typer.echo(f"interrupted: run the same command again to resume after the last finished block "
                   f"({partial_dir(out_dir)})", err=True)
        raise typer.Exit(130) from None
    typer.echo("\n".join(summary_lines(result, config)))
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    typer.echo(f"artifact: {out_dir} ({size / 1e6:.1f} MB), {loaded.name}, preset {preset}, device {chosen}")
