"""The ASGI application: Starlette on uvicorn, WebSockets by the ``websockets`` library.

Why Starlette: a small, typed ASGI toolkit with first-class WebSocket routes
and lifespan handling, without FastAPI's dependency-injection layer we would
not use; uvicorn runs it with ``ws="websockets-sansio"``, i.e. the
``websockets`` library's sans-I/O protocol (the same library the web chat
protocol and its tests use).

Routes: ``/healthz`` (alive), ``/readyz`` (store reachable, flows loaded),
``/metrics`` (Prometheus), the agent console under ``/agent``, and whatever
the channel plugins serve (the web chat under ``/chat``, webhooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from engine.app import App, build_app
from engine.config import Settings
from engine.handoff import HandoffDesk
from engine.metrics import Metrics
from engine.queue_mirror import attach_shared_state
from engine.server.context import ServerContext
from engine.server.plugins import ChannelPlugin, load_plugins

__all__ = ["build_server", "create_app"]

logger = logging.getLogger(__name__)


async def build_server(settings: Settings, *, model: str | None = None,
                       app: App | None = None) -> tuple[ServerContext, list[ChannelPlugin]]:
    metrics = app.engine.metrics if app is not None and app.engine.metrics else Metrics()
    application = app or await build_app(settings, model=model, metrics=metrics)
    metrics.register_flows([f.name for f in application.engine.flows])
    desk = HandoffDesk(application.engine, queue_timeout=settings.handoff_queue_timeout)
    context = ServerContext(settings=settings, app=application, desk=desk, metrics=metrics)
    plugins = load_plugins(context, settings.channels)
    return context, plugins


def create_app(settings: Settings, *, model: str | None = None, app: App | None = None,
               on_ready: Any = None) -> Starlette:
    """The Starlette application. Everything is built in the lifespan (inside the loop)."""
    state: dict[str, Any] = {}

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        context: ServerContext | None = state.get("context")
        if context is None or state.get("stopping"):
            return JSONResponse({"ready": False}, status_code=503)
        try:
            await context.app.store.conversations(limit=1)
        except Exception as exc:  # report, don't crash the probe
            return JSONResponse({"ready": False, "store": type(exc).__name__}, status_code=503)
        return JSONResponse({"ready": True, "flows": [f.name for f in context.engine.flows],
                             "model": context.engine.model.name,
                             "channels": [p.name for p in state.get("plugins", [])]})

    async def metrics(request: Request) -> Response:
        context: ServerContext = state["context"]
        await _refresh_queue_gauges(context)
        body, content_type = context.metrics.render_latest(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    async def index(request: Request) -> Response:
        return RedirectResponse("/chat/")

    @contextlib.asynccontextmanager
    async def lifespan(starlette: Starlette) -> AsyncIterator[None]:
        context, plugins = await build_server(settings, model=model, app=app)
        state["context"] = context
        state["plugins"] = plugins
        starlette.state.context = context
        # Other server processes: the event bus and the queue's Redis mirror (with
        # redis_url; in-process otherwise). Before the console, which subscribes to the bus.
        shared = await attach_shared_state(context.engine, context.desk, settings.redis_url)
        context.extras["bus"] = shared.bus
        for plugin in plugins:
            for route in plugin.routes():
                starlette.router.routes.append(route)
        from engine.server.console import console_routes

        for route in console_routes(context):
            starlette.router.routes.append(route)
        for plugin in plugins:
            await plugin.start()
        expiry = asyncio.create_task(context.desk.run_expiry(), name="handoff-expiry")
        if on_ready is not None:
            on_ready(context)
        try:
            yield
        finally:
            state["stopping"] = True
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
            # Channels close their sockets (1012) and let in-flight turns finish.
            for plugin in reversed(plugins):
                try:
                    await plugin.stop()
                except Exception:
                    logger.exception("stopping channel %s failed", plugin.name)
            await shared.close()  # after the channels: their last turns are still told
            if app is None:
                await context.app.close()

    routes: list[BaseRoute] = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _refresh_queue_gauges(context: ServerContext) -> None:
    items = await context.desk.queue(include_claimed=False)
    oldest = max((i.waiting_seconds for i in items), default=0.0)
    context.metrics.set_handoff_queue(len(items), oldest)
