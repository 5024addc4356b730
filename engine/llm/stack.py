"""The production model layer, composed in one place.

From the engine's side inwards::

    ModelStack           owns the layers (stats, close) and the Redis client
    ClassifyingModel     optional: Claude screens restricted content first
    CachingModel         shareable answers from the cache (no slot, no call)
    CoalescingModel      identical requests in flight share one call (Redis across processes)
    ResilientModel       budget, whole-call retries, circuit breaker, offline fallback
    BatchingModel        FAQ questions of a 100 ms window share one call
    LimitedModel         global and per-model concurrency slots, bounded queue
    ClaudeModel          the SDK (its own retries), usage -> MetricsRecorder

Order matters: a cache hit must not wait for a slot; coalesced followers share
the whole resilient outcome (fallback included); retries and the fallback act
per customer request, even when the failed call was a batch; every upstream
call, batched or not, holds exactly one slot.

With the offline model as primary there is nothing to save or protect: the
stack is not used (see :func:`engine.app.make_model`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from engine.config import Settings
from engine.llm.base import ModelDecorator
from engine.llm.batching import BatchingModel, ClaudeBatchCaller
from engine.llm.cache import CacheBackend, CachingModel, MemoryCache, RedisCache
from engine.llm.classifier import ClassifyingModel, ClaudeClassifier
from engine.llm.coalesce import CoalescingModel
from engine.llm.embedder import Embedder, load_embedder
from engine.llm.limits import ConcurrencyLimiter, LimitedModel
from engine.llm.metrics_recorder import MetricsRecorder
from engine.llm.resilience import CircuitBreaker, ResilientModel
from engine.metrics import Metrics
from engine.models.base import Model
from engine.models.claude import ClaudeModel, UsageRecorder

__all__ = ["ModelStack", "build_model_stack", "model_ids"]


def model_ids(model: Model) -> dict[str, str]:
    """Model id per role (decision, route, summary) of a primary model."""
    if isinstance(model, ClaudeModel):
        return {role: model.models.resolve(role) for role in ("decision", "route", "summary")}
    return {role: model.name for role in ("decision", "route", "summary")}


class ModelStack(ModelDecorator):
    """The outermost layer: references to every layer, and the shared Redis client."""

    def __init__(self, inner: Model, *, limiter: ConcurrencyLimiter,
                 resilient: ResilientModel, coalescer: CoalescingModel,
                 cache: CachingModel, batcher: BatchingModel | None = None,
                 classifier: ClaudeClassifier | None = None, redis: Any = None,
                 owns_redis: bool = False) -> None:
        super().__init__(inner)
        self.limiter = limiter
        self.resilient = resilient
        self.breaker = resilient.breaker
        self.coalescer = coalescer
        self.cache = cache
        self.batcher = batcher
        self.classifier = classifier
        self.redis = redis
        self.owns_redis = owns_redis

    def stats(self) -> dict[str, Any]:
        """Counters of every layer (for the benchmark, the CLI and tests)."""
        return {
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "coalesced_local": self.coalescer.saved_local,
            "coalesced_remote": self.coalescer.saved_remote,
            "batch_requests": self.batcher.requests if self.batcher else 0,
            "batch_calls": self.batcher.calls if self.batcher else 0,
            "batched_calls": self.batcher.batched_calls if self.batcher else 0,
            "fallbacks": dict(self.resilient.fallbacks),
            "retries": self.resilient.retries,
            "breaker": self.breaker.state,
            "breaker_opened": self.breaker.opened,
            "busy_rejections": self.limiter.rejected,
            "max_in_flight": self.limiter.max_in_flight,
        }

    async def close(self) -> None:
        try:
            await self.inner.close()
        finally:
            if self.redis is not None and self.owns_redis:
                await self.redis.aclose()


def build_model_stack(settings: Settings, primary: Model, fallback: Model | None,
                      metrics: Metrics | None = None, redis: Any = None, *,
                      embedder: Embedder | None = None,
                      clock: Callable[[], float] = time.monotonic,
                      owns_redis: bool = False) -> ModelStack:
    """Wrap ``primary`` in the production layers configured by ``settings``.

    ``redis`` is a ``redis.asyncio.Redis`` client (cache and cross-process
    coalescing) or None (in-process cache, in-process coalescing only).
    """
    ids = model_ids(primary)
    claude = primary if isinstance(primary, ClaudeModel) else None
    if metrics is not None:
        metrics.register_models(ids.values())
        if claude is not None and type(claude.recorder) is UsageRecorder:
            claude.recorder = MetricsRecorder(metrics)
    limiter = ConcurrencyLimiter(
        global_limit=settings.model_concurrency,
        per_model_limit=settings.model_concurrency_per_model,
        queue_bound=settings.model_queue_bound,
        queue_timeout=settings.model_queue_timeout,
        metrics=metrics,
    )
    model: Model = LimitedModel(primary, limiter, ids)
    batcher: BatchingModel | None = None
    if settings.batch_window_ms > 0:
        batcher = BatchingModel(
            model,
            decision_model=ids["decision"],
            caller=ClaudeBatchCaller(claude) if claude is not None else None,
            limiter=limiter,
            embedder=embedder or load_embedder(settings.embedder,
                                               settings.similarity_threshold),
            window=settings.batch_window_ms / 1000,
            max_batch=settings.batch_max_questions,
            metrics=metrics,
        )
        model = batcher
    breaker = CircuitBreaker(ids["decision"], failure_threshold=settings.breaker_failures,
                             reset_timeout=settings.breaker_reset_seconds, clock=clock,
                             metrics=metrics)
    resilient = ResilientModel(model, fallback, breaker=breaker,
                               attempts=settings.model_attempts,
                               wait_initial=settings.retry_wait_initial,
                               wait_max=settings.retry_wait_max,
                               budget=settings.turn_budget_seconds, metrics=metrics)
    coalescer = CoalescingModel(resilient, decision_model=ids["decision"],
                                route_model=ids["route"], metrics=metrics, redis=redis,
                                lock_ttl=settings.turn_budget_seconds + 15,
                                wait_timeout=settings.turn_budget_seconds,
                                route_policy=settings.route_cache)
    backend: CacheBackend = RedisCache(redis) if redis is not None else \
        MemoryCache(settings.cache_max_entries, clock)
    cache = CachingModel(coalescer, backend, decision_model=ids["decision"],
                         route_model=ids["route"], metrics=metrics,
                         ttls={"faq": settings.cache_ttl_faq,
                               "short": settings.cache_ttl_short},
                         route_policy=settings.route_cache)
    model = cache
    classifier: ClaudeClassifier | None = None
    if settings.content_classifier and claude is not None:
        classifier = ClaudeClassifier(claude, limiter=limiter)
        model = ClassifyingModel(model, classifier)
    return ModelStack(model, limiter=limiter, resilient=resilient, coalescer=coalescer,
                      cache=cache, batcher=batcher, classifier=classifier, redis=redis,
                      owns_redis=owns_redis)
