"""Whole conversations through the demo flows, the real engine and a fresh demo shop.

Two halves:

* the offline model, with customers writing the way customers write (typos,
  small talk, Chinese, English and both at once);
* Claude, scripted turn by turn through the fake Messages API and the real SDK,
  to show that the engine decides and the model only proposes: a refund above
  the cap is never approved whatever the model says, undeclared transitions and
  invalid entity values are rejected, and an unavailable or confused model falls
  back to the offline one without the customer noticing more than a plainer reply.

Plus the delivery guarantees: a redelivered message is answered once, and the
turns of one conversation run one at a time in arrival order.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from itertools import count, pairwise
from pathlib import Path
from typing import Any

import pytest

from engine.actions import ActionRegistry
from engine.core.types import Inbound, Outbound
from engine.demo.actions import build_actions
from engine.demo.shop import (
    ORDER_BIG,
    ORDER_LOST,
    ORDER_OTHER,
    ORDER_PAID,
    ORDER_SHIPPED,
    ORDER_SMALL,
    ORDER_TRANSIT,
    TRACKING_LOST,
    TRACKING_TRANSIT,
    Shop,
)
from engine.flow.compiled import FlowSet
from engine.flow.loader import load_flows
from engine.models.base import (
    Decision,
    DecisionRequest,
    Model,
    RouteDecision,
    RouteRequest,
    SummaryRequest,
)
from engine.models.claude import ClaudeModel
from engine.models.offline import OfflineModel
from engine.runner import Engine, TurnResult
from engine.store.base import ConversationKey, ConversationState, MessageRecord
from engine.store.memory import MemoryStore
from tests.fakes.claude_api import FakeClaude, MessageReply, RawReply

ROOT = Path(__file__).resolve().parents[2]
CUSTOMER = "demo:test"
DECISION = "record_decision"
ROUTE = "choose_flow"

_threads = count()


# --- harness ----------------------------------------------------------------------------------


@dataclass
class Chat:
    """One customer talking to an engine; keeps what every turn returned."""

    engine: Engine
    store: MemoryStore
    key: ConversationKey
    customer: str = CUSTOMER
    results: list[TurnResult] = field(default_factory=list)

    def inbound(self, text: str, **options: Any) -> Inbound:
        return Inbound(self.key, text, self.customer, datetime.now(UTC), **options)

    async def say(self, text: str, **options: Any) -> TurnResult:
        result = await self.engine.handle(self.inbound(text, **options))
        self.results.append(result)
        return result

    async def talk(self, turns: Sequence[str]) -> list[TurnResult]:
        return [await self.say(text) for text in turns]

    async def rate(self, rating: int) -> TurnResult:
        return await self.say(str(rating), kind="rating", rating=rating)

    async def conv(self) -> ConversationState:
        conv = await self.store.load(self.key)
        assert conv is not None
        return conv

    async def records(self) -> list[MessageRecord]:
        return await self.store.messages((await self.conv()).id)

    async def events(self, name: str | None = None) -> list[MessageRecord]:
        return [r for r in await self.records()
                if r.direction == "event" and (name is None or r.text == name)]

    async def entities(self) -> dict[str, Any]:
        return {k: v["v"] for k, v in (await self.conv()).entities.items()}

    @property
    def last(self) -> str:
        """Everything the bot said in the last turn, except the disclosure."""
        return "\n".join(replies(self.results[-1]))


def replies(result: TurnResult) -> list[str]:
    return [o.text for o in result.outbound if o.kind != "disclosure"]


def answers(result: TurnResult) -> list[Outbound]:
    """The bot's answer(s) to a message: not the disclosure or the rating buttons."""
    return [o for o in result.outbound if o.kind not in ("disclosure", "rating")]


@dataclass
class Harness:
    shop: Shop
    actions: ActionRegistry
    flows: FlowSet

    def engine(self, model: Model, *, fallback: Model | None = None,
               flows: FlowSet | None = None) -> tuple[Engine, MemoryStore]:
        store = MemoryStore()
        return Engine(flows or self.flows, store, model, self.actions, fallback=fallback), store

    def chat(self, model: Model | None = None, *, fallback: Model | None = None,
             flows: FlowSet | None = None, channel: str = "test") -> Chat:
        engine, store = self.engine(model or OfflineModel(), fallback=fallback, flows=flows)
        return Chat(engine, store, ConversationKey(channel, "shop", f"t{next(_threads)}"))


