"""One customer on any channel: drivers for the channel conformance suite.

``conformance_server`` (module scope; use it from a module marked
``pytestmark = pytest.mark.asyncio(loop_scope="module")``) starts ONE live
server with all three customer channels: web chat (always on), Telegram in
polling mode against a :class:`~tests.fakes.telegram_api.FakeTelegram` (with
``telegram_demo_customers``) and Slack in events mode against a
:class:`~tests.fakes.slack_api.FakeSlack`, with signed events sent to
``/slack/events``. The demo flows and the demo shop are used, offline model.

``channel_driver`` is parametrized over the channels (ids ``web``,
``telegram``, ``slack``); each test gets a :class:`ChannelDriver` for a new
customer in a new conversation. Every driver speaks its channel's own wire
protocol and offers the same operations:

* ``send(text, message_id=None)``: a customer message, returned id in hand so
  ``redeliver(message_id)`` can deliver exactly the same thing again;
* ``press(choice)``: tap a button of the latest message that offers it (a
  quick-reply payload, or an ``int`` for a rating);
* ``replies(timeout)``: waits until the server has nothing left to do for this
  customer and returns what the customer received since the last call, in
  order, as :class:`Reply` (text plus the payloads of its buttons);
* ``conversation()`` / ``records()``: the conversation in the store (its id is
  what ``server.desk.claim/reply/hand_back`` take) and its transcript;
* ``fresh()``: another new customer on the same channel.

Customer identity and the demo orders: web visitors (``demo:web:<session>``) and
Telegram users with ``telegram_demo_customers`` (``demo:telegram:<id>``) may see
every demo order. Slack has no such switch: its customers are always
``slack:<team>:<user>``, so :meth:`ConformanceServer.fresh_shop` re-seeds the shop
and gives the order to a non-demo customer, as a real shop's records would.
"""

from __future__ import annotations

import abc
import asyncio
import copy
import itertools
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_asyncio
from websockets.exceptions import ConnectionClosed

from engine.demo.actions import DEMO_CUSTOMER_PREFIX
from engine.demo.shop import CustomerRow, OrderRow, Shop
from engine.store.base import ConversationKey, ConversationState, MessageRecord
from tests.channels.web.chatclient import ChatClient, Frame, new_session
from tests.channels.web.conftest import LiveServer, live_settings, start_live_server
from tests.fakes.slack_api import BOT_TOKEN, SIGNING_SECRET, TEAM_ID, FakeSlack, SlackEvents
from tests.fakes.telegram_api import DEFAULT_TOKEN, FakeTelegram, SentMessage

TELEGRAM_BOT_ID = int(DEFAULT_TOKEN.split(":")[0])
#: The Slack channel customers write in (each conversation is one thread in it).
SLACK_SUPPORT = "C0CONFORM"
#: What a rating prompt offers, on every channel.
RATING_CHOICES = tuple(f"rating:{n}" for n in range(1, 6))
CHANNELS = ("web", "telegram", "slack")

_numbers = itertools.count(1)


def normalized(text: str) -> str:
    """Words only, lower case: a text as it reads, whatever markup the channel renders."""
    return " ".join(re.findall(r"\w+", text.lower()))


@dataclass(frozen=True, slots=True)
class Reply:
    """One message the customer received: its text and the payloads of its buttons
    (``rating:N`` for the rating buttons)."""

    text: str
    choices: tuple[str, ...] = ()


# --------------------------------------------------------------------------- the server


@dataclass
class ConformanceServer:
    """The live server with web, Telegram and Slack, and the fakes behind them."""

    live: LiveServer
    tg: FakeTelegram
    slack: FakeSlack
    events: SlackEvents

    @property
    def context(self) -> Any:
        return self.live.context

    @property
    def desk(self) -> Any:
        return self.live.context.desk

    @property
    def store(self) -> Any:
        return self.live.context.app.store

    @property
    def shop(self) -> Shop:
        shop: Shop = self.live.context.app.shop
        return shop

    async def fresh_shop(self, driver: ChannelDriver, *orders: str) -> None:
        """Seed the shop again; ``orders`` become ``driver``'s if it may not see them all."""
        await self.shop.reset()
        if not driver.customer.startswith(DEMO_CUSTOMER_PREFIX):
            for order_id in orders:
                await give_order(self.shop, order_id, driver.customer)

    def driver(self, channel: str) -> ChannelDriver:
        drivers: dict[str, type[ChannelDriver]] = {
            "web": WebDriver, "telegram": TelegramDriver, "slack": SlackDriver}
        return drivers[channel](self, [])


