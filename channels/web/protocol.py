"""The web chat protocol, sans-I/O: frames, validation, the per-socket policy, converters.

Nothing here reads a socket or awaits anything. The I/O layer
(:mod:`channels.web.plugin`) feeds :class:`SocketPolicy` what arrived and
does what it answers; the converters turn frames into the engine's neutral
:class:`~engine.core.types.Inbound` and stored records or
:class:`~engine.core.types.Outbound` messages into frames. ``docs/web-protocol.md``
is the reference for client authors; this module is its implementation.

Frame flow::

    client                                server
      │── auth {token, last_seq?} ───────▶│  within AUTH_TIMEOUT, else close 1008
      │◀────────── ready {last_seq} ──────│
      │◀── message … (seq > last_seq) ────│  or one resync {messages} (full history)
      │── message {id, text} ────────────▶│
      │◀────────────── typing {on: true} ─│
      │◀────────────────── ack {id, seq} ─│  stored; duplicates are re-acked only
      │◀────── message {seq, author …} ───│  the replies (also agent replies, any time)
      │◀───────────── typing {on: false} ─│
      │── ping ──────────────────────────▶│
      │◀──────────────────────────── pong │
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, IntEnum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from engine.core.types import Inbound, Outbound
from engine.store.base import ConversationKey, MessageRecord

__all__ = [
    "AUTH_TIMEOUT",
    "CLIENT_FRAMES",
    "HEARTBEAT_INTERVAL",
    "MAX_FRAME_BYTES",
    "MAX_REPLAY",
    "MAX_TEXT_CHARS",
    "PROTOCOL_VERSION",
    "RESYNC_LIMIT",
    "RETRYABLE",
    "Ack",
    "AuthFrame",
    "ClientFrame",
    "ClientMessage",
    "CloseCode",
    "ErrorCode",
    "ErrorFrame",
    "FrameError",
    "Limits",
    "MessageFrame",
    "Notice",
    "Phase",
    "PingFrame",
    "Pong",
    "QuickReplyFrame",
    "QuickReplyItem",
    "RateLimiter",
    "RatingFrame",
    "Ready",
    "Reject",
    "Resync",
    "ServerFrame",
    "SocketPolicy",
    "TurnFrame",
    "Typing",
    "customer_visible",
    "encode",
    "error",
    "frame_from_outbound",
    "frame_from_record",
    "inbound_from_frame",
    "parse_client_frame",
    "resume_frames",
    "resume_mode",
    "stored_message_id",
]

PROTOCOL_VERSION = 1
#: Largest accepted frame, in UTF-8 bytes. Larger frames close the socket with 1009.
MAX_FRAME_BYTES = 16 * 1024
#: Longest customer message, in characters. Longer ones get a ``too_long`` error frame.
MAX_TEXT_CHARS = 4000
#: Seconds a new socket has to send its ``auth`` frame.
AUTH_TIMEOUT = 5.0
#: A resume further behind than this many log entries gets a full ``resync`` instead.
MAX_REPLAY = 500
#: At most this many (most recent) messages are sent in a ``resync``.
RESYNC_LIMIT = 500
#: How often the widget sends ``ping`` (seconds); it reconnects when no ``pong`` follows.
HEARTBEAT_INTERVAL = 25.0

_CLIENT_ID = r"^[A-Za-z0-9_-]{1,64}$"
_CLIENT_ID_RE = re.compile(_CLIENT_ID)


class CloseCode(IntEnum):
    """WebSocket close codes the server uses (RFC 6455 §7.4.1, plus 4000-4999 for the app)."""

    NORMAL = 1000
    #: A binary frame: the protocol is JSON text only.
    UNSUPPORTED_DATA = 1003
    #: No ``auth`` frame within AUTH_TIMEOUT, a first frame that is not ``auth``,
    #: a disallowed origin (after the handshake), or flooding.
    POLICY_VIOLATION = 1008
    #: A frame larger than MAX_FRAME_BYTES.
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    #: The server restarts or shuts down; reconnect (with backoff) and resume.
    SERVICE_RESTART = 1012
    #: The socket fell too far behind (its send queue filled up); reconnect and resume.
    TRY_AGAIN_LATER = 1013
    #: The token is invalid or expired: get a new one from ``POST /chat/session``.
    AUTH_FAILED = 4001


class ErrorCode(StrEnum):
    """The ``code`` of ``error`` frames."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    AUTH_REQUIRED = "auth_required"
    AUTH_TIMEOUT = "auth_timeout"
    AUTH_FAILED = "auth_failed"
    TOKEN_EXPIRED = "token_expired"
    ALREADY_AUTHENTICATED = "already_authenticated"
    TOO_LONG = "too_long"
    FRAME_TOO_BIG = "frame_too_big"
    BINARY_UNSUPPORTED = "binary_unsupported"
    RATE_LIMITED = "rate_limited"
    FLOODING = "flooding"
    OVERLOADED = "overloaded"
    INTERNAL = "internal"


