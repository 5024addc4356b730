"""The agent console: ``/agent``, a single page over a small JSON API and one WebSocket.

Routes (all under ``/agent``)::

    GET  /agent/                         the console page (static, no build step)
    GET  /agent/static/{console.js,console.css}
    POST /agent/api/login                {"name", "password"} -> session cookie
    POST /agent/api/logout
    GET  /agent/api/me                   {"agent", "csrf"} or 401
    GET  /agent/api/queue                waiting and claimed conversations
    GET  /agent/api/conversations/{id}   summary, entities with provenance, transcript
    POST /agent/api/conversations/{id}/{claim,reply,note,hand_back,resolve}
    WS   /agent/ws                       live updates (see :class:`ConsoleHub`)

Security:

* Agents come from ``settings.agents`` (name -> argon2 hash, made with
  ``helpline hash-password``). Verification runs in a worker thread; unknown
  names are checked against a dummy hash so timing does not reveal accounts,
  and repeated failures per client and name are throttled.
* The session is a cookie signed with ``settings.secret_key`` (itsdangerous,
  timestamped, 12 hours): HttpOnly, SameSite=Strict, path ``/agent``, Secure
  behind HTTPS. Without a configured key one is generated per start, so
  sessions do not survive a restart and cannot span processes. Logging out
  revokes the session in this process and closes its sockets.
* Requests that change anything need a JSON body, our own ``Origin`` (the
  Host, or ``settings.public_url``) when the browser sends one, and the
  session's CSRF token in ``X-CSRF-Token``
  (double submit: the token is only readable through ``/agent/api/me``).
  The WebSocket checks ``Origin`` and the cookie.
* Internal notes travel only to agents: nothing here sends to a customer
  channel except :class:`~engine.handoff.HandoffDesk`, which never sends notes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from engine.bus import Bus, BusEvent
from engine.core.types import HandoffPacket, TurnOutcome
from engine.handoff import DeskAction, DeskEvent, HandoffDesk, OwnershipError, QueueItem
from engine.server.context import ServerContext
from engine.store.base import ConversationState, EntityChange, MessageRecord, Store

__all__ = ["AgentAuth", "ConsoleHub", "Session", "console_routes"]

logger = logging.getLogger(__name__)

STATIC: Final = Path(__file__).resolve().parent / "static" / "agent"
COOKIE: Final = "helpline_agent"
CSRF_HEADER: Final = "x-csrf-token"
SESSION_MAX_AGE: Final = 12 * 3600  # one long shift
#: Failed logins per (client, name) allowed in THROTTLE_WINDOW seconds.
THROTTLE_LIMIT: Final = 5
THROTTLE_WINDOW: Final = 300.0
MAX_TEXT: Final = 4000
TRANSCRIPT_LIMIT: Final = 500
#: Messages a slow socket may have queued before it is closed (the page resyncs).
BACKLOG_LIMIT: Final = 1000
#: Close codes: the session is missing or revoked / the client fell behind.
CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_BACKLOG: Final = 1013

_ACTIONS: Final = frozenset({"claim", "reply", "note", "hand_back", "resolve"})
_STATIC_FILES: Final = {"console.js": "text/javascript", "console.css": "text/css"}
#: Result keys that are engine bookkeeping, not something an agent acts on.
_HIDDEN_RESULTS: Final = frozenset({"handback"})


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True, slots=True)
class Session:
    agent: str
    sid: str
    csrf: str


class AgentAuth:
    """Password checks against ``settings.agents`` and signed session cookies."""

    def __init__(self, agents: Mapping[str, str], secret: str, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.agents = agents
        self._serializer = URLSafeTimedSerializer(secret, salt="helpline.agent-session")
        self._hasher = PasswordHasher()
        self._dummy: str | None = None
        self._revoked: set[str] = set()
        self._failures: dict[str, deque[float]] = {}
        self._clock = clock

    async def verify(self, name: str, password: str) -> bool:
        """Whether ``password`` is ``name``'s; unknown names cost the same time."""
        stored = self.agents.get(name)
        if stored is None:
            if self._dummy is None:
                self._dummy = await asyncio.to_thread(self._dummy_hash)
            stored, known = self._dummy, False
        else:
            known = True
        try:
            await asyncio.to_thread(self._hasher.verify, stored, password)
        except InvalidHashError:
            logger.error("agent %r: the configured password hash is not an argon2 hash "
                         "(make one with `helpline hash-password`)", name)
            return False
        except VerificationError:
            return False
        return known

    def _dummy_hash(self) -> str:
        """A hash costing what the configured ones cost, for names that do not exist."""
        hasher = self._hasher
        for stored in self.agents.values():
            with contextlib.suppress(InvalidHashError):
                hasher = PasswordHasher.from_parameters(extract_parameters(stored))
                break
        return hasher.hash(secrets.token_hex(8))

    def throttled(self, client: str) -> bool:
        """Whether ``client`` failed too often recently."""
        failures = self._failures.get(client)
        if not failures:
            return False
        cutoff = self._clock() - THROTTLE_WINDOW
        while failures and failures[0] < cutoff:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return False
        return len(failures) >= THROTTLE_LIMIT

    def failed(self, client: str) -> None:
        self._failures.setdefault(client, deque()).append(self._clock())

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def issue(self, agent: str) -> tuple[str, Session]:
        """A new session for ``agent`` and its signed cookie value."""
        session = Session(agent, secrets.token_urlsafe(16), secrets.token_urlsafe(24))
        token = self._serializer.dumps({"a": session.agent, "s": session.sid,
                                        "c": session.csrf})
        return token, session

    def session(self, token: str | None) -> Session | None:
        """The session a cookie value carries, or None (missing, forged, expired, revoked)."""
        if not token:
            return None
        try:
            data = self._serializer.loads(token, max_age=SESSION_MAX_AGE)
        except BadSignature:  # also SignatureExpired
            return None
        if not isinstance(data, dict):
            return None
        agent, sid, csrf = data.get("a"), data.get("s"), data.get("c")
        if not (isinstance(agent, str) and isinstance(sid, str) and isinstance(csrf, str)):
            return None
        # An account removed from the config loses its sessions.
        if sid in self._revoked or agent not in self.agents:
            return None
        return Session(agent, sid, csrf)

    def revoke(self, session: Session) -> None:
        self._revoked.add(session.sid)


