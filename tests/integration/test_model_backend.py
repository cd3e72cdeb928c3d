"""The service's view of the real default model on the elastic runtime (no calibration needed here)."""

from __future__ import annotations

import pytest
import torch

from quept_core.config import BitConfig
from quept_core.io.models import load_model
from quept_core.planning.plan import Plan
from quept_core.precision import Precision, PrecisionError
from quept_core.quant.elastic import make_elastic
from quept_core.runtime import native_step
from quept_core.runtime.engine import QueptEngine
from quept_core.runtime.protocol import SamplingParams
from service.engine.loading import ModelBackend
from service.engine.pipeline import GenerationSpec, Pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backend() -> ModelBackend:
    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m")
    engine = QueptEngine.from_elastic(loaded, make_elastic(loaded.model, BitConfig()), device="cpu")
    return ModelBackend(engine, "uncalibrated")


def test_shapes_and_kv_bytes_of_the_default_model(backend):
    assert backend.model_id == "smollm2-135m" and backend.context_length == 8192
    # K and V, 30 layers, 3 KV heads of 64, in bf16 where the native step runs (float32 for PyTorch's)
    assert backend.kv_bytes_per_token == 2 * 30 * 3 * 64 * (2 if native_step.available() else 4)
    assert len(backend.shapes) == 210
    assert sum(out * inp for out, inp in backend.shapes.values()) == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)


def test_plan_bytes_are_the_engines_and_a_mix_is_estimated_from_its_bits(backend):
    engine = backend.engine
    w4, w8 = backend.resolve("w4"), backend.resolve("w8")
    assert backend.describe(w4).weight_bytes == engine.weight_bytes(w4)
    names = list(backend.shapes)
    mix = Plan(Precision.mixed(6.0), {name: 4 if i % 2 else 8 for i, name in enumerate(names)}, w4.lm_head_bits)
    estimate = backend.describe(mix).weight_bytes
    assert backend.describe(w4).weight_bytes < estimate < backend.describe(w8).weight_bytes
    assert estimate == pytest.approx(engine.weight_bytes(mix), rel=0.02)


def test_candidates_and_resident_bytes(backend):
    candidates = backend.candidates()
    assert [c.plan.name for c in candidates] == [f"w{b}" for b in sorted(backend.bit_set, reverse=True)]
    resident = backend.resident_bytes()
    assert set(resident) == {"fp", *(f"w{b}" for b in backend.bit_set)}
    assert sum(resident.values()) == backend.engine.cache.resident_bytes
    with pytest.raises(PrecisionError, match="allowed"):
        backend.resolve("w11")


def test_greedy_chat_through_the_service_prompt_names_paris(backend):
    pipeline = Pipeline(backend, controller=None, scheduler=None, metrics=None, max_new_tokens_limit=64,
                        queue_timeout_s=1, max_running=1)
    spec = GenerationSpec(None, [{"role": "user", "content": "What is the capital of France? Answer with one word."}], SamplingParams())
    tokens = backend.engine.generate(pipeline.prompt_ids(spec), backend.resolve("w8"),
                                     SamplingParams(max_new_tokens=16))
    assert "Paris" in backend.tokenizer.decode(tokens, skip_special_tokens=True)
