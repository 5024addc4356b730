"""Channel conformance: the same scenarios, with the same assertions, over every channel.

Each test runs once per channel (ids ``web``, ``telegram``, ``slack``) through a
:class:`~tests.channels.conftest.ChannelDriver` speaking that channel's real wire
protocol against ONE live server that serves all three (see ``conftest.py``):

1. a full refund journey, AI disclosure first, ending refunded in the shop;
2. a redelivered customer message is answered exactly once;
3. five messages of one conversation sent back to back are answered in order;
4. the rating buttons: 5 is recorded and thanked, 2 (new conversation) hands off;
5. the handoff relay in both directions, with the bot muted meanwhile.
"""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest

from engine.demo.shop import ORDER_SMALL
from engine.store.base import MessageRecord
from tests.channels.conftest import (
    RATING_CHOICES,
    ChannelDriver,
    ConformanceServer,
    Reply,
    normalized,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

JOURNEY = ["hi there",
           "my blender arrived with a cracked jug, I want my money back",
           f"it's {ORDER_SMALL}"]
CONFIRM = "Yes, refund"
#: Five FAQ questions, each with an answer of its own (and the words to know it by).
QUESTIONS = [
    ("how long does shipping take", "days"),
    ("how much is shipping", "99"),
    ("do you ship internationally", "hong kong"),
    ("what payment methods do you accept", "alipay"),
    ("how long is the warranty", "12"),
]
HUMAN = "I want to talk to a human"
AGENT_REPLY = "Hi, this is Alice from the support team. Sorry about that, what went wrong?"
THANKS = "Thank you for your feedback!"


def texts(replies: list[Reply]) -> list[str]:
    return [normalized(r.text) for r in replies]


def customer_visible(records: list[MessageRecord]) -> list[MessageRecord]:
    return [r for r in records if r.direction == "out"]


def turns_counted(server: ConformanceServer, channel: str, outcome: str) -> float:
    """``helpline_turns_total`` of one channel and outcome, over all flows."""
    return sum(float(sample.value) for family in server.context.metrics.turns.collect()
               for sample in family.samples
               if sample.name == "helpline_turns_total"
               and sample.labels.get("channel") == channel
               and sample.labels.get("outcome") == outcome)


async def refund_to_rating(server: ConformanceServer, driver: ChannelDriver) -> list[Reply]:
    """The refund journey for ORDER_SMALL up to the rating prompt; everything received."""
    await server.fresh_shop(driver, ORDER_SMALL)
    received: list[Reply] = []
    for text in JOURNEY:
        answer = await driver.say(text)
        assert answer, f"{driver.channel}: no answer to {text!r}"
        received += answer
    await driver.press(CONFIRM)
    received += await driver.replies()
    return received


class TestConformance:
    async def test_refund_journey(self, conformance_server: ConformanceServer,
                                  channel_driver: ChannelDriver) -> None:
        server, customer = conformance_server, channel_driver
        await server.fresh_shop(customer, ORDER_SMALL)

        first = await customer.say(JOURNEY[0])
        assert len(first) == 2, first  # the AI disclosure comes first, then the answer
        assert "AI" in first[0].text
        records = await customer.records()
        assert customer_visible(records)[0].data.get("kind") == "disclosure"

        second = await customer.say(JOURNEY[1])
        third = await customer.say(JOURNEY[2])
        read_back = third[-1]
        assert "129.00" in read_back.text and ORDER_SMALL in read_back.text
        assert CONFIRM in read_back.choices

        await customer.press(CONFIRM)
        answer = await customer.replies()
        assert "Done! Refund RF" in answer[0].text
        assert answer[-1].choices == RATING_CHOICES  # the journey ends with the rating

        [refund] = await server.shop.refunds_for_order(ORDER_SMALL)
        assert (refund.amount, refund.status) == (Decimal("129.00"), "approved")
        conv = await customer.conversation()
        assert (conv.flow, conv.state, conv.language, conv.owner) == (
            "refund", "refunded", "en", "bot")
        # The customer received exactly what the store says was sent, in order.
        records = await customer.records()
        assert texts(first + second + third + answer) == [
            normalized(r.text) for r in customer_visible(records)]
        inbound = [r for r in records if r.direction == "in"]
        assert len(inbound) == len(JOURNEY) + 1
        assert all(r.channel == customer.channel and r.channel_message_id for r in inbound)

    async def test_redelivered_message_is_answered_once(
            self, conformance_server: ConformanceServer,
            channel_driver: ChannelDriver) -> None:
        server, customer = conformance_server, channel_driver
        message_id = await customer.send("hello")
        assert len(await customer.replies()) == 2  # disclosure and answer
        before = await customer.records()
        duplicates = turns_counted(server, customer.channel, "duplicate")

        await customer.redeliver(message_id)
        assert await customer.replies() == []
        after = await customer.records()
        assert [(r.seq, r.text) for r in after] == [(r.seq, r.text) for r in before]
        assert [r.text for r in after if r.direction == "in"] == ["hello"]
        # Counted as docs/metrics.md says: `duplicate`, a redelivered channel message.
        assert turns_counted(server, customer.channel, "duplicate") == duplicates + 1

    async def test_messages_are_answered_in_order(
            self, conformance_server: ConformanceServer,
            channel_driver: ChannelDriver) -> None:
        customer = channel_driver
        for question, _ in QUESTIONS:  # back to back, no waiting for answers
            await customer.send(question)
        received = await customer.replies(timeout=20)

        records = await customer.records()
        inbound = [r for r in records if r.direction == "in"]
        assert [r.text for r in inbound] == [q for q, _ in QUESTIONS]
        assert [r.seq for r in inbound] == sorted(r.seq for r in inbound)
        # Each message was answered before the next one was taken...
        bounds = [r.seq for r in inbound] + [records[-1].seq + 1]
        answers = [[r for r in customer_visible(records) if low < r.seq < high]
                   for low, high in itertools.pairwise(bounds)]
        assert all(answers), [len(a) for a in answers]
        for (question, word), answer in zip(QUESTIONS, answers, strict=True):
            assert word in normalized(answer[-1].text), (question, answer[-1].text)
        # ...and the customer received the answers in that order, each once.
        assert texts(received) == [normalized(r.text) for r in customer_visible(records)]

    async def test_quick_reply_rating(self, conformance_server: ConformanceServer,
                                      channel_driver: ChannelDriver) -> None:
        server, customer = conformance_server, channel_driver
        received = await refund_to_rating(server, customer)
        assert received[-1].choices == RATING_CHOICES

        await customer.press(5)
        assert texts(await customer.replies()) == [normalized(THANKS)]
        records = await customer.records()
        assert [r.data.get("rating") for r in records if r.kind == "rating"] == [5]
        assert (await customer.conversation()).owner == "bot"

        unhappy = customer.fresh()
        received = await refund_to_rating(server, unhappy)
        assert received[-1].choices == RATING_CHOICES
        await unhappy.press(2)
        assert await unhappy.replies()  # told that a colleague will take over
        conv = await unhappy.conversation()
        assert (conv.owner, conv.handoff_reason) == ("pending_human", "satisfaction")
        ratings = [r.data.get("rating") for r in await unhappy.records() if r.kind == "rating"]
        assert ratings == [2]

    async def test_a_rating_prompt_takes_one_rating(
            self, request: pytest.FixtureRequest, conformance_server: ConformanceServer,
            channel_driver: ChannelDriver) -> None:
        server, customer = conformance_server, channel_driver
        await refund_to_rating(server, customer)
        await customer.press(5)
        assert texts(await customer.replies()) == [normalized(THANKS)]

        await customer.press_again(4)  # the same prompt again: a double tap, a stale client
        assert await customer.replies() == []
        records = await customer.records()
        assert [r.data.get("rating") for r in records if r.kind == "rating"] == [5]

    async def test_handoff_relay_both_ways(self, conformance_server: ConformanceServer,
                                           channel_driver: ChannelDriver) -> None:
        server, customer = conformance_server, channel_driver
        desk = server.desk
        assert await customer.say(HUMAN)
        conv = await customer.conversation()
        assert conv.owner == "pending_human"

        await desk.claim(conv.id, "alice")
        await desk.reply(conv.id, "alice", AGENT_REPLY)
        assert texts(await customer.replies()) == [normalized(AGENT_REPLY)]

        # The bot is muted: the customer's message is stored for the agent, not answered.
        await customer.send("the jug was already cracked in the box")
        assert await customer.replies() == []
        transcript = await server.store.messages(conv.id)
        assert transcript[-1].direction == "in"
        assert transcript[-1].text == "the jug was already cracked in the box"
        assert (await customer.conversation()).owner == "human"

        await desk.hand_back(conv.id, "alice")
        [back] = await customer.replies()
        assert "AI assistant again" in back.text
        assert (await customer.conversation()).owner == "bot"
        assert await customer.say("how long does shipping take")


