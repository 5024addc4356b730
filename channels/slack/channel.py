"""The Slack channel: a slack-bolt ``AsyncApp`` around the engine.

Requests arrive over HTTP (Events API, ``POST /slack/events``) or a Socket
Mode connection; both go through the same bolt app, which verifies the v0
signature (HTTP), answers ``url_verification`` and calls ``auth.test`` once to
learn the bot's own ids (its messages are ignored).

Verify, de-duplicate, ack, then process: the listeners only parse the
payload, drop a redelivered ``event_id`` (Slack retries after 3 s without an
answer, and bolt itself does not de-duplicate), queue the turn and return, so
Slack gets its 200 in milliseconds however slow the model is. The turn runs
afterwards, one at a time per conversation in arrival order; the store's
unique ``(channel, channel_message_id)`` drops a redelivery that reaches
another process or arrives after a restart.

Replies go out through the engine sender registered for ``slack``: converted
to mrkdwn, escaped, split at 3,000 characters, quick replies and the rating
as Block Kit buttons, and posted into the conversation's thread by a
:class:`~channels.slack.pacing.ChannelPoster` (in order, about one message per
second per channel, 429s retried after ``Retry-After`` by the SDK).

With ``slack_agents_channel`` set, the same app also runs the agents'
workspace (:mod:`channels.slack.workspace`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from channels.slack.convert import (
    ACTION_PREFIX,
    CHANNEL,
    ButtonPress,
    chosen_blocks,
    inbound_from_message,
    inbound_from_press,
    message_payloads,
    parse_button_press,
    parse_message_event,
)
from channels.slack.pacing import ChannelPoster, SerialWorkers
from channels.slack.workspace import DESK_ACTION, AgentsWorkspace
from engine.core.types import Inbound, Outbound

if TYPE_CHECKING:
    from pydantic import SecretStr

    from engine.server.context import ServerContext

__all__ = ["DEFAULT_API_BASE", "EVENTS_PATH", "SlackChannel", "make_client"]

logger = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://slack.com/api/"
EVENTS_PATH = "/slack/events"
#: Event ids remembered to drop redeliveries before they reach the store.
SEEN_EVENTS = 10_000
#: Seconds :meth:`SlackChannel.stop` waits for turns in flight and queued messages.
STOP_TIMEOUT = 20.0
#: Larger request bodies are refused (Slack's are a few kilobytes).
MAX_BODY = 1 << 20


def make_client(token: str, base_url: str | None = None) -> AsyncWebClient:
    """A Web API client that also retries 429 after ``Retry-After`` (opt-in in slack_sdk)."""
    return AsyncWebClient(token=token, base_url=base_url or DEFAULT_API_BASE, timeout=10,
                          retry_handlers=[AsyncConnectionErrorRetryHandler(),
                                          AsyncRateLimitErrorRetryHandler(max_retry_count=3)])


class SlackChannel:
    """The ``slack`` channel plugin; see the module docstring.

    Args:
        context: the server's shared parts.
        rate: messages per second per Slack channel (Slack's limit is about 1).
        link_domains: domains whose Markdown links are kept as links (default:
            the host of ``settings.public_url``).
    """

    name = CHANNEL

    def __init__(self, context: ServerContext, *, rate: float = 1.0,
                 link_domains: tuple[str, ...] | None = None) -> None:
        settings = context.settings
        if settings.slack_bot_token is None:
            raise ValueError("the Slack channel needs slack_bot_token")
        self.context = context
        self.engine = context.app.engine
        self.mode = settings.slack_mode
        self.client = make_client(settings.slack_bot_token.get_secret_value(),
                                  settings.slack_api_base)
        events = self.mode == "events"
        self.app = AsyncApp(
            client=self.client,
            signing_secret=_secret(settings.slack_signing_secret) if events else None,
            request_verification_enabled=events,
            # The listeners only queue work, so running them before the response
            # keeps "200 sent" meaning "the turn is queued".
            process_before_response=True,
            ignoring_self_events_enabled=True,
            logger=logging.getLogger("channels.slack.bolt"),
        )
        self.poster = ChannelPoster(self.client, rate=rate)
        self.turns = SerialWorkers("slack-turn")
        if link_domains is None:
            host = urlsplit(settings.public_url).hostname if settings.public_url else None
            link_domains = (host,) if host else ()
        self.link_domains = link_domains
        self.workspace = (AgentsWorkspace(self, settings.slack_agents_channel)
                          if settings.slack_agents_channel else None)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._http = AsyncSlackRequestHandler(self.app)
        self._socket: Any = None
        self._connecting: asyncio.Task[None] | None = None
        self.stopping = False
        self.app.event("message")(self._on_message)
        self.app.event("app_mention")(self._ignore)  # the message event carries the text
        self.app.action(re.compile("^" + re.escape(ACTION_PREFIX)))(self._on_action)
        context.extras[CHANNEL] = self

    # -- plugin protocol -------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        if self.mode != "events":
            return []
        return [Route(EVENTS_PATH, self.events_endpoint, methods=["POST"])]

    async def start(self) -> None:
        self.engine.register_sender(CHANNEL, self.send_outbound)
        if self.workspace is not None:
            await self.workspace.start()
        if self.mode == "socket":
            from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

            # Built inside the loop: the client opens an aiohttp session and tasks.
            self._socket = AsyncSocketModeHandler(
                self.app, _secret(self.context.settings.slack_app_token))
            # In the background: the client retries until Slack answers, and the
            # server must not wait for that to come up.
            self._connecting = asyncio.create_task(self._socket.connect_async(),
                                                   name="slack-socket-connect")

    async def stop(self) -> None:
        """Stop taking events, let queued turns and messages finish, then close."""
        self.stopping = True
        if self._socket is not None:
            if self._connecting is not None and not self._connecting.done():
                self._connecting.cancel()
            await self._socket.close_async()
        if not await self.turns.join(STOP_TIMEOUT):
            logger.warning("slack turns still running at shutdown; cancelled")
            await self.turns.cancel()
        if self.workspace is not None:
            await self.workspace.stop()
        await self.poster.close(STOP_TIMEOUT)

    # -- HTTP (Events API and interactivity) -------------------------------------------------

    async def events_endpoint(self, request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return JSONResponse({"error": "payload_too_large"}, status_code=413)
        if self.stopping:
            # Slack retries a 5xx; another instance (or this one restarted) answers.
            return JSONResponse({"error": "restarting"}, status_code=503)
        return await self._http.handle(request)

    # -- listeners (only parse and queue: this is the ack path) --------------------------------

    async def _ignore(self) -> None:
        return None

    async def _on_message(self, body: dict[str, Any], context: AsyncBoltContext) -> None:
        message = parse_message_event(body, bot_user_id=context.bot_user_id)
        if message is None or not self._first_delivery(message.event_id):
            return
        workspace = self.workspace
        if workspace is not None and message.channel == workspace.channel_id:
            self.turns.submit(f"agents:{message.root}",
                              partial(workspace.on_agent_message, message))
            return
        inbound = inbound_from_message(message, datetime.now(UTC),
                                       demo=self.context.settings.slack_demo_customers)
        self.turns.submit(str(inbound.key), partial(self._turn, inbound))

    async def _on_action(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        press = parse_button_press(body)
        if press is None:
            return
        workspace = self.workspace
        if press.action_id.startswith(DESK_ACTION):
            if workspace is not None and press.channel == workspace.channel_id:
                self.turns.submit(f"desk:{press.message_ts}", partial(workspace.on_press, press))
            return
        inbound = inbound_from_press(press, datetime.now(UTC),
                                     demo=self.context.settings.slack_demo_customers)
        if inbound is None or inbound.channel_message_id is None:
            return
        if not self._first_delivery(inbound.channel_message_id):
            return
        self.turns.submit(str(inbound.key), partial(self._press_turn, inbound, press))

    def _first_delivery(self, event_id: str) -> bool:
        """False for an id seen recently (a retry, a double click)."""
        if event_id in self._seen:
            self._seen.move_to_end(event_id)
            if self.context.metrics is not None:
                self.context.metrics.count_turn(None, CHANNEL, "duplicate")
            return False
        self._seen[event_id] = None
        while len(self._seen) > SEEN_EVENTS:
            self._seen.popitem(last=False)
        return True

    # -- turns -----------------------------------------------------------------------------

    async def _turn(self, inbound: Inbound) -> None:
        try:
            await self.engine.handle(inbound)
        except Exception:
            logger.exception("slack turn failed (conversation %s)", inbound.key)

    async def _press_turn(self, inbound: Inbound, press: ButtonPress) -> None:
        if press.blocks:  # show the choice in place of the buttons
            self.poster.post({"channel": press.channel, "ts": press.message_ts,
                              "text": press.text or inbound.text,
                              "blocks": chosen_blocks(press)}, method="chat.update")
        await self._turn(inbound)

    # -- the engine sender -----------------------------------------------------------------

    async def send_outbound(self, out: Outbound) -> None:
        """Queue one outbound message (bot or agent) for its thread; returns at once."""
        try:
            payloads = message_payloads(out, allowed_domains=self.link_domains)
        except ValueError:
            logger.warning("not a Slack conversation key: %s", out.key)
            return
        for payload in payloads:
            self.poster.post(payload)

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait for queued turns and messages (tests and shutdown)."""
        turns = await self.turns.join(timeout)
        desk = await self.workspace.jobs.join(timeout) if self.workspace else True
        return turns and desk and await self.poster.flush(timeout)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
