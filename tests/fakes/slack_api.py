"""A protocol-faithful fake of the Slack Web API and Socket Mode, on 127.0.0.1, and a signed
Events API sender.

The real ``slack_sdk``/``slack_bolt`` clients talk to :class:`FakeSlack` through
``AsyncWebClient(base_url=fake.api_url)``; nothing in them is patched.

Web API (``POST`` or ``GET /api/<method>``; JSON, form or query parameters; the token as
``Authorization: Bearer`` or a ``token`` parameter):

* ``auth.test``, ``chat.postMessage`` (returns ``channel``, an increasing ``ts`` and the
  stored ``message``), ``chat.update``, ``chat.postEphemeral``, ``conversations.info``,
  ``conversations.history`` (newest first, top-level messages, ``metadata`` only with
  ``include_all_metadata``, cursor pagination), ``conversations.replies``, ``users.info``
  and ``apps.connections.open`` (app-level token only; returns a ``ws://`` URL).
* Errors are HTTP 200 ``{"ok": false, "error": ...}`` (``not_authed``, ``invalid_auth``,
  ``not_allowed_token_type``, ``channel_not_found``, ``no_text``, ``msg_too_long``,
  ``message_not_found``, ``user_not_found``, ``unknown_method``, or anything injected with
  :meth:`FakeSlack.fail`); only rate limits use HTTP 429, with ``Retry-After``
  (:meth:`FakeSlack.rate_limit`).
* Every call is recorded in :attr:`FakeSlack.calls` with the loop time it arrived, and every
  stored message in a per-channel log, :attr:`FakeSlack.messages`.

Socket Mode: the URL from ``apps.connections.open`` opens a WebSocket that says ``hello``;
:meth:`FakeSlack.socket_send` pushes an envelope (``events_api`` or ``interactive``, with
``retry_attempt``/``retry_reason``) and returns the client's acknowledgement.

:class:`SlackEvents` builds Events API envelopes (``event_callback``, ``url_verification``)
and ``block_actions`` payloads, signs them with the v0 scheme (valid, forged, or with a
timestamp older than the 300 s Slack allows) and POSTs them to an app, optionally as a
redelivery with ``X-Slack-Retry-Num``/``X-Slack-Retry-Reason``.

Example (pytest-asyncio)::

    async with FakeSlack() as fake:
        client = AsyncWebClient(token=fake.token, base_url=fake.api_url)
        sent = await client.chat_postMessage(channel="C1", text="hi")
        assert fake.posted("C1")[0]["ts"] == sent["ts"]
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from urllib.parse import parse_qsl, urlencode

import httpx
from aiohttp import WSMsgType, web
from slack_sdk.signature import SignatureVerifier

__all__ = [
    "APP_ID",
    "APP_TOKEN",
    "BOT_ID",
    "BOT_TOKEN",
    "BOT_USER_ID",
    "SIGNING_SECRET",
    "TEAM_ID",
    "ApiCall",
    "FakeSlack",
    "SlackEvents",
]

log = logging.getLogger(__name__)

BOT_TOKEN = "xoxb-1-fake-bot-token"
APP_TOKEN = "xapp-1-fake-app-token"
SIGNING_SECRET = "fake-signing-secret"
TEAM_ID = "T0FAKE"
APP_ID = "A0FAKE"
BOT_USER_ID = "U0BOT"
BOT_ID = "B0BOT"
#: Slack truncates ``text`` beyond this; the fake refuses it like ``msg_too_long``.
MAX_TEXT = 40_000
#: Slack allows at most 50 blocks in a message.
MAX_BLOCKS = 50
#: Seconds a request may be timestamped away from now (the v0 signature rule).
SIGNATURE_SKEW = 300

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One Web API request as the fake saw it."""

    method: str
    params: Mapping[str, Any]
    token: str | None
    #: HTTP status of the answer (200, or 429 when rate limited).
    status: int
    ok: bool
    error: str | None
    #: ``loop.time()`` when the request arrived.
    at: float
    #: The JSON body the fake answered with.
    response: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Injected:
    error: str
    times: int
    retry_after: int = 0


