"""Forwards :class:`~engine.models.claude.ClaudeModel` call records to Prometheus.

``ClaudeModel`` reports every API request (one per attempt the SDK surfaces)
to its ``recorder``; :class:`MetricsRecorder` turns the report into
``claude_api_latency_seconds``, ``claude_tokens_used_total``,
``claude_api_errors_total`` and ``context_length_tokens``.

The role label comes from ``ClaudeModel`` (``decision``, ``route``,
``summary``). Layers that reuse one of those calls for another purpose (a
batched FAQ call, the content classifier) set :func:`role_override` around it,
so their calls are labelled ``batch`` and ``classify``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from engine.metrics import Metrics
from engine.models.claude import UsageRecorder

__all__ = ["MetricsRecorder", "role_override"]

_ROLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("helpline_llm_role",
                                                                   default=None)
#: ClaudeModel's error kinds -> the ErrorType label of claude_api_errors_total.
_ERRORS: Mapping[str, str] = {
    "timeout": "timeout",
    "connection": "connection",
    "rate_limit": "rate_limit",
    "overloaded": "overloaded",
    "server": "server",
    "auth": "auth",
    "bad_request": "bad_request",
    "bad_response": "output_schema",
}


@contextmanager
def role_override(role: str) -> Iterator[None]:
    """Label the Claude calls made inside the block with ``role``."""
    token = _ROLE.set(role)
    try:
        yield
    finally:
        _ROLE.reset(token)


class MetricsRecorder(UsageRecorder):
    """A UsageRecorder that writes to :class:`engine.metrics.Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def record(self, *, model: str, role: str, seconds: float, usage: Mapping[str, int],
               ok: bool, error: str | None = None) -> None:
        role = _ROLE.get() or role
        self.metrics.observe_claude_call(model, role, seconds, ok=ok)
        if ok:
            self.metrics.add_tokens(model, usage)
            context = sum(int(usage.get(k, 0)) for k in ("input", "cache_read",
                                                         "cache_creation"))
            self.metrics.observe_context(role, context)
        else:
            self.metrics.count_error(model, _ERRORS.get(error or "", "other"))
