"""The Slack channel end to end: signed events in over HTTP (and Socket Mode), replies out
to the fake Slack Web API."""

from __future__ import annotations

import asyncio
import copy
import itertools
import sys
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest

from channels.slack.channel import SlackChannel
from channels.slack.convert import TEXT_LIMIT, from_slack
from channels.slack.plugin import make
from engine.config import Settings
from engine.models.base import (
    Decision,
    DecisionRequest,
    Model,
    RouteDecision,
    RouteRequest,
    SummaryRequest,
)
from engine.server.context import ServerContext
from tests.channels.slack.conftest import (
    AGENTS,
    CUSTOMER,
    SUPPORT,
    SlackFactory,
    SlackHarness,
    eventually,
)
from tests.fakes.slack_api import APP_TOKEN, BOT_ID, BOT_TOKEN, BOT_USER_ID

INJECTION = "<!channel> <@U123> <https://evil.example|bank> & co"


class ScriptedModel(Model):
    """Wraps the server's model: waits ``delay`` seconds per decision, may force a reply."""

    name = "scripted"

    def __init__(self, inner: Model, *, delay: float = 0.0, reply: str | None = None) -> None:
        self.inner = inner
        self.delay = delay
        self.reply = reply
        self.decisions = 0

    async def decide(self, request: DecisionRequest) -> Decision:
        self.decisions += 1
        await asyncio.sleep(self.delay)
        if self.reply is not None:
            return Decision(reply=self.reply, off_topic=True, model=self.name)
        return await self.inner.decide(request)

    async def route(self, request: RouteRequest) -> RouteDecision:
        return await self.inner.route(request)

    async def summarise(self, request: SummaryRequest) -> str:
        return await self.inner.summarise(request)


def use_model(slack: SlackHarness, **options: Any) -> ScriptedModel:
    engine = slack.live.context.app.engine
    model = ScriptedModel(engine.model, **options)
    engine.model = model
    return model


def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m["text"] for m in messages]


# -- requests ---------------------------------------------------------------------------------


async def test_url_verification_echoes_the_challenge(slack: SlackHarness) -> None:
    response = await slack.events.send(slack.events.url_verification("c-123"))
    assert response.status_code == 200 and response.json() == {"challenge": "c-123"}


async def test_a_signed_message_is_answered_in_its_thread(slack: SlackHarness) -> None:
    envelope = await slack.say("buy milk")
    root = envelope["event"]["ts"]
    posted = slack.fake.posted(SUPPORT)
    assert texts(posted) == ["Hi! I am an AI assistant. You can ask for a human at any time.",
                             "Noted: buy milk", "How would you rate this conversation?"]
    assert all(m["thread_ts"] == root for m in posted)
    conv = await slack.conv(SUPPORT, root)
    records = await slack.store.messages(conv.id)
    inbound = [r for r in records if r.direction == "in"]
    assert [(r.text, r.channel_message_id) for r in inbound] == [
        ("buy milk", envelope["event_id"])]
    methods = [c.method for c in slack.fake.calls]
    assert methods.index("auth.test") < methods.index("chat.postMessage")


@pytest.mark.parametrize("signature", ["forged", "stale", "missing"])
async def test_unverified_requests_are_refused_and_nothing_is_stored(
        slack: SlackHarness, signature: Any) -> None:
    envelope = slack.events.message(SUPPORT, CUSTOMER, "hello")
    response = await slack.events.send(envelope, signature=signature)
    assert response.status_code == 401
    payload = slack.events.block_actions(CUSTOMER, {"ts": "1.1", "thread_ts": "1.0"},
                                         "hl_rate_1", channel=SUPPORT, value="rating:1")
    assert (await slack.events.send_action(payload, signature=signature)).status_code == 401
    await slack.settle()
    assert await slack.store.conversations() == []
    assert slack.fake.posted() == []


