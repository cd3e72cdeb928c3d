"""QuEPT: one calibration of a LLaMA-family model for every weight bit-width, and a runtime that
switches between uniform and per-layer mixed precision with no re-optimization.

The public API (the README's "Use as a library" shows it end to end):

    loaded = load_model("smollm2-135m")                    # a name, a .gguf file or a Hugging Face folder
    calibrate_artifact(loaded, CalibrationConfig.from_preset("fast"), "artifact")
    engine = QueptEngine.from_calibrated(load_artifact("artifact", loaded))
    engine.generate(prompt_ids, engine.plan("w4"), SamplingParams(max_new_tokens=32))
"""

__version__ = "0.1.0"

from quept_core.artifact.store import CalibratedModel, calibrate_artifact, ensure_artifact, load_artifact
from quept_core.calibration.loop import CalibrationConfig
from quept_core.config import BitConfig
from quept_core.eval.perplexity import make_windows, perplexity, tokenize_text
from quept_core.io.models import LoadedModel, load_model
from quept_core.planning.plan import Plan, uniform_plan
from quept_core.precision import Precision, PrecisionError
from quept_core.runtime.engine import QueptEngine
from quept_core.runtime.protocol import SamplingParams, SequenceRequest

__all__ = [
    "BitConfig",
    "CalibratedModel",
    "CalibrationConfig",
    "LoadedModel",
    "Plan",
    "Precision",
    "PrecisionError",
    "QueptEngine",
    "SamplingParams",
    "SequenceRequest",
    "__version__",
    "calibrate_artifact",
    "ensure_artifact",
    "load_artifact",
    "load_model",
    "make_windows",
    "perplexity",
    "tokenize_text",
    "uniform_plan",
]