async def give_order(shop: Shop, order_id: str, customer: str) -> None:
    """Make ``customer`` (created if missing) the owner of ``order_id``.

    The demo shop has no API for it; this writes its tables directly.
    """
    async with shop._session() as session:
        if await session.get(CustomerRow, customer) is None:
            session.add(CustomerRow(id=customer, name="Casey Conformance", name_zh="测试",
                                    email="casey@example.com", phone="+86 138 0000 0000"))
        order = await session.get(OrderRow, order_id)
        assert order is not None, f"no order {order_id} in the demo shop"
        order.customer_id = customer
        session.add(order)
        await session.commit()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def conformance_server(tmp_path_factory: pytest.TempPathFactory
                             ) -> AsyncIterator[ConformanceServer]:
    tmp_path: Path = tmp_path_factory.mktemp("conformance")
    async with FakeTelegram() as tg, FakeSlack() as slack:
        settings = live_settings(
            tmp_path,
            channels=list(CHANNELS),
            telegram_token=DEFAULT_TOKEN,
            telegram_api_base=tg.url,
            telegram_poll_timeout=10,
            telegram_demo_customers=True,
            slack_bot_token=BOT_TOKEN,
            slack_signing_secret=SIGNING_SECRET,
            slack_api_base=slack.api_url,
        )
        live = await start_live_server(settings)
        events = SlackEvents(live.url + "/slack/events", SIGNING_SECRET, fake=slack)
        try:
            assert set(CHANNELS) <= set(live.context.extras), live.context.extras.keys()
            # Slack paces about one message per second per channel; the fake has no limit.
            live.context.extras["slack"].poster.rate = 200.0
            yield ConformanceServer(live, tg, slack, events)
        finally:
            await live.stop()
            await events.aclose()
        assert tg.handler_errors == []


@pytest_asyncio.fixture(params=CHANNELS, loop_scope="module")
async def channel_driver(request: pytest.FixtureRequest,
                         conformance_server: ConformanceServer
                         ) -> AsyncIterator[ChannelDriver]:
    """A new customer on each channel (ids ``web``, ``telegram``, ``slack``)."""
    driver = conformance_server.driver(request.param)
    try:
        yield driver
    finally:
        for opened in driver.family:
            await opened.close()


# --------------------------------------------------------------------------- drivers


