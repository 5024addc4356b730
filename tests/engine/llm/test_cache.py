"""The response cache against the fake Claude: hits, TTL per policy, nothing personal shared."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.flow.compiled import FlowSet
from engine.llm.cache import CachingModel, MemoryCache, RedisCache, decode_decision
from engine.llm.keys import decide_scope
from engine.llm.stack import build_model_stack
from engine.metrics import Metrics
from engine.models.base import Decision, DecisionRequest, HistoryItem, Model
from engine.models.claude import ClaudeModel
from engine.models.offline import OfflineModel
from tests.engine.llm.conftest import faq_request, route_request, shop_request
from tests.engine.llm.support import FaqBrain, settings_for
from tests.fakes.claude_api import FakeClaude, MessageReply, forced_tool

SONNET = "claude-sonnet-5"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stack(claude: ClaudeModel, clock: Clock | None = None, metrics: Metrics | None = None,
          redis: Any = None) -> Model:
    return build_model_stack(settings_for(), claude, OfflineModel(), metrics, redis,
                             clock=clock or Clock())


async def test_faq_answer_is_cached_and_served_without_a_call(
        flows: FlowSet, fake: FakeClaude, brain: FaqBrain, claude: ClaudeModel) -> None:
    metrics = Metrics(multiprocess_dir="")
    model = stack(claude, metrics=metrics)
    first = await model.decide(faq_request(flows, "How long does shipping take?"))
    assert first.transition == "shipping_time" and first.tool_use_id
    # Same question, other customer, other spelling: normalised to the same key.
    second = await model.decide(faq_request(flows, "how long does  shipping take?",
                                            conversation_id="c2"))
    assert fake.count() == 1
    assert second.transition == "shipping_time" and second.reply == first.reply
    assert second.tool_use_id is None and second.raw is None  # per-call fields never shared
    assert second.satisfaction is None and not second.entities
    text = metrics.render_latest()[0].decode()
    assert 'helpline_cache_requests_total{policy="faq",result="hit"} 1.0' in text
    assert 'helpline_cache_requests_total{policy="faq",result="miss"} 1.0' in text


async def test_routes_are_cached_too(flows: FlowSet, fake: FakeClaude, brain: FaqBrain,
                                     claude: ClaudeModel) -> None:
    model = stack(claude)
    a = await model.route(route_request(flows, "do you accept paypal?"))
    b = await model.route(route_request(flows, "Do you accept PayPal?"))
    assert a.flow == b.flow == "faq"
    assert fake.count() == 1


async def test_ttl_expiry_per_policy(test_flows: FlowSet, fake: FakeClaude,
                                     claude: ClaudeModel) -> None:
    fake.route(forced_tool("record_decision"), MessageReply.tool_use("record_decision", {
        "reply": "We open at 10.", "entities": {}, "transition": None, "satisfaction": 4,
        "wants_human": False}))
    clock = Clock()
    model = stack(claude, clock)
    faq, short = shop_request(test_flows, "faq"), shop_request(test_flows, "prices")
    await model.decide(faq)
    await model.decide(short)
    assert fake.count() == 2
    clock.now += 299
    await model.decide(faq)
    await model.decide(short)
    assert fake.count() == 2  # both still fresh
    clock.now += 2  # 301 s: the short (5 min) answer expired, the faq (24 h) one did not
    await model.decide(faq)
    await model.decide(short)
    assert fake.count() == 3
    clock.now += 24 * 3600 - 300  # just past 24 h since the faq answer was stored
    await model.decide(faq)
    assert fake.count() == 4


@pytest.mark.parametrize(("state", "fields", "reason"), [
    ("private", {}, "cache policy is never"),
    ("personal", {}, "names a specific value of entities"),
    ("collecting", {}, "collects entities"),
    ("faq", {"entities": {"order_id": "HL12345678"}}, "entity values"),
    ("faq", {"results": {"order": {"found": True}}}, "action results"),
    ("faq", {"summary": "customer is upset about HL12345678"}, "context"),
    ("faq", {"text": "my email is [EMAIL_1], when are you open?"}, "personal data"),
    ("faq", {"text": "when are you open? parcel SF1234567890"}, "long number"),
])
async def test_personal_requests_are_never_cached(
        test_flows: FlowSet, fake: FakeClaude, claude: ClaudeModel, state: str,
        fields: dict[str, Any], reason: str) -> None:
    fake.route(forced_tool("record_decision"), MessageReply.tool_use("record_decision", {
        "reply": "Noted.", "entities": {}, "transition": None, "satisfaction": 4,
        "wants_human": False}))
    request = shop_request(test_flows, state, **fields)
    scope = decide_scope(request, SONNET)
    assert scope.policy == "never" and reason in scope.reason
    model = stack(claude)
    await model.decide(request)
    await model.decide(request)
    assert fake.count() == 2


async def test_answers_with_entity_values_or_from_a_history_are_not_stored(
        test_flows: FlowSet, fake: FakeClaude, claude: ClaudeModel) -> None:
    fake.route(forced_tool("record_decision"), MessageReply.tool_use("record_decision", {
        "reply": "Got it.", "entities": {"order_id": "HL12345678"}, "transition": None,
        "satisfaction": 4, "wants_human": False}))
    model = stack(claude)
    await model.decide(shop_request(test_flows, "faq"))
    await model.decide(shop_request(test_flows, "faq"))
    assert fake.count() == 2  # the answer carried an entity value: not stored
    fake.reset()
    fake.route(forced_tool("record_decision"), MessageReply.tool_use("record_decision", {
        "reply": "As you said earlier...", "entities": {}, "transition": None,
        "satisfaction": 4, "wants_human": False}))
    history = (HistoryItem("customer", "I am Ann, my order is late"),
               HistoryItem("bot", "Sorry Ann"))
    with_history = shop_request(test_flows, "faq", history=history)
    assert not decide_scope(with_history, SONNET).producible
    await model.decide(with_history)
    await model.decide(shop_request(test_flows, "faq"))
    assert fake.count() == 2  # produced with a history in view: never served to others


async def test_fallback_answers_are_not_cached(flows: FlowSet, fake: FakeClaude,
                                               claude: ClaudeModel) -> None:
    fake.fail_when(None, 529, retry_after_ms=1)
    model = stack(claude)
    request = faq_request(flows, "is shipping free?")
    first = await model.decide(request)
    assert first.model == "offline" and first.transition == "shipping_cost"
    fake.reset()
    FaqBrain(flows).install(fake)
    second = await model.decide(request)
    assert second.model == SONNET  # the offline answer was not stored


async def test_redis_cache_is_shared_by_processes_and_expires(
        flows: FlowSet, fake: FakeClaude, brain: FaqBrain, claude: ClaudeModel,
        redis_url: str) -> None:
    from redis.asyncio import Redis

    one, two = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        # Two "processes": separate stacks, separate clients, one Redis.
        a = stack(claude, redis=one)
        b = stack(claude, redis=two)
        await a.decide(faq_request(flows, "do you ship internationally?"))
        hit = await b.decide(faq_request(flows, "Do you ship internationally?",
                                         conversation_id="other"))
        assert hit.transition == "international"
        assert fake.count() == 1
        keys = await one.keys("helpline:cache:*")
        assert keys and all(b"internationally" not in k for k in keys)  # hashed keys only
        value = await one.get(keys[0])
        assert decode_decision(value.decode()) is not None
        ttl = await one.pttl(keys[0])
        assert 86_000_000 < ttl <= 86_400_000  # faq: 24 h
        # Expiry in Redis itself (PX): a short TTL, then a miss.
        cache = CachingModel(claude, RedisCache(one), decision_model=SONNET,
                             route_model="claude-haiku-4-5", ttls={"faq": 0.2})
        request = faq_request(flows, "what payment methods do you accept?")
        await cache.decide(request)
        await cache.decide(request)
        assert fake.count() == 2
        await asyncio.sleep(0.3)
        await cache.decide(request)
        assert fake.count() == 3
    finally:
        await one.aclose()
        await two.aclose()


async def test_memory_cache_is_bounded() -> None:
    cache = MemoryCache(max_entries=3)
    for i in range(5):
        await cache.set(str(i), "v", 60)
    assert len(cache) == 3
    assert await cache.get("0") is None and await cache.get("4") == "v"


async def test_a_broken_redis_costs_only_the_cache(flows: FlowSet, fake: FakeClaude,
                                                   brain: FaqBrain,
                                                   claude: ClaudeModel) -> None:
    from redis.asyncio import Redis

    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        model = CachingModel(claude, RedisCache(dead), decision_model=SONNET,
                             route_model="claude-haiku-4-5")
        decision: Decision = await model.decide(faq_request(flows, "is shipping free?"))
        assert decision.transition == "shipping_cost"
    finally:
        await dead.aclose()


def test_scope_key_covers_language_model_and_template(flows: FlowSet) -> None:
    base = faq_request(flows, "is shipping free?")
    key = decide_scope(base, SONNET).key
    assert key == decide_scope(faq_request(flows, "Is  shipping free?"), SONNET).key
    assert key != decide_scope(faq_request(flows, "is shipping free?", language="zh"),
                               SONNET).key
    assert key != decide_scope(base, "claude-opus-5").key
    other_state: DecisionRequest = faq_request(flows, "is shipping free?",
                                               state="shipping_cost")
    assert key != decide_scope(other_state, SONNET).key
