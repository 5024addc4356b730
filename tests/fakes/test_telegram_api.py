"""Drive :mod:`tests.fakes.telegram_api` with the real ``aiogram`` Bot over 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramConflictError,
    TelegramForbiddenError,
    TelegramRetryAfter,
    TelegramUnauthorizedError,
)
from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup
from aiohttp import web

from tests.fakes.telegram_api import (
    DEFAULT_TOKEN,
    SECRET_HEADER,
    ApiError,
    FakeTelegram,
    html_to_text,
    utf16_len,
)

CHAT = 4242


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


class LoopbackSession(AiohttpSession):
    """aiogram's session without the 250 ms pause on close (meant for TLS; this is HTTP)."""

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


def make_bot(fake: FakeTelegram, token: str = DEFAULT_TOKEN) -> Bot:
    return Bot(token, session=LoopbackSession(api=TelegramAPIServer.from_base(fake.url)))


@pytest.fixture
async def bot(tg: FakeTelegram) -> AsyncIterator[Bot]:
    client = make_bot(tg)
    try:
        yield client
    finally:
        await client.session.close()


def keyboard(*data: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[
        InlineKeyboardButton(text=f"b{i}", callback_data=d) for i, d in enumerate(data)]])


# --- envelopes, auth, methods ---------------------------------------------------------------


async def test_get_me_through_aiogram(tg: FakeTelegram, bot: Bot) -> None:
    me = await bot.get_me()
    assert me.id == int(DEFAULT_TOKEN.split(":")[0]) and me.is_bot
    assert tg.calls[-1].method == "getMe" and tg.calls[-1].status == 200


async def test_unknown_token_is_401_and_unknown_method_404(tg: FakeTelegram) -> None:
    stranger = make_bot(tg, "999:nope")
    try:
        with pytest.raises(TelegramUnauthorizedError):
            await stranger.get_me()
    finally:
        await stranger.session.close()
    async with (aiohttp.ClientSession() as http,
                http.post(f"{tg.url}/bot{DEFAULT_TOKEN}/sendTelepathy") as resp):
        assert resp.status == 404
        assert await resp.json() == {"ok": False, "error_code": 404, "description": "Not Found"}


