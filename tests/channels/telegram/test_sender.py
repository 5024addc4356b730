"""The ordered sender (against the fake Bot API through aiogram), the per-chat queues, and
the plugin's configuration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.methods import SendMessage

from channels.telegram.channel import claim_poller, release_poller
from channels.telegram.plugin import TelegramConfig, make
from channels.telegram.queues import KeyedWorkers
from channels.telegram.sender import TelegramSender
from engine.config import Settings
from engine.core.types import Outbound, QuickReply
from engine.errors import ChannelError, ConfigError
from engine.store.base import ConversationKey
from tests.fakes.telegram_api import DEFAULT_TOKEN, FakeTelegram

BOT_ID = int(DEFAULT_TOKEN.split(":")[0])
CHAT = 31337


def out(text: str, seq: int = 1, chat: int = CHAT, **fields: Any) -> Outbound:
    key = ConversationKey("telegram", str(BOT_ID), str(chat))
    return Outbound(conversation_id=f"conv-{chat}", key=key, seq=seq, text=text, **fields)


class Harness:
    def __init__(self, tg: FakeTelegram) -> None:
        self.tg = tg
        self.bot = Bot(DEFAULT_TOKEN,
                       session=AiohttpSession(api=TelegramAPIServer.from_base(tg.url)))
        self.blocked: list[Outbound] = []
        self.slept: list[float] = []
        self.sender = TelegramSender(self.bot, BOT_ID, on_blocked=self.on_blocked,
                                     sleep=self.sleep)

    async def on_blocked(self, message: Outbound) -> None:
        self.blocked.append(message)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)

    async def drain(self) -> None:
        assert await self.sender._workers.join(5)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with FakeTelegram() as tg:
        h = Harness(tg)
        tg.push_message(CHAT, "hi")
        tg.push_message(CHAT + 1, "hi")
        try:
            yield h
        finally:
            await h.sender.close(5)
            await h.bot.session.close()


async def test_messages_go_out_in_order(harness: Harness) -> None:
    for n in range(5):
        await harness.sender(out(f"m{n}", seq=n))
    await harness.drain()
    assert harness.tg.texts(CHAT) == [f"m{n}" for n in range(5)]


async def test_retry_after_waits_and_resends_the_same_message(harness: Harness) -> None:
    harness.tg.fail_sends(3, retry_after=2, chat_id=CHAT)
    await harness.sender(out("first", 1))
    await harness.sender(out("second", 2))
    await harness.sender(out("elsewhere", 1, chat=CHAT + 1))
    await harness.drain()
    assert harness.slept == [2, 2, 2]
    assert harness.tg.texts(CHAT) == ["first", "second"]
    assert harness.tg.texts(CHAT + 1) == ["elsewhere"]  # another chat is not held up
    assert harness.sender.stats == {"sent": 3, "retried": 3, "dropped": 0, "failed": 0}


async def test_gives_up_after_max_attempts(harness: Harness) -> None:
    harness.sender.max_attempts = 2
    harness.tg.fail_sends(5, retry_after=1, chat_id=CHAT)
    await harness.sender(out("lost", 1))
    await harness.sender(out("next", 2))
    await harness.drain()
    assert harness.sender.stats["failed"] == 2
    assert harness.tg.texts(CHAT) == []
    await harness.sender(out("later", 3))
    await harness.drain()
    assert harness.tg.texts(CHAT) == ["later"]


async def test_forbidden_drops_the_chat_and_reports_once(harness: Harness) -> None:
    harness.tg.block(CHAT)
    for n in range(3):
        await harness.sender(out(f"m{n}", n))
    await harness.drain()
    assert [c.status for c in harness.tg.calls_to("sendMessage")] == [403]
    assert [m.text for m in harness.blocked] == ["m0"]
    assert harness.sender.blocked == {CHAT}
    await harness.sender(out("after", 9))  # dropped before any call
    await harness.drain()
    assert len(harness.tg.calls_to("sendMessage")) == 1
    harness.sender.unblock(CHAT)
    harness.tg.unblock(CHAT)
    await harness.sender(out("back", 10))
    await harness.drain()
    assert harness.tg.texts(CHAT) == ["back"]


async def test_keyboard_on_the_last_chunk(harness: Harness) -> None:
    quick = (QuickReply("Yes, refund", "Yes, refund"), QuickReply("No, cancel", "No, cancel"))
    await harness.sender(out("word " * 1000, quick_replies=quick))
    await harness.drain()
    sent = harness.tg.messages(CHAT)
    assert len(sent) == 2
    assert sent[0].reply_markup is None
    assert [b["callback_data"] for b in sent[1].buttons()] == ["q:Yes, refund", "q:No, cancel"]


async def test_html_rejected_by_telegram_is_resent_as_plain_text(harness: Harness) -> None:
    # Our own calls are always escaped; this one is not, as a bug elsewhere might make it.
    call = SendMessage(chat_id=CHAT, text="R&D <team>", parse_mode="HTML")
    assert await harness.sender._send(CHAT, call, out("R&D <team>"))
    assert [c.status for c in harness.tg.calls_to("sendMessage")] == [400, 200]
    [sent] = harness.tg.messages(CHAT)
    assert (sent.text, sent.parse_mode) == ("R&D <team>", None)


async def test_other_conversations_are_not_sent(harness: Harness) -> None:
    other = Outbound(conversation_id="x", key=ConversationKey("telegram", "999", str(CHAT)),
                     seq=1, text="not mine")
    await harness.sender(other)
    await harness.sender(Outbound(conversation_id="y", key=ConversationKey("web", "s", "t"),
                                  seq=1, text="web"))
    await harness.drain()
    assert harness.tg.calls_to("sendMessage") == []


async def test_close_sends_what_is_queued_then_refuses(harness: Harness) -> None:
    await harness.sender(out("queued"))
    await harness.sender.close(5)
    assert harness.tg.texts(CHAT) == ["queued"]
    await harness.sender(out("too late", 2))
    assert harness.sender.idle() and harness.sender.stats["dropped"] == 1


# --- KeyedWorkers -------------------------------------------------------------------------


async def test_keyed_workers_order_per_key_and_parallel_keys() -> None:
    seen: list[tuple[str, int]] = []
    gate = asyncio.Event()

    async def handle(key: str, item: int) -> None:
        if key == "slow":
            await gate.wait()
        if item == 2:
            raise RuntimeError("boom")  # logged; the queue goes on
        seen.append((key, item))

    workers: KeyedWorkers[str, int] = KeyedWorkers(handle, name="test")
    for n in range(4):
        workers.submit("slow", n)
        workers.submit("fast", n)
    assert not await workers.join(0.2)  # "slow" waits for the gate
    assert [i for k, i in seen if k == "fast"] == [0, 1, 3]
    assert workers.pending("slow") == 3
    assert workers.discard("slow") == 3
    workers.submit("slow", 9)
    gate.set()
    assert await workers.join(2)
    assert [i for k, i in seen if k == "slow"] == [0, 9]
    assert len(workers) == 0


async def test_keyed_workers_cancel() -> None:
    started = asyncio.Event()

    async def handle(key: str, item: int) -> None:
        started.set()
        await asyncio.sleep(60)

    workers: KeyedWorkers[str, int] = KeyedWorkers(handle, name="test")
    workers.submit("a", 1)
    workers.submit("a", 2)
    await started.wait()
    await workers.cancel()
    assert len(workers) == 0 and workers.pending("a") == 0


# --- configuration ------------------------------------------------------------------------


class _Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.extras: dict[str, Any] = {}


def test_not_configured_means_no_plugin() -> None:
    assert make(_Context(Settings(telegram_token=None))) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"telegram_token": "not a token"}, "bot token"),
    ({"telegram_token": DEFAULT_TOKEN, "telegram_mode": "webhook"}, "webhook_secret is unset"),
    ({"telegram_token": DEFAULT_TOKEN, "telegram_webhook_secret": "has spaces"},
     "A-Z, a-z, 0-9"),
])
def test_invalid_configuration(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TelegramConfig.from_settings(Settings(**overrides))


def test_config_never_shows_secrets() -> None:
    config = TelegramConfig.from_settings(Settings(
        telegram_token=DEFAULT_TOKEN, telegram_mode="webhook",
        telegram_webhook_secret="s3cret-value"))
    assert config is not None and config.bot_id == BOT_ID
    shown = repr(config) + repr(Settings(telegram_token=DEFAULT_TOKEN))
    assert DEFAULT_TOKEN.split(":")[1] not in shown and "s3cret-value" not in shown


def test_one_poller_per_token_in_a_process() -> None:
    claim_poller(1)
    try:
        with pytest.raises(ChannelError, match="one poller per token"):
            claim_poller(1)
        claim_poller(2)
        release_poller(2)
    finally:
        release_poller(1)
    claim_poller(1)
    release_poller(1)
