"""Prometheus metrics of the service, registered in prometheus_client's default ``REGISTRY``.

``GET /metrics`` serves ``generate_latest(REGISTRY)``. Names carry their unit; other modules (the
middleware, the engine, dashboards and alerts in ``deploy/``) rely on them, so do not rename.
HTTP-level series are recorded by the middleware, engine-level ones by ``app.engine``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Requests last from tens of milliseconds (plain generation of a few tokens on a GPU) to minutes
# (long CPU generation plus refinement), so the buckets span 10 ms .. 300 s.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# Objective gains are >= 0 (a change is kept only if it raises J); most are small, some large.
GAIN_BUCKETS = (0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

# -- HTTP (app.middleware) ------------------------------------------------------------------------
REQUESTS_TOTAL = Counter(
    "refiner_requests_total", "HTTP requests answered, by route and status.", ["route", "status"]
)
REQUEST_DURATION = Histogram(
    "refiner_request_duration_seconds", "Time to answer an HTTP request.", ["route"], buckets=DURATION_BUCKETS
)
REQUESTS_IN_FLIGHT = Gauge("refiner_requests_in_flight", "HTTP requests being answered now.")

# -- engine (app.engine) --------------------------------------------------------------------------
GENERATION_DURATION = Histogram(
    "refiner_generation_duration_seconds",
    "Wall time of the initial generation of a request (its whole batch's decode).",
    buckets=DURATION_BUCKETS,
)
REFINEMENT_DURATION = Histogram(
    "refiner_refinement_duration_seconds",
    "Wall time of the refinement of a request (its whole batch's refine call), by method.",
    ["method"],
    buckets=DURATION_BUCKETS,
)
GENERATED_TOKENS = Counter(
    "refiner_generated_tokens_total", "Tokens generated (best_of candidates included)."
)
OBJECTIVE_GAIN = Histogram(
    "refiner_objective_gain",
    "objective_after.total - objective_before.total of each refined output, by method.",
    ["method"],
    buckets=GAIN_BUCKETS,
)
ACCEPTED_EDITS = Counter(
    "refiner_accepted_edits_total", "Edits kept by refinement, by method and op.", ["method", "op"]
)
CANDIDATES_SCORED = Counter(
    "refiner_candidates_scored_total", "Candidate outputs scored exactly by the objective."
)
QUEUE_SIZE = Gauge("refiner_queue_size", "Jobs waiting in the engine queue.")
BATCH_SIZE = Histogram("refiner_batch_size", "Jobs per engine batch.", buckets=BATCH_BUCKETS)
REJECTED_REQUESTS = Counter(
    "refiner_rejected_requests_total",
    "Requests refused or abandoned by the engine (queue_full | backlog | timeout | too_costly | memory).",
    ["reason"],
)
MEMORY_LIMIT = Gauge(
    "refiner_memory_limit_bytes",
    "The process memory ceiling (compare with process_resident_memory_bytes); near it new work gets 503.",
)
MODEL_INFO = Gauge(
    "refiner_model_info", "The served model (value is always 1).", ["model_id", "device", "dtype"]
)

# -- upstream generator (app.upstream) ------------------------------------------------------------
UPSTREAM_REQUEST_DURATION = Histogram(
    "refiner_upstream_request_duration_seconds",
    "Time the upstream generator (REFINER_GENERATOR) took to give an initial output (answered requests).",
    buckets=DURATION_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "refiner_upstream_errors_total",
    "Failed requests to the upstream generator, by kind "
    "(unreachable | timeout | status_4xx | status_5xx | malformed).",
    ["kind"],
)