async def test_json_and_form_bodies_are_both_understood(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_message(CHAT, "hi")
    await bot.send_message(CHAT, "from aiogram (a form)")
    assert tg.calls[-1].params["chat_id"] == str(CHAT)  # aiogram sends form-encoded strings
    async with aiohttp.ClientSession() as http:
        url = f"{tg.url}/bot{DEFAULT_TOKEN}/sendMessage"
        async with http.post(url, json={"chat_id": CHAT, "text": "as JSON"}) as resp:
            body = await resp.json()
        async with http.get(url, params={"chat_id": str(CHAT), "text": "as a query"}) as resp:
            assert (await resp.json())["ok"] is True
    assert body["ok"] is True
    assert body["result"]["chat"]["id"] == CHAT and body["result"]["text"] == "as JSON"
    assert tg.texts(CHAT) == ["from aiogram (a form)", "as JSON", "as a query"]
    ids = [m.message_id for m in tg.messages(CHAT)]
    assert ids == sorted(ids) and len(set(ids)) == 3


async def test_sending_to_an_unknown_chat_is_a_bad_request(bot: Bot) -> None:
    with pytest.raises(TelegramBadRequest, match="chat not found"):
        await bot.send_message(777, "hello?")


# --- getUpdates -------------------------------------------------------------------------------


async def test_offsets_confirm_updates(tg: FakeTelegram, bot: Bot) -> None:
    first = tg.push_message(CHAT, "one")
    tg.push_message(CHAT, "two")
    tg.push_message(CHAT, "three")
    updates = await bot.get_updates()
    assert [u.message.text for u in updates if u.message] == ["one", "two", "three"]
    # Not confirmed yet: asked again without an offset, the same three come back.
    assert len(await bot.get_updates()) == 3
    # offset = first + 1 confirms (drops) the first one only.
    again = await bot.get_updates(offset=first["update_id"] + 1)
    assert [u.message.text for u in again if u.message] == ["two", "three"]
    assert await bot.get_updates(offset=updates[-1].update_id + 1) == []
    assert tg.pending_updates() == []


async def test_limit_and_negative_offset(tg: FakeTelegram, bot: Bot) -> None:
    for n in range(5):
        tg.push_message(CHAT, f"m{n}")
    assert len(await bot.get_updates(limit=2)) == 2
    last_two = await bot.get_updates(offset=-2)
    assert [u.message.text for u in last_two if u.message] == ["m3", "m4"]
    assert len(tg.pending_updates()) == 2


async def test_long_poll_answers_as_soon_as_an_update_arrives(tg: FakeTelegram,
                                                              bot: Bot) -> None:
    started = time.monotonic()
    poll = asyncio.create_task(bot.get_updates(timeout=10))
    await asyncio.sleep(0.2)
    assert not poll.done()
    tg.push_message(CHAT, "wake up")
    updates = await asyncio.wait_for(poll, 5)
    assert [u.message.text for u in updates if u.message] == ["wake up"]
    assert time.monotonic() - started < 3


async def test_long_poll_times_out_empty(bot: Bot) -> None:
    started = time.monotonic()
    assert await bot.get_updates(timeout=1) == []
    assert 0.9 <= time.monotonic() - started < 3


async def test_two_long_polls_conflict(tg: FakeTelegram, bot: Bot) -> None:
    first = asyncio.create_task(bot.get_updates(timeout=10))
    await asyncio.sleep(0.2)
    other = make_bot(tg)
    try:
        second = asyncio.create_task(other.get_updates(timeout=10))
        with pytest.raises(TelegramConflictError, match="terminated by other getUpdates"):
            await asyncio.wait_for(first, 5)
        tg.push_message(CHAT, "for the survivor")
        [update] = await asyncio.wait_for(second, 5)
        assert update.message is not None and update.message.text == "for the survivor"
    finally:
        await other.session.close()


async def test_allowed_updates_filter(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_message(CHAT, "text")
    tg.push_blocked(CHAT)
    only = await bot.get_updates(allowed_updates=["my_chat_member"])
    assert [u.event_type for u in only] == ["my_chat_member"]
    assert only[0].my_chat_member is not None
    assert only[0].my_chat_member.new_chat_member.status == "kicked"


async def test_command_entities(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_message(CHAT, "/start")
    [update] = await bot.get_updates()
    assert update.message is not None and update.message.entities is not None
    assert update.message.entities[0].type == "bot_command"


# --- sendMessage validation -----------------------------------------------------------------


def test_html_parsing_like_telegram() -> None:
    assert html_to_text("<b>bold</b> &lt;3 &amp; &#169; &quot;q&quot;") == 'bold <3 & © "q"'
    for bad in ("a < b", "a > b", "fish & chips", "<div>x</div>", "<b>open", "<b>x</i>",
                "&nbsp;"):
        with pytest.raises(ApiError, match="can't parse entities"):
            html_to_text(bad)


async def test_html_is_checked_and_parsed(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_message(CHAT, "hi")
    await bot.send_message(CHAT, "<b>2 &lt; 3</b> &amp; more", parse_mode="HTML")
    assert tg.messages(CHAT)[-1].text == "2 < 3 & more"
    assert tg.messages(CHAT)[-1].raw_text == "<b>2 &lt; 3</b> &amp; more"
    with pytest.raises(TelegramBadRequest, match="can't parse entities"):
        await bot.send_message(CHAT, "if a < b then", parse_mode="HTML")
    # Without a parse mode, the same text is fine.
    await bot.send_message(CHAT, "if a < b then")


async def test_length_limit_counts_after_entity_parsing(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_message(CHAT, "hi")
    await bot.send_message(CHAT, "&amp;" * 4096, parse_mode="HTML")  # 4096 visible chars
    with pytest.raises(TelegramBadRequest, match="message is too long"):
        await bot.send_message(CHAT, "x" * 4097)
    assert utf16_len("😀") == 2
    with pytest.raises(TelegramBadRequest, match="message is too long"):
        await bot.send_message(CHAT, "😀" * 2049)  # 2049 code points, 4098 UTF-16 units


async def test_callback_data_is_limited_to_64_bytes(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_message(CHAT, "hi")
    await bot.send_message(CHAT, "ok", reply_markup=keyboard("x" * 64))
    with pytest.raises(TelegramBadRequest, match="BUTTON_DATA_INVALID"):
        await bot.send_message(CHAT, "too long", reply_markup=keyboard("退" * 22))  # 66 bytes
    sent = tg.messages(CHAT)[-1]
    assert sent.buttons() == [{"text": "b0", "callback_data": "x" * 64}]


# --- failures -----------------------------------------------------------------------------


async def test_429_with_retry_after(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_message(CHAT, "hi")
    tg.fail_sends(2, retry_after=3)
    for _ in range(2):
        with pytest.raises(TelegramRetryAfter) as caught:
            await bot.send_message(CHAT, "hello")
        assert caught.value.retry_after == 3
    await bot.send_message(CHAT, "hello")
    assert tg.texts(CHAT) == ["hello"]
    assert [c.status for c in tg.calls_to("sendMessage")] == [429, 429, 200]


async def test_429_for_one_chat_only(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_message(CHAT, "hi")
    tg.push_message(CHAT + 1, "hi")
    tg.fail_sends(1, chat_id=CHAT)
    await bot.send_message(CHAT + 1, "not limited")
    with pytest.raises(TelegramRetryAfter):
        await bot.send_message(CHAT, "limited")


async def test_403_when_blocked(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_message(CHAT, "hi")
    tg.block(CHAT)
    with pytest.raises(TelegramForbiddenError, match="blocked by the user"):
        await bot.send_message(CHAT, "hello?")
    with pytest.raises(TelegramForbiddenError):
        await bot.send_chat_action(CHAT, "typing")
    tg.unblock(CHAT)
    await bot.send_message(CHAT, "hello again")


# --- callbacks and keyboards ---------------------------------------------------------------


async def test_callback_queries_are_answered_once(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_message(CHAT, "hi")
    await bot.send_message(CHAT, "rate us", reply_markup=keyboard("r:1", "r:2"))
    update = tg.push_callback(CHAT, button="b1")
    query = update["callback_query"]
    assert query["data"] == "r:2"
    assert query["message"]["reply_markup"]["inline_keyboard"][0][1]["callback_data"] == "r:2"
    [got] = await bot.get_updates(offset=-1)
    assert got.callback_query is not None and got.callback_query.message is not None
    assert await bot.answer_callback_query(query["id"]) is True
    assert query["id"] in tg.answered
    with pytest.raises(TelegramBadRequest, match="query is too old"):
        await bot.answer_callback_query(query["id"])
    with pytest.raises(TelegramBadRequest, match="query is too old"):
        await bot.answer_callback_query("12345")


async def test_edit_reply_markup(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_message(CHAT, "hi")
    sent = await bot.send_message(CHAT, "pick", reply_markup=keyboard("q:a"))
    await bot.edit_message_reply_markup(chat_id=CHAT, message_id=sent.message_id)
    assert tg.messages(CHAT)[-1].reply_markup is None
    with pytest.raises(TelegramBadRequest, match="not modified"):
        await bot.edit_message_reply_markup(chat_id=CHAT, message_id=sent.message_id)
    with pytest.raises(TelegramBadRequest, match="message to edit not found"):
        await bot.edit_message_reply_markup(chat_id=CHAT, message_id=999)


# --- webhooks -------------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[str | None, dict[str, object]]],
                                             list[int]]]:
    """A webhook endpoint that records (secret header, update) and answers scripted statuses."""
    got: list[tuple[str | None, dict[str, object]]] = []
    statuses: list[int] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((request.headers.get(SECRET_HEADER), await request.json()))
        return web.Response(status=statuses.pop(0) if statuses else 200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/hook", got, statuses
    finally:
        await runner.cleanup()


async def test_webhook_pushes_with_secret_and_retries(
    tg: FakeTelegram, bot: Bot,
    receiver: tuple[str, list[tuple[str | None, dict[str, object]]], list[int]],
) -> None:
    url, got, statuses = receiver
    statuses.extend([500])  # the first delivery fails once, then is retried
    assert await bot.set_webhook(url, secret_token="s3cret_-X")
    info = await bot.get_webhook_info()
    assert info.url == url
    with pytest.raises(TelegramConflictError, match="webhook is active"):
        await bot.get_updates()
    update = tg.push_message(CHAT, "via webhook")
    await tg.wait_for(lambda: len(got) == 2, what="two deliveries")
    assert [g[0] for g in got] == ["s3cret_-X", "s3cret_-X"]
    assert got[0][1] == got[1][1] == update
    assert [(d.status, d.attempt) for d in tg.webhook_deliveries] == [(500, 1), (200, 2)]
    assert tg.pending_updates() == []
    # The manual sender: without the header, and a redelivery of the same update.
    assert await tg.deliver_webhook(update, secret=None) == 200
    assert got[-1][0] is None
    assert await tg.deliver_webhook(update) == 200
    assert got[-1] == ("s3cret_-X", update)
    assert await bot.delete_webhook()
    assert await bot.get_updates() == []


async def test_webhook_secret_must_be_well_formed(bot: Bot) -> None:
    with pytest.raises(TelegramBadRequest, match="unallowed characters"):
        await bot.set_webhook("http://127.0.0.1:1/hook", secret_token="no spaces!")
    with pytest.raises(TelegramBadRequest, match="HTTPS URL"):
        await bot.set_webhook("http://example.com/hook")


async def test_raw_error_envelope(tg: FakeTelegram) -> None:
    tg.push_message(CHAT, "hi")
    tg.fail_sends(1, retry_after=7)
    async with (aiohttp.ClientSession() as http,
                http.post(f"{tg.url}/bot{DEFAULT_TOKEN}/sendMessage",
                          data={"chat_id": str(CHAT), "text": "x"}) as resp):
        assert resp.status == 429
        body = json.loads(await resp.text())
    assert body == {"ok": False, "error_code": 429,
                    "description": "Too Many Requests: retry after 7",
                    "parameters": {"retry_after": 7}}

