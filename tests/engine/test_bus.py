"""Several server processes: the event bus and the Redis mirror of the handoff queue.

Two "processes" live in one test process: two Engines with their desks over one
SQLite file, each wired to one Redis by :func:`attach_shared_state`, exactly as
the server lifespan wires them. The console test runs two live servers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.typing import Origin

from engine.actions import ActionRegistry
from engine.bus import CHANNEL, BusEvent, LocalBus, RedisBus, bus_event
from engine.core.types import Inbound, Outbound
from engine.demo.actions import build_actions
from engine.demo.shop import Shop
from engine.flow.compiled import FlowSet
from engine.flow.loader import load_flows
from engine.handoff import DeskEvent, HandoffDesk, QueueItem
from engine.models.offline import OfflineModel
from engine.queue_mirror import ITEMS_KEY, QUEUE_KEY, READY_KEY, SharedState, attach_shared_state
from engine.runner import Engine
from engine.server.console import COOKIE
from engine.store import ConversationKey, ConversationState, Store, open_store
from tests.channels.web.conftest import live_settings, start_live_server
from tests.engine.server.conftest import AGENTS, login, next_message

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
ACTION_NAMES = frozenset({"lookup_order", "issue_refund", "track_parcel", "open_lost_claim",
                          "change_address"})
ASK = "can I talk to a human agent please"
SECRET_WORDS = "my secret address is 12 Elm Street"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


@dataclass
class Process:
    """One simulated server process: engine, desk, bus + mirror, what its bus delivered."""

    name: str
    engine: Engine
    desk: HandoffDesk
    shared: SharedState
    clock: Clock
    store: Store
    heard: list[BusEvent] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def remote(self) -> list[BusEvent]:
        return [e for e in self.heard if e.origin != self.shared.bus.origin]

    async def say(self, text: str, thread: str, **extra: Any) -> None:
        inbound = Inbound(ConversationKey("test", "shop", thread), text, f"demo:{thread}",
                          self.clock(), channel_message_id=f"{self.name}{next(self._ids)}",
                          **extra)
        await self.engine.handle(inbound)

    async def conv(self, thread: str) -> ConversationState:
        conv = await self.store.load(ConversationKey("test", "shop", thread))
        assert conv is not None
        return conv

    async def ask_for_human(self, thread: str) -> str:
        await self.say(ASK, thread)
        conv = await self.conv(thread)
        assert conv.owner == "pending_human"
        return conv.id

    async def sql_queue(self, *, include_claimed: bool = True) -> list[QueueItem]:
        """The queue straight from SQL (a desk without a mirror)."""
        return await HandoffDesk(self.engine).queue(include_claimed=include_claimed)


@pytest.fixture(scope="module")
def flows() -> FlowSet:
    return load_flows(ROOT / "flows", ROOT / "prompts", ACTION_NAMES)


@pytest.fixture
async def actions() -> AsyncIterator[ActionRegistry]:
    shop = Shop(None)
    await shop.open()
    try:
        yield build_actions(shop)
    finally:
        await shop.close()


ProcessFactory = Callable[..., Awaitable[Process]]


@pytest.fixture
async def processes(flows: FlowSet, actions: ActionRegistry,
                    tmp_path: Path) -> AsyncIterator[ProcessFactory]:
    """Start simulated processes: ``await start("a", redis_url)`` (one SQLite file for all)."""
    clock = Clock()
    started: list[Process] = []

    async def start(name: str, redis_url: str | None, **options: Any) -> Process:
        store = open_store(f"sqlite:///{tmp_path / 'helpline.db'}")
        await store.open()
        engine = Engine(flows, store, OfflineModel(), actions, clock=clock)
        desk = HandoffDesk(engine, queue_timeout=600)

        async def send(message: Outbound) -> None:
            pass

        engine.register_sender("test", send)
        shared = await attach_shared_state(engine, desk, redis_url, reconcile_every=3600,
                                           **options)
        process = Process(name, engine, desk, shared, clock, store)

        async def heard(event: BusEvent) -> None:
            process.heard.append(event)

        shared.bus.subscribe(heard)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in reversed(started):
            await process.shared.close()
            await process.engine.drain()
            await process.store.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def closed_port_url() -> str:
    """A Redis URL nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/15"


