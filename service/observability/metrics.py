"""Every metric of the service, defined once (names, types and labels follow serving-conventions.md).

Each `Metrics` owns its registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from quept_core.precision import Precision, PrecisionError

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Label value for `precision_served` / `precision_requested` when no plan was chosen or the
# requested string named nothing servable: label values stay a small fixed set.
NO_PLAN = "none"
INVALID = "invalid"

# Label values known before the first request: their series are exported at 0 from the start, so that
# rate() and alert rules see a counter before its first increment (Prometheus' instrumentation advice).
FAILURE_REASONS = ("dropped", "deadline", "error")  # counted by the scheduler
BUDGETS = ("latency", "memory")  # counted by the pipeline
ADMISSION_REASONS = ("body_too_large", "draining", "infeasible", "not_ready", "overloaded", "queue_full",
                     "queue_tokens")  # counted by the middleware, the service state, the routes and the scheduler
DECISION_MODES = ("uniform", "mixed")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SWITCH_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_PREDICTION_BUCKETS = (0.25, 0.4, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 2.5, 4.0)  # around 1


def requested_label(precision: str, bit_set: tuple[int, ...]) -> str:
    """`auto`, `fp`, `w<b>`, `mixed` or `invalid`: never the client's free-form string."""
    try:
        return Precision.parse(precision, bit_set).label
    except PrecisionError:
        return INVALID


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("quept_requests_total", "Generation requests by outcome.",
                                ["route", "status", "precision_requested", "precision_served"], registry=r)
        self.request_duration = Histogram("quept_request_duration_seconds", "End-to-end request time.",
                                          ["precision_served"], buckets=_LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("quept_time_to_first_token_seconds",
                                             "Time from arrival to the first generated token.",
                                             ["precision_served"], buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("quept_inter_token_latency_seconds",
                                             "Time between consecutive generated tokens of a request.",
                                             ["precision_served"], buckets=_ITL_BUCKETS, registry=r)
        self.queue_duration = Histogram("quept_queue_duration_seconds", "Time from admission to batch start.",
                                        buckets=_QUEUE_BUCKETS, registry=r)
        self.requests_running = Gauge("quept_requests_running", "Requests in a running batch.", registry=r)
        self.requests_waiting = Gauge("quept_requests_waiting", "Requests waiting for a batch.", registry=r)
        self.prompt_tokens = Counter("quept_prompt_tokens_total", "Prompt tokens processed.",
                                     ["precision_served"], registry=r)
        self.generation_tokens = Counter("quept_generation_tokens_total", "Tokens generated.",
                                         ["precision_served"], registry=r)
        self.precision_downgrades = Counter("quept_precision_downgrades_total",
                                            "Requests served by a cheaper plan than requested or chosen.",
                                            ["from", "to", "reason"], registry=r)
        self.controller_decisions = Counter("quept_controller_decisions_total", "Plans chosen by the controller.",
                                            ["mode"], registry=r)
        self.budget_violations = Counter("quept_budget_violations_total",
                                         "Served requests that exceeded their budget.", ["budget"], registry=r)
        self.budget_choices = Counter("quept_budget_choices_total",
                                      "Served auto requests with a latency budget, by how the choice turned out: "
                                      "best, over_budget, better_plan_fitted (a plan of better quality would "
                                      "have met the budget too), brownout.", ["outcome"], registry=r)
        self.admission_rejections = Counter("quept_admission_rejections_total",
                                            "Requests refused before they were queued.", ["reason"], registry=r)
        self.request_failures = Counter("quept_request_failures_total", "Admitted requests that did not finish.",
                                        ["reason"], registry=r)
        self.weights_resident = Gauge("quept_weights_resident_bytes", "Resident weight bytes per precision.",
                                      ["precision"], registry=r)
        self.kv_cache_usage = Gauge("quept_kv_cache_usage_ratio", "Share of the KV cache in use.", registry=r)
        self.precision_switch = Histogram("quept_precision_switch_seconds", "Time to switch the model's plan.",
                                          buckets=_SWITCH_BUCKETS, registry=r)
        self.latency_prediction = Histogram("quept_latency_prediction_ratio",
                                            "Measured end-to-end latency over the controller's prediction, "
                                            "per finished request.", ["precision_served"],
                                            buckets=_PREDICTION_BUCKETS, registry=r)
        self.host_speed = Gauge("quept_host_speed_ratio", "Speed of this host now over its speed at warm-up "
                                "(expected over measured step seconds).", registry=r)
        self.host_speed.set(1.0)
        self.engine_threads = Gauge("quept_engine_threads", "CPU threads each phase of an engine step runs on "
                                    "(prefill, decode), as chosen from the host's recent speed.", ["phase"],
                                    registry=r)
        self.build_info = Gauge("quept_build_info", "Version, model and artifact of this server (always 1).",
                                ["version", "model", "artifact"], registry=r)

        self._start_at_zero()

    def _start_at_zero(self) -> None:
        for counter, values in ((self.request_failures, FAILURE_REASONS), (self.budget_violations, BUDGETS),
                                (self.admission_rejections, ADMISSION_REASONS),
                                (self.controller_decisions, DECISION_MODES)):
            for value in values:
                counter.labels(value)

    def start_controller_series_at_zero(self, downgrades: list[tuple[str, str, str]],
                                        budget_choices: tuple[str, ...]) -> None:
        """The series the controller can count, once it knows its plans: (from, to, reason) downgrades and
        the outcomes of budgeted choices."""
        for source, target, reason in downgrades:
            self.precision_downgrades.labels(source, target, reason)
        for outcome in budget_choices:
            self.budget_choices.labels(outcome)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