# --------------------------------------------------------------------------- JSON shapes


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def queue_item_json(item: QueueItem) -> dict[str, Any]:
    return asdict(item)


def record_json(record: MessageRecord) -> dict[str, Any]:
    return {"seq": record.seq, "direction": record.direction, "kind": record.kind,
            "author": record.author, "text": record.text, "at": _iso(record.created_at),
            "data": record.data}


def conversation_json(conv: ConversationState, now: datetime) -> dict[str, Any]:
    meta = conv.results.get("_handoff", {})
    waiting = (now - conv.waiting_since).total_seconds() if conv.waiting_since else None
    return {
        "id": conv.id, "channel": conv.key.channel, "account": conv.key.account,
        "thread": conv.key.thread, "owner": conv.owner, "owner_agent": conv.owner_agent,
        "flow": conv.flow, "state": conv.state, "language": conv.language,
        "reason": conv.handoff_reason, "priority": meta.get("priority"),
        "detail": meta.get("detail", ""),
        "waiting_seconds": max(0.0, waiting) if waiting is not None else None,
        "created_at": _iso(conv.created_at), "updated_at": _iso(conv.updated_at),
        "closed": conv.closed, "seq": conv.seq,
    }


def entities_json(conv: ConversationState,
                  history: Iterable[EntityChange]) -> list[dict[str, Any]]:
    """Current entities with provenance, each with its change history (oldest first)."""
    changes: dict[str, list[dict[str, Any]]] = {}
    for change in history:
        changes.setdefault(change.name, []).append({
            "value": change.value, "previous": change.previous, "turn": change.turn,
            "source": change.source, "at": _iso(change.created_at)})
    out = []
    for name, item in conv.entities.items():
        out.append({"name": name, "value": item.get("v"), "turn": item.get("t"),
                    "source": item.get("s"), "history": changes.get(name, [])})
    return out


