"""429/529 storms: backoff, the breaker, the offline fallback; every customer answered once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from engine.core.types import Inbound, Outbound
from engine.demo.actions import build_actions
from engine.demo.shop import Shop
from engine.errors import ModelUnavailableError
from engine.flow.compiled import FlowSet
from engine.llm.resilience import CircuitBreaker, ResilientModel
from engine.llm.stack import ModelStack, build_model_stack
from engine.metrics import Metrics
from engine.models.claude import ClaudeModel
from engine.models.offline import OfflineModel
from engine.runner import Engine
from engine.safety.privacy import Privacy
from engine.store.base import ConversationKey
from engine.store.memory import MemoryStore
from tests.engine.llm.conftest import faq_request
from tests.engine.llm.support import FaqBrain, settings_for
from tests.fakes.claude_api import FakeClaude, MessageReply, forced_tool

QUESTIONS = ["how long does shipping take", "is shipping free", "do you ship abroad",
             "what is your return policy", "can I pay with alipay", "can I get an invoice",
             "how long is the warranty", "what are your opening hours", "包邮吗", "保修多久"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def engine_for(flows: FlowSet, model: Any, metrics: Metrics | None = None
               ) -> tuple[Engine, MemoryStore, list[Outbound]]:
    store = MemoryStore()
    engine = Engine(flows, store, model, build_actions(Shop()), fallback=OfflineModel(),
                    privacy=Privacy(), metrics=metrics)
    sent: list[Outbound] = []

    async def sender(message: Outbound) -> None:
        sent.append(message)

    engine.register_sender("test", sender)
    return engine, store, sent


def inbound(i: int, text: str) -> Inbound:
    return Inbound(ConversationKey("test", "shop", f"customer-{i}"), text, f"demo:{i}",
                   datetime.now(UTC), channel_message_id=f"m-{i}")


async def test_a_529_storm_opens_the_breaker_and_every_customer_is_answered_once(
        flows: FlowSet, fake: FakeClaude, brain: FaqBrain) -> None:
    storm = fake.fail_when(None, 529, retry_after_ms=1)
    metrics = Metrics(multiprocess_dir="")
    claude = ClaudeModel(client=fake.client(max_retries=1, timeout=5.0))
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    model = build_model_stack(settings_for(model_attempts=3, breaker_failures=3), claude,
                              OfflineModel(), metrics)
    model.resilient.sleep = sleep
    engine, store, sent = engine_for(flows, model, metrics)
    messages = [inbound(i, QUESTIONS[i % len(QUESTIONS)] + f" (customer {i})")
                for i in range(20)]
    results = await asyncio.gather(*(engine.handle(m) for m in messages))

    # Backoff: the SDK retried each request once (x-stainless-retry-count 1) and the
    # whole-call retry slept with exponential backoff before the breaker opened.
    assert {r.retry_count for r in fake.requests} == {0, 1}
    assert waits and all(w > 0 for w in waits)
    assert model.breaker.state == "open" and model.breaker.opened >= 1
    text = metrics.render_latest()[0].decode()
    assert 'helpline_circuit_state{model="claude-sonnet-5"} 2.0' in text
    assert 'helpline_model_fallbacks_total{reason="breaker_open"}' in text
    # 20 routes + 20 decisions, all answered by the offline model once the breaker opened
    # (the first calls failed, their retries found it open).
    assert sum(model.resilient.fallbacks.values()) == 40
    calls_during_storm = storm.hits
    assert calls_during_storm < 20 * 2 * 2  # the breaker stopped the hammering

    # Every customer got exactly one answer (offline fallback), nothing lost or doubled.
    for message, result in zip(messages, results, strict=True):
        assert result.outcome is not None and not result.duplicate
        conv = await store.load(message.key)
        assert conv is not None
        inbound_records = [r for r in await store.messages(conv.id) if r.direction == "in"]
        assert len(inbound_records) == 1
    per_customer = Counter(o.key.thread for o in sent if o.kind not in ("disclosure",))
    assert set(per_customer) == {m.key.thread for m in messages}
    assert all(n == 1 for n in per_customer.values())
    # Redelivered messages are not answered again.
    again = await asyncio.gather(*(engine.handle(m) for m in messages))
    assert all(r.duplicate for r in again)


async def test_429s_back_off_then_succeed(flows: FlowSet, fake: FakeClaude,
                                          brain: FaqBrain) -> None:
    fake.fail_when(None, 429, retry_after_ms=1, times=3)
    claude = ClaudeModel(client=fake.client(max_retries=1, timeout=5.0))
    model = build_model_stack(settings_for(model_attempts=3, breaker_failures=5), claude,
                              OfflineModel())
    decision = await model.decide(faq_request(flows, "can I get a fapiao"))
    # SDK: attempt + 1 retry (both 429); whole-call retry: 429, then its SDK retry succeeds.
    assert decision.model == "claude-sonnet-5" and decision.transition == "invoice"
    assert fake.count() == 4
    assert model.breaker.state == "closed" and model.resilient.retries == 1


async def test_half_open_probe_closes_the_breaker(flows: FlowSet, fake: FakeClaude,
                                                  brain: FaqBrain,
                                                  claude: ClaudeModel) -> None:
    clock = Clock()
    metrics = Metrics(multiprocess_dir="")
    metrics.register_models(["claude-sonnet-5"])
    breaker = CircuitBreaker("claude-sonnet-5", failure_threshold=2, reset_timeout=10,
                             clock=clock, metrics=metrics)
    model = ResilientModel(claude, OfflineModel(), breaker=breaker, attempts=1,
                           metrics=metrics)
    rule = fake.fail_when(None, 529, retry_after_ms=1)
    for _ in range(2):
        assert (await model.decide(faq_request(flows, "is shipping free"))).model == "offline"
    assert breaker.state == "open"
    assert (await model.decide(faq_request(flows, "is shipping free"))).model == "offline"
    assert rule.hits == 2  # open: no call at all
    rule.remove()
    clock.now += 10
    decision = await model.decide(faq_request(flows, "is shipping free"))
    assert decision.model == "claude-sonnet-5" and breaker.state == "closed"
    assert 'helpline_circuit_state{model="claude-sonnet-5"} 0.0' in \
        metrics.render_latest()[0].decode()


async def test_a_failed_probe_reopens_the_breaker(flows: FlowSet, fake: FakeClaude,
                                                  claude: ClaudeModel) -> None:
    clock = Clock()
    breaker = CircuitBreaker("m", failure_threshold=1, reset_timeout=5, clock=clock)
    model = ResilientModel(claude, OfflineModel(), breaker=breaker, attempts=1)
    fake.fail_when(None, 529, retry_after_ms=1)
    await model.decide(faq_request(flows, "is shipping free"))
    clock.now += 5
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.release()
    await model.decide(faq_request(flows, "is shipping free"))
    assert breaker.state == "open" and breaker.opened == 2


async def test_the_time_budget_switches_to_the_fallback(flows: FlowSet, fake: FakeClaude,
                                                        brain: FaqBrain,
                                                        claude: ClaudeModel) -> None:
    fake.latency = 2.0
    model = build_model_stack(settings_for(turn_budget_seconds=0.3), claude, OfflineModel())
    started = time.perf_counter()
    decision = await model.decide(faq_request(flows, "how long does shipping take"))
    assert time.perf_counter() - started < 1.0
    assert decision.model == "offline" and decision.transition == "shipping_time"
    assert model.resilient.fallbacks == {"budget": 1}


async def test_schema_errors_fall_back_without_tripping_the_breaker(
        flows: FlowSet, fake: FakeClaude, claude: ClaudeModel) -> None:
    fake.route(forced_tool("record_decision"), MessageReply.tool_use(
        "record_decision", {"reply": 42, "satisfaction": "high"}))
    model = build_model_stack(settings_for(breaker_failures=1), claude, OfflineModel())
    for _ in range(3):
        decision = await model.decide(faq_request(flows, "do you accept paypal"))
        assert decision.model == "offline"
    assert model.resilient.fallbacks == {"output_schema": 3}
    assert model.breaker.state == "closed"
    assert fake.count() == 3  # no whole-call retry on a schema error


async def test_without_a_fallback_the_error_reaches_the_caller(
        flows: FlowSet, fake: FakeClaude, claude: ClaudeModel) -> None:
    fake.fail_when(None, 529, retry_after_ms=1)
    model = ResilientModel(claude, None, attempts=2, wait_initial=0.001, wait_max=0.002)
    try:
        await model.decide(faq_request(flows, "is shipping free"))
    except ModelUnavailableError:
        pass
    else:  # pragma: no cover
        raise AssertionError("expected ModelUnavailableError")
    assert fake.count() == 2


async def test_stack_is_transparent_for_the_engine(flows: FlowSet, fake: FakeClaude,
                                                   brain: FaqBrain,
                                                   claude: ClaudeModel) -> None:
    model: ModelStack = build_model_stack(settings_for(), claude, OfflineModel())
    assert model.name == "claude" and model.history_turns == claude.history_turns
    engine, _, _ = engine_for(flows, model)
    result = await engine.handle(inbound(1, "How long does shipping take?"))
    texts = [o.text for o in result.outbound if o.kind != "disclosure"]
    assert texts == [flows["faq"].states["shipping_time"].say.render("en", {})]  # type: ignore[union-attr]
    # The second customer asking the same costs no call at all (route and decision cached).
    before = fake.count()
    await engine.handle(inbound(2, "how long does shipping take?"))
    assert fake.count() == before == 2
    await model.close()
