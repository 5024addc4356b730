"""A Redis mirror of the handoff queue, so queue reads do not hit SQL.

SQL stays the truth: ownership changes are versioned commits in the store
(:mod:`engine.handoff`). The mirror is a cache of one query, "conversations
owned by ``pending_human`` or ``human``", kept in Redis so every process (the
agent consoles, ``/metrics``) reads the queue with one round trip::

    helpline:handoff:queue      sorted set: conversation id, score = waiting since (epoch s)
    helpline:handoff:items      hash: conversation id -> JSON of the queue item's fields
                                (channel, reason, priority, language, flow, owner,
                                owner_agent, preview, since, version)
    helpline:handoff:ready      set by the last rebuild; missing = flushed or never built
    helpline:handoff:gone:<id>  tombstone: the version that removed <id> (expires in 1 h)

Writes. The process that commits a change updates the mirror from the rich
engine event (an engine subscriber, wired before the bus publisher so the
mirror is current when other processes hear of the change): a handoff turn
and the desk actions claim, hand_back, resolve, timeout (and ``close``, a
resolve) apply the conversation's new snapshot: still with a human -> upsert,
otherwise -> remove. One Lua script applies a snapshot only if its
conversation version is newer than what the mirror holds (the item's version,
or a removal's tombstone), so a late write from a slow process can never
resurrect or roll back an entry.

Reads. :meth:`QueueMirror.queue` reads the sorted set and the items in one
script call and computes the same :class:`~engine.handoff.QueueItem` list, in
the same order, as the SQL query in :meth:`HandoffDesk.queue
<engine.handoff.HandoffDesk.queue>`. It returns None (the desk then queries SQL)
when Redis fails (and then for ``retry_after`` seconds, so a dead Redis costs
no timeouts per read). A missing ``ready`` marker (FLUSHDB, eviction) or a
write this process could not make triggers a rebuild before reading.

Rebuild. At start-up (the server lifespan), after a failure, and every
``full_every`` seconds in :meth:`QueueMirror.run`, the mirror is rebuilt from
``store.conversations(owner="pending_human"/"human")`` through the same
version-checked script; ids in Redis that SQL no longer queues are reloaded
from the store and applied (or dropped when the conversation is gone). So a
restart, a flushed or a lagging Redis loses nothing, and concurrent writers
are not overwritten by a stale snapshot.

Without ``redis_url`` none of this runs and the desk reads SQL as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from engine.bus import Bus, LocalBus, RedisBus, bus_publisher
from engine.core.types import TurnOutcome
from engine.handoff import DeskEvent, HandoffDesk, QueueItem
from engine.store.base import ConversationState, Store

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["QueueMirror", "SharedState", "attach_shared_state"]

logger = logging.getLogger(__name__)

PREFIX: Final = "helpline:handoff:"
QUEUE_KEY: Final = PREFIX + "queue"
ITEMS_KEY: Final = PREFIX + "items"
READY_KEY: Final = PREFIX + "ready"
GONE_PREFIX: Final = PREFIX + "gone:"
#: Owners that keep a conversation in the queue.
QUEUED: Final = ("pending_human", "human")
#: Desk actions that may change queue membership or the owning agent.
_DESK_MOVES: Final = frozenset({"claim", "hand_back", "resolve", "timeout"})
#: Snapshots applied per script call during a rebuild.
_CHUNK: Final = 200

# KEYS[1] the sorted set, KEYS[2] the items hash, KEYS[2 + i] entry i's tombstone.
# ARGV[1] tombstone TTL; then per entry: op (u = upsert, r = remove, d = drop), id,
# version, score, item JSON. Returns how many entries changed the mirror.
_APPLY: Final = """
local ttl = ARGV[1]
local changed = 0
for i = 1, #KEYS - 2 do
  local at = 2 + (i - 1) * 5
  local op, id, version = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  if op == 'd' then
    changed = changed + redis.call('zrem', KEYS[1], id)
    redis.call('hdel', KEYS[2], id)
  else
    local gone = tonumber(redis.call('get', KEYS[2 + i]) or '-1')
    local held = -1
    local current = redis.call('hget', KEYS[2], id)
    if current then
      held = tonumber(cjson.decode(current)['version']) or -1
    end
    if op == 'u' and version > gone and version > held then
      redis.call('zadd', KEYS[1], ARGV[at + 3], id)
      redis.call('hset', KEYS[2], id, ARGV[at + 4])
      changed = changed + 1
    elseif op == 'r' and version > gone and version >= held then
      changed = changed + redis.call('zrem', KEYS[1], id)
      redis.call('hdel', KEYS[2], id)
      redis.call('set', KEYS[2 + i], version, 'EX', ttl)
    end
  end
