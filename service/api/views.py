"""Response views: what the engine decided and measured, as the API's schemas show it."""

from __future__ import annotations

from quept_core.planning.allocator import bits_by_linear_type
from quept_core.planning.bits import Shapes, nominal_bits
from quept_core.planning.plan import Plan
from service.api.schemas import PlanView, PrecisionView, PredictionView, TimingView
from service.engine.controller import MIB, Decision
from service.engine.pipeline import Prepared
from service.engine.scheduler import Finished


def precision_view(prepared: Prepared, shapes: Shapes) -> PrecisionView:
    decision = prepared.decision
    return PrecisionView(requested=prepared.spec.precision, served=decision.plan.name,
                         plan=plan_view(decision.plan, shapes), degraded=decision.degraded,
                         reason=decision.reason)


def plan_view(plan: Plan, shapes: Shapes) -> PlanView:
    """Mode, nominal bits and the parameter-weighted bits of each linear type (q_proj, ..., down_proj)."""
    is_fp = plan.mode == "fp"
    by_type = bits_by_linear_type(plan, shapes)
    return PlanView(
        name=plan.name, mode=plan.mode,
        nominal_bits=None if is_fp else round(nominal_bits(plan, shapes), 3),
        bits_by_layer_type={kind: None if is_fp else round(bits, 3) for kind, bits in by_type.items()},
        lm_head_bits=plan.lm_head_bits,
    )


def prediction_view(decision: Decision) -> PredictionView:
    p = decision.prediction
    return PredictionView(latency_ms=p.latency_s * 1000, queue_ms=p.queue_s * 1000, prefill_ms=p.prefill_s * 1000,
                          decode_ms=p.decode_s * 1000, memory_mb=p.memory_bytes / MIB,
                          weights_mb=p.weight_bytes / MIB, kv_cache_mb=p.kv_bytes / MIB)


def timing_view(finished: Finished) -> TimingView:
    t = finished.timing
    return TimingView(queue_ms=round(t.queue_s * 1000, 3), ttft_ms=round(t.ttft_s * 1000, 3),
                      total_ms=round(t.total_s * 1000, 3),
                      decode_tokens_per_s=None if t.decode_tokens_per_s is None else round(t.decode_tokens_per_s, 2),
                      predicted_total_ms=_ms(t.predicted_total_s), predicted_queue_ms=_ms(t.predicted_queue_s),
                      predicted_ttft_ms=_ms(t.predicted_ttft_s))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