def summary_text(conv: ConversationState, records: list[MessageRecord]) -> str:
    """The model's running summary, or one assembled from what the engine knows."""
    if conv.summary:
        return conv.summary
    parts = []
    if conv.flow:
        parts.append(f"Flow {conv.flow}" + (f", at state {conv.state}." if conv.state else "."))
    else:
        parts.append("No flow in progress.")
    detail = conv.results.get("_handoff", {}).get("detail")
    if detail:
        parts.append(f"Handed off: {detail}.")
    known = ", ".join(f"{k} {v.get('v')}" for k, v in conv.entities.items())
    if known:
        parts.append(f"Known: {known}.")
    said = [r.text for r in records if r.direction == "in" and r.kind == "text"]
    if said:
        parts.append(f"{len(said)} customer message{'s' if len(said) != 1 else ''}; "
                     f"last: “{_clip(said[-1], 140)}”")
    return " ".join(parts)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- live updates


@dataclass(eq=False)
class _Client:
    session: Session
    outbox: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    watching: str | None = None
    close_code: int | None = None

    def push(self, message: dict[str, Any]) -> None:
        if self.close_code is not None:
            return
        if self.outbox.qsize() >= BACKLOG_LIMIT:
            self.close(CLOSE_BACKLOG)
            return
        self.outbox.put_nowait(message)

    def close(self, code: int) -> None:
        if self.close_code is None:
            self.close_code = code
            self.outbox.put_nowait(None)


class ConsoleHub:
    """Fans engine events out to the connected agent sockets.

    The engine subscriber only enqueues (a turn never waits for a socket); one
    task translates events, each socket has its own outbox. Messages::

        {"type": "hello", "agent", "queue": [...]}        on connect
        {"type": "queue", "items": [...]}                 the queue changed
        {"type": "handoff", "conversation_id", "reason", "priority"}
        {"type": "activity", "conversation_id", "text"}   customer wrote (human-owned)
        {"type": "conversation", "action", "agent", "conversation": {...}}
        {"type": "records", "conversation_id", "records": [...]}   to its watchers

    Clients send ``{"type": "watch", "conversation_id": id | null}``.

    Changes other server processes committed arrive as :class:`~engine.bus.BusEvent`
    (``on_remote``, no customer text): the conversation and the messages the
    commit added are reloaded from the store and sent exactly like a local event.
    """

    def __init__(self, desk: HandoffDesk, clock: Callable[[], datetime]) -> None:
        self.desk = desk
        self.clock = clock
        self.clients: set[_Client] = set()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._queue_dirty = False
        #: This process's bus origin: its own bus events are skipped (``on_event`` has them).
        self.origin: str | None = None

    async def on_event(self, event: Any) -> None:
        """The engine subscriber: never blocks the turn."""
        if self.clients:
            self._events.put_nowait(event)

    async def on_remote(self, event: BusEvent) -> None:
        """The bus subscriber: another process committed a change; never blocks."""
        if self.clients and event.origin != self.origin:
            self._events.put_nowait(event)

    def connect(self, session: Session) -> _Client:
        client = _Client(session)
        self.clients.add(client)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="agent-console-hub")
        return client

    async def disconnect(self, client: _Client) -> None:
        self.clients.discard(client)
        if not self.clients and self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._events = asyncio.Queue()

    def close_session(self, session: Session) -> None:
        for client in list(self.clients):
            if client.session.sid == session.sid:
                client.close(CLOSE_UNAUTHORIZED)

    async def queue_json(self) -> list[dict[str, Any]]:
        return [queue_item_json(i) for i in await self.desk.queue()]

    async def _run(self) -> None:
        while True:
            event = await self._events.get()
            try:
                if isinstance(event, BusEvent):
                    event = await self._from_bus(event)
                if event is not None:
                    self._dispatch(event)
                if self._queue_dirty and self._events.empty():
                    self._queue_dirty = False
                    self._broadcast({"type": "queue", "items": await self.queue_json()})
            except Exception:  # one bad event must not stop the live updates
                logger.exception("agent console: dispatching %r failed", type(event).__name__)

    async def _from_bus(self, event: BusEvent) -> DeskEvent | TurnOutcome | None:
        """A remote change as the local event it was, reloaded from the store."""
        if event.is_resync:  # the bus may have missed events: resend the queue
            self._queue_dirty = True
            return None
        cid = event.conversation_id
        watched = any(client.watching == cid for client in self.clients)
        queued = event.owner in ("pending_human", "human")
        if event.kind == "turn" and not (watched or queued):
            return None  # a bot conversation nobody looks at
        store = self.desk.store
        conv = await store.load_by_id(cid)
        if conv is None:
            return None
        records: list[MessageRecord] = []
        if (watched or (event.kind == "turn" and queued)) and event.seq > event.seq_before:
            records = [r for r in await store.messages(cid, after_seq=event.seq_before,
                                                       limit=event.seq - event.seq_before)
                       if r.seq <= event.seq]
        if event.kind == "desk":
            action: DeskAction = event.action  # type: ignore[assignment]
            return DeskEvent(action, conv, event.agent, records=records)
        handoff = None
        if event.kind == "handoff":
            meta = conv.results.get("_handoff", {})
            handoff = HandoffPacket(
                conversation_id=conv.id, key=conv.key,
                reason=event.reason or conv.handoff_reason or "request",
                priority=str(meta.get("priority", "normal")), flow=conv.flow,
                state=conv.state, language=conv.language, summary=conv.summary,
                entities={}, detail=str(meta.get("detail", "")))
        return TurnOutcome(conversation=conv, expected_version=conv.version - 1,
                           records=records, handoff=handoff, muted=event.action == "muted")

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, DeskEvent):
            conv = event.conversation
            self._broadcast({"type": "conversation", "action": event.action,
                             "agent": event.agent,
                             "conversation": conversation_json(conv, self.clock())})
            self._to_watchers(conv.id, event.records)
            self._queue_dirty = True
        elif isinstance(event, TurnOutcome):
            conv = event.conversation
            if event.handoff is not None:
                self._broadcast({"type": "handoff", "conversation_id": conv.id,
                                 "reason": event.handoff.reason,
                                 "priority": event.handoff.priority})
                self._queue_dirty = True
            elif conv.owner in ("pending_human", "human"):
                said = [r.text for r in event.records if r.direction == "in"]
                self._broadcast({"type": "activity", "conversation_id": conv.id,
                                 "owner_agent": conv.owner_agent,
                                 "text": _clip(said[-1], 200) if said else ""})
            self._to_watchers(conv.id, event.records)

    def _to_watchers(self, conversation_id: str, records: Iterable[MessageRecord]) -> None:
        payload = [record_json(r) for r in records]
        if not payload:
            return
        message = {"type": "records", "conversation_id": conversation_id, "records": payload}
        for client in list(self.clients):
            if client.watching == conversation_id:
                client.push(message)

    def _broadcast(self, message: dict[str, Any]) -> None:
        for client in list(self.clients):
            client.push(message)


