"""The event bus: committed changes, told to every server process.

One process only sees its own commits through :meth:`Engine.subscribe
<engine.runner.Engine.subscribe>`. With several server processes behind a load
balancer, an agent whose console socket lives in process A must also learn
about the handoffs and customer messages process B committed. The bus carries
that news between processes::

    process B: commit -> Engine.publish -> bus_publisher -> RedisBus.publish
                                                              │ PUBLISH helpline:events
    process A: RedisBus reader <────────────────────────────────┘
               -> ConsoleHub.on_remote -> reload from the store -> agent sockets

Design:

* :class:`BusEvent` is small and carries **no customer text**: what happened
  (``kind`` turn | handoff | desk, ``action``), to which conversation, who owns
  it now, the acting agent, the handoff reason, when, and the range of message
  sequence numbers the commit added (``seq_before < seq <= seq``). A receiver
  that needs more (the transcript, the customer's words) reloads it from the
  store, which stays the only source of truth. Payloads are JSON.
* Every event carries the ``origin`` of the bus that published it (a process
  id: host, pid and a random part). Subscribers get every event, local and
  remote; a subscriber that already has the rich local event (the agent
  console does, through ``Engine.subscribe``) compares ``event.origin`` with
  ``bus.origin`` and skips its own. :class:`RedisBus` delivers local events
  in-process and drops its own echoes coming back from Redis.
* :class:`LocalBus` is the single-process bus (what ``Engine.subscribe``
  already gives, as BusEvents). :class:`RedisBus` uses Redis pub/sub on one
  channel (``helpline:events``). Publishing never waits for Redis: events go
  to a bounded outbox drained by a writer task (``max_pending``; beyond it
  events are dropped and counted in ``stats``). The reader reconnects with
  exponential backoff (plus jitter); pub/sub does not replay what was missed
  while disconnected, so after a reconnect subscribers get one
  :data:`RESYNC` event (``conversation_id == ""``) meaning "refresh
  everything you show".
* Delivery is best effort, at most once: the bus is a hint to refresh, never
  the record. What must not be lost (the queue) is in SQL and mirrored by
  :mod:`engine.queue_mirror`.

The engine stays free of Redis: the server wires :func:`bus_publisher` as an
engine subscriber in its lifespan (see :func:`engine.queue_mirror.attach_shared_state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast, get_args

from engine.core.types import TurnOutcome
from engine.handoff import DeskEvent
from engine.store.base import Owner

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "CHANNEL",
    "RESYNC",
    "Bus",
    "BusCallback",
    "BusEvent",
    "BusKind",
    "LocalBus",
    "RedisBus",
    "bus_event",
    "bus_publisher",
    "new_origin",
]

logger = logging.getLogger(__name__)

#: The Redis pub/sub channel every process publishes to and listens on.
CHANNEL: Final = "helpline:events"
#: ``action`` of the event a bus delivers after it (re)connected: events may be missing.
RESYNC: Final = "resync"
#: Version of the JSON payload.
PAYLOAD_VERSION: Final = 1

BusKind = Literal["turn", "handoff", "desk"]
_KINDS: Final = frozenset(get_args(BusKind))
_OWNERS: Final = frozenset(get_args(Owner))


def new_origin() -> str:
    """An id for one bus (one process): host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class BusEvent:
    """One committed change, as other processes learn about it. No customer text.

    ``seq_before``/``seq``: the messages the commit stored have sequence numbers
    ``seq_before < n <= seq`` (load them with ``store.messages(id, after_seq=seq_before)``).
    ``origin`` is stamped by the bus that publishes the event.
    """

    kind: BusKind
    conversation_id: str
    action: str
    owner: Owner
    at: datetime
    reason: str | None = None
    agent: str | None = None
    seq_before: int = 0
    seq: int = 0
    origin: str = ""

    @property
    def is_resync(self) -> bool:
        return self.action == RESYNC and not self.conversation_id

    def to_json(self) -> str:
        return json.dumps({
            "v": PAYLOAD_VERSION, "origin": self.origin, "kind": self.kind,
            "conversation_id": self.conversation_id, "action": self.action,
            "owner": self.owner, "agent": self.agent, "reason": self.reason,
            "at": self.at.isoformat(), "seq_before": self.seq_before, "seq": self.seq,
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, payload: str | bytes) -> BusEvent:
        """Parse a payload; ValueError if it is not a valid event."""
        data = json.loads(payload)
        if not isinstance(data, dict) or data.get("v") != PAYLOAD_VERSION:
            raise ValueError("not a bus event")
        kind, owner = data.get("kind"), data.get("owner")
        origin, cid, action, at = (data.get("origin"), data.get("conversation_id"),
                                   data.get("action"), data.get("at"))
        agent, reason = data.get("agent"), data.get("reason")
        seq_before, seq = data.get("seq_before"), data.get("seq")
        if kind not in _KINDS or owner not in _OWNERS:
            raise ValueError("bad kind or owner")
        if not (isinstance(origin, str) and isinstance(cid, str) and isinstance(action, str)
                and isinstance(at, str)):
            raise ValueError("missing fields")
        if not ((agent is None or isinstance(agent, str))
                and (reason is None or isinstance(reason, str))):
            raise ValueError("bad agent or reason")
        if not (type(seq_before) is int and type(seq) is int):
            raise ValueError("bad sequence numbers")
        return cls(kind=cast(BusKind, kind), conversation_id=cid, action=action,
                   owner=cast(Owner, owner), at=datetime.fromisoformat(at), reason=reason,
                   agent=agent, seq_before=seq_before, seq=seq, origin=origin)


BusCallback = Callable[[BusEvent], Awaitable[None]]


class Bus(Protocol):
    """Publishes committed changes to every process; see the module docstring."""

    @property
    def origin(self) -> str: ...

    async def publish(self, event: BusEvent) -> None:
        """Tell every subscriber (of every process); never waits for the network."""
        ...

    def subscribe(self, callback: BusCallback) -> None:
        """Call ``callback(event)`` for every event, this process's and the others'."""
        ...

    def unsubscribe(self, callback: BusCallback) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class _Fanout:
    """Subscriber bookkeeping shared by the buses."""

    def __init__(self) -> None:
        self._callbacks: list[BusCallback] = []

    def subscribe(self, callback: BusCallback) -> None:
        self._callbacks.append(callback)

    def unsubscribe(self, callback: BusCallback) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    async def _deliver(self, event: BusEvent) -> None:
        for callback in list(self._callbacks):
            try:
                await callback(event)
            except Exception:  # one broken subscriber must not silence the others
                logger.exception("bus subscriber failed")


class LocalBus(_Fanout):
    """The in-process bus: every published event goes to this process's subscribers."""

    def __init__(self, *, origin: str | None = None) -> None:
        super().__init__()
        self._origin = origin or new_origin()

    @property
    def origin(self) -> str:
        return self._origin

    async def publish(self, event: BusEvent) -> None:
        await self._deliver(replace(event, origin=self._origin))

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._callbacks.clear()


class RedisBus(_Fanout):
    """Redis pub/sub between processes; see the module docstring.

    ``redis`` is a ``redis.asyncio.Redis`` client (closed by :meth:`close` only
    when made by :meth:`from_url`).
    """

    def __init__(self, redis: Redis, *, channel: str = CHANNEL, origin: str | None = None,
                 max_pending: int = 1000, backoff_initial: float = 0.1,
                 backoff_max: float = 5.0, publish_attempts: int = 3,
                 owns_client: bool = False) -> None:
        super().__init__()
        self.redis = redis
        self.channel = channel
        self._origin = origin or new_origin()
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.publish_attempts = publish_attempts
        self._owns_client = owns_client
        self._outbox: asyncio.Queue[str] = asyncio.Queue(maxsize=max_pending)
        self._tasks: list[asyncio.Task[None]] = []
        self._first_attempt = asyncio.Event()
        #: Set while the reader is subscribed.
        self.subscribed = asyncio.Event()
        self.stats: dict[str, int] = {"published": 0, "received": 0, "dropped": 0,
                                      "invalid": 0, "reconnects": 0, "publish_errors": 0}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBus:
        from redis.asyncio import Redis

        client = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5,
                                health_check_interval=30)
        return cls(client, owns_client=True, **options)

    @property
    def origin(self) -> str:
        return self._origin

    async def start(self, *, wait: float = 2.0) -> None:
        """Start the reader and the writer; wait (at most ``wait`` s) for a first subscribe.

        Redis being down is not an error here: the reader keeps retrying.
        """
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(self._read_loop(), name="bus-reader"),
                       asyncio.create_task(self._write_loop(), name="bus-writer")]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), wait)

    async def publish(self, event: BusEvent) -> None:
        event = replace(event, origin=self._origin)
        await self._deliver(event)
        try:
            self._outbox.put_nowait(event.to_json())
        except asyncio.QueueFull:
            self.stats["dropped"] += 1
            if self.stats["dropped"] == 1 or self.stats["dropped"] % 100 == 0:
                logger.warning("event bus: outbox full, %d events dropped so far",
                               self.stats["dropped"])

    async def close(self, *, drain: float = 1.0) -> None:
        """Send what is pending (at most ``drain`` seconds, if connected), then stop."""
        if self._tasks and not self._outbox.empty() and self.subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox.join(), drain)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._callbacks.clear()
        if self._owns_client:
            await self.redis.aclose()

    # -- internals -------------------------------------------------------------

    def _backoff(self, delay: float) -> float:
        return min(delay * 2, self.backoff_max)

    async def _sleep(self, delay: float) -> None:
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _read_loop(self) -> None:
        delay = self.backoff_initial
        failed = False
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                self._first_attempt.set()
                delay = self.backoff_initial
                if failed:  # events published meanwhile are gone: let subscribers resync
                    failed = False
                    self.stats["reconnects"] += 1
                    logger.info("event bus: reconnected to redis")
                    await self._deliver(self._resync())
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        await self._received(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failed:
                    logger.warning("event bus: redis subscription failed (%s: %s); "
                                   "retrying", type(exc).__name__, exc)
                failed = True
            finally:
                self.subscribed.clear()
                self._first_attempt.set()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await self._sleep(delay)
            delay = self._backoff(delay)

    async def _received(self, data: Any) -> None:
        try:
            event = BusEvent.from_json(data)
        except (ValueError, TypeError):
            self.stats["invalid"] += 1
            logger.debug("event bus: ignoring an invalid payload")
            return
        if event.origin == self._origin:
            return  # our own echo: local subscribers already had it
        self.stats["received"] += 1
        await self._deliver(event)

    def _resync(self) -> BusEvent:
        return BusEvent(kind="desk", conversation_id="", action=RESYNC, owner="bot",
                        at=datetime.now(UTC), origin="")

    async def _write_loop(self) -> None:
        delay = self.backoff_initial
        failing = False
        while True:
            payload = await self._outbox.get()
            try:
                for attempt in range(self.publish_attempts):
                    try:
                        await self.redis.publish(self.channel, payload)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        self.stats["publish_errors"] += 1
                        if not failing:
                            logger.warning("event bus: publishing failed (%s: %s)",
                                           type(exc).__name__, exc)
                        failing = True
                        if attempt + 1 == self.publish_attempts:
                            self.stats["dropped"] += 1
                            break
                        await self._sleep(delay)
                        delay = self._backoff(delay)
                    else:
                        self.stats["published"] += 1
                        delay, failing = self.backoff_initial, False
                        break
            finally:
                self._outbox.task_done()


# --------------------------------------------------------------------------- the engine side


def bus_event(event: Any, at: datetime) -> BusEvent | None:
    """The BusEvent for an engine event (a TurnOutcome or a DeskEvent), or None."""
    if isinstance(event, DeskEvent):
        conv, records = event.conversation, event.records
        reason = event.data.get("reason")
        return BusEvent(kind="desk", conversation_id=conv.id, action=event.action,
                        owner=conv.owner, at=at, agent=event.agent,
                        reason=reason if isinstance(reason, str) else None,
                        seq_before=min((r.seq for r in records), default=conv.seq + 1) - 1,
                        seq=conv.seq)
    if isinstance(event, TurnOutcome):
        conv, records = event.conversation, event.records
        seq_before = min((r.seq for r in records), default=conv.seq + 1) - 1
        if event.handoff is not None:
            return BusEvent(kind="handoff", conversation_id=conv.id, action="handoff",
                            owner=conv.owner, at=at, reason=event.handoff.reason,
                            seq_before=seq_before, seq=conv.seq)
        return BusEvent(kind="turn", conversation_id=conv.id,
                        action="muted" if event.muted else "message", owner=conv.owner,
                        at=at, agent=conv.owner_agent, seq_before=seq_before, seq=conv.seq)
    return None


def bus_publisher(bus: Bus, clock: Callable[[], datetime]) -> Callable[[Any], Awaitable[None]]:
    """An engine subscriber that publishes every committed change on ``bus``."""

    async def publish(event: Any) -> None:
        converted = bus_event(event, clock())
        if converted is not None:
            await bus.publish(converted)

    return publish
