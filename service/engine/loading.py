"""The real backend: the base model, its calibrated artifact and the elastic runtime, seen as the
service needs them (service/engine/backend.py)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from quept_core.io.models import load_model
from quept_core.planning.bits import FP_BITS, nominal_bits
from quept_core.planning.plan import Plan
from quept_core.precision import Precision, uniform_name, uniform_precisions
from quept_core.runtime.engine import QueptEngine
from service.engine.controller import Candidate, bit_shares
from service.settings import Settings


class ModelBackend:
    def __init__(self, engine: QueptEngine, artifact_id: str, front: list[Plan] = (),
                 quality: Mapping[str, float] | None = None):
        self.engine = engine
        self.model_id = engine.model_name
        self.artifact_id = artifact_id
        self.device = str(engine.device)
        self.bit_set = engine.bit_config.bits
        self.tokenizer = engine.tokenizer
        dims = engine.model.dims
        self.context_length = dims.max_positions
        self.kv_bytes_per_token = engine.kv_bytes_per_token
        self.shapes = dict(engine.linear_shapes)
        self._front = list(front)
        self._quality = dict(quality or {})
        # Runs before serving (in the loader thread): building every uniform plan's packs once gives
        # their exact resident bytes; a mixed plan's bytes follow from its bit mix.
        self._bytes = {plan.name: engine.weight_bytes(plan) for plan in self._uniform_plans()}

    def _uniform_plans(self) -> list[Plan]:
        return [self.engine.plan(p) for p in uniform_precisions(self.bit_set)]

    def resolve(self, precision: Precision) -> Plan:
        return self.engine.plan(precision)

    def describe(self, plan: Plan) -> Candidate:
        if plan.mode == "fp":
            return Candidate(plan, FP_BITS, self._bytes[plan.name], self._quality.get(plan.name, 0.0))
        weight_bytes = self._bytes.get(plan.name)
        if weight_bytes is None:
            weight_bytes = round(sum(share * self._bytes[label]
                                     for label, share in bit_shares(plan, self.shapes).items()))
        return Candidate(plan, nominal_bits(plan, self.shapes), weight_bytes, self._quality.get(plan.name))

    def candidates(self) -> list[Candidate]:
        plans = [p for p in self._uniform_plans() if p.mode != "fp"] + self._front
        return sorted((self.describe(p) for p in plans), key=lambda c: c.nominal_bits, reverse=True)

    def resident_bytes(self) -> dict[str, int]:
        resident = {p.name: 0 for p in uniform_precisions(self.bit_set)}
        cache = self.engine.cache
        resident_keys = cache.keys()  # (linear name, bits)
        for key in resident_keys:
            resident[uniform_name(key[1])] += cache.nbytes(key)
        return resident


def _device(choice: str) -> torch.device | None:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("QUEPT_DEVICE is cuda but no CUDA device is available; use auto or cpu")
    return None if choice == "auto" else torch.device(choice)


def load_backend(settings: Settings) -> ModelBackend:
    """Load the model, ensure its artifact (calibrating on first use) and its mixed-precision front
    and quality (measured once, stored in the artifact), and build the engine."""
    from quept_core.artifact.store import ensure_artifact, load_artifact
    from quept_core.eval.plan_quality import ensure_mixed_extras, stored_plans
    from quept_core.planning.allocator import Allocator
    from quept_core.planning.sensitivity import SensitivityTable

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = _device(settings.device)
    loaded = load_model(settings.model)
    calibrated = load_artifact(settings.artifact or ensure_artifact(loaded, preset=settings.preset), loaded)
    extras = ensure_mixed_extras(calibrated.artifact_dir, calibrated)
    allocator = Allocator(SensitivityTable.from_dict(extras["sensitivity"]), calibrated.bit_config)
    engine = QueptEngine.from_calibrated(calibrated, device=device, memory_limit_bytes=settings.memory_limit_bytes,
                                         mixed_resolver=allocator.plan, max_running=settings.max_running)
    quality = {name: entry["ppl_delta_pct"] for name, entry in extras["quality"]["plans"].items()}
    # Stored front plans run the output head like every quantized plan of this engine.
    front = [plan.with_head_bits(engine.head_bits) for plan in stored_plans(extras["plans"])]
    return ModelBackend(engine, calibrated.artifact_id, front, quality)
