"""Slack as the agents' workspace: handoffs as threads in one channel.

Every handoff, from any customer channel (web, Telegram, Slack), is posted to
``settings.slack_agents_channel`` as a thread root with the reason, priority,
summary and entities, and three buttons: Claim, Hand back, Resolve. The
buttons call the same :class:`~engine.handoff.HandoffDesk` as the web console
with the Slack user as the agent (``slack:<user id>``), so the same ownership
rules hold: one owner, the bot muted while a human owns the conversation, and
of two agents claiming at once exactly one wins (the other is told so in an
ephemeral message).

In the thread:

* the customer's messages while a human owns the conversation are mirrored;
* an agent's reply is relayed to the customer on their own channel
  (``desk.reply``: stored, then delivered by that channel's engine sender);
  a reply starting with ``//`` is an internal note instead;
* status changes (claimed, handed back, resolved, timed out) are posted, the
  root is updated, and its buttons go away once the handoff is over;
* replies and notes written in the web console are mirrored too.

Which thread belongs to which conversation survives restarts without a table
of our own: the root carries Slack message metadata
(``event_type: helpline_handoff``, ``event_payload.conversation_id``) and the
buttons carry the conversation id. After a restart the thread of a reply is
read back with ``conversations.replies`` (root and metadata), and the thread of
a conversation by scanning the channel's history once
(``conversations.history`` with ``include_all_metadata``). The same scan runs
at start-up and posts handoffs still waiting in the queue that have no thread
(e.g. Slack was unreachable when they happened). Slack is the store for the
mapping; the conversation log stays the store for everything else.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slack_sdk.web.async_slack_response import AsyncSlackResponse

from channels.slack.convert import ButtonPress, MessageEvent, escape, from_slack
from channels.slack.pacing import SerialWorkers
from engine.core.types import HandoffPacket, TurnOutcome
from engine.handoff import DeskEvent, OwnershipError
from engine.store.base import ConversationState, MessageRecord, Owner

if TYPE_CHECKING:
    from channels.slack.channel import SlackChannel

__all__ = [
    "CLAIM",
    "DESK_ACTION",
    "HANDOFF_EVENT",
    "HAND_BACK",
    "RESOLVE",
    "AgentsWorkspace",
    "Thread",
    "agent_id",
    "handoff_blocks",
]

logger = logging.getLogger(__name__)

#: Message metadata type of a handoff thread's root.
HANDOFF_EVENT = "helpline_handoff"
DESK_ACTION = "hl_desk_"
CLAIM = DESK_ACTION + "claim"
HAND_BACK = DESK_ACTION + "hand_back"
RESOLVE = DESK_ACTION + "resolve"
#: Block ids of the root's parts that change with the conversation's owner.
STATUS_BLOCK = "hl_status"
ACTIONS_BLOCK = "hl_desk"
#: History pages (of 200 messages) read when looking for threads after a restart.
SCAN_PAGES = 10
#: An agent's thread message starting with this is an internal note.
NOTE_PREFIX = "//"

_USER_ID = re.compile(r"^[UW][A-Z0-9]{1,20}$")

_VERBS = {CLAIM: "claim", HAND_BACK: "hand back", RESOLVE: "resolve"}


def agent_id(user: str) -> str:
    """The desk's agent name of a Slack user (what ownership is checked against)."""
    return f"slack:{user}"


def show_agent(agent: str | None) -> str:
    """An agent as mrkdwn: a mention for Slack users, the escaped name otherwise."""
    if agent is None:
        return "nobody"
    user = agent.removeprefix("slack:")
    if agent.startswith("slack:") and _USER_ID.match(user):
        return f"<@{user}>"
    return f"*{escape(agent)}*"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split()) if "\n" not in text else text.strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass(slots=True)
class Thread:
    """A handoff thread: its root's ``ts`` and the root's fixed blocks."""

    conversation_id: str
    ts: str
    blocks: list[dict[str, Any]] = field(default_factory=list)


