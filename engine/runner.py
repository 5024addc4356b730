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
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
from engine.llm.errors import ModelBusyError, busy_notice, policy_reply
from engine.metrics import Metrics
from engine.models.base import (
    Decision,
    DecisionRequest,
    HistoryItem,
    Model,
    RouteDecision,
    SummaryRequest,
)
from engine.models.offline import OfflineModel
from engine.safety.redaction import ContentPolicyError
from engine.store.base import ConversationState, MessageRecord, Store, TurnWrite
from engine.textnorm import detect_language

__all__ = ["Engine", "KeyedLocks", "PrivacyStep", "TurnResult"]

logger = logging.getLogger(__name__)

#: How many times this turn was already put off because the model layer was busy.
_busy_attempt: contextvars.ContextVar[int] = contextvars.ContextVar("busy_attempt", default=0)


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
    #: The model layer was busy: a notice was sent and the turn will be retried.
    busy: bool = False


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
        metrics: Metrics | None = None,
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
        self.metrics = metrics
        self._summarising: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = {"turns": 0, "duplicates": 0, "fallbacks": 0,
                                      "conflicts": 0, "busy": 0}
        #: A turn put off by a busy model layer is retried this many times, after
        #: ``busy_retry_delay`` x attempt seconds; the last try answers with the fallback.
        self.busy_retries = 3
        self.busy_retry_delay = 1.0

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
        lock_key = str(inbound.key)
        await self._locks.acquire(lock_key)
        try:
            return await self._handle_locked(inbound, deliver)
        except ModelBusyError:
            if _busy_attempt.get() >= self.busy_retries:
                raise  # only without a fallback model: nothing else can answer
            return await self._put_off(inbound)
        finally:
            self._locks.release(lock_key)

    async def _put_off(self, inbound: Inbound) -> TurnResult:
        """The model layer is saturated: tell the customer, retry the turn later.

        Nothing of the turn was stored, so nothing is lost; the retry goes
        through :meth:`handle` again, whose dedupe by channel message id keeps a
        redelivered message from being answered twice.
        """
        attempt = _busy_attempt.get()
        self.stats["busy"] += 1
        if self.metrics is not None:
            self.metrics.count_turn(None, inbound.key.channel, "busy")
        if attempt == 0:
            await self.deliver([Outbound(conversation_id="", key=inbound.key, seq=0,
                                         text=busy_notice(detect_language(inbound.text)),
                                         kind="notice")])

        async def retry() -> None:
            await asyncio.sleep(self.busy_retry_delay * (attempt + 1))
            _busy_attempt.set(attempt + 1)
            try:
                await self.handle(inbound)
            except Exception:
                logger.exception("turn put off while busy failed on retry")

        task = asyncio.get_running_loop().create_task(retry())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return TurnResult("", busy=True)

    def _count(self, inbound: Inbound, outcome: TurnOutcome, started: float) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        conv = outcome.conversation
        result = "muted" if outcome.muted else "handoff" if outcome.handoff else "replied"
        metrics.count_turn(conv.flow, inbound.key.channel, result,
                           seconds=time.perf_counter() - started)
        if outcome.handoff is not None:
            metrics.count_handoff(outcome.handoff.reason)
        if inbound.kind == "rating" and inbound.rating is not None:
            metrics.count_satisfaction(inbound.rating)
        if "memory_mismatch" in outcome.events:
            metrics.count_memory_mismatch()
        estimate = conv.counters.get("last_estimate")
        if estimate is not None and inbound.kind == "text" and not outcome.muted:
            metrics.observe_satisfaction_estimate(estimate)

    def _count_duplicate(self, inbound: Inbound, conv: ConversationState | None) -> None:
        """A redelivered channel message was dropped; counted as outcome ``duplicate``."""
        self.stats["duplicates"] += 1
        if self.metrics is not None:
            self.metrics.count_turn(conv.flow if conv is not None else None,
                                    inbound.key.channel, "duplicate")

    async def _handle_locked(self, inbound: Inbound, deliver: bool) -> TurnResult:
        started = time.perf_counter()
        # Checked under the lock: a redelivery that queued behind the original
        # must not replay the turn (model calls, side effects). One store call
        # answers both questions.
        conv, duplicate = await self.store.load_for_turn(inbound.key,
                                                         inbound.channel_message_id)
        if duplicate:
            self._count_duplicate(inbound, conv)
            return TurnResult("", duplicate=True)
        for attempt in range(self.max_retries_on_conflict + 1):
            if attempt:  # after a version conflict: the fresh state
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
                self._count_duplicate(inbound, conv)
                return TurnResult(conv.id, duplicate=True)
            except VersionConflictError:
                # Another process wrote this conversation meanwhile; re-run on fresh state.
                self.stats["conflicts"] += 1
                if attempt == self.max_retries_on_conflict:
                    raise
                continue
            self.stats["turns"] += 1
            self._count(inbound, outcome, started)
            if deliver:
                await self.deliver(outcome.outbound)
            await self.publish(outcome)
            self._maybe_summarise(outcome)
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
            request = replace(request, history=await self.history(
                request.conversation_id, min(wants, self.history_turns),
                after=conv.counters.get("summary_seq", 0)))
        try:
            decision = await self.model.decide(request)
        except ContentPolicyError:
            decision = Decision(reply=policy_reply(request.language), model="policy",
                                off_topic=True)
        except ModelError as exc:
            if self.fallback is None or (isinstance(exc, ModelBusyError)
                                         and _busy_attempt.get() < self.busy_retries):
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
        except ModelError as exc:
            if self.fallback is None or (isinstance(exc, ModelBusyError)
                                         and _busy_attempt.get() < self.busy_retries):
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

    async def history(self, conversation_id: str, turns: int, *,
                      after: int = 0) -> list[HistoryItem]:
        """The verbatim window: messages after the summary (``after``), at most ``turns``."""
        if not conversation_id:
            return []
        items = history_items(await self.store.messages(conversation_id, after_seq=after))
        items = items[-turns:]
        # Start at a customer message so a model call never opens mid-exchange.
        while items and items[0].role != "customer":
            items.pop(0)
        return items

    # -- summaries (off the reply path) ---------------------------------------------

    def _maybe_summarise(self, outcome: TurnOutcome) -> None:
        conv = outcome.conversation
        flow = self.flows.flows.get(conv.flow) if conv.flow else None
        if flow is None or conv.id in self._summarising:
            return
        spec = flow.spec.summary
        pending = conv.counters.get("turn", 0) - conv.counters.get("summary_turn", 0)
        if pending <= spec.after_turns:
            return
        self._summarising.add(conv.id)
        task = asyncio.create_task(self._summarise(conv.id, spec.keep_turns),
                                   name=f"summary-{conv.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _summarise(self, conversation_id: str, keep_turns: int) -> None:
        try:
            await self.summarise(conversation_id, keep_turns)
        except Exception:  # a failed summary costs context size, never the conversation
            logger.exception("summary for %s failed", conversation_id)
        finally:
            self._summarising.discard(conversation_id)

    async def summarise(self, conversation_id: str, keep_turns: int) -> bool:
        """Fold all but the last ``keep_turns`` customer turns into the running summary."""
        conv = await self.store.load_by_id(conversation_id)
        if conv is None:
            return False
        after = conv.counters.get("summary_seq", 0)
        records = await self.store.messages(conversation_id, after_seq=after)
        starts = [r.seq for r in records if r.direction == "in"]
        if len(starts) <= keep_turns:
            return False
        cut = starts[-keep_turns]  # first seq kept verbatim (a customer message)
        folded = history_items([r for r in records if r.seq < cut])
        flow = self.flows.flows.get(conv.flow) if conv.flow else None
        # The language line is added below; a summariser that keeps the previous
        # summary's lines (the extractive one) would otherwise repeat it.
        previous = "\n".join(line for line in conv.summary.splitlines()
                             if not line.startswith("Customer language:"))
        request = SummaryRequest(flow=flow, previous=previous, turns=folded,
                                 language=conv.language,
                                 pinned={k: v["v"] for k, v in conv.entities.items()},
                                 conversation_id=conv.id)
        ok = True
        try:
            text = await self.model.summarise(request)
        except ModelError as exc:
            ok = False
            logger.warning("summary model failed (%s); using the extractive summary", exc)
            text = await (self.fallback or OfflineModel()).summarise(request)
        if self.metrics is not None:
            self.metrics.count_summary(ok=ok)
        text = f"Customer language: {conv.language}\n{text.strip()}"
        turn_count = conv.counters.get("turn", 0) - keep_turns
        for _ in range(self.max_retries_on_conflict + 2):
            await self._locks.acquire(str(conv.key))
            try:
                fresh = await self.store.load_by_id(conversation_id)
                if fresh is None or fresh.counters.get("summary_seq", 0) >= cut - 1:
                    return False
                expected = fresh.version
                fresh.summary = text
                fresh.counters["summary_seq"] = cut - 1
                fresh.counters["summary_turn"] = max(turn_count, 0)
                fresh.seq += 1
                record = MessageRecord(
                    conversation_id=fresh.id, seq=fresh.seq, direction="event", kind="event",
                    author="system", text="summary", created_at=self.clock(),
                    data={"upto_seq": cut - 1, "ok": ok, "chars": len(text)})
                try:
                    await self.store.commit_turn(TurnWrite(fresh, expected, [record]))
                except VersionConflictError:
                    continue
                return True
            finally:
                self._locks.release(str(conv.key))
        return False

    async def drain(self) -> None:
        """Wait for background work (summaries) to finish; used at shutdown and in tests."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def history_items(records: Sequence[MessageRecord]) -> list[HistoryItem]:
    """Transcript items for a model, with model decisions as tool calls.

    Bot messages that follow a recorded decision are folded into that
    decision's verdict (the model sees what the customer was shown there).
    Notes and other events are never part of a model's transcript.
    """
    items: list[HistoryItem] = []
    open_tool: dict[str, Any] | None = None
    for r in records:
        if r.direction == "in" and r.kind == "text":
            open_tool = None
            items.append(HistoryItem("customer", r.text))
        elif r.direction == "event" and r.kind == "decision":
            open_tool = {"id": r.data.get("tool_use_id"), "input": r.data.get("input", {}),
                         "result": r.data.get("verdict", "")}
            items.append(HistoryItem("bot", str(r.data.get("input", {}).get("reply", "")),
                                     open_tool))
        elif r.direction == "out":
            if r.author.startswith("agent"):
                open_tool = None
                items.append(HistoryItem("agent", r.text))
            elif open_tool is None:
                items.append(HistoryItem("bot", r.text))
    return items
