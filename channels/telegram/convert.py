"""Pure converters between Telegram updates and the engine's envelopes. No I/O.

Inbound: an aiogram :class:`~aiogram.types.Update` becomes an :class:`Inbound`
(``inbound_from_update``). Outbound: an :class:`Outbound` becomes the
``sendMessage`` calls that show it (``send_calls``): the text split at
Telegram's 4096-character limit on paragraph, line, sentence or word
boundaries, each chunk escaped for the HTML parse mode, quick replies as an
inline keyboard on the last chunk.

Identifiers (https://core.telegram.org/bots/api):

* conversation key: ``ConversationKey("telegram", <bot id>, <chat id>)``;
* customer: ``telegram:<user id>`` (``demo:telegram:<user id>`` for demo deployments);
* ``channel_message_id``: ``<bot id>:<update_id>``, so the store's unique
  ``(channel, channel_message_id)`` drops redelivered updates; a rating tap is
  ``<bot id>:rating:<chat id>:<message id>`` instead, so one rating prompt
  records one rating however often its buttons are tapped.

Callback data (1-64 bytes): ``r:<n>`` rates 1-5; ``q:<payload>`` is a quick
reply whose payload fits; a longer payload is sent as ``h:<digest>`` and
resolved through a :class:`PayloadMemory` (falling back to the tapped
button's label, which is what the engine's quick-reply payloads are).
"""

from __future__ import annotations

import hashlib
import html
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from aiogram.methods import SendMessage
from aiogram.types import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    Update,
)

from engine.core.types import Inbound, Outbound, QuickReply
from engine.store.base import ConversationKey

__all__ = [
    "ALLOWED_UPDATES",
    "CHANNEL",
    "MAX_CALLBACK_BYTES",
    "MAX_TEXT",
    "PARSE_MODE",
    "Choice",
    "PayloadMemory",
    "blocked_chat",
    "bot_id_from_token",
    "callback_data",
    "chat_id_of",
    "choice_from_callback",
    "conversation_key",
    "customer_id",
    "escape",
    "inbound_from_callback",
    "inbound_from_message",
    "inbound_from_update",
    "keyboard",
    "plain_fallback",
    "send_calls",
    "split_text",
    "unblocked_chat",
    "utf16_len",
]

CHANNEL = "telegram"
#: sendMessage text limit, after entity parsing, in UTF-16 code units.
MAX_TEXT = 4096
MAX_CALLBACK_BYTES = 64
PARSE_MODE = "HTML"
#: Update types the channel asks for (getUpdates and setWebhook ``allowed_updates``).
ALLOWED_UPDATES = ("message", "callback_query", "my_chat_member")
RATING_PREFIX = "r:"
QUICK_PREFIX = "q:"
HASHED_PREFIX = "h:"
#: Boundaries a long text is split on, best first; a sentence end keeps its punctuation.
_PARAGRAPH, _LINE = "\n\n", "\n"
_SENTENCE_ENDS = (". ", "! ", "? ", "。", "！", "？")
#: Quick-reply labels up to this long share a keyboard row (three to a row).
_SHORT_LABEL = 16


# --------------------------------------------------------------------------- identities


def bot_id_from_token(token: str) -> int:
    """The bot's id: the digits before the colon of its token (``123456:ABC...``)."""
    head, sep, rest = token.partition(":")
    if not sep or not head.isdigit() or not rest:
        raise ValueError("a Telegram bot token looks like 123456789:AAE..., from @BotFather")
    return int(head)


def conversation_key(bot_id: int, chat_id: int) -> ConversationKey:
    return ConversationKey(CHANNEL, str(bot_id), str(chat_id))


def customer_id(user_id: int, *, demo: bool = False) -> str:
    """The customer identity of a Telegram user: from Telegram, never from message text."""
    return f"demo:telegram:{user_id}" if demo else f"telegram:{user_id}"


def update_message_id(bot_id: int, update_id: int) -> str:
    return f"{bot_id}:{update_id}"


def rating_message_id(bot_id: int, chat_id: int, message_id: int) -> str:
    return f"{bot_id}:rating:{chat_id}:{message_id}"


# --------------------------------------------------------------------------- text


