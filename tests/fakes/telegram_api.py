"""A protocol-faithful fake of the Telegram Bot API, served over real HTTP on 127.0.0.1.

The real ``aiogram`` client talks to it through its base URL
(``AiohttpSession(api=TelegramAPIServer.from_base(fake.url))``); nothing in aiogram is
patched.

Wire format (https://core.telegram.org/bots/api#making-requests):

* ``GET`` or ``POST /bot<token>/<method>``, parameters in the query string, a JSON body, a
  form-encoded body or a multipart form (aiogram sends forms: every value is a string and
  objects such as ``reply_markup`` are JSON-encoded strings);
* answers are envelopes: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error_code": N,
  "description": "...", "parameters": {...}}`` with HTTP status ``N``;
* 401 ``Unauthorized`` for an unknown token, 404 ``Not Found`` for an unknown method,
  400 ``Bad Request: ...`` for invalid parameters, 403 ``Forbidden: bot was blocked by the
  user`` for a blocked chat, 409 ``Conflict: ...`` for two getUpdates long polls of one
  token (the older one is terminated, as Telegram does) or getUpdates while a webhook is
  set, 429 ``Too Many Requests: retry after N`` with ``parameters.retry_after``.

Methods: ``getMe``, ``getUpdates`` (offset confirmation, negative offsets, ``limit``,
``allowed_updates``, long polling that answers as soon as an update is queued),
``sendMessage`` (HTML parse mode checked like Telegram: only its tags and entities; the
4096-character limit counted after entity parsing, in UTF-16 code units; inline keyboards
with ``callback_data`` of 1-64 bytes), ``sendChatAction``, ``answerCallbackQuery`` (each
query answered at most once), ``editMessageReplyMarkup``, ``setWebhook`` /
``deleteWebhook`` / ``getWebhookInfo``. While a webhook is set, queued updates are POSTed
to it with the ``X-Telegram-Bot-Api-Secret-Token`` header and retried on non-2xx answers.

Test interface: :meth:`FakeTelegram.push_message`, :meth:`~FakeTelegram.push_callback`
and :meth:`~FakeTelegram.push_update` queue updates; :meth:`~FakeTelegram.fail_sends`
(429) and :meth:`~FakeTelegram.block` (403) inject failures; :meth:`~FakeTelegram.messages`,
:attr:`~FakeTelegram.calls` and :attr:`~FakeTelegram.answered` show what the bot did;
:meth:`~FakeTelegram.wait_for` waits for a condition; :meth:`~FakeTelegram.deliver_webhook`
POSTs one update to a webhook with or without the secret (call it again to redeliver)::

    async with FakeTelegram() as tg:
        bot = Bot(TOKEN, session=AiohttpSession(api=TelegramAPIServer.from_base(tg.url)))
        tg.push_message(chat_id=42, text="hi")
        [update] = await bot.get_updates(timeout=5)
        await bot.send_message(42, "hello <b>there</b>", parse_mode="HTML")
        assert tg.texts(42) == ["hello there"]

The server binds 127.0.0.1 on a free port and stops itself after ``max_lifetime`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

__all__ = [
    "DEFAULT_TOKEN",
    "SECRET_HEADER",
    "Call",
    "FakeTelegram",
    "SentMessage",
    "WebhookDelivery",
    "html_to_text",
    "utf16_len",
]

log = logging.getLogger(__name__)

DEFAULT_TOKEN = "123456789:AAF-fake-token_for-tests"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_TEXT = 4096
MAX_CALLBACK_DATA = 64
MAX_BODY_BYTES = 1 << 20
#: Update types getUpdates returns when ``allowed_updates`` was never given.
DEFAULT_EXCLUDED = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")
#: Telegram's HTML tags (https://core.telegram.org/bots/api#html-style).
_TAGS = frozenset({"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span",
                   "tg-spoiler", "a", "code", "pre", "blockquote", "tg-emoji"})
_TAG_RE = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s+[^<>]*)?)>")
_ENTITY_RE = re.compile(r"&(lt|gt|amp|quot|#[0-9]{1,7}|#x[0-9a-fA-F]{1,6});")


class ApiError(Exception):
    """An error envelope: ``{"ok": false, "error_code": status, "description": ...}``."""

    def __init__(self, status: int, description: str, retry_after: int | None = None) -> None:
        self.status = status
        self.description = description
        self.retry_after = retry_after
        super().__init__(f"{status} {description}")


def bad_request(what: str) -> ApiError:
    return ApiError(400, f"Bad Request: {what}")


def utf16_len(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units."""
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text)