def handoff_blocks(packet: HandoffPacket, last_message: str | None) -> list[dict[str, Any]]:
    """The fixed part of a handoff root (everything but its status and buttons)."""
    high = packet.priority == "high"
    title = (":rotating_light: *Handoff: high priority*" if high
             else ":raising_hand: *Handoff*")
    lines = [
        title,
        f"*Reason:* {escape(packet.reason)}"
        + (f": {escape(_clip(packet.detail, 300))}" if packet.detail else ""),
        f"*Customer on:* {escape(packet.key.channel)}   *Language:* {escape(packet.language)}"
        f"   *Flow:* {escape(packet.flow or '-')} / {escape(packet.state or '-')}",
    ]
    body = [f"*Summary:* {escape(_clip(packet.summary, 1200)) if packet.summary else '-'}"]
    entities = list(packet.entities.items())[:20]
    if entities:
        body.append("*Entities:*\n" + "\n".join(
            f"• {escape(_clip(str(k), 60))}: {escape(_clip(str(v), 200))}" for k, v in entities))
    else:
        body.append("*Entities:* -")
    if last_message:
        body.append("*Last message:*\n>" + escape(_clip(last_message, 600)).replace("\n", "\n>"))
    return [
        {"type": "section", "block_id": "hl_root_head", "text": {"type": "mrkdwn",
                                                                 "text": "\n".join(lines)}},
        {"type": "section", "block_id": "hl_root_body", "text": {"type": "mrkdwn",
                                                                 "text": "\n".join(body)}},
        {"type": "context", "block_id": "hl_root_id", "elements": [
            {"type": "mrkdwn", "text": f"Conversation `{escape(packet.conversation_id)}`"}]},
    ]


def status_text(owner: Owner, agent: str | None, action: str | None = None,
                detail: Mapping[str, Any] | None = None) -> str:
    if owner == "pending_human":
        return ":hourglass_flowing_sand: Waiting for an agent"
    if owner == "human":
        return f":raised_hand: Claimed by {show_agent(agent)}"
    if owner == "resolved":
        return f":white_check_mark: Resolved by {show_agent(agent)}"
    if action == "timeout":
        ticket = escape(str((detail or {}).get("ticket", "")))
        return f":alarm_clock: No agent in time; back with the bot (callback ticket {ticket})"
    return f":robot_face: Handed back to the bot by {show_agent(agent)}"


def root_blocks(thread: Thread, conversation_id: str, status: str,
                open_: bool) -> list[dict[str, Any]]:
    blocks = [*thread.blocks, {"type": "context", "block_id": STATUS_BLOCK,
                               "elements": [{"type": "mrkdwn", "text": status}]}]
    if open_:
        def button(action_id: str, label: str, style: str | None = None) -> dict[str, Any]:
            element: dict[str, Any] = {"type": "button", "action_id": action_id,
                                       "text": {"type": "plain_text", "text": label},
                                       "value": conversation_id}
            if style:
                element["style"] = style
            return element

        blocks.append({"type": "actions", "block_id": ACTIONS_BLOCK, "elements": [
            button(CLAIM, "Claim", "primary"), button(HAND_BACK, "Hand back"),
            button(RESOLVE, "Resolve", "danger")]})
    return blocks


def _fixed(blocks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(b) for b in blocks if b.get("block_id") not in (STATUS_BLOCK, ACTIONS_BLOCK)]


def _customer_line(record: MessageRecord) -> str | None:
    if record.kind == "rating":
        return f":bust_in_silhouette: *Customer rated* {escape(record.text)}/5"
    if record.text.strip():
        return f":bust_in_silhouette: *Customer:* {escape(_clip(record.text, 2800))}"
    return None


