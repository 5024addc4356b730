"""The handoff desk: ownership, the queue, claim races, replies, notes, hand back, expiry.

Driven through a real :class:`Engine` (offline model, demo shop, the demo
flows) over every store backend, with an injected clock and a recording
sender standing in for the customer's channel.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.actions import ActionRegistry
from engine.core.types import Inbound, Outbound
from engine.demo.actions import build_actions
from engine.demo.shop import ORDER_SMALL, Shop
from engine.flow.compiled import FlowSet
from engine.flow.loader import load_flows
from engine.handoff import DeskEvent, HandoffDesk, OwnershipError, can_move
from engine.models.base import Decision, DecisionRequest
from engine.models.offline import OfflineModel
from engine.runner import Engine
from engine.store import ConversationKey, ConversationState, Store, open_store

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
ACTION_NAMES = frozenset({"lookup_order", "issue_refund", "track_parcel", "open_lost_claim",
                          "change_address"})


# --------------------------------------------------------------------------- harness


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class RecordingModel(OfflineModel):
    """The offline model, keeping every decision request it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[DecisionRequest] = []

    async def decide(self, request: DecisionRequest) -> Decision:
        self.requests.append(request)
        return await super().decide(request)


@dataclass
class Desk:
    """One engine + desk over a store, with what its channel and subscribers received."""

    engine: Engine
    desk: HandoffDesk
    clock: Clock
    model: RecordingModel
    sent: list[Outbound] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def store(self) -> Store:
        return self.engine.store

    async def say(self, text: str, thread: str = "t1", **extra: Any) -> list[Outbound]:
        """A customer message on the test channel; returns what the channel was sent."""
        before = len(self.sent)
        inbound = Inbound(ConversationKey("test", "shop", thread), text, f"demo:{thread}",
                          self.clock(), channel_message_id=f"m{next(self._ids)}", **extra)
        await self.engine.handle(inbound)
        return self.sent[before:]

    async def rate(self, value: int, thread: str = "t1") -> list[Outbound]:
        return await self.say(str(value), thread, kind="rating", rating=value)

    async def conv(self, thread: str = "t1") -> ConversationState:
        conv = await self.store.load(ConversationKey("test", "shop", thread))
        assert conv is not None
        return conv

    async def ask_for_human(self, thread: str = "t1") -> str:
        """Refund journey up to ask_reason, then "agent": the conversation waits in the queue."""
        await self.say("I want a refund", thread)
        await self.say(ORDER_SMALL, thread)
        sent = await self.say("can I talk to a human agent please", thread)
        assert [o.kind for o in sent] == ["handoff"]
        conv = await self.conv(thread)
        assert conv.owner == "pending_human"
        return conv.id


@pytest.fixture(scope="module")
def flows() -> FlowSet:
    return load_flows(ROOT / "flows", ROOT / "prompts", ACTION_NAMES)


