"""The web chat over a real socket: uvicorn (websockets-sansio) on 127.0.0.1, offline model.

Most tests share one server (module scope; every test opens its own session);
the restart and origin tests start their own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from websockets.exceptions import InvalidStatus

from channels.web.protocol import Limits
from channels.web.session import SessionSigner
from tests.channels.web.chatclient import ChatClient, Frame, messages, new_session
from tests.channels.web.conftest import (
    TEST_SECRET,
    LiveServer,
    LiveServerFactory,
    live_settings,
    start_live_server,
)

shared = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveServer]:
    live = await start_live_server(live_settings(tmp_path_factory.mktemp("web")))
    try:
        yield live
    finally:
        await live.stop()


@pytest.fixture
def limits(server: LiveServer) -> Iterator[Any]:
    """Set the channel's limits for sockets opened in this test (restored afterwards)."""
    channel = server.channel
    before = channel.limits

    def use(**changes: Any) -> None:
        values = {f: getattr(before, f) for f in before.__dataclass_fields__}
        channel.limits = Limits(**{**values, **changes})

    yield use
    channel.limits = before


async def chat(live: LiveServer, **session: Any) -> tuple[ChatClient, Frame, list[Frame]]:
    info = await new_session(live.url, **session)
    client, frames = await ChatClient.start(live.ws_url, info["token"])
    return client, info, frames


# --------------------------------------------------------------------------- the journey


@shared
async def test_refund_journey_over_the_socket(server: LiveServer) -> None:
    client, info, frames = await chat(server)
    async with client:
        ready = frames[0]
        assert ready["session"] == info["session"] and ready["last_seq"] == 0
        assert ready["conversation_id"] is None
        assert frames[1:] == [{"type": "resync", "messages": [], "last_seq": 0}]

        first = await client.say("I want a refund", id="m-1")
        assert first[0] == {"type": "typing", "on": True}
        ack = first[1]
        assert ack["type"] == "ack" and ack["id"] == "m-1"
        replies = messages(first)
        assert replies[0]["kind"] == "disclosure" and replies[0]["author"] == "bot"
        assert "AI" in replies[0]["text"]
        assert all(r["seq"] > ack["seq"] for r in replies)
        assert "order number" in replies[1]["text"]

        await client.say("HL26110842")
        confirm = messages(await client.say("it arrived damaged"))[-1]
        assert "129.00" in confirm["text"]
        payloads = [q["payload"] for q in confirm["quick_replies"]]
        assert payloads and payloads[0].startswith("Yes")

        await client.send({"type": "quick_reply", "id": "qr-1", "payload": payloads[0]})
        done = messages(await client.turn())
        assert "approved" in done[0]["text"]
        rating = done[-1]
        assert rating["kind"] == "rating"
        assert [q["payload"] for q in rating["quick_replies"]] == [
            f"rating:{n}" for n in range(1, 6)]
        assert [q["label"] for q in rating["quick_replies"]] == ["1", "2", "3", "4", "5"]

        await client.send({"type": "rating", "id": "rate-1", "value": 5})
        thanks = await client.turn()
        assert [f["id"] for f in thanks if f["type"] == "ack"] == ["rate-1"]
        assert "Thank you" in messages(thanks)[0]["text"]

    conv = await server.context.app.store.load(_key(info))
    assert conv is not None and conv.counters.get("last_rating") == 5


