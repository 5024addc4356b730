"""Human handoff: conversation ownership, the queue, and what agents can do.

Ownership is its own small state machine, separate from the flow's::

    bot ──handoff──▶ pending_human ──claim──▶ human ──hand_back──▶ bot
                         │   ▲                  │
                         │   └──────────────────┼──(nothing)
                         ├──timeout──▶ bot      └──resolve──▶ resolved
                         └──resolve──▶ resolved

While a human owns a conversation (``pending_human`` or ``human``) the bot
is muted: customer messages are stored and shown to the agent, never
answered by the model. Every change goes through the store's optimistic
version check under the conversation's lock, so of two agents claiming at
once exactly one wins, also across server processes. The queue is the
store itself (SQL is the truth), so it survives restarts.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from engine.core.types import Outbound
from engine.errors import HelplineError, VersionConflictError
from engine.i18n import pick
from engine.store.base import ConversationState, MessageRecord, Owner, TurnWrite

if TYPE_CHECKING:
    from engine.queue_mirror import QueueMirror

__all__ = ["DeskEvent", "HandoffDesk", "OwnershipError", "QueueItem", "can_move"]

logger = logging.getLogger(__name__)

DeskAction = Literal["claim", "reply", "note", "hand_back", "resolve", "timeout"]

#: Allowed ownership moves: (from, action) -> to.
MOVES: dict[tuple[Owner, str], Owner] = {
    ("bot", "handoff"): "pending_human",
    ("pending_human", "claim"): "human",
    ("pending_human", "timeout"): "bot",
    ("pending_human", "resolve"): "resolved",
    ("human", "hand_back"): "bot",
    ("human", "resolve"): "resolved",
}


def can_move(owner: Owner, action: str) -> Owner | None:
    """The owner after ``action``, or None if the ownership machine forbids it."""
    return MOVES.get((owner, action))


class OwnershipError(HelplineError):
    """An agent action the conversation's ownership does not allow."""

    def __init__(self, conversation_id: str, action: str, reason: str) -> None:
        self.conversation_id = conversation_id
        self.action = action
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"cannot {self.action} conversation {self.conversation_id}: {self.reason}"


@dataclass(frozen=True, slots=True)
class QueueItem:
    conversation_id: str
    channel: str
    reason: str
    priority: str
    language: str
    flow: str | None
    waiting_seconds: float
    owner: Owner
    owner_agent: str | None
    preview: str = ""


@dataclass(frozen=True, slots=True)
class DeskEvent:
    """Published to engine subscribers after every committed desk action."""

    action: DeskAction
    conversation: ConversationState
    agent: str | None
    outbound: Sequence[Outbound] = ()
    records: Sequence[MessageRecord] = ()
    data: dict[str, Any] = field(default_factory=dict)


_TEXTS = {
    "handback": {"en": "Thanks for your patience! I'm the AI assistant again; "
                       "let me know if there's anything else.",
                 "zh": "感谢您的耐心等待！现在由 AI 助手继续为您服务，还有什么可以帮您？"},
    "timeout": {"en": "I'm sorry, all our colleagues are busy right now. I've created "
                      "callback ticket {ticket}: a colleague will contact you within one "
                      "working day. In the meantime I'm happy to keep helping.",
                "zh": "非常抱歉，目前客服同事都在忙。已为您创建回电工单 {ticket}，"
                      "客服会在一个工作日内联系您。在此期间我可以继续为您服务。"},
    "resolved": {"en": "Your conversation has been marked as resolved. "
                       "Thank you for contacting us!",
                 "zh": "本次会话已处理完毕，感谢您的联系！"},
}


