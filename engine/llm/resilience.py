"""Retries, a circuit breaker, a time budget and the offline fallback.

:class:`ResilientModel` wraps the primary model (Claude, already doing the
SDK's own retries of 408/409/429/5xx/529 and connection errors) and adds:

* a whole-call retry with tenacity (``attempts`` in total, exponential backoff
  with jitter) when the primary is unavailable (:class:`ModelUnavailableError`);
* a :class:`CircuitBreaker`: after ``failure_threshold`` consecutive failures it
  opens and calls go straight to the fallback for ``reset_timeout`` seconds; then
  one probe call is let through (half-open) and its outcome closes or re-opens
  it. The state is exported as ``helpline_circuit_state{model}`` (0/1/2);
* a time budget per call (``asyncio.timeout``) covering queueing, every attempt
  and every backoff sleep, so a turn never hangs on the model;
* the fallback (the offline model): when the primary is unavailable after the
  retries, the breaker is open, the budget ran out, or the answer broke the
  output schema, the call is answered by the fallback and the switch is counted
  (``helpline_model_fallbacks_total{reason}``). The conversation goes on; it is
  never lost and, because the whole call is retried before the turn commits, a
  customer message is never answered twice.

:class:`~engine.llm.errors.ModelBusyError` is neither retried nor answered by
the fallback: it goes up to the runner (busy notice, turn retried later).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from engine.errors import ModelError, ModelOutputError, ModelUnavailableError
from engine.llm.base import FallbackRouteDecision, ModelDecorator
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

__all__ = ["BreakerState", "CircuitBreaker", "ResilientModel"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
BreakerState = Literal["closed", "half_open", "open"]


class CircuitBreaker:
    """Closed -> open after consecutive failures -> half-open probe -> closed or open."""

    def __init__(self, name: str, *, failure_threshold: int = 5, reset_timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        self.name = name
        self.failure_threshold = max(1, failure_threshold)
        self.reset_timeout = reset_timeout
        self.clock = clock
        self.metrics = metrics
        self.state: BreakerState = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.opened = 0  # times it opened
        self._probing = False
        # One upstream failure shared by a batch of callers counts once.
        self._seen: deque[int] = deque(maxlen=64)
        self._set("closed")

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            logger.warning("circuit breaker %s: %s -> %s", self.name, self.state, state)
        self.state = state
        if self.metrics is not None:
            self.metrics.set_circuit_state(self.name, state)

    def allow(self) -> bool:
        """May a call go to the primary now? (In half-open: only one probe at a time.)"""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self.clock() - self.opened_at < self.reset_timeout:
                return False
            self._set("half_open")
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        if self.state != "closed":
            self._set("closed")

    def failure(self, exc: BaseException | None = None) -> None:
        if exc is not None:
            if id(exc) in self._seen:
                return
            self._seen.append(id(exc))
        self._probing = False
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.failure_threshold:
            if self.state != "open":
                self.opened += 1
            self.opened_at = self.clock()
            self._set("open")

    def release(self) -> None:
        """The probe ended without telling anything (e.g. busy): let another one try."""
        self._probing = False


class _BreakerOpen(Exception):
    pass


class ResilientModel(ModelDecorator):
    """See the module docstring."""

    def __init__(self, inner: Model, fallback: Model | None, *,
                 breaker: CircuitBreaker | None = None, attempts: int = 2,
                 wait_initial: float = 0.5, wait_max: float = 4.0, jitter: float = 0.5,
                 budget: float = 45.0, metrics: Metrics | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        super().__init__(inner)
        self.fallback = fallback
        self.breaker = breaker or CircuitBreaker(inner.name, metrics=metrics)
        self.attempts = max(1, attempts)
        self.wait_initial = wait_initial
        self.wait_max = wait_max
        self.jitter = jitter
        self.budget = budget
        self.metrics = metrics
        self.sleep = sleep
        self.fallbacks: dict[str, int] = {}
        self.retries = 0

    async def decide(self, request: DecisionRequest) -> Decision:
        fallback = self.fallback
        return await self._call(
            lambda: self.inner.decide(request),
            (lambda: fallback.decide(request)) if fallback is not None else None)

    async def route(self, request: RouteRequest) -> RouteDecision:
        fallback = self.fallback

        async def by_fallback() -> RouteDecision:
            assert fallback is not None
            d = await fallback.route(request)
            return FallbackRouteDecision(d.flow, d.wants_human, d.confidence, d.satisfaction)

        return await self._call(lambda: self.inner.route(request),
                                by_fallback if fallback is not None else None)

    async def summarise(self, request: SummaryRequest) -> str:
        fallback = self.fallback
        return await self._call(
            lambda: self.inner.summarise(request),
            (lambda: fallback.summarise(request)) if fallback is not None else None)

    async def close(self) -> None:
        await self.inner.close()
        if self.fallback is not None:
            await self.fallback.close()

    # -- the machinery -------------------------------------------------------------

    @staticmethod
    def _retryable(exc: BaseException) -> bool:
        return isinstance(exc, ModelUnavailableError) and not isinstance(exc, ModelBusyError)

    async def _attempts(self, call: Callable[[], Awaitable[T]]) -> T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            # initial x 2^n capped at wait_max, plus uniform jitter in [0, jitter x initial].
            wait=wait_exponential(multiplier=self.wait_initial, max=self.wait_max)
            + wait_random(0, self.jitter * self.wait_initial),
            retry=retry_if_exception(self._retryable),
            sleep=self.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.retries += 1
                    if not self.breaker.allow():
                        raise _BreakerOpen
                try:
                    result = await call()
                except ModelUnavailableError as exc:
                    if not isinstance(exc, ModelBusyError):
                        self.breaker.failure(exc)
                    raise
                except ModelOutputError:
                    self.breaker.success()  # it answered: the service is up
                    raise
                self.breaker.success()
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call(self, call: Callable[[], Awaitable[T]],
                    fallback: Callable[[], Awaitable[T]] | None) -> T:
        if not self.breaker.allow():
            return await self._fall_back(fallback, "breaker_open", None)
        timeout = asyncio.timeout(self.budget)
        try:
            async with timeout:
                return await self._attempts(call)
        except ModelBusyError:
            self.breaker.release()
            raise
        except _BreakerOpen:
            return await self._fall_back(fallback, "breaker_open", None)
        except TimeoutError as exc:
            if not timeout.expired():
                raise
            self.breaker.failure(exc)
            error = ModelUnavailableError(f"{self.inner.name}: no answer within the "
                                          f"{self.budget:g} s budget")
            return await self._fall_back(fallback, "budget", error)
        except ModelOutputError as exc:
            return await self._fall_back(fallback, "output_schema", exc)
        except ModelError as exc:
            return await self._fall_back(fallback, "unavailable", exc)

    async def _fall_back(self, fallback: Callable[[], Awaitable[T]] | None, reason: str,
                         error: ModelError | None) -> T:
        if fallback is None:
            raise error or ModelUnavailableError(f"{self.inner.name}: circuit breaker open")
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.count_fallback(reason)
        logger.warning("model %s: %s (%s); answering with %s", self.inner.name, reason,
                       error, self.fallback.name if self.fallback else "-")
        return await fallback()
