"""The Telegram channel: updates in (long polling or a webhook), turns, messages out.

Updates arrive by long polling (the default: no public URL needed) or at
``POST /telegram/webhook``, whose ``X-Telegram-Bot-Api-Secret-Token`` header
is checked with ``hmac.compare_digest`` before anything else; the webhook is
answered 200 at once and the turn runs after the ack. Either way an update is
queued for its chat, and the chat's turns run one at a time in arrival order
(different chats in parallel). Redelivered updates are dropped by the store's
unique ``(channel, channel_message_id)`` (``<bot id>:<update_id>``), so a
webhook retry or a re-polled update is answered once, also across processes.

Callback queries (inline keyboard taps) are answered with
``answerCallbackQuery`` as soon as they arrive, whatever they carry, so the
client's progress indicator stops; then the keyboard is removed and the
rating or quick reply runs as a turn.

One poller per token: Telegram answers a second ``getUpdates`` for the same
token with 409. In-process, :func:`claim_poller` refuses a second poller;
across processes, run exactly one polling instance per token, or use webhook
mode (any number of instances behind a load balancer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    AiogramError,
    TelegramAPIError,
    TelegramConflictError,
    TelegramRetryAfter,
    TelegramUnauthorizedError,
)
from aiogram.types import CallbackQuery, Message, Update
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from channels.telegram.convert import (
    ALLOWED_UPDATES,
    CHANNEL,
    PayloadMemory,
    blocked_chat,
    chat_id_of,
    conversation_key,
    inbound_from_update,
    unblocked_chat,
)
from channels.telegram.plugin import TelegramConfig
from channels.telegram.queues import KeyedWorkers
from channels.telegram.sender import TelegramSender
from engine.core.types import Outbound
from engine.errors import ChannelError

if TYPE_CHECKING:
    from engine.server.context import ServerContext

__all__ = ["SECRET_HEADER", "WEBHOOK_PATH", "TelegramChannel", "claim_poller", "release_poller"]

logger = logging.getLogger(__name__)

WEBHOOK_PATH = "/telegram/webhook"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
#: Largest webhook body accepted; updates are a few KiB.
MAX_WEBHOOK_BODY = 1 << 20
#: Seconds :meth:`TelegramChannel.stop` waits for running turns, then for unsent messages.
STOP_TIMEOUT = 20.0
#: Poll-loop backoff after errors, seconds (doubling up to the cap).
POLL_BACKOFF = (1.0, 30.0)
#: Updates one chat may have waiting for its turn; more are dropped (a flood, not a customer).
MAX_QUEUED_PER_CHAT = 50

#: Bot ids polled by this process (one poller per token).
_pollers: set[int] = set()


def claim_poller(bot_id: int) -> None:
    """Reserve polling for ``bot_id`` in this process; ChannelError if already taken."""
    if bot_id in _pollers:
        raise ChannelError(f"bot {bot_id} is already polled in this process: run one poller "
                           "per token (Telegram answers a second getUpdates with 409), or use "
                           "telegram_mode: webhook")
    _pollers.add(bot_id)


def release_poller(bot_id: int) -> None:
    _pollers.discard(bot_id)


def make_bot(config: TelegramConfig) -> Bot:
    """An aiogram Bot, pointed at ``config.api_base`` when set (local Bot API server, fakes)."""
    if config.api_base:
        session = AiohttpSession(api=TelegramAPIServer.from_base(config.api_base))
    else:
        session = AiohttpSession()
    return Bot(config.token, session=session)


class TelegramChannel:
    """The ``ChannelPlugin`` for Telegram; see the module docstring."""

    name = CHANNEL

    def __init__(self, context: ServerContext, config: TelegramConfig, *,
                 bot: Bot | None = None) -> None:
        self.context = context
        self.config = config
        self.bot_id = config.bot_id
        self.bot = bot or make_bot(config)
        self.payloads = PayloadMemory()
        self.sender = TelegramSender(self.bot, self.bot_id, payloads=self.payloads,
                                     on_blocked=self._on_blocked)
        self._turns: KeyedWorkers[int, Update] = KeyedWorkers(self._process,
                                                              name="telegram-turn")
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self.stats = {"updates": 0, "ignored": 0, "duplicates": 0, "rejected": 0,
                      "overflow": 0}

    @property
    def engine(self) -> Any:
        return self.context.engine

    # -- plugin protocol -----------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        if self.config.mode != "webhook":
            return []
        return [Route(WEBHOOK_PATH, self.webhook, methods=["POST"])]

    async def start(self) -> None:
        if self.config.mode == "polling":
            claim_poller(self.bot_id)
        self.engine.register_sender(CHANNEL, self.sender)
        if self.config.mode == "polling":
            self._poller = asyncio.create_task(self._poll(), name=f"telegram-poll-{self.bot_id}")
        elif self.config.public_url:
            await self._set_webhook(self.config.public_url.rstrip("/") + WEBHOOK_PATH)
        else:
            logger.warning("telegram: webhook mode without public_url: call setWebhook with "
                           "url=<public URL>%s and secret_token yourself", WEBHOOK_PATH)
        logger.info("telegram: bot %s started (%s)", self.bot_id, self.config.mode)

    async def stop(self) -> None:
        """Stop taking updates, let running turns finish, send what is queued, close."""
        self.stopping = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
            release_poller(self.bot_id)
        if not await self._turns.join(STOP_TIMEOUT):
            logger.warning("telegram: turns still running at shutdown were cancelled")
            await self._turns.cancel()
        await self.sender.close(STOP_TIMEOUT)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.bot.session.close()

    def idle(self) -> bool:
        """No turn running or queued, nothing waiting to be sent, no call in flight."""
        return not self._turns and self.sender.idle() and not self._background

    # -- updates in ----------------------------------------------------------------

    def dispatch(self, update: Update) -> None:
        """Take one update: answer a callback query now, queue the rest for its chat."""
        self.stats["updates"] += 1
        if update.callback_query is not None:
            self._spawn(self._answer(update.callback_query))
        chat = chat_id_of(update)
        if chat is None or self.stopping:
            self.stats["ignored"] += 1
            return
        if self._turns.pending(chat) >= MAX_QUEUED_PER_CHAT:
            self.stats["overflow"] += 1
            logger.warning("telegram: chat %s has %d updates waiting; update %s dropped", chat,
                           MAX_QUEUED_PER_CHAT, update.update_id)
            return
        self._turns.submit(chat, update)

    async def webhook(self, request: Request) -> Response:
        secret = self.config.webhook_secret or ""
        given = request.headers.get(SECRET_HEADER, "")
        if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
            self.stats["rejected"] += 1
            return PlainTextResponse("unauthorized", status_code=401)
        if self.stopping:  # Telegram retries non-2xx answers; the next instance takes it
            return PlainTextResponse("restarting", status_code=503)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_WEBHOOK_BODY:
            return PlainTextResponse("too large", status_code=413)
        body = await request.body()
        if len(body) > MAX_WEBHOOK_BODY:
            return PlainTextResponse("too large", status_code=413)
        try:
            update = Update.model_validate_json(body, context={"bot": self.bot})
        except ValidationError:
            return PlainTextResponse("not an update", status_code=400)
        self.dispatch(update)
        return Response(status_code=200)

    async def _poll(self) -> None:
        """Long polling: ``offset`` confirms what was taken; errors back off, 401 stops."""
        timeout = self.config.poll_timeout
        offset: int | None = None
        backoff = POLL_BACKOFF[0]
        webhook_cleared = False
        while True:
            try:
                if not webhook_cleared:
                    # getUpdates answers 409 while a webhook is set (Bot API, getUpdates).
                    await self.bot.delete_webhook(drop_pending_updates=False)
                    webhook_cleared = True
                updates = await self.bot.get_updates(
                    offset=offset, timeout=timeout, allowed_updates=list(ALLOWED_UPDATES),
                    request_timeout=timeout + 10)
            except TelegramUnauthorizedError:
                logger.error("telegram: the bot token was rejected (401); polling stopped")
                return
            except TelegramRetryAfter as exc:
                await asyncio.sleep(exc.retry_after)
                continue
            except (AiogramError, OSError) as exc:
                if isinstance(exc, TelegramConflictError):
                    logger.warning("telegram: getUpdates conflict (%s): another poller uses "
                                   "this token, or a webhook is set", exc.message)
                    webhook_cleared = "webhook" not in exc.message
                else:
                    logger.warning("telegram: getUpdates failed (%s); retrying in %.0f s",
                                   exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, POLL_BACKOFF[1])
                continue
            backoff = POLL_BACKOFF[0]
            for update in updates:
                offset = update.update_id + 1
                self.dispatch(update)
            if not updates and timeout == 0:
                await asyncio.sleep(1.0)  # short polling: don't spin

    async def _process(self, chat: int, update: Update) -> None:
        """One update of one chat, in order (runs on the chat's worker)."""
        if blocked_chat(update) is not None:
            self.sender.block(chat)
            await self._close_conversation(chat)
            return
        if unblocked_chat(update) is not None:
            self.sender.unblock(chat)
            return
        config = self.config
        inbound = inbound_from_update(update, bot_id=self.bot_id, now=datetime.now(UTC),
                                      payloads=self.payloads, demo=config.demo_customers)
        if inbound is None:
            self.stats["ignored"] += 1
            return
        self.sender.unblock(chat)  # they wrote to us, so they have not blocked the bot
        query = update.callback_query
        if query is not None and isinstance(query.message, Message):
            self._spawn(self._remove_keyboard(query.message))
        self._spawn(self._typing(chat))
        try:
            result = await self.engine.handle(inbound)  # replies go out through the sender
        except Exception:
            logger.exception("telegram: turn failed (chat %s, update %s)", chat,
                             update.update_id)
            return
        if result.duplicate:
            self.stats["duplicates"] += 1

    # -- best-effort calls -----------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _answer(self, query: CallbackQuery) -> None:
        try:
            await self.bot.answer_callback_query(query.id)
        except TelegramAPIError as exc:
            logger.warning("telegram: answerCallbackQuery %s failed: %s", query.id, exc)

    async def _remove_keyboard(self, message: Message) -> None:
        """A tapped keyboard is spent: remove it so it cannot be tapped twice."""
        with contextlib.suppress(TelegramAPIError):
            await self.bot.edit_message_reply_markup(chat_id=message.chat.id,
                                                     message_id=message.message_id)

    async def _typing(self, chat: int) -> None:
        with contextlib.suppress(TelegramAPIError):
            await self.bot.send_chat_action(chat_id=chat, action="typing")

    async def _set_webhook(self, url: str) -> None:
        try:
            await self.bot.set_webhook(url, secret_token=self.config.webhook_secret,
                                       allowed_updates=list(ALLOWED_UPDATES))
        except TelegramAPIError as exc:  # the server still starts; set it by hand
            logger.error("telegram: setWebhook %s failed: %s", url, exc)

    # -- closing a conversation the customer left ------------------------------------------

    async def _on_blocked(self, out: Outbound) -> None:
        await self._close_conversation(int(out.key.thread), out.conversation_id)

    async def _close_conversation(self, chat: int, conversation_id: str | None = None) -> None:
        """The user blocked the bot: close the conversation (a handoff leaves the queue)."""
        if conversation_id is None:
            conv = await self.engine.store.load(conversation_key(self.bot_id, chat))
            if conv is None:
                return
            conversation_id = conv.id

        # The desk's versioned commit under the conversation lock, which also
        # tells the agent console; no message is sent (nobody could read it).
        if not await self.context.desk.close(
                conversation_id, reason="blocked",
                detail="the customer blocked the bot on Telegram"):
            return
        logger.info("telegram: conversation %s closed (chat %s blocked the bot)",
                    conversation_id, chat)