class ChannelDriver(abc.ABC):
    """One customer in one conversation, talking over one channel's real protocol."""

    channel: ClassVar[str]

    def __init__(self, server: ConformanceServer, family: list[ChannelDriver]) -> None:
        self.server = server
        #: This driver and those made by :meth:`fresh` (the fixture closes them all).
        self.family = family
        family.append(self)
        self.number = next(_numbers)
        self.sent_ids: list[str] = []
        self._taken = 0

    # -- identity --------------------------------------------------------------

    @property
    @abc.abstractmethod
    def customer(self) -> str:
        """The customer id the engine sees for this customer."""

    @property
    @abc.abstractmethod
    def key(self) -> ConversationKey:
        """The conversation's key (known once the customer has written)."""

    async def conversation(self) -> ConversationState:
        conv: ConversationState | None = await self.server.store.load(self.key)
        assert conv is not None, f"no conversation for {self.key}"
        return conv

    async def records(self) -> list[MessageRecord]:
        conv = await self.conversation()
        records: list[MessageRecord] = await self.server.store.messages(conv.id)
        return records

    def fresh(self) -> ChannelDriver:
        """A new customer, in a new conversation, on the same channel."""
        return type(self)(self.server, self.family)

    # -- the customer's side -----------------------------------------------------

    def new_id(self) -> str:
        return f"{self.channel}-{self.number}-{uuid.uuid4().hex[:12]}"

    @abc.abstractmethod
    async def send(self, text: str, message_id: str | None = None) -> str:
        """Deliver a customer message (not waiting for answers); returns its id."""

    @abc.abstractmethod
    async def redeliver(self, message_id: str) -> None:
        """Deliver the message sent as ``message_id`` again, exactly as the first time."""

    @abc.abstractmethod
    async def press(self, choice: str | int) -> None:
        """Tap the button with payload ``choice`` (``int``: that rating) of the latest
        message offering it."""

    @abc.abstractmethod
    async def press_again(self, choice: str | int) -> None:
        """Tap ``choice`` on the message of the last :meth:`press` once more: a double
        tap, or another device of the customer still showing the spent buttons."""

    @abc.abstractmethod
    async def settle(self, timeout: float) -> None:
        """Wait until the server has handled everything sent and delivered every reply."""

    @abc.abstractmethod
    def received(self) -> list[Reply]:
        """Everything the customer has received (from the bot or an agent), in order."""

    async def replies(self, timeout: float = 10.0) -> list[Reply]:
        """What the customer received since the last call, once the server is idle."""
        await self.settle(timeout)
        seen = self.received()
        new, self._taken = seen[self._taken:], len(seen)
        return new

    async def say(self, text: str) -> list[Reply]:
        await self.send(text)
        return await self.replies()

    async def close(self) -> None:  # noqa: B027 (optional)
        """Release what the driver holds (a socket)."""

    @staticmethod
    def choice_payload(choice: str | int) -> str:
        return f"rating:{choice}" if isinstance(choice, int) else choice

    def pressable(self, replies: list[Reply], choice: str | int) -> int:
        """The index of the latest reply offering ``choice``."""
        payload = self.choice_payload(choice)
        for index in range(len(replies) - 1, -1, -1):
            if payload in replies[index].choices:
                return index
        raise AssertionError(f"{self.channel}: no message offers {payload!r}: "
                             f"{[r.choices for r in replies if r.choices]}")