@pytest.fixture(scope="module")
def demo_flows() -> FlowSet:
    """The demo flows, loaded once (they are immutable); checked against the actions."""
    return load_flows(ROOT / "flows", ROOT / "prompts", build_actions(Shop()).names())


@pytest.fixture
async def harness(demo_flows: FlowSet) -> AsyncIterator[Harness]:
    """A fresh in-memory demo shop, its actions and the demo flows."""
    async with Shop() as shop:
        yield Harness(shop, build_actions(shop), demo_flows)


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or text blocks (tool blocks skipped)."""
    if isinstance(content, str):
        return content
    return "\n".join(str(b.get("text", "")) for b in content if b.get("type") == "text")


def decision(**fields: Any) -> dict[str, Any]:
    """A schema-valid record_decision input; ``fields`` override."""
    body: dict[str, Any] = {"reply": "", "entities": {}, "transition": None,
                            "satisfaction": 4, "wants_human": False}
    body.update(fields)
    return body


def route_to(flow: str | None, wants_human: bool = False) -> dict[str, Any]:
    return {"flow": flow, "wants_human": wants_human}


# --- offline model: refunds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("turns", "done"),
    [
        pytest.param(
            ["hey there! hope ur having a good day",
             "so my blender showed up with a cracked jug, can i get my mony back?",
             f"sure, its {ORDER_SMALL} i think",
             "yep go ahead"],
            "Done! Refund RF", id="en"),
        pytest.param(
            ["你好呀",
             "杯子寄到的时候就摔坏了，我要退款",
             f"订单号是{ORDER_SMALL}",
             "好的，确认"],
            "已办好！退款单 RF", id="zh"),
        pytest.param(
            [f"hi 我要退款 order {ORDER_SMALL}, 东西坏了",
             "确认，谢谢"],
            "已办好！退款单 RF", id="mixed"),
    ],
)
async def test_refund_of_a_small_order(harness: Harness, turns: list[str], done: str) -> None:
    chat = harness.chat()
    await chat.talk(turns)

    conv = await chat.conv()
    assert (conv.flow, conv.state, conv.owner) == ("refund", "refunded", "bot")
    assert await chat.entities() == {"order_id": ORDER_SMALL, "reason": "damaged"}
    refunds = await harness.shop.refunds_for_order(ORDER_SMALL)
    assert len(refunds) == 1
    assert (refunds[0].amount, refunds[0].reason, refunds[0].status) == (
        Decimal("129.00"), "damaged", "approved")
    assert done in chat.last
    assert refunds[0].id in chat.last
    assert "129.00" in chat.last
    # The conversation ends by asking for a rating.
    assert chat.results[-1].outbound[-1].kind == "rating"


async def test_refund_read_back_happens_before_anything_is_refunded(harness: Harness) -> None:
    chat = harness.chat()
    await chat.say("I'd like to return my headphones and get refunded pls, they stopped working")
    await chat.say(ORDER_SMALL)
    assert "To confirm: a refund of ¥129.00 for order HL26110842" in chat.last
    assert (await chat.conv()).state == "confirm"
    assert await harness.shop.refunds_for_order(ORDER_SMALL) == []
    await chat.say("actually no, never mind")
    assert (await chat.conv()).state == "cancelled"
    assert await harness.shop.refunds_for_order(ORDER_SMALL) == []


@pytest.mark.parametrize(
    "turns",
    [
        pytest.param(["hi, i'd like a refund please",
                      f"order {ORDER_OTHER}",
                      f"oh wait sorry, wrong one - it's {ORDER_SMALL}",
                      "it arrived cracked",
                      "yes"], id="en-next-turn"),
        pytest.param(["退款",
                      f"订单号{ORDER_OTHER}",
                      f"不对不对，我看错了，应该是{ORDER_SMALL}",
                      "碎了",
                      "确认"], id="zh-next-turn"),
        pytest.param([f"refund for {ORDER_OTHER} pls -- no sorry, {ORDER_SMALL}. it came smashed",
                      "yep"], id="en-same-message"),
    ],
)
async def test_corrected_order_number_is_the_one_refunded(
    harness: Harness, turns: list[str]
) -> None:
    chat = harness.chat()
    await chat.talk(turns)

    conv = await chat.conv()
    assert (conv.flow, conv.state) == ("refund", "refunded")
    assert (await chat.entities())["order_id"] == ORDER_SMALL
    assert len(await harness.shop.refunds_for_order(ORDER_SMALL)) == 1
    assert await harness.shop.refunds_for_order(ORDER_OTHER) == []
    assert conv.results["refund"]["order_id"] == ORDER_SMALL


async def test_correction_after_lookup_rewinds_and_looks_up_again(harness: Harness) -> None:
    chat = harness.chat()
    await chat.talk(["hello, refund please", f"{ORDER_OTHER}"])
    assert (await chat.conv()).results["order"]["order_id"] == ORDER_OTHER
    await chat.say(f"hmm no, typo, the right one is {ORDER_SMALL}")
    assert await chat.events("correction_rewind")
    conv = await chat.conv()
    assert conv.results["order"]["order_id"] == ORDER_SMALL  # looked up again
    history = await chat.store.entity_history(conv.id, "order_id")
    assert [c.value for c in history] == [ORDER_OTHER, ORDER_SMALL]


# --- offline model: logistics -------------------------------------------------------------


TRACKING: dict[str, tuple[list[str], str]] = {
    "en": (["hiya, any idea where my package is? been waiting forever lol",
            f"order {ORDER_TRANSIT}"], "is on its way"),
    "en-one-message": ([f"hey, wheres my parcel?? order {ORDER_TRANSIT} thx"], "is on its way"),
    "zh": (["请问我的快递到哪了？", ORDER_TRANSIT], "正在运输中"),
    "zh-tracking-number": ([f"我的快递到哪了 单号{TRACKING_TRANSIT}"], "正在运输中"),
}


async def test_tracking_a_parcel_in_transit(harness: Harness) -> None:
    # Tracking only reads the shop: one shop, one conversation per phrasing.
    for name, (turns, words) in TRACKING.items():
        chat = harness.chat()
        await chat.talk(turns)

        conv = await chat.conv()
        assert (conv.flow, conv.state, conv.owner) == ("logistics", "in_transit", "bot"), name
        assert (await chat.entities())["order_id"] == ORDER_TRANSIT
        assert TRACKING_TRANSIT in chat.last, name
        assert words in chat.last, name
        assert "2026-11-22" in chat.last  # the carrier's ETA, never a guess


@pytest.mark.parametrize(
    "turns",
    [
        pytest.param([f"my parcel {ORDER_LOST} hasn't had a tracking update in almost two "
                      "weeks, is it lost??", "yes please, open a claim"], id="en"),
        pytest.param([f"你好，我的包裹{ORDER_LOST}好多天都没动静了，是不是丢了",
                      "好的 麻烦帮我申请"], id="zh"),
    ],
)
async def test_lost_parcel_claim(harness: Harness, turns: list[str]) -> None:
    chat = harness.chat()
    await chat.say(turns[0])
    assert (await chat.conv()).state == "stuck"
    assert TRACKING_LOST in chat.last
    assert await harness.shop.claims_for_order(ORDER_LOST) == []  # offered, not opened

    await chat.say(turns[1])
    conv = await chat.conv()
    assert (conv.flow, conv.state) == ("logistics", "claim_opened")
    claims = await harness.shop.claims_for_order(ORDER_LOST)
    assert len(claims) == 1
    assert claims[0].id in chat.last


async def test_address_change_before_shipping(harness: Harness) -> None:
    new = "Room 1203, 88 Century Ave, Pudong, Shanghai 200120"
    chat = harness.chat()
    await chat.say(f"hi, I moved last week - can you change the delivery address on order "
                   f"{ORDER_PAID}?")
    assert "new delivery address" in chat.last
    await chat.say(new)

    conv = await chat.conv()
    assert (conv.flow, conv.state) == ("logistics", "address_changed")
    order = await harness.shop.get_order(ORDER_PAID)
    assert order is not None and order.shipping_address == new
    assert new in chat.last


async def test_address_change_after_shipping_is_refused(harness: Harness) -> None:
    chat = harness.chat()
    before = await harness.shop.get_order(ORDER_SHIPPED)
    assert before is not None
    await chat.say(f"need to update the shipping address for {ORDER_SHIPPED} pls")
    await chat.say("No. 5 Wulumuqi Rd, Xuhui District, Shanghai 200031")

    conv = await chat.conv()
    assert (conv.flow, conv.state) == ("logistics", "address_refused")
    assert conv.results["address"]["reason"] == "already_shipped"
    assert "already shipped" in chat.last
    after = await harness.shop.get_order(ORDER_SHIPPED)
    assert after is not None and after.shipping_address == before.shipping_address


# --- offline model: handoffs --------------------------------------------------------------


HUMAN_REQUESTS = ["转人工", "I want to talk to a real person",
                  "can i pls speak to a human? this is going nowhere", "帮我转人工客服，谢谢"]


async def test_explicit_request_for_a_human(harness: Harness) -> None:
    # One shop for every phrasing (nothing here writes to it); one conversation each.
    for text in HUMAN_REQUESTS:
        chat = harness.chat()
        result = await chat.say(text)

        conv = await chat.conv()
        assert (conv.owner, conv.handoff_reason) == ("pending_human", "request"), text
        assert result.outcome is not None and result.outcome.handoff is not None
        assert result.outcome.handoff.reason == "request"
        assert [o.kind for o in answers(result)] == ["handoff"], text
        # From now on the bot is muted: a human owns the conversation.
        follow_up = await chat.say("hello? anyone there")
        assert follow_up.outbound == []
        assert follow_up.outcome is not None and follow_up.outcome.muted


async def test_request_for_a_human_mid_flow_keeps_what_was_collected(harness: Harness) -> None:
    chat = harness.chat()
    await chat.talk([f"我要退款，订单{ORDER_SMALL}", "东西坏了"])
    assert (await chat.conv()).state == "confirm"
    result = await chat.say("算了 还是转人工吧")

    conv = await chat.conv()
    assert (conv.owner, conv.handoff_reason, conv.state) == ("pending_human", "request", "human")
    assert result.outcome is not None and result.outcome.handoff is not None
    assert result.outcome.handoff.entities == {"order_id": ORDER_SMALL, "reason": "damaged"}
    assert ORDER_SMALL in chat.last  # the flow's own handoff text, in Chinese
    assert "转接人工客服" in chat.last
    assert await harness.shop.refunds_for_order(ORDER_SMALL) == []


async def test_low_rating_hands_off(harness: Harness) -> None:
    chat = harness.chat()
    await chat.say(f"where's my order {ORDER_TRANSIT}? tracking page is blank")
    assert (await chat.conv()).state == "in_transit"
    result = await chat.rate(2)

    conv = await chat.conv()
    assert conv.owner == "pending_human"
    assert conv.handoff_reason == "satisfaction"
    assert result.outcome is not None and result.outcome.handoff is not None
    assert result.outcome.handoff.priority == "high"
    assert [o.kind for o in answers(result)] == ["handoff"]


async def test_good_rating_is_thanked(harness: Harness) -> None:
    chat = harness.chat()
    await chat.say(f"where's my order {ORDER_TRANSIT}?")
    result = await chat.rate(5)
    conv = await chat.conv()
    assert conv.owner == "bot" and conv.handoff_reason is None
    assert replies(result) == ["Thank you for your feedback!"]


# --- Claude, scripted: the engine decides -------------------------------------------------


@pytest.mark.parametrize(
    ("turns", "expect"),
    [
        pytest.param(
            {"first": "hi, my kettle arrived with a big dent in it, i'd like a refund",
             "order": f"sure: {ORDER_SMALL}",
             "smalltalk": "hmm how long does it take to get the money back?",
             "yes": "ok yes please do it"},
            {"lang": "en", "chat_reply": "Usually within 3 working days once approved.",
             "done": "Done! Refund RF"},
            id="en"),
        pytest.param(
            {"first": "你好，收到的水壶有个大坑，想退款",
             "order": f"好的：{ORDER_SMALL}",
             "smalltalk": "退款大概多久能到账呀？",
             "yes": "嗯嗯 确认"},
            {"lang": "zh", "chat_reply": "批准后一般 3 个工作日内到账。",
             "done": "已办好！退款单 RF"},
            id="zh"),
    ],
)
async def test_refund_journey_with_claude(
    harness: Harness, fake: FakeClaude, claude: ClaudeModel,
    turns: dict[str, str], expect: dict[str, str]
) -> None:
    chat = harness.chat(claude, fallback=OfflineModel())
    lang = expect["lang"]
    fake.enqueue_tool_use(ROUTE, route_to("refund"))
    fake.enqueue_tool_use(DECISION, decision(entities={"reason": "damaged"}, language=lang))
    await chat.say(turns["first"])
    assert (await chat.conv()).state == "ask_order"

    fake.enqueue_tool_use(DECISION, decision(entities={"order_id": ORDER_SMALL}, language=lang))
    await chat.say(turns["order"])
    assert (await chat.conv()).state == "confirm"
    assert "129.00" in chat.last

    # Staying in a state, the model's own words reach the customer.
    fake.enqueue_tool_use(DECISION, decision(reply=expect["chat_reply"], language=lang))
    await chat.say(turns["smalltalk"])
    assert chat.last == expect["chat_reply"]
    assert (await chat.conv()).state == "confirm"
    assert await harness.shop.refunds_for_order(ORDER_SMALL) == []

    fake.enqueue_tool_use(DECISION, decision(transition="confirm", language=lang))
    await chat.say(turns["yes"])

    conv = await chat.conv()
    assert (conv.flow, conv.state, conv.language) == ("refund", "refunded", lang)
    assert len(await harness.shop.refunds_for_order(ORDER_SMALL)) == 1
    assert expect["done"] in chat.last
    assert chat.engine.stats["fallbacks"] == 0
    assert all(r.outcome is not None and r.outcome.model == "claude-sonnet-5"
               for r in chat.results)

    # What Claude saw: one route call, then one decision per turn, each with the
    # current state's prompt and the whole conversation so far.
    assert fake.queued == 0
    requests = fake.requests
    assert [r.forced_tool for r in requests] == [ROUTE] + [DECISION] * 4
    assert all(r.status == 200 for r in requests)
    assert ['Current step: "ask_order"' in r.system_text for r in requests[1:]] == [
        True, True, False, False]
    assert 'Current step: "confirm"' in requests[-1].system_text
    assert f"({lang})" in requests[-1].system_text
    last = requests[-1].messages
    roles = [m["role"] for m in last]
    assert roles[0] == roles[-1] == "user"
    assert all(a != b for a, b in pairwise(roles))
    assert text_of(last[0]["content"]) == turns["first"]
    assert text_of(last[-1]["content"]).endswith(turns["yes"])
    # The model's earlier reply is part of the transcript it sees (as text or as its tool call).
    assert expect["chat_reply"] in json.dumps(last[-2], ensure_ascii=False)


@pytest.mark.parametrize("lang", ["en", "zh"])
async def test_refund_above_the_cap_is_never_auto_approved(
    harness: Harness, fake: FakeClaude, claude: ClaudeModel, lang: str
) -> None:
    chat = harness.chat(claude, fallback=OfflineModel())
    first = {"en": f"laptop {ORDER_BIG} arrived smashed, refund it",
             "zh": f"笔记本{ORDER_BIG}到货就摔坏了，给我退款"}[lang]
    fake.enqueue_tool_use(ROUTE, route_to("refund"))
    fake.enqueue_tool_use(DECISION, decision(
        entities={"order_id": ORDER_BIG, "reason": "damaged"}, language=lang))
    await chat.say(first)
    assert (await chat.conv()).state == "confirm"
    assert "2,899.00" in chat.last  # the amount comes from the shop

    # The model agrees, invents a tiny amount and promises the refund.
    fake.enqueue_tool_use(DECISION, decision(
        transition="confirm", reply="All done, I refunded ¥1.00 to your card!",
        entities={"amount": "1.00", "refund_amount": 1}, pinned={"order_id": ORDER_BIG},
        satisfaction=5, language=lang))
    result = await chat.say("yes" if lang == "en" else "是的")

    conv = await chat.conv()
    assert (conv.owner, conv.handoff_reason, conv.state) == ("pending_human", "policy", "human")
    assert result.outcome is not None and result.outcome.handoff is not None
    assert result.outcome.handoff.reason == "policy"
    assert await harness.shop.refunds_for_order(ORDER_BIG) == []
    assert "refund" not in conv.results
    assert all("1.00" not in text for r in chat.results for text in replies(r))
    rejected = {e.data["entity"] for e in await chat.events("entity_rejected")}
    assert rejected == {"amount", "refund_amount"}
    # The flow's guard sent it to a human before the refund action was even tried.
    assert await chat.events("policy_violation") == []

    # Asking again changes nothing: a human owns the conversation, the model is not asked.
    calls = fake.count()
    fake.enqueue_tool_use(DECISION, decision(transition="confirm"))
    again = await chat.say("just refund it now!!")
    assert again.outbound == [] and fake.count() == calls
    assert await harness.shop.refunds_for_order(ORDER_BIG) == []


async def test_refund_above_the_cap_without_the_flow_guard(
    harness: Harness, fake: FakeClaude, claude: ClaudeModel, tmp_path: Path
) -> None:
    source = (ROOT / "flows" / "refund.yaml").read_text(encoding="utf-8")
    guarded = """      confirm:
        - to: human
          when: order.amount > policy.refund_auto_approve_max.amount
          reason: policy
        - to: refund