class FakeSlack:
    """The fake Slack Web API server; see the module docstring.

    Args:
        token: the bot token the API accepts.
        app_token: the app-level token ``apps.connections.open`` accepts.
        channels: known channel ids (``conversations.info`` answers them); with
            ``strict_channels`` any other channel is ``channel_not_found``.
        users: ``users.info`` records by user id (a plain record is made up otherwise).
        max_lifetime: stop by itself after this many seconds.
        max_log: keep at most this many call records.
    """

    def __init__(
        self,
        *,
        token: str = BOT_TOKEN,
        app_token: str = APP_TOKEN,
        team_id: str = TEAM_ID,
        bot_user_id: str = BOT_USER_ID,
        bot_id: str = BOT_ID,
        channels: Mapping[str, str] | None = None,
        strict_channels: bool = False,
        users: Mapping[str, Mapping[str, Any]] | None = None,
        max_lifetime: float | None = 300.0,
        max_log: int = 10_000,
    ) -> None:
        self.token = token
        self.app_token = app_token
        self.team_id = team_id
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.channels: dict[str, str] = dict(channels or {})
        self.strict_channels = strict_channels
        self.users: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (users or {}).items()}
        self.max_lifetime = max_lifetime
        self.max_log = max_log
        self.calls: list[ApiCall] = []
        #: Per channel, every message in the order it was stored (bot posts and, through
        #: :class:`SlackEvents`, the users' messages).
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.ephemeral: list[dict[str, Any]] = []
        #: Socket Mode acknowledgements received, by envelope id.
        self.acks: dict[str, dict[str, Any]] = {}
        self._ts = itertools.count(1)
        self._errors: dict[str, list[_Injected]] = {}
        self._sockets: list[web.WebSocketResponse] = []
        self._ack_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stop_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> Self:
        """Bind 127.0.0.1 on a free port and serve; returns ``self``."""
        if self._runner is not None:
            return self
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/link/", self._socket)
        app.router.add_route("*", "/api/{method}", self._handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        self._url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        if self.max_lifetime is not None:
            self._timer = asyncio.get_running_loop().call_later(self.max_lifetime, self._expire)
        return self

    def _expire(self) -> None:
        log.warning("FakeSlack at %s reached max_lifetime; stopping", self._url)
        self._stop_task = asyncio.ensure_future(self.stop())

    async def stop(self) -> None:
        """Stop serving (idempotent); open Socket Mode connections are closed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close()
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
        if self._url is None:
            raise RuntimeError("FakeSlack is not started")
        return self._url

    @property
    def api_url(self) -> str:
        """The ``base_url`` for ``AsyncWebClient`` (with the trailing slash)."""
        return f"{self.url}/api/"

    # -- scripting -------------------------------------------------------------------------

    def rate_limit(self, method: str, *, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with 429 and ``Retry-After``."""
        self._errors.setdefault(method, []).append(_Injected("ratelimited", times, retry_after))

    def fail(self, method: str, error: str, *, times: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with ``{"ok": false, "error": error}``."""
        self._errors.setdefault(method, []).append(_Injected(error, times))

    def next_ts(self) -> str:
        """A fresh message timestamp, increasing across everything the fake stores."""
        n = next(self._ts)
        return f"{1_700_000_000 + n // 1_000_000}.{n % 1_000_000:06d}"

    def store_message(self, channel: str, message: dict[str, Any]) -> dict[str, Any]:
        """Add a message to ``channel``'s log (gives it a ``ts`` unless it has one)."""
        message.setdefault("type", "message")
        message.setdefault("ts", self.next_ts())
        self.messages.setdefault(channel, []).append(message)
        self._notify()
        return message

    # -- reading ---------------------------------------------------------------------------

    def calls_to(self, method: str, *, ok: bool | None = None) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method and (ok is None or c.ok == ok)]

    def posted(self, channel: str | None = None, *,
               thread_ts: str | None = None) -> list[dict[str, Any]]:
        """Messages the bot stored (``chat.postMessage``), oldest first, current content."""
        channels = [channel] if channel is not None else list(self.messages)
        return [m for c in channels for m in self.messages.get(c, [])
                if m.get("bot_id") == self.bot_id
                and (thread_ts is None or m.get("thread_ts") == thread_ts)]

    def find(self, channel: str, ts: str) -> dict[str, Any] | None:
        return next((m for m in self.messages.get(channel, []) if m["ts"] == ts), None)

    async def wait_for(self, predicate: Callable[[], T | None], timeout: float = 5.0) -> T:
        """Wait until ``predicate()`` is truthy (re-checked after each change); return it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"FakeSlack: condition not met within {timeout} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))

    async def wait_posted(self, channel: str, count: int, *, thread_ts: str | None = None,
                          timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until the bot posted at least ``count`` messages there; return them all."""
        def enough() -> list[dict[str, Any]] | None:
            found = self.posted(channel, thread_ts=thread_ts)
            return found if len(found) >= count else None

        return await self.wait_for(enough, timeout)

    def _notify(self) -> None:
        self._changed.set()

    # -- Socket Mode -----------------------------------------------------------------------

    async def socket_send(self, payload: Mapping[str, Any], *,
                          kind: Literal["events_api", "interactive"] = "events_api",
                          retry_attempt: int = 0, retry_reason: str = "",
                          timeout: float = 5.0) -> dict[str, Any]:
        """Push one envelope to the connected app and return its acknowledgement."""
        ws = await self.wait_for(lambda: next((s for s in self._sockets if not s.closed), None),
                                 timeout)
        envelope_id = str(uuid.uuid4())
        waiter = asyncio.get_running_loop().create_future()
        self._ack_waiters[envelope_id] = waiter
        await ws.send_str(json.dumps({
            "envelope_id": envelope_id, "type": kind, "payload": dict(payload),
            "accepts_response_payload": kind == "interactive",
            "retry_attempt": retry_attempt, "retry_reason": retry_reason,
        }))
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._ack_waiters.pop(envelope_id, None)

    @property
    def socket_connections(self) -> int:
        return sum(1 for s in self._sockets if not s.closed)

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if not ticket.startswith("fake-"):
            return web.Response(status=401, text="invalid ticket")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.append(ws)
        self._notify()
        await ws.send_str(json.dumps({
            "type": "hello", "num_connections": len(self._sockets),
            "connection_info": {"app_id": APP_ID},
            "debug_info": {"host": "fake", "approximate_connection_time": 3600}}))
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    continue
                with contextlib.suppress(ValueError):
                    data = json.loads(message.data)
                    envelope_id = data.get("envelope_id")
                    if isinstance(envelope_id, str):
                        self.acks[envelope_id] = data
                        waiter = self._ack_waiters.get(envelope_id)
                        if waiter is not None and not waiter.done():
                            waiter.set_result(data)
        finally:
            self._sockets.remove(ws)
        return ws

    # -- the Web API -----------------------------------------------------------------------

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.method == "POST" and request.can_read_body:
            body = await request.read()
            ctype = request.content_type
            if ctype == "application/json":
                data = json.loads(body or b"{}")
                if not isinstance(data, dict):
                    raise ValueError("the JSON body must be an object")
                params.update(data)
            elif ctype in ("application/x-www-form-urlencoded", ""):
                params.update(parse_qsl(body.decode(), keep_blank_values=True))
            elif ctype == "multipart/form-data":
                form = await request.post()
                params.update({k: v for k, v in form.items() if isinstance(v, str)})
        # Form-encoded structured arguments arrive as JSON strings.
        for name in ("blocks", "metadata", "attachments"):
            if isinstance(params.get(name), str) and params[name]:
                with contextlib.suppress(ValueError):
                    params[name] = json.loads(params[name])
        return params

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        at = asyncio.get_running_loop().time()
        try:
            params = await self._params(request)
        except ValueError:
            return self._answer(method, {}, None, at, {"ok": False, "error": "invalid_json"})
        token = params.pop("token", None)
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth.removeprefix("Bearer ").strip()
        injected = self._injected(method)
        if injected is not None and injected.error == "ratelimited":
            return self._answer(method, params, token, at, {"ok": False, "error": "ratelimited"},
                                status=429, headers={"Retry-After": str(injected.retry_after)})
        body: dict[str, Any] | None = self._auth_error(method, token)
        if body is None and injected is not None:
            body = {"ok": False, "error": injected.error}
        if body is None:
            handler = self._methods().get(method)
            body = handler(params) if handler else {"ok": False, "error": "unknown_method"}
        return self._answer(method, params, token, at, body)

    def _answer(self, method: str, params: Mapping[str, Any], token: str | None, at: float,
                body: dict[str, Any], *, status: int = 200,
                headers: Mapping[str, str] | None = None) -> web.Response:
        ok = bool(body.get("ok"))
        self.calls.append(ApiCall(method, dict(params), token, status, ok,
                                  None if ok else str(body.get("error")), at, body))
        if len(self.calls) > self.max_log:
            del self.calls[: len(self.calls) - self.max_log]
        self._notify()
        return web.json_response(body, status=status, headers=headers)

    def _injected(self, method: str) -> _Injected | None:
        queue = self._errors.get(method)
        if not queue:
            return None
        rule = queue[0]
        rule.times -= 1
        if rule.times <= 0:
            queue.pop(0)
        return rule

    def _auth_error(self, method: str, token: str | None) -> dict[str, Any] | None:
        if not token:
            return {"ok": False, "error": "not_authed"}
        if method == "apps.connections.open":
            if token == self.app_token:
                return None
            return {"ok": False, "error": "not_allowed_token_type" if token == self.token
                    else "invalid_auth"}
        if token == self.app_token:
            return {"ok": False, "error": "not_allowed_token_type"}
        if token != self.token:
            return {"ok": False, "error": "invalid_auth"}
        return None

    def _methods(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {
            "auth.test": self._auth_test,
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "chat.postEphemeral": self._post_ephemeral,
            "conversations.info": self._conversation_info,
            "conversations.history": self._history,
            "conversations.replies": self._replies,
            "users.info": self._user_info,
            "apps.connections.open": self._connections_open,
        }

    def _channel_error(self, channel: Any) -> dict[str, Any] | None:
        if not isinstance(channel, str) or not channel:
            return {"ok": False, "error": "channel_not_found"}
        if self.strict_channels and channel not in self.channels:
            return {"ok": False, "error": "channel_not_found"}
        return None

    def _auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake Team",
                "user": "helpline", "team_id": self.team_id, "user_id": self.bot_user_id,
                "bot_id": self.bot_id, "is_enterprise_install": False}

    def _content_error(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        text, blocks = params.get("text"), params.get("blocks")
        if not text and not blocks and not params.get("attachments"):
            return {"ok": False, "error": "no_text"}
        if isinstance(text, str) and len(text) > MAX_TEXT:
            return {"ok": False, "error": "msg_too_long"}
        if blocks is not None and (not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS):
            return {"ok": False, "error": "invalid_blocks"}
        return None

    def _post_message(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = params.get("channel")
        error = self._channel_error(channel) or self._content_error(params)
        if error is not None:
            return error
        message: dict[str, Any] = {"type": "message", "user": self.bot_user_id,
                                   "bot_id": self.bot_id, "team": self.team_id,
                                   "text": params.get("text") or "", "ts": self.next_ts()}
        for name in ("thread_ts", "blocks", "metadata"):
            if params.get(name):
                message[name] = params[name]
        stored = self.store_message(str(channel), message)
        if "thread_ts" in message:
            root = self.find(str(channel), str(message["thread_ts"]))
            if root is not None:
                root["reply_count"] = int(root.get("reply_count", 0)) + 1
        return {"ok": True, "channel": channel, "ts": stored["ts"],
                "message": {k: v for k, v in stored.items() if k != "metadata"}}

    def _update(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = params.get("channel"), params.get("ts")
        error = self._channel_error(channel)
        if error is not None:
            return error
        message = self.find(str(channel), str(ts))
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        error = self._content_error(params)
        if error is not None:
            return error
        for name in ("text", "blocks", "metadata"):
            if name in params:
                message[name] = params[name]
        message["edited"] = {"user": self.bot_user_id, "ts": self.next_ts()}
        self._notify()
        return {"ok": True, "channel": channel, "ts": ts, "text": message.get("text", ""),
                "message": {k: v for k, v in message.items() if k != "metadata"}}

    def _post_ephemeral(self, params: dict[str, Any]) -> dict[str, Any]:
        error = self._channel_error(params.get("channel")) or self._content_error(params)
        if error is not None:
            return error
        if not params.get("user"):
            return {"ok": False, "error": "user_not_found"}
        ts = self.next_ts()
        self.ephemeral.append({**params, "message_ts": ts})
        self._notify()
        return {"ok": True, "message_ts": ts}

    def _conversation_info(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = params.get("channel")
        error = self._channel_error(channel)
        if error is not None:
            return error
        name = self.channels.get(str(channel), str(channel).lower())
        return {"ok": True, "channel": {"id": channel, "name": name, "is_channel": True,
                                        "is_im": str(channel).startswith("D"),
                                        "is_member": True}}

    def _history(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = params.get("channel")
        error = self._channel_error(channel)
        if error is not None:
            return error
        top = [m for m in self.messages.get(str(channel), [])
               if "thread_ts" not in m or m["thread_ts"] == m["ts"]]
        top.reverse()  # newest first, as Slack answers
        return self._page(top, params)

    def _replies(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = params.get("channel"), params.get("ts")
        error = self._channel_error(channel)
        if error is not None:
            return error
        root = self.find(str(channel), str(ts))
        if root is None:
            return {"ok": False, "error": "thread_not_found"}
        replies = [m for m in self.messages.get(str(channel), [])
                   if m.get("thread_ts") == ts and m is not root]
        return self._page([root, *replies], params)

    def _page(self, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
        limit = max(1, min(int(params.get("limit") or 100), 1000))
        start = int(params.get("cursor") or 0)
        page = messages[start:start + limit]
        keep_metadata = str(params.get("include_all_metadata", "")).lower() in ("1", "true")
        shown = [m if keep_metadata else {k: v for k, v in m.items() if k != "metadata"}
                 for m in page]
        more = start + limit < len(messages)
        return {"ok": True, "messages": shown, "has_more": more,
                "response_metadata": {"next_cursor": str(start + limit) if more else ""}}

    def _user_info(self, params: dict[str, Any]) -> dict[str, Any]:
        user = params.get("user")
        if not isinstance(user, str) or not user.startswith(("U", "W")):
            return {"ok": False, "error": "user_not_found"}
        record = self.users.get(user) or {"id": user, "name": user.lower(),
                                          "real_name": f"User {user}"}
        return {"ok": True, "user": {"is_bot": False, "team_id": self.team_id, **record,
                                     "profile": {"display_name": record.get("name", user),
                                                 "real_name": record.get("real_name", user)}}}

    def _connections_open(self, params: dict[str, Any]) -> dict[str, Any]:
        ws_url = self.url.replace("http://", "ws://", 1)
        return {"ok": True, "url": f"{ws_url}/link/?ticket=fake-{uuid.uuid4().hex}"}


# --------------------------------------------------------------------------------------
# The Events API sender
# --------------------------------------------------------------------------------------

Signature = Literal["valid", "forged", "stale", "missing"]


class SlackEvents:
    """Builds, signs and delivers Slack requests to an app, as Slack's servers do.

    Use as ``async with SlackEvents(url) as events:`` (or call :meth:`aclose`).

    Args:
        url: the app's request URL (e.g. ``http://127.0.0.1:PORT/slack/events``).
        signing_secret: the app's signing secret.
        fake: when given, users' messages are also stored in its channel logs and get
            their ``ts`` from it (so thread timestamps are unique across both).
    """

    def __init__(self, url: str, signing_secret: str = SIGNING_SECRET, *,
                 fake: FakeSlack | None = None, team_id: str = TEAM_ID,
                 api_app_id: str = APP_ID, timeout: float = 10.0) -> None:
        self.url = url
        self.signing_secret = signing_secret
        self.fake = fake
        self.team_id = team_id
        self.api_app_id = api_app_id
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._ts = itertools.count(1)
        self._client: httpx.AsyncClient | None = None

    # -- building ----------------------------------------------------------------------

    def _next_ts(self) -> str:
        if self.fake is not None:
            return self.fake.next_ts()
        n = next(self._ts)
        return f"{1_600_000_000 + n}.000100"

    def message(self, channel: str, user: str, text: str, *, thread_ts: str | None = None,
                ts: str | None = None, subtype: str | None = None, bot_id: str | None = None,
                channel_type: str = "channel", event_id: str | None = None,
                store: bool = True) -> dict[str, Any]:
        """An ``event_callback`` envelope carrying a ``message`` event."""
        event: dict[str, Any] = {"type": "message", "channel": channel, "user": user,
                                 "text": text, "ts": ts or self._next_ts(),
                                 "team": self.team_id, "channel_type": channel_type,
                                 "event_ts": ""}
        event["event_ts"] = event["ts"]
        if thread_ts is not None:
            event["thread_ts"] = thread_ts
        if subtype is not None:
            event["subtype"] = subtype
        if bot_id is not None:
            event["bot_id"] = bot_id
        if self.fake is not None and store and subtype is None:
            self.fake.store_message(channel, {k: v for k, v in event.items()
                                              if k not in ("channel", "channel_type",
                                                           "event_ts")})
        return self.envelope(event, event_id=event_id)

    def envelope(self, event: Mapping[str, Any], *, event_id: str | None = None) -> dict[str, Any]:
        return {"token": "legacy-verification-token", "team_id": self.team_id,
                "api_app_id": self.api_app_id, "event": dict(event), "type": "event_callback",
                "event_id": event_id or f"Ev{next(self._ids):08d}",
                "event_time": int(time.time()),
                "authorizations": [{"team_id": self.team_id, "is_bot": True,
                                    "user_id": BOT_USER_ID}]}

    @staticmethod
    def url_verification(challenge: str = "challenge-token") -> dict[str, Any]:
        return {"token": "legacy-verification-token", "challenge": challenge,
                "type": "url_verification"}

    def block_actions(self, user: str, message: Mapping[str, Any], action_id: str, *,
                      channel: str, value: str | None = None) -> dict[str, Any]:
        """A ``block_actions`` payload: ``user`` pressed button ``action_id`` on ``message``.

        The button's ``value`` is read from the message's blocks unless given.
        """
        button = _find_button(message, action_id)
        if value is None:
            if button is None:
                raise KeyError(f"no button {action_id!r} in the message")
            value = str(button.get("value", ""))
        block_id = str(button.get("block_id", "")) if button is not None else ""
        action_ts = f"{time.time():.6f}"
        container: dict[str, Any] = {"type": "message", "message_ts": message["ts"],
                                     "channel_id": channel, "is_ephemeral": False}
        if message.get("thread_ts"):
            container["thread_ts"] = message["thread_ts"]
        return {
            "type": "block_actions",
            "user": {"id": user, "username": user.lower(), "name": user.lower(),
                     "team_id": self.team_id},
            "api_app_id": self.api_app_id,
            "token": "legacy-verification-token",
            "container": container,
            "trigger_id": f"{next(self._ids)}.trigger",
            "team": {"id": self.team_id, "domain": "fake"},
            "channel": {"id": channel, "name": channel.lower()},
            "message": dict(message),
            "response_url": "https://hooks.slack.invalid/actions/fake",
            "actions": [{"action_id": action_id, "block_id": block_id, "type": "button",
                         "value": value, "action_ts": action_ts,
                         "text": {"type": "plain_text", "text": action_id}}],
        }

    # -- signing -----------------------------------------------------------------------

    def headers(self, body: bytes, *, content_type: str, signature: Signature = "valid",
                retry_num: int | None = None, retry_reason: str | None = None) -> dict[str, str]:
        timestamp = int(time.time())
        if signature == "stale":
            timestamp -= SIGNATURE_SKEW + 60
        secret = "not-" + self.signing_secret if signature == "forged" else self.signing_secret
        headers = {"Content-Type": content_type, "X-Slack-Request-Timestamp": str(timestamp)}
        if signature != "missing":
            signed = SignatureVerifier(secret).generate_signature(timestamp=str(timestamp),
                                                                  body=body)
            assert signed is not None  # None only without a timestamp
            headers["X-Slack-Signature"] = signed
        if retry_num is not None:
            headers["X-Slack-Retry-Num"] = str(retry_num)
            headers["X-Slack-Retry-Reason"] = retry_reason or "http_timeout"
        return headers

    # -- delivering --------------------------------------------------------------------

    async def send(self, envelope: Mapping[str, Any], *, signature: Signature = "valid",
                   retry_num: int | None = None,
                   retry_reason: str | None = None) -> httpx.Response:
        """POST an Events API envelope (JSON), signed as asked."""
        body = json.dumps(envelope).encode()
        return await self._post(body, self.headers(
            body, content_type="application/json", signature=signature,
            retry_num=retry_num, retry_reason=retry_reason))

    async def redeliver(self, envelope: Mapping[str, Any], *, times: int = 1,
                        reason: str = "http_timeout") -> list[httpx.Response]:
        """Deliver the same envelope again ``times`` times, as Slack's retries 1..times."""
        return [await self.send(envelope, retry_num=n, retry_reason=reason)
                for n in range(1, times + 1)]

    async def send_action(self, payload: Mapping[str, Any], *,
                          signature: Signature = "valid") -> httpx.Response:
        """POST an interactivity payload, form-encoded as ``payload=<json>``."""
        body = urlencode({"payload": json.dumps(payload)}).encode()
        return await self._post(body, self.headers(
            body, content_type="application/x-www-form-urlencoded", signature=signature))

    async def _post(self, body: bytes, headers: Mapping[str, str]) -> httpx.Response:
        if self._client is None:  # one client: building one costs tens of milliseconds
            self._client = httpx.AsyncClient(timeout=self.timeout)
        return await self._client.post(self.url, content=body, headers=dict(headers))

    async def aclose(self) -> None:
        """Close the HTTP client (idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


def _find_button(message: Mapping[str, Any], action_id: str) -> dict[str, Any] | None:
    for block in _blocks(message):
        for element in block.get("elements", []):
            if isinstance(element, dict) and element.get("action_id") == action_id:
                return {**element, "block_id": block.get("block_id", "")}
    return None


def _blocks(message: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    blocks = message.get("blocks") or []
    for block in blocks:
        if isinstance(block, dict):
            yield block
