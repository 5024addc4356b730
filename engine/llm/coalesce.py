"""Request coalescing: identical requests in flight share one model call.

Two requests are identical when they have the same sharing key
(:mod:`engine.llm.keys`: same flow, state, prompt, model, language and
normalised redacted question, and nothing personal). Requests that are not
shareable always make their own call.

In one process, the first request starts the call in its own task and every
identical request that arrives before it finishes awaits the same task (the
call survives the first caller being cancelled). Across server processes,
when a Redis client is given, the process that wins ``SET lock NX PX`` is the
leader: it makes the call, writes the shareable part of the answer to a
result key and publishes it on a channel. The others subscribe, check the
result key (the leader may already be done) and wait for the message up to
``wait_timeout`` seconds; if the leader fails, its lock expires or the answer
is not shareable (it carries entity values), they make the call themselves.
Redis trouble of any kind means "call the model": never a lost turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from engine.llm.base import ModelDecorator, shared_copy
from engine.llm.cache import decode_decision, decode_route, encode_decision, encode_route
from engine.llm.keys import CachePolicy, decide_scope, route_scope
from engine.metrics import Metrics
from engine.models.base import Decision, DecisionRequest, Model, RouteDecision, RouteRequest

__all__ = ["CoalescingModel"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_FAILED = "\x00failed"
_UNSHAREABLE = "\x00unshareable"
_RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) else return 0 end")


class CoalescingModel(ModelDecorator):
    """See the module docstring. ``redis`` is a ``redis.asyncio.Redis`` client or None."""

    def __init__(self, inner: Model, *, decision_model: str, route_model: str,
                 metrics: Metrics | None = None, redis: Any = None,
                 lock_ttl: float = 60.0, wait_timeout: float = 45.0,
                 result_ttl: float = 10.0, route_policy: CachePolicy = "faq",
                 prefix: str = "helpline:inflight:") -> None:
        super().__init__(inner)
        self.decision_model = decision_model
        self.route_model = route_model
        self.metrics = metrics
        self.redis = redis
        self.lock_ttl = lock_ttl
        self.wait_timeout = wait_timeout
        self.result_ttl = result_ttl
        self.route_policy = route_policy
        self.prefix = prefix
        self._inflight: dict[str, asyncio.Task[Any]] = {}
        #: Calls saved: followers in this process and across processes.
        self.saved_local = 0
        self.saved_remote = 0

    # -- the Model interface -----------------------------------------------------

    async def decide(self, request: DecisionRequest) -> Decision:
        scope = decide_scope(request, self.decision_model)
        if not scope.shareable or scope.key is None:
            return await self.inner.decide(request)
        result: Decision = await self._share(
            "d:" + scope.key, scope.producible, lambda: self.inner.decide(request),
            encode_decision, decode_decision)
        return result

    async def route(self, request: RouteRequest) -> RouteDecision:
        scope = route_scope(request, self.route_model, self.route_policy)
        if not scope.shareable or scope.key is None:
            return await self.inner.route(request)
        result: RouteDecision = await self._share(
            "r:" + scope.key, True, lambda: self.inner.route(request),
            encode_route, decode_route)
        return result

    # -- sharing -------------------------------------------------------------------

    def _saved(self, remote: bool) -> None:
        if remote:
            self.saved_remote += 1
        else:
            self.saved_local += 1
        if self.metrics is not None:
            self.metrics.count_coalesced("inflight")

    async def _share(self, key: str, producible: bool, call: Callable[[], Awaitable[T]],
                     encode: Callable[[T], str | None],
                     decode: Callable[[str], T | None]) -> T:
        task = self._inflight.get(key)
        if task is not None:
            result: T = await asyncio.shield(task)
            self._saved(remote=False)
            return _copy(result)
        if not producible:
            # It may follow a leader, but the model must not answer it for others.
            return await call()
        task = asyncio.ensure_future(self._lead(key, call, encode, decode))
        self._inflight[key] = task
        task.add_done_callback(lambda _t: self._forget(key, task))
        return await asyncio.shield(task)

    def _forget(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: a failed call with no waiter left is not an error

    async def _lead(self, key: str, call: Callable[[], Awaitable[T]],
                    encode: Callable[[T], str | None], decode: Callable[[str], T | None]) -> T:
        """This process's call for ``key``: elected across processes when Redis is there."""
        if self.redis is None:
            return await call()
        lock_key = self.prefix + "lock:" + key
        token = uuid.uuid4().hex
        try:
            leader = bool(await self.redis.set(lock_key, token, nx=True,
                                               px=int(self.lock_ttl * 1000)))
        except Exception as exc:
            logger.warning("coalescing: redis lock failed (%s); calling the model", exc)
            return await call()
        if not leader:
            payload = await self._follow(key, lock_key)
            if payload is not None:
                decoded = decode(payload)
                if decoded is not None:
                    self._saved(remote=True)
                    return decoded
            return await call()
        try:
            result = await call()
        except BaseException:
            await self._publish(key, _FAILED)
            await self._release(lock_key, token)
            raise
        await self._publish(key, encode(result) or _UNSHAREABLE)
        await self._release(lock_key, token)
        return result

    async def _publish(self, key: str, payload: str) -> None:
        try:
            await self.redis.set(self.prefix + "result:" + key, payload,
                                 px=int(self.result_ttl * 1000))
            await self.redis.publish(self.prefix + "done:" + key, payload)
        except Exception as exc:
            logger.warning("coalescing: redis publish failed: %s", exc)

    async def _release(self, lock_key: str, token: str) -> None:
        try:
            await self.redis.eval(_RELEASE, 1, lock_key, token)
        except Exception as exc:  # the lock expires by itself
            logger.warning("coalescing: redis unlock failed: %s", exc)

    async def _follow(self, key: str, lock_key: str) -> str | None:
        """Wait for another process's answer; None means "call the model yourself"."""
        result_key = self.prefix + "result:" + key
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.prefix + "done:" + key)
            # Subscribed first, then read: an answer published in between is not missed.
            payload = _text(await self.redis.get(result_key))
            deadline = time.monotonic() + self.wait_timeout
            while payload is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=min(remaining, 0.5))
                if message is not None and message.get("type") == "message":
                    payload = _text(message.get("data"))
                elif not await self.redis.exists(lock_key):
                    # The leader is gone: done (read its answer) or crashed (no answer).
                    payload = _text(await self.redis.get(result_key))
                    if payload is None:
                        return None
        except Exception as exc:
            logger.warning("coalescing: waiting on redis failed (%s); calling the model", exc)
            return None
        finally:
            try:
                await pubsub.unsubscribe()
                await pubsub.aclose()
            except Exception:  # pragma: no cover - best effort
                pass
        if payload in (_FAILED, _UNSHAREABLE):
            return None
        return payload


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _copy(result: T) -> T:
    """What a follower gets: the leader's answer without its per-call fields."""
    if isinstance(result, Decision):
        copied: Any = shared_copy(result)
        return copied  # type: ignore[no-any-return]
    return result