"""
    assert guarded in source
    (tmp_path / "refund.yaml").write_text(source.replace(guarded, "      confirm: refund\n"),
                                          encoding="utf-8")
    flows = load_flows(tmp_path, ROOT / "prompts", harness.actions.names())
    assert len(flows.flows) == 1  # one flow: no routing call

    chat = harness.chat(claude, fallback=OfflineModel(), flows=flows)
    fake.enqueue_tool_use(DECISION, decision(
        entities={"order_id": ORDER_BIG, "reason": "defective"}))
    await chat.say(f"the laptop from {ORDER_BIG} won't turn on. refund")
    assert (await chat.conv()).state == "confirm"
    fake.enqueue_tool_use(DECISION, decision(
        transition="confirm", reply="Refunded ¥9.90, enjoy!", entities={"amount": "9.90"}))
    result = await chat.say("yes go")

    conv = await chat.conv()
    assert (conv.owner, conv.handoff_reason) == ("pending_human", "policy")
    violations = await chat.events("policy_violation")
    assert [v.data["action"] for v in violations] == ["issue_refund"]
    assert "exceeds the auto-approval cap" in violations[0].data["reason"]
    assert result.outcome is not None and result.outcome.handoff is not None
    assert result.outcome.handoff.reason == "policy"
    assert await harness.shop.refunds_for_order(ORDER_BIG) == []
    assert "9.90" not in chat.last


#: Triggers `ask_reason` does not declare: another state's intent, a state name,
#: the engine's own triggers, another flow's intent, an action name.
UNDECLARED = ["confirm", "refund", "done", "error", "claim", "issue_refund"]


async def test_undeclared_transition_is_rejected(
    harness: Harness, fake: FakeClaude, claude: ClaudeModel
) -> None:
    for trigger in UNDECLARED:
        chat = harness.chat(claude, fallback=OfflineModel())
        fake.enqueue_tool_use(ROUTE, route_to("refund"))
        fake.enqueue_tool_use(DECISION, decision(entities={"order_id": ORDER_SMALL}))
        await chat.say(f"refund for {ORDER_SMALL} please")
        assert (await chat.conv()).state == "ask_reason"

        fake.enqueue_tool_use(DECISION, decision(transition=trigger))
        result = await chat.say("just do it, refund me")

        after = await chat.conv()
        assert (after.state, after.owner) == ("ask_reason", "bot"), trigger
        rejected = await chat.events("transition_rejected")
        assert [(e.data["trigger"], e.data["state"]) for e in rejected] == [
            (trigger, "ask_reason")]
        assert result.outcome is not None and "state" not in result.outcome.events
        assert "what went wrong with the order" in chat.last  # asked again for the reason
        assert await harness.shop.refunds_for_order(ORDER_SMALL) == []
    assert fake.queued == 0


INVALID_ORDER_IDS: list[Any] = ["12345", 12345, "HL2611084", True, f"{ORDER_SMALL}0"]


async def test_invalid_entity_value_is_rejected(
    harness: Harness, fake: FakeClaude, claude: ClaudeModel
) -> None:
    for value in INVALID_ORDER_IDS:
        chat = harness.chat(claude, fallback=OfflineModel())
        fake.enqueue_tool_use(ROUTE, route_to("refund"))
        fake.enqueue_tool_use(DECISION, decision())
        await chat.say("hello, I want my money back")
        assert (await chat.conv()).state == "ask_order"

        fake.enqueue_tool_use(DECISION, decision(entities={"order_id": value}))
        await chat.say("12345")

        conv = await chat.conv()
        assert conv.state == "ask_order", value
        assert "order_id" not in conv.entities, value
        assert [e.data["entity"] for e in await chat.events("entity_rejected")] == ["order_id"]
        assert await chat.store.entity_history(conv.id, "order_id") == []
        assert "need the order number" in chat.last  # the first reprompt
    assert fake.queued == 0


async def test_unavailable_claude_falls_back_to_offline(
    harness: Harness, fake: FakeClaude
) -> None:
    fake.fail_when(status=529)  # every call, retries included
    model = ClaudeModel(client=fake.client(max_retries=1, timeout=5.0))
    chat = harness.chat(model, fallback=OfflineModel())
    try:
        await chat.talk(["my mug got delivered smashed to bits, refund pls", ORDER_SMALL, "yes"])
    finally:
        await model.close()

    conv = await chat.conv()
    assert (conv.flow, conv.state) == ("refund", "refunded")
    assert len(await harness.shop.refunds_for_order(ORDER_SMALL)) == 1
    # Each message was answered exactly once, by the fallback.
    for result in chat.results:
        assert len(answers(result)) == 1
        assert result.outcome is not None and result.outcome.model == "offline"
    records = await chat.records()
    stored_out = [r for r in records if r.direction == "out"]
    sent = [o for r in chat.results for o in r.outbound]
    assert [(r.seq, r.text) for r in stored_out] == [(o.seq, o.text) for o in sent]
    assert [r.text for r in records if r.direction == "in"] == [
        "my mug got delivered smashed to bits, refund pls", ORDER_SMALL, "yes"]
    # Route + 3 decisions failed (each tried twice) before falling back.
    assert chat.engine.stats["fallbacks"] == 4
    assert fake.count() == 8
    assert all(r.status == 529 for r in fake.requests)


MALFORMED: dict[str, MessageReply | RawReply] = {
    "satisfaction-9": MessageReply.tool_use(DECISION, decision(satisfaction=9)),
    "wrong-types": MessageReply.tool_use(DECISION, decision(transition=7, reply=["x"])),
    "entity-dict": MessageReply.tool_use(
        DECISION, decision(entities={"order_id": {"id": ORDER_SMALL}})),
    "no-tool-call": MessageReply.text("Of course! Refund approved."),
    "broken-json": RawReply(200, "{oops", content_type="application/json"),
    "not-a-message": RawReply(200, {"not": "a message"}),
}


async def test_malformed_claude_output_falls_back(
    harness: Harness, fake: FakeClaude, claude: ClaudeModel
) -> None:
    text = f"I want a refund for {ORDER_SMALL}, the lamp came broken"
    for name, bad in MALFORMED.items():
        chat = harness.chat(claude, fallback=OfflineModel())
        fake.enqueue_tool_use(ROUTE, route_to("refund"))
        fake.enqueue(bad)
        result = await chat.say(text)

        assert chat.engine.stats["fallbacks"] == 1, name
        assert result.outcome is not None and result.outcome.model == "offline", name
        assert "To confirm: a refund of ¥129.00" in chat.last, name
        assert "Refund approved" not in chat.last
        records = await chat.records()
        assert [r.text for r in records if r.direction == "in"] == [text]
        assert [r.text for r in records if r.direction == "out"] == [
            o.text for o in result.outbound]
        assert (await chat.conv()).state == "confirm"
    assert fake.queued == 0
    assert await harness.shop.refunds_for_order(ORDER_SMALL) == []


async def test_malformed_route_falls_back(harness: Harness, fake: FakeClaude,
                                          claude: ClaudeModel) -> None:
    chat = harness.chat(claude, fallback=OfflineModel())
    fake.enqueue_tool_use(ROUTE, route_to("billing"))  # not a flow
    fake.enqueue_tool_use(DECISION, decision(entities={"order_id": ORDER_TRANSIT}))
    await chat.say(f"wo ist mein paket? where is my parcel {ORDER_TRANSIT}")
    conv = await chat.conv()
    assert (conv.flow, conv.state) == ("logistics", "in_transit")
    assert chat.engine.stats["fallbacks"] == 1


# --- delivery guarantees -------------------------------------------------------------------------


async def test_redelivered_message_is_answered_once(harness: Harness, fake: FakeClaude,
                                                    claude: ClaudeModel) -> None:
    chat = harness.chat(claude, fallback=OfflineModel(), channel="whatsapp")
    fake.enqueue_tool_use(ROUTE, route_to("logistics"))
    fake.enqueue_tool_use(DECISION, decision(entities={"order_id": ORDER_TRANSIT}))
    text = f"where is {ORDER_TRANSIT}?"

    first = await chat.say(text, channel_message_id="wamid.0001")
    second = await chat.say(text, channel_message_id="wamid.0001")

    assert not first.duplicate and answers(first)
    assert second.duplicate
    assert second.outbound == []
    assert fake.count() == 2  # route + decision, once
    records = await chat.records()
    assert [r.channel_message_id for r in records if r.direction == "in"] == ["wamid.0001"]
    assert chat.engine.stats["duplicates"] == 1
    # A different message id is a new message.
    fake.enqueue_tool_use(ROUTE, route_to("logistics"))
    fake.enqueue_tool_use(DECISION, decision())
    third = await chat.say(text, channel_message_id="wamid.0002")
    assert not third.duplicate


async def test_concurrent_redelivery_is_answered_once(harness: Harness) -> None:
    chat = harness.chat()
    text = f"track {ORDER_TRANSIT} please"
    results = await asyncio.gather(*(chat.engine.handle(chat.inbound(
        text, channel_message_id="tg-77")) for _ in range(3)))
    assert sorted(r.duplicate for r in results) == [False, True, True]
    records = await chat.records()
    assert [r.text for r in records if r.direction == "in"] == [text]


class SlowModel(Model):
    """The offline model, but each answer takes as long as its message says."""

    name = "slow"
    history_turns = 0

    def __init__(self, delays: dict[str, float]) -> None:
        self.inner = OfflineModel()
        self.delays = delays
        self.running = 0
        self.max_running = 0
        self.seen: list[str] = []

    async def _wait(self, text: str) -> None:
        self.seen.append(text)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(self.delays.get(text, 0.0))
        finally:
            self.running -= 1

    async def decide(self, request: DecisionRequest) -> Decision:
        await self._wait(request.text)
        return await self.inner.decide(request)

    async def route(self, request: RouteRequest) -> RouteDecision:
        await self._wait(request.text)
        return await self.inner.route(request)

    async def summarise(self, request: SummaryRequest) -> str:
        return await self.inner.summarise(request)


async def test_turns_of_one_conversation_run_in_order(harness: Harness) -> None:
    texts = ["hello, I want a refund", ORDER_SMALL, "the glass was cracked when it arrived",
             "yes please", "thx, that was quick"]
    # Earlier messages take longer: run concurrently, they would finish in reverse.
    elsewhere = f"where is {ORDER_TRANSIT}"
    model = SlowModel({elsewhere: 0.05} | {t: 0.1 - 0.02 * i for i, t in enumerate(texts)})
    chat = harness.chat(model)
    other = Chat(chat.engine, chat.store, ConversationKey("test", "shop", "other"))

    results = await asyncio.gather(
        *(chat.say(t, channel_message_id=f"m{i}") for i, t in enumerate(texts)),
        other.say(elsewhere, channel_message_id="o1"),
    )

    records = await chat.records()
    inbound = [r for r in records if r.direction == "in"]
    assert [r.text for r in inbound] == texts
    assert [r.channel_message_id for r in inbound] == [f"m{i}" for i in range(5)]
    seqs = [r.seq for r in records]
    assert seqs == list(range(1, len(records) + 1))
    # Every reply is stored right after the message it answers, before the next one.
    positions = {r.channel_message_id: i for i, r in enumerate(records) if r.direction == "in"}
    for i, result in enumerate(results[:5]):
        start = positions[f"m{i}"]
        end = positions.get(f"m{i + 1}", len(records))
        assert {o.seq for o in result.outbound} <= {r.seq for r in records[start:end]}
    # ...and each answer fits its message, so the flow itself ran in order.
    assert "reason for the refund" in "\n".join(replies(results[1]))
    assert "To confirm" in "\n".join(replies(results[2]))
    assert "Done! Refund" in "\n".join(replies(results[3]))
    assert len(await harness.shop.refunds_for_order(ORDER_SMALL)) == 1
    # One conversation's turns never overlapped; another conversation ran alongside.
    assert model.max_running == 2
    assert list(dict.fromkeys(t for t in model.seen if t in texts)) == texts
