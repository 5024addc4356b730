"""A live server with the demo agents, logged-in agent clients and a scripted customer.

The server itself is the web channel tests' ``start_live_server`` (uvicorn on
127.0.0.1, port 0, offline model, temporary SQLite). The agents are the ones
in ``deploy/demo.yaml`` (alice and bob, password ``helpline``), hashed with
cheap argon2 parameters to keep logins fast.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin

from engine.config import ROOT, load_settings
from engine.core.types import Inbound, Outbound
from engine.server.console import COOKIE
from engine.store import ConversationKey, ConversationState
from tests.channels.web.conftest import LiveServer, live_settings, start_live_server

DEMO_AGENTS = load_settings(ROOT / "deploy" / "demo.yaml").agents
PASSWORD = "helpline"
#: The demo accounts with cheap hashes: a demo hash costs 0.3 s of CPU per login.
AGENTS = {name: PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
          for name in DEMO_AGENTS}


async def login(base_url: str, name: str, password: str = PASSWORD) -> httpx.AsyncClient:
    """An HTTP client holding ``name``'s session cookie, sending its CSRF token."""
    client = httpx.AsyncClient(base_url=base_url, timeout=10)
    response = await client.post("/agent/api/login", json={"name": name, "password": password})
    assert response.status_code == 200, response.text
    client.headers["x-csrf-token"] = response.json()["csrf"]
    return client


@dataclass
class Console:
    """A running server, its agents and a customer on the ``test`` channel."""

    live: LiveServer
    sent: list[Outbound] = field(default_factory=list)
    clients: list[httpx.AsyncClient] = field(default_factory=list)
    sockets: list[ClientConnection] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def url(self) -> str:
        return self.live.url

    async def agent(self, name: str) -> httpx.AsyncClient:
        client = await login(self.url, name)
        self.clients.append(client)
        return client

    async def socket(self, agent: httpx.AsyncClient | None, *,
                     origin: str | None = None) -> ClientConnection:
        headers = {}
        if agent is not None:
            headers["Cookie"] = f"{COOKIE}={agent.cookies[COOKIE]}"
        ws = await connect(self.url.replace("http", "ws", 1) + "/agent/ws",
                           origin=Origin(origin or self.url), additional_headers=headers,
                           open_timeout=5, close_timeout=2)
        self.sockets.append(ws)
        return ws

    async def say(self, text: str, thread: str = "t1", *, received_at: datetime | None = None,
                  **extra: Any) -> list[Outbound]:
        """A customer message on the ``test`` channel; returns what the customer was sent."""
        before = len(self.sent)
        inbound = Inbound(ConversationKey("test", "shop", thread), text, f"demo:{thread}",
                          received_at or datetime.now(UTC),
                          channel_message_id=f"m{next(self._ids)}", **extra)
        await self.live.context.engine.handle(inbound)
        return self.sent[before:]

    async def conv(self, thread: str = "t1") -> ConversationState:
        conv = await self.live.context.app.store.load(ConversationKey("test", "shop", thread))
        assert conv is not None
        return conv

    async def handoff(self, thread: str = "t1", *, received_at: datetime | None = None) -> str:
        """Refund journey with an order number, then a request for a human."""
        await self.say("I want a refund", thread, received_at=received_at)
        await self.say("HL26110842", thread, received_at=received_at)
        await self.say("I want to talk to a human", thread, received_at=received_at)
        conv = await self.conv(thread)
        assert conv.owner == "pending_human"
        return conv.id


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    live = await start_live_server(live_settings(tmp_path, agents=AGENTS))
    harness = Console(live)

    async def send(message: Outbound) -> None:
        harness.sent.append(message)

    live.context.engine.register_sender("test", send)
    try:
        yield harness
    finally:
        for ws in harness.sockets:
            await ws.close()
        for client in harness.clients:
            await client.aclose()
        await live.stop()


async def next_message(ws: ClientConnection, kind: str, *, timeout: float = 5.0,
                       **match: Any) -> dict[str, Any]:
    """The next console message of type ``kind`` (and matching fields), skipping others."""

    async def find() -> dict[str, Any]:
        while True:
            message: dict[str, Any] = json.loads(await ws.recv())
            if message["type"] == kind and all(message.get(k) == v for k, v in match.items()):
                return message

    return await asyncio.wait_for(find(), timeout)
