"""The Telegram channel end to end: the real server, the real aiogram client, the fake Bot API.

Everything goes over HTTP on 127.0.0.1: the customer's updates are queued in the
fake (and fetched by the channel's long poll, or POSTed to its webhook), the bot's
answers are real ``sendMessage`` calls the fake records and checks (HTML entities,
the 4096 limit, 64-byte callback data).
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest

from channels.telegram.channel import WEBHOOK_PATH, TelegramChannel
from engine.demo.shop import ORDER_SMALL
from engine.errors import ChannelError
from engine.handoff import OwnershipError
from tests.channels.telegram.conftest import (
    BOT_ID,
    WEBHOOK_SECRET,
    Customer,
    LiveServer,
)
from tests.fakes.telegram_api import MAX_TEXT, utf16_len

JOURNEYS = {
    "en": (["hi there",
            "my blender arrived with a cracked jug, I want my money back",
            f"it's {ORDER_SMALL}"],
           "Yes, refund", "Done! Refund RF"),
    "zh": (["你好",
            "杯子寄到的时候就摔坏了，我要退款",
            f"订单号是{ORDER_SMALL}"],
           "确认退款", "已办好！退款单 RF"),
}


# --- polling: whole journeys -------------------------------------------------------------------


@pytest.mark.parametrize("language", ["en", "zh"])
async def test_refund_journey_over_long_polling(telegram_server: LiveServer, customer: Customer,
                                                language: str) -> None:
    turns, confirm, done = JOURNEYS[language]
    customer.language_code = language
    first = await customer.say(turns[0])
    assert len(first) == 2  # the AI disclosure comes first, then the answer
    assert "AI" in first[0].text
    for text in turns[1:]:
        assert await customer.say(text)

    # The read-back offers the flow's quick replies as an inline keyboard.
    read_back = customer.seen[-1]
    assert "129.00" in read_back.text
    labels = [b["text"] for b in read_back.buttons()]
    assert confirm in labels
    assert all(len(b["callback_data"].encode()) <= 64 for b in read_back.buttons())

    answer = await customer.tap(confirm)
    assert done in answer[0].text
    # The tap was answered (the client's spinner stops) and the spent keyboard removed.
    assert len(customer.tg.answered) == 1
    assert read_back.reply_markup is None
    # The journey ends with the 1-5 rating as one keyboard row.
    rating = answer[-1]
    assert [b["callback_data"] for b in rating.buttons()] == [f"r:{n}" for n in range(1, 6)]

    shop = telegram_server.context.app.shop
    [refund] = await shop.refunds_for_order(ORDER_SMALL)
    assert (refund.amount, refund.status) == (Decimal("129.00"), "approved")
    conv = await telegram_server.conversation(customer.chat)
    assert (conv.flow, conv.state, conv.language) == ("refund", "refunded", language)
    assert conv.key.account == str(BOT_ID) and conv.key.thread == str(customer.chat)
    records = await telegram_server.records(customer.chat)
    inbound = [r for r in records if r.direction == "in"]
    assert all(r.channel_message_id and r.channel_message_id.startswith(f"{BOT_ID}:")
               for r in inbound)
    # Every Telegram call the channel made succeeded.
    assert [c for c in customer.tg.calls if c.status != 200] == []


@pytest.mark.telegram_settings(telegram_demo_customers=False)
async def test_identity_comes_from_telegram(telegram_server: LiveServer,
                                            customer: Customer) -> None:
    # Not a demo deployment: telegram:<id> owns no shop orders, so none is shown.
    await customer.say(f"refund for {ORDER_SMALL} please, it arrived broken")
    assert "couldn't find an order" in customer.seen[-1].text
    records = await telegram_server.records(customer.chat)
    assert records[0].author == "customer"
    assert await telegram_server.context.app.shop.refunds_for_order(ORDER_SMALL) == []


async def test_rating_is_answered_recorded_once(telegram_server: LiveServer,
                                                customer: Customer) -> None:
    turns, confirm, _ = JOURNEYS["en"]
    for text in turns:
        await customer.say(text)
    await customer.tap(confirm)
    prompt = customer.seen[-1]
    thanks = await customer.tap(data="r:5", message_id=prompt.message_id)
    assert [m.text for m in thanks] == ["Thank you for your feedback!"]
    assert len(customer.tg.answered) == 2
    assert prompt.reply_markup is None  # the spent keyboard was removed
    # The same prompt tapped again (a stale client): answered, but rated only once.
    again = await customer.tap(data="r:4", message_id=prompt.message_id)
    assert again == []
    assert len(customer.tg.answered) == 3
    records = await telegram_server.records(customer.chat)
    ratings = [r for r in records if r.kind == "rating"]
    assert [r.data.get("rating") for r in ratings] == [5]
    assert telegram_server.channel.stats["duplicates"] == 1


async def test_low_rating_hands_off_and_the_agent_reaches_the_chat(
        telegram_server: LiveServer, customer: Customer) -> None:
    turns, confirm, _ = JOURNEYS["en"]
    for text in turns:
        await customer.say(text)
    await customer.tap(confirm)
    handoff = await customer.tap(data="r:2")
    conv = await telegram_server.conversation(customer.chat)
    assert conv.owner == "pending_human" and conv.handoff_reason == "satisfaction"
    assert handoff and handoff[-1].text  # the customer is told a human is coming

    desk = telegram_server.context.desk
    await desk.claim(conv.id, "alice")
    await desk.reply(conv.id, "alice", "Hi, I'm Alice. Sorry about that, what went wrong?")
    await telegram_server.settle()
    assert customer.seen[-1].text == "Hi, I'm Alice. Sorry about that, what went wrong?"

    # While the human owns the conversation the bot stays silent.
    assert await customer.say("the refund took ages to show up") == []
    await desk.hand_back(conv.id, "alice")
    await telegram_server.settle()
    assert "AI assistant again" in customer.seen[-1].text


# --- formatting and limits ---------------------------------------------------------------------


async def test_long_agent_reply_is_split_and_escaped(telegram_server: LiveServer,
                                                     customer: Customer) -> None:
    await customer.say("I want to talk to a human")
    conv = await telegram_server.conversation(customer.chat)
    assert conv.owner == "pending_human"
    desk = telegram_server.context.desk
    await desk.claim(conv.id, "bob")
    paragraph = ("Use <b>only</b> the form & keep 3 > 2 < 4 in mind; "
                 "R&D says <script>alert(1)</script> is not HTML here. ") * 20
    text = "\n\n".join([paragraph.strip()] * 6) + "\n\nEnd 😀."
    before = len(customer.seen)
    await desk.reply(conv.id, "bob", text)
    await telegram_server.settle()
    parts = customer.seen[before:]
    assert len(parts) >= 3
    assert all(utf16_len(p.text) <= MAX_TEXT for p in parts)
    assert all(p.parse_mode == "HTML" and "&lt;b&gt;" in p.raw_text for p in parts[:-1])
    # Cut at paragraph boundaries, nothing lost or changed.
    assert "\n\n".join(p.text for p in parts) == text
    assert all(p.text.endswith("here.") for p in parts[:-1])


# --- 429 and 403 ----------------------------------------------------------------------------


async def test_retry_after_is_honoured_in_order(telegram_server: LiveServer,
                                                customer: Customer) -> None:
    await customer.say("I want to talk to a human")
    conv = await telegram_server.conversation(customer.chat)
    desk = telegram_server.context.desk
    await desk.claim(conv.id, "alice")
    tg = customer.tg
    tg.fail_sends(1, retry_after=1, chat_id=customer.chat)
    before = len(customer.seen)
    started = time.monotonic()
    for n in range(1, 4):
        await desk.reply(conv.id, "alice", f"message {n}")
    await telegram_server.settle()
    assert time.monotonic() - started >= 1.0  # the 429's retry_after was waited out
    assert [m.text for m in customer.seen[before:]] == ["message 1", "message 2", "message 3"]
    statuses = [c.status for c in tg.calls_to("sendMessage")][-4:]
    assert statuses == [429, 200, 200, 200]
    assert telegram_server.channel.sender.stats["retried"] == 1


async def test_blocked_bot_closes_the_conversation(telegram_server: LiveServer,
                                                   customer: Customer) -> None:
    await customer.say("I want to talk to a human")
    conv = await telegram_server.conversation(customer.chat)
    desk = telegram_server.context.desk
    await desk.claim(conv.id, "alice")
    tg = customer.tg
    tg.block(customer.chat)
    sends_before = len(tg.calls_to("sendMessage"))
    await desk.reply(conv.id, "alice", "are you still there?")
    await desk.reply(conv.id, "alice", "hello?")
    await telegram_server.settle()

    # One attempt (403), the queued second message is dropped, nothing else is tried.
    attempts = tg.calls_to("sendMessage")[sends_before:]
    assert [c.status for c in attempts] == [403]
    conv = await telegram_server.conversation(customer.chat)
    assert (conv.owner, conv.closed) == ("resolved", True)
    events = [r for r in await telegram_server.records(customer.chat) if r.direction == "event"]
    assert events[-1].data.get("reason") == "blocked"
    with pytest.raises(OwnershipError):
        await desk.reply(conv.id, "alice", "one more")
    assert telegram_server.channel.sender.blocked == {customer.chat}

    # The user unblocks and writes again: a fresh journey, answered normally.
    tg.unblock(customer.chat)
    answer = await customer.say("hi, I need a refund")
    assert answer and telegram_server.channel.sender.blocked == set()
    conv = await telegram_server.conversation(customer.chat)
    assert conv.owner == "bot"


async def test_block_notification_closes_the_conversation(telegram_server: LiveServer,
                                                          customer: Customer) -> None:
    await customer.say("I want to talk to a human")
    customer.tg.push_blocked(customer.chat)
    await telegram_server.settle()
    conv = await telegram_server.conversation(customer.chat)
    assert (conv.owner, conv.closed) == ("resolved", True)
    assert telegram_server.context.desk is not None
    assert await telegram_server.context.desk.queue() == []


# --- delivery guarantees --------------------------------------------------------------------


async def test_redelivered_polled_update_is_answered_once(telegram_server: LiveServer,
                                                          customer: Customer) -> None:
    update = customer.tg.push_message(customer.chat, "hello")
    await telegram_server.settle()
    answered = len(customer.seen)
    # The same update again (as after a crash between processing and confirming).
    customer.tg.push_update(update)
    await telegram_server.settle()
    assert len(customer.seen) == answered
    assert telegram_server.channel.stats["duplicates"] == 1


async def test_turns_of_one_chat_run_in_order(telegram_server: LiveServer,
                                              customer: Customer) -> None:
    for text in JOURNEYS["en"][0]:
        customer.tg.push_message(customer.chat, text)
    await telegram_server.settle()
    conv = await telegram_server.conversation(customer.chat)
    assert (conv.flow, conv.state) == ("refund", "confirm")
    texts = [r.text for r in await telegram_server.records(customer.chat)
             if r.direction == "in"]
    assert texts == JOURNEYS["en"][0]


async def test_chats_are_separate_conversations(telegram_server: LiveServer) -> None:
    alice, bob = Customer(telegram_server, 1001), Customer(telegram_server, 1002)
    telegram_server.tg.push_message(alice.chat, "I want a refund")
    telegram_server.tg.push_message(bob.chat, "where is my parcel?")
    await telegram_server.settle()
    a = await telegram_server.conversation(alice.chat)
    b = await telegram_server.conversation(bob.chat)
    assert a.id != b.id and (a.flow, b.flow) == ("refund", "logistics")
    assert alice.seen and bob.seen


# --- webhook mode ----------------------------------------------------------------------------


@pytest.mark.telegram_settings(telegram_mode="webhook", telegram_webhook_secret=WEBHOOK_SECRET)
async def test_webhook_mode(telegram_server: LiveServer, customer: Customer) -> None:
    tg = customer.tg
    [set_call] = tg.calls_to("setWebhook")
    assert set_call.params["url"] == telegram_server.url + WEBHOOK_PATH
    assert set_call.params["secret_token"] == WEBHOOK_SECRET
    assert tg.calls_to("getUpdates") == []

    # Telegram pushes the update with the secret header; the channel answers.
    first = await customer.say("hello")
    assert len(first) == 2
    assert tg.webhook_deliveries[-1].status == 200


@pytest.mark.telegram_settings(telegram_mode="webhook", telegram_webhook_secret=WEBHOOK_SECRET)
async def test_webhook_rejects_a_wrong_or_missing_secret(telegram_server: LiveServer,
                                                         customer: Customer) -> None:
    tg = customer.tg
    update = {"update_id": 1, "message": {
        "message_id": 1, "date": 1, "text": "I want a refund",
        "chat": {"id": customer.chat, "type": "private", "first_name": "Eve"},
        "from": {"id": customer.chat, "is_bot": False, "first_name": "Eve"}}}
    url = telegram_server.url + WEBHOOK_PATH
    assert await tg.deliver_webhook(update, url=url, secret="wrong") == 401
    assert await tg.deliver_webhook(update, url=url, secret=None) == 401
    assert await tg.deliver_webhook(update, url=url, secret=WEBHOOK_SECRET[:-1]) == 401
    await telegram_server.settle()
    assert customer.seen == []
    assert await telegram_server.context.app.store.conversations() == []
    assert telegram_server.channel.stats["rejected"] == 3
    # Not an update at all, with the right secret: 400, nothing processed.
    assert await tg.deliver_webhook({"nonsense": True}, url=url, secret=WEBHOOK_SECRET) == 400


@pytest.mark.telegram_settings(telegram_mode="webhook", telegram_webhook_secret=WEBHOOK_SECRET)
async def test_webhook_redelivery_is_answered_once(telegram_server: LiveServer,
                                                   customer: Customer) -> None:
    tg = customer.tg
    update = tg.push_message(customer.chat, "hello")
    await telegram_server.settle()
    answered = len(customer.seen)
    assert answered == 2
    for _ in range(2):  # Telegram retries (e.g. our 200 was lost)
        assert await tg.deliver_webhook(update) == 200
    await telegram_server.settle()
    assert len(customer.seen) == answered
    records = await telegram_server.records(customer.chat)
    assert len([r for r in records if r.direction == "in"]) == 1
    assert telegram_server.channel.stats["duplicates"] == 2


@pytest.mark.telegram_settings(telegram_mode="webhook", telegram_webhook_secret=WEBHOOK_SECRET)
async def test_webhook_acks_before_the_turn_runs(telegram_server: LiveServer,
                                                 customer: Customer) -> None:
    channel = telegram_server.channel
    gate = asyncio.Event()
    engine = telegram_server.context.engine
    real_handle = engine.handle

    async def slow_handle(inbound, **kwargs):  # type: ignore[no-untyped-def]
        await gate.wait()
        return await real_handle(inbound, **kwargs)

    engine.handle = slow_handle
    try:
        update = customer.tg.push_message(customer.chat, "hello")
        started = time.monotonic()
        status = await customer.tg.deliver_webhook(update)
        assert status == 200 and time.monotonic() - started < 1.0
        assert not channel.idle()  # the turn is still waiting
    finally:
        gate.set()
        engine.handle = real_handle
    await telegram_server.settle()
    assert len(customer.seen) == 2


# --- one poller per token --------------------------------------------------------------------


async def test_a_second_poller_for_the_token_is_refused(telegram_server: LiveServer,
                                                        customer: Customer) -> None:
    first = telegram_server.channel
    second = TelegramChannel(telegram_server.context, first.config)
    with pytest.raises(ChannelError, match="already polled in this process"):
        await second.start()
    await second.bot.session.close()
    # The first poller and its sender are untouched.
    assert telegram_server.context.engine._senders["telegram"] is first.sender
    assert len(await customer.say("hello")) == 2