def utf16_len(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units (an emoji beyond the BMP is 2)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def escape(text: str) -> str:
    """Text for ``parse_mode=HTML``: ``&``, ``<`` and ``>`` as entities (Bot API, HTML style)."""
    return html.escape(text, quote=False)


def _fitting_prefix(text: str, limit: int) -> int:
    """The length (in code points) of the longest prefix of ``text`` within ``limit`` units."""
    units = 0
    for index, ch in enumerate(text):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > limit:
            return index
    return len(text)


def _cut(window: str) -> int:
    """Where to end a chunk inside ``window``: the best boundary in its second half."""
    floor = len(window) // 2
    for seps in ((_PARAGRAPH,), (_LINE,), _SENTENCE_ENDS, (" ",)):
        at = max((window.rfind(sep) + len(sep) for sep in seps if sep in window), default=0)
        if at > floor:
            return at
    return len(window)


def split_text(text: str, limit: int = MAX_TEXT) -> list[str]:
    """``text`` in chunks of at most ``limit`` UTF-16 units, cut at the best boundary.

    Whitespace at the cuts is dropped; nothing else is lost or reordered.
    """
    chunks: list[str] = []
    rest = text.strip()
    while rest:
        if utf16_len(rest) <= limit:
            chunks.append(rest)
            break
        window = rest[:_fitting_prefix(rest, limit)]
        at = _cut(window)
        chunk = window[:at].rstrip()
        if chunk:
            chunks.append(chunk)
        rest = rest[at:].lstrip()
    return chunks


# --------------------------------------------------------------------------- keyboards


def callback_data(reply: QuickReply) -> str:
    """The button's callback data, at most 64 bytes (see the module docstring)."""
    payload = reply.payload
    if payload.startswith("rating:"):
        value = payload.removeprefix("rating:")
        if value.isdigit() and 1 <= int(value) <= 5:
            return f"{RATING_PREFIX}{int(value)}"
    data = QUICK_PREFIX + payload
    if payload and len(data.encode()) <= MAX_CALLBACK_BYTES:
        return data
    return HASHED_PREFIX + _digest(payload)


def _digest(payload: str) -> str:
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class PayloadMemory:
    """Long quick-reply payloads by digest (bounded, most recent kept)."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._payloads: OrderedDict[str, str] = OrderedDict()

    def remember(self, replies: Sequence[QuickReply]) -> None:
        for reply in replies:
            data = callback_data(reply)
            if data.startswith(HASHED_PREFIX):
                digest = data.removeprefix(HASHED_PREFIX)
                self._payloads[digest] = reply.payload
                self._payloads.move_to_end(digest)
        while len(self._payloads) > self.size:
            self._payloads.popitem(last=False)

    def get(self, digest: str) -> str | None:
        return self._payloads.get(digest)


def keyboard(replies: Sequence[QuickReply]) -> InlineKeyboardMarkup | None:
    """Quick replies as an inline keyboard: ratings on one row, short labels three to a row."""
    if not replies:
        return None
    buttons = [InlineKeyboardButton(text=r.label or r.payload, callback_data=callback_data(r))
               for r in replies]
    if all(b.callback_data and b.callback_data.startswith(RATING_PREFIX) for b in buttons):
        rows = [buttons]
    elif all(len(b.text) <= _SHORT_LABEL for b in buttons):
        rows = [buttons[i:i + 3] for i in range(0, len(buttons), 3)]
    else:
        rows = [[b] for b in buttons]
    return InlineKeyboardMarkup(inline_keyboard=rows)


# --------------------------------------------------------------------------- outbound


def send_calls(out: Outbound, chat_id: int) -> list[SendMessage]:
    """The sendMessage calls that show ``out``, in order (none for an empty text)."""
    chunks = split_text(out.text)
    if not chunks:
        return []
    markup = keyboard(out.quick_replies)
    calls = [SendMessage(chat_id=chat_id, text=escape(chunk), parse_mode=PARSE_MODE)
             for chunk in chunks]
    if markup is not None:
        calls[-1] = calls[-1].model_copy(update={"reply_markup": markup})
    return calls


def plain_fallback(call: SendMessage) -> SendMessage:
    """The same message without a parse mode (if Telegram ever rejects our HTML)."""
    return call.model_copy(update={"text": html.unescape(call.text), "parse_mode": None})


# --------------------------------------------------------------------------- inbound


@dataclass(frozen=True, slots=True)
class Choice:
    """What a tapped inline button means."""

    kind: Literal["rating", "quick_reply"]
    value: str
    rating: int | None = None


def _tapped_label(query: CallbackQuery) -> str | None:
    message = query.message
    if not isinstance(message, Message) or message.reply_markup is None:
        return None
    for row in message.reply_markup.inline_keyboard:
        for button in row:
            if button.callback_data == query.data:
                return button.text
    return None


def choice_from_callback(query: CallbackQuery, payloads: PayloadMemory) -> Choice | None:
    """The rating or quick reply a callback query carries, or None if it is not ours."""
    data = query.data or ""
    if data.startswith(RATING_PREFIX):
        value = data.removeprefix(RATING_PREFIX)
        if value.isdigit() and 1 <= int(value) <= 5:
            return Choice("rating", value, int(value))
        return None
    if data.startswith(QUICK_PREFIX) and len(data) > len(QUICK_PREFIX):
        return Choice("quick_reply", data.removeprefix(QUICK_PREFIX))
    if data.startswith(HASHED_PREFIX):
        payload = payloads.get(data.removeprefix(HASHED_PREFIX)) or _tapped_label(query)
        if payload:
            return Choice("quick_reply", payload)
    return None


def chat_id_of(update: Update) -> int | None:
    """The chat an update belongs to (its turns run in order per chat)."""
    if update.message is not None:
        return update.message.chat.id
    if update.callback_query is not None and update.callback_query.message is not None:
        return update.callback_query.message.chat.id
    if update.my_chat_member is not None:
        return update.my_chat_member.chat.id
    return None


def inbound_from_message(message: Message, *, bot_id: int, update_id: int, now: datetime,
                         demo: bool = False) -> Inbound | None:
    """A customer's text message in a private chat; None for anything else."""
    user = message.from_user
    text = message.text if message.text is not None else message.caption
    if message.chat.type != "private" or user is None or user.is_bot or not text:
        return None
    return Inbound(
        key=conversation_key(bot_id, message.chat.id), text=text,
        customer=customer_id(user.id, demo=demo), received_at=now,
        channel_message_id=update_message_id(bot_id, update_id),
        data={"telegram_message_id": message.message_id},
    )


def inbound_from_callback(query: CallbackQuery, choice: Choice, *, bot_id: int, update_id: int,
                          now: datetime, demo: bool = False) -> Inbound | None:
    """A tapped rating or quick-reply button in a private chat; None for anything else."""
    message = query.message
    if message is None or message.chat.type != "private" or query.from_user.is_bot:
        return None
    key = conversation_key(bot_id, message.chat.id)
    customer = customer_id(query.from_user.id, demo=demo)
    if choice.kind == "rating":
        return Inbound(key=key, text=choice.value, customer=customer, received_at=now,
                       kind="rating", rating=choice.rating,
                       channel_message_id=rating_message_id(bot_id, message.chat.id,
                                                            message.message_id))
    return Inbound(key=key, text=choice.value, customer=customer, received_at=now,
                   kind="quick_reply", data={"payload": choice.value},
                   channel_message_id=update_message_id(bot_id, update_id))


def inbound_from_update(update: Update, *, bot_id: int, now: datetime,
                        payloads: PayloadMemory, demo: bool = False) -> Inbound | None:
    """The engine's envelope for an update, or None when it is not a customer turn."""
    if update.message is not None:
        return inbound_from_message(update.message, bot_id=bot_id, update_id=update.update_id,
                                    now=now, demo=demo)
    query = update.callback_query
    if query is not None:
        choice = choice_from_callback(query, payloads)
        if choice is None:
            return None
        return inbound_from_callback(query, choice, bot_id=bot_id, update_id=update.update_id,
                                     now=now, demo=demo)
    return None


def blocked_chat(update: Update) -> int | None:
    """The private chat whose user just blocked the bot (``my_chat_member`` → ``kicked``)."""
    member = update.my_chat_member
    if member is None or member.chat.type != "private":
        return None
    return member.chat.id if member.new_chat_member.status == "kicked" else None


def unblocked_chat(update: Update) -> int | None:
    """The private chat whose user just unblocked (restarted) the bot."""
    member = update.my_chat_member
    if member is None or member.chat.type != "private":
        return None
    return member.chat.id if member.new_chat_member.status == "member" else None
