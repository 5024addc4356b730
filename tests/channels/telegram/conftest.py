"""The Helpline server with its Telegram channel, against the fake Bot API, on 127.0.0.1.

:func:`start_server` runs ``engine.server.app.create_app(settings, model="offline")``
under uvicorn with only the Telegram channel, pointed at a :class:`FakeTelegram`
through ``telegram_api_base`` (a demo shop, SQLite in a temporary directory).

Fixtures:

* ``polling_server`` / ``webhook_server``: one server per test module (starting one
  costs about a second), each with its own fake; use them from modules marked
  ``pytestmark = pytest.mark.asyncio(loop_scope="module")``. ``polling_customer`` and
  ``webhook_customer`` give each test a fresh chat; ``fresh_shop`` re-seeds the shop.
* ``telegram_server`` (with ``@pytest.mark.telegram_settings(...)`` overrides) and
  ``customer``: a server of the test's own, for settings the shared ones lack.

:class:`Customer` is one Telegram user talking to the bot: ``say`` pushes a message,
``tap`` a button, and both wait until the server is idle, then return the bot's new
messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvicorn

from channels.telegram.channel import TelegramChannel
from engine.config import Settings
from engine.server.app import create_app
from engine.server.context import ServerContext
from engine.store.base import ConversationKey, ConversationState, MessageRecord
from tests.channels.web.conftest import _Server
from tests.fakes.telegram_api import DEFAULT_TOKEN, Call, FakeTelegram, SentMessage

BOT_ID = int(DEFAULT_TOKEN.split(":")[0])
WEBHOOK_SECRET = "hook-secret_for-tests"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "telegram_settings(**overrides): Settings overrides for telegram_server")


@dataclass
class LiveServer:
    url: str
    context: ServerContext
    settings: Settings
    tg: FakeTelegram
    server: uvicorn.Server
    task: asyncio.Task[None]

    @property
    def channel(self) -> TelegramChannel:
        channel: TelegramChannel = self.context.extras["telegram"]
        return channel

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until every pushed update was taken and handled and all replies were sent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        quiet = 0
        while quiet < 3:  # idle on three checks in a row: nothing is between two steps
            if loop.time() > deadline:
                raise AssertionError(f"not idle after {timeout} s: pending updates "
                                     f"{len(self.tg.pending_updates())}")
            idle = not self.tg.pending_updates() and self.channel.idle()
            quiet = quiet + 1 if idle else 0
            await asyncio.sleep(0.02)

    async def conversation(self, chat: int) -> ConversationState:
        conv = await self.context.app.store.load(ConversationKey("telegram", str(BOT_ID),
                                                                 str(chat)))
        assert conv is not None, f"no conversation for chat {chat}"
        return conv

    async def records(self, chat: int) -> list[MessageRecord]:
        conv = await self.conversation(chat)
        return await self.context.app.store.messages(conv.id)

    async def stop(self) -> None:
        if self.task.done():
            return
        self.server.should_exit = True
        await asyncio.wait_for(asyncio.shield(self.task), 30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_server(tg: FakeTelegram, tmp_path: Path, **overrides: Any) -> LiveServer:
    port = free_port()
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'helpline.db'}",
        "shop_database_path": None,
        "secret_key": "test-secret-key-for-telegram",
        "model": "offline",
        "host": "127.0.0.1",
        "port": port,
        "public_url": f"http://127.0.0.1:{port}",
        "channels": ["telegram"],
        "telegram_token": DEFAULT_TOKEN,
        "telegram_api_base": tg.url,
        "telegram_poll_timeout": 10,
        "telegram_demo_customers": True,
    }
    values.update(overrides)
    settings = Settings(**values)
    ready: asyncio.Future[ServerContext] = asyncio.get_running_loop().create_future()

    def on_ready(context: ServerContext) -> None:
        if not ready.done():
            ready.set_result(context)

    app = create_app(settings, model="offline", on_ready=on_ready)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_config=None,
                            log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10)
    server = _Server(config)
    task = asyncio.create_task(server.serve(), name="telegram-live-server")
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the server stopped during start-up")
        await asyncio.sleep(0.01)
    context = await asyncio.wait_for(ready, 10)
    return LiveServer(f"http://127.0.0.1:{port}", context, settings, tg, server, task)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **overrides: Any) -> AsyncIterator[LiveServer]:
    """A fake Bot API and a server pointed at it; both stop on exit."""
    async with FakeTelegram() as tg:
        live = await start_server(tg, tmp_path, **overrides)
        try:
            yield live
        finally:
            await live.stop()
        assert tg.handler_errors == []


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def polling_server(tmp_path_factory: pytest.TempPathFactory
                         ) -> AsyncIterator[LiveServer]:
    async with running(tmp_path_factory.mktemp("polling")) as live:
        yield live


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def webhook_server(tmp_path_factory: pytest.TempPathFactory
                         ) -> AsyncIterator[LiveServer]:
    async with running(tmp_path_factory.mktemp("webhook"), telegram_mode="webhook",
                       telegram_webhook_secret=WEBHOOK_SECRET) as live:
        yield live


_chats = itertools.count(5_550_001)


@pytest_asyncio.fixture(loop_scope="module")
async def polling_customer(polling_server: LiveServer) -> Customer:
    return Customer(polling_server, next(_chats))


@pytest_asyncio.fixture(loop_scope="module")
async def fresh_shop(polling_server: LiveServer) -> None:
    """The demo shop seeded again (the refund journeys all refund the same order)."""
    await polling_server.context.app.shop.reset()


@pytest_asyncio.fixture(loop_scope="module")
async def webhook_customer(webhook_server: LiveServer) -> Customer:
    return Customer(webhook_server, next(_chats))


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake
        assert fake.handler_errors == []


ServerFactory = Callable[..., Awaitable[LiveServer]]


@pytest.fixture
async def telegram_server_factory(tg: FakeTelegram, tmp_path: Path
                                  ) -> AsyncIterator[ServerFactory]:
    started: list[LiveServer] = []

    async def factory(**overrides: Any) -> LiveServer:
        live = await start_server(tg, tmp_path, **overrides)
        started.append(live)
        return live

    try:
        yield factory
    finally:
        for live in reversed(started):
            await live.stop()


@pytest.fixture
async def telegram_server(request: pytest.FixtureRequest,
                          telegram_server_factory: ServerFactory) -> LiveServer:
    marker = request.node.get_closest_marker("telegram_settings")
    overrides = dict(marker.kwargs) if marker is not None else {}
    return await telegram_server_factory(**overrides)


@dataclass
class Customer:
    """One Telegram user in a private chat with the bot (chat id = user id)."""

    live: LiveServer
    chat: int
    language_code: str = "en"
    #: Callback query ids of this customer's taps.
    taps: list[str] = field(default_factory=list)

    @property
    def tg(self) -> FakeTelegram:
        return self.live.tg

    @property
    def seen(self) -> list[SentMessage]:
        return self.tg.messages(self.chat)

    def calls(self, method: str | None = None) -> list[Call]:
        """The bot's Bot API calls about this chat."""
        return [c for c in self.tg.calls
                if str(c.params.get("chat_id")) == str(self.chat)
                and (method is None or c.method.lower() == method.lower())]

    def all_taps_answered(self) -> bool:
        return all(query in self.tg.answered for query in self.taps)

    async def say(self, text: str) -> list[SentMessage]:
        before = len(self.seen)
        self.tg.push_message(self.chat, text, language_code=self.language_code)
        await self.live.settle()
        return self.seen[before:]

    async def tap(self, button: str | None = None, *, data: str | None = None,
                  message_id: int | None = None) -> list[SentMessage]:
        before = len(self.seen)
        update = self.tg.push_callback(self.chat, data, button=button, message_id=message_id)
        self.taps.append(update["callback_query"]["id"])
        await self.live.settle()
        return self.seen[before:]


@pytest.fixture
def customer(telegram_server: LiveServer) -> Customer:
    return Customer(telegram_server, next(_chats))