async def assert_mirror_matches_sql(*procs: Process) -> None:
    for process in procs:
        mirror = process.shared.mirror
        assert mirror is not None
        reads, fallbacks = mirror.stats["reads"], mirror.stats["fallbacks"]
        for claimed in (True, False):
            assert await process.desk.queue(include_claimed=claimed) == \
                await process.sql_queue(include_claimed=claimed)
        assert mirror.stats["reads"] == reads + 2, "the queue was not read from redis"
        assert mirror.stats["fallbacks"] == fallbacks


# --------------------------------------------------------------------------- the bus


def test_bus_events_round_trip_as_small_json_without_text() -> None:
    event = BusEvent(kind="handoff", conversation_id="c1", action="handoff",
                     owner="pending_human", at=T0, reason="request", seq_before=3, seq=6,
                     origin="host:1:ab")
    payload = event.to_json()
    assert len(payload) < 300
    assert set(json.loads(payload)) == {"v", "origin", "kind", "conversation_id", "action",
                                        "owner", "agent", "reason", "at", "seq_before", "seq"}
    assert BusEvent.from_json(payload) == event
    assert BusEvent.from_json(payload.encode()) == event
    for bad in ("[]", "{}", payload.replace('"handoff"', '"bogus"', 1),
                payload.replace('"seq":6', '"seq":"6"'), "not json"):
        with pytest.raises(ValueError):
            BusEvent.from_json(bad)


async def test_the_local_bus_stamps_its_origin_and_survives_a_broken_subscriber() -> None:
    bus = LocalBus()
    got: list[BusEvent] = []

    async def broken(event: BusEvent) -> None:
        raise RuntimeError("boom")

    async def record(event: BusEvent) -> None:
        got.append(event)

    bus.subscribe(broken)
    bus.subscribe(record)
    await bus.publish(BusEvent(kind="turn", conversation_id="c1", action="message",
                               owner="bot", at=T0))
    assert [e.origin for e in got] == [bus.origin]
    bus.unsubscribe(record)
    await bus.publish(BusEvent(kind="turn", conversation_id="c2", action="message",
                               owner="bot", at=T0))
    assert len(got) == 1
    await bus.close()


@pytest.mark.redis
async def test_redis_bus_delivers_to_other_processes_and_drops_its_own_echo(
        redis_url: str, redis_client: aioredis.Redis) -> None:
    a, b = RedisBus.from_url(redis_url), RedisBus.from_url(redis_url)
    heard: dict[str, list[BusEvent]] = {"a": [], "b": []}
    for name, bus in (("a", a), ("b", b)):
        async def record(event: BusEvent, name: str = name) -> None:
            heard[name].append(event)

        bus.subscribe(record)
        await bus.start()
    try:
        assert a.subscribed.is_set() and b.subscribed.is_set()
        await redis_client.publish(CHANNEL, b"garbage")  # ignored, counted
        event = BusEvent(kind="desk", conversation_id="c1", action="claim", owner="human",
                         at=T0, agent="alice")
        await a.publish(event)
        await wait_for(lambda: len(heard["b"]) == 1)
        await asyncio.sleep(0.1)  # time for a's own echo to come back (and be dropped)
        assert heard["a"] == [replace(event, origin=a.origin)]  # delivered locally, once
        assert heard["b"] == [replace(event, origin=a.origin)]
        assert b.stats["invalid"] == 1 and a.stats["received"] == 0
    finally:
        await a.close()
        await b.close()


