"""The async engine: drives the sans-I/O turn core and does its I/O.

``Engine.handle(inbound)``: drop redeliveries -> take the conversation's lock
(turns of one conversation run one at a time, in arrival order) -> load ->
redact -> run the core, answering its needs with the model and the actions
-> persist everything in one commit -> return the outbound messages for the
channel to send.

The engine never imports a channel; channels call ``handle`` and send what it
returns, and subscribers (the server, the agent console) get outbound messages
and handoffs through :meth:`Engine.subscribe`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from engine.actions import ActionRegistry
from engine.core.turn import new_conversation, run_turn
from engine.core.types import (
    ActionNeed,
    ActionOutcome,
    DecideNeed,
    Inbound,
    Outbound,
    RouteNeed,
    TurnOutcome,
)
from engine.errors import (
    ActionError,
    DuplicateMessageError,
    ModelError,
    VersionConflictError,
)
from engine.flow.compiled import FlowSet
from engine.models.base import Decision, DecisionRequest, HistoryItem, Model, RouteDecision
from engine.store.base import ConversationState, Store, TurnWrite

__all__ = ["Engine", "KeyedLocks", "PrivacyStep", "TurnResult"]

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class PrivacyStep(Protocol):
    """Redacts customer text for the model and makes model output safe to send."""

    def redact(self, text: str, conv: ConversationState) -> str: ...

    def restore_entities(self, entities: Mapping[str, Any],
                         conv: ConversationState) -> dict[str, Any]: ...

    def filter_reply(self, text: str, conv: ConversationState) -> str: ...


@dataclass(slots=True)
class TurnResult:
    conversation_id: str
    outbound: list[Outbound] = field(default_factory=list)
    duplicate: bool = False
    outcome: TurnOutcome | None = None


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it.

    asyncio.Lock wakes waiters in FIFO order, which is what keeps a
    conversation's turns in arrival order.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, key: str) -> None:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_user(key)
            raise

    def release(self, key: str) -> None:
        lock, _ = self._locks[key]
        lock.release()
        self._release_user(key)

    def _release_user(self, key: str) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


#: Receives every committed change: a TurnOutcome, or a handoff.DeskEvent.
Subscriber = Callable[[Any], Awaitable[None]]
#: Delivers one outbound message on its channel (registered per channel name).
Sender = Callable[[Outbound], Awaitable[None]]


class Engine:
    """Runs turns; see the module docstring."""

    def __init__(
        self,
        flows: FlowSet,
        store: Store,
        model: Model,
        actions: ActionRegistry,
        *,
        fallback: Model | None = None,
        privacy: PrivacyStep | None = None,
        history_turns: int = 12,
        clock: Callable[[], datetime] = utcnow,
        max_retries_on_conflict: int = 2,
    ) -> None:
        self.flows = flows
        self.store = store
        self.model = model
        self.fallback = fallback
        self.actions = actions
        self.privacy = privacy
        self.history_turns = history_turns
        self.clock = clock
        self.max_retries_on_conflict = max_retries_on_conflict
        self._locks = KeyedLocks()
        self._action_table: Mapping[str, Any] = {n: actions.get(n) for n in actions}
        self._subscribers: list[Subscriber] = []
        self._senders: dict[str, Sender] = {}
        self.stats: dict[str, int] = {"turns": 0, "duplicates": 0, "fallbacks": 0,
                                      "conflicts": 0}

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber(event)`` after every committed turn or desk action."""
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    def register_sender(self, channel: str, sender: Sender) -> None:
        """Route outbound messages of ``channel`` conversations to ``sender``.

        Channels register themselves at start-up; the engine never imports one.
        """
        self._senders[channel] = sender

    async def publish(self, event: Any) -> None:
        for subscriber in list(self._subscribers):
            try:
                await subscriber(event)
            except Exception:  # a broken subscriber must not lose the turn
                logger.exception("subscriber failed")

    async def deliver(self, outbound: list[Outbound] | tuple[Outbound, ...]) -> None:
        """Send messages through their channel's registered sender, in order."""
        for message in outbound:
            sender = self._senders.get(message.key.channel)
            if sender is None:
                logger.debug("no sender for channel %s", message.key.channel)
                continue
            try:
                await sender(message)
            except Exception:  # stored already; the channel retries or resyncs
                logger.exception("sending on %s failed", message.key.channel)

    async def handle(self, inbound: Inbound, *, deliver: bool = True) -> TurnResult:
        """Process one inbound event.

        The replies are sent through the channel's registered sender (if any)
        after the turn is committed, and also returned.
        """
        if inbound.channel_message_id is not None and await self.store.seen(
            inbound.key.channel, inbound.channel_message_id
        ):
            self.stats["duplicates"] += 1
            return TurnResult("", duplicate=True)
        lock_key = str(inbound.key)
        await self._locks.acquire(lock_key)
        try:
            return await self._handle_locked(inbound, deliver)
        finally:
            self._locks.release(lock_key)

    async def _handle_locked(self, inbound: Inbound, deliver: bool) -> TurnResult:
        for attempt in range(self.max_retries_on_conflict + 1):
            conv = await self.store.load(inbound.key)
            if conv is None:
                conv = new_conversation(inbound.key, inbound.received_at)
            turn_inbound = inbound
            if self.privacy is not None and inbound.model_text is None:
                turn_inbound = replace(inbound, model_text=self.privacy.redact(inbound.text, conv))
            outcome = await self.run_core(conv, turn_inbound)
            write = TurnWrite(conversation=outcome.conversation,
                              expected_version=outcome.expected_version,
                              messages=outcome.records, entity_changes=outcome.entity_changes)
            try:
                await self.store.commit_turn(write)
            except DuplicateMessageError:
                # Lost a race with another process that stored the same delivery.
                self.stats["duplicates"] += 1
                return TurnResult(conv.id, duplicate=True)
            except VersionConflictError:
                # Another process wrote this conversation meanwhile; re-run on fresh state.
                self.stats["conflicts"] += 1
                if attempt == self.max_retries_on_conflict:
                    raise
                continue
            self.stats["turns"] += 1
            if deliver:
                await self.deliver(outcome.outbound)
            await self.publish(outcome)
            return TurnResult(conv.id, outcome.outbound, outcome=outcome)
        raise AssertionError("unreachable")  # pragma: no cover

    async def run_core(self, conv: ConversationState, inbound: Inbound) -> TurnOutcome:
        """Drive the turn core for one event, answering its needs."""
        gen = run_turn(self.flows, conv, inbound, self._action_table)
        answer: Any = None
        try:
            while True:
                need = gen.send(answer)
                if isinstance(need, DecideNeed):
                    answer = await self.decide(need.request, conv)
                elif isinstance(need, RouteNeed):
                    answer = await self.route(need)
                elif isinstance(need, ActionNeed):
                    answer = await self.act(need)
                else:  # pragma: no cover - the core yields nothing else
                    raise TypeError(f"unknown need {need!r}")
        except StopIteration as stop:
            outcome: TurnOutcome = stop.value
            return outcome

    async def decide(self, request: DecisionRequest, conv: ConversationState) -> Decision:
        wants = getattr(self.model, "history_turns", 0)
        if wants:
            request = replace(request, history=await self.history(request.conversation_id,
                                                                  min(wants, self.history_turns)))
        try:
            decision = await self.model.decide(request)
        except ModelError as exc:
            if self.fallback is None:
                raise
            self.stats["fallbacks"] += 1
            logger.warning("model %s failed (%s); using %s", self.model.name, exc,
                           self.fallback.name)
            decision = await self.fallback.decide(request)
        if self.privacy is not None:
            entities = self.privacy.restore_entities(decision.entities, conv)
            reply = (self.privacy.filter_reply(decision.reply, conv)
                     if decision.reply else decision.reply)
            decision = replace(decision, entities=entities, reply=reply)
        return decision

    async def route(self, need: RouteNeed) -> RouteDecision:
        try:
            return await self.model.route(need.request)
        except ModelError:
            if self.fallback is None:
                raise
            self.stats["fallbacks"] += 1
            return await self.fallback.route(need.request)

    async def act(self, need: ActionNeed) -> ActionOutcome:
        started = time.perf_counter()
        try:
            result = await need.action.fn(need.context)
        except ActionError as exc:
            return ActionOutcome(error=exc)
        except Exception as exc:  # actions are user code; never let one kill the turn
            logger.exception("action %s failed", need.action.name)
            return ActionOutcome(error=ActionError(need.action.name, type(exc).__name__))
        finally:
            logger.debug("action %s took %.1f ms", need.action.name,
                         (time.perf_counter() - started) * 1000)
        return ActionOutcome(result=result)

    async def history(self, conversation_id: str, turns: int) -> list[HistoryItem]:
        if not conversation_id:
            return []
        records = await self.store.messages(conversation_id)
        items: list[HistoryItem] = []
        for r in records:
            if r.direction == "in" and r.kind == "text":
                items.append(HistoryItem("customer", r.text))
            elif r.direction == "out":
                items.append(HistoryItem("agent" if r.author.startswith("agent") else "bot",
                                         r.text))
        return items[-turns:]
