"""The sans-I/O turn core, driven with plain values: no store, no network."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.actions import ActionRegistry, ActionResult, RegisteredAction
from engine.core.turn import new_conversation, run_turn
from engine.core.types import (
    ActionNeed,
    ActionOutcome,
    DecideNeed,
    Inbound,
    RouteNeed,
    TurnOutcome,
)
from engine.errors import ActionError, PolicyViolation
from engine.flow.compiled import FlowSet
from engine.flow.loader import load_flows
from engine.models.base import Decision, RouteDecision
from engine.store.base import ConversationKey, ConversationState

ROOT = Path(__file__).resolve().parents[3]
NOW = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)
KEY = ConversationKey("test", "acct", "thread-1")

ORDER = {"found": True, "refundable": True, "amount": "129.00", "currency": "CNY",
         "refund_block_reason": None}


def registry(results: dict[str, Any]) -> dict[str, RegisteredAction]:
    """Actions answered by the test driver; the registry only provides names."""
    reg = ActionRegistry()

    async def never(ctx: Any) -> ActionResult:  # pragma: no cover - driver answers
        raise AssertionError("the core must not call actions itself")

    for name in ("lookup_order", "issue_refund", "track_parcel", "open_lost_claim",
                 "change_address"):
        reg.add(name, never, side_effect=name != "lookup_order" and name != "track_parcel")
    return {n: reg.get(n) for n in reg}


@pytest.fixture(scope="module")
def flows() -> FlowSet:
    names = frozenset({"lookup_order", "issue_refund", "track_parcel", "open_lost_claim",
                       "change_address"})
    return load_flows(ROOT / "flows", ROOT / "prompts", names)


Decider = Callable[[Any], Decision]


def drive(flows: FlowSet, conv: ConversationState, text: str, *,
          decide: Decider | Decision | None = None, route: str | None = "refund",
          actions: dict[str, Any] | None = None, kind: str = "text",
          rating: int | None = None) -> tuple[TurnOutcome, list[Any]]:
    """Run one turn, answering needs from the arguments; returns outcome and needs seen."""
    inbound = Inbound(KEY, text, "demo:test", NOW, kind=kind, rating=rating)  # type: ignore[arg-type]
    gen = run_turn(flows, conv, inbound, registry({}))
    needs: list[Any] = []
    answer: Any = None
    actions = actions or {}
    try:
        while True:
            need = gen.send(answer)
            needs.append(need)
            if isinstance(need, RouteNeed):
                answer = RouteDecision(route)
            elif isinstance(need, DecideNeed):
                answer = decide(need.request) if callable(decide) else decide or Decision()
            elif isinstance(need, ActionNeed):
                value = actions.get(need.action.name, {})
                if isinstance(value, Exception):
                    answer = ActionOutcome(error=value)  # type: ignore[arg-type]
                else:
                    answer = ActionOutcome(result=ActionResult(data=value))
    except StopIteration as stop:
        return stop.value, needs


def fresh() -> ConversationState:
    return new_conversation(KEY, NOW)


def texts(outcome: TurnOutcome) -> list[str]:
    return [o.text for o in outcome.outbound]


def test_first_turn_starts_with_the_ai_disclosure(flows: FlowSet) -> None:
    conv = fresh()
    outcome, _ = drive(flows, conv, "I want a refund")
    assert outcome.outbound[0].kind == "disclosure"
    assert "AI assistant" in outcome.outbound[0].text
    # Only once per conversation.
    outcome2, _ = drive(flows, conv, "HL26110842",
                        decide=Decision(entities={"order_id": "HL26110842"}),
                        actions={"lookup_order": ORDER})
    assert all(o.kind != "disclosure" for o in outcome2.outbound)


def test_disclosure_even_when_the_first_message_asks_for_a_human(flows: FlowSet) -> None:
    outcome, needs = drive(flows, fresh(), "转人工")
    assert [o.kind for o in outcome.outbound] == ["disclosure", "handoff"]
    assert outcome.handoff is not None and outcome.handoff.reason == "request"
    assert needs == []  # decided in code, no model involved


def test_disclosure_in_chinese_for_chinese_customers(flows: FlowSet) -> None:
    outcome, _ = drive(flows, fresh(), "我要退款")
    assert outcome.outbound[0].text.startswith("您好")


def test_routing_enters_start_state_and_asks_for_the_missing_entity(flows: FlowSet) -> None:
    conv = fresh()
    outcome, _ = drive(flows, conv, "refund please")
    assert conv.flow == "refund" and conv.state == "ask_order"
    assert "order number" in texts(outcome)[-1]


def test_one_shot_message_chains_through_done_transitions(flows: FlowSet) -> None:
    conv = fresh()
    decision = Decision(entities={"order_id": "hl26110842", "reason": "wrong_item"},
                        source="customer")
    outcome, needs = drive(flows, conv, "order HL26110842 is the wrong size, refund please",
                           decide=decision, actions={"lookup_order": ORDER})
    assert conv.state == "confirm"
    assert conv.entities["order_id"]["v"] == "HL26110842"  # normalised by the entity type
    assert "¥129.00" in texts(outcome)[-1]
    assert [type(n).__name__ for n in needs] == ["RouteNeed", "DecideNeed", "ActionNeed"]
    assert [c.name for c in outcome.entity_changes] == ["order_id", "reason"]


def test_undeclared_transition_is_rejected(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "refund")
    outcome, _ = drive(flows, conv, "just refund it", decide=Decision(transition="refund"))
    assert conv.state == "ask_order"
    assert "transition_rejected" in outcome.events


def test_reserved_triggers_cannot_be_proposed(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "refund")
    outcome, _ = drive(flows, conv, "skip", decide=Decision(transition="done"))
    assert conv.state == "ask_order"
    assert "transition_rejected" in outcome.events


def test_invalid_entity_values_are_rejected_and_count_as_failed_attempts(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "refund")
    outcome, _ = drive(flows, conv, "it's 12345", decide=Decision(entities={"order_id": "12345"}))
    assert "order_id" not in conv.entities
    assert "entity_rejected" in outcome.events
    assert conv.counters["attempts:order_id"] == 1
    # The re-prompt ladder moves on.
    assert "confirmation email" in texts(outcome)[-1]


def test_unknown_entities_from_the_model_are_ignored(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "refund")
    outcome, _ = drive(flows, conv, "x", decide=Decision(entities={"credit_limit": 10**9}))
    assert "credit_limit" not in conv.entities
    assert "entity_rejected" in outcome.events


def test_failed_attempts_hand_off(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "refund")
    for _ in range(2):
        drive(flows, conv, "I don't know it")
        assert conv.owner == "bot"
    outcome, _ = drive(flows, conv, "no idea")
    assert conv.owner == "pending_human"
    assert outcome.handoff is not None and outcome.handoff.reason == "failures"
    assert conv.state == "human"


def test_low_satisfaction_estimate_for_two_turns_hands_off(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "refund")
    drive(flows, conv, "ugh", decide=Decision(satisfaction=2))
    assert conv.owner == "bot"
    outcome, _ = drive(flows, conv, "useless", decide=Decision(satisfaction=1))
    assert outcome.handoff is not None and outcome.handoff.reason == "satisfaction"
    assert outcome.handoff.priority == "high"


def test_a_good_turn_resets_the_low_estimate_streak(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "refund")
    drive(flows, conv, "ugh", decide=Decision(satisfaction=2))
    drive(flows, conv, "ok HL26110842", actions={"lookup_order": ORDER},
          decide=Decision(satisfaction=4, entities={"order_id": "HL26110842"}))
    drive(flows, conv, "hmm", decide=Decision(satisfaction=2))
    assert conv.owner == "bot"
    assert conv.counters["low_estimate"] == 1


def test_rating_below_threshold_hands_off_and_above_thanks(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "refund")
    outcome, needs = drive(flows, conv, "2", kind="rating", rating=2)
    assert outcome.handoff is not None and outcome.handoff.reason == "satisfaction"
    assert needs == []
    conv2 = fresh()
    drive(flows, conv2, "refund")
    outcome2, _ = drive(flows, conv2, "5", kind="rating", rating=5)
    assert outcome2.handoff is None and "Thank you" in texts(outcome2)[-1]


def test_model_request_for_a_human_hands_off(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "refund")
    outcome, _ = drive(flows, conv, "can someone else look", decide=Decision(wants_human=True))
    assert outcome.handoff is not None and outcome.handoff.reason == "request"


def test_bot_is_muted_while_a_human_owns_the_conversation(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "转人工")
    outcome, needs = drive(flows, conv, "hello? anyone?")
    assert outcome.muted and outcome.outbound == [] and needs == []
    assert [r.direction for r in outcome.records] == ["in"]


def confirm_state(flows: FlowSet, order: dict[str, Any]) -> ConversationState:
    conv = fresh()
    drive(flows, conv, "refund", decide=Decision(entities={"order_id": "HL26110903",
                                                            "reason": "damaged"}),
          actions={"lookup_order": order})
    assert conv.state == "confirm"
    return conv


def test_guard_sends_refunds_above_the_cap_to_a_human(flows: FlowSet) -> None:
    conv = confirm_state(flows, {**ORDER, "amount": "2899.00"})
    outcome, needs = drive(flows, conv, "yes", decide=Decision(transition="confirm"))
    assert outcome.handoff is not None and outcome.handoff.reason == "policy"
    assert not any(isinstance(n, ActionNeed) and n.action.name == "issue_refund" for n in needs)


def test_refund_below_the_cap_runs_the_side_effect_with_a_stable_key(flows: FlowSet) -> None:
    conv = confirm_state(flows, ORDER)
    refund = {"refund_id": "RF1", "amount": "129.00", "currency": "CNY", "eta_days": 3}
    outcome, needs = drive(flows, conv, "yes", decide=Decision(transition="confirm"),
                           actions={"issue_refund": refund})
    assert conv.state == "refunded"
    calls = [n for n in needs if isinstance(n, ActionNeed)]
    assert [c.action.name for c in calls] == ["issue_refund"]
    assert calls[0].context.idempotency_key == f"{conv.id}:refund:{conv.counters['turn']}"
    assert calls[0].context.customer == "demo:test"  # identity from the session
    assert "RF1" in texts(outcome)[0]
    assert outcome.outbound[-1].kind == "rating"
    assert [q.payload for q in outcome.outbound[-1].quick_replies] == [
        "rating:1", "rating:2", "rating:3", "rating:4", "rating:5"]


def test_policy_violation_from_an_action_hands_off(flows: FlowSet) -> None:
    conv = confirm_state(flows, ORDER)
    outcome, _ = drive(flows, conv, "yes", decide=Decision(transition="confirm"),
                       actions={"issue_refund": PolicyViolation("issue_refund", "over cap")})
    assert outcome.handoff is not None and outcome.handoff.reason == "policy"
    assert conv.owner == "pending_human"


def test_failing_action_takes_the_error_transition(flows: FlowSet) -> None:
    conv = fresh()
    outcome, _ = drive(flows, conv, "refund",
                       decide=Decision(entities={"order_id": "HL26110842"}),
                       actions={"lookup_order": ActionError("lookup_order", "timeout")})
    assert "action_failed" in outcome.events
    assert outcome.handoff is not None and outcome.handoff.reason == "error"


def test_correction_rewinds_to_the_collecting_state_and_reruns_lookups(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "refund", decide=Decision(entities={"order_id": "HL26110517"}),
          actions={"lookup_order": ORDER})
    assert conv.state == "ask_reason"
    outcome, needs = drive(flows, conv, "sorry, it's HL26110842",
                           decide=Decision(entities={"order_id": "HL26110842"}),
                           actions={"lookup_order": {**ORDER, "amount": "59.00"}})
    assert conv.entities["order_id"]["v"] == "HL26110842"
    assert conv.results["order"]["amount"] == "59.00"
    assert "correction_rewind" in outcome.events
    assert [n.action.name for n in needs if isinstance(n, ActionNeed)] == ["lookup_order"]
    change = outcome.entity_changes[0]
    assert (change.previous, change.value) == ("HL26110517", "HL26110842")


def test_not_found_forgets_the_number_and_asks_again(flows: FlowSet) -> None:
    conv = fresh()
    outcome, _ = drive(flows, conv, "refund", decide=Decision(entities={"order_id": "HL00000000"}),
                       actions={"lookup_order": {"found": False}})
    assert conv.state == "order_not_found"
    assert "order_id" not in conv.entities
    assert "couldn't find" in texts(outcome)[-1]


def test_end_state_then_new_message_starts_a_new_journey_keeping_entities(flows: FlowSet) -> None:
    conv = confirm_state(flows, ORDER)
    drive(flows, conv, "no", decide=Decision(transition="deny"))
    assert conv.state == "cancelled"
    outcome, _ = drive(flows, conv, "where is my parcel", route="logistics",
                       actions={"track_parcel": {"found": True, "shipped": True,
                                                 "status": "in_transit", "stuck": False,
                                                 "tracking_no": "SF142087315630",
                                                 "carrier": "SF Express", "eta": None,
                                                 "last_event": None}})
    assert "journey_restarted" in outcome.events
    assert conv.flow == "logistics" and conv.state == "in_transit"
    assert "SF142087315630" in texts(outcome)[-2]
    assert outcome.outbound[-1].kind == "rating"


def test_unroutable_messages_clarify_then_hand_off(flows: FlowSet) -> None:
    conv = fresh()
    for _ in range(2):
        outcome, _ = drive(flows, conv, "hmm", route=None)
        assert "What can I do for you" in texts(outcome)[-1]
    outcome, _ = drive(flows, conv, "hmm", route=None)
    assert outcome.handoff is not None and outcome.handoff.reason == "failures"


def test_records_are_sequenced_and_include_events(flows: FlowSet) -> None:
    conv = fresh()
    outcome, _ = drive(flows, conv, "refund")
    seqs = [r.seq for r in outcome.records]
    assert seqs == list(range(1, len(seqs) + 1))
    assert outcome.records[0].direction == "in" and outcome.records[0].text == "refund"
    assert conv.seq == seqs[-1]
    kinds = {r.direction for r in outcome.records}
    assert kinds == {"in", "out", "event"}


def test_language_follows_the_customer_but_not_bare_numbers(flows: FlowSet) -> None:
    conv = fresh()
    drive(flows, conv, "我要退款")
    assert conv.language == "zh"
    outcome, _ = drive(flows, conv, "HL26110842",
                       decide=Decision(entities={"order_id": "HL26110842"}),
                       actions={"lookup_order": ORDER})
    assert conv.language == "zh"
    assert "退款原因" in texts(outcome)[-1]


def test_a_result_missing_a_key_never_sends_a_half_rendered_sentence(flows: FlowSet) -> None:
    conv = fresh()
    outcome, _ = drive(flows, conv, "where is it", route="logistics",
                       decide=Decision(entities={"order_id": "HL26111876"}),
                       actions={"track_parcel": {"found": True, "shipped": True,
                                                 "status": "in_transit", "stuck": False}})
    assert "template_error" in outcome.events
    assert "went wrong" in texts(outcome)[-2]


def test_one_rating_per_prompt(flows: FlowSet) -> None:
    conv = confirm_state(flows, ORDER)
    refund = {"refund_id": "RF1", "amount": "129.00", "currency": "CNY", "eta_days": 3}
    drive(flows, conv, "yes", decide=Decision(transition="confirm"),
          actions={"issue_refund": refund})
    first, _ = drive(flows, conv, "5", kind="rating", rating=5)
    assert "Thank you" in texts(first)[-1]
    second, _ = drive(flows, conv, "1", kind="rating", rating=1)
    assert second.outbound == [] and second.handoff is None
    assert "rating_ignored" in second.events
    assert conv.counters["last_rating"] == 5


def test_a_spent_quick_reply_is_ignored(flows: FlowSet) -> None:
    conv = confirm_state(flows, ORDER)
    refund = {"refund_id": "RF1", "amount": "129.00", "currency": "CNY", "eta_days": 3}
    drive(flows, conv, "Yes, refund", kind="quick_reply", decide=Decision(transition="confirm"),
          actions={"issue_refund": refund})
    assert conv.state == "refunded"
    outcome, needs = drive(flows, conv, "Yes, refund", kind="quick_reply",
                           decide=Decision(transition="confirm"))
    assert "stale_quick_reply" in outcome.events
    assert outcome.outbound == [] and needs == []
    assert conv.state == "refunded"
