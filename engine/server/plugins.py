"""Channel plugins: how the server gets channels without the engine importing one.

A channel package declares an entry point in the ``helpline.channels`` group
(see ``pyproject.toml``) naming a factory ``make(context) -> ChannelPlugin |
None``; the factory returns None when the channel is not configured (e.g. no
bot token). The entry-point table is the explicit registry.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from engine.server.context import ServerContext

__all__ = ["GROUP", "ChannelPlugin", "load_plugins"]

GROUP = "helpline.channels"
logger = logging.getLogger(__name__)


class ChannelPlugin(Protocol):
    name: str

    def routes(self) -> list[BaseRoute]:
        """HTTP/WebSocket routes the channel serves (webhooks, the web chat socket)."""

    async def start(self) -> None:
        """Start background work (pollers, senders); register the engine sender."""

    async def stop(self) -> None:
        """Stop background work; close open connections (web sockets close with 1012)."""


def load_plugins(context: ServerContext, only: list[str] | None = None) -> list[ChannelPlugin]:
    plugins: list[ChannelPlugin] = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if only is not None and ep.name not in only:
            continue
        factory = ep.load()
        plugin = factory(context)
        if plugin is None:
            logger.info("channel %s is not configured; skipped", ep.name)
            continue
        plugins.append(plugin)
    return plugins
