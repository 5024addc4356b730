"""The Telegram channel end to end over long polling: the real server, the real aiogram
client, the fake Bot API.

Everything goes over HTTP on 127.0.0.1: the customer's updates are queued in the fake
and fetched by the channel's long poll; the bot's answers are real ``sendMessage``
calls the fake records and checks (HTML entities, the 4096 limit, 64-byte callback
data). One server serves the module; each test has its own chat and a fresh shop.
"""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from channels.telegram.channel import TelegramChannel
from engine.demo.shop import ORDER_SMALL
from engine.errors import ChannelError
from engine.handoff import OwnershipError
from tests.channels.telegram.conftest import BOT_ID, Customer, LiveServer
from tests.fakes.telegram_api import MAX_TEXT, utf16_len

pytestmark = pytest.mark.asyncio(loop_scope="module")

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


async def refund_to_rating(customer: Customer, language: str = "en") -> None:
    turns, confirm, _ = JOURNEYS[language]
    for text in turns:
        await customer.say(text)
    await customer.tap(confirm)


async def handed_off(live: LiveServer, customer: Customer, agent: str) -> str:
    """The customer asks for a human and ``agent`` claims the conversation; its id."""
    await customer.say("I want to talk to a human")
    conv = await live.conversation(customer.chat)
    assert conv.owner == "pending_human"
    await live.context.desk.claim(conv.id, agent)
    return conv.id


# --- whole journeys --------------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_shop")
@pytest.mark.parametrize("language", ["en", "zh"])
async def test_refund_journey(polling_server: LiveServer, polling_customer: Customer,
                              language: str) -> None:
    customer = polling_customer
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
    assert confirm in [b["text"] for b in read_back.buttons()]
    assert all(len(b["callback_data"].encode()) <= 64 for b in read_back.buttons())

    answer = await customer.tap(confirm)
    assert done in answer[0].text
    # The tap was answered (the client's spinner stops) and the spent keyboard removed.
    assert customer.all_taps_answered()
    assert read_back.reply_markup is None
    # The journey ends with the 1-5 rating as one keyboard row.
    rating = answer[-1]
    assert [b["callback_data"] for b in rating.buttons()] == [f"r:{n}" for n in range(1, 6)]

    [refund] = await polling_server.context.app.shop.refunds_for_order(ORDER_SMALL)
    assert (refund.amount, refund.status) == (Decimal("129.00"), "approved")
    conv = await polling_server.conversation(customer.chat)
    assert (conv.flow, conv.state, conv.language) == ("refund", "refunded", language)
    assert conv.key.account == str(BOT_ID) and conv.key.thread == str(customer.chat)
    inbound = [r for r in await polling_server.records(customer.chat) if r.direction == "in"]
    assert all(r.channel_message_id and r.channel_message_id.startswith(f"{BOT_ID}:")
               for r in inbound)
    # Every call about this chat succeeded (typing, sends, keyboard edits).
    assert {c.status for c in customer.calls()} == {200}


@pytest.mark.usefixtures("fresh_shop")
async def test_rating_is_answered_and_recorded_once(polling_server: LiveServer,
                                                    polling_customer: Customer) -> None:
    customer = polling_customer
    await refund_to_rating(customer)
    prompt = customer.seen[-1]
    duplicates = polling_server.channel.stats["duplicates"]
    thanks = await customer.tap(data="r:5", message_id=prompt.message_id)
    assert [m.text for m in thanks] == ["Thank you for your feedback!"]
    assert prompt.reply_markup is None  # the spent keyboard was removed
    # The same prompt tapped again (a stale client): answered, but rated only once.
    assert await customer.tap(data="r:4", message_id=prompt.message_id) == []
    assert customer.all_taps_answered() and len(customer.taps) == 3
    records = await polling_server.records(customer.chat)
    assert [r.data.get("rating") for r in records if r.kind == "rating"] == [5]
    assert polling_server.channel.stats["duplicates"] == duplicates + 1


@pytest.mark.usefixtures("fresh_shop")
async def test_low_rating_hands_off_and_the_agent_reaches_the_chat(
        polling_server: LiveServer, polling_customer: Customer) -> None:
    customer = polling_customer
    await refund_to_rating(customer)
    handoff = await customer.tap(data="r:2")
    conv = await polling_server.conversation(customer.chat)
    assert conv.owner == "pending_human" and conv.handoff_reason == "satisfaction"
    assert handoff  # the customer is told a human is coming

    desk = polling_server.context.desk
    await desk.claim(conv.id, "alice")
    await desk.reply(conv.id, "alice", "Hi, I'm Alice. Sorry about that, what went wrong?")
    await polling_server.settle()
    assert customer.seen[-1].text == "Hi, I'm Alice. Sorry about that, what went wrong?"

    # While the human owns the conversation the bot stays silent.
    assert await customer.say("the refund took ages to show up") == []
    await desk.hand_back(conv.id, "alice")
    await polling_server.settle()
    assert "AI assistant again" in customer.seen[-1].text


# --- formatting and limits ---------------------------------------------------------------------


async def test_long_reply_is_split_and_escaped(polling_server: LiveServer,
                                               polling_customer: Customer) -> None:
    customer = polling_customer
    conv_id = await handed_off(polling_server, customer, "bob")
    paragraph = ("Use <b>only</b> the form & keep 3 > 2 < 4 in mind; "
                 "R&D says <script>alert(1)</script> is not HTML here. ") * 20
    text = "\n\n".join([paragraph.strip()] * 6) + "\n\nEnd 😀."
    before = len(customer.seen)
    await polling_server.context.desk.reply(conv_id, "bob", text)
    await polling_server.settle()
    parts = customer.seen[before:]
    assert len(parts) >= 3
    assert all(utf16_len(p.text) <= MAX_TEXT for p in parts)
    assert all(p.parse_mode == "HTML" and "&lt;b&gt;" in p.raw_text for p in parts[:-1])
    # Cut at paragraph boundaries; shown exactly as written, nothing lost.
    assert "\n\n".join(p.text for p in parts) == text
    assert all(p.text.endswith("here.") for p in parts[:-1])