async def test_the_ack_is_immediate_and_retries_are_answered_once(slack: SlackHarness) -> None:
    model = use_model(slack, delay=3.2)  # slower than Slack's 3-second budget
    envelope = slack.events.message(SUPPORT, CUSTOMER, "call the plumber")
    started = time.monotonic()
    response = await slack.events.send(envelope)
    assert response.status_code == 200 and time.monotonic() - started < 2.5
    # Slack gave up waiting (as if) and redelivers while the turn is still running.
    retries = await slack.events.redeliver(envelope, times=2)
    assert [r.status_code for r in retries] == [200, 200]
    assert slack.fake.posted(SUPPORT) == []  # the model is still thinking
    await slack.settle()
    assert texts(slack.fake.posted(SUPPORT))[1] == "Noted: call the plumber"
    # Late redeliveries, also one the process has forgotten (another replica, a
    # restart): the store's unique (channel, event_id) drops it.
    await slack.events.redeliver(envelope, times=1, reason="http_error")
    slack.slack._seen.clear()
    await slack.events.redeliver(envelope, times=1)
    await slack.settle()
    assert len(slack.fake.posted(SUPPORT)) == 3 and model.decisions == 1
    conv = await slack.conv(SUPPORT, envelope["event"]["ts"])
    assert len([r for r in await slack.store.messages(conv.id) if r.direction == "in"]) == 1


async def test_each_thread_is_its_own_conversation(slack: SlackHarness) -> None:
    first = await slack.say("first note")
    second = await slack.say("second note", user="U0OTHER")
    root1, root2 = first["event"]["ts"], second["event"]["ts"]
    reply = await slack.say("more", thread_ts=root1)
    conv1, conv2 = await slack.conv(SUPPORT, root1), await slack.conv(SUPPORT, root2)
    assert conv1.id != conv2.id
    in1 = [r.text for r in await slack.store.messages(conv1.id) if r.direction == "in"]
    assert in1 == ["first note", "more"]
    assert len(slack.fake.posted(SUPPORT, thread_ts=root2)) == 3
    assert len(slack.fake.posted(SUPPORT, thread_ts=root1)) > 3
    assert slack.fake.posted(SUPPORT, thread_ts=reply["event"]["ts"]) == []


async def test_the_bots_own_and_other_non_human_messages_are_ignored(slack: SlackHarness) -> None:
    events = slack.events
    for envelope in [
        events.message(SUPPORT, BOT_USER_ID, "I am the bot"),
        events.message(SUPPORT, "U0X", "another bot", bot_id="B0OTHER"),
        events.message(SUPPORT, "U0X", "mine", bot_id=BOT_ID),
        events.message(SUPPORT, CUSTOMER, "edited", subtype="message_changed"),
        events.message(SUPPORT, CUSTOMER, "joined", subtype="channel_join"),
    ]:
        assert (await events.send(envelope)).status_code == 200
    await slack.settle()
    assert await slack.store.conversations() == []
    assert slack.fake.calls_to("chat.postMessage") == []


# -- text safety --------------------------------------------------------------------------------


def assert_inert(text: str) -> None:
    """Nothing in ``text`` can notify people or link anywhere."""
    assert "<!" not in text and "<@" not in text and "<http" not in text
    assert "&amp;" in text


async def test_customer_text_in_a_template_cannot_mention_or_link(slack: SlackHarness) -> None:
    # As Slack delivers what the customer typed literally, plus real mentions.
    typed = "tell &lt;!channel&gt; &lt;@U123&gt; &lt;https://evil.example|bank&gt; &amp; co"
    envelope = await slack.say(typed + " <!here> <@U0BOT>")
    noted = slack.fake.posted(SUPPORT, thread_ts=envelope["event"]["ts"])[1]["text"]
    assert_inert(noted)
    assert "&lt;@U123&gt;" in noted and "&lt;https://evil.example|bank&gt;" in noted
    assert from_slack(noted) == f"Noted: tell {INJECTION} @here @U0BOT"


