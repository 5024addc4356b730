"""Conversation memory, piece by piece: token estimates, trimming, the Claude transcript
replay, the prompt split for caching, the memory check, off-topic turns and summaries.

The 60-turn conversations that put these together are in ``test_long_conversations.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.actions import ActionRegistry, ActionResult
from engine.core.turn import new_conversation, run_turn
from engine.core.types import (
    ActionNeed,
    ActionOutcome,
    DecideNeed,
    Inbound,
    RouteNeed,
    TurnOutcome,
)
from engine.demo.actions import build_actions
from engine.demo.shop import ORDER_OTHER, ORDER_SMALL, Shop
from engine.errors import ModelOutputError, ModelUnavailableError
from engine.flow.compiled import FlowSet
from engine.flow.loader import load_flows
from engine.flow.schema import SummarySpec
from engine.memory import (
    budget_tokens,
    estimate_request_tokens,
    estimate_tokens,
    strip_orphaned_tool_results,
    trim_messages,
)
from engine.metrics import Metrics
from engine.models.base import (
    Decision,
    DecisionRequest,
    HistoryItem,
    Model,
    RouteDecision,
    RouteRequest,
    SummaryRequest,
)
from engine.models.claude import ClaudeModel
from engine.models.offline import OfflineModel, extractive_summary
from engine.runner import Engine
from engine.store.base import ConversationKey, ConversationState, MessageRecord
from engine.store.memory import MemoryStore
from tests.engine.test_long_conversations import SCRIPTS, flow_copy, known_facts
from tests.fakes.claude_api import (
    FakeClaude,
    validate_messages_request,
)
from tests.fakes.claude_api import (
    estimate_tokens as fake_estimate_tokens,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)
KEY = ConversationKey("test", "acct", "memory")
ORDER = {"found": True, "refundable": True, "amount": "129.00", "currency": "CNY",
         "refund_block_reason": None}


@pytest.fixture(scope="module")
def flows() -> FlowSet:
    return load_flows(ROOT / "flows", ROOT / "prompts", build_actions(Shop()).names())


def valid(messages: list[dict[str, Any]]) -> str | None:
    """The real API's complaint about these messages (the fake's validator), or None."""
    return validate_messages_request({"model": "claude-sonnet-5", "max_tokens": 64,
                                      "messages": messages})


# --- token estimates and the budget --------------------------------------------------------------


def test_estimate_tokens_for_english_chinese_and_mixed_text() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("hello world") == 4  # 11 characters / 3.5
    assert estimate_tokens("你好世界") == 6  # 4 CJK characters x 1.3
    # Full-width punctuation counts like CJK characters.
    assert estimate_tokens("你好，世界。") == 8  # ceil(6 x 1.3)
    assert estimate_tokens("订单 HL26110842") == 6  # ceil(2 x 1.3 + 11 / 3.5)


@pytest.mark.parametrize("language", ["en", "zh"])
def test_the_local_estimate_is_conservative_but_not_wasteful(language: str) -> None:
    # Against an independent estimator (the fake API's: 4 ASCII characters or one CJK
    # character per token), ours never under-counts and over-counts by at most 40%.
    for line in SCRIPTS[language]:
        ours, theirs = estimate_tokens(line), fake_estimate_tokens(line)
        assert theirs <= ours <= 1.4 * theirs + 1, line


def test_request_estimate_counts_system_messages_tool_calls_and_tools() -> None:
    system = [{"type": "text", "text": "a" * 35}]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "b" * 7},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "x",
                                           "input": {"reply": "你好"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "c" * 14},
                                     {"type": "text", "text": "d" * 7}]},
    ]
    tool = {"name": "x"}
    expected = (10 + (2 + 4) + (estimate_tokens('{"reply": "你好"}') + 4)
                + (estimate_tokens("c" * 14 + "\n" + "d" * 7) + 4)
                + estimate_tokens('{"name": "x"}'))
    assert estimate_request_tokens(system, messages, [tool]) == expected
    assert estimate_request_tokens("a" * 35, [], []) == 10


def test_budget_defaults_and_safety_margin() -> None:
    spec = SummarySpec()
    assert (spec.after_turns, spec.keep_turns, spec.max_context_tokens, spec.safety_margin,
            spec.check_every) == (5, 4, 80_000, 0.2, 3)
    assert budget_tokens(spec.max_context_tokens, spec.safety_margin) == 64_000
    assert budget_tokens(3000, 0.2) == 2400
    assert budget_tokens(3000, 0.0) == 3000


# --- the transcript replay and trimming ----------------------------------------------------------


def tool_item(n: int, reply: str = "Sure.") -> HistoryItem:
    return HistoryItem("bot", reply, {"id": f"toolu_{n}", "input": {"reply": reply},
                                      "result": f"state is now s{n}; the customer was shown: "
                                                f"{reply}"})


def transcript(exchanges: int) -> list[HistoryItem]:
    items: list[HistoryItem] = []
    for n in range(exchanges):
        items.append(HistoryItem("customer", f"message {n} " + "words " * 20))
        items.append(tool_item(n, f"reply {n} " + "more " * 20))
    return items


def test_model_turns_are_replayed_as_tool_use_with_the_engine_verdict() -> None:
    history = [
        HistoryItem("bot", "Hi, I'm the shop's AI assistant."),  # before the customer: dropped
        HistoryItem("customer", "refund please"),
        tool_item(1, "What's the order number?"),
        HistoryItem("customer", ORDER_SMALL),
        HistoryItem("bot", "To confirm: a refund of ¥129.00 ..."),  # engine text, no tool
        HistoryItem("customer", "hmm"),
        tool_item(2, "Take your time."),
        HistoryItem("agent", "Hello, Li from support here."),  # two bot turns in a row
    ]
    messages = ClaudeModel.messages(history, "yes please")
    assert valid(messages) is None
    assert [m["role"] for m in messages] == ["user", "assistant"] * 4 + ["user"]
    assert messages[1]["content"] == [{"type": "tool_use", "id": "toolu_1",
                                       "name": "record_decision",
                                       "input": {"reply": "What's the order number?"}}]
    assert messages[2]["content"][0] == {
        "type": "tool_result", "tool_use_id": "toolu_1",
        "content": "state is now s1; the customer was shown: What's the order number?"}
    assert messages[2]["content"][1] == {"type": "text", "text": ORDER_SMALL}
    assert messages[3]["content"] == [{"type": "text",
                                       "text": "To confirm: a refund of ¥129.00 ..."}]
    # The hand-back: the open tool call is closed before the agent's message.
    assert messages[6]["content"][0]["type"] == "tool_result"
    assert messages[7]["content"] == [{"type": "text",
                                       "text": "[human agent] Hello, Li from support here."}]
    assert messages[-1]["content"] == [{"type": "text", "text": "yes please"}]


def test_orphaned_tool_results_are_stripped() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "gone",
                                      "content": "x"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "n",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "ok"},
                                     {"type": "tool_result", "tool_use_id": "t0",
                                      "content": "stale"},
                                     {"type": "text", "text": "next"}]},
    ]
    out = strip_orphaned_tool_results(messages)
    assert out[0]["content"] == [{"type": "text", "text": "(continued)"}]
    assert [b.get("tool_use_id") for b in out[2]["content"]] == ["t1", None]
    assert valid(out) is None
    assert messages[2]["content"][1]["tool_use_id"] == "t0"  # the input is not mutated


@pytest.mark.parametrize("budget", [0, 50, 150, 300, 600, 900, 1200, 10_000])
def test_trimming_drops_whole_exchanges_oldest_first(budget: int) -> None:
    messages = ClaudeModel.messages(transcript(8), "and the current question")
    assert valid(messages) is None

    def fits(candidate: list[dict[str, Any]]) -> bool:
        return estimate_request_tokens([], candidate) <= budget

    trimmed = trim_messages(messages, fits)
    assert valid(trimmed) is None  # alternates, starts with user, no split tool-use pair
    # The current question is never dropped (only the result of a call that was cut).
    assert trimmed[-1]["content"][-1] == {"type": "text", "text": "and the current question"}
    assert fits(trimmed) or len(trimmed) == 1
    # What is left is the newest part, unchanged except for a result whose call was cut.
    kept = messages[len(messages) - len(trimmed):]
    assert [m["role"] for m in kept] == [m["role"] for m in trimmed]
    assert trimmed[1:] == kept[1:]
    assert trimmed[0]["content"][-1] == kept[0]["content"][-1]
    if len(trimmed) < len(messages):
        assert not any(b.get("type") == "tool_result" for b in trimmed[0]["content"])
        # Only what had to go went: one more exchange would not have fitted.
        assert not fits(messages[len(messages) - len(trimmed) - 2:])


def test_fit_keeps_the_request_under_the_flow_budget(tmp_path: Path) -> None:
    flows = load_flows(flow_copy(tmp_path, max_context_tokens=3000), ROOT / "prompts",
                       build_actions(Shop()).names())
    flow = flows["refund"]
    model = ClaudeModel(api_key="not-used")
    request = DecisionRequest(flow=flow, state="confirm", text="can I pay by card?",
                              language="en", entities={"order_id": ORDER_SMALL},
                              results={}, history=transcript(30))
    system = model.system_blocks(request)
    tool = model.decision_tool(flow, "confirm")
    messages = model.messages(request.history, request.text)
    assert estimate_request_tokens(system, messages, [tool]) > 2400
    fitted = model.fit(flow, system, messages, [tool])
    assert model.last_request_tokens == estimate_request_tokens(system, fitted, [tool])
    assert 2000 < model.last_request_tokens <= budget_tokens(3000, 0.2)
    assert valid(fitted) is None and fitted[-1] == messages[-1]


def test_fit_never_drops_the_current_question_even_when_nothing_else_fits(
    tmp_path: Path,
) -> None:
    flows = load_flows(flow_copy(tmp_path, max_context_tokens=1000), ROOT / "prompts",
                       build_actions(Shop()).names())
    model = ClaudeModel(api_key="not-used")
    request = DecisionRequest(flow=flows["refund"], state="confirm", text="是的，确认",
                              language="zh", entities={}, results={}, history=transcript(3))
    system = model.system_blocks(request)
    fitted = model.fit(flows["refund"], system, model.messages(request.history, request.text),
                       [model.decision_tool(flows["refund"], "confirm")])
    assert fitted == [{"role": "user", "content": [{"type": "text", "text": "是的，确认"}]}]


# --- the system prompt: a cached stable part, then the memory ------------------------------------


def decision_request(flows: FlowSet, **fields: Any) -> DecisionRequest:
    base = DecisionRequest(flow=flows["refund"], state="confirm", text="hello", language="en",
                           entities={"order_id": ORDER_SMALL, "reason": "damaged"},
                           results={"order": ORDER})
    return replace(base, **fields)


def test_system_prompt_is_a_stable_cached_block_then_the_memory(flows: FlowSet) -> None:
    model = ClaudeModel(api_key="not-used")
    one = model.system_blocks(decision_request(flows))
    two = model.system_blocks(decision_request(
        flows, entities={"order_id": ORDER_OTHER}, summary="Customer language: en\n- chat",
        memory_note="Correction from the system of record: order_id is 'X', not 'Y'.",
        history=[HistoryItem("customer", f"my order is {ORDER_SMALL}")]))
    assert [set(b) for b in one] == [{"type", "text", "cache_control"}, {"type", "text"}]
    assert one[0] == two[0]  # identical across turns: the cache prefix holds
    assert one[0]["cache_control"] == {"type": "ephemeral"}
    assert "Known facts" not in one[0]["text"]
    # Pinned facts come from the request's entities (the store), not from the transcript.
    assert known_facts(one[1]["text"]) == {"order_id": ORDER_SMALL, "reason": "damaged"}
    assert known_facts(two[1]["text"]) == {"order_id": ORDER_OTHER, "reason": None}
    assert two[1]["text"].startswith("Summary of the conversation so far:\n"
                                     "Customer language: en\n- chat")
    assert "Note: Correction from the system of record: order_id is 'X', not 'Y'." in \
        two[1]["text"]


async def test_decide_asks_for_the_pinned_echo_on_check_turns_and_caches_the_prefix(
    fake: FakeClaude, claude: ClaudeModel, flows: FlowSet
) -> None:
    echo = {"order_id": ORDER_SMALL, "reason": "damaged"}
    fake.enqueue_tool_use("record_decision", {"reply": "ok", "entities": {},
                                              "transition": None, "satisfaction": 4,
                                              "wants_human": False})
    fake.enqueue_tool_use("record_decision", {"reply": "ok", "entities": {},
                                              "transition": None, "satisfaction": 4,
                                              "wants_human": False, "pinned": echo})
    history = [HistoryItem("customer", "refund please"), tool_item(1, "Order number?"),
               HistoryItem("customer", ORDER_SMALL), tool_item(2, "Why the refund?")]
    first = await claude.decide(decision_request(flows, history=history))
    second = await claude.decide(decision_request(flows, history=history, check_memory=True))
    assert first.pinned_echo is None and second.pinned_echo == echo
    assert second.tool_use_id is not None and second.tool_use_id.startswith("toolu_")

    plain, check = fake.requests_to()
    assert "pinned" not in plain["tools"][0]["input_schema"]["required"]
    assert "pinned" in check["tools"][0]["input_schema"]["required"]
    for request in (plain, check):
        # Breakpoints: the tool, the stable system block, the conversation so far.
        assert request["tools"][0]["cache_control"] == {"type": "ephemeral"}
        assert request["system"][0]["cache_control"] == {"type": "ephemeral"}
        assert "cache_control" not in request["system"][1]
        assert request["messages"][-2]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    # A call with the same tool, system prompt and conversation as an earlier one reads
    # the cached prefix, and the savings are recorded.
    fake.enqueue_tool_use("record_decision", {"reply": "ok", "entities": {},
                                              "transition": None, "satisfaction": 4,
                                              "wants_human": False})
    await claude.decide(decision_request(flows, history=history))
    third = fake.last_request
    assert third.response_json["usage"]["cache_read_input_tokens"] > 0
    assert claude.usage.cache_read_input_tokens == sum(
        r.response_json["usage"]["cache_read_input_tokens"] for r in fake.requests_to())
    assert claude.last_request_tokens == estimate_request_tokens(
        third["system"], third["messages"], third["tools"])


async def test_a_long_summary_gives_way_after_the_verbatim_turns(
    fake: FakeClaude, claude: ClaudeModel, tmp_path: Path
) -> None:
    # Regression: only verbatim turns were trimmed, so a long running summary (here the
    # extractive fallback of a Chinese conversation with long messages) pushed the
    # request over the budget however little of the transcript was left.
    flows = load_flows(flow_copy(tmp_path, max_context_tokens=3000), ROOT / "prompts",
                       build_actions(Shop()).names())
    lines = [f"- customer: 第{n}个问题，" + "我想详细了解一下你们的配送政策和退货流程" * 7
             for n in range(12)]
    summary = "Customer language: zh\n" + "\n".join(lines)
    question = "顺便问一下，" + "退款多久能到账，" * 20 + "？"
    request = decision_request(flows, language="zh", summary=summary, text=question,
                               history=transcript(3))
    fake.enqueue_tool_use("record_decision", {"reply": "好的", "entities": {},
                                              "transition": None, "satisfaction": 4,
                                              "wants_human": False})
    await claude.decide(request)
    sent = fake.last_request
    assert claude.last_request_tokens == estimate_request_tokens(
        sent["system"], sent["messages"], sent["tools"])
    assert claude.last_request_tokens <= budget_tokens(3000, 0.2)
    # Verbatim turns went first, then the oldest summary lines; the language line, the
    # newest summary lines, the pinned facts and the question stayed.
    assert len(sent["messages"]) == 1
    assert sent["messages"][0]["content"][-1]["text"] == question
    shown = sent["system"][1]["text"]
    assert "Summary of the conversation so far:\nCustomer language: zh\n- customer: 第" in shown
    assert lines[-1] in shown and lines[0] not in shown
    kept = [line for line in lines if line in shown]
    assert kept == lines[len(lines) - len(kept):] and kept
    assert known_facts(shown) == {"order_id": ORDER_SMALL, "reason": "damaged"}


# --- the memory check and off-topic turns in the turn core ---------------------------------------


Decider = Callable[[DecisionRequest], Decision]


@dataclass
class Driver:
    """Runs turns of one conversation through the sans-I/O core, answering its needs."""

    flows: FlowSet
    conv: ConversationState = field(default_factory=lambda: new_conversation(KEY, NOW))
    requests: list[DecisionRequest] = field(default_factory=list)

    def turn(self, text: str, decide: Decider | Decision | None = None) -> TurnOutcome:
        actions = {n: object() for n in ("lookup_order", "issue_refund")}
        gen = run_turn(self.flows, self.conv, Inbound(KEY, text, "demo:test", NOW),
                       actions)
        answer: Any = None
        try:
            while True:
                need = gen.send(answer)
                if isinstance(need, RouteNeed):
                    answer = RouteDecision("refund")
                elif isinstance(need, DecideNeed):
                    self.requests.append(need.request)
                    answer = decide(need.request) if callable(decide) else decide or Decision()
                elif isinstance(need, ActionNeed):
                    answer = ActionOutcome(result=ActionResult(data=dict(ORDER)))
        except StopIteration as stop:
            outcome: TurnOutcome = stop.value
            return outcome

    def events(self, outcome: TurnOutcome, name: str) -> list[MessageRecord]:
        return [r for r in outcome.records if r.direction == "event" and r.text == name]


def at_confirm(flows: FlowSet) -> Driver:
    driver = Driver(flows)
    driver.turn("refund please")  # turn 1
    driver.turn(ORDER_SMALL, Decision(entities={"order_id": ORDER_SMALL}))  # turn 2
    outcome = driver.turn("it arrived cracked", Decision(entities={"reason": "damaged"}))
    assert driver.conv.state == "confirm", outcome
    return driver


def test_memory_check_runs_every_third_turn(flows: FlowSet) -> None:
    driver = at_confirm(flows)
    for _ in range(4):
        driver.turn("how's your day?", Decision(off_topic=True, reply="Fine, thanks!"))
    assert [r.check_memory for r in driver.requests] == [False, False, True,
                                                         False, False, True, False]


def test_a_wrong_echo_is_logged_counted_and_corrected_once(flows: FlowSet) -> None:
    driver = at_confirm(flows)  # turns 1-3
    driver.turn("hmm?", Decision(off_topic=True))
    driver.turn("one question?", Decision(off_topic=True))
    # The echo is compared after the entity type normalises it: "damaged on arrival" is
    # the reason's English label.
    outcome = driver.turn("one more?", Decision(
        off_topic=True, pinned_echo={"order_id": ORDER_OTHER, "reason": "damaged on arrival"}))
    assert driver.requests[-1].check_memory  # turn 6
    [mismatch] = driver.events(outcome, "memory_mismatch")
    assert mismatch.data == {"mismatches": {"order_id": {"model": ORDER_OTHER,
                                                         "store": ORDER_SMALL}}}
    assert "memory_mismatch" in outcome.events
    assert driver.conv.counters["memory_mismatches"] == 1
    # The store is the truth: the echo never changes an entity.
    assert driver.conv.entities["order_id"]["v"] == ORDER_SMALL
    assert outcome.entity_changes == []

    driver.turn("and?", Decision(off_topic=True))
    driver.turn("so?", Decision(off_topic=True))
    note = (f"Correction from the system of record: order_id is '{ORDER_SMALL}', "
            f"not '{ORDER_OTHER}'.")
    assert [r.memory_note for r in driver.requests[-3:]] == ["", note, ""]


def test_agreeing_missing_and_unknown_echoes(flows: FlowSet) -> None:
    driver = Driver(flows)
    driver.turn("refund please")
    driver.turn("hi?", Decision(off_topic=True))
    # Nothing stored yet, nothing echoed: agreement.
    outcome = driver.turn("hello?", Decision(off_topic=True,
                                             pinned_echo={"order_id": None, "reason": ""}))
    assert [r.data for r in driver.events(outcome, "memory_check")] == [{"ok": True}]
    driver.turn("a?", Decision(off_topic=True))
    driver.turn("b?", Decision(off_topic=True))
    # A model that skips the echo is recorded as such.
    outcome = driver.turn("c?", Decision(off_topic=True))
    assert [r.data for r in driver.events(outcome, "memory_check")] == [
        {"ok": True, "echoed": False}]
    driver.turn("d?", Decision(off_topic=True))
    driver.turn("e?", Decision(off_topic=True))
    # The model believes in an order number the customer never gave.
    outcome = driver.turn("f?", Decision(off_topic=True,
                                         pinned_echo={"order_id": ORDER_SMALL}))
    [mismatch] = driver.events(outcome, "memory_mismatch")
    assert mismatch.data["mismatches"] == {"order_id": {"model": ORDER_SMALL, "store": None}}
    assert driver.conv.results["_memory_note"] == (
        "Correction from the system of record: order_id is not known yet.")


def test_small_talk_is_not_a_failed_attempt(flows: FlowSet) -> None:
    driver = Driver(flows)
    driver.turn("refund please")
    for _ in range(5):
        driver.turn("how's the weather?", Decision(off_topic=True, reply="Sunny here!"))
    assert driver.conv.owner == "bot" and driver.conv.state == "ask_order"
    assert "attempts:order_id" not in driver.conv.counters
    driver.turn("no idea", Decision())
    assert driver.conv.counters["attempts:order_id"] == 1


def test_progress_ends_a_digression_even_when_the_state_moves_on(flows: FlowSet) -> None:
    # Regression: the off-topic streak was reset only when progress kept the state, so
    # digressions before the order number and before the reason added up with those at
    # the read-back, and a patient customer was handed off.
    driver = Driver(flows)
    driver.turn("refund please")
    chat = Decision(off_topic=True, reply="Happy to chat!")
    for _ in range(5):
        driver.turn("how's your day?", chat)
    driver.turn(ORDER_SMALL, Decision(entities={"order_id": ORDER_SMALL}))
    assert driver.conv.state == "ask_reason"
    assert "off_topic" not in driver.conv.counters
    for _ in range(5):
        driver.turn("nice weather?", chat)
    driver.turn("it's cracked", Decision(entities={"reason": "damaged"}))
    for _ in range(8):
        driver.turn("a question?", chat)
    assert (driver.conv.owner, driver.conv.state) == ("bot", "confirm")
    # Endless digressions still end with a colleague: the 9th in a row (3 x 3 attempts).
    outcome = driver.turn("another question?", chat)
    assert outcome.handoff is not None and outcome.handoff.reason == "failures"


def test_decisions_are_recorded_with_the_tool_call_and_the_verdict(flows: FlowSet) -> None:
    driver = at_confirm(flows)
    outcome = driver.turn("what is this?", Decision(
        off_topic=True, reply="It's the read-back.", transition="refunded",
        tool_use_id="toolu_42", raw={"reply": "It's the read-back.", "transition": "refunded"}))
    [record] = driver.events(outcome, "decision")
    assert record.data == {
        "tool_use_id": "toolu_42",
        "input": {"reply": "It's the read-back.", "transition": "refunded"},
        "verdict": "state is now confirm; owner bot; transition_rejected; "
                   "the customer was shown: It's the read-back.",
    }
    # No tool call (the offline model): nothing to replay.
    outcome = driver.turn("what?", Decision(off_topic=True))
    assert driver.events(outcome, "decision") == []


# --- summaries and the verbatim window in the runner ---------------------------------------------


@dataclass
class Scripted(Model):
    """Decides with plain off-topic replies (tool calls included); summaries on demand."""

    name: str = "scripted"
    history_turns: int = 12
    summary: Callable[[SummaryRequest], Any] | None = None
    requests: list[DecisionRequest] = field(default_factory=list)
    summary_requests: list[SummaryRequest] = field(default_factory=list)

    async def decide(self, request: DecisionRequest) -> Decision:
        self.requests.append(request)
        n = len(self.requests)
        entities = {"order_id": ORDER_SMALL} if "HL" in request.text else {}
        return Decision(reply=f"reply {n}", entities=entities, off_topic=not entities,
                        satisfaction=4, tool_use_id=f"toolu_{n}",
                        raw={"reply": f"reply {n}"})

    async def route(self, request: RouteRequest) -> RouteDecision:
        return RouteDecision("refund")

    async def summarise(self, request: SummaryRequest) -> str:
        self.summary_requests.append(request)
        if self.summary is None:
            return f"- summary {len(self.summary_requests)}"
        result = self.summary(request)
        if asyncio.iscoroutine(result):
            result = await result
        return str(result)


@pytest.fixture
async def actions() -> AsyncIterator[ActionRegistry]:
    async with Shop() as shop:
        yield build_actions(shop)


@dataclass
class Chat:
    engine: Engine
    store: MemoryStore
    key: ConversationKey = KEY
    number: int = 0

    async def say(self, text: str) -> TurnOutcome:
        self.number += 1
        result = await self.engine.handle(Inbound(self.key, text, "demo:test",
                                                  datetime.now(UTC),
                                                  channel_message_id=f"m{self.number}"))
        assert result.outcome is not None
        return result.outcome

    async def conv(self) -> ConversationState:
        conv = await self.store.load(self.key)
        assert conv is not None
        return conv

    async def events(self, name: str) -> list[MessageRecord]:
        conv = await self.conv()
        return [r for r in await self.store.messages(conv.id)
                if r.direction == "event" and r.text == name]


def chat_with(flows: FlowSet, actions: ActionRegistry, model: Model,
              metrics: Metrics | None = None) -> Chat:
    store = MemoryStore()
    return Chat(Engine(flows, store, model, actions, fallback=OfflineModel(),
                       metrics=metrics), store)


async def test_summary_folds_older_turns_and_keeps_the_latest_verbatim(
    flows: FlowSet, actions: ActionRegistry
) -> None:
    model = Scripted()
    chat = chat_with(flows, actions, model)
    for n in range(1, 6):
        await chat.say(f"question {n}?")
        await asyncio.sleep(0)
    assert model.summary_requests == []  # five turns: not yet (after_turns: 5)
    await chat.say("question 6?")
    await chat.engine.drain()
    [request] = model.summary_requests
    # Everything before the 4th-last customer message is folded; tool calls included.
    assert [(i.role, i.text) for i in request.turns] == [
        ("customer", "question 1?"), ("bot", "reply 1"),
        ("customer", "question 2?"), ("bot", "reply 2")]
    assert request.turns[1].tool is not None and request.turns[1].tool["id"] == "toolu_1"
    conv = await chat.conv()
    assert conv.summary == "Customer language: en\n- summary 1"
    assert conv.counters["summary_turn"] == 2
    [event] = await chat.events("summary")
    assert event.data["ok"] is True and event.data["upto_seq"] == conv.counters["summary_seq"]
    records = await chat.store.messages(conv.id)
    first_kept = next(r for r in records if r.seq > conv.counters["summary_seq"])
    assert (first_kept.direction, first_kept.text) == ("in", "question 3?")

    # The next decision sees the summary and only the turns after it.
    await chat.say("question 7?")
    last = model.requests[-1]
    assert last.summary == conv.summary
    assert [i.text for i in last.history if i.role == "customer"] == [
        "question 3?", "question 4?", "question 5?", "question 6?"]
    assert last.history[0].role == "customer"


async def test_the_verbatim_window_is_bounded_while_a_summary_is_pending(
    tmp_path: Path, actions: ActionRegistry
) -> None:
    # Twenty digressions in a row: a flow that tolerates them (the demo flow hands off
    # at the 9th).
    flows = load_flows(flow_copy(tmp_path), ROOT / "prompts", actions.names())
    never = asyncio.Event()

    async def stuck(request: SummaryRequest) -> str:
        await never.wait()
        return "never"

    model = Scripted(summary=stuck)
    chat = chat_with(flows, actions, model)
    for n in range(20):
        await chat.say(f"question {n}?")
        await asyncio.sleep(0)
    assert len(model.summary_requests) == 1  # one summary at a time per conversation
    assert all(len(r.history) <= 12 for r in model.requests)
    assert all(not r.history or r.history[0].role == "customer" for r in model.requests)
    assert [i.text for i in model.requests[-1].history if i.role == "customer"][-1] == \
        "question 18?"
    never.set()
    await chat.engine.drain()


async def test_a_reply_never_waits_for_a_summary(flows: FlowSet,
                                                 actions: ActionRegistry) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(request: SummaryRequest) -> str:
        started.set()
        await release.wait()
        return "- the customer asks many questions"

    model = Scripted(summary=slow)
    chat = chat_with(flows, actions, model)
    for n in range(6):
        await chat.say(f"question {n}?")
    await asyncio.wait_for(started.wait(), 5)
    # The summary is in flight; the conversation goes on and every turn is answered.
    for n in range(6, 9):
        outcome = await chat.say(f"question {n}?")
        assert [o.text for o in outcome.outbound] == [f"reply {n + 1}"]
    assert (await chat.conv()).summary == ""
    release.set()
    await chat.engine.drain()
    conv = await chat.conv()
    assert conv.summary == "Customer language: en\n- the customer asks many questions"
    # The turns answered meanwhile are still in the verbatim window, none was lost.
    records = await chat.store.messages(conv.id, after_seq=conv.counters["summary_seq"])
    assert [r.text for r in records if r.direction == "in"] == [
        f"question {n}?" for n in range(2, 9)]
    assert conv.counters["turn"] == 9


@pytest.mark.parametrize("error", [ModelUnavailableError("claude summary call failed: "
                                                         "overloaded"),
                                   ModelOutputError("the summary came back empty")])
async def test_a_failed_summary_falls_back_to_the_extractive_one(
    flows: FlowSet, actions: ActionRegistry, error: Exception
) -> None:
    def fail(request: SummaryRequest) -> str:
        raise error

    metrics = Metrics(multiprocess_dir="")
    model = Scripted(summary=fail)
    chat = chat_with(flows, actions, model, metrics)
    for text in ["你好，我想问一下退款的事情？", "顺便问下，今天天气真好？", "你们周末上班吗？",
                 "请问一下发票怎么开？", "哈哈，问题有点多？", "还有一个问题？"]:
        await chat.say(text)
    await chat.engine.drain()
    conv = await chat.conv()
    assert conv.language == "zh"
    assert conv.summary == ("Customer language: zh\n- customer: 你好，我想问一下退款的事情？\n"
                            "- customer: 顺便问下，今天天气真好？")
    [event] = await chat.events("summary")
    assert event.data["ok"] is False
    assert metrics.registry.get_sample_value("helpline_summaries_total",
                                             {"outcome": "error"}) == 1
    outcome = await chat.say("好的")
    assert outcome.outbound  # the conversation goes on


async def test_the_running_summary_states_the_language_once(
    flows: FlowSet, actions: ActionRegistry
) -> None:
    # Regression: the previous summary went to the summariser with the engine's language
    # line, and the extractive summary, which keeps previous lines, repeated it.
    model = Scripted(summary=lambda r: extractive_summary(r.previous, r.turns, r.pinned))
    chat = chat_with(flows, actions, model)
    for n in range(8):
        await chat.say(f"question number {n}?")
        await asyncio.sleep(0)
    await chat.engine.drain()
    assert len(model.summary_requests) == 2
    assert model.summary_requests[1].previous == ("- customer: question number 0?\n"
                                                  "- customer: question number 1?")
    assert (await chat.conv()).summary == (
        "Customer language: en\n"
        + "\n".join(f"- customer: question number {n}?" for n in range(4)))


async def test_an_unexpected_summary_error_costs_context_not_the_conversation(
    flows: FlowSet, actions: ActionRegistry
) -> None:
    calls = 0

    def broken(request: SummaryRequest) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug in a summariser")
        return "- fine now"

    model = Scripted(summary=broken)
    chat = chat_with(flows, actions, model)
    for n in range(6):
        await chat.say(f"question {n}?")
    await chat.engine.drain()
    assert (await chat.conv()).summary == ""
    assert await chat.events("summary") == []
    # The next turn tries again (the conversation is not stuck as "summarising").
    await chat.say("question 6?")
    await chat.engine.drain()
    assert (await chat.conv()).summary == "Customer language: en\n- fine now"


def test_extractive_summary_keeps_substantive_customer_lines_and_stays_short() -> None:
    turns = [HistoryItem("customer", "ok"), HistoryItem("bot", "Anything else?")]
    turns += [HistoryItem("customer", f"question number {n} " + "x" * 200) for n in range(20)]
    summary = extractive_summary("- customer: earlier", turns, {})
    lines = summary.splitlines()
    assert len(lines) == 12
    assert all(line.startswith("- customer: question number ") for line in lines)
    assert lines[-1].startswith("- customer: question number 19")
    assert all(len(line) <= len("- customer: ") + 160 for line in lines)


async def test_count_tokens_endpoint_trims_when_the_estimate_is_near_the_budget(
    fake: FakeClaude, flows: FlowSet
) -> None:
    """With count_tokens on, near the budget the real count decides what is kept."""
    from engine.models.base import DecisionRequest, HistoryItem

    model = ClaudeModel(client=fake.client(max_retries=0, timeout=5.0), count_tokens=True)
    try:
        flow = flows["refund"]
        budget = budget_tokens(flow.spec.summary.max_context_tokens,
                               flow.spec.summary.safety_margin)
        # Enough history that the local estimate passes 80% of the budget.
        filler = "word " * 600
        history = []
        while estimate_tokens(filler) * (len(history) // 2) < 2 * budget:
            history += [HistoryItem("customer", filler), HistoryItem("bot", "ok")]
        request = DecisionRequest(flow, "ask_order", "my order is HL26110842", "en", {}, {},
                                  history=history)
        await model.decide(request)
        counted = [r for r in fake.requests if r.path == "/v1/messages/count_tokens"]
        assert counted, "the count-tokens endpoint was not used near the budget"
        sent = [r for r in fake.requests if r.path == "/v1/messages"][-1]
        from tests.fakes.claude_api import count_request_tokens

        assert count_request_tokens(sent.json) <= budget
    finally:
        await model.close()