def html_to_text(source: str) -> str:
    """The plain text of a message in Telegram's HTML parse mode, or ApiError 400.

    Only Telegram's tags, properly nested, and its entities (``&lt; &gt; &amp; &quot;`` and
    numeric ones) are allowed; a bare ``<``, ``>`` or ``&`` must be escaped.
    """
    out: list[str] = []
    stack: list[str] = []
    i = 0
    while i < len(source):
        ch = source[i]
        if ch == "<":
            match = _TAG_RE.match(source, i)
            name = match.group(2).lower() if match else ""
            if match is None or name not in _TAGS:
                raise bad_request(f"can't parse entities: Unsupported start tag \"{name}\" at "
                                  f"byte offset {len(source[:i].encode())}")
            if match.group(1):
                if not stack or stack[-1] != name:
                    raise bad_request(f"can't parse entities: Unmatched end tag at byte offset "
                                      f"{len(source[:i].encode())}, expected \"</"
                                      f"{stack[-1] if stack else ''}>\", found \"</{name}>\"")
                stack.pop()
            else:
                stack.append(name)
            i = match.end()
        elif ch == "&":
            match = _ENTITY_RE.match(source, i)
            if match is None:
                raise bad_request("can't parse entities: Unsupported HTML entity at byte "
                                  f"offset {len(source[:i].encode())}")
            out.append(html.unescape(match.group(0)))
            i = match.end()
        elif ch == ">":
            raise bad_request("can't parse entities: Unexpected end of tag at byte offset "
                              f"{len(source[:i].encode())}")
        else:
            out.append(ch)
            i += 1
    if stack:
        raise bad_request(f"can't parse entities: Can't find end tag corresponding to start "
                          f"tag \"{stack[-1]}\"")
    return "".join(out)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Call:
    """One Bot API request as the fake received it (form values are still strings)."""

    token: str
    method: str
    params: Mapping[str, Any]
    status: int
    at: float


