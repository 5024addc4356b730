"""The agent console over HTTP and WebSocket, against a live server.

Login and sessions, CSRF and origin checks, the queue and conversation API,
claim races between agents, notes that never reach the customer, hand back,
resolve, queue timeouts, and the live updates on ``/agent/ws``.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import httpx
import pytest
from starlette.requests import Request
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engine.config import Settings
from engine.server.console import (
    COOKIE,
    THROTTLE_LIMIT,
    THROTTLE_WINDOW,
    AgentAuth,
    _allowed_origins,
    _origin_ok,
)
from tests.engine.server.conftest import DEMO_AGENTS, PASSWORD, Console, next_message

# --------------------------------------------------------------------------- pages


async def test_the_console_page_is_served_with_a_strict_policy(console: Console) -> None:
    async with httpx.AsyncClient(base_url=console.url) as http:
        page = await http.get("/agent/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert 'data-testid="login-submit"' in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
            asset = await http.get(f"/agent/static/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert (await http.get("/agent/static/../console.py")).status_code == 404
        assert (await http.get("/agent/static/index.html")).status_code == 404
        redirect = await http.get("/agent")
        assert redirect.status_code == 307 and redirect.headers["location"] == "/agent/"


# --------------------------------------------------------------------------- sessions


async def test_login_sets_a_strict_http_only_session_cookie(console: Console) -> None:
    async with httpx.AsyncClient(base_url=console.url) as http:
        response = await http.post("/agent/api/login",
                                   json={"name": "alice", "password": PASSWORD})
        assert response.status_code == 200
        assert response.json()["agent"] == "alice"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        for attribute in ("HttpOnly", "Path=/agent", "SameSite=strict"):
            assert attribute in cookie
        me = await http.get("/agent/api/me")
        assert me.json() == response.json()


@pytest.mark.parametrize(("name", "password"), [("alice", "wrong"), ("mallory", PASSWORD),
                                                ("", PASSWORD), ("alice", "")])
async def test_bad_credentials_are_refused(console: Console, name: str, password: str) -> None:
    async with httpx.AsyncClient(base_url=console.url) as http:
        response = await http.post("/agent/api/login", json={"name": name, "password": password})
        assert response.status_code in (400, 401)
        assert "set-cookie" not in response.headers
        assert (await http.get("/agent/api/queue")).status_code == 401


async def test_repeated_failures_are_throttled(console: Console) -> None:
    async with httpx.AsyncClient(base_url=console.url) as http:
        for _ in range(THROTTLE_LIMIT):
            bad = await http.post("/agent/api/login", json={"name": "bob", "password": "x"})
            assert bad.status_code == 401
        response = await http.post("/agent/api/login",
                                   json={"name": "bob", "password": PASSWORD})
        assert response.status_code == 429
        # Other accounts are not locked out by bob's failures.
        other = await http.post("/agent/api/login", json={"name": "alice", "password": PASSWORD})
        assert other.status_code == 200


async def test_throttle_window_expires() -> None:
    now = [0.0]
    auth = AgentAuth({}, "secret", clock=lambda: now[0])
    for _ in range(THROTTLE_LIMIT):
        auth.failed("ip|bob")
    assert auth.throttled("ip|bob")
    now[0] = THROTTLE_WINDOW + 1
    assert not auth.throttled("ip|bob")


async def test_forged_expired_and_removed_sessions_are_refused() -> None:
    auth = AgentAuth({"alice": "hash"}, "secret")
    token, session = auth.issue("alice")
    assert auth.session(token) == session
    assert auth.session(token[:-2] + "xx") is None
    assert AgentAuth({"alice": "hash"}, "other secret").session(token) is None
    assert AgentAuth({"bob": "hash"}, "secret").session(token) is None  # account removed
    auth.revoke(session)
    assert auth.session(token) is None
    assert auth.session(None) is None and auth.session("") is None


async def test_a_malformed_password_hash_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    auth = AgentAuth({"carol": "plaintext"}, "secret")
    assert not await auth.verify("carol", "plaintext")
    assert "not an argon2 hash" in caplog.text


async def test_logout_revokes_the_session_and_closes_its_sockets(console: Console) -> None:
    alice = await console.agent("alice")
    ws = await console.socket(alice)
    await next_message(ws, "hello")
    stolen = alice.cookies[COOKIE]
    assert (await alice.post("/agent/api/logout", json={})).status_code == 200
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    async with httpx.AsyncClient(base_url=console.url, cookies={COOKIE: stolen}) as replay:
        assert (await replay.get("/agent/api/queue")).status_code == 401


# --------------------------------------------------------------------------- CSRF


async def test_changes_need_the_csrf_token_json_and_our_origin(console: Console) -> None:
    cid = await console.handoff()
    alice = await console.agent("alice")
    url = f"/agent/api/conversations/{cid}/claim"
    token = alice.headers.pop("x-csrf-token")
    assert (await alice.post(url, json={})).status_code == 403
    assert (await alice.post(url, json={}, headers={"x-csrf-token": "nope"})).status_code == 403
    evil = await alice.post(url, json={}, headers={"x-csrf-token": token,
                                                   "origin": "https://evil.example"})
    assert evil.status_code == 403
    form = await alice.post(url, content=b"a=1", headers={
        "x-csrf-token": token, "content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    cross_login = await alice.post("/agent/api/login", json={"name": "bob", "password": PASSWORD},
                                   headers={"origin": "https://evil.example"})
    assert cross_login.status_code == 403
    assert (await console.conv()).owner == "pending_human"
    ok = await alice.post(url, json={}, headers={"x-csrf-token": token, "origin": console.url})
    assert ok.status_code == 200


def _request(origin: str | None, host: str = "10.0.0.5:8080") -> Request:
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


def test_only_our_own_origin_may_act() -> None:
    settings = Settings(allowed_origins=["https://shop.example"],
                        public_url="https://help.example/")
    allowed = _allowed_origins(SimpleNamespace(settings=settings))  # type: ignore[arg-type]
    assert allowed == {"https://help.example"}
    assert _origin_ok(_request("https://help.example"), allowed)  # behind a proxy
    assert _origin_ok(_request("http://10.0.0.5:8080"), allowed)  # same host
    assert _origin_ok(_request(None), allowed)  # not a browser
    # The shops embedding the widget are allowed on the chat socket, not here.
    assert not _origin_ok(_request("https://shop.example"), allowed)
    assert not _origin_ok(_request("null"), allowed)


# --------------------------------------------------------------------------- the API


async def test_queue_and_conversation_detail(console: Console) -> None:
    cid = await console.handoff()
    alice = await console.agent("alice")
    [item] = (await alice.get("/agent/api/queue")).json()["items"]
    assert item["conversation_id"] == cid and item["reason"] == "request"
    assert item["priority"] == "normal" and item["owner"] == "pending_human"
    assert item["waiting_seconds"] >= 0 and item["preview"] == "customer asked for a human"

    detail = (await alice.get(f"/agent/api/conversations/{cid}")).json()
    conv = detail["conversation"]
    assert (conv["owner"], conv["reason"], conv["flow"], conv["channel"]) == (
        "pending_human", "request", "refund", "test")
    assert conv["detail"] == "customer asked for a human"
    [order] = detail["entities"]
    assert (order["name"], order["value"], order["source"]) == ("order_id", "HL26110842",
                                                                 "customer")
    assert [(h["value"], h["source"]) for h in order["history"]] == [("HL26110842",
                                                                       "customer")]
    assert detail["results"]["order"]["found"] is True
    assert "HL26110842" in detail["summary"] and "asked for a human" in detail["summary"]
    transcript = detail["transcript"]
    assert [r["seq"] for r in transcript] == sorted(r["seq"] for r in transcript)
    customer = [r["text"] for r in transcript if r["direction"] == "in"]
    assert customer == ["I want a refund", "HL26110842", "I want to talk to a human"]
    assert any(r["text"] == "handoff" and r["data"]["reason"] == "request" for r in transcript)

    missing = await alice.get("/agent/api/conversations/nope")
    assert missing.status_code == 404
    unknown = await alice.post(f"/agent/api/conversations/{cid}/delete", json={})
    assert unknown.status_code == 404


async def test_claim_reply_note_hand_back(console: Console) -> None:
    cid = await console.handoff()
    alice, bob = await console.agent("alice"), await console.agent("bob")
    base = f"/agent/api/conversations/{cid}"
    early = await alice.post(f"{base}/reply", json={"text": "Hi"})
    assert early.status_code == 409 and "claim the conversation first" in early.json()["message"]

    claimed = await alice.post(f"{base}/claim", json={})
    assert claimed.status_code == 200
    assert claimed.json()["conversation"]["owner_agent"] == "alice"
    assert (await bob.post(f"{base}/reply", json={"text": "Bob here"})).status_code == 409
    assert (await alice.post(f"{base}/reply", json={"text": "  "})).status_code == 400
    assert (await alice.post(f"{base}/reply", json={"text": 3})).status_code == 400
    assert (await alice.post(f"{base}/reply", json={"text": "x" * 4001})).status_code == 400

    before = len(console.sent)
    assert (await alice.post(f"{base}/reply", json={"text": "Hi, I'm Alice."})).status_code == 200
    noted = await bob.post(f"{base}/note", json={"text": "VIP customer, 退款优先"})
    assert noted.status_code == 200
    sent = console.sent[before:]
    assert [(o.text, o.kind, o.author) for o in sent] == [("Hi, I'm Alice.", "agent",
                                                           "agent:alice")]

    transcript = (await alice.get(base)).json()["transcript"]
    note = next(r for r in transcript if r["kind"] == "note")
    assert (note["text"], note["author"], note["direction"]) == (
        "VIP customer, 退款优先", "agent:bob", "event")

    assert (await bob.post(f"{base}/hand_back", json={})).status_code == 409
    back = await alice.post(f"{base}/hand_back", json={"note": "order checked"})
    assert back.status_code == 200 and back.json()["conversation"]["owner"] == "bot"
    assert "AI assistant again" in console.sent[-1].text
    assert (await alice.get("/agent/api/queue")).json()["items"] == []
    replies = await console.say("it arrived damaged")
    assert replies and "Shall I go ahead?" in replies[0].text
    assert not any("退款优先" in o.text for o in console.sent)


async def test_two_agents_claiming_at_once_exactly_one_wins(console: Console) -> None:
    alice, bob = await console.agent("alice"), await console.agent("bob")
    for round_ in range(3):
        cid = await console.handoff(f"race{round_}")
        url = f"/agent/api/conversations/{cid}/claim"
        responses = await asyncio.gather(alice.post(url, json={}), bob.post(url, json={}))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 409], [r.text for r in responses]
        winner = next(r for r in responses if r.status_code == 200).json()
        loser = next(r for r in responses if r.status_code == 409).json()
        assert winner["conversation"]["owner_agent"] in loser["message"]


async def test_resolve(console: Console) -> None:
    cid = await console.handoff()
    alice = await console.agent("alice")
    resolved = await alice.post(f"/agent/api/conversations/{cid}/resolve", json={})
    assert resolved.status_code == 200
    assert resolved.json()["conversation"]["owner"] == "resolved"
    assert "resolved" in console.sent[-1].text
    again = await alice.post(f"/agent/api/conversations/{cid}/claim", json={})
    assert again.status_code == 409


# --------------------------------------------------------------------------- live updates


async def test_socket_needs_a_session_and_our_origin(console: Console) -> None:
    anonymous = await console.socket(None)
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(anonymous.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    alice = await console.agent("alice")
    with pytest.raises(InvalidStatus):
        await console.socket(alice, origin="https://evil.example")


async def test_live_updates_reach_agents_but_notes_never_the_customer(console: Console) -> None:
    alice, bob = await console.agent("alice"), await console.agent("bob")
    alice_ws, bob_ws = await console.socket(alice), await console.socket(bob)
    hello = await next_message(alice_ws, "hello")
    assert hello["agent"] == "alice" and hello["queue"] == []
    await next_message(bob_ws, "hello")

    cid = await console.handoff()
    handoff = await next_message(alice_ws, "handoff")
    assert (handoff["conversation_id"], handoff["reason"]) == (cid, "request")
    queue = await next_message(bob_ws, "queue")
    assert [i["conversation_id"] for i in queue["items"]] == [cid]

    await alice_ws.send(json.dumps({"type": "watch", "conversation_id": cid}))
    await alice_ws.send("not json")  # ignored
    await asyncio.sleep(0.05)  # the watch is read before the next event
    await console.say("hello? 有人吗?")
    records = await next_message(alice_ws, "records", conversation_id=cid)
    assert [r["text"] for r in records["records"] if r["direction"] == "in"] == ["hello? 有人吗?"]
    activity = await next_message(bob_ws, "activity", conversation_id=cid)
    assert activity["text"] == "hello? 有人吗?"

    await bob.post(f"/agent/api/conversations/{cid}/claim", json={})
    change = await next_message(alice_ws, "conversation", action="claim")
    assert change["agent"] == "bob" and change["conversation"]["owner_agent"] == "bob"
    claimed = await next_message(alice_ws, "queue")
    assert claimed["items"][0]["owner_agent"] == "bob"

    before = len(console.sent)
    await bob.post(f"/agent/api/conversations/{cid}/note", json={"text": "internal only"})
    noted = await next_message(alice_ws, "records", conversation_id=cid)
    assert [(r["kind"], r["text"]) for r in noted["records"]] == [("note", "internal only")]
    assert console.sent[before:] == []

    await bob.post(f"/agent/api/conversations/{cid}/hand_back", json={})
    back = await next_message(alice_ws, "conversation", action="hand_back")
    assert back["conversation"]["owner"] == "bot"
    # After the hand back the bot answers again; watchers see its turn.
    await console.say("it arrived damaged")
    turn = await next_message(alice_ws, "records", conversation_id=cid)
    assert any(r["direction"] == "out" and r["author"] == "bot" for r in turn["records"])


async def test_queue_timeout_hands_back_with_an_apology(console: Console) -> None:
    alice = await console.agent("alice")
    ws = await console.socket(alice)
    await next_message(ws, "hello")
    desk = console.live.context.desk
    long_ago = datetime.now(UTC) - timedelta(seconds=desk.queue_timeout + 5)
    cid = await console.handoff(received_at=long_ago)
    await next_message(ws, "queue")
    assert await desk.expire() == [cid]
    timeout = await next_message(ws, "conversation", action="timeout")
    assert timeout["agent"] is None and timeout["conversation"]["owner"] == "bot"
    assert (await next_message(ws, "queue"))["items"] == []
    apology = console.sent[-1]
    ticket = (await console.conv()).results["callback_ticket"]
    assert apology.text.startswith("I'm sorry") and ticket in apology.text


async def test_a_slow_socket_does_not_hold_up_turns(console: Console) -> None:
    # Nobody reads this socket: the customer's turns still complete at once.
    alice = await console.agent("alice")
    ws = await console.socket(alice)
    cid = await console.handoff()
    await alice.post(f"/agent/api/conversations/{cid}/claim", json={})
    await ws.send(json.dumps({"type": "watch", "conversation_id": cid}))
    for i in range(20):
        await asyncio.wait_for(console.say(f"message {i}"), 2)
    # Nothing was dropped meanwhile: every message arrives, in order.
    seen: list[str] = []
    while len(seen) < 20:
        seen.append((await next_message(ws, "activity", conversation_id=cid))["text"])
    assert seen == [f"message {i}" for i in range(20)]


async def test_the_demo_config_agents_log_in_with_the_demo_password() -> None:
    assert set(DEMO_AGENTS) == {"alice", "bob"}
    auth = AgentAuth(DEMO_AGENTS, "secret")
    assert await auth.verify("alice", PASSWORD) and await auth.verify("bob", PASSWORD)
    assert not await auth.verify("alice", "wrong")

