"""The Telegram channel in webhook mode: the secret header, the fast ack, redeliveries."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from channels.telegram.channel import WEBHOOK_PATH
from engine.store.base import ConversationKey
from tests.channels.telegram.conftest import BOT_ID, WEBHOOK_SECRET, Customer, LiveServer

pytestmark = pytest.mark.asyncio(loop_scope="module")


def raw_update(chat: int, text: str, update_id: int = 1) -> dict[str, Any]:
    return {"update_id": update_id, "message": {
        "message_id": 1, "date": 1, "text": text,
        "chat": {"id": chat, "type": "private", "first_name": "Eve"},
        "from": {"id": chat, "is_bot": False, "first_name": "Eve"}}}


async def test_the_webhook_is_set_with_the_secret(webhook_server: LiveServer,
                                                  webhook_customer: Customer) -> None:
    tg = webhook_customer.tg
    [set_call] = tg.calls_to("setWebhook")
    assert set_call.params["url"] == webhook_server.url + WEBHOOK_PATH
    assert set_call.params["secret_token"] == WEBHOOK_SECRET
    assert tg.calls_to("getUpdates") == []

    # Telegram pushes the update with the secret header; the channel answers.
    first = await webhook_customer.say("hello")
    assert len(first) == 2
    assert tg.webhook_deliveries[-1].status == 200 and tg.webhook_deliveries[-1].with_secret


async def test_a_wrong_or_missing_secret_is_refused(webhook_server: LiveServer,
                                                    webhook_customer: Customer) -> None:
    tg = webhook_customer.tg
    chat = webhook_customer.chat
    rejected = webhook_server.channel.stats["rejected"]
    url = webhook_server.url + WEBHOOK_PATH
    update = raw_update(chat, "I want a refund")
    assert await tg.deliver_webhook(update, url=url, secret="wrong") == 401
    assert await tg.deliver_webhook(update, url=url, secret=None) == 401
    assert await tg.deliver_webhook(update, url=url, secret=WEBHOOK_SECRET[:-1]) == 401
    assert await tg.deliver_webhook(update, url=url, secret=WEBHOOK_SECRET + "x") == 401
    await webhook_server.settle()
    assert webhook_customer.seen == []
    key = ConversationKey("telegram", str(BOT_ID), str(chat))
    assert await webhook_server.context.app.store.load(key) is None
    assert webhook_server.channel.stats["rejected"] == rejected + 4
    # With the right secret but not an update: 400, nothing processed.
    assert await tg.deliver_webhook({"nonsense": True}, url=url, secret=WEBHOOK_SECRET) == 400


async def test_a_redelivered_update_is_answered_once(webhook_server: LiveServer,
                                                     webhook_customer: Customer) -> None:
    tg = webhook_customer.tg
    duplicates = webhook_server.channel.stats["duplicates"]
    update = tg.push_message(webhook_customer.chat, "hello")
    await webhook_server.settle()
    answered = len(webhook_customer.seen)
    assert answered == 2
    for _ in range(2):  # Telegram sends it again (e.g. our 200 was lost)
        assert await tg.deliver_webhook(update) == 200
    await webhook_server.settle()
    assert len(webhook_customer.seen) == answered
    records = await webhook_server.records(webhook_customer.chat)
    assert len([r for r in records if r.direction == "in"]) == 1
    assert webhook_server.channel.stats["duplicates"] == duplicates + 2


async def test_the_ack_comes_before_the_turn(webhook_server: LiveServer,
                                             webhook_customer: Customer) -> None:
    channel = webhook_server.channel
    engine = webhook_server.context.engine
    gate = asyncio.Event()
    real_handle = engine.handle

    async def slow_handle(inbound: Any, **options: Any) -> Any:
        await gate.wait()  # a slow model turn
        return await real_handle(inbound, **options)

    engine.handle = slow_handle
    try:
        update = raw_update(webhook_customer.chat, "hello", update_id=424242)
        webhook_customer.tg._chat(webhook_customer.chat)  # the fake knows the chat
        started = time.monotonic()
        assert await webhook_customer.tg.deliver_webhook(update) == 200
        assert time.monotonic() - started < 1.0
        assert not channel.idle()  # acknowledged; the turn is still waiting
    finally:
        gate.set()
        engine.handle = real_handle
    await webhook_server.settle()
    assert len(webhook_customer.seen) == 2


async def test_only_posts_of_reasonable_size(webhook_server: LiveServer,
                                             webhook_customer: Customer) -> None:
    url = webhook_server.url + WEBHOOK_PATH
    tg = webhook_customer.tg
    huge = {**raw_update(webhook_customer.chat, "x"), "padding": "a" * (1 << 20)}
    assert await tg.deliver_webhook(huge, url=url, secret=WEBHOOK_SECRET) == 413
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 405