#: Error codes a client may retry (the same frame, same id, after a pause).
RETRYABLE = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.OVERLOADED, ErrorCode.INTERNAL})


# --------------------------------------------------------------------------- frames


class _Frame(BaseModel):
    # Unknown fields are ignored so older servers accept newer clients' frames.
    model_config = ConfigDict(extra="ignore", frozen=True)


ClientId = Annotated[StrictStr, Field(pattern=_CLIENT_ID)]


class AuthFrame(_Frame):
    """Must be the first frame. ``last_seq``: the highest ``seq`` the client has (resume)."""

    type: Literal["auth"]
    token: Annotated[StrictStr, Field(min_length=1, max_length=4096)]
    last_seq: Annotated[StrictInt, Field(ge=0)] | None = None


class ClientMessage(_Frame):
    """A customer's text. ``id`` is the client's own id (a UUID), used to drop repeats."""

    type: Literal["message"]
    id: ClientId
    text: StrictStr


class RatingFrame(_Frame):
    """A satisfaction rating, 1 (bad) to 5 (great)."""

    type: Literal["rating"]
    id: ClientId
    value: Annotated[StrictInt, Field(ge=1, le=5)]


class QuickReplyFrame(_Frame):
    """A tapped quick-reply button; ``payload`` as the server sent it (``rating:N`` rates)."""

    type: Literal["quick_reply"]
    id: ClientId
    payload: Annotated[StrictStr, Field(min_length=1, max_length=200)]


class PingFrame(_Frame):
    """Application-level heartbeat (browsers cannot send WebSocket pings)."""

    type: Literal["ping"]


ClientFrame = AuthFrame | ClientMessage | RatingFrame | QuickReplyFrame | PingFrame
TurnFrame = ClientMessage | RatingFrame | QuickReplyFrame

CLIENT_FRAMES: dict[str, type[_Frame]] = {
    "auth": AuthFrame,
    "message": ClientMessage,
    "rating": RatingFrame,
    "quick_reply": QuickReplyFrame,
    "ping": PingFrame,
}


class QuickReplyItem(_Frame):
    label: str
    payload: str


Author = Literal["customer", "bot", "agent", "system"]
MessageKind = Literal["text", "disclosure", "handoff", "agent", "rating", "notice"]


class Ready(_Frame):
    """Authentication succeeded. ``conversation_id`` is None until the first message;
    ``last_seq`` is the newest log entry when the socket was authenticated."""

    type: Literal["ready"] = "ready"
    conversation_id: str | None
    session: str
    last_seq: int
    protocol: int = PROTOCOL_VERSION


class MessageFrame(_Frame):
    """One customer-visible message of the conversation log.

    ``id`` is the client id of a customer's message (None for everything else).
    ``seq`` increases per conversation; gaps are log entries customers never see.
    """

    type: Literal["message"] = "message"
    seq: int
    id: str | None = None
    author: Author
    kind: MessageKind = "text"
    text: str
    quick_replies: list[QuickReplyItem] = Field(default_factory=list)
    ts: str