class AgentsWorkspace:
    """Handoff threads in the agents' Slack channel; see the module docstring."""

    def __init__(self, slack: SlackChannel, channel_id: str) -> None:
        self.slack = slack
        self.channel_id = channel_id
        self.desk = slack.context.desk
        self.engine = slack.engine
        self._by_conversation: dict[str, Thread] = {}
        self._by_ts: dict[str, str] = {}
        self._scanned = False
        self._started = slack.engine.clock()
        self.jobs = SerialWorkers("slack-desk")

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._started = self.engine.clock()
        self.engine.subscribe(self.on_event)
        self.jobs.submit("_resync", self.resync)

    async def stop(self, timeout: float = 10.0) -> None:
        self.engine.unsubscribe(self.on_event)
        if not await self.jobs.join(timeout):
            await self.jobs.cancel()

    # -- the thread mapping ----------------------------------------------------------------

    def remember(self, thread: Thread) -> None:
        self._by_conversation[thread.conversation_id] = thread
        self._by_ts[thread.ts] = thread.conversation_id

    async def thread_for(self, conversation_id: str) -> Thread | None:
        """The newest handoff thread of a conversation (scanning history once per process)."""
        thread = self._by_conversation.get(conversation_id)
        if thread is None and not self._scanned:
            await self.scan()
            thread = self._by_conversation.get(conversation_id)
        return thread

    async def conversation_for(self, thread_ts: str) -> str | None:
        """The conversation a thread belongs to (asking Slack for its root if needed)."""
        known = self._by_ts.get(thread_ts)
        if known is not None:
            return known
        data = await self._call(self.slack.client.conversations_replies, channel=self.channel_id,
                                ts=thread_ts, limit=1, include_all_metadata=True)
        messages = data.get("messages") if data else None
        if not messages:
            return None
        thread = self._thread_of(messages[0])
        if thread is None or thread.ts != thread_ts:
            return None
        if thread.conversation_id not in self._by_conversation:
            self.remember(thread)
        else:
            self._by_ts[thread.ts] = thread.conversation_id
        return thread.conversation_id

    def _thread_of(self, message: Mapping[str, Any]) -> Thread | None:
        metadata = message.get("metadata")
        if not isinstance(metadata, Mapping) or metadata.get("event_type") != HANDOFF_EVENT:
            return None
        payload = metadata.get("event_payload")
        conversation_id = payload.get("conversation_id") if isinstance(payload, Mapping) else None
        ts = message.get("ts")
        if not isinstance(conversation_id, str) or not isinstance(ts, str):
            return None
        blocks = message.get("blocks")
        fixed = _fixed([b for b in blocks if isinstance(b, Mapping)]) \
            if isinstance(blocks, list) else []
        return Thread(conversation_id, ts, fixed)

    def forget(self, conversation_id: str) -> None:
        """Drop a finished handoff's thread (a later handoff gets a new one)."""
        thread = self._by_conversation.pop(conversation_id, None)
        if thread is not None:
            self._by_ts.pop(thread.ts, None)

    async def scan(self) -> None:
        """Learn the threads of the channel's recent history (newest thread wins).

        Runs once per process (when the first page could be read): after it,
        every thread this process opens is remembered as it is posted.
        """
        cursor: str | None = None
        found: list[Thread] = []
        for _ in range(SCAN_PAGES):
            args: dict[str, Any] = {"channel": self.channel_id, "limit": 200,
                                    "include_all_metadata": True}
            if cursor:
                args["cursor"] = cursor
            data = await self._call(self.slack.client.conversations_history, **args)
            if data is None:
                break
            self._scanned = True
            for message in data.get("messages") or []:
                thread = self._thread_of(message) if isinstance(message, Mapping) else None
                if thread is not None:
                    found.append(thread)
            cursor = (data.get("response_metadata") or {}).get("next_cursor")
            if not data.get("has_more") or not cursor:
                break
        for thread in reversed(found):  # history is newest first; the newest must win
            if thread.conversation_id in self._by_conversation:
                self._by_ts.setdefault(thread.ts, thread.conversation_id)
            else:
                self.remember(thread)

    async def resync(self) -> None:
        """After a start: learn the threads, post waiting handoffs that have none.

        Only handoffs from before the start: later ones get their thread from
        :meth:`on_event`, and posting them here too could post them twice.
        """
        await self.scan()
        for item in await self.desk.queue():
            if item.conversation_id in self._by_conversation:
                continue
            conv = await self.engine.store.load_by_id(item.conversation_id)
            if conv is None or conv.waiting_since is None or conv.waiting_since >= self._started:
                continue
            meta = conv.results.get("_handoff", {})
            packet = HandoffPacket(
                conversation_id=conv.id, key=conv.key, reason=item.reason,
                priority=item.priority, flow=conv.flow, state=conv.state,
                language=conv.language, summary=conv.summary,
                entities={k: v.get("v") for k, v in conv.entities.items()},
                detail=str(meta.get("detail", "")))
            await self.open_thread(packet, None, conv)

    # -- engine events ---------------------------------------------------------------------

    async def on_event(self, event: Any) -> None:
        """Engine subscriber: queue the Slack work, never wait for Slack here."""
        if isinstance(event, TurnOutcome):
            conv = event.conversation
            if event.handoff is not None:
                packet = event.handoff
                last = next((r.text for r in reversed(event.records)
                             if r.direction == "in" and r.kind == "text"), None)
                self._submit(conv.id, lambda: self.open_thread(packet, last, conv))
            elif event.muted:
                for record in event.records:
                    line = _customer_line(record) if record.direction == "in" else None
                    if line is not None:
                        self._submit(conv.id, self._poster(conv.id, line))
        elif isinstance(event, DeskEvent):
            self._submit(event.conversation.id, lambda: self.on_desk_event(event))

    def _submit(self, conversation_id: str, job: Callable[[], Any]) -> None:
        self.jobs.submit(conversation_id, job)

    def _poster(self, conversation_id: str, text: str) -> Callable[[], Any]:
        async def post() -> None:
            await self.say(conversation_id, text)
        return post

    async def open_thread(self, packet: HandoffPacket, last_message: str | None,
                          conv: ConversationState | None = None) -> Thread | None:
        fixed = handoff_blocks(packet, last_message)
        thread = Thread(packet.conversation_id, "", fixed)
        owner: Owner = conv.owner if conv is not None else "pending_human"
        agent = conv.owner_agent if conv is not None else None
        args = {
            "channel": self.channel_id,
            "text": f"Handoff ({packet.reason}, {packet.priority} priority) from "
                    f"{packet.key.channel}: conversation {packet.conversation_id}",
            "blocks": root_blocks(thread, packet.conversation_id,
                                  status_text(owner, agent), open_=True),
            "metadata": {"event_type": HANDOFF_EVENT,
                         "event_payload": {"conversation_id": packet.conversation_id,
                                           "channel": packet.key.channel}},
            "unfurl_links": False, "unfurl_media": False,
        }
        result = await self.slack.poster.post(args)
        ts = result.get("ts") if result else None
        if not isinstance(ts, str):
            logger.warning("could not post the handoff of %s to Slack", packet.conversation_id)
            return None
        thread.ts = ts
        self.remember(thread)
        return thread

    async def say(self, conversation_id: str, text: str) -> None:
        """Post ``text`` (mrkdwn we built, with foreign parts escaped) in the thread."""
        thread = await self.thread_for(conversation_id)
        if thread is None:
            logger.debug("no Slack thread for conversation %s", conversation_id)
            return
        self.slack.poster.post({"channel": self.channel_id, "thread_ts": thread.ts,
                                "text": text, "unfurl_links": False, "unfurl_media": False})

    async def on_desk_event(self, event: DeskEvent) -> None:
        conv = event.conversation
        if event.action in ("reply", "note"):
            if event.agent and event.agent.startswith("slack:"):
                return  # written in the thread already
            for record in event.records:
                if event.action == "reply" and record.direction == "out":
                    await self.say(conv.id, f":speech_balloon: {show_agent(event.agent)} "
                                            f"(console): {escape(record.text)}")
                elif record.kind == "note":
                    await self.say(conv.id, f":memo: Note by {show_agent(event.agent)}: "
                                            f"{escape(record.text)}")
            return
        status = status_text(conv.owner, event.agent if conv.owner != "human"
                             else conv.owner_agent, event.action, event.data)
        await self.say(conv.id, status)
        thread = await self.thread_for(conv.id)
        if thread is None or not thread.blocks:
            return
        open_ = conv.owner in ("pending_human", "human")
        self.slack.poster.post({"channel": self.channel_id, "ts": thread.ts,
                                "text": f"Handoff: conversation {conv.id}",
                                "blocks": root_blocks(thread, conv.id, status, open_)},
                               method="chat.update")
        if not open_:
            self.forget(conv.id)

    # -- Slack in --------------------------------------------------------------------------

    async def on_press(self, press: ButtonPress) -> None:
        """Claim / Hand back / Resolve pressed on a thread root."""
        conversation_id = press.value
        if conversation_id not in self._by_conversation and press.blocks:
            # Learned from the press itself (after a restart): the root and its blocks.
            self.remember(Thread(conversation_id, press.message_ts, _fixed(press.blocks)))
        agent = agent_id(press.user)
        try:
            if press.action_id == CLAIM:
                await self.desk.claim(conversation_id, agent)
            elif press.action_id == HAND_BACK:
                await self.desk.hand_back(conversation_id, agent)
            elif press.action_id == RESOLVE:
                await self.desk.resolve(conversation_id, agent)
        except OwnershipError as exc:
            verb = _VERBS.get(press.action_id, "do that")
            await self.tell(press.user, press.message_ts, f"You can't {verb} this conversation: "
                                                          f"{escape(exc.reason)}.")

    async def on_agent_message(self, message: MessageEvent) -> None:
        """A person wrote in the agents' channel: in a handoff thread it goes to the customer."""
        if not message.in_thread or message.thread_ts is None:
            return  # top-level chatter between agents
        conversation_id = await self.conversation_for(message.thread_ts)
        if conversation_id is None:
            return
        text = from_slack(message.text).strip()
        agent = agent_id(message.user)
        try:
            if text.startswith(NOTE_PREFIX):
                await self.desk.note(conversation_id, agent, text.removeprefix(NOTE_PREFIX))
            else:
                await self.desk.reply(conversation_id, agent, text)
        except OwnershipError as exc:
            await self.tell(message.user, message.thread_ts,
                            f"Not sent to the customer: {escape(exc.reason)}.")

    async def tell(self, user: str, thread_ts: str, text: str) -> None:
        """An ephemeral message only ``user`` sees, in the thread."""
        await self._call(self.slack.client.chat_postEphemeral, channel=self.channel_id,
                         user=user, thread_ts=thread_ts, text=text)

    @staticmethod
    async def _call(method: Callable[..., Awaitable[AsyncSlackResponse]],
                    **args: Any) -> dict[str, Any] | None:
        """A Web API read or an ephemeral message; failures are logged, never raised."""
        try:
            response = await method(**args)
        except Exception as exc:  # Slack unreachable or ok:false; the desk state is unaffected
            logger.warning("slack %s failed: %s", getattr(method, "__name__", method), exc)
            return None
        data = response.data
        return data if isinstance(data, dict) else None