@pytest.fixture(scope="module")
def seeded_shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded demo shop database, built once; each test works on a copy."""
    path = tmp_path_factory.mktemp("shop") / "shop.db"

    async def seed() -> None:
        shop = Shop(path)
        await shop.open()
        await shop.close()

    asyncio.run(seed())
    return path


@pytest.fixture
async def actions(seeded_shop: Path, tmp_path: Path) -> AsyncIterator[ActionRegistry]:
    path = tmp_path / "shop.db"
    shutil.copyfile(seeded_shop, path)
    shop = Shop(path)
    await shop.open()
    try:
        yield build_actions(shop)
    finally:
        await shop.close()


def make_desk(flows: FlowSet, store: Store, actions: ActionRegistry,
              clock: Clock | None = None, queue_timeout: float = 600.0) -> Desk:
    clock = clock or Clock()
    model = RecordingModel()
    engine = Engine(flows, store, model, actions, clock=clock)
    desk = Desk(engine, HandoffDesk(engine, queue_timeout=queue_timeout), clock, model)

    async def send(message: Outbound) -> None:
        desk.sent.append(message)

    async def record(event: Any) -> None:
        desk.events.append(event)

    engine.register_sender("test", send)
    engine.subscribe(record)
    return desk


@pytest.fixture
def d(flows: FlowSet, store: Store, actions: ActionRegistry) -> Desk:
    return make_desk(flows, store, actions)


def desk_actions(d: Desk) -> list[str]:
    return [e.action for e in d.events if isinstance(e, DeskEvent)]


# --------------------------------------------------------------------------- the machine

#: The ownership machine, written out in full: every (owner, action) pair.
OWNERS = ("bot", "pending_human", "human", "resolved")
ACTIONS = ("handoff", "claim", "hand_back", "resolve", "timeout")
TABLE = {
    ("bot", "handoff"): "pending_human",
    ("pending_human", "claim"): "human",
    ("pending_human", "timeout"): "bot",
    ("pending_human", "resolve"): "resolved",
    ("human", "hand_back"): "bot",
    ("human", "resolve"): "resolved",
}


@pytest.mark.parametrize(("owner", "action"), list(itertools.product(OWNERS, ACTIONS)))
def test_ownership_machine(owner: Any, action: str) -> None:
    assert can_move(owner, action) == TABLE.get((owner, action))


def test_ownership_error_says_what_and_why() -> None:
    error = OwnershipError("c1", "claim", "it is owned by bob")
    assert str(error) == "cannot claim conversation c1: it is owned by bob"
    assert (error.conversation_id, error.action, error.reason) == ("c1", "claim",
                                                                   "it is owned by bob")


# --------------------------------------------------------------------------- the queue


async def test_handoff_waits_in_the_queue_with_reason_priority_and_waiting_time(d: Desk) -> None:
    cid = await d.ask_for_human()
    d.clock.advance(42)
    [item] = await d.desk.queue()
    assert (item.conversation_id, item.reason, item.priority, item.owner) == (
        cid, "request", "normal", "pending_human")
    assert item.channel == "test" and item.flow == "refund" and item.owner_agent is None
    assert item.waiting_seconds == pytest.approx(42)
    assert item.preview == "customer asked for a human"


async def test_the_bot_is_muted_while_a_human_owns_the_conversation(d: Desk) -> None:
    cid = await d.ask_for_human()
    asked = len(d.model.requests)
    assert await d.say("hello? anyone there?") == []
    await d.desk.claim(cid, "alice")
    assert await d.say("it arrived damaged") == []
    assert len(d.model.requests) == asked
    texts = [m.text for m in await d.store.messages(cid) if m.direction == "in"]
    assert texts[-2:] == ["hello? anyone there?", "it arrived damaged"]


async def test_queue_order_waiting_first_then_high_priority_then_longest_wait(d: Desk) -> None:
    await d.ask_for_human("early")                    # normal, waits longest
    d.clock.advance(30)
    await d.say("I want a refund", "angry")
    await d.say(ORDER_SMALL, "angry")
    await d.say("it arrived damaged", "angry")
    await d.say("yes", "angry")
    await d.rate(1, "angry")                          # satisfaction: high priority
    d.clock.advance(30)
    claimed = await d.ask_for_human("claimed")        # claimed: after all waiting ones
    await d.desk.claim(claimed, "bob")
    d.clock.advance(30)
    await d.ask_for_human("late")                     # normal, shortest wait
    queue = await d.desk.queue()
    threads = [(await d.store.load_by_id(i.conversation_id)).key.thread  # type: ignore[union-attr]
               for i in queue]
    assert threads == ["angry", "early", "late", "claimed"]
    assert [i.priority for i in queue] == ["high", "normal", "normal", "normal"]
    assert queue[0].reason == "satisfaction" and queue[-1].owner_agent == "bob"
    waiting_only = await d.desk.queue(include_claimed=False)
    assert [i.conversation_id for i in waiting_only] == [i.conversation_id for i in queue[:3]]


# --------------------------------------------------------------------------- claiming


async def test_simultaneous_claims_exactly_one_wins(d: Desk) -> None:
    cid = await d.ask_for_human()
    results = await asyncio.gather(d.desk.claim(cid, "alice"), d.desk.claim(cid, "bob"),
                                   return_exceptions=True)
    winners = [r for r in results if isinstance(r, ConversationState)]
    losers = [r for r in results if isinstance(r, OwnershipError)]
    assert len(winners) == 1 and len(losers) == 1, results
    winner = winners[0].owner_agent
    assert winner in ("alice", "bob")
    assert "owned by human" in losers[0].reason and winner in losers[0].reason
    conv = await d.conv()
    assert (conv.owner, conv.owner_agent) == ("human", winner)
    assert desk_actions(d) == ["claim"]


async def test_two_processes_over_one_sqlite_file_claim_exactly_once(
    flows: FlowSet, actions: ActionRegistry, tmp_path: Path
) -> None:
    # Two engines with their own locks and store connections: the version
    # check in the database is all that stands between them.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    store_a, store_b = open_store(url), open_store(url)
    await store_a.open()
    await store_b.open()
    try:
        a = make_desk(flows, store_a, actions)
        b = make_desk(flows, store_b, actions)
        for round_ in range(5):
            cid = await a.ask_for_human(f"t{round_}")
            results = await asyncio.gather(a.desk.claim(cid, "alice"),
                                           b.desk.claim(cid, "bob"), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(errors) == 1 and isinstance(errors[0], OwnershipError), results
            conv = await store_b.load_by_id(cid)
            assert conv is not None and conv.owner == "human"
            assert conv.owner_agent in ("alice", "bob")
            claims = [m for m in await store_a.messages(cid) if m.text == "claim"]
            assert len(claims) == 1
    finally:
        await store_a.close()
        await store_b.close()


async def test_claim_needs_a_waiting_conversation(d: Desk) -> None:
    await d.say("I want a refund")
    cid = (await d.conv()).id
    with pytest.raises(OwnershipError, match="owned by bot"):
        await d.desk.claim(cid, "alice")
    with pytest.raises(OwnershipError, match="no such conversation"):
        await d.desk.claim("nope", "alice")


# --------------------------------------------------------------------------- reply and note


async def test_only_the_owner_replies_and_the_reply_reaches_the_channel(d: Desk) -> None:
    cid = await d.ask_for_human()
    with pytest.raises(OwnershipError, match="claim the conversation first"):
        await d.desk.reply(cid, "alice", "Hi")
    await d.desk.claim(cid, "alice")
    with pytest.raises(OwnershipError, match="owned by alice"):
        await d.desk.reply(cid, "bob", "Hi, I'm Bob")
    with pytest.raises(OwnershipError, match="empty"):
        await d.desk.reply(cid, "alice", "   ")
    before = len(d.sent)
    out = await d.desk.reply(cid, "alice", "  Hi, I'm Alice. Let me look at your order.  ")
    assert d.sent[before:] == [out]
    assert (out.text, out.kind, out.author) == (
        "Hi, I'm Alice. Let me look at your order.", "agent", "agent:alice")
    last = (await d.store.messages(cid))[-1]
    assert (last.direction, last.author, last.seq) == ("out", "agent:alice", out.seq)


async def test_notes_never_reach_the_customer_or_the_model(d: Desk) -> None:
    cid = await d.ask_for_human()
    before = len(d.sent)
    await d.desk.note(cid, "bob", "Customer called yesterday too. 已核实。")
    await d.desk.claim(cid, "alice")
    await d.desk.note(cid, "alice", "Refund looks fine; SECRET-NOTE")
    await d.desk.reply(cid, "alice", "Hi, I'm Alice")
    await d.desk.hand_back(cid, "alice")
    await d.say("it arrived damaged")
    sent = [m.text for m in d.sent[before:]]
    assert sent and not any("SECRET-NOTE" in t or "已核实" in t for t in sent)
    notes = [m for m in await d.store.messages(cid) if m.kind == "note"]
    assert [(n.direction, n.author) for n in notes] == [("event", "agent:bob"),
                                                        ("event", "agent:alice")]
    history = await d.engine.history(cid, 50)
    assert not any("SECRET-NOTE" in h.text for h in history)
    assert [h.text for h in history if h.role == "agent"] == ["Hi, I'm Alice"]
    with pytest.raises(OwnershipError, match="no human handoff is open"):
        await d.desk.note(cid, "alice", "too late")
    with pytest.raises(OwnershipError, match="empty"):
        await d.desk.note(cid, "alice", "")


# --------------------------------------------------------------------------- hand back


async def test_hand_back_resumes_where_the_bot_left_off_with_a_marker(d: Desk) -> None:
    cid = await d.ask_for_human()
    assert (await d.conv()).results["_handoff"]["resume"] == "ask_reason"
    await d.desk.claim(cid, "alice")
    with pytest.raises(OwnershipError, match="owned by alice"):
        await d.desk.hand_back(cid, "bob")
    before = len(d.sent)
    await d.desk.hand_back(cid, "alice", "address verified")
    [back] = d.sent[before:]
    assert back.author == "bot" and "AI assistant again" in back.text
    conv = await d.conv()
    assert (conv.owner, conv.owner_agent, conv.flow, conv.state) == (
        "bot", None, "refund", "ask_reason")
    assert conv.handoff_reason is None and conv.waiting_since is None
    assert "_handoff" not in conv.results
    assert conv.entities["order_id"]["v"] == ORDER_SMALL
    assert await d.desk.queue() == []

    asked = len(d.model.requests)
    replies = await d.say("it arrived damaged")
    assert replies and "Shall I go ahead?" in replies[0].text
    request = d.model.requests[asked]
    assert request.state == "ask_reason"
    assert request.handback == "agent alice handed back: address verified"
    # The marker is shown to the model once.
    await d.say("yes")
    assert d.model.requests[-1].handback == ""
    assert (await d.conv()).state == "refunded"


async def test_hand_back_needs_a_claim(d: Desk) -> None:
    cid = await d.ask_for_human()
    with pytest.raises(OwnershipError, match="claim the conversation first"):
        await d.desk.hand_back(cid, "alice")


async def rating_handoff_handed_back(d: Desk) -> ConversationState:
    """A finished refund rated 2, claimed by alice and handed back."""
    await d.say("I want a refund")
    await d.say(ORDER_SMALL)
    await d.say("it arrived damaged")
    await d.say("yes")
    sent = await d.rate(2)
    assert [o.kind for o in sent] == ["handoff"]
    conv = await d.conv()
    assert (conv.flow, conv.handoff_reason) == ("refund", "satisfaction")
    await d.desk.claim(conv.id, "alice")
    await d.desk.hand_back(conv.id, "alice")
    return await d.conv()


async def test_hand_back_after_a_rating_handoff_lets_the_bot_answer_again(d: Desk) -> None:
    conv = await rating_handoff_handed_back(d)
    # The journey was over when the customer rated it: the bot resumes there,
    # and the next message starts a new one.
    assert (conv.owner, conv.flow, conv.state) == ("bot", "refund", "refunded")
    replies = await d.say("where is my parcel HL26111876?")
    assert replies and "SF142087315630" in replies[0].text
    assert (await d.conv()).flow == "logistics"


async def test_hand_back_marker_survives_a_new_journey(d: Desk) -> None:
    await rating_handoff_handed_back(d)
    await d.say("where is my parcel HL26111876?")
    assert "alice handed back" in d.model.requests[-1].handback


# --------------------------------------------------------------------------- resolve


async def test_resolve_closes_the_conversation(d: Desk) -> None:
    cid = await d.ask_for_human()
    await d.desk.claim(cid, "alice")
    with pytest.raises(OwnershipError, match="owned by alice"):
        await d.desk.resolve(cid, "bob")
    before = len(d.sent)
    await d.desk.resolve(cid, "alice")
    [done] = d.sent[before:]
    assert "resolved" in done.text
    conv = await d.conv()
    assert (conv.owner, conv.owner_agent, conv.closed) == ("resolved", "alice", True)
    assert await d.desk.queue() == []
    for act in (d.desk.claim(cid, "bob"), d.desk.hand_back(cid, "alice"),
                d.desk.resolve(cid, "alice")):
        with pytest.raises(OwnershipError):
            await act
    # A new message after resolution starts a new journey with the bot.
    replies = await d.say("I want a refund")
    assert (await d.conv()).owner == "bot" and replies


async def test_any_agent_may_resolve_a_waiting_conversation(d: Desk) -> None:
    cid = await d.ask_for_human()
    await d.desk.resolve(cid, "bob")
    assert (await d.conv()).owner == "resolved"
    assert desk_actions(d) == ["resolve"]


# --------------------------------------------------------------------------- expiry


async def test_queue_timeout_hands_back_with_an_apology_and_a_callback_ticket(
    flows: FlowSet, store: Store, actions: ActionRegistry
) -> None:
    d = make_desk(flows, store, actions, queue_timeout=60)
    cid = await d.ask_for_human()
    claimed = await d.ask_for_human("claimed")
    await d.desk.claim(claimed, "bob")
    d.clock.advance(59)
    assert await d.desk.expire() == []
    d.clock.advance(2)
    before = len(d.sent)
    assert await d.desk.expire() == [cid]
    [apology] = d.sent[before:]
    conv = await d.conv()
    ticket = conv.results["callback_ticket"]
    assert re.fullmatch(r"CB[0-9A-F]{8}", ticket)
    assert apology.text.startswith("I'm sorry") and ticket in apology.text
    assert (conv.owner, conv.state) == ("bot", "ask_reason")
    assert [i.conversation_id for i in await d.desk.queue()] == [claimed]  # claims never expire
    assert await d.desk.expire() == []
    event = next(e for e in d.events if isinstance(e, DeskEvent) and e.action == "timeout")
    assert event.agent is None and event.data == {"ticket": ticket}
    # The bot takes over again, told why.
    await d.say("it arrived damaged")
    assert f"callback ticket {ticket}" in d.model.requests[-1].handback


async def test_queue_timeout_apologises_in_the_customers_language(
    flows: FlowSet, store: Store, actions: ActionRegistry
) -> None:
    d = make_desk(flows, store, actions, queue_timeout=60)
    await d.say("转人工")
    d.clock.advance(61)
    await d.desk.expire()
    assert d.sent[-1].text.startswith("非常抱歉") and "CB" in d.sent[-1].text


async def test_run_expiry_keeps_going_after_a_failure(
    flows: FlowSet, store: Store, actions: ActionRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    d = make_desk(flows, store, actions, queue_timeout=60)
    calls = 0
    original = d.desk.expire

    async def flaky() -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database hiccup")
        return await original()

    d.desk.expire = flaky  # type: ignore[method-assign]
    task = asyncio.create_task(d.desk.run_expiry(every=0.001))
    while calls < 3:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "queue expiry failed" in caplog.text


# --------------------------------------------------------------------------- events


async def test_every_desk_action_is_published_with_its_records(d: Desk) -> None:
    cid = await d.ask_for_human()
    await d.desk.claim(cid, "alice")
    await d.desk.note(cid, "alice", "checking")
    await d.desk.reply(cid, "alice", "Hi")
    await d.desk.hand_back(cid, "alice")
    events = [e for e in d.events if isinstance(e, DeskEvent)]
    assert [(e.action, e.agent, e.conversation.owner) for e in events] == [
        ("claim", "alice", "human"), ("note", "alice", "human"),
        ("reply", "alice", "human"), ("hand_back", "alice", "bot")]
    assert [r.kind for r in events[1].records] == ["note"] and not events[1].outbound
    assert [o.kind for o in events[2].outbound] == ["agent"]
    assert [r.kind for r in events[3].records] == ["event", "text"]
