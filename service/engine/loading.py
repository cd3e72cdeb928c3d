"""The real backend: the elastic runtime over the calibrated artifact's serving store, seen as the
service needs it (service/engine/backend.py)."""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Mapping

import torch

from quept_core.artifact.serving import (
    ServingStore,
    StoreError,
    open_serving_store,
    serving_store_dir,
    write_serving_store,
)
from quept_core.artifact.store import (
    artifact_id_of,
    ensure_artifact,
    load_artifact,
    read_manifest,
    ready_artifact,
    verify_artifact,
)
from quept_core.eval.plan_quality import ensure_mixed_extras, stored_mixed_extras, stored_plans
from quept_core.io.models import float_folder, load_model, resolve_model
from quept_core.planning.allocator import Allocator
from quept_core.planning.bits import FP_BITS, nominal_bits
from quept_core.planning.plan import Plan
from quept_core.planning.sensitivity import SensitivityTable
from quept_core.precision import FP, Precision, uniform_name, uniform_precisions
from quept_core.runtime.engine import QueptEngine
from quept_core.runtime.weights import ElasticWeights
from service.engine.controller import Candidate
from service.engine.costs import bit_shares
from service.engine.warmup import costs_file
from service.settings import Settings


class ModelBackend:
    def __init__(self, engine: QueptEngine, artifact_id: str, front: list[Plan] = (),
                 quality: Mapping[str, float] | None = None, quality_intervals: Mapping[str, float] | None = None):
        self.engine = engine
        self.model_id = engine.model_name
        self.artifact_id = artifact_id
        self.device = str(engine.device)
        self.memory_limit_bytes = engine.cache.limit_bytes
        self.kept_costs = costs_file(artifact_id, engine.device, engine.max_running, self.memory_limit_bytes)
        self.bit_set = engine.bit_config.bits
        self.tokenizer = engine.tokenizer
        dims = engine.model.dims
        self.context_length = dims.max_positions
        self.kv_bytes_per_token = engine.kv_bytes_per_token
        self.shapes = dict(engine.linear_shapes)
        self._front = list(front)
        self._quality = dict(quality or {})
        self._intervals = dict(quality_intervals or {})  # half-widths of the quality figures' intervals
        # Runs before serving (in the loader thread): building every uniform plan's packs once gives
        # their exact resident bytes and how long they take to build; a mixed plan's follow from its
        # bit mix. fp, released after warm-up, is sized from its pack file when there is one and built
        # on its first use (the warm-up's, or a request's).
        self._bytes, self.build_s = {}, {}
        for plan in self._uniform_plans():
            stored = engine.stored_weight_bytes(plan) if plan.mode == "fp" else None
            if stored is not None:
                self._bytes[plan.name] = stored
                continue
            started = time.perf_counter()
            self._bytes[plan.name] = engine.weight_bytes(plan)
            self.build_s[plan.name] = time.perf_counter() - started

    def _uniform_plans(self) -> list[Plan]:
        return [self.engine.plan(p) for p in uniform_precisions(self.bit_set)]

    def resolve(self, precision: Precision) -> Plan:
        return self.engine.plan(precision)

    def describe(self, plan: Plan) -> Candidate:
        if plan.mode == "fp":
            return Candidate(plan, FP_BITS, self._bytes[plan.name], self._quality.get(plan.name, 0.0),
                             self._intervals.get(plan.name))
        weight_bytes = self._bytes.get(plan.name)
        if weight_bytes is None:
            weight_bytes = round(sum(share * self._bytes[label]
                                     for label, share in bit_shares(plan, self.shapes).items()))
        return Candidate(plan, nominal_bits(plan, self.shapes), weight_bytes, self._quality.get(plan.name),
                         self._intervals.get(plan.name))

    def candidates(self) -> list[Candidate]:
        plans = [p for p in self._uniform_plans() if p.mode != "fp"] + self._front
        fitting = [c for c in (self.describe(p) for p in plans) if self.fits(c)]
        return sorted(fitting, key=lambda c: c.nominal_bits, reverse=True)

    def fits(self, candidate: Candidate) -> bool:
        return self.memory_limit_bytes is None or candidate.weight_bytes <= self.memory_limit_bytes

    def release_after_warmup(self) -> None:
        """The fp plan's packs (bf16, the largest plan and the one least asked for) are built again on
        its first request, in about a second, instead of being held from the start; the KV positions
        warm-up wrote are committed again by the requests that write them."""
        self.engine.release(self.engine.plan(FP))
        self.engine.pool.release_pages()
        _return_freed_memory()

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
    """Build the engine from the artifact's serving store and read its mixed-precision front and
    quality. On a first start (no artifact, extras or store yet) the transformers model is loaded to
    calibrate, measure and write them once, then freed: serving never holds it."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = _device(settings.device)
    served = _served(settings)
    if served is None:
        _calibrate_and_store(settings)
        gc.collect()  # the model, its elastic linears and the artifact's tensors are unreachable now
        served = _served(settings)
        if served is None:
            raise StoreError("the serving store or the mixed-precision extras just written could not be read back")
    store, extras = served
    allocator = Allocator(SensitivityTable.from_dict(extras["sensitivity"]), store.bit_config)
    allocator.solve()  # every budget's plan now (about 20 ms for SmolLM2-135M), not in a first request's time
    engine = QueptEngine(store, store.tokenizer(), model_name=store.model_name, device=device,
                         memory_limit_bytes=settings.memory_limit_bytes, mixed_resolver=allocator.plan,
                         max_running=settings.max_running, pack_dir=store.folder)
    entries = extras["quality"]["plans"]
    quality = {name: entry["ppl_delta_pct"] for name, entry in entries.items()}
    intervals = {name: entry["ppl_delta_interval_pct"] for name, entry in entries.items()
                 if entry.get("ppl_delta_interval_pct") is not None}
    # Stored front plans run the output head like every quantized plan of this engine.
    front = [plan.with_head_bits(engine.head_bits) for plan in stored_plans(extras["plans"])]
    with store.kept_open():  # the backend builds every uniform plan's packs (read back after the first start)
        backend = ModelBackend(engine, store.artifact_id, front, quality, intervals)
    engine.store_packs()
    return backend  # what start-up freed goes back to the system after warm-up (release_after_warmup)


def _return_freed_memory() -> None:
    """Give the memory freed during start-up (the model on a first start, probes and staging copies
    of packs) back to the system: glibc keeps freed heap pages in the process otherwise."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _served(settings: Settings) -> tuple[ServingStore, dict] | None:
    """The serving store and the mixed-precision extras of the artifact to serve, when both are there
    and current; found from the base model's checksum, without loading the model."""
    source = resolve_model(settings.model)
    _, checksum = float_folder(source)
    if settings.artifact is not None:
        artifact_dir = settings.artifact
        manifest = verify_artifact(artifact_dir, source.name, checksum, state=False)
    else:
        artifact_dir = ready_artifact(source.name, checksum, settings.preset, state=False)
        if artifact_dir is None:
            return None
        manifest = read_manifest(artifact_dir)
    store = open_serving_store(serving_store_dir(artifact_dir), artifact_id_of(manifest))
    extras = stored_mixed_extras(artifact_dir)
    return None if store is None or extras is None else (store, extras)


def _calibrate_and_store(settings: Settings) -> None:
    """Load the model, ensure its artifact (calibrating on first use) and mixed-precision extras, and
    write the serving store; everything loaded here is dropped on return."""
    loaded = load_model(settings.model)
    calibrated = load_artifact(settings.artifact or ensure_artifact(loaded, preset=settings.preset), loaded)
    ensure_mixed_extras(calibrated.artifact_dir, calibrated)
    write_serving_store(serving_store_dir(calibrated.artifact_dir),
                        ElasticWeights(loaded, calibrated.elastic, calibrated.bit_config), loaded.tokenizer,
                        artifact_id=calibrated.artifact_id, model_name=loaded.name, model_checksum=loaded.checksum)