@shared
async def test_session_endpoint_continues_only_with_a_previous_token(server: LiveServer) -> None:
    info = await new_session(server.url)
    assert info["continued"] is False and info["expires_in"] > 0
    again = await new_session(server.url, token=info["token"])
    assert again["session"] == info["session"] and again["continued"] is True
    # A bare session id proves nothing: it gets a fresh session.
    guessed = await new_session(server.url, session=info["session"])
    assert guessed["session"] != info["session"]
    forged = await new_session(server.url, token=info["token"][:-2] + "xx")
    assert forged["session"] != info["session"] and forged["continued"] is False
    async with httpx.AsyncClient(base_url=server.url) as http:
        bad = await http.post("/chat/session", content=b"[1, 2]")
        assert bad.status_code == 400
        bad_site = await http.post("/chat/session", json={"site": "../etc"})
        assert bad_site.status_code == 400
        page = await http.get("/chat/")
        assert page.status_code == 200 and "widget.js" in page.text
        script = await http.get("/chat/widget.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        css = await http.get("/chat/widget.css")
        assert css.status_code == 200 and "text/css" in css.headers["content-type"]


@shared
async def test_session_tokens_are_rate_limited_per_client(server: LiveServer) -> None:
    channel = server.channel
    before = channel.sessions_per_minute
    channel.sessions_per_minute = 2
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            codes = [(await http.post("/chat/session", json={})).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
    finally:
        channel.sessions_per_minute = before


# --------------------------------------------------------------------------- auth


@shared
async def test_no_auth_frame_in_time_closes_1008(server: LiveServer, limits: Any) -> None:
    limits(auth_timeout=0.3)
    client = await ChatClient.open(server.ws_url)
    code, frames = await client.closed()
    assert code == 1008
    assert [f["code"] for f in frames] == ["auth_timeout"]


@shared
@pytest.mark.parametrize(("first", "code", "error"), [
    pytest.param({"type": "auth", "token": "not-a-token"}, 4001, "auth_failed", id="bad-token"),
    pytest.param("expired", 4001, "token_expired", id="expired-token"),
    pytest.param({"type": "message", "id": "m1", "text": "hi"}, 1008, "auth_required",
                 id="message-first"),
    pytest.param({"type": "ping"}, 1008, "auth_required", id="ping-first"),
    pytest.param("{not json", 1008, "auth_required", id="malformed-first"),
])
async def test_auth_failures_close_with_an_error_frame(server: LiveServer, first: Any, code: int,
                                                       error: str) -> None:
    client = await ChatClient.open(server.ws_url)
    if first == "expired":
        past = SessionSigner(TEST_SECRET, clock=lambda: time.time() - 7200)
        token, _ = past.issue()
        await client.send({"type": "auth", "token": token})
    elif isinstance(first, str):
        await client.ws.send(first)
    else:
        await client.send(first)
    closed, frames = await client.closed()
    assert closed == code
    assert [(f["type"], f["code"]) for f in frames] == [("error", error)]
    assert frames[0]["retryable"] is False


async def test_origins_are_checked(live_server_factory: LiveServerFactory) -> None:
    live = await live_server_factory(allowed_origins=["https://shop.example"])
    info = await new_session(live.url)
    for origin in ("https://shop.example", live.url, None):
        client, _ = await ChatClient.start(live.ws_url, info["token"], origin=origin)
        await client.ws.close()
    with pytest.raises(InvalidStatus) as refused:
        await ChatClient.open(live.ws_url, origin="https://evil.example")
    assert refused.value.response.status_code == 403

    async with httpx.AsyncClient(base_url=live.url) as http:
        preflight = await http.options("/chat/session", headers={
            "Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://shop.example"
        issued = await http.post("/chat/session", json={},
                                 headers={"Origin": "https://shop.example"})
        assert issued.status_code == 200
        assert issued.headers["access-control-allow-origin"] == "https://shop.example"
        evil = await http.post("/chat/session", json={}, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403


# --------------------------------------------------------------------------- bad frames


@shared
async def test_oversize_frame_closes_1009(server: LiveServer) -> None:
    client, _, _ = await chat(server)
    await client.send({"type": "message", "id": "big", "text": "x" * (17 * 1024)})
    code, frames = await client.closed()
    assert code == 1009
    assert [f["code"] for f in frames if f["type"] == "error"] == ["frame_too_big"]


@shared
async def test_binary_frame_closes_1003(server: LiveServer) -> None:
    client, _, _ = await chat(server)
    await client.ws.send(b"\x00\x01binary")
    code, frames = await client.closed()
    assert code == 1003
    assert [f["code"] for f in frames if f["type"] == "error"] == ["binary_unsupported"]


@shared
async def test_malformed_frames_get_errors_and_the_socket_stays_open(server: LiveServer) -> None:
    client, _, _ = await chat(server)
    async with client:
        cases: list[tuple[str, str]] = [
            ("{nope", "bad_json"),
            ("[1, 2, 3]", "bad_frame"),
            (json.dumps({"type": "teleport", "id": "t1"}), "unknown_type"),
            (json.dumps({"type": "message", "id": "no spaces allowed", "text": "hi"}),
             "bad_frame"),
            (json.dumps({"type": "rating", "id": "r1", "value": 9}), "bad_frame"),
            (json.dumps({"type": "message", "id": "long", "text": "y" * 4001}), "too_long"),
            (json.dumps({"type": "message", "id": "blank", "text": "   "}), "bad_frame"),
            (json.dumps({"type": "auth", "token": "again"}), "already_authenticated"),
        ]
        for raw, code in cases:
            await client.ws.send(raw)
            frame = await client.recv()
            assert frame["type"] == "error" and frame["code"] == code, (raw, frame)
            assert frame["retryable"] is False
        too_long = json.dumps({"type": "message", "id": "long", "text": "y" * 4001})
        await client.ws.send(too_long)
        assert (await client.recv())["id"] == "long"
        assert await client.until_pong() == []  # still open, nothing else was sent


@shared
async def test_rate_limit_is_retryable(server: LiveServer, limits: Any) -> None:
    limits(rate_limit=2)
    client, _, _ = await chat(server)
    async with client:
        for n in range(3):
            await client.send({"type": "message", "id": f"r{n}", "text": "hello"})
        frames: list[Frame] = []
        while len([f for f in frames if f["type"] in ("ack", "error")]) < 3:
            frames.append(await client.recv())
        errors = [f for f in frames if f["type"] == "error"]
        assert [(e["code"], e["id"], e["retryable"]) for e in errors] == [
            ("rate_limited", "r2", True)]
        acks = {f["id"] for f in frames if f["type"] == "ack"}
        assert acks == {"r0", "r1"}


# --------------------------------------------------------------------------- delivery


@shared
async def test_heartbeat(server: LiveServer) -> None:
    client, _, _ = await chat(server)
    async with client:
        for _ in range(3):
            await client.send({"type": "ping"})
            assert await client.recv() == {"type": "pong"}


@shared
async def test_duplicate_client_ids_are_answered_once(server: LiveServer) -> None:
    client, _, _ = await chat(server)
    async with client:
        first = await client.say("I want a refund", id="dup-1")
        ack = next(f for f in first if f["type"] == "ack")
        assert messages(first)
        again = await client.say("I want a refund", id="dup-1")
        assert [f for f in again if f["type"] == "ack"] == [ack]
        assert messages(again) == []
        assert messages(await client.until_pong()) == []


@shared
async def test_a_busy_model_sends_a_notice_and_the_reply_follows(
        server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.llm.errors import ModelBusyError

    engine = server.context.engine
    route = engine.model.route
    calls = 0

    async def busy_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ModelBusyError(engine.model.name, "test: all slots taken")
        return await route(*args, **kwargs)

    monkeypatch.setattr(engine.model, "route", busy_once)
    monkeypatch.setattr(engine, "busy_retry_delay", 0.05)
    client, _, _ = await chat(server)
    async with client:
        first = await client.say("I want a refund", id="busy-1")
        assert [f["type"] for f in first] == ["typing", "notice", "typing"]
        assert "busy" in first[1]["text"]
        # The engine runs the turn again by itself: the ack and the replies follow.
        later: list[Frame] = []
        while not (any(f["type"] == "ack" for f in later) and len(messages(later)) >= 2):
            later.append(await client.recv())
        assert [f["id"] for f in later if f["type"] == "ack"] == ["busy-1"]
        assert messages(later)[0]["kind"] == "disclosure"


@shared
async def test_drop_and_resume_from_last_seq(server: LiveServer) -> None:
    a, info, _ = await chat(server)
    await a.say("I want a refund")
    seen_by_a = a.last_seq
    await a.ws.close()  # the browser drops off mid-conversation

    b, _ = await ChatClient.start(server.ws_url, info["token"], last_seq=seen_by_a)
    async with b:
        missed = await b.say("HL26110842", id="while-away")
        missed += await b.say("it arrived damaged")
        expected = sorted([f["seq"] for f in missed if f["type"] in ("message", "ack")])

    resumed, frames = await ChatClient.start(server.ws_url, info["token"], last_seq=seen_by_a)
    async with resumed:
        replay = frames[1:]
        assert all(f["type"] == "message" for f in replay)
        assert [f["seq"] for f in replay] == expected  # exactly the missed ones, in order
        assert replay[0]["author"] == "customer" and replay[0]["id"] == "while-away"
        assert replay[-1]["quick_replies"]
        assert frames[0]["last_seq"] >= expected[-1]
        # Resuming again from the newest seq replays nothing.
        again, frames = await ChatClient.start(server.ws_url, info["token"],
                                               last_seq=resumed.last_seq)
        assert frames[1:] == []
        await again.ws.close()


@shared
@pytest.mark.parametrize("last_seq", [None, 0, 10_000], ids=["none", "zero", "unknown"])
async def test_resume_without_a_usable_offset_gets_a_resync(server: LiveServer,
                                                            last_seq: int | None) -> None:
    a, info, _ = await chat(server)
    async with a:
        said = await a.say("I want a refund", id="first")
        said += await a.say("HL26110842")
    shown = sorted(f["seq"] for f in said if f["type"] in ("message", "ack"))

    client, frames = await ChatClient.start(server.ws_url, info["token"], last_seq=last_seq)
    async with client:
        assert [f["type"] for f in frames] == ["ready", "resync"]
        history = frames[1]["messages"]
        assert [m["seq"] for m in history] == shown
        assert history[0] == {**history[0], "author": "customer", "id": "first",
                              "text": "I want a refund"}
        assert history[1]["kind"] == "disclosure"
        assert frames[1]["last_seq"] == frames[0]["last_seq"] >= shown[-1]


@shared
async def test_every_tab_of_a_session_sees_every_message(server: LiveServer) -> None:
    a, info, _ = await chat(server)
    b, _ = await ChatClient.start(server.ws_url, info["token"], last_seq=None)
    async with a, b:
        sent = await a.say("I want a refund", id="from-a")
        seen_by_b = await b.turn()
        a_seqs = sorted(f["seq"] for f in sent if f["type"] in ("message", "ack"))
        b_msgs = messages(seen_by_b)
        assert sorted(f["seq"] for f in b_msgs) == a_seqs
        mine = next(f for f in b_msgs if f["author"] == "customer")
        assert mine["id"] == "from-a" and mine["text"] == "I want a refund"


@shared
async def test_agent_replies_are_pushed_and_notes_never_are(server: LiveServer) -> None:
    client, info, _ = await chat(server)
    async with client:
        handed = messages(await client.say("I want to talk to a human"))
        assert handed[-1]["kind"] == "handoff"
        conv = await server.context.app.store.load(_key(info))
        assert conv is not None and conv.owner == "pending_human"
        desk = server.context.desk
        await desk.claim(conv.id, "alice")
        await desk.note(conv.id, "alice", "customer seems upset; internal only")
        await desk.reply(conv.id, "alice", "Hi, I'm Alice from support. How can I help?")
        pushed = await client.recv_until(lambda f: f["type"] == "message")
        assert [f["type"] for f in pushed] == ["message"]
        reply = pushed[0]
        assert reply["author"] == "agent" and reply["kind"] == "agent"
        assert reply["text"].startswith("Hi, I'm Alice")
        assert messages(await client.until_pong()) == []

    resync_client, frames = await ChatClient.start(server.ws_url, info["token"])
    async with resync_client:
        texts = [m["text"] for m in frames[1]["messages"]]
        assert "Hi, I'm Alice from support. How can I help?" in texts
        assert not any("internal only" in t for t in texts)
        assert [m["author"] for m in frames[1]["messages"]][-1] == "agent"


def _key(info: Frame) -> Any:
    from engine.store.base import ConversationKey

    return ConversationKey("web", info["site"], info["session"])


# --------------------------------------------------------------------------- restart


async def test_server_restart_closes_1012_and_the_conversation_continues(
        live_server_factory: LiveServerFactory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    first = await live_server_factory()
    info = await new_session(first.url)
    client, _ = await ChatClient.start(first.ws_url, info["token"])
    await client.say("I want a refund")
    before = client.last_seq

    # A slow model: the next turn is still running when the server is told to stop.
    model = first.context.engine.model
    decide = model.decide

    async def slow_decide(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.5)
        return await decide(*args, **kwargs)

    monkeypatch.setattr(model, "decide", slow_decide)
    await client.send({"type": "message", "id": "in-flight", "text": "HL26110842"})
    assert await client.recv() == {"type": "typing", "on": True}
    stopping = asyncio.create_task(first.stop())
    code, _ = await client.closed()
    assert code == 1012
    await stopping

    second = await live_server_factory(database_url=first.settings.database_url)
    resumed, frames = await ChatClient.start(second.ws_url, info["token"], last_seq=before)
    async with resumed:
        replay = frames[1:]
        # The in-flight turn finished before the first server stopped: nothing was lost.
        assert replay[0]["author"] == "customer" and replay[0]["id"] == "in-flight"
        assert "reason" in replay[-1]["text"]
        # The browser did not see the ack, so it sends the message again: acked, not re-run.
        again = await resumed.say("HL26110842", id="in-flight")
        assert [f["seq"] for f in again if f["type"] == "ack"] == [replay[0]["seq"]]
        assert messages(again) == []
        confirm = messages(await resumed.say("it arrived damaged"))
        assert "129.00" in confirm[-1]["text"]



async def test_channel_stop_lets_the_turn_finish_then_closes_1012(
        live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    info = await new_session(live_server.url)
    client, _ = await ChatClient.start(live_server.ws_url, info["token"])
    model = live_server.context.engine.model
    route = model.route

    async def slow_route(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)
        return await route(*args, **kwargs)

    monkeypatch.setattr(model, "route", slow_route)
    await client.send({"type": "message", "id": "last", "text": "I want a refund"})
    assert await client.recv() == {"type": "typing", "on": True}
    await live_server.channel.stop()  # what a non-uvicorn shutdown relies on
    code, frames = await client.closed()
    assert code == 1012
    # The turn finished first: its ack and replies were sent before the close.
    assert [f["id"] for f in frames if f["type"] == "ack"] == ["last"]
    assert messages(frames)[0]["kind"] == "disclosure"
    late = await ChatClient.open(live_server.ws_url)
    code, _ = await late.closed()
    assert code == 1012  # a stopping channel turns new sockets away