# --- 429 and 403 ----------------------------------------------------------------------------


async def test_retry_after_is_honoured_in_order(polling_server: LiveServer,
                                                polling_customer: Customer) -> None:
    customer = polling_customer
    conv_id = await handed_off(polling_server, customer, "alice")
    sender = polling_server.channel.sender
    retried = sender.stats["retried"]
    customer.tg.fail_sends(1, retry_after=1, chat_id=customer.chat)
    before = len(customer.seen)
    sends = len(customer.calls("sendMessage"))
    started = time.monotonic()
    for n in range(1, 4):
        await polling_server.context.desk.reply(conv_id, "alice", f"message {n}")
    await polling_server.settle()
    assert time.monotonic() - started >= 1.0  # the 429's retry_after was waited out
    assert [m.text for m in customer.seen[before:]] == ["message 1", "message 2", "message 3"]
    assert [c.status for c in customer.calls("sendMessage")[sends:]] == [429, 200, 200, 200]
    assert sender.stats["retried"] == retried + 1


async def test_blocked_bot_closes_the_conversation(polling_server: LiveServer,
                                                   polling_customer: Customer) -> None:
    customer = polling_customer
    conv_id = await handed_off(polling_server, customer, "alice")
    desk = polling_server.context.desk
    customer.tg.block(customer.chat)
    sends = len(customer.calls("sendMessage"))
    await desk.reply(conv_id, "alice", "are you still there?")
    await desk.reply(conv_id, "alice", "hello?")
    await polling_server.settle()

    # One attempt (403); the queued second message is dropped, nothing else is tried.
    assert [c.status for c in customer.calls("sendMessage")[sends:]] == [403]
    conv = await polling_server.conversation(customer.chat)
    assert (conv.owner, conv.closed) == ("resolved", True)
    events = [r for r in await polling_server.records(customer.chat) if r.direction == "event"]
    assert events[-1].data.get("reason") == "blocked"
    assert conv_id not in [item.conversation_id for item in await desk.queue()]
    with pytest.raises(OwnershipError):
        await desk.reply(conv_id, "alice", "one more")
    sender = polling_server.channel.sender
    assert customer.chat in sender.blocked

    # The user unblocks and writes again: a fresh journey, answered normally.
    customer.tg.unblock(customer.chat)
    assert await customer.say("hi, I need a refund")
    assert customer.chat not in sender.blocked
    assert (await polling_server.conversation(customer.chat)).owner == "bot"


async def test_block_notification_closes_the_conversation(polling_server: LiveServer,
                                                          polling_customer: Customer) -> None:
    customer = polling_customer
    await customer.say("I want to talk to a human")
    conv = await polling_server.conversation(customer.chat)
    customer.tg.push_blocked(customer.chat)
    await polling_server.settle()
    conv = await polling_server.conversation(customer.chat)
    assert (conv.owner, conv.closed) == ("resolved", True)
    assert conv.id not in [i.conversation_id for i in await polling_server.context.desk.queue()]


# --- delivery guarantees --------------------------------------------------------------------


async def test_redelivered_update_is_answered_once(polling_server: LiveServer,
                                                   polling_customer: Customer) -> None:
    customer = polling_customer
    duplicates = polling_server.channel.stats["duplicates"]
    update = customer.tg.push_message(customer.chat, "hello")
    await polling_server.settle()
    answered = len(customer.seen)
    assert answered == 2
    # The same update again (as after a crash between handling and confirming it).
    customer.tg.push_update(update)
    await polling_server.settle()
    assert len(customer.seen) == answered
    assert polling_server.channel.stats["duplicates"] == duplicates + 1


@pytest.mark.usefixtures("fresh_shop")
async def test_turns_of_one_chat_run_in_order(polling_server: LiveServer,
                                              polling_customer: Customer) -> None:
    customer = polling_customer
    turns = JOURNEYS["en"][0]
    for text in turns:  # all queued before the poller takes any
        customer.tg.push_message(customer.chat, text)
    await polling_server.settle()
    conv = await polling_server.conversation(customer.chat)
    assert (conv.flow, conv.state) == ("refund", "confirm")
    records = await polling_server.records(customer.chat)
    assert [r.text for r in records if r.direction == "in"] == turns


async def test_chats_are_separate_conversations(polling_server: LiveServer,
                                                polling_customer: Customer) -> None:
    alice = polling_customer
    bob = Customer(polling_server, alice.chat + 500_000)
    alice.tg.push_message(alice.chat, "I want a refund")
    bob.tg.push_message(bob.chat, "where is my parcel?")
    await polling_server.settle()
    a = await polling_server.conversation(alice.chat)
    b = await polling_server.conversation(bob.chat)
    assert a.id != b.id and (a.flow, b.flow) == ("refund", "logistics")
    assert alice.seen and bob.seen


async def test_a_second_poller_for_the_token_is_refused(polling_server: LiveServer,
                                                        polling_customer: Customer) -> None:
    first = polling_server.channel
    second = TelegramChannel(polling_server.context, first.config)
    with pytest.raises(ChannelError, match="already polled in this process"):
        await second.start()
    await second.bot.session.close()
    # The first poller and its sender are untouched.
    assert polling_server.context.engine._senders["telegram"] is first.sender
    assert len(await polling_customer.say("hello")) == 2