async def test_a_model_reply_cannot_mention_or_link(slack: SlackHarness) -> None:
    use_model(slack, reply=f"Sure! {INJECTION} [log in](https://evil.example/login)")
    envelope = await slack.say("hello")  # the flow asks for its entity first
    await slack.say("what now?", thread_ts=envelope["event"]["ts"])
    reply = slack.fake.posted(SUPPORT)[-1]["text"]
    assert reply.startswith("Sure! ")
    assert_inert(reply)
    assert "evil.example/login" not in reply


async def test_a_long_reply_is_split_in_order(slack: SlackHarness) -> None:
    paragraphs = [f"Part {n}. " + "lorem ipsum " * 40 for n in range(16)]
    use_model(slack, reply="\n\n".join(p.strip() for p in paragraphs))
    envelope = await slack.say("hello")
    before = len(slack.fake.posted(SUPPORT))
    await slack.say("tell me everything", thread_ts=envelope["event"]["ts"])
    chunks = texts(slack.fake.posted(SUPPORT))[before:]
    assert len(chunks) >= 3 and all(len(c) <= TEXT_LIMIT for c in chunks)
    assert [c.split(".")[0] for c in chunks] == sorted(
        {c.split(".")[0] for c in chunks}, key=lambda part: int(part.split()[1]))
    assert " ".join(" ".join(chunks).split()) == " ".join(" ".join(paragraphs).split())


# -- buttons ------------------------------------------------------------------------------------


async def press(slack: SlackHarness, message: dict[str, Any], action_id: str,
                user: str = CUSTOMER, channel: str = SUPPORT) -> httpx.Response:
    response = await slack.events.send_action(
        slack.events.block_actions(user, message, action_id, channel=channel))
    assert response.status_code == 200, response.text
    await slack.settle()
    return response


async def test_rating_buttons_record_the_rating_once(slack: SlackHarness) -> None:
    envelope = await slack.say("water the plants")
    root = envelope["event"]["ts"]
    prompt = copy.deepcopy(slack.fake.posted(SUPPORT)[-1])  # as the customer's client shows it
    assert [e["action_id"] for e in prompt["blocks"][1]["elements"]] == [
        f"hl_rate_{n}" for n in range(1, 6)]
    await press(slack, prompt, "hl_rate_5")
    await press(slack, prompt, "hl_rate_1")  # a double click before the buttons went away
    conv = await slack.conv(SUPPORT, root)
    ratings = [r for r in await slack.store.messages(conv.id) if r.kind == "rating"]
    assert [r.data["rating"] for r in ratings] == [5]
    assert slack.fake.posted(SUPPORT)[-1]["text"] == "Thank you for your feedback!"
    assert conv.owner == "bot"
    shown = slack.fake.find(SUPPORT, prompt["ts"])
    assert shown is not None and [b["type"] for b in shown["blocks"]] == ["section", "context"]


async def test_a_low_rating_hands_off_to_a_human(slack: SlackHarness) -> None:
    envelope = await slack.say("feed the cat")
    await press(slack, slack.fake.posted(SUPPORT)[-1], "hl_rate_2")
    conv = await slack.conv(SUPPORT, envelope["event"]["ts"])
    assert (conv.owner, conv.handoff_reason) == ("pending_human", "satisfaction")
    assert slack.fake.posted(SUPPORT)[-1]["text"] == "A colleague will take over."
    [root] = await slack.fake.wait_posted(AGENTS, 1)
    assert root["metadata"]["event_payload"]["conversation_id"] == conv.id


async def test_a_quick_reply_button_is_a_customer_turn(slack: SlackHarness) -> None:
    envelope = await slack.say("call mum")
    noted = slack.fake.posted(SUPPORT)[1]
    assert noted["blocks"][1]["elements"][0]["text"]["text"] == "Note another"
    await press(slack, noted, "hl_quick_0")
    conv = await slack.conv(SUPPORT, envelope["event"]["ts"])
    inbound = [r.text for r in await slack.store.messages(conv.id) if r.direction == "in"]
    assert inbound == ["call mum", "Note another"]


# -- rate limits ---------------------------------------------------------------------------------