class Ack(_Frame):
    """The customer's frame ``id`` is stored as log entry ``seq``."""

    type: Literal["ack"] = "ack"
    id: str
    seq: int


class Typing(_Frame):
    type: Literal["typing"] = "typing"
    on: bool


class Pong(_Frame):
    type: Literal["pong"] = "pong"


class Notice(_Frame):
    """A passing notice that is not part of the log (no ``seq``), e.g. "we're busy"."""

    type: Literal["notice"] = "notice"
    text: str
    ts: str


class Resync(_Frame):
    """The whole (recent) history: replace what the client shows."""

    type: Literal["resync"] = "resync"
    messages: list[MessageFrame]
    last_seq: int


class ErrorFrame(_Frame):
    """Something was wrong with a frame. ``id`` names the client frame, if it had one."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    retryable: bool = False
    id: str | None = None


ServerFrame = Ready | MessageFrame | Ack | Typing | Pong | Resync | Notice | ErrorFrame


def encode(frame: ServerFrame) -> str:
    """The JSON text of a server frame."""
    return frame.model_dump_json()


def error(code: ErrorCode, message: str, *, id: str | None = None) -> ErrorFrame:
    return ErrorFrame(code=code, message=message, retryable=code in RETRYABLE, id=id)


class FrameError(Exception):
    """A client frame that cannot be accepted; carries the error frame to send back."""

    def __init__(self, code: ErrorCode, message: str, *, id: str | None = None) -> None:
        self.code = code
        self.message = message
        self.id = id
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"

    def frame(self) -> ErrorFrame:
        return error(self.code, self.message, id=self.id)


def parse_client_frame(data: str, *, max_text_chars: int = MAX_TEXT_CHARS) -> ClientFrame:
    """Parse and validate one client frame.

    Raises:
        FrameError: not JSON, not an object, an unknown ``type``, a field that
            does not fit (``bad_frame``) or a message text over the limit (``too_long``).
    """
    try:
        raw = json.loads(data)
    except ValueError:
        raise FrameError(ErrorCode.BAD_JSON, "the frame is not valid JSON") from None
    if not isinstance(raw, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "a frame must be a JSON object")
    kind = raw.get("type")
    raw_id = raw.get("id")
    frame_id = raw_id if isinstance(raw_id, str) and _CLIENT_ID_RE.match(raw_id) else None
    if not isinstance(kind, str):
        raise FrameError(ErrorCode.BAD_FRAME, "a frame needs a string field 'type'", id=frame_id)
    model = CLIENT_FRAMES.get(kind)
    if model is None:
        known = ", ".join(CLIENT_FRAMES)
        raise FrameError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind[:40]!r} "
                         f"(known: {known})", id=frame_id)
    try:
        frame: ClientFrame = model.model_validate(raw)  # type: ignore[assignment]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or kind
        raise FrameError(ErrorCode.BAD_FRAME, f"{kind} frame: {where}: {first['msg']}",
                         id=frame_id) from None
    if isinstance(frame, ClientMessage):
        if not frame.text.strip():
            raise FrameError(ErrorCode.BAD_FRAME, "message frame: text is empty", id=frame.id)
        if len(frame.text) > max_text_chars:
            raise FrameError(ErrorCode.TOO_LONG, f"the message is longer than {max_text_chars} "
                             "characters; please shorten it", id=frame.id)
    return frame


# --------------------------------------------------------------------------- socket policy


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_text_chars: int = MAX_TEXT_CHARS
    auth_timeout: float = AUTH_TIMEOUT
    #: Customer frames (message, rating, quick_reply) per ``rate_window`` seconds.
    rate_limit: int = 10
    rate_window: float = 5.0
    #: Any frames per ``rate_window``; beyond this the socket is closed (1008).
    flood_limit: int = 60
    #: Frames waiting to be written to one socket; a socket this far behind is
    #: closed with 1013 and resumes from its ``last_seq`` (the log is the truth).
    outbox_size: int = 512


class RateLimiter:
    """At most ``limit`` events per sliding ``window`` seconds; the caller passes the time."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


