"""The server's life: loading -> warming -> ready -> draining, and what each phase allows."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from quept_core import __version__
from quept_core.artifact.store import ArtifactError
from quept_core.io.models import ModelError
from quept_core.planning.plan import Plan
from quept_core.precision import uniform_precisions
from quept_core.runtime.packcache import MemoryLimitError
from service.engine.backend import Backend
from service.engine.controller import BUDGET_CHOICES, MIB, Controller
from service.engine.costs import CostModel
from service.engine.pipeline import Pipeline
from service.engine.scheduler import Scheduler, SchedulerLimits
from service.engine.threads import ThreadTuner
from service.engine.warmup import measure_costs
from service.errors import ServiceError, unavailable
from service.observability.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

LOADING, WARMING, READY, DRAINING, FAILED = "loading", "warming", "ready", "draining", "failed"
Loader = Callable[[Settings], Backend]
T = TypeVar("T")


# Start-up failures whose message says it all (bad artifact, model or setting): logged without a traceback.
_EXPECTED = (ValueError, ArtifactError, ModelError)


class ServiceState:
    def __init__(self, settings: Settings, metrics: Metrics, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.phase = LOADING
        self.failure: str | None = None
        self.backend: Backend | None = None
        self.costs: CostModel | None = None
        self.scheduler: Scheduler | None = None
        self.pipeline: Pipeline | None = None
        self.plans: list[Plan] = []  # every plan listed by /precisions: fp, uniform, the mixed front

    async def start(self, loader: Loader, on_fatal: Callable[[str], None] | None = None) -> None:
        """Load, warm up, then turn ready; a failure is reported once through `on_fatal`."""
        try:
            self.backend = await _in_daemon_thread(loader, self.settings)
            if self.phase == LOADING:
                self.phase = WARMING
                await _in_daemon_thread(self._warm_up)
        except Exception as error:  # start-up must end in one line, whatever went wrong
            self.phase = FAILED
            self.failure = str(error) or type(error).__name__
            if isinstance(error, MemoryLimitError):
                self.failure += " (QUEPT_MEMORY_LIMIT_MB / --memory-limit-mb)"
            log.error("start-up failed", extra={"error": self.failure},
                      exc_info=log.isEnabledFor(logging.DEBUG) or not isinstance(error, _EXPECTED))
            if on_fatal is not None:
                on_fatal(self.failure)
            return
        if self.phase == WARMING:
            self.phase = READY
            log.info("ready", extra={"model": self.backend.model_id, "artifact": self.backend.artifact_id})

    def _warm_up(self) -> None:
        backend, settings = self.backend, self.settings
        self.metrics.build_info.labels(__version__, backend.model_id, backend.artifact_id).set(1)
        candidates = backend.candidates()
        uniform = [backend.resolve(p) for p in uniform_precisions(backend.bit_set)]
        described = {plan.name: backend.describe(plan) for plan in uniform}
        # A plan larger than the memory limit never serves (its requests are refused with both sizes).
        fitting = [plan for plan in uniform if backend.fits(described[plan.name])]
        for plan in uniform:
            if plan not in fitting:
                log.warning("plan not served: larger than the memory limit",
                            extra={"plan": plan.name, "weight_mb": round(described[plan.name].weight_bytes / MIB, 1),
                                   "limit_mb": round(backend.memory_limit_bytes / MIB, 1)})
        self.plans = fitting + [c.plan for c in candidates if c.plan.mode == "mixed"]
        self.costs = CostModel(backend.shapes, settings.ewma_alpha)
        measure_costs(backend.engine, fitting, backend.tokenizer, self.costs,
                      {name: c.weight_bytes for name, c in described.items()}, backend.build_s, backend.kept_costs)
        backend.release_after_warmup()
        controller = Controller(candidates, self.costs, backend.kv_bytes_per_token, settings.brownout_queue_depth,
                                backend.engine.missing_shares)
        self.metrics.start_controller_series_at_zero(controller.downgrades(), BUDGET_CHOICES)
        limits = SchedulerLimits(settings.max_queue, settings.max_queue_tokens, settings.max_running)
        # On a GPU the threads only launch kernels: nothing to tune.
        tuned = settings.adaptive_threads and backend.device.startswith("cpu")
        threads = ThreadTuner(torch.get_num_threads()) if tuned else None
        self.scheduler = Scheduler(backend.engine, limits, self.metrics, self.costs, self.clock,
                                   on_layout_change=self.refresh_gauges, probes=settings.memory_limit_mb is None,
                                   threads=threads)
        self.pipeline = Pipeline(backend, controller, self.scheduler, self.metrics,
                                 settings.max_new_tokens_limit, settings.queue_timeout_s, settings.max_running)
        self.refresh_gauges()
        self.scheduler.start()

    def refresh_gauges(self) -> None:
        """Resident weight bytes per precision; called from the engine's thread."""
        for label, size in self.backend.resident_bytes().items():
            self.metrics.weights_resident.labels(label).set(size)

    def ready_pipeline(self) -> Pipeline:
        """The pipeline, or a 503 that says why requests cannot be served now."""
        if self.phase == READY:
            return self.pipeline
        reason = "draining" if self.phase == DRAINING else "not_ready"
        self.metrics.admission_rejections.labels(reason).inc()
        raise self.not_ready_error()

    def not_ready_error(self) -> ServiceError:
        if self.phase == DRAINING:
            return unavailable("draining", "the server is shutting down", 5)
        if self.phase == FAILED:
            return unavailable("not_ready", f"start-up failed: {self.failure}", 30)
        return unavailable("not_ready", f"the server is {self.phase} the model", 5)

    async def drain(self) -> None:
        """Refuse new requests, let in-flight ones finish up to the drain timeout, abort the rest."""
        if self.phase == DRAINING:
            return
        self.phase = DRAINING
        if self.scheduler is None:
            return
        log.info("draining", extra={"in_flight": self.scheduler.in_flight()})
        deadline = self.clock() + self.settings.drain_timeout_s
        while self.scheduler.in_flight() and self.clock() < deadline:
            await asyncio.sleep(0.05)
        if self.scheduler.in_flight():
            log.warning("drain timeout: aborting requests", extra={"in_flight": self.scheduler.in_flight()})
            self.scheduler.abort_all(unavailable("draining", "the server shut down before the request finished", 5))

    async def close(self) -> None:
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)


async def _in_daemon_thread(function: Callable[..., T], *args: object) -> T:
    """Like asyncio.to_thread, but a SIGTERM during a long load or calibration need not wait for it:
    the interpreter does not join daemon threads at exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = function(*args)
        except Exception as error:  # noqa: BLE001 - handed over to the awaiting task, which reports it
            loop.call_soon_threadsafe(_settle, future, None, error)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=run, name="quept-startup", daemon=True).start()
    return await future


def _settle(future: asyncio.Future, result: object, error: Exception | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