@dataclass(slots=True)
class SentMessage:
    """A message the bot sent; ``text`` is what the user sees (entities parsed)."""

    chat_id: int
    message_id: int
    text: str
    raw_text: str
    parse_mode: str | None
    reply_markup: dict[str, Any] | None
    date: int

    def buttons(self) -> list[dict[str, Any]]:
        if not self.reply_markup:
            return []
        return [b for row in self.reply_markup.get("inline_keyboard", []) for b in row]

    def as_api(self, bot_user: Mapping[str, Any], chat: Mapping[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"message_id": self.message_id, "date": self.date,
                                   "chat": dict(chat), "from": dict(bot_user), "text": self.text}
        if self.reply_markup:
            message["reply_markup"] = self.reply_markup
        return message


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One POST of an update to a webhook: the HTTP status (0: no connection)."""

    update_id: int
    status: int
    attempt: int
    with_secret: bool


@dataclass
class _Poll:
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    terminated: bool = False


@dataclass
class _Bot:
    token: str
    id: int
    username: str
    first_name: str
    updates: deque[dict[str, Any]] = field(default_factory=deque)
    next_update_id: int = 700_000_001
    allowed_updates: list[str] | None = None
    poll: _Poll | None = None
    webhook_url: str = ""
    webhook_secret: str | None = None
    webhook_wake: asyncio.Event = field(default_factory=asyncio.Event)
    webhook_task: asyncio.Task[None] | None = None

    def user(self) -> dict[str, Any]:
        return {"id": self.id, "is_bot": True, "first_name": self.first_name,
                "username": self.username}


@dataclass
class _Chat:
    id: int
    first_name: str
    next_message_id: int = 1
    #: The bot's messages (what the user saw), by message id.
    sent: dict[int, SentMessage] = field(default_factory=dict)

    def api(self) -> dict[str, Any]:
        return {"id": self.id, "type": "private", "first_name": self.first_name}

    def take_message_id(self) -> int:
        self.next_message_id += 1
        return self.next_message_id - 1


@dataclass
class _SendFailure:
    remaining: int
    retry_after: int
    chat_id: int | None


# --------------------------------------------------------------------------- the server


class FakeTelegram:
    """The fake Bot API server; see the module docstring."""

    def __init__(self, tokens: tuple[str, ...] = (DEFAULT_TOKEN,), *,
                 max_lifetime: float | None = 600.0, webhook_attempts: int = 3,
                 webhook_retry_delay: float = 0.05) -> None:
        self.max_lifetime = max_lifetime
        self.webhook_attempts = webhook_attempts
        self.webhook_retry_delay = webhook_retry_delay
        self.calls: list[Call] = []
        #: Answered callback queries: id -> the answerCallbackQuery parameters.
        self.answered: dict[str, dict[str, Any]] = {}
        self.webhook_deliveries: list[WebhookDelivery] = []
        self.handler_errors: list[BaseException] = []
        self._bots: dict[str, _Bot] = {}
        self._chats: dict[int, _Chat] = {}
        self._blocked: set[int] = set()
        self._failures: list[_SendFailure] = []
        self._callbacks: set[str] = set()
        self._next_callback = 1
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._url: str | None = None
        self._lifetime_timer: asyncio.TimerHandle | None = None
        for token in tokens:
            self.add_bot(token)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> Self:
        if self._runner is not None:
            return self
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                               shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        self._url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        if self.max_lifetime is not None:
            self._lifetime_timer = asyncio.get_running_loop().call_later(
                self.max_lifetime, lambda: asyncio.ensure_future(self.stop()))
        return self

    async def stop(self) -> None:
        """Stop serving (idempotent); pending long polls and webhook pushes are cancelled."""
        if self._lifetime_timer is not None:
            self._lifetime_timer.cancel()
            self._lifetime_timer = None
        for bot in self._bots.values():
            if bot.webhook_task is not None:
                bot.webhook_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await bot.webhook_task
                bot.webhook_task = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The base URL for ``TelegramAPIServer.from_base``, e.g. ``http://127.0.0.1:5000``."""
        if self._url is None:
            raise RuntimeError("FakeTelegram is not started; use `async with FakeTelegram()`")
        return self._url

    # -- bots and chats ----------------------------------------------------------

    def add_bot(self, token: str, *, username: str | None = None) -> dict[str, Any]:
        """Accept ``token`` (``<bot id>:<secret>``); returns the bot's User object."""
        bot_id = int(token.split(":", 1)[0])
        bot = _Bot(token=token, id=bot_id, username=username or f"helpline{bot_id}_bot",
                   first_name="Helpline")
        self._bots[token] = bot
        return bot.user()

    def _bot(self, token: str | None) -> _Bot:
        if token is None:
            if len(self._bots) != 1:
                raise ValueError("several bots: pass token=")
            return next(iter(self._bots.values()))
        return self._bots[token]

    def _chat(self, chat_id: int, first_name: str = "Ada") -> _Chat:
        chat = self._chats.get(chat_id)
        if chat is None:
            chat = self._chats[chat_id] = _Chat(chat_id, first_name)
        return chat

    # -- updates -----------------------------------------------------------------

    def push_update(self, update: Mapping[str, Any], *, token: str | None = None
                    ) -> dict[str, Any]:
        """Queue a raw update (``update_id`` assigned if missing); returns it."""
        bot = self._bot(token)
        body = dict(update)
        if "update_id" not in body:
            body["update_id"] = bot.next_update_id
        bot.next_update_id = max(bot.next_update_id, int(body["update_id"]) + 1)
        bot.updates.append(body)
        if bot.poll is not None:
            bot.poll.wake.set()
        bot.webhook_wake.set()
        return body

    def push_message(self, chat_id: int, text: str, *, user_id: int | None = None,
                     first_name: str = "Ada", language_code: str = "en",
                     chat_type: str = "private", token: str | None = None) -> dict[str, Any]:
        """The user writes ``text`` in a private chat with the bot (chat id = user id)."""
        chat = self._chat(chat_id, first_name)
        message: dict[str, Any] = {
            "message_id": chat.take_message_id(), "date": int(time.time()),
            "chat": {**chat.api(), "type": chat_type},
            "from": {"id": user_id if user_id is not None else chat_id, "is_bot": False,
                     "first_name": first_name, "language_code": language_code},
            "text": text,
        }
        command = re.match(r"/[A-Za-z0-9_]+(@\w+)?", text)
        if command:
            message["entities"] = [{"type": "bot_command", "offset": 0,
                                    "length": utf16_len(command.group(0))}]
        return self.push_update({"message": message}, token=token)

    def push_callback(self, chat_id: int, data: str | None = None, *,
                      message_id: int | None = None, button: str | None = None,
                      user_id: int | None = None, token: str | None = None) -> dict[str, Any]:
        """The user taps an inline button of one of the bot's messages.

        The message defaults to the bot's latest one with a keyboard; pick the button by
        ``data`` (its callback_data) or by ``button`` (its text).
        """
        bot = self._bot(token)
        chat = self._chat(chat_id)
        if message_id is None:
            with_keyboard = [m for m in chat.sent.values() if m.buttons()]
            if not with_keyboard:
                raise AssertionError(f"chat {chat_id} has no message with a keyboard")
            message_id = with_keyboard[-1].message_id
        sent = chat.sent[message_id]
        if data is None:
            found = [b for b in sent.buttons() if b.get("text") == button]
            if not found:
                raise AssertionError(f"no button {button!r} on message {message_id}: "
                                     f"{[b.get('text') for b in sent.buttons()]}")
            data = str(found[0]["callback_data"])
        query_id = f"{bot.id}{self._next_callback:08d}"
        self._next_callback += 1
        self._callbacks.add(query_id)
        query = {"id": query_id,
                 "from": {"id": user_id if user_id is not None else chat_id, "is_bot": False,
                          "first_name": chat.first_name, "language_code": "en"},
                 "chat_instance": f"-{chat_id}77", "data": data,
                 "message": sent.as_api(bot.user(), chat.api())}
        return self.push_update({"callback_query": query}, token=token)

    def push_blocked(self, chat_id: int, *, token: str | None = None) -> dict[str, Any]:
        """The user blocks the bot: a ``my_chat_member`` update (status ``kicked``); sends
        to the chat now get 403."""
        bot = self._bot(token)
        chat = self._chat(chat_id)
        self.block(chat_id)
        user = {"id": chat_id, "is_bot": False, "first_name": chat.first_name}
        return self.push_update({"my_chat_member": {
            "chat": chat.api(), "from": user, "date": int(time.time()),
            "old_chat_member": {"status": "member", "user": bot.user()},
            "new_chat_member": {"status": "kicked", "user": bot.user(), "until_date": 0},
        }}, token=token)

    def pending_updates(self, token: str | None = None) -> list[dict[str, Any]]:
        """Updates not yet confirmed (getUpdates) or delivered (webhook)."""
        return list(self._bot(token).updates)

    # -- failures ----------------------------------------------------------------

    def fail_sends(self, count: int, *, retry_after: int = 1, chat_id: int | None = None
                   ) -> None:
        """Answer the next ``count`` sendMessage calls (to ``chat_id``, or any) with 429."""
        self._failures.append(_SendFailure(count, retry_after, chat_id))

    def block(self, chat_id: int) -> None:
        """The user blocked the bot: every send to the chat gets 403."""
        self._blocked.add(chat_id)

    def unblock(self, chat_id: int) -> None:
        self._blocked.discard(chat_id)

    # -- inspection --------------------------------------------------------------

    def messages(self, chat_id: int) -> list[SentMessage]:
        """The bot's messages in the chat, in the order they were sent."""
        chat = self._chats.get(chat_id)
        return list(chat.sent.values()) if chat else []

    def texts(self, chat_id: int) -> list[str]:
        return [m.text for m in self.messages(chat_id)]

    def calls_to(self, method: str) -> list[Call]:
        lowered = method.lower()
        return [c for c in self.calls if c.method.lower() == lowered]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0,
                       what: str = "condition") -> None:
        """Wait until ``predicate()`` holds (checked after every request the fake serves)."""
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None

    async def wait_messages(self, chat_id: int, count: int, timeout: float = 5.0
                            ) -> list[SentMessage]:
        """Wait until the bot has sent at least ``count`` messages to the chat."""
        await self.wait_for(lambda: len(self.messages(chat_id)) >= count, timeout,
                            f"{count} messages in chat {chat_id} (have "
                            f"{len(self.messages(chat_id))})")
        return self.messages(chat_id)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- webhook sender ----------------------------------------------------------

    async def deliver_webhook(self, update: Mapping[str, Any], *, url: str | None = None,
                              secret: str | None = "", token: str | None = None) -> int:
        """POST ``update`` once to ``url`` (default: the bot's webhook) and return the status.

        ``secret`` is the header value; ``""`` (the default) sends the secret given to
        setWebhook, ``None`` sends no header. Call again with the same update to redeliver.
        """
        bot = self._bot(token)
        target = url or bot.webhook_url
        if not target:
            raise AssertionError("no webhook URL: call setWebhook first or pass url=")
        header = bot.webhook_secret if secret == "" else secret
        return await self._post_update(target, update, header)

    async def _post_update(self, url: str, update: Mapping[str, Any], secret: str | None
                           ) -> int:
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers[SECRET_HEADER] = secret
        try:
            async with self._client.post(url, data=json.dumps(update), headers=headers) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError):
            return 0

    async def _push_webhook(self, bot: _Bot) -> None:
        """Telegram's side of a webhook: POST queued updates one by one, retrying non-2xx."""
        while True:
            if not bot.updates:
                bot.webhook_wake.clear()
                await bot.webhook_wake.wait()
                continue
            update = bot.updates[0]
            for attempt in range(1, self.webhook_attempts + 1):
                status = await self._post_update(bot.webhook_url, update, bot.webhook_secret)
                self.webhook_deliveries.append(WebhookDelivery(
                    int(update["update_id"]), status, attempt, bot.webhook_secret is not None))
                await self._notify()
                if 200 <= status < 300:
                    break
                await asyncio.sleep(self.webhook_retry_delay)
            if bot.updates and bot.updates[0] is update:
                bot.updates.popleft()

    # -- HTTP ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        method = request.match_info["method"]
        params: dict[str, Any] = {}
        status = 200
        try:
            params = await _read_params(request)
            bot = self._bots.get(token)
            if bot is None:
                raise ApiError(401, "Unauthorized")
            handler = _METHODS.get(method.lower())
            if handler is None:
                raise ApiError(404, "Not Found")
            result = await handler(self, bot, params)
            body: dict[str, Any] = {"ok": True, "result": result}
        except ApiError as exc:
            status = exc.status
            body = {"ok": False, "error_code": exc.status, "description": exc.description}
            if exc.retry_after is not None:
                body["parameters"] = {"retry_after": exc.retry_after}
        except Exception as exc:  # a bug in the fake: make it visible to the test
            self.handler_errors.append(exc)
            log.exception("FakeTelegram handler failed")
            status = 500
            body = {"ok": False, "error_code": 500, "description": "Internal Server Error"}
        self.calls.append(Call(token, method, params, status, time.monotonic()))
        await self._notify()
        return web.json_response(body, status=status)

    # -- methods ---------------------------------------------------------------------

    async def get_me(self, bot: _Bot, params: dict[str, Any]) -> Any:
        return {**bot.user(), "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False}

    async def get_updates(self, bot: _Bot, params: dict[str, Any]) -> Any:
        if bot.webhook_url:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is "
                                "active; use deleteWebhook to delete the webhook first")
        offset = _int(params.get("offset"), 0)
        limit = min(max(_int(params.get("limit"), 100), 1), 100)
        timeout = max(_int(params.get("timeout"), 0), 0)
        if "allowed_updates" in params:
            allowed = _json(params["allowed_updates"])
            bot.allowed_updates = list(allowed) if allowed else None
        if offset > 0:
            while bot.updates and int(bot.updates[0]["update_id"]) < offset:
                bot.updates.popleft()
        elif offset < 0:
            while len(bot.updates) > -offset:
                bot.updates.popleft()
        if bot.poll is not None:  # Telegram terminates the older request
            bot.poll.terminated = True
            bot.poll.wake.set()
        poll = bot.poll = _Poll()
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                if poll.terminated:
                    raise ApiError(409, "Conflict: terminated by other getUpdates request; "
                                        "make sure that only one bot instance is running")
                ready = [u for u in bot.updates if self._allowed(bot, u)][:limit]
                remaining = deadline - asyncio.get_running_loop().time()
                if ready or remaining <= 0:
                    return ready
                poll.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(poll.wake.wait(), remaining)
        finally:
            if bot.poll is poll:
                bot.poll = None

    @staticmethod
    def _allowed(bot: _Bot, update: Mapping[str, Any]) -> bool:
        kind = next((k for k in update if k != "update_id"), "")
        if bot.allowed_updates is None:
            return kind not in DEFAULT_EXCLUDED
        return kind in bot.allowed_updates

    def _check_send(self, chat_id: int, *, counts_as_send: bool) -> _Chat:
        if counts_as_send:
            for failure in self._failures:
                if failure.remaining > 0 and failure.chat_id in (None, chat_id):
                    failure.remaining -= 1
                    raise ApiError(429, f"Too Many Requests: retry after {failure.retry_after}",
                                   retry_after=failure.retry_after)
        if chat_id in self._blocked:
            raise ApiError(403, "Forbidden: bot was blocked by the user")
        chat = self._chats.get(chat_id)
        if chat is None:
            raise bad_request("chat not found")
        return chat

    async def send_message(self, bot: _Bot, params: dict[str, Any]) -> Any:
        chat_id = _chat_id(params)
        raw = params.get("text")
        if not isinstance(raw, str) or raw == "":
            raise bad_request("message text is empty")
        parse_mode = params.get("parse_mode") or None
        if parse_mode is None:
            text = raw
        elif str(parse_mode).lower() == "html":
            text = html_to_text(raw)
        else:
            raise bad_request(f"unsupported parse_mode {parse_mode!r} (this fake speaks HTML)")
        if not text.strip():
            raise bad_request("message text is empty")
        if utf16_len(text) > MAX_TEXT:
            raise bad_request("message is too long")
        markup = _markup(params.get("reply_markup"))
        chat = self._check_send(chat_id, counts_as_send=True)
        sent = SentMessage(chat_id=chat_id, message_id=chat.take_message_id(), text=text,
                           raw_text=raw, parse_mode=parse_mode, reply_markup=markup,
                           date=int(time.time()))
        chat.sent[sent.message_id] = sent
        return sent.as_api(bot.user(), chat.api())

    async def send_chat_action(self, bot: _Bot, params: dict[str, Any]) -> Any:
        chat_id = _chat_id(params)
        if not params.get("action"):
            raise bad_request("action is empty")
        self._check_send(chat_id, counts_as_send=False)
        return True

    async def answer_callback_query(self, bot: _Bot, params: dict[str, Any]) -> Any:
        query_id = str(params.get("callback_query_id") or "")
        if query_id not in self._callbacks or query_id in self.answered:
            raise bad_request("query is too old and response timeout expired or query ID is "
                              "invalid")
        text = params.get("text")
        if text is not None and len(str(text)) > 200:
            raise bad_request("MESSAGE_TOO_LONG")
        self.answered[query_id] = dict(params)
        return True

    async def edit_message_reply_markup(self, bot: _Bot, params: dict[str, Any]) -> Any:
        chat_id = _chat_id(params)
        chat = self._check_send(chat_id, counts_as_send=False)
        sent = chat.sent.get(_int(params.get("message_id"), 0))
        if sent is None:
            raise bad_request("message to edit not found")
        markup = _markup(params.get("reply_markup"))
        if markup is not None and not markup.get("inline_keyboard"):
            markup = None
        if markup == sent.reply_markup:
            raise bad_request("message is not modified: specified new message content and "
                              "reply markup are exactly the same as a current content and "
                              "reply markup of the message")
        sent.reply_markup = markup
        return sent.as_api(bot.user(), chat.api())

    async def set_webhook(self, bot: _Bot, params: dict[str, Any]) -> Any:
        url = str(params.get("url") or "")
        if not url:
            return await self.delete_webhook(bot, params)
        parts = urlsplit(url)
        if parts.scheme != "https" and parts.hostname not in ("127.0.0.1", "localhost"):
            raise bad_request("bad webhook: An HTTPS URL must be provided for webhook")
        secret = params.get("secret_token")
        if secret is not None and not _SECRET_RE.fullmatch(str(secret)):
            raise bad_request("secret token contains unallowed characters")
        if _bool(params.get("drop_pending_updates")):
            bot.updates.clear()
        if "allowed_updates" in params:
            allowed = _json(params["allowed_updates"])
            bot.allowed_updates = list(allowed) if allowed else None
        bot.webhook_url = url
        bot.webhook_secret = None if secret is None else str(secret)
        if bot.poll is not None:
            bot.poll.terminated = True
            bot.poll.wake.set()
        if bot.webhook_task is None:
            bot.webhook_task = asyncio.create_task(self._push_webhook(bot),
                                                   name="fake-telegram-webhook")
        bot.webhook_wake.set()
        return True

    async def delete_webhook(self, bot: _Bot, params: dict[str, Any]) -> Any:
        if bot.webhook_task is not None:
            bot.webhook_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bot.webhook_task
            bot.webhook_task = None
        bot.webhook_url = ""
        bot.webhook_secret = None
        if _bool(params.get("drop_pending_updates")):
            bot.updates.clear()
        return True

    async def get_webhook_info(self, bot: _Bot, params: dict[str, Any]) -> Any:
        info: dict[str, Any] = {"url": bot.webhook_url, "has_custom_certificate": False,
                                "pending_update_count": len(bot.updates)}
        if bot.allowed_updates is not None:
            info["allowed_updates"] = bot.allowed_updates
        return info


