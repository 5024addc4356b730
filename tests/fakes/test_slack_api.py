"""Drive :mod:`tests.fakes.slack_api` with the real ``slack_sdk`` clients over 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

from tests.fakes.slack_api import (
    APP_TOKEN,
    BOT_ID,
    BOT_TOKEN,
    BOT_USER_ID,
    SIGNING_SECRET,
    TEAM_ID,
    FakeSlack,
    SlackEvents,
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    async with FakeSlack(channels={"C1": "general"}) as server:
        yield server


def client(fake: FakeSlack, token: str = BOT_TOKEN, **options: Any) -> AsyncWebClient:
    return AsyncWebClient(token=token, base_url=fake.api_url, **options)


async def test_auth_test_names_the_bot(fake: FakeSlack) -> None:
    answer = await client(fake).auth_test()
    assert (answer["team_id"], answer["user_id"], answer["bot_id"]) == (TEAM_ID, BOT_USER_ID,
                                                                          BOT_ID)
    assert fake.calls_to("auth.test")[0].token == BOT_TOKEN


async def test_post_message_returns_increasing_ts_and_stores_the_message(fake: FakeSlack) -> None:
    web = client(fake)
    first = await web.chat_postMessage(channel="C1", text="one")
    second = await web.chat_postMessage(channel="C1", text="two", thread_ts=first["ts"],
                                         blocks=[{"type": "section", "text": {
                                             "type": "mrkdwn", "text": "two"}}],
                                         metadata={"event_type": "x", "event_payload": {}})
    assert first["ok"] and first["channel"] == "C1" and float(second["ts"]) > float(first["ts"])
    assert second["message"]["thread_ts"] == first["ts"]
    assert [m["text"] for m in fake.posted("C1")] == ["one", "two"]
    assert fake.posted("C1", thread_ts=first["ts"])[0]["metadata"]["event_type"] == "x"
    assert fake.find("C1", first["ts"])["reply_count"] == 1  # type: ignore[index]


async def test_form_encoded_and_get_requests_are_understood(fake: FakeSlack) -> None:
    web = client(fake)
    sent = await web.api_call("chat.postMessage", data={
        "channel": "C1", "text": "form", "blocks": json.dumps([{"type": "divider"}])})
    assert fake.find("C1", sent["ts"])["blocks"] == [{"type": "divider"}]  # type: ignore[index]
    history = await web.conversations_history(channel="C1", limit=1)
    assert history["messages"][0]["text"] == "form"
    assert fake.calls[-1].params["limit"] == "1"


async def test_errors_are_http_200_with_ok_false(fake: FakeSlack) -> None:
    web = client(fake)
    calls: list[tuple[Callable[[], Awaitable[Any]], str]] = [
        (lambda: web.api_call("chat.postMessage", json={"channel": "C1"}), "no_text"),
        (lambda: web.chat_postMessage(channel="C1", text="x" * 40_001), "msg_too_long"),
        (lambda: web.chat_update(channel="C1", ts="1.000001", text="x"), "message_not_found"),
        (lambda: web.users_info(user="nobody"), "user_not_found"),
        (lambda: web.api_call("no.such.method"), "unknown_method"),
        (lambda: client(fake, token="xoxb-wrong").auth_test(), "invalid_auth"),
        (lambda: client(fake, token=APP_TOKEN).auth_test(), "not_allowed_token_type"),
    ]
    for call, error in calls:
        with pytest.raises(SlackApiError) as caught:
            await call()
        assert caught.value.response.status_code == 200
        assert caught.value.response["error"] == error
    fake.strict_channels = True
    with pytest.raises(SlackApiError, match="channel_not_found"):
        await web.chat_postMessage(channel="C404", text="hi")
    fake.fail("chat.postMessage", "is_archived")
    with pytest.raises(SlackApiError, match="is_archived"):
        await web.chat_postMessage(channel="C1", text="hi")
    assert (await web.chat_postMessage(channel="C1", text="hi"))["ok"]  # the failure was used up
    async with httpx.AsyncClient() as http:
        missing = await http.post(fake.api_url + "auth.test")
    assert missing.json() == {"ok": False, "error": "not_authed"}


async def test_429_carries_retry_after_and_the_sdk_retries_when_asked(fake: FakeSlack) -> None:
    fake.rate_limit("chat.postMessage", retry_after=1)
    with pytest.raises(SlackApiError) as caught:
        await client(fake).chat_postMessage(channel="C1", text="plain client")
    assert caught.value.response.status_code == 429
    assert caught.value.response.headers["Retry-After"] == "1"

    fake.rate_limit("chat.postMessage", retry_after=1)
    started = time.monotonic()
    web = client(fake, retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=2)])
    sent = await web.chat_postMessage(channel="C1", text="retried")
    assert sent["ok"] and time.monotonic() - started >= 1.0
    calls = fake.calls_to("chat.postMessage")
    assert [c.status for c in calls[-2:]] == [429, 200]
    assert calls[-1].at - calls[-2].at >= 1.0


async def test_history_replies_update_and_ephemeral(fake: FakeSlack) -> None:
    web = client(fake)
    root = await web.chat_postMessage(channel="C1", text="root",
                                      metadata={"event_type": "t", "event_payload": {"k": 1}})
    await web.chat_postMessage(channel="C1", text="reply", thread_ts=root["ts"])
    for n in range(3):
        await web.chat_postMessage(channel="C1", text=f"top {n}")

    page = await web.conversations_history(channel="C1", limit=2)
    assert [m["text"] for m in page["messages"]] == ["top 2", "top 1"] and page["has_more"]
    rest = await web.conversations_history(channel="C1", limit=10, include_all_metadata=True,
                                           cursor=page["response_metadata"]["next_cursor"])
    assert [m["text"] for m in rest["messages"]] == ["top 0", "root"]  # no thread replies
    assert rest["messages"][1]["metadata"]["event_payload"] == {"k": 1}
    assert "metadata" not in (await web.conversations_history(channel="C1"))["messages"][-1]

    thread = await web.conversations_replies(channel="C1", ts=root["ts"])
    assert [m["text"] for m in thread["messages"]] == ["root", "reply"]
    await web.chat_update(channel="C1", ts=root["ts"], text="edited", blocks=[])
    assert fake.find("C1", root["ts"])["text"] == "edited"  # type: ignore[index]
    ephemeral = await web.chat_postEphemeral(channel="C1", user="U1", text="psst")
    assert ephemeral["message_ts"] and fake.ephemeral[0]["user"] == "U1"
    info = await web.conversations_info(channel="C1")
    assert info["channel"]["name"] == "general"
    user = await web.users_info(user="U7")
    assert user["user"]["id"] == "U7"


async def test_socket_mode_hello_envelopes_and_acks(fake: FakeSlack) -> None:
    web = client(fake)
    with pytest.raises(SlackApiError, match="not_allowed_token_type"):
        await web.apps_connections_open(app_token=BOT_TOKEN)
    received: list[SocketModeRequest] = []

    async def listener(socket: Any, request: SocketModeRequest) -> None:
        received.append(request)
        await socket.send_socket_mode_response(SocketModeResponse(request.envelope_id))

    socket = SocketModeClient(app_token=APP_TOKEN, web_client=web, ping_interval=30,
                              auto_reconnect_enabled=False)
    socket.socket_mode_request_listeners.append(listener)
    try:
        await socket.connect()  # type: ignore[no-untyped-call]
        ack = await fake.socket_send({"event": {"type": "message"}}, retry_attempt=2,
                                     retry_reason="timeout")
        assert ack["envelope_id"] == received[0].envelope_id
        assert (received[0].type, received[0].retry_attempt, received[0].retry_reason) == (
            "events_api", 2, "timeout")
        assert fake.socket_connections == 1
    finally:
        await socket.close()  # type: ignore[no-untyped-call]


def test_events_are_signed_like_slack(fake: FakeSlack) -> None:
    events = SlackEvents("http://127.0.0.1:9/slack/events", fake=fake)
    envelope = events.message("C1", "U1", "hello", thread_ts="1.000001")
    body = json.dumps(envelope).encode()
    verifier = SignatureVerifier(SIGNING_SECRET)

    def verify(signature: Any) -> bool:
        headers = events.headers(body, content_type="application/json", signature=signature)
        return verifier.is_valid_request(body, headers)

    assert verify("valid") and not verify("forged") and not verify("stale")
    assert not verify("missing")
    retry = events.headers(body, content_type="application/json", retry_num=2)
    assert (retry["X-Slack-Retry-Num"], retry["X-Slack-Retry-Reason"]) == ("2", "http_timeout")
    assert envelope["type"] == "event_callback" and envelope["event_id"].startswith("Ev")
    assert envelope["event"]["thread_ts"] == "1.000001"
    assert fake.messages["C1"][0]["text"] == "hello"  # users' messages land in the log
    assert SlackEvents.url_verification("c")["challenge"] == "c"


async def test_block_actions_are_built_from_the_message(fake: FakeSlack) -> None:
    web = client(fake)
    sent = await web.chat_postMessage(channel="C1", text="rate", thread_ts="1.000001", blocks=[
        {"type": "actions", "block_id": "b", "elements": [
            {"type": "button", "action_id": "rate_5", "value": "rating:5",
             "text": {"type": "plain_text", "text": "5"}}]}])
    events = SlackEvents("http://127.0.0.1:9/slack/events", fake=fake)
    payload = events.block_actions("U1", sent["message"], "rate_5", channel="C1")
    assert payload["actions"][0]["value"] == "rating:5"
    assert payload["actions"][0]["block_id"] == "b"
    assert payload["container"] == {"type": "message", "message_ts": sent["ts"],
                                    "channel_id": "C1", "is_ephemeral": False,
                                    "thread_ts": "1.000001"}
    with pytest.raises(KeyError):
        events.block_actions("U1", sent["message"], "nope", channel="C1")


async def test_stops_by_itself_after_its_lifetime() -> None:
    fake = FakeSlack(max_lifetime=0.05)
    await fake.start()
    url = fake.api_url
    await asyncio.sleep(0.3)
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.post(url + "auth.test")
    await fake.stop()
