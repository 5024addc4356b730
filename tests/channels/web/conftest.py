"""A real server for channel tests: uvicorn (websockets-sansio) on 127.0.0.1, port 0.

``live_server`` starts ``engine.server.app.create_app(settings, model="offline")``
on a temporary SQLite file and yields a :class:`LiveServer` (base URL, socket
URL, the :class:`~engine.server.context.ServerContext`). Override settings with
``@pytest.mark.live_settings(allowed_origins=[...])``; start more servers
(e.g. a restart on the same database) with ``live_server_factory``::

    async def test_x(live_server_factory):
        first = await live_server_factory(secret_key="k")
        await first.stop()
        second = await live_server_factory(database_url=first.settings.database_url)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from engine.config import Settings
from engine.server.app import create_app
from engine.server.context import ServerContext

TEST_SECRET = "test-secret-key-for-web-chat"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "live_settings(**overrides): Settings overrides for the live_server fixture")


class _Server(uvicorn.Server):
    """uvicorn without signal handlers (the test runner owns them)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class LiveServer:
    url: str
    ws_url: str
    context: ServerContext
    settings: Settings
    server: uvicorn.Server
    task: asyncio.Task[None]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def channel(self) -> Any:
        """The web channel plugin (``channels.web.plugin.WebChannel``)."""
        return self.context.extras["web"]

    async def stop(self) -> None:
        """Graceful shutdown, as on SIGTERM: open sockets get 1012, turns finish."""
        if self.task.done():
            return
        self.server.should_exit = True
        await asyncio.wait_for(asyncio.shield(self.task), 20)


def live_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'helpline.db'}",
        "shop_database_path": None,
        "secret_key": TEST_SECRET,
        "model": "offline",
        "host": "127.0.0.1",
        "port": 0,
    }
    values.update(overrides)
    return Settings(**values)


async def start_live_server(settings: Settings, *, model: str = "offline") -> LiveServer:
    """Start a server (``settings.port``; 0 picks a free one) and wait until it is ready."""
    ready: asyncio.Future[ServerContext] = asyncio.get_running_loop().create_future()

    def on_ready(context: ServerContext) -> None:
        if not ready.done():
            ready.set_result(context)

    app = create_app(settings, model=model, on_ready=on_ready)
    config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, ws="websockets-sansio",
                            lifespan="on", log_config=None, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=10)
    server = _Server(config)
    task = asyncio.create_task(server.serve(), name="live-server")
    while not server.started:
        if task.done():  # startup failed: surface the error
            task.result()
            raise RuntimeError("the live server stopped during start-up")
        await asyncio.sleep(0.01)
    context = await asyncio.wait_for(ready, 10)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(url=f"http://127.0.0.1:{port}", ws_url=f"ws://127.0.0.1:{port}/chat/ws",
                      context=context, settings=settings, server=server, task=task)


LiveServerFactory = Callable[..., Awaitable[LiveServer]]


@pytest.fixture
async def live_server_factory(tmp_path: Path) -> AsyncIterator[LiveServerFactory]:
    """Start servers with ``await factory(**settings_overrides)``; all stop after the test."""
    started: list[LiveServer] = []

    async def factory(**overrides: Any) -> LiveServer:
        live = await start_live_server(live_settings(tmp_path, **overrides))
        started.append(live)
        return live

    try:
        yield factory
    finally:
        for live in reversed(started):
            await live.stop()


@pytest.fixture
async def live_server(request: pytest.FixtureRequest,
                      live_server_factory: LiveServerFactory) -> LiveServer:
    """One running server (settings from ``@pytest.mark.live_settings(...)``, if any)."""
    marker = request.node.get_closest_marker("live_settings")
    overrides = dict(marker.kwargs) if marker is not None else {}
    return await live_server_factory(**overrides)