# --------------------------------------------------------------------------- the routes


class _ApiError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def _error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status)


def _allowed_origins(context: ServerContext) -> set[str]:
    """Origins besides the request's own host: the public URL behind a proxy.

    ``settings.allowed_origins`` is deliberately not used: it lists the shop
    sites that embed the customer widget, which have no business here.
    """
    allowed = set()
    if context.settings.public_url:
        parts = urlsplit(context.settings.public_url)
        allowed.add(f"{parts.scheme}://{parts.netloc}".lower())
    return allowed


def _origin_ok(conn: HTTPConnection, allowed: set[str]) -> bool:
    """Same origin as the Host header, or configured; a missing Origin passes (not a browser)."""
    origin = conn.headers.get("origin")
    if origin is None:
        return True
    origin = origin.rstrip("/").lower()
    if origin in allowed:
        return True
    host = conn.headers.get("host", "").lower()
    return bool(host) and urlsplit(origin).netloc == host


def console_routes(context: ServerContext) -> list[BaseRoute]:
    """The console's routes; subscribes its hub to the engine."""
    settings = context.settings
    secret = settings.secret_key or context.extras.setdefault(
        "console.secret", secrets.token_urlsafe(32))
    auth = AgentAuth(settings.agents, secret)
    if not settings.agents:
        logger.warning("agent console: no agent accounts configured; add `agents:` to the "
                       "config file (hashes from `helpline hash-password`)")
    desk = context.desk
    engine = context.engine
    store: Store = engine.store
    clock: Callable[[], datetime] = engine.clock
    hub = ConsoleHub(desk, clock)
    engine.subscribe(hub.on_event)
    bus: Bus | None = context.extras.get("bus")
    if bus is not None:  # changes committed by the other server processes
        hub.origin = bus.origin
        bus.subscribe(hub.on_remote)
    context.extras["console"] = hub
    allowed = _allowed_origins(context)
    secure_cookie = bool(settings.public_url and settings.public_url.startswith("https://"))

    Handler = Callable[[Request, Session], Awaitable[Response]]

    def api(handler: Handler, *, mutating: bool) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = auth.session(request.cookies.get(COOKIE))
            if session is None:
                return _error(401, "unauthorized", "log in first")
            if mutating:
                problem = _csrf_problem(request, session, allowed)
                if problem is not None:
                    return _error(403, "forbidden", problem)
            try:
                return await handler(request, session)
            except _ApiError as exc:
                return _error(exc.status, exc.error, exc.message)
            except OwnershipError as exc:
                if exc.reason == "no such conversation":
                    return _error(404, "not_found", str(exc))
                return _error(409, "conflict", str(exc))
        return endpoint

    # -- pages -------------------------------------------------------------------

    async def index(request: Request) -> Response:
        host = request.headers.get("host", "")
        response = FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")
        response.headers.update(_page_headers(host))
        return response

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC_FILES:
            return Response("not found", status_code=404)
        response = FileResponse(STATIC / name,
                                media_type=f"{_STATIC_FILES[name]}; charset=utf-8")
        response.headers["cache-control"] = "no-cache"
        response.headers["x-content-type-options"] = "nosniff"
        return response

    async def to_index(request: Request) -> Response:
        return RedirectResponse("/agent/")

    # -- session -----------------------------------------------------------------

    async def login(request: Request) -> Response:
        if not _origin_ok(request, allowed):
            return _error(403, "forbidden", "cross-origin login refused")
        try:
            body = await _json_body(request)
        except _ApiError as exc:
            return _error(exc.status, exc.error, exc.message)
        name, password = body.get("name"), body.get("password")
        if not isinstance(name, str) or not isinstance(password, str) or not name:
            return _error(400, "bad_request", "name and password are required")
        name = name.strip()
        client = f"{request.client.host if request.client else '-'}|{name.lower()}"
        if auth.throttled(client):
            return _error(429, "throttled", "too many failed attempts; wait a few minutes")
        if not await auth.verify(name, password):
            auth.failed(client)
            logger.info("agent console: failed login for %r", name)
            return _error(401, "unauthorized", "wrong name or password")
        auth.succeeded(client)
        token, session = auth.issue(name)
        logger.info("agent console: %s logged in", name)
        response = JSONResponse({"agent": session.agent, "csrf": session.csrf})
        response.set_cookie(COOKIE, token, max_age=SESSION_MAX_AGE, path="/agent",
                            httponly=True, samesite="strict", secure=secure_cookie)
        return response

    async def logout(request: Request, session: Session) -> Response:
        auth.revoke(session)
        hub.close_session(session)
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE, path="/agent", httponly=True, samesite="strict",
                               secure=secure_cookie)
        return response

    async def me(request: Request, session: Session) -> Response:
        return JSONResponse({"agent": session.agent, "csrf": session.csrf})

    # -- reading -----------------------------------------------------------------

    async def queue(request: Request, session: Session) -> Response:
        return JSONResponse({"items": await hub.queue_json()})

    async def detail(request: Request, session: Session) -> Response:
        conv = await store.load_by_id(request.path_params["cid"])
        if conv is None:
            return _error(404, "not_found", "no such conversation")
        records = await store.messages(conv.id, after_seq=max(0, conv.seq - TRANSCRIPT_LIMIT))
        history = await store.entity_history(conv.id)
        results = {k: v for k, v in conv.results.items()
                   if not k.startswith("_") and k not in _HIDDEN_RESULTS}
        return JSONResponse({
            "conversation": conversation_json(conv, clock()),
            "summary": summary_text(conv, records),
            "entities": entities_json(conv, history),
            "results": results,
            "transcript": [record_json(r) for r in records],
            "truncated": conv.seq > TRANSCRIPT_LIMIT,
        })

    # -- acting ------------------------------------------------------------------

    async def act(request: Request, session: Session) -> Response:
        cid, action = request.path_params["cid"], request.path_params["action"]
        if action not in _ACTIONS:
            return _error(404, "not_found", f"unknown action {action!r}")
        body = await _json_body(request)
        agent = session.agent
        if action == "claim":
            await desk.claim(cid, agent)
        elif action == "reply":
            await desk.reply(cid, agent, _text(body, "text", required=True))
        elif action == "note":
            await desk.note(cid, agent, _text(body, "text", required=True))
        elif action == "hand_back":
            await desk.hand_back(cid, agent, _text(body, "note", required=False))
        else:
            await desk.resolve(cid, agent)
        conv = await store.load_by_id(cid)
        assert conv is not None
        return JSONResponse({"ok": True, "conversation": conversation_json(conv, clock())})

    # -- live --------------------------------------------------------------------

    async def socket(websocket: WebSocket) -> None:
        if not _origin_ok(websocket, allowed):
            await websocket.close(code=1008)
            return
        session = auth.session(websocket.cookies.get(COOKIE))
        await websocket.accept()
        if session is None:
            await websocket.close(code=CLOSE_UNAUTHORIZED)
            return
        client = hub.connect(session)
        pump = asyncio.create_task(_pump(websocket, client), name="agent-console-pump")
        try:
            client.push({"type": "hello", "agent": session.agent,
                         "queue": await hub.queue_json()})
            while True:
                raw = await websocket.receive_text()
                _handle_client_message(client, raw)
        except WebSocketDisconnect:
            pass
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            await hub.disconnect(client)

    return [
        Route("/agent", to_index),
        Route("/agent/", index),
        Route("/agent/static/{name}", static),
        Route("/agent/api/login", login, methods=["POST"]),
        Route("/agent/api/logout", api(logout, mutating=True), methods=["POST"]),
        Route("/agent/api/me", api(me, mutating=False)),
        Route("/agent/api/queue", api(queue, mutating=False)),
        Route("/agent/api/conversations/{cid}", api(detail, mutating=False)),
        Route("/agent/api/conversations/{cid}/{action}", api(act, mutating=True),
              methods=["POST"]),
        WebSocketRoute("/agent/ws", socket),
    ]