@pytest.mark.redis
async def test_a_handoff_in_process_a_is_heard_by_process_b(
        processes: ProcessFactory, redis_url: str) -> None:
    a = await processes("a", redis_url)
    b = await processes("b", redis_url)
    await a.say(SECRET_WORDS, "t1")
    cid = await a.ask_for_human("t1")
    await wait_for(lambda: any(e.kind == "handoff" for e in b.remote))
    kinds = [(e.kind, e.action, e.owner) for e in b.remote]
    assert kinds == [("turn", "message", "bot"), ("handoff", "handoff", "pending_human")]
    handoff = b.remote[-1]
    assert handoff.conversation_id == cid and handoff.reason == "request"
    assert handoff.origin == a.shared.bus.origin != b.shared.bus.origin
    # The range of messages the commit stored, to reload them from the store.
    records = await b.store.messages(cid, after_seq=handoff.seq_before)
    assert [r.seq for r in records][-1] == handoff.seq
    assert any(r.text == ASK for r in records)
    # No customer text travels on the bus.
    assert all(SECRET_WORDS not in e.to_json() and "human agent" not in e.to_json()
               for e in b.remote)
    # A desk action in B is heard by A.
    await b.desk.claim(cid, "alice")
    await wait_for(lambda: any(e.kind == "desk" for e in a.remote))
    claim = next(e for e in a.remote if e.kind == "desk")
    assert (claim.action, claim.owner, claim.agent) == ("claim", "human", "alice")
    # B's own subscribers had B's claim once, locally (its echo from Redis is dropped).
    await asyncio.sleep(0.05)
    own = [e for e in b.heard if e.origin == b.shared.bus.origin]
    assert [(e.kind, e.action) for e in own] == [("desk", "claim")]


def test_bus_event_of_a_desk_event_names_the_agent_and_the_new_records() -> None:
    conv = ConversationState(id="c1", key=ConversationKey("test", "shop", "t1"),
                             created_at=T0, updated_at=T0, owner="human", owner_agent="bob",
                             seq=7)
    assert bus_event(DeskEvent("claim", conv, "bob"), T0) == BusEvent(
        kind="desk", conversation_id="c1", action="claim", owner="human", at=T0,
        agent="bob", seq_before=7, seq=7)
    assert bus_event(object(), T0) is None


# --------------------------------------------------------------------------- the mirror


@pytest.mark.redis
async def test_the_mirror_matches_sql_through_handoff_claim_hand_back_resolve_timeout(
        processes: ProcessFactory, redis_url: str, redis_client: aioredis.Redis) -> None:
    a = await processes("a", redis_url)
    b = await processes("b", redis_url)
    await assert_mirror_matches_sql(a, b)
    assert await a.desk.queue() == []

    one = await a.ask_for_human("t1")
    a.clock.advance(30)
    two = await b.ask_for_human("t2")
    a.clock.advance(30)
    await b.say("hello", "t3")
    await b.say("1", "t3", kind="rating", rating=1)  # a bad rating: a high priority handoff
    three = (await b.conv("t3")).id
    a.clock.advance(10)
    queue = await a.desk.queue()
    assert [(i.conversation_id, i.priority) for i in queue] == \
        [(three, "high"), (one, "normal"), (two, "normal")]
    await assert_mirror_matches_sql(a, b)
    assert await redis_client.zcard(QUEUE_KEY) == len(queue)

    await b.desk.claim(one, "alice")  # claim: stays, owner updated
    item = {i.conversation_id: i for i in await a.desk.queue()}[one]
    assert (item.owner, item.owner_agent) == ("human", "alice")
    await assert_mirror_matches_sql(a, b)

    await a.desk.hand_back(one, "alice")  # hand back: gone
    assert one not in {i.conversation_id for i in await b.desk.queue()}
    await assert_mirror_matches_sql(a, b)

    await a.desk.resolve(two, "bob")  # resolve while waiting: gone
    await assert_mirror_matches_sql(a, b)

    a.clock.advance(601)
    four = await a.ask_for_human("t4")
    assert await b.desk.expire() == [three]  # timeout: gone (four has not waited long)
    await assert_mirror_matches_sql(a, b)
    assert [i.conversation_id for i in await a.desk.queue()] == [four]
    assert await redis_client.zrange(QUEUE_KEY, 0, -1) == [four.encode()]
    assert await redis_client.hkeys(ITEMS_KEY) == [four.encode()]

    assert await a.desk.close(four, reason="blocked")  # a channel closes it: gone
    await assert_mirror_matches_sql(a, b)
    assert await redis_client.zcard(QUEUE_KEY) == 0