async def test_429_is_retried_after_retry_after_and_order_is_kept(slack: SlackHarness) -> None:
    slack.fake.rate_limit("chat.postMessage", retry_after=1)
    await slack.say("renew passport")
    assert texts(slack.fake.posted(SUPPORT)) == [
        "Hi! I am an AI assistant. You can ask for a human at any time.",
        "Noted: renew passport", "How would you rate this conversation?"]
    calls = slack.fake.calls_to("chat.postMessage")
    assert [c.status for c in calls] == [429, 200, 200, 200]
    assert calls[1].at - calls[0].at >= 1.0
    assert calls[1].params["text"] == calls[0].params["text"]


@pytest.mark.slack_rate(1.0)
async def test_about_one_message_per_second_per_channel(slack: SlackHarness) -> None:
    await asyncio.gather(slack.say("one", settle=False),
                         slack.say("two", channel="C0OTHER", settle=False))
    await slack.settle()

    def times(channel: str) -> list[float]:
        return [c.at for c in slack.fake.calls_to("chat.postMessage", ok=True)
                if c.params["channel"] == channel]

    support, other = times(SUPPORT), times("C0OTHER")
    assert len(support) == len(other) == 3
    for sent in (support, other):
        assert all(b - a >= 1.0 for a, b in itertools.pairwise(sent))
    # Channels do not wait for each other: their messages interleave.
    assert other[0] < support[1] and support[0] < other[1]


# -- configuration and Socket Mode -------------------------------------------------------------


def context(**settings: Any) -> ServerContext:
    return cast(ServerContext, SimpleNamespace(settings=Settings(**settings)))


def test_the_channel_is_off_unless_configured(caplog: pytest.LogCaptureFixture) -> None:
    assert make(context()) is None
    assert make(context(slack_bot_token=BOT_TOKEN)) is None  # events mode, no secret
    assert make(context(slack_bot_token=BOT_TOKEN, slack_mode="socket")) is None
    assert "slack_signing_secret" in caplog.text and "slack_app_token" in caplog.text


def test_a_configured_channel_without_the_extra_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "channels.slack.channel")
    monkeypatch.setitem(sys.modules, "slack_bolt.adapter.starlette.async_handler", None)
    with pytest.raises(ImportError, match=r"pip install 'helpline\[slack\]'"):
        make(context(slack_bot_token=BOT_TOKEN, slack_signing_secret="s"))


@pytest.fixture
async def socket_slack(slack_factory: SlackFactory) -> AsyncIterator[SlackHarness]:
    yield await slack_factory(slack_mode="socket", slack_app_token=APP_TOKEN,
                              slack_signing_secret=None)


async def test_socket_mode_receives_events_and_actions(socket_slack: SlackHarness) -> None:
    slack, fake = socket_slack, socket_slack.fake
    assert isinstance(slack.slack, SlackChannel) and slack.slack.routes() == []
    async with httpx.AsyncClient() as http:  # no HTTP endpoint in Socket Mode
        assert (await http.post(slack.live.url + "/slack/events", content=b"{}")).status_code \
            in (404, 405)
    await fake.wait_for(lambda: fake.socket_connections == 1)
    assert fake.calls_to("apps.connections.open")[0].token == APP_TOKEN

    envelope = slack.events.message(SUPPORT, CUSTOMER, "over the socket")
    started = time.monotonic()
    ack = await fake.socket_send(envelope)
    assert time.monotonic() - started < 2.5 and "envelope_id" in ack
    await fake.socket_send(envelope, retry_attempt=1, retry_reason="timeout")  # redelivered
    await slack.settle()
    posted = fake.posted(SUPPORT, thread_ts=envelope["event"]["ts"])
    assert texts(posted)[1] == "Noted: over the socket" and len(posted) == 3

    action = slack.events.block_actions(CUSTOMER, posted[-1], "hl_rate_4", channel=SUPPORT)
    await fake.socket_send(action, kind="interactive")
    await eventually(lambda: _rated(slack, envelope["event"]["ts"]))


async def _rated(slack: SlackHarness, root: str) -> bool:
    conv = await slack.conv(SUPPORT, root)
    return any(r.kind == "rating" for r in await slack.store.messages(conv.id))
