"""The response cache: answers reused across customers when nothing personal is involved.

:class:`CachingModel` looks a request up before any model work (a hit costs a
dict lookup or one Redis GET, never a concurrency slot) and stores what the
model answered. Which requests qualify, and the key, come from
:mod:`engine.llm.keys`; the policy is the state's ``cache`` field: ``faq``
answers live :data:`DEFAULT_TTLS` ``["faq"]`` (24 h), ``short`` (time-sensitive)
answers 5 min, ``never`` is never stored.

Only the reply, the proposed transition, the reply language and whether the
message was off-topic are stored: never entity values, satisfaction estimates,
requests for a human or the model call's tool id. A decision that carries any
of those, or that the fallback model made, is not stored.

Backends: :class:`MemoryCache` (bounded LRU with TTLs, per process) and
:class:`RedisCache` (``SET key value PX ttl``; shared by every server
process). A Redis failure is a miss, never a failed turn.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from engine.llm.base import FallbackRouteDecision, ModelDecorator
from engine.llm.keys import CachePolicy, decide_scope, route_scope
from engine.metrics import Metrics
from engine.models.base import Decision, DecisionRequest, Model, RouteDecision, RouteRequest

__all__ = [
    "DEFAULT_TTLS",
    "CacheBackend",
    "CachingModel",
    "MemoryCache",
    "RedisCache",
    "decode_decision",
    "decode_route",
    "encode_decision",
    "encode_route",
]

logger = logging.getLogger(__name__)

#: Seconds an answer lives per policy.
DEFAULT_TTLS: Mapping[str, float] = {"faq": 24 * 3600.0, "short": 300.0}


class CacheBackend(Protocol):
    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str, ttl: float) -> None: ...

    async def close(self) -> None: ...


class MemoryCache:
    """An in-process LRU of at most ``max_entries`` values, each with its own TTL."""

    def __init__(self, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def get(self, key: str) -> str | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self.clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: str, ttl: float) -> None:
        if ttl <= 0:
            return
        self._data[key] = (self.clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class RedisCache:
    """Values in Redis under ``prefix + key`` with ``PX`` expiry (shared by processes)."""

    def __init__(self, client: Any, prefix: str = "helpline:cache:") -> None:
        self.client = client
        self.prefix = prefix

    async def get(self, key: str) -> str | None:
        try:
            value = await self.client.get(self.prefix + key)
        except Exception as exc:  # losing Redis costs the cache, not the turn
            logger.warning("response cache: redis GET failed: %s", exc)
            return None
        if value is None:
            return None
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    async def set(self, key: str, value: str, ttl: float) -> None:
        millis = int(ttl * 1000)
        if millis <= 0:
            return
        try:
            await self.client.set(self.prefix + key, value, px=millis)
        except Exception as exc:
            logger.warning("response cache: redis SET failed: %s", exc)

    async def close(self) -> None:
        return None  # the client is shared; the stack closes it


# --------------------------------------------------------------------------- values


def encode_decision(decision: Decision) -> str | None:
    """The shareable part of a decision as JSON, or None if it must not be shared."""
    if decision.entities or decision.wants_human:
        return None
    if not decision.reply and not decision.transition:
        return None
    return json.dumps({"r": decision.reply, "t": decision.transition,
                       "l": decision.language, "m": decision.model,
                       "o": bool(getattr(decision, "off_topic", False))},
                      ensure_ascii=False, separators=(",", ":"))


def decode_decision(value: str) -> Decision | None:
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    reply, transition, language, model = (data.get("r"), data.get("t"), data.get("l"),
                                          data.get("m"))
    if not (reply is None or isinstance(reply, str)) or \
            not (transition is None or isinstance(transition, str)) or \
            language not in (None, "en", "zh", "mixed") or not isinstance(model, str):
        return None
    return Decision(reply=reply, transition=transition, language=language, model=model,
                    source="model", off_topic=data.get("o") is True)


def encode_route(decision: RouteDecision) -> str | None:
    if isinstance(decision, FallbackRouteDecision) or decision.wants_human:
        return None
    return json.dumps({"f": decision.flow, "c": decision.confidence},
                      separators=(",", ":"))


def decode_route(value: str) -> RouteDecision | None:
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    flow, confidence = data.get("f"), data.get("c")
    if not (flow is None or isinstance(flow, str)) or \
            isinstance(confidence, bool) or not isinstance(confidence, int | float):
        return None
    return RouteDecision(flow, False, float(confidence))


# --------------------------------------------------------------------------- model


class CachingModel(ModelDecorator):
    """Serve and store shareable answers; see the module docstring.

    ``decision_model``/``route_model`` are the model ids that go into the keys and
    the only ``Decision.model`` values that are stored (a fallback answer is not).
    """

    def __init__(self, inner: Model, backend: CacheBackend, *, decision_model: str,
                 route_model: str, metrics: Metrics | None = None,
                 ttls: Mapping[str, float] = DEFAULT_TTLS,
                 route_policy: CachePolicy = "faq") -> None:
        super().__init__(inner)
        self.backend = backend
        self.decision_model = decision_model
        self.route_model = route_model
        self.metrics = metrics
        self.ttls = dict(ttls)
        self.route_policy = route_policy
        self.hits = 0
        self.misses = 0

    def _count(self, hit: bool, policy: str) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        if self.metrics is not None:
            self.metrics.count_cache(hit=hit, policy=policy)

    async def decide(self, request: DecisionRequest) -> Decision:
        scope = decide_scope(request, self.decision_model)
        if not scope.shareable or scope.key is None:
            self._count(False, "never")
            return await self.inner.decide(request)
        value = await self.backend.get("d:" + scope.key)
        cached = decode_decision(value) if value is not None else None
        if cached is not None:
            self._count(True, scope.policy)
            return cached
        self._count(False, scope.policy)
        decision = await self.inner.decide(request)
        if scope.producible and decision.model == self.decision_model:
            encoded = encode_decision(decision)
            if encoded is not None:
                await self.backend.set("d:" + scope.key, encoded,
                                       self.ttls.get(scope.policy, 0.0))
        return decision

    async def route(self, request: RouteRequest) -> RouteDecision:
        scope = route_scope(request, self.route_model, self.route_policy)
        if not scope.shareable or scope.key is None:
            return await self.inner.route(request)
        value = await self.backend.get("r:" + scope.key)
        cached = decode_route(value) if value is not None else None
        self._count(cached is not None, scope.policy)
        if cached is not None:
            return cached
        decision = await self.inner.route(request)
        encoded = encode_route(decision)
        if encoded is not None:
            await self.backend.set("r:" + scope.key, encoded, self.ttls.get(scope.policy, 0.0))
        return decision

    async def close(self) -> None:
        await self.backend.close()
        await self.inner.close()