async def _until(check: Any, timeout: float, what: str, *, quiet: int = 1) -> None:
    """Poll ``check()`` until it holds ``quiet`` times in a row."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    streak = 0
    while streak < quiet:
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        streak = streak + 1 if check() else 0
        await asyncio.sleep(0.01)


class WebDriver(ChannelDriver):
    """A browser tab: ``POST /chat/session``, then the WebSocket protocol."""

    channel = "web"

    def __init__(self, server: ConformanceServer, family: list[ChannelDriver]) -> None:
        super().__init__(server, family)
        self.client: ChatClient | None = None
        self.session = ""
        self.site = "default"
        self.frames: list[Frame] = []
        self._frames_sent: dict[str, Frame] = {}
        #: Customer frames sent (each is one turn: typing on ... typing off).
        self._turns = 0
        self._pings = 0
        self._reader: asyncio.Task[None] | None = None
        self._customer = ""

    @property
    def customer(self) -> str:
        return self._customer

    @property
    def key(self) -> ConversationKey:
        return ConversationKey("web", self.site, self.session)

    async def open(self) -> ChatClient:
        if self.client is None:
            data = await new_session(self.server.live.url, site=self.site)
            self.session = data["session"]
            claims = self.server.live.channel.signer.verify(data["token"])
            self._customer = claims.customer
            self.client, frames = await ChatClient.start(self.server.live.ws_url, data["token"])
            self.frames.extend(frames)
            self._reader = asyncio.create_task(self._read(self.client), name="web-driver")
        return self.client

    async def _read(self, client: ChatClient) -> None:
        try:
            while True:
                self.frames.append(await client.recv(timeout=3600))
        except ConnectionClosed:
            return

    async def _submit(self, frame: Frame) -> None:
        client = await self.open()
        self._turns += 1
        await client.send(frame)

    async def send(self, text: str, message_id: str | None = None) -> str:
        message_id = message_id or self.new_id()
        frame = {"type": "message", "id": message_id, "text": text}
        self._frames_sent[message_id] = frame
        self.sent_ids.append(message_id)
        await self._submit(frame)
        return message_id

    async def redeliver(self, message_id: str) -> None:
        await self._submit(self._frames_sent[message_id])

    async def press(self, choice: str | int) -> None:
        self.pressable(self.received(), choice)
        # What the widget sends: a rating frame for the stars, quick_reply otherwise.
        await self.press_again(choice)

    async def press_again(self, choice: str | int) -> None:
        # The web protocol's button frames do not name the message they answer.
        frame: Frame = ({"type": "rating", "id": self.new_id(), "value": choice}
                        if isinstance(choice, int) else
                        {"type": "quick_reply", "id": self.new_id(), "payload": choice})
        await self._submit(frame)

    async def settle(self, timeout: float) -> None:
        client = await self.open()
        # Every customer frame is one turn, closed by `typing off` (also a duplicate's).
        await _until(lambda: self._count({"type": "typing", "on": False}) >= self._turns,
                     timeout, f"{self._turns} turns to end on the web socket")
        errors = [f for f in self.frames if f["type"] == "error"]
        assert errors == [], errors
        # Pushed agent messages are queued before the pong: a ping flushes them.
        self._pings += 1
        await client.send({"type": "ping"})
        await _until(lambda: self._count({"type": "pong"}) >= self._pings, timeout,
                     "the pong")

    def _count(self, frame: Frame) -> int:
        return sum(1 for f in self.frames if f == frame)

    def received(self) -> list[Reply]:
        return [Reply(f["text"], tuple(q["payload"] for q in f.get("quick_replies") or ()))
                for f in self.frames
                if f["type"] == "message" and f["author"] != "customer"]

    async def close(self) -> None:
        if self.client is not None:
            await self.client.ws.close()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)


_telegram_chats = itertools.count(7_770_001)


class TelegramDriver(ChannelDriver):
    """A Telegram user in a private chat with the bot; the fake Bot API queues the
    updates and the channel long-polls them."""

    channel = "telegram"

    def __init__(self, server: ConformanceServer, family: list[ChannelDriver]) -> None:
        super().__init__(server, family)
        self.chat = next(_telegram_chats)
        self._updates: dict[str, dict[str, Any]] = {}
        #: Updates pushed for this chat, and the channel's update count before the first.
        self._pushed = 0
        self._taken_before: int = self.plugin.stats["updates"]
        self._pressed: int | None = None

    @property
    def tg(self) -> FakeTelegram:
        return self.server.tg

    @property
    def plugin(self) -> Any:
        return self.server.context.extras["telegram"]

    @property
    def customer(self) -> str:
        return f"demo:telegram:{self.chat}"

    @property
    def key(self) -> ConversationKey:
        return ConversationKey("telegram", str(TELEGRAM_BOT_ID), str(self.chat))

    def _push(self, update: dict[str, Any]) -> dict[str, Any]:
        self._pushed += 1
        return self.tg.push_update(update)

    async def send(self, text: str, message_id: str | None = None) -> str:
        message_id = message_id or self.new_id()
        self._pushed += 1
        self._updates[message_id] = self.tg.push_message(self.chat, text)
        self.sent_ids.append(message_id)
        return message_id

    async def redeliver(self, message_id: str) -> None:
        # The same update (same update_id), as Telegram re-sends it when the
        # offset was not confirmed.
        self._push(self._updates[message_id])

    async def press(self, choice: str | int) -> None:
        payload = self.choice_payload(choice)
        messages = self.tg.messages(self.chat)
        message = messages[self.pressable([_telegram_reply(m) for m in messages], choice)]
        [button] = [b for b in message.buttons() if _telegram_payload(b) == payload]
        self._pressed = message.message_id
        self._pushed += 1
        self.tg.push_callback(self.chat, data=str(button["callback_data"]),
                              message_id=message.message_id)

    async def press_again(self, choice: str | int) -> None:
        assert self._pressed is not None, "nothing pressed yet"
        payload = self.choice_payload(choice)
        data = ("r:" + payload.removeprefix("rating:") if payload.startswith("rating:")
                else "q:" + payload)
        self._pushed += 1
        self.tg.push_callback(self.chat, data=data, message_id=self._pressed)

    async def settle(self, timeout: float) -> None:
        # Every update pushed reached the channel (the fake also drops an update whose
        # id is below the poller's offset: that must not pass for "answered once").
        await _until(lambda: self.plugin.stats["updates"] - self._taken_before >= self._pushed,
                     timeout, f"the poller to take {self._pushed} updates")
        await _until(lambda: not self.tg.pending_updates() and self.plugin.idle(), timeout,
                     "the Telegram channel to be idle", quiet=3)

    def received(self) -> list[Reply]:
        return [_telegram_reply(m) for m in self.tg.messages(self.chat)]


def _telegram_payload(button: dict[str, Any]) -> str:
    data = str(button.get("callback_data", ""))
    if data.startswith("r:"):
        return "rating:" + data.removeprefix("r:")
    if data.startswith("q:"):
        return data.removeprefix("q:")
    return str(button.get("text", ""))  # h:<digest>: the label stands for the payload


def _telegram_reply(message: SentMessage) -> Reply:
    return Reply(message.text, tuple(_telegram_payload(b) for b in message.buttons()))


class SlackDriver(ChannelDriver):
    """A Slack user writing in a support channel; the conversation is the thread its
    first message starts. Signed events go to ``/slack/events``; replies are read from
    the fake Web API's message log."""

    channel = "slack"

    def __init__(self, server: ConformanceServer, family: list[ChannelDriver]) -> None:
        super().__init__(server, family)
        self.user = f"U0CONF{self.number:04d}"
        self.root: str | None = None
        self._envelopes: dict[str, dict[str, Any]] = {}
        self._pressed: dict[str, Any] | None = None

    @property
    def plugin(self) -> Any:
        return self.server.context.extras["slack"]

    @property
    def customer(self) -> str:
        return f"slack:{TEAM_ID}:{self.user}"

    @property
    def key(self) -> ConversationKey:
        assert self.root is not None, "the customer has not written yet"
        return ConversationKey("slack", TEAM_ID, f"{SLACK_SUPPORT}:{self.root}")

    async def send(self, text: str, message_id: str | None = None) -> str:
        message_id = message_id or f"Ev{uuid.uuid4().hex[:16].upper()}"
        envelope = self.server.events.message(SLACK_SUPPORT, self.user, text,
                                              thread_ts=self.root, event_id=message_id)
        if self.root is None:
            self.root = envelope["event"]["ts"]
        self._envelopes[message_id] = envelope
        self.sent_ids.append(message_id)
        response = await self.server.events.send(envelope)
        assert response.status_code == 200, response.text
        return message_id

    async def redeliver(self, message_id: str) -> None:
        [response] = await self.server.events.redeliver(self._envelopes[message_id])
        assert response.status_code == 200, response.text

    def _posted(self) -> list[dict[str, Any]]:
        if self.root is None:
            return []
        return self.server.slack.posted(SLACK_SUPPORT, thread_ts=self.root)

    async def press(self, choice: str | int) -> None:
        payload = self.choice_payload(choice)
        posted = self._posted()
        message = posted[self.pressable([_slack_reply(m) for m in posted], choice)]
        [button] = [b for b in _slack_buttons(message) if b.get("value") == payload]
        self._pressed = copy.deepcopy(message)  # as the customer's client showed it
        await self._send_press(self._pressed, button["action_id"], payload)

    async def press_again(self, choice: str | int) -> None:
        assert self._pressed is not None, "nothing pressed yet"
        payload = self.choice_payload(choice)
        [button] = [b for b in _slack_buttons(self._pressed) if b.get("value") == payload]
        await self._send_press(self._pressed, button["action_id"], payload)

    async def _send_press(self, message: dict[str, Any], action_id: str, payload: str) -> None:
        action = self.server.events.block_actions(self.user, message, action_id,
                                                  channel=SLACK_SUPPORT, value=payload)
        response = await self.server.events.send_action(action)
        assert response.status_code == 200, response.text

    async def settle(self, timeout: float) -> None:
        assert await self.plugin.flush(timeout), "Slack work did not finish in time"

    def received(self) -> list[Reply]:
        return [_slack_reply(m) for m in self._posted()]


def _slack_buttons(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for block in message.get("blocks") or () if block.get("type") == "actions"
            for e in block.get("elements") or () if e.get("type") == "button"]


def _slack_reply(message: dict[str, Any]) -> Reply:
    return Reply(str(message.get("text", "")),
                 tuple(str(b.get("value", "")) for b in _slack_buttons(message)))


__all__ = [
    "CHANNELS",
    "RATING_CHOICES",
    "ChannelDriver",
    "ConformanceServer",
    "Reply",
    "give_order",
    "normalized",
]
