"""The pure converters: updates to Inbound, Outbound to sendMessage calls, keyboards, splitting."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

import pytest
from aiogram.types import Update
from hypothesis import given, settings
from hypothesis import strategies as st

from channels.telegram.convert import (
    MAX_CALLBACK_BYTES,
    PayloadMemory,
    blocked_chat,
    bot_id_from_token,
    callback_data,
    chat_id_of,
    choice_from_callback,
    customer_id,
    escape,
    inbound_from_update,
    keyboard,
    plain_fallback,
    send_calls,
    split_text,
    unblocked_chat,
    utf16_len,
)
from engine.core.types import Outbound, QuickReply
from engine.store.base import ConversationKey
from tests.fakes.telegram_api import html_to_text

BOT = 777
NOW = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
KEY = ConversationKey("telegram", str(BOT), "42")


def message_update(text: str | None = "hi", *, chat_type: str = "private", update_id: int = 9,
                   is_bot: bool = False, caption: str | None = None) -> Update:
    message: dict[str, Any] = {
        "message_id": 5, "date": 1, "chat": {"id": 42, "type": chat_type},
        "from": {"id": 43, "is_bot": is_bot, "first_name": "Ada"}}
    if text is not None:
        message["text"] = text
    if caption is not None:
        message["caption"] = caption
    return Update.model_validate({"update_id": update_id, "message": message})


def callback_update(data: str, *, buttons: list[dict[str, str]] | None = None,
                    message_id: int = 17, update_id: int = 10) -> Update:
    message: dict[str, Any] = {"message_id": message_id, "date": 1,
                               "chat": {"id": 42, "type": "private"}, "text": "pick"}
    if buttons is not None:
        message["reply_markup"] = {"inline_keyboard": [buttons]}
    return Update.model_validate({"update_id": update_id, "callback_query": {
        "id": "q1", "from": {"id": 43, "is_bot": False, "first_name": "Ada"},
        "chat_instance": "x", "data": data, "message": message}})


def outbound(text: str, quick: tuple[QuickReply, ...] = ()) -> Outbound:
    return Outbound(conversation_id="c1", key=KEY, seq=3, text=text, quick_replies=quick)


# --- identities ---------------------------------------------------------------------------


def test_bot_id_from_token() -> None:
    assert bot_id_from_token("123456:AAE-x_y") == 123456
    for bad in ("", "abc:def", "123", "123:"):
        with pytest.raises(ValueError, match="BotFather"):
            bot_id_from_token(bad)


def test_customer_identity() -> None:
    assert customer_id(43) == "telegram:43"
    assert customer_id(43, demo=True) == "demo:telegram:43"


# --- inbound --------------------------------------------------------------------------------


def test_text_message() -> None:
    inbound = inbound_from_update(message_update("hello"), bot_id=BOT, now=NOW,
                                  payloads=PayloadMemory())
    assert inbound is not None
    assert inbound.key == KEY
    assert (inbound.text, inbound.kind, inbound.customer) == ("hello", "text", "telegram:43")
    assert inbound.channel_message_id == f"{BOT}:9"
    assert inbound.received_at == NOW


def test_caption_counts_as_text_and_other_messages_are_ignored() -> None:
    photo = message_update(None, caption="broken, see photo")
    assert inbound_from_update(photo, bot_id=BOT, now=NOW, payloads=PayloadMemory()) is not None
    for update in (message_update(None), message_update(chat_type="group"),
                   message_update(is_bot=True)):
        assert inbound_from_update(update, bot_id=BOT, now=NOW, payloads=PayloadMemory()) is None


def test_rating_callback_is_keyed_by_its_prompt() -> None:
    first = inbound_from_update(callback_update("r:2", update_id=10), bot_id=BOT, now=NOW,
                                payloads=PayloadMemory())
    again = inbound_from_update(callback_update("r:4", update_id=11), bot_id=BOT, now=NOW,
                                payloads=PayloadMemory())
    assert first is not None and again is not None
    assert (first.kind, first.rating, first.text) == ("rating", 2, "2")
    # One prompt, one rating: both taps carry the same id, the store keeps the first.
    assert first.channel_message_id == again.channel_message_id == f"{BOT}:rating:42:17"


@pytest.mark.parametrize("data", ["r:0", "r:6", "r:x", "q:", "zzz", ""])
def test_foreign_callback_data_is_not_a_turn(data: str) -> None:
    assert inbound_from_update(callback_update(data), bot_id=BOT, now=NOW,
                               payloads=PayloadMemory()) is None


def test_quick_reply_callbacks() -> None:
    payloads = PayloadMemory()
    short = QuickReply("Yes, refund", "Yes, refund")
    long = QuickReply("确认退款" * 6, "确认退款" * 6)  # 72 bytes in UTF-8
    payloads.remember([short, long])
    data = callback_data(long)
    assert data.startswith("h:") and len(data.encode()) <= MAX_CALLBACK_BYTES

    inbound = inbound_from_update(callback_update(callback_data(short)), bot_id=BOT, now=NOW,
                                  payloads=payloads)
    assert inbound is not None
    assert (inbound.kind, inbound.text, dict(inbound.data)) == (
        "quick_reply", "Yes, refund", {"payload": "Yes, refund"})
    assert inbound.channel_message_id == f"{BOT}:10"
    hashed = inbound_from_update(callback_update(data), bot_id=BOT, now=NOW, payloads=payloads)
    assert hashed is not None and hashed.text == long.payload


def test_unknown_digest_falls_back_to_the_tapped_label() -> None:
    long = QuickReply("a label that is long", "p" * 80)
    data = callback_data(long)
    query = callback_update(data, buttons=[{"text": "a label that is long",
                                            "callback_data": data}]).callback_query
    assert query is not None
    choice = choice_from_callback(query, PayloadMemory())  # e.g. after a restart
    assert choice is not None and choice.value == "a label that is long"
    assert choice_from_callback(callback_update(data).callback_query,  # type: ignore[arg-type]
                                PayloadMemory()) is None


def test_chat_and_membership_updates() -> None:
    assert chat_id_of(message_update()) == 42
    assert chat_id_of(callback_update("r:1")) == 42
    member: dict[str, Any] = {"chat": {"id": 42, "type": "private"},
              "from": {"id": 42, "is_bot": False, "first_name": "Ada"}, "date": 1,
              "old_chat_member": {"status": "member", "user": {"id": BOT, "is_bot": True,
                                                               "first_name": "B"}},
              "new_chat_member": {"status": "kicked", "until_date": 0,
                                  "user": {"id": BOT, "is_bot": True, "first_name": "B"}}}
    kicked = Update.model_validate({"update_id": 1, "my_chat_member": member})
    assert chat_id_of(kicked) == 42
    assert (blocked_chat(kicked), unblocked_chat(kicked)) == (42, None)
    member["old_chat_member"], member["new_chat_member"] = (
        member["new_chat_member"], {**member["old_chat_member"]})
    back = Update.model_validate({"update_id": 2, "my_chat_member": member})
    assert (blocked_chat(back), unblocked_chat(back)) == (None, 42)
    assert blocked_chat(message_update()) is None


# --- keyboards ---------------------------------------------------------------------------------


def test_rating_buttons() -> None:
    replies = tuple(QuickReply(str(n), f"rating:{n}") for n in range(1, 6))
    markup = keyboard(replies)
    assert markup is not None
    [row] = markup.inline_keyboard
    assert [(b.text, b.callback_data) for b in row] == [(str(n), f"r:{n}") for n in range(1, 6)]


@given(st.text(min_size=1, max_size=200))
def test_callback_data_always_fits(payload: str) -> None:
    data = callback_data(QuickReply(payload, payload))
    assert 1 <= len(data.encode()) <= MAX_CALLBACK_BYTES


def test_keyboard_layout() -> None:
    assert keyboard(()) is None
    short = keyboard([QuickReply(x, x) for x in ("a", "b", "c", "d")])
    assert short is not None and [len(r) for r in short.inline_keyboard] == [3, 1]
    long = keyboard([QuickReply("a much longer label here", "x"), QuickReply("b", "b")])
    assert long is not None and [len(r) for r in long.inline_keyboard] == [1, 1]


def test_payload_memory_is_bounded() -> None:
    memory = PayloadMemory(size=2)
    replies = [QuickReply("l", f"{n}" * 70) for n in range(3)]
    memory.remember(replies)
    digests = [callback_data(r).removeprefix("h:") for r in replies]
    assert memory.get(digests[0]) is None
    assert memory.get(digests[2]) == replies[2].payload


# --- outbound ------------------------------------------------------------------------------


def test_escaping_for_html() -> None:
    assert escape("a < b & c > d") == "a &lt; b &amp; c &gt; d"
    assert html_to_text(escape("<b>&amp;</b> \"q\" 'x'")) == "<b>&amp;</b> \"q\" 'x'"


def test_send_calls() -> None:
    quick = (QuickReply("Yes", "Yes"), QuickReply("No", "No"))
    calls = send_calls(outbound("x" * 5000 + " <&>", quick), 42)
    assert len(calls) == 2
    assert all(c.chat_id == 42 and c.parse_mode == "HTML" for c in calls)
    assert calls[0].reply_markup is None and calls[1].reply_markup is not None
    assert calls[1].text.endswith("&lt;&amp;&gt;")
    assert send_calls(outbound("   "), 42) == []


def test_plain_fallback() -> None:
    [call] = send_calls(outbound("R&D <team>"), 42)
    plain = plain_fallback(call)
    assert (plain.text, plain.parse_mode) == ("R&D <team>", None)


# --- splitting -----------------------------------------------------------------------------


def test_short_text_is_one_chunk() -> None:
    assert split_text("  hello  ") == ["hello"]
    assert split_text("") == []


def test_split_prefers_paragraphs_then_lines_then_sentences_then_words() -> None:
    para = "a" * 60
    assert split_text(f"{para}\n\n{para}", 100) == [para, para]
    assert split_text(f"{para}\n{para}", 100) == [para, para]
    assert split_text(f"{'b' * 55}. {'c' * 55}", 100) == ["b" * 55 + ".", "c" * 55]
    assert split_text(f"{'d' * 55}。{'e' * 55}", 100) == ["d" * 55 + "。", "e" * 55]
    words = " ".join(["word"] * 40)  # 199 chars
    chunks = split_text(words, 100)
    assert all(len(c) <= 100 and not c.startswith(" ") for c in chunks)
    assert " ".join(chunks) == words


def test_a_boundary_too_early_is_not_used() -> None:
    # A paragraph break at 10 of 100 would leave a tiny chunk; a later line break wins.
    text = "x" * 10 + "\n\n" + "y" * 70 + "\n" + "z" * 50
    assert split_text(text, 100) == ["x" * 10 + "\n\n" + "y" * 70, "z" * 50]


def test_hard_cut_and_utf16_units() -> None:
    assert split_text("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]
    emoji = "😀" * 60  # 120 UTF-16 units
    chunks = split_text(emoji, 100)
    assert [utf16_len(c) for c in chunks] == [100, 20]
    assert "".join(chunks) == emoji


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(["a", "b", " ", "\n", ".", "。", "😀", "<", "&"]),
               max_size=600),
       st.integers(min_value=4, max_value=120))
def test_split_loses_nothing(text: str, limit: int) -> None:
    chunks = split_text(text, limit)
    assert all(chunk and utf16_len(chunk) <= limit for chunk in chunks)
    # The chunks are the text, in order, minus whitespace at the cuts.
    pos = 0
    for chunk in chunks:
        at = text.index(chunk, pos)
        assert text[pos:at].strip() == ""
        pos = at + len(chunk)
    assert text[pos:].strip() == ""
    assert all(html.unescape(escape(c)) == c for c in chunks)