class Phase(Enum):
    AWAITING_AUTH = "awaiting_auth"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer a frame with ``error`` (if any), then close with ``close`` (if any)."""

    error: ErrorFrame | None
    close: CloseCode | None = None


class SocketPolicy:
    """What one socket may send, when: feed it each received frame and the time.

    :meth:`receive` returns the accepted frame for the I/O layer to act on,
    or a :class:`Reject` saying what to answer and whether to close.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.phase = Phase.AWAITING_AUTH
        self._turns = RateLimiter(self.limits.rate_limit, self.limits.rate_window)
        self._frames = RateLimiter(self.limits.flood_limit, self.limits.rate_window)

    def receive(self, data: str | bytes, now: float) -> ClientFrame | Reject:
        limits = self.limits
        if self.phase is Phase.CLOSED:
            return Reject(None)
        if isinstance(data, bytes | bytearray):
            return self._close(ErrorCode.BINARY_UNSUPPORTED,
                               "binary frames are not supported; send JSON text",
                               CloseCode.UNSUPPORTED_DATA)
        # Cheap check first: a str of n characters has at least n UTF-8 bytes.
        if len(data) > limits.max_frame_bytes or len(data.encode()) > limits.max_frame_bytes:
            return self._close(ErrorCode.FRAME_TOO_BIG,
                               f"frames are limited to {limits.max_frame_bytes} bytes",
                               CloseCode.MESSAGE_TOO_BIG)
        if not self._frames.allow(now):
            return self._close(ErrorCode.FLOODING, "too many frames", CloseCode.POLICY_VIOLATION)
        try:
            frame = parse_client_frame(data, max_text_chars=limits.max_text_chars)
        except FrameError as exc:
            if self.phase is Phase.AWAITING_AUTH:
                return self._close(ErrorCode.AUTH_REQUIRED,
                                   f"the first frame must be auth ({exc.message})",
                                   CloseCode.POLICY_VIOLATION)
            return Reject(exc.frame())
        if self.phase is Phase.AWAITING_AUTH:
            if not isinstance(frame, AuthFrame):
                return self._close(ErrorCode.AUTH_REQUIRED, "the first frame must be auth",
                                   CloseCode.POLICY_VIOLATION)
            return frame
        if isinstance(frame, AuthFrame):
            return Reject(error(ErrorCode.ALREADY_AUTHENTICATED, "this socket is authenticated"))
        if not isinstance(frame, PingFrame) and not self._turns.allow(now):
            return Reject(error(ErrorCode.RATE_LIMITED,
                                f"at most {limits.rate_limit} messages per "
                                f"{limits.rate_window:g} s; retry shortly", id=frame.id))
        return frame

    def auth_timed_out(self) -> Reject:
        return self._close(ErrorCode.AUTH_TIMEOUT,
                           f"no auth frame within {self.limits.auth_timeout:g} s",
                           CloseCode.POLICY_VIOLATION)

    def auth_failed(self, code: ErrorCode, message: str) -> Reject:
        return self._close(code, message, CloseCode.AUTH_FAILED)

    def authenticated(self) -> None:
        self.phase = Phase.OPEN

    def closed(self) -> None:
        self.phase = Phase.CLOSED

    def _close(self, code: ErrorCode, message: str, close: CloseCode) -> Reject:
        self.phase = Phase.CLOSED
        return Reject(error(code, message), close)


# --------------------------------------------------------------------------- converters


def stored_message_id(session: str, client_id: str) -> str:
    """The ``channel_message_id`` stored for a client id: namespaced by the session,
    so one browser's ids can never collide with (or probe) another's."""
    return f"{session}:{client_id}"


def _client_id(session: str, channel_message_id: str | None) -> str | None:
    prefix = f"{session}:"
    if channel_message_id and channel_message_id.startswith(prefix):
        return channel_message_id[len(prefix):]
    return None


