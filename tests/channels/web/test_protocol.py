"""The sans-I/O protocol and session tokens, driven with plain values (no sockets)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from channels.web.protocol import (
    MAX_REPLAY,
    Ack,
    AuthFrame,
    ClientMessage,
    CloseCode,
    ErrorCode,
    FrameError,
    Limits,
    MessageFrame,
    Phase,
    PingFrame,
    QuickReplyFrame,
    RateLimiter,
    RatingFrame,
    Ready,
    Reject,
    Resync,
    SocketPolicy,
    encode,
    frame_from_outbound,
    frame_from_record,
    inbound_from_frame,
    parse_client_frame,
    resume_frames,
    resume_mode,
    stored_message_id,
)
from channels.web.session import SessionSigner, TokenError, demo_customer, new_session_id
from engine.core.types import Outbound, QuickReply
from engine.store.base import ConversationKey, MessageRecord

NOW = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
KEY = ConversationKey("web", "default", "S" * 22)
SESSION = "S" * 22


def frame(**fields: Any) -> str:
    return json.dumps(fields)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("raw", "expected"), [
    (frame(type="auth", token="t"), AuthFrame(type="auth", token="t")),
    (frame(type="auth", token="t", last_seq=7), AuthFrame(type="auth", token="t", last_seq=7)),
    (frame(type="message", id="a-1", text="hi"), ClientMessage(type="message", id="a-1",
                                                               text="hi")),
    (frame(type="rating", id="r", value=4), RatingFrame(type="rating", id="r", value=4)),
    (frame(type="quick_reply", id="q", payload="rating:2"),
     QuickReplyFrame(type="quick_reply", id="q", payload="rating:2")),
    (frame(type="ping"), PingFrame(type="ping")),
    (frame(type="ping", future_field=1), PingFrame(type="ping")),  # forward compatible
])
def test_valid_frames_parse(raw: str, expected: Any) -> None:
    assert parse_client_frame(raw) == expected


@pytest.mark.parametrize(("raw", "code", "frame_id"), [
    ("{", ErrorCode.BAD_JSON, None),
    ("", ErrorCode.BAD_JSON, None),
    ("null", ErrorCode.BAD_FRAME, None),
    ('"auth"', ErrorCode.BAD_FRAME, None),
    (frame(id="x"), ErrorCode.BAD_FRAME, "x"),
    (frame(type=3), ErrorCode.BAD_FRAME, None),
    (frame(type="hello", id="h1"), ErrorCode.UNKNOWN_TYPE, "h1"),
    (frame(type="message", id="m1"), ErrorCode.BAD_FRAME, "m1"),
    (frame(type="message", id="m1", text=5), ErrorCode.BAD_FRAME, "m1"),
    (frame(type="message", id="has space", text="x"), ErrorCode.BAD_FRAME, None),
    (frame(type="message", id="x" * 65, text="x"), ErrorCode.BAD_FRAME, None),
    (frame(type="message", id="m1", text=" \n "), ErrorCode.BAD_FRAME, "m1"),
    (frame(type="message", id="m1", text="z" * 4001), ErrorCode.TOO_LONG, "m1"),
    (frame(type="rating", id="r1", value=0), ErrorCode.BAD_FRAME, "r1"),
    (frame(type="rating", id="r1", value="5"), ErrorCode.BAD_FRAME, "r1"),  # strict
    (frame(type="rating", id="r1", value=True), ErrorCode.BAD_FRAME, "r1"),
    (frame(type="auth", token=""), ErrorCode.BAD_FRAME, None),
    (frame(type="auth", token="t", last_seq=-1), ErrorCode.BAD_FRAME, None),
    (frame(type="quick_reply", id="q", payload=""), ErrorCode.BAD_FRAME, "q"),
])
def test_invalid_frames_raise_typed_errors(raw: str, code: ErrorCode,
                                           frame_id: str | None) -> None:
    with pytest.raises(FrameError) as caught:
        parse_client_frame(raw)
    assert caught.value.code is code
    assert caught.value.id == frame_id
    error = caught.value.frame()
    assert error.code is code and error.retryable is False
    assert json.loads(encode(error))["type"] == "error"


def test_a_message_of_exactly_the_limit_is_accepted() -> None:
    parsed = parse_client_frame(frame(type="message", id="m", text="é" * 4000))
    assert isinstance(parsed, ClientMessage)
    with pytest.raises(FrameError):
        parse_client_frame(frame(type="message", id="m", text="abc"), max_text_chars=2)


def test_server_frames_serialise_with_their_type() -> None:
    assert json.loads(encode(Ack(id="m1", seq=3))) == {"type": "ack", "id": "m1", "seq": 3}
    ready = json.loads(encode(Ready(conversation_id=None, session="s", last_seq=0)))
    assert ready == {"type": "ready", "conversation_id": None, "session": "s", "last_seq": 0,
                     "protocol": 1}


# --------------------------------------------------------------------------- socket policy


def test_first_frame_must_be_auth() -> None:
    policy = SocketPolicy()
    verdict = policy.receive(frame(type="message", id="m", text="hi"), 0.0)
    assert isinstance(verdict, Reject)
    assert verdict.close is CloseCode.POLICY_VIOLATION
    assert verdict.error is not None and verdict.error.code is ErrorCode.AUTH_REQUIRED
    assert policy.phase is Phase.CLOSED
    assert policy.receive(frame(type="ping"), 0.1) == Reject(None)  # closed: ignored


def test_auth_then_frames_flow() -> None:
    policy = SocketPolicy()
    assert isinstance(policy.receive(frame(type="auth", token="t"), 0.0), AuthFrame)
    policy.authenticated()
    assert isinstance(policy.receive(frame(type="ping"), 0.0), PingFrame)
    again = policy.receive(frame(type="auth", token="t"), 0.0)
    assert isinstance(again, Reject) and again.close is None
    assert again.error is not None and again.error.code is ErrorCode.ALREADY_AUTHENTICATED
    bad = policy.receive("{", 0.0)
    assert isinstance(bad, Reject) and bad.close is None  # the socket stays open


@pytest.mark.parametrize(("data", "close", "code"), [
    (b"\x00\x01", CloseCode.UNSUPPORTED_DATA, ErrorCode.BINARY_UNSUPPORTED),
    ("x" * (16 * 1024 + 1), CloseCode.MESSAGE_TOO_BIG, ErrorCode.FRAME_TOO_BIG),
    # Under the limit in characters, over it in UTF-8 bytes.
    ("界" * 6000, CloseCode.MESSAGE_TOO_BIG, ErrorCode.FRAME_TOO_BIG),
])
def test_binary_and_oversize_frames_close(data: str | bytes, close: CloseCode,
                                          code: ErrorCode) -> None:
    for phase_open in (False, True):
        policy = SocketPolicy()
        if phase_open:
            policy.authenticated()
        verdict = policy.receive(data, 0.0)
        assert isinstance(verdict, Reject) and verdict.close is close
        assert verdict.error is not None and verdict.error.code is code


def test_auth_timeout_and_failure_verdicts() -> None:
    timed_out = SocketPolicy().auth_timed_out()
    assert timed_out.close is CloseCode.POLICY_VIOLATION
    assert timed_out.error is not None and timed_out.error.code is ErrorCode.AUTH_TIMEOUT
    failed = SocketPolicy().auth_failed(ErrorCode.TOKEN_EXPIRED, "expired")
    assert failed.close == 4001 and failed.error is not None
    assert failed.error.code is ErrorCode.TOKEN_EXPIRED


def test_customer_frames_are_rate_limited_pings_are_not() -> None:
    policy = SocketPolicy(Limits(rate_limit=2, rate_window=5.0))
    policy.authenticated()
    msg = frame(type="message", id="m", text="hi")
    assert isinstance(policy.receive(msg, 0.0), ClientMessage)
    assert isinstance(policy.receive(msg, 1.0), ClientMessage)
    limited = policy.receive(msg, 2.0)
    assert isinstance(limited, Reject) and limited.close is None
    assert limited.error is not None and limited.error.code is ErrorCode.RATE_LIMITED
    assert limited.error.retryable is True and limited.error.id == "m"
    assert isinstance(policy.receive(frame(type="ping"), 2.0), PingFrame)
    assert isinstance(policy.receive(msg, 5.0), ClientMessage)  # the window slid


def test_flooding_closes_the_socket() -> None:
    policy = SocketPolicy(Limits(flood_limit=5))
    policy.authenticated()
    verdicts = [policy.receive(frame(type="ping"), 0.0) for _ in range(6)]
    assert all(isinstance(v, PingFrame) for v in verdicts[:5])
    last = verdicts[5]
    assert isinstance(last, Reject) and last.close is CloseCode.POLICY_VIOLATION


def test_rate_limiter_window() -> None:
    limiter = RateLimiter(2, 1.0)
    assert [limiter.allow(t) for t in (0.0, 0.1, 0.2, 1.0, 1.05, 1.1)] == [
        True, True, False, True, False, True]


# --------------------------------------------------------------------------- converters


def test_message_frame_becomes_a_text_inbound_with_a_namespaced_id() -> None:
    inbound = inbound_from_frame(ClientMessage(type="message", id="c1", text="hello"),
                                 key=KEY, customer="demo:web:x", session=SESSION, now=NOW)
    assert (inbound.kind, inbound.text, inbound.rating) == ("text", "hello", None)
    assert inbound.customer == "demo:web:x" and inbound.key == KEY
    assert inbound.channel_message_id == f"{SESSION}:c1" == stored_message_id(SESSION, "c1")


@pytest.mark.parametrize(("client_frame", "kind", "rating", "text"), [
    (RatingFrame(type="rating", id="r", value=2), "rating", 2, "2"),
    (QuickReplyFrame(type="quick_reply", id="q", payload="rating:5"), "rating", 5, "5"),
    (QuickReplyFrame(type="quick_reply", id="q", payload="rating:9"), "quick_reply", None,
     "rating:9"),
    (QuickReplyFrame(type="quick_reply", id="q", payload="Yes, refund"), "quick_reply", None,
     "Yes, refund"),
])
def test_ratings_and_quick_replies(client_frame: Any, kind: str, rating: int | None,
                                   text: str) -> None:
    inbound = inbound_from_frame(client_frame, key=KEY, customer="c", session=SESSION, now=NOW)
    assert (inbound.kind, inbound.rating, inbound.text) == (kind, rating, text)


def record(seq: int, direction: str, kind: str = "text", author: str = "bot",
           text: str = "t", **data: Any) -> MessageRecord:
    return MessageRecord(conversation_id="c", seq=seq, direction=direction,  # type: ignore[arg-type]
                         kind=kind, author=author, text=text, created_at=NOW, data=data,
                         channel="web",
                         channel_message_id=f"{SESSION}:id{seq}" if direction == "in" else None)


def test_records_customers_never_see_are_skipped() -> None:
    assert frame_from_record(record(1, "event", "event", "system"), SESSION) is None
    assert frame_from_record(record(2, "event", "note", "agent:alice"), SESSION) is None
    assert frame_from_record(record(3, "out", "note", "agent:alice"), SESSION) is None


def test_records_become_message_frames() -> None:
    customer = frame_from_record(record(1, "in", author="customer", text="hi"), SESSION)
    assert customer is not None
    assert (customer.author, customer.id, customer.kind, customer.text) == (
        "customer", "id1", "text", "hi")
    assert customer.ts == "2026-11-20T09:30:00.000Z"
    rating = frame_from_record(record(2, "in", "rating", "customer", "4", rating=4), SESSION)
    assert rating is not None and rating.kind == "rating"
    disclosure = frame_from_record(record(3, "out", kind="text", text="AI here"), SESSION)
    assert disclosure is not None and (disclosure.author, disclosure.kind) == ("bot", "text")


def test_stored_bot_and_agent_records() -> None:
    bot = MessageRecord(conversation_id="c", seq=5, direction="out", kind="text", author="bot",
                        text="Rate us", created_at=NOW,
                        data={"kind": "rating", "quick": ["rating:1", "rating:5"]})
    shown = frame_from_record(bot, SESSION)
    assert shown is not None and shown.kind == "rating" and shown.author == "bot"
    assert [(q.label, q.payload) for q in shown.quick_replies] == [("1", "rating:1"),
                                                                   ("5", "rating:5")]
    agent = MessageRecord(conversation_id="c", seq=6, direction="out", kind="text",
                          author="agent:alice", text="Hello", created_at=NOW,
                          data={"kind": "agent"})
    shown = frame_from_record(agent, SESSION)
    assert shown is not None and (shown.author, shown.kind, shown.id) == ("agent", "agent", None)
    other = MessageRecord(conversation_id="c", seq=7, direction="in", kind="text",
                          author="customer", text="x", created_at=NOW,
                          channel_message_id="OTHER:abc")
    shown = frame_from_record(other, SESSION)
    assert shown is not None and shown.id is None  # never leaks another namespace


def test_outbound_becomes_a_live_message() -> None:
    out = Outbound(conversation_id="c", key=KEY, seq=9, text="Pick one", kind="text",
                   quick_replies=(QuickReply("Yes, refund", "Yes, refund"),),
                   author="agent:bob")
    shown = frame_from_outbound(out, NOW)
    assert isinstance(shown, MessageFrame)
    assert (shown.seq, shown.author, shown.kind) == (9, "agent", "text")
    assert shown.quick_replies[0].label == "Yes, refund"
    weird = frame_from_outbound(Outbound(conversation_id="c", key=KEY, seq=1, text="x",
                                         kind="mystery"), NOW)
    assert weird.kind == "text" and weird.author == "bot"


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize(("last_seq", "head", "mode"), [
    (None, 0, "resync"),
    (0, 10, "resync"),
    (5, 10, "replay"),
    (10, 10, "replay"),
    (11, 10, "resync"),  # unknown offset: another conversation or a reset store
    (1, 1 + MAX_REPLAY, "replay"),
    (1, 2 + MAX_REPLAY, "resync"),  # too far behind
])
def test_resume_mode(last_seq: int | None, head: int, mode: str) -> None:
    assert resume_mode(last_seq, head) == mode


def test_resume_frames() -> None:
    records = [record(1, "in", author="customer"), record(2, "event", "event", "system"),
               record(3, "out", text="reply"), record(4, "event", "note", "agent:a")]
    replay = resume_frames("replay", records, SESSION, 4)
    assert [f.seq for f in replay if isinstance(f, MessageFrame)] == [1, 3]
    (resync,) = resume_frames("resync", records, SESSION, 4)
    assert isinstance(resync, Resync) and resync.last_seq == 4
    assert [m.seq for m in resync.messages] == [1, 3]


# --------------------------------------------------------------------------- sessions


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_tokens_bind_session_site_and_customer() -> None:
    clock = Clock()
    signer = SessionSigner("secret", ttl=60, clock=clock)
    token, claims = signer.issue(site="shop-1")
    assert claims.customer == demo_customer(claims.session) == f"demo:web:{claims.session}"
    assert signer.verify(token) == claims
    custom, _ = signer.issue(session=claims.session, customer="shop:customer:42")
    assert signer.verify(custom).customer == "shop:customer:42"


def test_expired_tampered_and_foreign_tokens_fail() -> None:
    clock = Clock()
    signer = SessionSigner("secret", ttl=60, renew_within=3600, clock=clock)
    token, claims = signer.issue()
    clock.now += 61
    with pytest.raises(TokenError) as expired:
        signer.verify(token)
    assert expired.value.code == "token_expired"
    assert signer.renewable(token) == claims  # a returning browser keeps its session
    clock.now += 3600
    assert signer.renewable(token) is None
    for bad in (token[:-3] + "abc", "garbage", "",
                SessionSigner("other", clock=clock).issue()[0]):
        with pytest.raises(TokenError) as failed:
            signer.verify(bad)
        assert failed.value.code == "auth_failed"
        assert signer.renewable(bad) is None


def test_without_a_secret_each_signer_has_its_own() -> None:
    one, two = SessionSigner(None), SessionSigner(None)
    token, _ = one.issue()
    with pytest.raises(TokenError):
        two.verify(token)


def test_session_ids_and_sites_are_validated() -> None:
    signer = SessionSigner("s")
    assert len(new_session_id()) >= 16
    with pytest.raises(ValueError):
        signer.issue(site="no/slashes")
    with pytest.raises(ValueError):
        signer.issue(session="short")


def test_uuid_client_ids_are_accepted() -> None:
    parsed = parse_client_frame(frame(type="message", id=str(uuid.uuid4()), text="hi"))
    assert isinstance(parsed, ClientMessage)