@pytest.mark.redis
async def test_after_flushdb_or_a_restart_the_queue_is_rebuilt_from_sql(
        processes: ProcessFactory, redis_url: str, redis_client: aioredis.Redis) -> None:
    a = await processes("a", redis_url)
    one = await a.ask_for_human("t1")
    a.clock.advance(20)
    two = await a.ask_for_human("t2")
    await a.desk.claim(two, "bob")
    before = await a.sql_queue()
    assert [i.conversation_id for i in before] == [one, two]

    await redis_client.flushdb()
    # The next read notices the missing marker, rebuilds from SQL and serves from Redis.
    await assert_mirror_matches_sql(a)
    assert await redis_client.zcard(QUEUE_KEY) == 2 and await redis_client.exists(READY_KEY)

    # A process started after a flush rebuilds at start-up (the server lifespan).
    await redis_client.flushdb()
    b = await processes("b", redis_url)
    assert await redis_client.zcard(QUEUE_KEY) == 2
    items = {k.decode() if isinstance(k, bytes) else k: json.loads(v)
             for k, v in (await redis_client.hgetall(ITEMS_KEY)).items()}
    assert (items[two]["owner"], items[two]["owner_agent"]) == ("human", "bob")
    await assert_mirror_matches_sql(a, b)

    # Rebuilding also drops what SQL no longer queues (a lost write, a deleted row).
    await redis_client.zadd(QUEUE_KEY, {"ghost": 1.0})
    await redis_client.hset(ITEMS_KEY, "ghost", json.dumps({"version": 1}))
    assert b.shared.mirror is not None
    assert await b.shared.mirror.rebuild()
    assert sorted(await redis_client.zrange(QUEUE_KEY, 0, -1)) == sorted([one.encode(),
                                                                          two.encode()])
    await assert_mirror_matches_sql(a, b)


@pytest.mark.redis
async def test_a_late_write_from_a_slow_process_cannot_resurrect_a_queue_entry(
        processes: ProcessFactory, redis_url: str, redis_client: aioredis.Redis) -> None:
    a = await processes("a", redis_url)
    cid = await a.ask_for_human("t1")
    waiting = await a.conv("t1")  # the snapshot of the handoff commit
    await a.desk.claim(cid, "alice")
    claimed = await a.conv("t1")
    await a.desk.resolve(cid, "alice")
    mirror = a.shared.mirror
    assert mirror is not None
    assert await mirror.apply(waiting)  # arrives late: ignored (tombstone)
    assert await mirror.apply(claimed)
    assert await redis_client.zcard(QUEUE_KEY) == 0
    assert await a.desk.queue() == []


@pytest.mark.redis
async def test_with_redis_down_the_queue_is_read_from_sql_and_nothing_fails(
        processes: ProcessFactory, redis_url: str) -> None:
    started = asyncio.get_running_loop().time()
    a = await processes("a", closed_port_url())
    b = await processes("b", redis_url)
    one = await a.ask_for_human("t1")  # the turn commits although its mirror write fails
    await b.desk.claim(one, "alice")
    mirror = a.shared.mirror
    assert mirror is not None
    assert await a.desk.queue() == await a.sql_queue()
    assert [(i.conversation_id, i.owner) for i in await a.desk.queue()] == [(one, "human")]
    assert mirror.stats["fallbacks"] >= 1 and mirror.stats["reads"] == 0
    assert not mirror.healthy
    # A could not write the handoff to the shared mirror; B's claim (a newer version)
    # put the conversation there, and a rebuild agrees with SQL.
    assert await b.desk.queue() == await b.sql_queue()
    assert b.shared.mirror is not None and await b.shared.mirror.rebuild()
    assert await b.desk.queue() == await b.sql_queue()
    # A's bus keeps retrying without hurting anyone; A's mirror retries after the pause.
    assert isinstance(a.shared.bus, RedisBus) and not a.shared.bus.subscribed.is_set()
    assert asyncio.get_running_loop().time() - started < 10


@pytest.mark.redis
async def test_without_a_reachable_redis_errors_never_reach_the_desk_caller(
        processes: ProcessFactory) -> None:
    a = await processes("a", closed_port_url(), mirror_options={"retry_after": 0})
    mirror = a.shared.mirror  # tries Redis on every read
    assert mirror is not None
    await a.ask_for_human("t1")
    for _ in range(3):
        assert await a.desk.queue() == await a.sql_queue()
    assert mirror.stats["errors"] >= 3


