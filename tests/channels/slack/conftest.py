"""A live server with the Slack channel, pointed at a fake Slack on 127.0.0.1.

``slack`` starts a :class:`~tests.fakes.slack_api.FakeSlack`, then the server
(uvicorn on port 0, offline model, temporary SQLite; the web channel tests'
``start_live_server``) with the Slack settings pointing at it, and yields a
:class:`SlackHarness`: the fake, a signed event sender for ``/slack/events``,
the channel plugin and helpers. Messages are paced at 50 per second per
channel unless a test marks itself ``@pytest.mark.slack_rate(1.0)``.

A test flow (``echo``) is used instead of the demo flows: it notes down the
customer's first message and reads it back (``Noted: {{ note }}``) with the
rating buttons, which is what escaping and rating tests need.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from channels.slack.channel import SlackChannel
from engine.config import ROOT
from engine.core.types import Inbound, Outbound
from engine.store.base import ConversationKey, ConversationState
from tests.channels.web.conftest import LiveServer, live_settings, start_live_server
from tests.fakes.slack_api import BOT_TOKEN, SIGNING_SECRET, TEAM_ID, FakeSlack, SlackEvents

SUPPORT = "C0SUPPORT"
AGENTS = "C0AGENTS"
CUSTOMER = "U0CUSTOMER"

ECHO_FLOW = """\
flow: echo
version: "1.0"
description: Notes something down and reads it back.
start: ask_note
entities:
  note: {type: string, pattern: '.{1,400}', capture: when_asked, ask: "What should I note?"}
handoff: {state: human}
states:
  ask_note:
    collect: [note]
    on:
      done: noted
  noted:
    type: end
    say: "Noted: {{ note }}"
    rating: true
    quick_replies: ["Note another"]
  human:
    type: handoff
    say: "A colleague will take over."
"""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slack_rate(rate): messages per second per channel")
    config.addinivalue_line("markers", "slack_settings(**overrides): Settings overrides")


def echo_flows(tmp_path: Path) -> dict[str, Any]:
    """Settings overrides for the ``echo`` test flow (written under ``tmp_path``)."""
    flows, prompts = tmp_path / "flows", tmp_path / "prompts"
    flows.mkdir(exist_ok=True)
    prompts.mkdir(exist_ok=True)
    (flows / "echo.yaml").write_text(ECHO_FLOW, encoding="utf-8")
    (prompts / "default.j2").write_text((ROOT / "prompts" / "default.j2").read_text("utf-8"),
                                        encoding="utf-8")
    return {"flows_dir": flows, "prompts_dir": prompts}


@dataclass
class SlackHarness:
    """A running server with the Slack channel, its fake Slack and a customer."""

    live: LiveServer
    fake: FakeSlack
    events: SlackEvents
    #: What the recording ``test`` channel sender received (a non-Slack customer).
    sent: list[Outbound] = field(default_factory=list)

    @property
    def slack(self) -> SlackChannel:
        channel: SlackChannel = self.live.context.extras["slack"]
        return channel

    @property
    def store(self) -> Any:
        return self.live.context.app.store

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until every queued turn, desk job and Slack message is done."""
        assert await self.slack.flush(timeout), "slack work did not finish in time"

    async def say(self, text: str, *, user: str = CUSTOMER, channel: str = SUPPORT,
                  thread_ts: str | None = None, settle: bool = True) -> dict[str, Any]:
        """A customer's message event, delivered signed; returns the envelope."""
        envelope = self.events.message(channel, user, text, thread_ts=thread_ts)
        response = await self.events.send(envelope)
        assert response.status_code == 200, response.text
        if settle:
            await self.settle()
        return envelope

    async def conv(self, channel: str, thread_ts: str) -> ConversationState:
        key = ConversationKey("slack", TEAM_ID, f"{channel}:{thread_ts}")
        conv: ConversationState | None = await self.store.load(key)
        assert conv is not None
        return conv

    async def web_customer(self, text: str, thread: str = "w1", **extra: Any) -> list[Outbound]:
        """A message of a customer on another channel (``test``; replies are recorded)."""
        before = len(self.sent)
        inbound = Inbound(ConversationKey("test", "shop", thread), text, f"demo:{thread}",
                          datetime.now(UTC), channel_message_id=f"w-{uuid.uuid4().hex}", **extra)
        await self.live.context.app.engine.handle(inbound)
        await self.settle()
        return self.sent[before:]

    async def wait(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        return await self.fake.wait_for(predicate, timeout)


SlackFactory = Callable[..., Awaitable[SlackHarness]]


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake


@pytest.fixture
async def slack_factory(tmp_path: Path, fake_slack: FakeSlack) -> AsyncIterator[SlackFactory]:
    """Start servers with ``await factory(rate=..., **settings_overrides)``."""
    started: list[LiveServer] = []
    senders: list[SlackEvents] = []

    async def factory(*, rate: float = 50.0, **overrides: Any) -> SlackHarness:
        values: dict[str, Any] = {
            "channels": ["web", "slack"],
            "slack_bot_token": BOT_TOKEN,
            "slack_signing_secret": SIGNING_SECRET,
            "slack_api_base": fake_slack.api_url,
            "slack_agents_channel": AGENTS,
            **echo_flows(tmp_path),
        }
        values.update(overrides)
        live = await start_live_server(live_settings(tmp_path, **values))
        started.append(live)
        slack: SlackChannel = live.context.extras["slack"]
        slack.poster.rate = rate
        harness = SlackHarness(live, fake_slack,
                               SlackEvents(live.url + "/slack/events", SIGNING_SECRET,
                                           fake=fake_slack))

        async def record(message: Outbound) -> None:
            harness.sent.append(message)

        live.context.app.engine.register_sender("test", record)
        senders.append(harness.events)
        return harness

    try:
        yield factory
    finally:
        for live in reversed(started):
            await live.stop()
        for events in senders:
            await events.aclose()


@pytest.fixture
async def slack(request: pytest.FixtureRequest, slack_factory: SlackFactory) -> SlackHarness:
    rate = request.node.get_closest_marker("slack_rate")
    settings = request.node.get_closest_marker("slack_settings")
    return await slack_factory(rate=rate.args[0] if rate else 50.0,
                               **(settings.kwargs if settings else {}))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll an async condition (for store state) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)
