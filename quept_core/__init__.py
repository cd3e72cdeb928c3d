"""QuEPT: one calibration of a LLaMA-family model for every weight bit-width, and a runtime that
switches between uniform and per-layer mixed precision with no re-optimization.

The public API (the README's "Use as a library" shows it end to end):

    loaded = load_model("smollm2-135m")                    # a name, a .gguf file or a Hugging Face folder
    calibrate_artifact(loaded, CalibrationConfig.from_preset("fast"), "artifact")
    engine = QueptEngine.from_calibrated(load_artifact("artifact", loaded))
    engine.generate(prompt_ids, engine.plan("w4"), SamplingParams(max_new_tokens=32))
"""

__version__ = "0.1.0"

from importlib import import_module

# name -> the module that defines it. Imported on first use: a server that only serves never loads
# the calibration or transformers' modelling code, which take seconds to import.
_PUBLIC = {
    "BitConfig": "quept_core.config",
    "CalibratedModel": "quept_core.artifact.store",
    "CalibrationConfig": "quept_core.calibration.loop",
    "LoadedModel": "quept_core.io.models",
    "Plan": "quept_core.planning.plan",
    "Precision": "quept_core.precision",
    "PrecisionError": "quept_core.precision",
    "QueptEngine": "quept_core.runtime.engine",
    "SamplingParams": "quept_core.runtime.protocol",
    "SequenceRequest": "quept_core.runtime.protocol",
    "calibrate_artifact": "quept_core.artifact.store",
    "ensure_artifact": "quept_core.artifact.store",
    "load_artifact": "quept_core.artifact.store",
    "load_model": "quept_core.io.models",
    "make_windows": "quept_core.eval.perplexity",
    "perplexity": "quept_core.eval.perplexity",
    "tokenize_text": "quept_core.eval.perplexity",
    "uniform_plan": "quept_core.planning.plan",
}
__all__ = sorted([*_PUBLIC, "__version__"])


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'quept_core' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
