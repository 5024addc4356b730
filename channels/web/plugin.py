"""The web chat channel: Starlette routes around the sans-I/O protocol.

Routes (all under ``/chat``):

* ``POST /chat/session``: a signed, expiring session token (CORS for allowed origins).
* ``WS /chat/ws``: the chat socket (``docs/web-protocol.md``).
* ``GET /chat/``: the demo shop page; ``GET /chat/widget.js`` and ``/chat/widget.css``.

Each socket has a reader (this handler), a writer task draining a bounded
outbox (``send`` awaits, so a slow browser slows only its own writer), and a
turn worker that feeds the engine one customer frame at a time. Everything a
customer sees is in the store first; a socket that missed something resumes
from its ``last_seq``, so the outbox may drop a socket (1013) but never a message.

Shutdown: uvicorn closes open sockets with 1012 and waits for the handlers,
which finish their in-flight turn (the reply is stored; the browser gets it
when it resumes). :meth:`WebChannel.stop` then waits for any turn still
running and closes what is left with 1012.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from channels.web.protocol import (
    Ack,
    AuthFrame,
    ClientMessage,
    CloseCode,
    ErrorCode,
    Limits,
    MessageFrame,
    PingFrame,
    Pong,
    QuickReplyFrame,
    RateLimiter,
    RatingFrame,
    Ready,
    Reject,
    Resync,
    ServerFrame,
    SocketPolicy,
    TurnFrame,
    Typing,
    encode,
    error,
    frame_from_outbound,
    frame_from_record,
    inbound_from_frame,
    resume_frames,
    resume_mode,
    stored_message_id,
)
from channels.web.session import SessionClaims, SessionSigner, TokenError, valid_site
from engine.core.types import Outbound, TurnOutcome
from engine.store.base import ConversationKey

if TYPE_CHECKING:
    from engine.server.context import ServerContext

__all__ = ["STATIC_DIR", "WebChannel", "make"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
CHANNEL = "web"
#: Customer frames waiting for their turn on one socket; more get ``overloaded``.
INBOX_SIZE = 32
#: Seconds :meth:`WebChannel.stop` waits for in-flight turns.
STOP_TIMEOUT = 30.0
#: Session tokens one client address may request per minute.
SESSIONS_PER_MINUTE = 60


def make(context: ServerContext) -> WebChannel:
    """Entry point (``helpline.channels``: ``web``)."""
    return WebChannel(context)


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str = ""


class Connection:
    """One authenticated (or authenticating) socket: policy, outbox, what it was sent."""

    def __init__(self, ws: WebSocket, limits: Limits) -> None:
        self.ws = ws
        self.limits = limits
        self.policy = SocketPolicy(limits)
        # Unbounded queue, bounded by hand: the close marker must always fit.
        self._outbox: asyncio.Queue[str | _Close] = asyncio.Queue()
        self.inbox: asyncio.Queue[TurnFrame | None] = asyncio.Queue(INBOX_SIZE)
        self.claims: SessionClaims | None = None
        self.key: ConversationKey | None = None
        self.closing = False
        #: While resuming: frames pushed meanwhile, sent after the replay.
        self._held: list[ServerFrame] | None = None
        #: Message seqs this socket has (or is about to get); never sent twice.
        self._sent: set[int] = set()
        #: The client already has every message up to here (its ``last_seq``).
        self.floor = 0

    # -- sending (never blocks; the writer task does the awaiting) -------------

    def send(self, frame: ServerFrame) -> None:
        if self._held is not None:
            self._held.append(frame)
            return
        self._emit(frame)

    def _emit(self, frame: ServerFrame) -> None:
        if isinstance(frame, MessageFrame):
            if frame.seq <= self.floor or frame.seq in self._sent:
                return
            self._sent.add(frame.seq)
        elif isinstance(frame, Ack):
            self._sent.add(frame.seq)
        elif isinstance(frame, Resync):
            self._sent.update(m.seq for m in frame.messages)
        self._enqueue(encode(frame))

    def _enqueue(self, text: str) -> None:
        if self.closing:
            return
        if self._outbox.qsize() >= self.limits.outbox_size:
            # The browser reads slower than we write; it resumes from its last_seq.
            self.close(CloseCode.TRY_AGAIN_LATER, "too far behind")
            return
        self._outbox.put_nowait(text)

    def hold(self) -> None:
        self._held = []

    def release(self, first: Iterable[ServerFrame]) -> None:
        """Send ``first`` (ready + replay), then whatever arrived while resuming."""
        held, self._held = self._held or [], None
        for frame in first:
            self._emit(frame)
        for frame in held:
            self._emit(frame)

    def reject(self, verdict: Reject) -> None:
        if verdict.error is not None:
            self.send(verdict.error)
        if verdict.close is not None:
            self.close(verdict.close, verdict.error.code.value if verdict.error else "")

    def close(self, code: int, reason: str = "") -> None:
        if self.closing:
            return
        self.closing = True
        self.policy.closed()
        self._held = None
        self._outbox.put_nowait(_Close(code, reason))

    async def run_writer(self) -> None:
        while True:
            item = await self._outbox.get()
            try:
                if isinstance(item, _Close):
                    await self.ws.close(item.code, item.reason)
                    return
                await self.ws.send_text(item)
            except Exception:  # the socket is gone; the log keeps everything
                self.closing = True
                self.policy.closed()
                return


class WebChannel:
    """The ``web`` channel plugin; see the module docstring."""

    name = CHANNEL

    def __init__(self, context: ServerContext, *, limits: Limits | None = None,
                 signer: SessionSigner | None = None) -> None:
        self.context = context
        self.engine = context.app.engine
        self.store = context.app.store
        self.settings = context.settings
        self.limits = limits or Limits()
        self.signer = signer or SessionSigner(context.settings.secret_key)
        self.sockets: dict[str, set[Connection]] = {}
        self.stopping = False
        self._turns: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.sessions_per_minute = SESSIONS_PER_MINUTE
        self._session_limits: dict[str, RateLimiter] = {}
        #: Customer frames being turned, by stored message id: who gets the ack.
        self._awaiting: dict[str, Connection] = {}
        self._bus_origin: str | None = None
        context.extras[CHANNEL] = self

    # -- plugin protocol -------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/chat/session", self.session_endpoint, methods=["POST", "OPTIONS"]),
            WebSocketRoute("/chat/ws", self.socket_endpoint),
            Route("/chat/", self.demo_page),
            Route("/chat/widget.js", self.static_file("widget.js", "text/javascript")),
            Route("/chat/widget.css", self.static_file("widget.css", "text/css")),
        ]

    async def start(self) -> None:
        self.engine.register_sender(CHANNEL, self.send_outbound)
        self.engine.subscribe(self.on_committed)
        bus = self.context.extras.get("bus")
        if bus is not None:
            # Commits made by other server processes (an agent's reply from a
            # console connected elsewhere) reach sockets held by this one.
            self._bus_origin = bus.origin
            bus.subscribe(self.on_remote)

    async def stop(self) -> None:
        """Let in-flight turns finish, then close every socket with 1012."""
        self.stopping = True
        if self._turns:
            await asyncio.wait(set(self._turns), timeout=STOP_TIMEOUT)
        self.engine.unsubscribe(self.on_committed)
        for conn in [c for conns in self.sockets.values() for c in conns]:
            conn.close(CloseCode.SERVICE_RESTART, "server restart")
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=5.0)

    # -- engine sender ---------------------------------------------------------

    async def send_outbound(self, out: Outbound) -> None:
        """Push one outbound message (bot or agent) to every socket of its conversation."""
        frame = frame_from_outbound(out, datetime.now(UTC))
        for conn in list(self.sockets.get(str(out.key), ())):
            conn.send(frame)

    async def on_committed(self, event: Any) -> None:
        """Engine subscriber: a committed turn stored customer messages; show them.

        The socket that sent one gets its ``ack``, the other tabs of the session
        the message itself. For this channel's turns it runs inside
        ``Engine.handle`` before the replies are delivered; for turns the engine
        put off (busy) and retries by itself, after them.
        """
        if not isinstance(event, TurnOutcome) or event.conversation.key.channel != CHANNEL:
            return
        key = event.conversation.key
        for record in event.records:
            if record.direction != "in" or record.channel_message_id is None:
                continue
            origin = self._awaiting.pop(record.channel_message_id, None)
            session = key.thread
            shown = frame_from_record(record, session)
            if origin is not None and shown is not None and shown.id is not None:
                origin.send(Ack(id=shown.id, seq=record.seq))
            if shown is not None:
                self.broadcast(key, shown, skip=origin)

    async def on_remote(self, event: Any) -> None:
        """Bus subscriber: push what another process stored to our sockets.

        Each socket de-duplicates by ``seq``, so a message that also arrives
        through this process's own sender is shown once.
        """
        if getattr(event, "origin", None) == self._bus_origin or not self.sockets:
            return
        conversation_id = getattr(event, "conversation_id", "")
        seq_before, seq = getattr(event, "seq_before", 0), getattr(event, "seq", 0)
        if not conversation_id or seq <= seq_before:
            return
        conv = await self.store.load_by_id(conversation_id)
        if conv is None or conv.key.channel != CHANNEL or str(conv.key) not in self.sockets:
            return
        records = await self.store.messages(conversation_id, after_seq=seq_before,
                                            limit=seq - seq_before)
        for record in records:
            frame = frame_from_record(record, conv.key.thread)
            if frame is not None and record.seq <= seq:
                self.broadcast(conv.key, frame)

    def broadcast(self, key: ConversationKey, frame: ServerFrame,
                  *, skip: Connection | None = None) -> None:
        for conn in list(self.sockets.get(str(key), ())):
            if conn is not skip:
                conn.send(frame)

    # -- HTTP ------------------------------------------------------------------

    def allowed_origins(self, host: str | None) -> set[str]:
        allowed = {o.rstrip("/").lower() for o in self.settings.allowed_origins}
        if host:
            allowed.update({f"http://{host}".lower(), f"https://{host}".lower()})
        if self.settings.public_url:
            parts = urlsplit(self.settings.public_url)
            allowed.add(f"{parts.scheme}://{parts.netloc}".lower())
        return allowed

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """Browsers always send Origin; clients without one still need a token."""
        if origin is None:
            return True
        return origin.rstrip("/").lower() in self.allowed_origins(host)

    def _cors(self, request: Request) -> dict[str, str]:
        origin = request.headers.get("origin")
        if origin is None:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type",
                "Access-Control-Max-Age": "600"}

    async def session_endpoint(self, request: Request) -> Response:
        """Issue a session token; a previous token (even expired) continues its session."""
        origin = request.headers.get("origin")
        if not self.origin_allowed(origin, request.headers.get("host")):
            return JSONResponse({"error": "origin_not_allowed"}, status_code=403,
                                headers={"Vary": "Origin"})
        cors = self._cors(request)
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=cors)
        client = request.client.host if request.client else "?"
        if not self._session_allowed(client):
            return JSONResponse({"error": "rate_limited"}, status_code=429,
                                headers={"Retry-After": "60", **cors})
        body = await request.body()
        try:
            data: Any = json.loads(body) if body.strip() else {}
        except ValueError:
            data = None
        if len(body) > 8192 or not isinstance(data, dict):
            return JSONResponse({"error": "bad_request",
                                 "message": "send a JSON object (or nothing)"},
                                status_code=400, headers=cors)
        site = data.get("site") or "default"
        if not isinstance(site, str) or not valid_site(site):
            return JSONResponse({"error": "bad_site",
                                 "message": "site: 1-40 of A-Z a-z 0-9 _ . -"},
                                status_code=400, headers=cors)
        previous = data.get("token")
        claims = self.signer.renewable(previous) if isinstance(previous, str) else None
        if claims is not None and claims.site != site:
            claims = None
        if claims is not None:
            token, issued = self.signer.issue(site=site, session=claims.session,
                                              customer=claims.customer)
        else:
            token, issued = self.signer.issue(site=site)
        conv = await self.store.load(ConversationKey(CHANNEL, site, issued.session))
        return JSONResponse({
            "token": token,
            "session": issued.session,
            "site": site,
            "continued": claims is not None,
            "conversation_id": conv.id if conv else None,
            "expires_at": issued.expires_at,
            "expires_in": issued.expires_at - issued.issued_at,
            "ws_path": "/chat/ws",
        }, headers={"Cache-Control": "no-store", **cors})

    def _session_allowed(self, client: str) -> bool:
        loop = asyncio.get_running_loop()
        if len(self._session_limits) > 10_000:
            self._session_limits.clear()
        limiter = self._session_limits.get(client)
        if limiter is None or limiter.limit != self.sessions_per_minute:
            limiter = RateLimiter(self.sessions_per_minute, 60.0)
            self._session_limits[client] = limiter
        return limiter.allow(loop.time())

    async def demo_page(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "demo.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    def static_file(self, name: str, media_type: str) -> Any:
        async def endpoint(request: Request) -> Response:
            return FileResponse(STATIC_DIR / name, media_type=f"{media_type}; charset=utf-8",
                                headers={"Cache-Control": "no-cache",
                                         "Access-Control-Allow-Origin": "*"})
        return endpoint

    # -- the socket --------------------------------------------------------------

    async def socket_endpoint(self, ws: WebSocket) -> None:
        if not self.origin_allowed(ws.headers.get("origin"), ws.headers.get("host")):
            # Closing before the handshake completes answers HTTP 403.
            await ws.close(CloseCode.POLICY_VIOLATION)
            return
        if self.stopping:
            await ws.accept()
            await ws.close(CloseCode.SERVICE_RESTART, "server restart")
            return
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        await ws.accept()
        conn = Connection(ws, self.limits)
        writer = asyncio.create_task(conn.run_writer(), name="web-writer")
        worker: asyncio.Task[None] | None = None
        try:
            if await self._authenticate(conn):
                worker = asyncio.create_task(self._work(conn), name="web-turns")
                await self._read(conn)
        except Exception:
            logger.exception("web chat socket failed")
            conn.release([])
            conn.send(error(ErrorCode.INTERNAL, "internal error; reconnect and resume"))
            conn.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._unregister(conn)
            if worker is not None:
                # Frames not started are not acked; the client sends them again.
                while not conn.inbox.empty():
                    conn.inbox.get_nowait()
                conn.inbox.put_nowait(None)
                await worker
            conn.close(CloseCode.NORMAL)
            try:
                await asyncio.wait_for(writer, 5.0)
            except TimeoutError:
                logger.warning("web chat writer did not finish; dropped")
            if task is not None:
                self._handlers.discard(task)

    async def _receive(self, conn: Connection) -> str | bytes | None:
        message = await conn.ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        text: str | None = message.get("text")
        if text is not None:
            return text
        data: bytes = message.get("bytes") or b""
        return data

    async def _authenticate(self, conn: Connection) -> bool:
        try:
            data = await asyncio.wait_for(self._receive(conn), self.limits.auth_timeout)
        except TimeoutError:
            conn.reject(conn.policy.auth_timed_out())
            return False
        if data is None:
            return False
        verdict = conn.policy.receive(data, asyncio.get_running_loop().time())
        if isinstance(verdict, Reject):
            conn.reject(verdict)
            return False
        assert isinstance(verdict, AuthFrame)
        try:
            claims = self.signer.verify(verdict.token)
        except TokenError as exc:
            conn.reject(conn.policy.auth_failed(ErrorCode(exc.code), exc.reason))
            return False
        conn.policy.authenticated()
        await self._resume(conn, claims, verdict.last_seq)
        return True

    async def _resume(self, conn: Connection, claims: SessionClaims,
                      last_seq: int | None) -> None:
        key = ConversationKey(CHANNEL, claims.site, claims.session)
        conn.claims, conn.key = claims, key
        # Registered first, so nothing pushed while we read the log is lost;
        # held, so nothing overtakes the replay; de-duplicated by seq.
        conn.hold()
        self.sockets.setdefault(str(key), set()).add(conn)
        conv = await self.store.load(key)
        head = conv.seq if conv is not None else 0
        mode = resume_mode(last_seq, head)
        conn.floor = (last_seq or 0) if mode == "replay" else 0
        records = []
        if conv is not None:
            records = await self.store.messages(conv.id, after_seq=conn.floor)
        ready = Ready(conversation_id=conv.id if conv else None, session=claims.session,
                      last_seq=head)
        conn.release([ready, *resume_frames(mode, records, claims.session, head)])

    def _unregister(self, conn: Connection) -> None:
        for stored_id in [i for i, c in self._awaiting.items() if c is conn]:
            del self._awaiting[stored_id]
        if conn.key is None:
            return
        conns = self.sockets.get(str(conn.key))
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.sockets[str(conn.key)]

    async def _read(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await self._receive(conn)
            if data is None:
                return
            verdict = conn.policy.receive(data, loop.time())
            if isinstance(verdict, Reject):
                conn.reject(verdict)
            elif isinstance(verdict, PingFrame):
                conn.send(Pong())
            elif isinstance(verdict, ClientMessage | RatingFrame | QuickReplyFrame):
                try:
                    conn.inbox.put_nowait(verdict)
                except asyncio.QueueFull:
                    conn.send(error(ErrorCode.OVERLOADED, "too many messages waiting; "
                                    "retry shortly", id=verdict.id))

    async def _work(self, conn: Connection) -> None:
        """Run this socket's customer frames as turns, one at a time, in order."""
        while True:
            frame = await conn.inbox.get()
            if frame is None:
                return
            turn = asyncio.create_task(self._turn(conn, frame), name="web-turn")
            self._turns.add(turn)
            turn.add_done_callback(self._turns.discard)
            # Shielded: a closing socket (or a stopping server) lets the turn finish.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(turn)

    async def _turn(self, conn: Connection, frame: TurnFrame) -> None:
        assert conn.key is not None and conn.claims is not None
        key, session = conn.key, conn.claims.session
        inbound = inbound_from_frame(frame, key=key, customer=conn.claims.customer,
                                     session=session, now=datetime.now(UTC))
        stored_id = stored_message_id(session, frame.id)
        self._awaiting[stored_id] = conn
        self.broadcast(key, Typing(on=True))
        try:
            # The ack goes out from on_committed, inside handle; the replies are
            # delivered here, after it, so the customer's message comes first.
            result = await self.engine.handle(inbound, deliver=False)
            if result.duplicate:
                self._awaiting.pop(stored_id, None)
                seq = await self._stored_seq(key, stored_id)
                if seq is not None:
                    conn.send(Ack(id=frame.id, seq=seq))
            elif result.outcome is not None:
                await self.engine.deliver(result.outbound)
            # Otherwise the engine put the turn off (busy) and sent a notice; it
            # runs the turn again later, and on_committed acks it then.
        except Exception:
            self._awaiting.pop(stored_id, None)
            logger.exception("web chat turn failed (conversation %s)", key)
            conn.send(error(ErrorCode.INTERNAL, "something went wrong; please try again",
                            id=frame.id))
        finally:
            self.broadcast(key, Typing(on=False))

    async def _stored_seq(self, key: ConversationKey, stored_id: str) -> int | None:
        conv = await self.store.load(key)
        if conv is None:
            return None
        for record in await self.store.messages(conv.id):
            if record.channel_message_id == stored_id:
                return record.seq
        return None