end
return changed
"""

# KEYS[1] the sorted set, KEYS[2] the items hash, KEYS[3] the ready marker; ARGV[1] limit.
# Nil when the marker is missing (the mirror cannot be trusted), else the items, oldest first.
_READ: Final = """
if redis.call('exists', KEYS[3]) == 0 then return false end
local ids = redis.call('zrange', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ids == 0 then return {} end
return redis.call('hmget', KEYS[2], unpack(ids))
"""


def _since(conv: ConversationState) -> datetime:
    return conv.waiting_since or conv.updated_at


def item_json(conv: ConversationState) -> str:
    """The mirrored fields of a queued conversation (what QueueItem needs, plus version)."""
    meta = conv.results.get("_handoff", {})
    return json.dumps({
        "id": conv.id, "channel": conv.key.channel, "reason": conv.handoff_reason or "request",
        "priority": str(meta.get("priority", "normal")), "language": conv.language,
        "flow": conv.flow, "owner": conv.owner, "owner_agent": conv.owner_agent,
        "preview": str(meta.get("detail", "")), "since": _since(conv).isoformat(),
        "version": conv.version,
    }, ensure_ascii=False, separators=(",", ":"))


def queue_order(items: list[QueueItem]) -> list[QueueItem]:
    """Waiting before claimed, high priority first, longest waiting first (as in SQL)."""
    items.sort(key=lambda i: (i.owner != "pending_human", i.priority != "high",
                              -i.waiting_seconds))
    return items


class QueueMirror:
    """See the module docstring. ``redis`` is a ``redis.asyncio.Redis`` client."""

    def __init__(self, redis: Redis, store: Store, *, limit: int = 500,
                 retry_after: float = 5.0, tombstone_ttl: int = 3600,
                 write_timeout: float = 1.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.store = store
        #: Conversations per owner read from SQL when rebuilding (as the SQL queue reads).
        self.limit = limit
        self.retry_after = retry_after
        self.tombstone_ttl = tombstone_ttl
        self.write_timeout = write_timeout
        self._monotonic = monotonic
        self._apply_script = redis.register_script(_APPLY)
        self._read_script = redis.register_script(_READ)
        self._lock = asyncio.Lock()
        self._down_until = 0.0
        #: A write failed (or Redis was down): rebuild before trusting the mirror again.
        self._dirty = True
        self._last_rebuild = float("-inf")
        self._failing = False
        self.stats: dict[str, int] = {"reads": 0, "fallbacks": 0, "rebuilds": 0,
                                      "writes": 0, "errors": 0}

    @property
    def healthy(self) -> bool:
        """Whether reads are currently served from Redis."""
        return not self._dirty and self._down_until <= self._monotonic()

    # -- writing ---------------------------------------------------------------

    async def on_event(self, event: Any) -> None:
        """Engine subscriber: mirror the committed ownership change, never raise."""
        if isinstance(event, DeskEvent):
            if event.action not in _DESK_MOVES:
                return
            conv = event.conversation
        elif isinstance(event, TurnOutcome):
            if event.handoff is None:
                return
            conv = event.conversation
        else:
            return
        await self.apply(conv)

    async def apply(self, conv: ConversationState) -> bool:
        """Mirror one conversation's committed state; False if Redis failed.

        Runs on the turn's path (an engine subscriber), so it waits at most
        ``write_timeout`` seconds and not at all while Redis is known to be down;
        a write not made marks the mirror for a rebuild.
        """
        if self._down_until > self._monotonic():
            self._dirty = True
            return False
        try:
            await asyncio.wait_for(self._apply([conv]), self.write_timeout)
        except Exception as exc:
            self._failed(exc)
            return False
        self.stats["writes"] += 1
        return True

    async def _apply(self, convs: Sequence[ConversationState], drop: Sequence[str] = ()) -> int:
        keys: list[str] = [QUEUE_KEY, ITEMS_KEY]
        args: list[str | int | float] = [self.tombstone_ttl]
        for conv in convs:
            keys.append(GONE_PREFIX + conv.id)
            if conv.owner in QUEUED:
                args += ["u", conv.id, conv.version, _since(conv).timestamp(), item_json(conv)]
            else:
                args += ["r", conv.id, conv.version, 0, ""]
        for cid in drop:
            keys.append(GONE_PREFIX + cid)
            args += ["d", cid, 0, 0, ""]
        if len(keys) == 2:
            return 0
        return int(await self._apply_script(keys=keys, args=args))

    # -- rebuilding ------------------------------------------------------------

    async def rebuild(self) -> bool:
        """Reconcile the mirror with SQL; False (logged) if Redis or the store failed."""
        try:
            await self._rebuild()
        except Exception as exc:
            self._failed(exc)
            return False
        return True

    async def _rebuild(self) -> None:
        started = self._monotonic()
        async with self._lock:
            if self._last_rebuild >= started:
                return  # a rebuild that began after we were asked just finished
            rows = await self.store.conversations(owner="pending_human", limit=self.limit)
            rows += await self.store.conversations(owner="human", limit=self.limit)
            for at in range(0, len(rows), _CHUNK):
                await self._apply(rows[at:at + _CHUNK])
            queued = {conv.id for conv in rows}
            held = [_text(m) for m in await self.redis.zrange(QUEUE_KEY, 0, -1)
                    if isinstance(m, bytes | str)]
            stale = [cid for cid in held if cid not in queued]
            snapshots: list[ConversationState] = []
            missing: list[str] = []
            for cid in stale:  # no longer queued in SQL, or queued after our query
                conv = await self.store.load_by_id(cid)
                if conv is None:
                    missing.append(cid)
                else:
                    snapshots.append(conv)
            for at in range(0, max(len(snapshots), len(missing)), _CHUNK):
                await self._apply(snapshots[at:at + _CHUNK], missing[at:at + _CHUNK])
            await self.redis.set(READY_KEY, str(time.time()))
            self._dirty = False
            self._down_until = 0.0
            self._last_rebuild = self._monotonic()
            self.stats["rebuilds"] += 1
            if self._failing:
                logger.info("handoff queue mirror: redis is back, mirror rebuilt")
                self._failing = False

    async def run(self, *, every: float = 5.0, full_every: float = 60.0) -> None:
        """Background loop: rebuild when a write failed, and every ``full_every`` s."""
        while True:
            await asyncio.sleep(every)
            due = self._monotonic() - self._last_rebuild >= full_every
            if (due or self._dirty) and self._down_until <= self._monotonic():
                await self.rebuild()

    # -- reading ---------------------------------------------------------------

    async def queue(self, now: datetime, *, include_claimed: bool = True,
                    ) -> list[QueueItem] | None:
        """The queue as :meth:`HandoffDesk.queue` computes it, or None: ask SQL."""
        if self._down_until > self._monotonic():
            self.stats["fallbacks"] += 1
            return None
        try:
            if self._dirty:
                await self._rebuild()
            raw = await self._read_script(keys=[QUEUE_KEY, ITEMS_KEY, READY_KEY],
                                          args=[2 * self.limit])
            if raw is None:  # flushed or evicted: rebuild from SQL, then read again
                self._dirty = True
                await self._rebuild()
                raw = await self._read_script(keys=[QUEUE_KEY, ITEMS_KEY, READY_KEY],
                                              args=[2 * self.limit])
                if raw is None:
                    raise RuntimeError("the mirror vanished while it was rebuilt")
            items = [self._item(json.loads(entry), now) for entry in raw if entry]
        except Exception as exc:
            self._failed(exc)
            self.stats["fallbacks"] += 1
            return None
        self.stats["reads"] += 1
        if not include_claimed:
            items = [i for i in items if i.owner == "pending_human"]
        return queue_order(items)

    @staticmethod
    def _item(data: dict[str, Any], now: datetime) -> QueueItem:
        since = datetime.fromisoformat(data["since"])
        return QueueItem(
            conversation_id=data["id"], channel=data["channel"], reason=data["reason"],
            priority=data["priority"], language=data["language"], flow=data["flow"],
            waiting_seconds=max(0.0, (now - since).total_seconds()), owner=data["owner"],
            owner_agent=data["owner_agent"], preview=data["preview"])

    def _failed(self, exc: BaseException) -> None:
        self.stats["errors"] += 1
        self._dirty = True
        self._down_until = self._monotonic() + self.retry_after
        if not self._failing:
            logger.warning("handoff queue mirror: redis failed (%s: %s); reading the queue "
                           "from SQL for now", type(exc).__name__, exc)
        self._failing = True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- wiring


@dataclass
class SharedState:
    """The bus and the queue mirror of one server process (see :func:`attach_shared_state`)."""

    bus: Bus
    mirror: QueueMirror | None = None
    redis: Redis | None = None
    engine: Any = None
    desk: HandoffDesk | None = None
    subscribers: list[Callable[[Any], Awaitable[None]]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        for subscriber in self.subscribers:
            self.engine.unsubscribe(subscriber)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.desk is not None and self.desk.mirror is self.mirror:
            self.desk.mirror = None
        await self.bus.close()
        if self.redis is not None:
            await self.redis.aclose()


async def attach_shared_state(engine: Any, desk: HandoffDesk, redis_url: str | None, *,
                              reconcile_every: float = 5.0, full_every: float = 60.0,
                              bus_options: dict[str, Any] | None = None,
                              mirror_options: dict[str, Any] | None = None) -> SharedState:
    """Connect one process's engine and desk to the others (the server lifespan calls this).

    Without ``redis_url``: a :class:`~engine.bus.LocalBus`, no mirror. With it:
    the queue mirror (rebuilt from SQL now, kept current by an engine
    subscriber, reconciled in the background) is attached to ``desk``, and a
    :class:`~engine.bus.RedisBus` publishes every committed change. The mirror
    subscribes first, so it is current before other processes hear of a change.
    Redis being down does not fail start-up: reads fall back to SQL, the bus
    reconnects.
    """
    bus: Bus
    if not redis_url:
        bus = LocalBus()
        state = SharedState(bus=bus, engine=engine, desk=desk)
    else:
        from redis.asyncio import Redis

        client = Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5,
                                health_check_interval=30)
        mirror = QueueMirror(client, engine.store, **(mirror_options or {}))
        bus = RedisBus(client, **(bus_options or {}))
        state = SharedState(bus=bus, mirror=mirror, redis=client, engine=engine, desk=desk)
        await mirror.rebuild()
        desk.mirror = mirror
        engine.subscribe(mirror.on_event)
        state.subscribers.append(mirror.on_event)
        state.tasks.append(asyncio.create_task(
            mirror.run(every=reconcile_every, full_every=full_every),
            name="handoff-queue-mirror"))
    await bus.start()
    publisher = bus_publisher(bus, engine.clock)
    engine.subscribe(publisher)
    state.subscribers.append(publisher)
    return state
