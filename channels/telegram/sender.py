"""The engine's sender for Telegram: ordered per chat, honouring 429, closing on 403.

The engine calls the sender with every outbound message of a Telegram
conversation: bot replies, agent replies during a handoff, hand-back and
queue-timeout notices. ``__call__`` only queues (it never blocks a turn or
holds the conversation lock); one worker per chat sends in order:

* 429 (``TelegramRetryAfter``): aiogram does not retry, so the worker sleeps
  ``retry_after`` seconds and sends the same message again; later messages of
  the chat wait behind it, so the order holds.
* 403 (``TelegramForbiddenError``, the user blocked the bot): the chat's
  queue is dropped, further messages to it are dropped until the user writes
  again, and ``on_blocked`` closes the conversation.
* network errors and 5xx: retried with exponential backoff (at-least-once;
  Telegram has no idempotency key for sendMessage).
* a 400 about our HTML: the chunk is sent again as plain text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiogram import Bot
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
)
from aiogram.methods import SendMessage

from channels.telegram.convert import CHANNEL, PayloadMemory, plain_fallback, send_calls
from channels.telegram.queues import KeyedWorkers
from engine.core.types import Outbound

__all__ = ["TelegramSender"]

logger = logging.getLogger(__name__)

#: Attempts per message (429s and transient errors together) before it is given up.
MAX_ATTEMPTS = 8
#: Backoff cap for network errors and 5xx, seconds.
MAX_BACKOFF = 30.0

Sleep = Callable[[float], Awaitable[None]]
OnBlocked = Callable[[Outbound], Awaitable[None]]


class TelegramSender:
    """Register with ``engine.register_sender("telegram", sender)``; see the module docstring."""

    def __init__(self, bot: Bot, bot_id: int, *, on_blocked: OnBlocked,
                 payloads: PayloadMemory | None = None, max_attempts: int = MAX_ATTEMPTS,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.bot = bot
        self.bot_id = bot_id
        self.on_blocked = on_blocked
        self.payloads = payloads or PayloadMemory()
        self.max_attempts = max_attempts
        self._sleep = sleep
        self._workers: KeyedWorkers[int, Outbound] = KeyedWorkers(self._deliver,
                                                                  name="telegram-send")
        #: Chats whose user blocked the bot; nothing is sent to them until they write again.
        self.blocked: set[int] = set()
        self.closing = False
        self.stats = {"sent": 0, "retried": 0, "dropped": 0, "failed": 0}

    async def __call__(self, out: Outbound) -> None:
        key = out.key
        if key.channel != CHANNEL or key.account != str(self.bot_id):
            logger.warning("telegram: %s is not a conversation of bot %s; not sent", key,
                           self.bot_id)
            return
        chat = int(key.thread)
        if chat in self.blocked or self.closing:
            self.stats["dropped"] += 1
            logger.info("telegram: chat %s %s; message %s not sent", chat,
                        "blocked the bot" if chat in self.blocked else "is closing", out.seq)
            return
        self.payloads.remember(out.quick_replies)
        self._workers.submit(chat, out)

    def block(self, chat: int) -> int:
        """The user blocked the bot: drop what is queued for the chat; returns how many."""
        self.blocked.add(chat)
        dropped = self._workers.discard(chat)
        self.stats["dropped"] += dropped
        return dropped

    def unblock(self, chat: int) -> None:
        """The user wrote (or restarted the bot): sending works again."""
        self.blocked.discard(chat)

    def pending(self, chat: int) -> int:
        return self._workers.pending(chat)

    def idle(self) -> bool:
        return not self._workers

    async def close(self, timeout: float) -> None:
        """Stop accepting messages; send what is queued within ``timeout``, drop the rest."""
        self.closing = True
        if not await self._workers.join(timeout):
            logger.warning("telegram: unsent messages dropped at shutdown")
            await self._workers.cancel()

    # -- the per-chat worker -----------------------------------------------------

    async def _deliver(self, chat: int, out: Outbound) -> None:
        if chat in self.blocked:
            self.stats["dropped"] += 1
            return
        for call in send_calls(out, chat):
            if not await self._send(chat, call, out):
                return

    async def _send(self, chat: int, call: SendMessage, out: Outbound) -> bool:
        """Send one chunk; False when the rest of the message must not be sent."""
        attempts = 0
        while True:
            attempts += 1
            try:
                await self.bot(call)
            except TelegramRetryAfter as exc:
                if attempts >= self.max_attempts:
                    return self._give_up(chat, out, exc)
                self.stats["retried"] += 1
                logger.info("telegram: 429 for chat %s; retrying in %s s", chat,
                            exc.retry_after)
                await self._sleep(exc.retry_after)
            except TelegramForbiddenError as exc:
                await self._blocked(chat, out, exc)
                return False
            except TelegramBadRequest as exc:
                if call.parse_mode and "can't parse entities" in exc.message:
                    logger.warning("telegram: HTML rejected (%s); sending as plain text",
                                   exc.message)
                    call = plain_fallback(call)
                    continue
                return self._give_up(chat, out, exc)
            except (TelegramNetworkError, TelegramServerError) as exc:
                if attempts >= self.max_attempts:
                    return self._give_up(chat, out, exc)
                self.stats["retried"] += 1
                await self._sleep(min(0.5 * 2 ** attempts, MAX_BACKOFF))
            except TelegramAPIError as exc:
                return self._give_up(chat, out, exc)
            else:
                self.stats["sent"] += 1
                return True

    def _give_up(self, chat: int, out: Outbound, exc: TelegramAPIError) -> bool:
        self.stats["failed"] += 1
        logger.error("telegram: message %s of conversation %s to chat %s not sent: %s",
                     out.seq, out.conversation_id, chat, exc)
        return False

    async def _blocked(self, chat: int, out: Outbound, exc: TelegramForbiddenError) -> None:
        dropped = self.block(chat)
        self.stats["dropped"] += 1
        logger.info("telegram: chat %s blocked the bot (%s); %d queued messages dropped",
                    chat, exc.message, dropped)
        try:
            await self.on_blocked(out)
        except Exception:
            logger.exception("telegram: closing conversation %s failed", out.conversation_id)