async def test_without_redis_url_the_desk_reads_sql_and_the_bus_is_local(
        processes: ProcessFactory) -> None:
    a = await processes("a", None)
    assert isinstance(a.shared.bus, LocalBus) and a.shared.mirror is None
    cid = await a.ask_for_human("t1")
    assert [i.conversation_id for i in await a.desk.queue()] == [cid]
    assert [e.kind for e in a.heard] == ["handoff"] and a.remote == []


# --------------------------------------------------------------------------- the console


@pytest.mark.redis
async def test_the_console_of_server_b_shows_what_server_a_handled(
        tmp_path: Path, redis_url: str) -> None:
    settings = live_settings(tmp_path, agents=AGENTS, redis_url=redis_url)
    server_a = await start_live_server(settings)
    server_b = await start_live_server(settings)
    ids = itertools.count()

    async def send(message: Outbound) -> None:
        pass

    server_a.context.engine.register_sender("test", send)

    async def say(text: str) -> None:
        await server_a.context.engine.handle(Inbound(
            ConversationKey("test", "shop", "t1"), text, "demo:t1", datetime.now(UTC),
            channel_message_id=f"m{next(ids)}"))

    agent = await login(server_b.url, "alice")
    ws = await connect(server_b.url.replace("http", "ws", 1) + "/agent/ws",
                       origin=Origin(server_b.url),
                       additional_headers={"Cookie": f"{COOKIE}={agent.cookies[COOKIE]}"},
                       open_timeout=5, close_timeout=2)
    try:
        hello = await next_message(ws, "hello")
        assert hello["queue"] == []
        await say(ASK)  # handled by server A
        conv = await server_a.context.app.store.load(ConversationKey("test", "shop", "t1"))
        assert conv is not None and conv.owner == "pending_human"
        handoff = await next_message(ws, "handoff", conversation_id=conv.id)
        assert (handoff["reason"], handoff["priority"]) == ("request", "normal")
        queue = await next_message(ws, "queue")
        assert [i["conversation_id"] for i in queue["items"]] == [conv.id]

        # An agent on A claims; B's agents see the conversation change owner.
        await server_a.context.desk.claim(conv.id, "bob")
        changed = await next_message(ws, "conversation", action="claim")
        assert changed["agent"] == "bob" and changed["conversation"]["owner"] == "human"

        # B's agent watches it; the customer writes to A: activity and the record arrive.
        await ws.send(json.dumps({"type": "watch", "conversation_id": conv.id}))
        await asyncio.sleep(0.05)
        await say(SECRET_WORDS)
        activity = await next_message(ws, "activity", conversation_id=conv.id)
        assert activity["text"] == SECRET_WORDS and activity["owner_agent"] == "bob"
        records = await next_message(ws, "records", conversation_id=conv.id)
        assert [r["text"] for r in records["records"] if r["direction"] == "in"] == \
            [SECRET_WORDS]
    finally:
        await ws.close()
        await agent.aclose()
        await server_b.stop()
        await server_a.stop()


async def test_an_agent_reply_made_on_server_b_reaches_a_web_socket_held_by_server_a(
        tmp_path: Path, redis_url: str) -> None:
    from tests.channels.web.chatclient import ChatClient, new_session

    settings = live_settings(tmp_path, agents=AGENTS, redis_url=redis_url)
    server_a = await start_live_server(settings)
    server_b = await start_live_server(settings)
    try:
        session = await new_session(server_a.url)
        client, _ = await ChatClient.start(server_a.ws_url, session["token"],
                                           origin=server_a.url)
        async with client:
            await client.say("I want to talk to a real person")
            conv = await server_a.context.app.store.load(
                ConversationKey("web", session.get("site", "default"), session["session"]))
            assert conv is not None and conv.owner == "pending_human"
            await server_b.context.desk.claim(conv.id, "alice")
            await server_b.context.desk.reply(conv.id, "alice", "Hello from Alice on B")
            frames = await client.recv_until(
                lambda f: f.get("type") == "message" and f.get("author") == "agent", timeout=5)
            assert frames[-1]["text"] == "Hello from Alice on B"
    finally:
        await server_b.stop()
        await server_a.stop()
