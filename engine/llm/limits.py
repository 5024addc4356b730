"""Concurrency limits on model calls: global and per model, with a bounded queue.

:class:`ConcurrencyLimiter` hands out slots: at most ``global_limit`` model calls
in flight in this process, and at most ``per_model_limit`` for any one model id
(so a slow summary model cannot starve decisions). A call that finds no free
slot waits in line; the time it waited is recorded
(``helpline_model_queue_seconds``). The line is bounded: when ``queue_bound``
calls are already waiting, or a call has waited ``queue_timeout`` seconds, it
raises :class:`~engine.llm.errors.ModelBusyError` (counted in
``helpline_model_busy_rejections_total``), and the runner tells the customer it
is busy and retries the turn, instead of letting the queue grow without bound.

:class:`LimitedModel` takes one slot per call (each attempt of a retried call
takes its own slot, so backoff sleeps hold none).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TypeVar

from engine.llm.base import ModelDecorator
from engine.llm.errors import ModelBusyError
from engine.metrics import Metrics
from engine.models.base import (
    Decision,
    DecisionRequest,
    Model,
    RouteDecision,
    RouteRequest,
    SummaryRequest,
)

__all__ = ["ConcurrencyLimiter", "LimitedModel"]

T = TypeVar("T")


class ConcurrencyLimiter:
    """Slots for model calls; see the module docstring."""

    def __init__(self, *, global_limit: int = 16, per_model_limit: int = 8,
                 queue_bound: int = 64, queue_timeout: float = 10.0,
                 metrics: Metrics | None = None) -> None:
        if global_limit < 1 or per_model_limit < 1:
            raise ValueError("concurrency limits must be at least 1")
        self.global_limit = global_limit
        self.per_model_limit = per_model_limit
        self.queue_bound = max(0, queue_bound)
        self.queue_timeout = queue_timeout
        self.metrics = metrics
        self._global = asyncio.Semaphore(global_limit)
        self._per_model: dict[str, asyncio.Semaphore] = {}
        self.waiting = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.rejected = 0

    def _model_semaphore(self, model: str) -> asyncio.Semaphore:
        semaphore = self._per_model.get(model)
        if semaphore is None:
            semaphore = self._per_model[model] = asyncio.Semaphore(self.per_model_limit)
        return semaphore

    def _reject(self, model: str, reason: str) -> ModelBusyError:
        self.rejected += 1
        if self.metrics is not None:
            self.metrics.count_busy_rejection()
        return ModelBusyError(model, reason)

    @asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[None]:
        """Hold one slot for ``model`` for the duration of the block."""
        per_model = self._model_semaphore(model)
        free = not self._global.locked() and not per_model.locked()
        if not free and self.waiting >= self.queue_bound:
            raise self._reject(model, f"{self.waiting} calls already waiting for a slot")
        started = time.perf_counter()
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await per_model.acquire()
                try:
                    await self._global.acquire()
                except BaseException:
                    per_model.release()
                    raise
        except TimeoutError:
            raise self._reject(model, f"no slot within {self.queue_timeout:g} s") from None
        finally:
            self.waiting -= 1
        if self.metrics is not None:
            self.metrics.observe_model_queue(time.perf_counter() - started)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.metrics is not None:
                with self.metrics.model_slot():
                    yield
            else:
                yield
        finally:
            self.in_flight -= 1
            self._global.release()
            per_model.release()

    async def run(self, model: str, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()`` while holding a slot for ``model``."""
        async with self.slot(model):
            return await call()


class LimitedModel(ModelDecorator):
    """Every call of ``inner`` holds a slot of ``limiter`` (per role's model id)."""

    def __init__(self, inner: Model, limiter: ConcurrencyLimiter,
                 model_ids: Mapping[str, str] | None = None) -> None:
        super().__init__(inner)
        self.limiter = limiter
        self.model_ids = dict(model_ids or {})

    def model_id(self, role: str) -> str:
        return self.model_ids.get(role, self.inner.name)

    async def decide(self, request: DecisionRequest) -> Decision:
        async with self.limiter.slot(self.model_id("decision")):
            return await self.inner.decide(request)

    async def route(self, request: RouteRequest) -> RouteDecision:
        async with self.limiter.slot(self.model_id("route")):
            return await self.inner.route(request)

    async def summarise(self, request: SummaryRequest) -> str:
        async with self.limiter.slot(self.model_id("summary")):
            return await self.inner.summarise(request)
