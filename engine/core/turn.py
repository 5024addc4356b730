"""The turn core: one customer event in, state changes and replies out. No I/O.

:func:`run_turn` is a generator. It yields what it needs from the outside
world (a routing decision, a model decision, an action result) and receives
the answer through ``send``; it returns a :class:`TurnOutcome`. The async
runner (:mod:`engine.runner`) does the I/O; tests can drive the core with
plain values. This is the websockets "sans-I/O" split applied to turns.

Order of a turn:

1. record the inbound message; send the AI disclosure if the conversation is new;
2. a conversation owned by a human: store only (the bot is muted);
3. a rating: hand off if below the flow's threshold, else thank;
4. an explicit request for a human: hand off (checked in code, not by the model);
5. no flow yet: route;
6. model decision -> validate entities -> handoff checks -> the transition the
   model proposed, if the state declares it and its guard holds -> ``done``
   transitions once the state's entities are collected, running each entered
   state's actions -> replies.

The model proposes; only this code changes state.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from collections.abc import Generator, Mapping
from datetime import datetime
from typing import Any

from engine.actions import ActionContext, ActionResult
from engine.core.types import (
    ActionNeed,
    ActionOutcome,
    DecideNeed,
    HandoffPacket,
    Inbound,
    Need,
    Outbound,
    QuickReply,
    RouteNeed,
    TurnOutcome,
)
from engine.errors import EntityValueError, GuardEvaluationError, PolicyViolation
from engine.flow.compiled import Entity, Flow, FlowSet, State
from engine.flow.schema import DONE, ERROR
from engine.i18n import pick, reply_language
from engine.models.base import (
    Decision,
    DecisionRequest,
    RouteCandidate,
    RouteDecision,
    RouteRequest,
)
from engine.signals import asks_for_human
from engine.store.base import (
    ConversationKey,
    ConversationState,
    EntityChange,
    MessageRecord,
)
from engine.textnorm import detect_language, normalize

__all__ = ["TurnCore", "new_conversation", "run_turn"]

logger = logging.getLogger(__name__)

#: A chain of ``done`` transitions longer than this is a loop in the flow.
MAX_CHAIN = 16
#: Unrouted messages before the router gives up and hands off.
MAX_UNROUTED = 3

TurnGen = Generator[Need, Any, TurnOutcome]

_TEXTS: Mapping[str, Mapping[str, str]] = {
    "clarify": {
        "en": "I can help with refunds and with tracking or changing a delivery. "
              "What can I do for you?",
        "zh": "我可以帮您办理退款、查询或修改物流。请问需要什么帮助？",
    },
    "handoff": {
        "en": "I'm connecting you with a colleague from our support team. "
              "They will see our conversation so far.",
        "zh": "正在为您转接人工客服，客服同事会看到我们之前的对话。",
    },
    "rating_thanks": {"en": "Thank you for your feedback!", "zh": "感谢您的评价！"},
    "rating_prompt": {"en": "How would you rate this conversation?",
                      "zh": "请为本次服务打分："},
    "stuck": {"en": "Sorry, I didn't quite get that. Could you rephrase?",
              "zh": "抱歉，我没有完全理解，您能换个说法吗？"},
    "error": {"en": "Sorry, something went wrong on our side.",
              "zh": "抱歉，我们这边出了点问题。"},
}

_PRIORITY = {"satisfaction": "high", "policy": "normal", "request": "normal",
             "failures": "normal", "timeout": "high", "error": "high"}


def new_conversation(key: ConversationKey, now: datetime) -> ConversationState:
    return ConversationState(id=uuid.uuid4().hex, key=key, created_at=now, updated_at=now)


def run_turn(flows: FlowSet, conv: ConversationState, inbound: Inbound,
             actions: Mapping[str, Any]) -> TurnGen:
    """Process one inbound event; see the module docstring. ``conv`` is mutated."""
    return TurnCore(flows, conv, inbound, actions).run()


class TurnCore:
    """State for one turn; use :func:`run_turn`."""

    def __init__(self, flows: FlowSet, conv: ConversationState, inbound: Inbound,
                 actions: Mapping[str, Any]) -> None:
        self.flows = flows
        self.conv = conv
        self.inbound = inbound
        self.actions = actions
        self.now = inbound.received_at
        self.out = TurnOutcome(conversation=conv, expected_version=conv.version)
        self.replies: list[tuple[str, str, tuple[QuickReply, ...]]] = []
        self.norm = normalize(inbound.text)
        #: Routed this turn: the start state is entered after the message is read.
        self.fresh = False
        self.decision: Decision | None = None
        self._plain: dict[str, Any] | None = None
        #: Bumped on every entity or result change; keys the template-context cache.
        self._changes = 0
        self._ctx: tuple[tuple[str, int, str], dict[str, Any]] | None = None
        self._last_normal: str | None = conv.state

    # -- helpers -------------------------------------------------------------

    @property
    def flow(self) -> Flow | None:
        name = self.conv.flow
        return self.flows.flows.get(name) if name else None

    def record(self, direction: str, kind: str, author: str, text: str,
               data: dict[str, Any] | None = None, channel_message_id: str | None = None) -> int:
        self.conv.seq += 1
        self.out.records.append(MessageRecord(
            conversation_id=self.conv.id, seq=self.conv.seq, direction=direction,  # type: ignore[arg-type]
            kind=kind, author=author, text=text, created_at=self.now, data=data or {},
            channel=self.conv.key.channel, channel_message_id=channel_message_id,
        ))
        return self.conv.seq

    def event(self, name: str, **data: Any) -> None:
        self.out.events.append(name)
        self.record("event", "event", "system", name, data)

    def say(self, text: str, kind: str = "text",
            quick: tuple[QuickReply, ...] = ()) -> None:
        if text:
            self.replies.append((text, kind, quick))

    def text(self, key: str) -> str:
        return pick(_TEXTS[key], self.conv.language)

    def plain_entities(self) -> dict[str, Any]:
        # Rebuilt only after a change: a turn reads this several times.
        cached = self._plain
        if cached is None:
            cached = self._plain = {k: v["v"] for k, v in self.conv.entities.items()}
        return dict(cached)

    def scope(self) -> dict[str, Any]:
        flow = self.flow
        scope: dict[str, Any] = dict(self.conv.results)
        scope.update(self.plain_entities())
        scope["policy"] = flow.policy if flow else {}
        scope["turn"] = self.conv.counters.get("turn", 0)
        scope["language"] = self.conv.language
        return scope

    def template_context(self, state: State) -> dict[str, Any]:
        # Rebuilt only when entities or results changed since the last call.
        key = (state.name, self._changes, self.conv.language)
        if self._ctx is not None and self._ctx[0] == key:
            return self._ctx[1]
        ctx = self._build_context(state)
        self._ctx = (key, ctx)
        return ctx

    def _build_context(self, state: State) -> dict[str, Any]:
        ctx = self.scope()
        ctx["entities"] = self.plain_entities()
        ctx["results"] = dict(self.conv.results)
        ctx["flow"] = self.conv.flow
        ctx["state"] = state.name
        ctx["labels"] = self.labels()
        return ctx

    def labels(self) -> dict[str, str]:
        """Customer-facing labels of enum values, in the conversation's language."""
        flow = self.flow
        out: dict[str, str] = {}
        if flow is None:
            return out
        lang = reply_language(self.conv.language)
        for name, item in self.conv.entities.items():
            entity = flow.entities.get(name)
            label = getattr(entity.type, "label", None) if entity else None
            if label is not None:
                out[name] = label(item["v"], lang)
            else:
                out[name] = str(item["v"])
        return out

    def bump(self, name: str, by: int = 1) -> int:
        value = self.conv.counters.get(name, 0) + by
        self.conv.counters[name] = value
        return value

    def clear(self, name: str) -> None:
        self.conv.counters.pop(name, None)

    # -- the turn ------------------------------------------------------------

    def run(self) -> TurnGen:
        conv, inbound = self.conv, self.inbound
        kind = "rating" if inbound.kind == "rating" else "text"
        self.record("in", kind, "customer", inbound.text,
                    {"rating": inbound.rating} if inbound.rating is not None else None,
                    inbound.channel_message_id)
        detected = detect_language(inbound.text) if inbound.kind == "text" else None
        # A Chinese customer typing "ok 确认" is still a Chinese customer: a
        # mixed message keeps a clear earlier language.
        keeps = detected == "mixed" and conv.language in ("zh", "en") \
            and conv.counters.get("turn", 0) > 0
        if detected and _has_words(self.norm) and not keeps:
            conv.language = detected
        if not conv.counters.get("disclosed"):
            # The disclosure is part of the conversation record, not a channel
            # nicety: it is sent (and stored) before any other bot message.
            conv.counters["disclosed"] = 1
            self.say(self.flows.disclosure(conv.language, conv.flow), "disclosure")

        if conv.owner in ("pending_human", "human"):
            self.out.muted = True
            return self.finish()
        if inbound.kind == "rating":
            # Ratings usually follow the end of a journey: judge them in that
            # journey's flow (its threshold, its handoff state), not a new one.
            if conv.owner == "resolved":
                self.restart()
            self.rating(inbound.rating)
            return self.finish()
        if inbound.kind == "quick_reply" and self.stale_quick_reply():
            # A button from an earlier step ("Yes, refund" tapped again after the
            # refund): the conversation moved on, so the tap means nothing now.
            self.event("stale_quick_reply", text=inbound.text)
            return self.finish()
        if conv.owner == "resolved" or self.ended():
            self.restart()

        conv.counters["turn"] = conv.counters.get("turn", 0) + 1
        if asks_for_human(self.norm):
            self.handoff("request", "customer asked for a human")
            return self.finish()

        if self.flow is None:
            routed = yield from self.route()
            if not routed:
                return self.finish()
        yield from self.decide()
        return self.finish()

    def ended(self) -> bool:
        flow = self.flow
        return bool(flow and self.conv.state and flow.states[self.conv.state].kind == "end")

    def restart(self) -> None:
        """A new journey in the same conversation: keep entities, forget the old flow."""
        conv = self.conv
        self.event("journey_restarted", previous_flow=conv.flow, previous_state=conv.state)
        conv.flow = None
        conv.state = None
        conv.owner = "bot"
        conv.owner_agent = None
        # A hand-back marker is for the next decision, in whichever journey.
        conv.results = {k: v for k, v in conv.results.items()
                        if k in ("handback", "_pii", "_quick")}
        self._changes += 1
        self._last_normal = None
        # The satisfaction streak survives: a customer who stays angry across
        # journeys still reaches a human.
        keep = {"disclosed", "turn", "low_estimate", "summary_seq", "summary_turn"}
        conv.counters = {k: v for k, v in conv.counters.items() if k in keep}

    # -- rating --------------------------------------------------------------

    def stale_quick_reply(self) -> bool:
        offered = self.conv.results.get("_quick")
        if not isinstance(offered, dict):
            return False
        return self.inbound.text in offered.get("payloads", ()) \
            and offered.get("state") != self.conv.state

    def rating(self, value: int | None) -> None:
        flow = self.flow
        threshold = flow.handoff.satisfaction_below if flow else 3
        if value is None or not 1 <= value <= 5:
            self.say(self.text("stuck"))
            return
        if self.conv.counters.get("rated"):
            # One rating per prompt (a second tab, a stale star row): the first counts.
            # The message stays in the log, marked so nothing counts it as a rating.
            first = self.out.records[0]
            self.out.records[0] = dataclasses.replace(first, kind="rating_ignored")
            self.event("rating_ignored", value=value)
            return
        self.conv.counters["rated"] = 1
        self.conv.counters.pop("rating_open", None)
        self.conv.counters["last_rating"] = value
        self.event("rating", value=value)
        if value < threshold:
            self.handoff("satisfaction", f"customer rated the conversation {value}/5")
        else:
            self.say(self.text("rating_thanks"))

    # -- routing -------------------------------------------------------------

    def route(self) -> Generator[Need, Any, bool]:
        conv = self.conv
        if len(self.flows) == 1:
            # One flow (a single-purpose deployment or `chat --flow`): nothing to choose.
            only = next(iter(self.flows))
            decision = RouteDecision(only.name, confidence=1.0)
            return self.routed(decision)
        request = RouteRequest(
            text=self.inbound.model_text or self.inbound.text,
            language=conv.language,
            candidates=[RouteCandidate(f.name, f.router_description, f.router_examples)
                        for f in self.flows],
            conversation_id=conv.id,
            raw_text=self.inbound.text,
        )
        decision = yield RouteNeed(request)
        return self.routed(decision)

    def routed(self, decision: RouteDecision) -> bool:
        conv = self.conv
        if decision.wants_human:
            self.handoff("request", "customer asked for a human")
            return False
        if decision.satisfaction is not None:
            self.record_estimate(None, decision.satisfaction)
            if conv.owner != "bot":
                return False
        if decision.flow is None or decision.flow not in self.flows:
            if decision.flow is not None:
                self.event("route_rejected", flow=decision.flow)
            if self.bump("unrouted") >= MAX_UNROUTED:
                self.handoff("failures", "could not tell what the customer needs")
            else:
                self.say(self.text("clarify"))
            return False
        self.clear("unrouted")
        conv.flow = decision.flow
        conv.state = self.flows[decision.flow].start
        self.fresh = True
        self.event("routed", flow=decision.flow)
        return True

    # -- deciding ------------------------------------------------------------

    def decide(self) -> Generator[Need, Any, None]:
        flow = self.flow
        conv = self.conv
        assert flow is not None and conv.state is not None
        if conv.owner != "bot":
            return
        state = flow.states[conv.state]
        if state.kind != "normal":
            return
        missing = [e for e in state.collect if e not in conv.entities]
        turn = conv.counters.get("turn", 0)
        request = DecisionRequest(
            flow=flow, state=state.name, text=self.inbound.model_text or self.inbound.text,
            language=conv.language, entities=self.plain_entities(),
            results=conv.results, missing=missing, summary=conv.summary,
            turn=conv.counters.get("turn", 0), conversation_id=conv.id,
            raw_text=self.inbound.text,
            handback=str(conv.results.get("handback", {}).get("note", "")),
            memory_note=str(conv.results.get("_memory_note", "")),
            check_memory=bool(flow.pinned) and turn % flow.spec.summary.check_every == 0,
        )
        # Hand-back markers and memory corrections are shown to the model once.
        conv.results.pop("handback", None)
        conv.results.pop("_memory_note", None)
        decision: Decision = yield DecideNeed(request)
        self.out.model = decision.model
        self.decision = decision
        if request.check_memory:
            self.check_memory(flow, decision)

        if decision.wants_human and flow.handoff.on_request:
            self.handoff("request", "the model understood a request for a human")
            return
        if decision.satisfaction is not None:
            self.record_estimate(flow, decision.satisfaction)
            if conv.owner != "bot":
                return

        progressed, jump_to = self.apply_entities(flow, decision)
        if progressed:
            # Progress ends a digression, also when it moves the conversation on
            # (``stay`` is not reached then).
            self.clear("off_topic")
        if self.fresh:
            # First message of the journey: it may already say what the
            # customer wants ("I want to change my address") or carry the
            # entities the first states ask for.
            start = flow.states[flow.start]
            trigger = decision.transition
            if trigger and trigger in start.triggers and trigger not in (DONE, ERROR):
                taken = self.fire(flow, start.name, trigger)
                if taken is not None:
                    conv.state = None
                    yield from self.enter(taken.dest, taken.reason)
                    return
            conv.state = None
            before = len(self.replies)
            yield from self.enter(start.name, None)
            if conv.state == start.name and conv.owner == "bot" and decision.reply:
                # Still at the start, e.g. a free-form question: the model's own
                # answer (or a safe reply) beats the start state's generic text.
                del self.replies[before:]
                self.say(decision.reply)
            return
        if jump_to is not None and jump_to != conv.state:
            self.event("correction_rewind", to=jump_to)
            yield from self.enter(jump_to, None)
            return

        state = flow.states[conv.state]
        if decision.transition:
            trigger = decision.transition
            if trigger in (DONE, ERROR) or trigger not in state.triggers:
                self.event("transition_rejected", trigger=trigger, state=state.name,
                           reason="not declared by the state")
            else:
                taken = self.fire(flow, state.name, trigger)
                if taken is not None:
                    yield from self.enter(taken.dest, taken.reason)
                    return
                self.event("transition_rejected", trigger=trigger, state=state.name,
                           reason="no guard held")

        if state.has_done and all(e in conv.entities for e in state.collect):
            taken = self.fire(flow, state.name, DONE)
            if taken is not None:
                yield from self.enter(taken.dest, taken.reason)
                return

        # Stayed in the state: ask for what is missing, or re-prompt.
        self.stay(flow, state, decision, progressed)

    def check_memory(self, flow: Flow, decision: Decision) -> None:
        """Compare the model's view of the pinned entities with the store.

        The store is the truth. A disagreement is logged as an event, counted,
        and corrected in the next prompt; the model's values are never taken
        from this echo (entities only change through ``entities``).
        """
        echo = decision.pinned_echo
        if echo is None:
            self.event("memory_check", ok=True, echoed=False)
            return
        wrong: dict[str, Any] = {}
        for name in flow.pinned:
            stored = self.conv.entities.get(name, {}).get("v")
            seen = echo.get(name)
            if seen in (None, "") and stored is None:
                continue
            try:
                normalised = flow.entities[name].type.parse(seen) if seen not in (None, "") \
                    else None
            except EntityValueError:
                normalised = seen
            if normalised != stored:
                wrong[name] = {"model": seen, "store": stored}
        if not wrong:
            self.event("memory_check", ok=True)
            return
        self.bump("memory_mismatches")
        self.event("memory_mismatch", mismatches=wrong)
        facts = "; ".join(f"{n} is {v['store']!r}, not {v['model']!r}" if v["store"] is not None
                          else f"{n} is not known yet" for n, v in wrong.items())
        self.conv.results["_memory_note"] = f"Correction from the system of record: {facts}."

    def record_estimate(self, flow: Flow | None, estimate: int) -> None:
        estimate = max(1, min(5, estimate))
        self.conv.counters["last_estimate"] = estimate
        below = flow.handoff.estimate_below if flow else 3
        turns = flow.handoff.estimate_turns if flow else 2
        if estimate < below:
            if self.bump("low_estimate") >= turns:
                self.handoff("satisfaction",
                             f"satisfaction estimated below {below} for {turns} turns")
        else:
            self.clear("low_estimate")

    def apply_entities(self, flow: Flow, decision: Decision) -> tuple[bool, str | None]:
        """Validate and store proposed entity values; returns (progress, state to rewind to)."""
        conv = self.conv
        progressed = False
        jump_to: str | None = None
        turn = conv.counters.get("turn", 0)
        for name, raw in decision.entities.items():
            entity = flow.entities.get(name)
            if entity is None:
                self.event("entity_rejected", entity=name, reason="not declared by the flow")
                continue
            try:
                value = entity.type.parse(raw)
            except EntityValueError as exc:
                self.event("entity_rejected", entity=name, reason=exc.reason)
                continue
            current = conv.entities.get(name)
            if current is not None and current["v"] == value:
                continue
            if current is not None and not entity.correctable:
                self.event("entity_rejected", entity=name, reason="not correctable")
                continue
            self.set_entity(name, value, decision.source, turn)
            progressed = True
            if current is not None:
                # A correction invalidates whatever was derived from the old
                # value: go back to the state that collects it and let the
                # ``done`` chain re-run its lookups.
                target = flow.collected_by.get(name)
                if target is not None and target != conv.state and jump_to is None:
                    jump_to = target
        return progressed, jump_to

    def set_entity(self, name: str, value: Any, source: str, turn: int) -> None:
        self._plain = None
        self._changes += 1
        previous = self.conv.entities.get(name)
        self.conv.entities[name] = {"v": value, "t": turn, "s": source}
        self.clear(f"attempts:{name}")
        self.out.entity_changes.append(EntityChange(
            conversation_id=self.conv.id, name=name, value=value,
            previous=previous["v"] if previous else None, turn=turn, source=source,
            created_at=self.now,
        ))

    def fire(self, flow: Flow, state: str, trigger: str) -> Any:
        try:
            return flow.machine.fire(state, trigger, self.scope())
        except GuardEvaluationError as exc:
            self.event("guard_error", state=state, trigger=trigger, error=str(exc))
            return None

    def stay(self, flow: Flow, state: State, decision: Decision, progressed: bool) -> None:
        conv = self.conv
        missing = [e for e in state.collect if e not in conv.entities]
        if decision.off_topic and not progressed:
            # Small talk is not a failed attempt, but endless digressions are.
            if self.bump("off_topic") >= 3 * flow.handoff.max_failed_attempts:
                self.handoff("failures", "the conversation keeps drifting off topic")
                return
            if decision.reply:
                self.say(decision.reply)
                return
        elif progressed:
            self.clear("off_topic")
        if missing:
            entity = flow.entities[missing[0]]
            if not progressed and not decision.off_topic:
                attempts = self.bump(f"attempts:{entity.name}")
                if attempts >= entity.max_attempts:
                    self.handoff("failures", f"could not get {entity.name} after "
                                 f"{attempts} attempts")
                    return
            if decision.reply:
                self.say(decision.reply)
            else:
                self.say(self.ask(flow, state, entity))
            return
        if progressed:
            self.clear(f"stuck:{state.name}")
        elif decision.off_topic:
            pass
        elif self.bump(f"stuck:{state.name}") >= flow.handoff.max_failed_attempts:
            self.handoff("failures", f"no progress in state {state.name}")
            return
        if decision.reply:
            self.say(decision.reply)
            return
        ctx = self.template_context(state)
        text = state.reprompt or state.say
        rendered = flow.say(text, conv.language, ctx) if text else None
        self.say(rendered or self.text("stuck"), quick=self.quick_replies(state))

    def ask(self, flow: Flow, state: State, entity: Entity) -> str:
        attempts = self.conv.counters.get(f"attempts:{entity.name}", 0)
        ctx = self.template_context(state)
        text = None
        if attempts > 0 and entity.reprompts:
            text = entity.reprompts[min(attempts, len(entity.reprompts)) - 1]
        elif entity.ask is not None:
            text = entity.ask
        rendered = flow.say(text, self.conv.language, ctx) if text else None
        return rendered or self.text("stuck")

    # -- entering states -----------------------------------------------------

    @property
    def resume_state(self) -> str | None:
        flow = self.flow
        state = self.conv.state
        if flow is None or state is None or state not in flow.states:
            return None
        if flow.states[state].kind != "normal":
            return self._last_normal
        return state

    def enter(self, target: str, reason: str | None) -> Generator[Need, Any, None]:
        """Enter ``target``, run its actions, and follow ``done`` transitions."""
        flow = self.flow
        assert flow is not None
        for _ in range(MAX_CHAIN):
            previous = self.conv.state
            if previous is not None and previous in flow.states \
                    and flow.states[previous].kind == "normal":
                self._last_normal = previous
            self.conv.state = target
            if previous is not None:
                self.clear(f"stuck:{previous}")
            self.event("state", source=previous, target=target)
            state = flow.states[target]
            for name in state.forget:
                if name in self.conv.entities:
                    self.set_entity(name, None, "engine", self.conv.counters.get("turn", 0))
                    del self.conv.entities[name]
                    self._plain = None
            if state.kind == "handoff":
                self.handoff(reason or "policy", f"flow moved to {target}", entered=True)
                return
            failed = yield from self.run_actions(flow, state)
            if self.conv.owner != "bot":
                return
            if failed:
                taken = self.fire(flow, state.name, ERROR) if ERROR in state.triggers else None
                if taken is None:
                    self.handoff("error", f"action failed in state {state.name}")
                    return
                target, reason = taken.dest, taken.reason
                continue
            ctx = self.template_context(state)
            if state.say is not None:
                rendered = flow.say(state.say, self.conv.language, ctx)
                if rendered is None:
                    # Typos are caught at load time; this is a result missing a
                    # key at run time. Never send a half-rendered sentence.
                    self.event("template_error", state=state.name)
                    self.say(self.text("error"))
                else:
                    self.say(rendered, quick=self.quick_replies(state))
            if state.kind == "end":
                if state.rating:
                    self.say(self.text("rating_prompt"), "rating", _rating_buttons())
                    self.conv.counters["rating_open"] = 1
                    self.conv.counters.pop("rated", None)
                return
            missing = [e for e in state.collect if e not in self.conv.entities]
            if missing:
                # A state's own `say` is its question ("I couldn't find that
                # order, could you check the number?"); ask only when it has none.
                if state.say is None:
                    self.say(self.ask(flow, state, flow.entities[missing[0]]))
                return
            if not state.has_done:
                return
            taken = self.fire(flow, state.name, DONE)
            if taken is None:
                return
            target, reason = taken.dest, taken.reason
        self.event("chain_limit", state=target)
        self.handoff("error", f"more than {MAX_CHAIN} automatic transitions")

    def run_actions(self, flow: Flow, state: State) -> Generator[Need, Any, bool]:
        conv = self.conv
        for call in state.actions:
            action = self.actions[call.call]
            ctx = ActionContext(
                conversation_id=conv.id, customer=self.inbound.customer, flow=flow.name,
                state=state.name, entities=self.plain_entities(), results=dict(conv.results),
                policy=flow.policy,
                idempotency_key=f"{conv.id}:{state.name}:{conv.counters.get('turn', 0)}",
            )
            outcome: ActionOutcome = yield ActionNeed(action, ctx, call.result_name)
            if isinstance(outcome.error, PolicyViolation):
                self.event("policy_violation", action=call.call, reason=outcome.error.reason)
                self.handoff("policy", outcome.error.reason)
                return False
            if outcome.error is not None or outcome.result is None:
                reason = outcome.error.reason if outcome.error else "no result"
                self.event("action_failed", action=call.call, reason=reason)
                return True
            self.apply_action_result(flow, call.result_name, outcome.result)
        return False

    def apply_action_result(self, flow: Flow, name: str, result: ActionResult) -> None:
        self.conv.results[name] = dict(result.data)
        self._changes += 1
        turn = self.conv.counters.get("turn", 0)
        for entity_name, raw in result.entities.items():
            entity = flow.entities.get(entity_name)
            if entity is None:
                continue
            try:
                value = entity.type.parse(raw)
            except EntityValueError as exc:
                self.event("entity_rejected", entity=entity_name, reason=exc.reason)
                continue
            current = self.conv.entities.get(entity_name)
            if current is None or current["v"] != value:
                self.set_entity(entity_name, value, "action", turn)

    def quick_replies(self, state: State) -> tuple[QuickReply, ...]:
        out = []
        for q in state.quick_replies:
            label = pick(q, self.conv.language)
            out.append(QuickReply(label, label))
        if out:
            # Remembered so a tap that arrives after the conversation moved on
            # can be recognised as stale.
            self.conv.results["_quick"] = {"state": state.name,
                                           "payloads": [q.payload for q in out]}
        return tuple(out)

    # -- handoff -------------------------------------------------------------

    def handoff(self, reason: str, detail: str, *, entered: bool = False) -> None:
        conv = self.conv
        flow = self.flow
        if conv.owner != "bot":
            return
        said = False
        resume = self.resume_state
        if flow is not None:
            target = flow.handoff.state
            if not entered:
                self.event("state", source=conv.state, target=target)
            if not entered or conv.state is None:
                conv.state = target
            state = flow.states[conv.state]
            if state.say is not None:
                rendered = flow.say(state.say, conv.language, self.template_context(state))
                if rendered:
                    self.say(rendered, "handoff")
                    said = True
        if not said:
            self.say(self.text("handoff"), "handoff")
        conv.owner = "pending_human"
        conv.handoff_reason = reason
        conv.waiting_since = self.now
        # Where the bot resumes if an agent hands back: the state the handoff
        # interrupted (never the handoff state itself).
        conv.results["_handoff"] = {"resume": resume, "priority": _PRIORITY.get(reason, "normal"),
                                    "detail": detail}
        self.event("handoff", reason=reason, detail=detail)
        self.out.handoff = HandoffPacket(
            conversation_id=conv.id, key=conv.key, reason=reason,
            priority=_PRIORITY.get(reason, "normal"), flow=conv.flow, state=conv.state,
            language=conv.language, summary=conv.summary, entities=self.plain_entities(),
            detail=detail,
        )

    def verdict(self) -> str:
        """What the engine made of the model's proposal, for the model's next turn."""
        conv = self.conv
        notes = [e for e in self.out.events
                 if e in ("transition_rejected", "entity_rejected", "handoff", "routed",
                          "correction_rewind", "policy_violation", "action_failed")]
        state = conv.state or "-"
        shown = " | ".join(text for text, _, _ in self.replies)
        verdict = f"state is now {state}; owner {conv.owner}"
        if notes:
            verdict += "; " + ", ".join(notes)
        if shown:
            verdict += f"; the customer was shown: {shown}"
        return verdict

    # -- finishing -----------------------------------------------------------

    def finish(self) -> TurnOutcome:
        conv = self.conv
        decision = self.decision
        if decision is not None and decision.tool_use_id:
            # Kept so the next request can replay the model's tool call with the
            # engine's verdict as its result (see engine.memory).
            self.record("event", "decision", "system", "decision", {
                "tool_use_id": decision.tool_use_id, "input": dict(decision.raw or {}),
                "verdict": self.verdict(),
            })
        for text, kind, quick in self.replies:
            seq = self.record("out", "text", "bot", text,
                              {"kind": kind, "quick": [q.payload for q in quick]} if quick
                              else ({"kind": kind} if kind != "text" else None))
            self.out.outbound.append(Outbound(
                conversation_id=conv.id, key=conv.key, seq=seq, text=text, kind=kind,
                language=conv.language, quick_replies=quick,
            ))
        conv.updated_at = self.now
        return self.out


_NON_ASCII_LETTER = re.compile(r"[^\W\d_A-Za-z]")
_ASCII_WORD = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]+(?![A-Za-z0-9])")


def _has_words(norm: str) -> bool:
    # Messages that are only an order number, digits or a lone "ok" say
    # nothing reliable about the customer's language; keep the previous one.
    if _NON_ASCII_LETTER.search(norm):
        return True
    words = _ASCII_WORD.finditer(norm)
    return next(words, None) is not None and next(words, None) is not None


def _rating_buttons() -> tuple[QuickReply, ...]:
    return tuple(QuickReply(str(n), f"rating:{n}") for n in range(1, 6))
