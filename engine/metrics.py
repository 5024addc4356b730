"""Prometheus metrics for Helpline.

One :class:`Metrics` object owns every metric family in its own
:class:`~prometheus_client.CollectorRegistry` (never the process-global default
registry), so tests and several engines in one process do not collide.

Label values only ever come from closed sets. Every helper maps a value outside
its set to ``"other"``; model ids and flow names join their sets only through
:meth:`Metrics.register_models` and :meth:`Metrics.register_flows` at startup.
No customer text, conversation id or user id can become a label value, which
keeps the series count bounded and the exposition free of personal data.

Multi-process servers (gunicorn/uvicorn workers) set ``PROMETHEUS_MULTIPROC_DIR``
to an empty, writable directory in the environment *before* the process starts.
Each worker then writes its values to memory-mapped files there and
:meth:`Metrics.render_latest` aggregates all workers with
:class:`~prometheus_client.multiprocess.MultiProcessCollector`. Call
:func:`mark_process_dead` for a worker that exited (gunicorn ``child_exit``)
so its live gauges disappear.

Every family is described in ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Literal, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    values,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead

from engine.errors import ConfigError, ModelOutputError

__all__ = [
    "CACHE_POLICIES",
    "CACHE_RESULTS",
    "CALL_OUTCOMES",
    "CHANNELS",
    "CIRCUIT_STATES",
    "COALESCE_KINDS",
    "ERROR_TYPES",
    "FALLBACK_REASONS",
    "FAMILIES",
    "HANDOFF_REASONS",
    "LABEL_SETS",
    "MULTIPROC_ENV",
    "NO_FLOW",
    "OTHER",
    "RATINGS",
    "REGISTERED_LABELS",
    "ROLES",
    "SUMMARY_OUTCOMES",
    "TOKEN_KINDS",
    "TURN_OUTCOMES",
    "CachePolicy",
    "CacheResult",
    "CallOutcome",
    "Channel",
    "CircuitState",
    "CoalesceKind",
    "ErrorType",
    "FallbackReason",
    "FamilySpec",
    "HandoffReason",
    "Metrics",
    "Role",
    "SummaryOutcome",
    "TokenKind",
    "TurnOutcome",
    "classify_error",
    "mark_process_dead",
    "series_names",
]

log = logging.getLogger(__name__)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
OTHER: Final = "other"
NO_FLOW: Final = "none"

# ---------------------------------------------------------------------------
# Closed label sets. A value outside its set is recorded as "other".

Role = Literal["decision", "summary", "classify", "route", "batch"]
CallOutcome = Literal["ok", "error"]
TokenKind = Literal["input", "output", "cache_read", "cache_creation"]
ErrorType = Literal[
    "rate_limit",
    "overloaded",
    "timeout",
    "connection",
    "server",
    "bad_request",
    "auth",
    "output_schema",
    "other",
]
Channel = Literal["web", "slack", "telegram", "cli", "other"]
TurnOutcome = Literal["replied", "handoff", "muted", "duplicate", "error", "busy"]
HandoffReason = Literal["request", "satisfaction", "failures", "policy", "timeout", "error"]
CacheResult = Literal["hit", "miss"]
CachePolicy = Literal["faq", "short", "never"]
CoalesceKind = Literal["inflight", "batch"]
FallbackReason = Literal["unavailable", "breaker_open", "output_schema", "budget"]
SummaryOutcome = Literal["ok", "error"]
CircuitState = Literal["closed", "half_open", "open"]


def _closed(values_: Iterable[str]) -> frozenset[str]:
    return frozenset(values_) | {OTHER}


ROLES: Final = _closed(get_args(Role))
CALL_OUTCOMES: Final = frozenset(get_args(CallOutcome))
# Token kinds come from the keys of the API's usage object; unknown keys are
# ignored rather than counted as "other" (they are not token counts).
TOKEN_KINDS: Final = frozenset(get_args(TokenKind))
ERROR_TYPES: Final = frozenset(get_args(ErrorType))
CHANNELS: Final = frozenset(get_args(Channel))
TURN_OUTCOMES: Final = _closed(get_args(TurnOutcome))
HANDOFF_REASONS: Final = _closed(get_args(HandoffReason))
CACHE_RESULTS: Final = frozenset(get_args(CacheResult))
CACHE_POLICIES: Final = _closed(get_args(CachePolicy))
COALESCE_KINDS: Final = _closed(get_args(CoalesceKind))
FALLBACK_REASONS: Final = _closed(get_args(FallbackReason))
SUMMARY_OUTCOMES: Final = frozenset(get_args(SummaryOutcome))
RATINGS: Final = _closed(("1", "2", "3", "4", "5"))
CIRCUIT_STATES: Final[Mapping[str, int]] = {"closed": 0, "half_open": 1, "open": 2}

# Keys of an Anthropic ``usage`` object (and the short kind names) -> kind label.
_USAGE_KEYS: Final[Mapping[str, TokenKind]] = {
    "input_tokens": "input",
    "output_tokens": "output",
    "cache_read_input_tokens": "cache_read",
    "cache_creation_input_tokens": "cache_creation",
    "input": "input",
    "output": "output",
    "cache_read": "cache_read",
    "cache_creation": "cache_creation",
}

# Registered model ids and flow names must look like identifiers, not prose.
_SAFE_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,79}$")
MAX_MODELS: Final = 32
MAX_FLOWS: Final = 256

# ---------------------------------------------------------------------------
# Family table: the single source of truth for names, types, labels, buckets.

LATENCY_BUCKETS: Final = (
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
CONTEXT_BUCKETS: Final = (
    256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
    65536.0, 100_000.0, 131_072.0, 200_000.0,
)  # fmt: skip
TURN_BUCKETS: Final = (
    0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
QUEUE_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
SATISFACTION_BUCKETS: Final = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)

FamilyType = Literal["counter", "gauge", "histogram"]
GaugeMode = Literal["livesum", "livemax", "max", "sum", "min", "livemin", "all", "liveall"]


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """One metric family. ``name`` is the family name (a counter without ``_total``)."""

    name: str
    type: FamilyType
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    multiprocess_mode: GaugeMode = "livesum"


FAMILIES: Final[tuple[FamilySpec, ...]] = (
    FamilySpec(
        "claude_api_latency_seconds",
        "histogram",
        "Wall time of one Claude API request (one attempt), by model, role and outcome.",
        ("model", "role", "outcome"),
        LATENCY_BUCKETS,
    ),
    FamilySpec(
        "claude_tokens_used",
        "counter",
        "Tokens reported by the Claude API usage object, by model and kind.",
        ("model", "kind"),
    ),
    FamilySpec(
        "claude_api_errors",
        "counter",
        "Failed Claude API requests (one per attempt), by model and error type.",
        ("model", "type"),
    ),
    FamilySpec(
        "context_length_tokens",
        "histogram",
        "Input tokens sent with one model call, by role.",
        ("role",),
        CONTEXT_BUCKETS,
    ),
    FamilySpec(
        "helpline_turns",
        "counter",
        "Customer turns handled, by flow, channel and outcome.",
        ("flow", "channel", "outcome"),
    ),
    FamilySpec(
        "helpline_turn_duration_seconds",
        "histogram",
        "Time from receiving a customer message to the reply being ready, by channel.",
        ("channel",),
        TURN_BUCKETS,
    ),
    FamilySpec(
        "helpline_handoffs",
        "counter",
        "Conversations handed to a human agent, by reason.",
        ("reason",),
    ),
    FamilySpec(
        "helpline_handoff_queue_waiting",
        "gauge",
        "Conversations waiting for a human agent.",
        multiprocess_mode="livemax",
    ),
    FamilySpec(
        "helpline_handoff_oldest_wait_seconds",
        "gauge",
        "Seconds the longest-waiting handed-off conversation has waited (0 if none).",
        multiprocess_mode="livemax",
    ),
    FamilySpec(
        "helpline_satisfaction_ratings",
        "counter",
        "Satisfaction ratings given by customers, by rating 1..5.",
        ("rating",),
    ),
    FamilySpec(
        "helpline_satisfaction_estimate",
        "histogram",
        "Satisfaction estimated by the model per conversation, 1..5.",
        buckets=SATISFACTION_BUCKETS,
    ),
    FamilySpec(
        "helpline_cache_requests",
        "counter",
        "Reply-cache lookups, by result and cache policy.",
        ("result", "policy"),
    ),
    FamilySpec(
        "helpline_coalesced_calls",
        "counter",
        "Model calls saved by coalescing identical in-flight requests or batching.",
        ("kind",),
    ),
    FamilySpec(
        "helpline_model_queue_seconds",
        "histogram",
        "Time a model call waited for a concurrency slot.",
        buckets=QUEUE_BUCKETS,
    ),
    FamilySpec(
        "helpline_model_inflight",
        "gauge",
        "Model calls currently holding a concurrency slot.",
        multiprocess_mode="livesum",
    ),
    FamilySpec(
        "helpline_model_busy_rejections",
        "counter",
        "Model calls rejected because no concurrency slot became free in time.",
    ),
    FamilySpec(
        "helpline_model_fallbacks",
        "counter",
        "Turns answered by the fallback model instead of the primary, by reason.",
        ("reason",),
    ),
    FamilySpec(
        "helpline_memory_mismatches",
        "counter",
        "Pinned-entity mismatches detected by the conversation-memory check.",
    ),
    FamilySpec(
        "helpline_summaries",
        "counter",
        "Conversation summaries produced, by outcome.",
        ("outcome",),
    ),
    FamilySpec(
        "helpline_circuit_state",
        "gauge",
        "Circuit breaker state per model: 0 closed, 1 half-open, 2 open.",
        ("model",),
        multiprocess_mode="livemax",
    ),
)

# Closed label sets per (family, label). ``model`` and ``flow`` are open only to
# the names registered at startup (plus "other", and "none" for flow).
LABEL_SETS: Final[Mapping[tuple[str, str], frozenset[str]]] = {
    ("claude_api_latency_seconds", "role"): ROLES,
    ("claude_api_latency_seconds", "outcome"): CALL_OUTCOMES,
    ("claude_tokens_used", "kind"): TOKEN_KINDS,
    ("claude_api_errors", "type"): ERROR_TYPES,
    ("context_length_tokens", "role"): ROLES,
    ("helpline_turns", "channel"): CHANNELS,
    ("helpline_turns", "outcome"): TURN_OUTCOMES,
    ("helpline_turn_duration_seconds", "channel"): CHANNELS,
    ("helpline_handoffs", "reason"): HANDOFF_REASONS,
    ("helpline_satisfaction_ratings", "rating"): RATINGS,
    ("helpline_cache_requests", "result"): CACHE_RESULTS,
    ("helpline_cache_requests", "policy"): CACHE_POLICIES,
    ("helpline_coalesced_calls", "kind"): COALESCE_KINDS,
    ("helpline_model_fallbacks", "reason"): FALLBACK_REASONS,
    ("helpline_summaries", "outcome"): SUMMARY_OUTCOMES,
}
REGISTERED_LABELS: Final = frozenset({"model", "flow"})

_SUFFIXES: Final[Mapping[str, tuple[str, ...]]] = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def series_names(specs: Iterable[FamilySpec] = FAMILIES) -> frozenset[str]:
    """Every sample name the families can expose (``_total``, ``_bucket``...)."""
    return frozenset(s.name + suffix for s in specs for suffix in _SUFFIXES[s.type])


def _pick(value: object, allowed: frozenset[str]) -> str:
    """``value`` if it is in ``allowed``, else ``"other"``."""
    if isinstance(value, str) and value in allowed:
        return value
    return OTHER


def _amount(value: object) -> float | None:
    """A finite, non-negative number or None (bools and junk are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")) or number < 0:
        return None
    return number


def classify_error(exc: BaseException) -> ErrorType:
    """Map an exception from a model call to an ``ErrorType`` label value.

    Works by HTTP status and class name so this module needs no SDK import:
    Anthropic's ``RateLimitError`` (429), ``OverloadedError``/529,
    ``APITimeoutError``, ``APIConnectionError``, 5xx, 400/404/413/422, 401/403,
    and Helpline's :class:`~engine.errors.ModelOutputError`. An exception that
    maps to ``"other"`` is classified by its ``__cause__`` (a wrapper such as
    :class:`~engine.errors.ModelUnavailableError` raised ``from`` the SDK error).
    """
    kind = _classify_one(exc)
    seen = {id(exc)}
    cause = exc.__cause__
    while kind == "other" and cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        kind = _classify_one(cause)
        cause = cause.__cause__
    return kind


def _classify_one(exc: BaseException) -> ErrorType:
    if isinstance(exc, ModelOutputError):
        return "output_schema"
    names = {cls.__name__ for cls in type(exc).__mro__}
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
    if "RateLimitError" in names or status == 429:
        return "rate_limit"
    if "OverloadedError" in names or status == 529:
        return "overloaded"
    if isinstance(exc, TimeoutError) or any("Timeout" in n for n in names):
        return "timeout"
    if isinstance(exc, ConnectionError) or any("Connection" in n for n in names):
        return "connection"
    if isinstance(status, int):
        if status >= 500:
            return "server"
        if status in (401, 403) or "AuthenticationError" in names:
            return "auth"
        if 400 <= status < 500:
            return "bad_request"
    if "AuthenticationError" in names or "PermissionDeniedError" in names:
        return "auth"
    if "BadRequestError" in names or "UnprocessableEntityError" in names:
        return "bad_request"
    if "InternalServerError" in names:
        return "server"
    return "other"


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Drop the live gauges of an exited worker (multi-process mode only).

    Call it from gunicorn's ``child_exit`` hook. A no-op when
    ``PROMETHEUS_MULTIPROC_DIR`` is not set and no ``path`` is given.
    """
    directory = path or os.environ.get(MULTIPROC_ENV)
    if directory:
        _mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


class Metrics:
    """All Helpline metric families in one private registry.

    ``multiprocess_dir`` defaults to ``$PROMETHEUS_MULTIPROC_DIR``; pass ``""``
    to force single-process mode. Multi-process mode needs the variable set
    before ``prometheus_client`` is imported (i.e. in the process environment).
    """

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        if multiprocess_dir is None:
            multiprocess_dir = os.environ.get(MULTIPROC_ENV, "")
        directory = multiprocess_dir
        self.multiprocess_dir: str | None = directory or None
        if self.multiprocess_dir is not None:
            _check_multiprocess(self.multiprocess_dir)
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._models: frozenset[str] = frozenset({OTHER})
        self._flows: frozenset[str] = frozenset({NO_FLOW, OTHER})
        self._inflight = 0

        reg = self.registry
        spec = {s.name: s for s in FAMILIES}

        def histogram(name: str) -> Histogram:
            s = spec[name]
            return Histogram(s.name, s.help, s.labels, registry=reg, buckets=s.buckets)

        def counter(name: str) -> Counter:
            s = spec[name]
            return Counter(s.name, s.help, s.labels, registry=reg)

        def gauge(name: str) -> Gauge:
            s = spec[name]
            return Gauge(
                s.name, s.help, s.labels, registry=reg, multiprocess_mode=s.multiprocess_mode
            )

        self.claude_latency = histogram("claude_api_latency_seconds")
        self.claude_tokens = counter("claude_tokens_used")
        self.claude_errors = counter("claude_api_errors")
        self.context_length = histogram("context_length_tokens")
        self.turns = counter("helpline_turns")
        self.turn_duration = histogram("helpline_turn_duration_seconds")
        self.handoffs = counter("helpline_handoffs")
        self.handoff_waiting = gauge("helpline_handoff_queue_waiting")
        self.handoff_oldest_wait = gauge("helpline_handoff_oldest_wait_seconds")
        self.satisfaction_ratings = counter("helpline_satisfaction_ratings")
        self.satisfaction_estimate = histogram("helpline_satisfaction_estimate")
        self.cache_requests = counter("helpline_cache_requests")
        self.coalesced = counter("helpline_coalesced_calls")
        self.model_queue = histogram("helpline_model_queue_seconds")
        self.model_inflight = gauge("helpline_model_inflight")
        self.busy_rejections = counter("helpline_model_busy_rejections")
        self.fallbacks = counter("helpline_model_fallbacks")
        self.memory_mismatches = counter("helpline_memory_mismatches")
        self.summaries = counter("helpline_summaries")
        self.circuit_state = gauge("helpline_circuit_state")
        self._prime_static()

    # -- closed sets registered at startup --------------------------------

    @property
    def models(self) -> frozenset[str]:
        """Model label values currently accepted (always includes ``"other"``)."""
        return self._models

    @property
    def flows(self) -> frozenset[str]:
        """Flow label values currently accepted (includes ``"none"`` and ``"other"``)."""
        return self._flows

    def register_models(self, ids: Iterable[str]) -> None:
        """Accept these configured model ids/aliases as ``model`` label values.

        Names that do not look like identifiers, or beyond ``MAX_MODELS``, are
        skipped with a warning (their calls are recorded as ``"other"``).
        """
        with self._lock:
            added = self._register(ids, self._models, MAX_MODELS, "model")
            self._models = self._models | added
        for model in sorted(added):
            self._prime_model(model)

    def register_flows(self, names: Iterable[str]) -> None:
        """Accept these loaded flow names as ``flow`` label values."""
        with self._lock:
            added = self._register(names, self._flows, MAX_FLOWS, "flow")
            self._flows = self._flows | added

    @staticmethod
    def _register(
        names: Iterable[str], current: frozenset[str], limit: int, what: str
    ) -> frozenset[str]:
        added: set[str] = set()
        for name in names:
            if name in current or name in added:
                continue
            if not isinstance(name, str) or not _SAFE_NAME.match(name):
                log.warning("metrics: %s name %r is not a safe label value; skipped", what, name)
                continue
            if len(current - {OTHER, NO_FLOW}) + len(added) >= limit:
                log.warning("metrics: more than %d %s names; %r skipped", limit, what, name)
                continue
            added.add(name)
        return frozenset(added)

    def _model(self, model: object) -> str:
        return _pick(model, self._models)

    def _flow(self, flow: object) -> str:
        if flow is None:
            return NO_FLOW
        return _pick(flow, self._flows)

    def _prime_static(self) -> None:
        """Create the small fixed label combinations so rate() sees zeros."""
        for reason in HANDOFF_REASONS - {OTHER}:
            self.handoffs.labels(reason=reason)
        for rating in RATINGS - {OTHER}:
            self.satisfaction_ratings.labels(rating=rating)
        for result in CACHE_RESULTS:
            for policy in CACHE_POLICIES - {OTHER}:
                self.cache_requests.labels(result=result, policy=policy)
        for kind in COALESCE_KINDS - {OTHER}:
            self.coalesced.labels(kind=kind)
        for reason in FALLBACK_REASONS - {OTHER}:
            self.fallbacks.labels(reason=reason)
        for outcome in SUMMARY_OUTCOMES:
            self.summaries.labels(outcome=outcome)

    def _prime_model(self, model: str) -> None:
        for kind in TOKEN_KINDS:
            self.claude_tokens.labels(model=model, kind=kind)
        for error_type in ERROR_TYPES:
            self.claude_errors.labels(model=model, type=error_type)
        self.circuit_state.labels(model=model).set(0)

    # -- Claude API ---------------------------------------------------------

    def observe_claude_call(self, model: str, role: str, seconds: float, *, ok: bool) -> None:
        """Record one API request (one attempt, retries count again)."""
        amount = _amount(seconds)
        if amount is None:
            return
        self.claude_latency.labels(
            model=self._model(model), role=_pick(role, ROLES), outcome="ok" if ok else "error"
        ).observe(amount)

    def count_error(self, model: str, kind: str) -> None:
        """Count one failed API request; ``kind`` is an ``ErrorType``."""
        self.claude_errors.labels(model=self._model(model), type=_pick(kind, ERROR_TYPES)).inc()

    @contextmanager
    def claude_call(self, model: str, role: str) -> Iterator[None]:
        """Time a request; on exception record ``outcome="error"`` and its error type."""
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:  # cancellation (BaseException) is not a failed call
            self.observe_claude_call(model, role, time.perf_counter() - start, ok=False)
            self.count_error(model, classify_error(exc))
            raise
        self.observe_claude_call(model, role, time.perf_counter() - start, ok=True)

    def add_tokens(self, model: str, usage: object) -> None:
        """Count the tokens of one response.

        ``usage`` is the API's usage object or a mapping with keys
        ``input_tokens``, ``output_tokens``, ``cache_read_input_tokens``,
        ``cache_creation_input_tokens`` (or the short kind names). Missing,
        ``None``, negative and unknown entries are ignored.
        """
        label = self._model(model)
        items: Iterable[tuple[str, object]]
        if isinstance(usage, Mapping):
            items = ((str(k), v) for k, v in usage.items())
        else:
            items = ((key, getattr(usage, key, None)) for key in _USAGE_KEYS)
        totals: dict[str, float] = {}
        for key, value in items:
            kind = _USAGE_KEYS.get(key)
            amount = _amount(value)
            if kind is None or amount is None:
                continue
            totals[kind] = totals.get(kind, 0.0) + amount
        for token_kind, total in totals.items():
            if total:
                self.claude_tokens.labels(model=label, kind=token_kind).inc(total)

    def observe_context(self, role: str, tokens: int) -> None:
        """Record the input size (tokens) of one model call."""
        amount = _amount(tokens)
        if amount is not None:
            self.context_length.labels(role=_pick(role, ROLES)).observe(amount)

    def set_circuit_state(self, model: str, state: CircuitState | int) -> None:
        """Set a model's breaker state: ``closed``/``half_open``/``open`` or 0/1/2."""
        value = CIRCUIT_STATES.get(state, -1) if isinstance(state, str) else state
        if value not in (0, 1, 2):
            raise ValueError(f"circuit state must be closed, half_open, open or 0..2: {state!r}")
        self.circuit_state.labels(model=self._model(model)).set(value)

    # -- turns and conversations ------------------------------------------------

    def count_turn(
        self, flow: str | None, channel: str, outcome: str, *, seconds: float | None = None
    ) -> None:
        """Count one customer turn; ``seconds`` also records its duration."""
        chan = _pick(channel, CHANNELS)
        self.turns.labels(
            flow=self._flow(flow), channel=chan, outcome=_pick(outcome, TURN_OUTCOMES)
        ).inc()
        if seconds is not None:
            self.observe_turn_duration(chan, seconds)

    def observe_turn_duration(self, channel: str, seconds: float) -> None:
        amount = _amount(seconds)
        if amount is not None:
            self.turn_duration.labels(channel=_pick(channel, CHANNELS)).observe(amount)

    def count_handoff(self, reason: str) -> None:
        self.handoffs.labels(reason=_pick(reason, HANDOFF_REASONS)).inc()

    def set_handoff_queue(self, waiting: int, oldest_wait_seconds: float) -> None:
        """Publish the handoff queue size and the oldest wait (0 when empty)."""
        count = _amount(waiting) or 0.0
        oldest = (_amount(oldest_wait_seconds) or 0.0) if count else 0.0
        self.handoff_waiting.set(count)
        self.handoff_oldest_wait.set(oldest)

    def count_satisfaction(self, rating: int | str) -> None:
        """Count a customer rating 1..5 (anything else counts as ``"other"``)."""
        text = str(rating) if isinstance(rating, int) and not isinstance(rating, bool) else rating
        self.satisfaction_ratings.labels(rating=_pick(text, RATINGS)).inc()

    def observe_satisfaction_estimate(self, value: float) -> None:
        """Record a model-estimated satisfaction; clamped to 1..5."""
        amount = _amount(value)
        if amount is not None:
            self.satisfaction_estimate.observe(min(5.0, max(1.0, amount)))

    def count_memory_mismatch(self) -> None:
        self.memory_mismatches.inc()

    def count_summary(self, *, ok: bool) -> None:
        self.summaries.labels(outcome="ok" if ok else "error").inc()

    # -- cache, coalescing, concurrency, fallbacks ------------------------------

    def count_cache(self, *, hit: bool, policy: str) -> None:
        self.cache_requests.labels(
            result="hit" if hit else "miss", policy=_pick(policy, CACHE_POLICIES)
        ).inc()

    def count_coalesced(self, kind: str, calls: int = 1) -> None:
        """Count ``calls`` model calls saved by ``inflight`` sharing or ``batch``ing."""
        amount = _amount(calls)
        if amount:
            self.coalesced.labels(kind=_pick(kind, COALESCE_KINDS)).inc(amount)

    def observe_model_queue(self, seconds: float) -> None:
        amount = _amount(seconds)
        if amount is not None:
            self.model_queue.observe(amount)

    def set_model_inflight(self, count: int) -> None:
        with self._lock:
            self._inflight = max(0, int(count))
            self.model_inflight.set(self._inflight)

    @contextmanager
    def model_slot(self) -> Iterator[None]:
        """Mark one model call in flight for the duration of the block."""
        with self._lock:
            self._inflight += 1
            self.model_inflight.set(self._inflight)
        try:
            yield
        finally:
            with self._lock:
                self._inflight = max(0, self._inflight - 1)
                self.model_inflight.set(self._inflight)

    def count_busy_rejection(self) -> None:
        self.busy_rejections.inc()

    def count_fallback(self, reason: str) -> None:
        self.fallbacks.labels(reason=_pick(reason, FALLBACK_REASONS)).inc()

    # -- exposition -------------------------------------------------------------

    def families(self) -> dict[str, str]:
        """Family name -> Prometheus type, read from this object's registry."""
        return {m.name: m.type for m in self.registry.collect()}

    def series_names(self) -> frozenset[str]:
        """Every sample name this registry can expose (from :meth:`families`)."""
        return frozenset(
            name + suffix
            for name, kind in self.families().items()
            for suffix in _SUFFIXES.get(kind, ("",))
        )

    def render_latest(self, accept: str | None = None) -> tuple[bytes, str]:
        """Exposition payload and its content type for a ``/metrics`` response.

        In multi-process mode the payload aggregates every worker's files.
        ``accept`` is the request's Accept header (OpenMetrics is negotiated).
        """
        registry = self.registry
        if self.multiprocess_dir is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type


def _check_multiprocess(directory: str) -> None:
    if not os.path.isdir(directory):
        raise ConfigError(f"{MULTIPROC_ENV}={directory!r} is not an existing directory; create it")
    if not getattr(values.ValueClass, "_multiprocess", False):
        raise ConfigError(
            f"{MULTIPROC_ENV} must be set in the environment before prometheus_client is "
            "imported (set it for the server process, not at run time)"
        )
    if os.path.realpath(os.environ.get(MULTIPROC_ENV, "")) != os.path.realpath(directory):
        raise ConfigError(
            f"multiprocess_dir {directory!r} differs from {MULTIPROC_ENV}; prometheus_client "
            f"writes to {MULTIPROC_ENV}, so pass the same directory or none"
        )