class HandoffDesk:
    """Agent operations on conversations; all changes are versioned commits."""

    def __init__(self, engine: Any, *, queue_timeout: float = 600.0) -> None:
        # ``engine`` is an engine.runner.Engine (typed loosely to avoid an import cycle).
        self.engine = engine
        self.store = engine.store
        self.queue_timeout = queue_timeout

    # -- reading ---------------------------------------------------------------

    #: The queue's Redis mirror (engine/queue_mirror.py), attached by the server when
    #: ``redis_url`` is set; None reads SQL.
    mirror: QueueMirror | None = None

    async def queue(self, *, include_claimed: bool = True) -> list[QueueItem]:
        """Conversations waiting for or owned by a human, oldest first.

        Read from the Redis mirror when one is attached and answers; from SQL
        (the truth) otherwise, also on any Redis error.
        """
        now = self.engine.clock()
        if self.mirror is not None:
            try:
                mirrored = await self.mirror.queue(now, include_claimed=include_claimed)
            except Exception:  # the mirror is a cache: never fail a read because of it
                logger.exception("handoff queue mirror failed; reading SQL")
                mirrored = None
            if mirrored is not None:
                return mirrored
        rows = await self.store.conversations(owner="pending_human", limit=500)
        if include_claimed:
            rows += await self.store.conversations(owner="human", limit=500)
        items = []
        for conv in rows:
            since = conv.waiting_since or conv.updated_at
            meta = conv.results.get("_handoff", {})
            items.append(QueueItem(
                conversation_id=conv.id, channel=conv.key.channel,
                reason=conv.handoff_reason or "request",
                priority=str(meta.get("priority", "normal")), language=conv.language,
                flow=conv.flow, waiting_seconds=max(0.0, (now - since).total_seconds()),
                owner=conv.owner, owner_agent=conv.owner_agent,
                preview=str(meta.get("detail", "")),
            ))
        items.sort(key=lambda i: (i.owner != "pending_human", i.priority != "high",
                                  -i.waiting_seconds))
        return items

    # -- acting ----------------------------------------------------------------

    async def claim(self, conversation_id: str, agent: str) -> ConversationState:
        """Take a waiting conversation. Exactly one of simultaneous claims wins."""
        def change(conv: ConversationState) -> None:
            self._move(conv, "claim")
            conv.owner_agent = agent

        event = await self._apply(conversation_id, agent, "claim", change,
                                  event_text=f"claimed by {agent}")
        return event.conversation

    async def reply(self, conversation_id: str, agent: str, text: str) -> Outbound:
        """Send the agent's message to the customer's channel."""
        text = text.strip()
        if not text:
            raise OwnershipError(conversation_id, "reply", "the message is empty")

        def change(conv: ConversationState) -> None:
            self._require_owner(conv, agent, "reply")

        event = await self._apply(conversation_id, agent, "reply", change,
                                  say=text, author=f"agent:{agent}", kind="agent")
        return event.outbound[0]

    async def note(self, conversation_id: str, agent: str, text: str) -> None:
        """An internal note: stored and shown to agents, never sent to the customer."""
        text = text.strip()
        if not text:
            raise OwnershipError(conversation_id, "note", "the note is empty")

        def change(conv: ConversationState) -> None:
            if conv.owner not in ("pending_human", "human"):
                raise OwnershipError(conversation_id, "note", "no human handoff is open")

        await self._apply(conversation_id, agent, "note", change, note=text)

    async def hand_back(self, conversation_id: str, agent: str, note: str = "") -> None:
        """Give the conversation back to the bot, in the state the handoff left."""
        def change(conv: ConversationState) -> None:
            self._require_owner(conv, agent, "hand_back")
            self._move(conv, "hand_back")
            self._resume(conv, f"agent {agent} handed back" + (f": {note}" if note else ""))

        await self._apply(conversation_id, agent, "hand_back", change,
                          say=self._text("handback"), event_text=f"handed back by {agent}",
                          data={"note": note})

    async def resolve(self, conversation_id: str, agent: str) -> None:
        def change(conv: ConversationState) -> None:
            if conv.owner == "human":
                self._require_owner(conv, agent, "resolve")
            self._move(conv, "resolve")
            conv.owner_agent = agent
            conv.closed = True
            conv.waiting_since = None

        await self._apply(conversation_id, agent, "resolve", change,
                          say=self._text("resolved"), event_text=f"resolved by {agent}")

    async def close(self, conversation_id: str, *, reason: str, detail: str = "") -> bool:
        """Close a conversation the customer can no longer be reached in.

        Used by channels (e.g. the customer blocked the bot): whoever owns it,
        it ends resolved, leaves the agents' queue, and no message is sent.
        Returns False if it was already closed.
        """
        def change(conv: ConversationState) -> None:
            if conv.closed and conv.owner == "resolved":
                raise OwnershipError(conv.id, "close", "already closed")
            conv.owner = "resolved"
            conv.closed = True
            conv.waiting_since = None

        try:
            await self._apply(conversation_id, None, "resolve", change,
                              event_text=detail or f"closed: {reason}",
                              data={"reason": reason})
        except OwnershipError:
            return False
        return True

    async def expire(self) -> list[str]:
        """Hand back conversations that waited longer than the queue timeout."""
        now = self.engine.clock()
        limit = now - timedelta(seconds=self.queue_timeout)
        expired = []
        for conv in await self.store.conversations(owner="pending_human", limit=500):
            if conv.waiting_since is None or conv.waiting_since > limit:
                continue
            ticket = "CB" + secrets.token_hex(4).upper()

            def change(c: ConversationState, ticket: str = ticket) -> None:
                if c.waiting_since is None or c.waiting_since > limit:
                    raise OwnershipError(c.id, "timeout", "no longer over the limit")
                self._move(c, "timeout")
                self._resume(c, f"no agent answered within {int(self.queue_timeout)} s; "
                                f"callback ticket {ticket} created")
                c.results["callback_ticket"] = ticket

            try:
                await self._apply(conv.id, None, "timeout", change,
                                  say=self._text("timeout"), fmt={"ticket": ticket},
                                  event_text="queue timeout", data={"ticket": ticket})
            except OwnershipError:
                continue
            expired.append(conv.id)
        return expired

    async def run_expiry(self, every: float = 5.0) -> None:
        """Background loop: call :meth:`expire` every ``every`` seconds until cancelled."""
        while True:
            try:
                await self.expire()
            except Exception:  # keep the loop alive; the next round retries
                logger.exception("queue expiry failed")
            await asyncio.sleep(every)

    # -- internals -------------------------------------------------------------

    @staticmethod
    def _move(conv: ConversationState, action: str) -> None:
        target = can_move(conv.owner, action)
        if target is None:
            raise OwnershipError(conv.id, action, f"the conversation is owned by {conv.owner}"
                                 + (f" ({conv.owner_agent})" if conv.owner_agent else ""))
        conv.owner = target

    @staticmethod
    def _require_owner(conv: ConversationState, agent: str, action: str) -> None:
        if conv.owner != "human":
            raise OwnershipError(conv.id, action, "claim the conversation first")
        if conv.owner_agent != agent:
            raise OwnershipError(conv.id, action, f"it is owned by {conv.owner_agent}")

    @staticmethod
    def _resume(conv: ConversationState, marker: str) -> None:
        meta = conv.results.pop("_handoff", {})
        resume = meta.get("resume")
        # Back to where the bot was when it handed off; the handoff state
        # itself has nothing to do, so a handoff from routing starts over.
        conv.state = resume if resume else None
        if resume is None:
            conv.flow = None
        conv.owner_agent = None
        conv.handoff_reason = None
        conv.waiting_since = None
        conv.results["handback"] = {"note": marker}
        for name in list(conv.counters):
            if name.startswith(("attempts:", "stuck:")) or name == "low_estimate":
                del conv.counters[name]

    def _text(self, key: str) -> str:
        return key  # resolved per conversation language in _apply

    async def _apply(self, conversation_id: str, agent: str | None, action: DeskAction,
                     change: Any, *, say: str | None = None, author: str = "bot",
                     kind: str = "text", note: str | None = None,
                     event_text: str | None = None, data: dict[str, Any] | None = None,
                     fmt: dict[str, str] | None = None) -> DeskEvent:
        engine = self.engine
        for attempt in range(3):
            conv = await self.store.load_by_id(conversation_id)
            if conv is None:
                raise OwnershipError(conversation_id, action, "no such conversation")
            lock_key = str(conv.key)
            await engine._locks.acquire(lock_key)
            try:
                conv = await self.store.load_by_id(conversation_id)
                assert conv is not None
                expected = conv.version
                change(conv)
                now = engine.clock()
                records: list[MessageRecord] = []
                outbound: list[Outbound] = []

                def add(direction: str, rkind: str, rauthor: str, text: str,
                        rdata: dict[str, Any] | None = None, conv: ConversationState = conv,
                        now: datetime = now,
                        records: list[MessageRecord] = records) -> int:
                    conv.seq += 1
                    records.append(MessageRecord(
                        conversation_id=conv.id, seq=conv.seq, direction=direction,  # type: ignore[arg-type]
                        kind=rkind, author=rauthor, text=text, created_at=now,
                        data=rdata or {}, channel=conv.key.channel))
                    return conv.seq

                if event_text is not None:
                    add("event", "event", f"agent:{agent}" if agent else "system", action,
                        {"detail": event_text, **(data or {})})
                if note is not None:
                    add("event", "note", f"agent:{agent}", note)
                if say is not None:
                    text = say
                    if say in _TEXTS:
                        text = pick(_TEXTS[say], conv.language).format(**(fmt or {}))
                    seq = add("out", "text", author, text, {"kind": kind})
                    outbound.append(Outbound(conversation_id=conv.id, key=conv.key, seq=seq,
                                             text=text, kind=kind, language=conv.language,
                                             author=author))
                conv.updated_at = now
                try:
                    await self.store.commit_turn(TurnWrite(conv, expected, records))
                except VersionConflictError:
                    if attempt == 2:
                        raise
                    continue
            finally:
                engine._locks.release(lock_key)
            event = DeskEvent(action, conv, agent, outbound, records, data or {})
            await engine.deliver(outbound)
            await engine.publish(event)
            return event
        raise AssertionError("unreachable")  # pragma: no cover
