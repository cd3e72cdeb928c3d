"""The `quept` command: serve, calibrate, eval, bench, plan."""

from __future__ import annotations

import logging
import time

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