def _page_headers(host: str) -> dict[str, str]:
    sockets = f" ws://{host} wss://{host}" if host else ""
    return {
        "content-security-policy": (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self'{sockets}; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'self'"),
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cache-control": "no-cache",
    }


def _csrf_problem(request: Request, session: Session, allowed: set[str]) -> str | None:
    if not _origin_ok(request, allowed):
        return "cross-origin request refused"
    token = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(token.encode(), session.csrf.encode()):
        return "missing or wrong CSRF token"
    return None


async def _json_body(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise _ApiError(415, "unsupported_media_type", "send application/json")
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise _ApiError(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def _text(body: Mapping[str, Any], name: str, *, required: bool) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise _ApiError(400, "bad_request", f"{name} must be a string")
    value = value.strip()
    if required and not value:
        raise _ApiError(400, "bad_request", f"{name} is empty")
    if len(value) > MAX_TEXT:
        raise _ApiError(400, "bad_request", f"{name} is longer than {MAX_TEXT} characters")
    return value


def _handle_client_message(client: _Client, raw: str) -> None:
    try:
        message = json.loads(raw)
    except ValueError:
        return
    if not isinstance(message, dict):
        return
    if message.get("type") == "watch":
        target = message.get("conversation_id")
        client.watching = target if isinstance(target, str) else None


async def _pump(websocket: WebSocket, client: _Client) -> None:
    """Send the client's outbox until it is closed."""
    while True:
        message = await client.outbox.get()
        if message is None:
            with contextlib.suppress(Exception):
                await websocket.close(code=client.close_code or 1000)
            return
        try:
            await websocket.send_text(json.dumps(message, ensure_ascii=False))
        except Exception:  # the socket is gone; the receive loop notices
            return