def inbound_from_frame(frame: TurnFrame, *, key: ConversationKey, customer: str, session: str,
                       now: datetime) -> Inbound:
    """The engine's envelope for a customer frame (identity from the session, never the frame)."""
    common: dict[str, Any] = {"key": key, "customer": customer, "received_at": now,
                              "channel_message_id": stored_message_id(session, frame.id)}
    if isinstance(frame, RatingFrame):
        return Inbound(text=str(frame.value), kind="rating", rating=frame.value, **common)
    if isinstance(frame, QuickReplyFrame):
        if frame.payload.startswith("rating:"):
            value = frame.payload.removeprefix("rating:")
            if value.isdigit() and 1 <= int(value) <= 5:
                return Inbound(text=value, kind="rating", rating=int(value), **common)
        return Inbound(text=frame.payload, kind="quick_reply",
                       data={"payload": frame.payload}, **common)
    return Inbound(text=frame.text, **common)


def _iso(ts: datetime) -> str:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _author(author: str) -> Author:
    if author.startswith("agent"):
        return "agent"
    if author in ("customer", "system"):
        return author  # type: ignore[return-value]
    return "bot"


def _kind(kind: str) -> MessageKind:
    allowed = ("text", "disclosure", "handoff", "agent", "rating", "notice")
    return kind if kind in allowed else "text"  # type: ignore[return-value]


def _quick_item(payload: str, label: str | None = None) -> QuickReplyItem:
    if label is None:
        label = payload.removeprefix("rating:") if payload.startswith("rating:") else payload
    return QuickReplyItem(label=label, payload=payload)


def frame_from_outbound(out: Outbound, now: datetime) -> MessageFrame | Notice:
    """A live message for the customer (bot reply, agent reply, notice).

    An outbound without a ``seq`` (0) is not in the log, e.g. the engine's
    "we're busy, your message is queued" notice: it becomes a :class:`Notice`.
    """
    if out.seq <= 0:
        return Notice(text=out.text, ts=_iso(now))
    return MessageFrame(seq=out.seq, author=_author(out.author), kind=_kind(out.kind),
                        text=out.text, ts=_iso(now),
                        quick_replies=[_quick_item(q.payload, q.label) for q in out.quick_replies])


def customer_visible(record: MessageRecord) -> bool:
    """Events and agents' internal notes are never sent to the customer."""
    return record.direction in ("in", "out") and record.kind not in ("event", "note")


def frame_from_record(record: MessageRecord, session: str) -> MessageFrame | None:
    """A stored log entry as the customer sees it, or None if customers never see it."""
    if not customer_visible(record):
        return None
    ts = _iso(record.created_at)
    if record.direction == "in":
        return MessageFrame(seq=record.seq, id=_client_id(session, record.channel_message_id),
                            author="customer",
                            kind="rating" if record.kind == "rating" else "text",
                            text=record.text, ts=ts)
    kind = str(record.data.get("kind", "agent" if record.author.startswith("agent") else "text"))
    quick = record.data.get("quick") or []
    return MessageFrame(seq=record.seq, author=_author(record.author), kind=_kind(kind),
                        text=record.text, ts=ts,
                        quick_replies=[_quick_item(str(p)) for p in quick])


def resume_mode(last_seq: int | None, head_seq: int) -> Literal["replay", "resync"]:
    """Replay what the client missed, or send everything when its offset is unusable.

    No offset (or 0), an offset beyond the log's head (another conversation, a
    reset database) or one too far behind all get a full ``resync``.
    """
    if not last_seq or last_seq > head_seq or head_seq - last_seq > MAX_REPLAY:
        return "resync"
    return "replay"


def resume_frames(mode: Literal["replay", "resync"], records: Iterable[MessageRecord],
                  session: str, head_seq: int) -> list[MessageFrame | Resync]:
    """The frames a resuming socket gets after ``ready``, oldest first."""
    frames = [f for f in (frame_from_record(r, session) for r in records) if f is not None]
    if mode == "resync":
        return [Resync(messages=frames[-RESYNC_LIMIT:], last_seq=head_seq)]
    return list(frames)