_METHODS: dict[str, Any] = {
    "getme": FakeTelegram.get_me,
    "getupdates": FakeTelegram.get_updates,
    "sendmessage": FakeTelegram.send_message,
    "sendchataction": FakeTelegram.send_chat_action,
    "answercallbackquery": FakeTelegram.answer_callback_query,
    "editmessagereplymarkup": FakeTelegram.edit_message_reply_markup,
    "setwebhook": FakeTelegram.set_webhook,
    "deletewebhook": FakeTelegram.delete_webhook,
    "getwebhookinfo": FakeTelegram.get_webhook_info,
}


# --------------------------------------------------------------------------- parameters


async def _read_params(request: web.Request) -> dict[str, Any]:
    """Query string, then the body: JSON, form-encoded or multipart (as Telegram accepts)."""
    params: dict[str, Any] = dict(request.query)
    if request.method == "POST" and request.can_read_body:
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise bad_request("invalid JSON body") from None
            if not isinstance(body, dict):
                raise bad_request("the JSON body must be an object")
            params.update(body)
        else:
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
    return params


def _int(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise bad_request(f"invalid integer {value!r}") from None


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("true", "1")
    return bool(value)


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise bad_request("can't parse JSON-serialized parameter") from None
    return value


def _chat_id(params: Mapping[str, Any]) -> int:
    if params.get("chat_id") in (None, ""):
        raise bad_request("chat_id is empty")
    try:
        return int(params["chat_id"])
    except (TypeError, ValueError):
        raise bad_request("chat not found") from None


def _markup(value: Any) -> dict[str, Any] | None:
    """A validated inline keyboard, or None."""
    if value is None or value == "":
        return None
    markup = _json(value)
    if not isinstance(markup, dict):
        raise bad_request("can't parse reply keyboard markup JSON object")
    rows = markup.get("inline_keyboard")
    if rows is None:
        return markup  # reply keyboards and force-reply are accepted as they are
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise bad_request("field \"inline_keyboard\" of the InlineKeyboardMarkup must be an "
                          "Array of Arrays")
    for row in rows:
        for button in row:
            if not isinstance(button, dict) or not button.get("text"):
                raise bad_request("can't parse inline keyboard button: Text buttons are "
                                  "unallowed in the inline keyboard")
            data = button.get("callback_data")
            if data is not None and not 1 <= len(str(data).encode()) <= MAX_CALLBACK_DATA:
                raise bad_request("BUTTON_DATA_INVALID")
    return markup
