"""Concurrency limits, queue time, the busy bound, and the runner's busy notice + retry."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from engine.flow.compiled import FlowSet
from engine.llm.errors import ModelBusyError
from engine.llm.limits import ConcurrencyLimiter, LimitedModel
from engine.llm.stack import build_model_stack
from engine.metrics import Metrics
from engine.models.base import DecisionRequest
from engine.models.claude import ClaudeModel
from engine.models.offline import OfflineModel
from tests.engine.llm.conftest import faq_request, shop_request
from tests.engine.llm.support import FaqBrain, settings_for
from tests.engine.llm.test_resilience import engine_for, inbound
from tests.fakes.claude_api import FakeClaude


async def test_calls_in_flight_are_limited_and_queue_time_measured(
        test_flows: FlowSet, fake: FakeClaude, claude: ClaudeModel) -> None:
    fake.latency = 0.1
    metrics = Metrics(multiprocess_dir="")
    limiter = ConcurrencyLimiter(global_limit=3, per_model_limit=3, queue_bound=20,
                                 metrics=metrics)
    model = LimitedModel(claude, limiter, {"decision": "claude-sonnet-5"})
    requests = [shop_request(test_flows, "private", text=f"question {i}") for i in range(9)]
    await asyncio.gather(*(model.decide(r) for r in requests))
    assert fake.max_in_flight == 3 and limiter.max_in_flight == 3
    text = metrics.render_latest()[0].decode()
    assert "helpline_model_queue_seconds_count 9.0" in text
    assert "helpline_model_inflight 0.0" in text


async def test_per_model_limit(test_flows: FlowSet, fake: FakeClaude,
                               claude: ClaudeModel) -> None:
    fake.latency = 0.05
    limiter = ConcurrencyLimiter(global_limit=10, per_model_limit=2)
    model = LimitedModel(claude, limiter, {"decision": "claude-sonnet-5"})
    await asyncio.gather(*(model.decide(shop_request(test_flows, "private", text=f"q{i}"))
                           for i in range(6)))
    assert fake.max_in_flight == 2


async def test_past_the_queue_bound_calls_are_rejected_as_busy(
        test_flows: FlowSet, fake: FakeClaude, claude: ClaudeModel) -> None:
    fake.latency = 0.2
    metrics = Metrics(multiprocess_dir="")
    limiter = ConcurrencyLimiter(global_limit=1, per_model_limit=1, queue_bound=2,
                                 metrics=metrics)
    model = LimitedModel(claude, limiter)
    results = await asyncio.gather(
        *(model.decide(shop_request(test_flows, "private", text=f"q{i}")) for i in range(5)),
        return_exceptions=True)
    busy = [r for r in results if isinstance(r, ModelBusyError)]
    assert len(busy) == 2 and fake.count() == 3
    assert "helpline_model_busy_rejections_total 2.0" in metrics.render_latest()[0].decode()


async def test_waiting_too_long_is_busy_too(test_flows: FlowSet, fake: FakeClaude,
                                            claude: ClaudeModel) -> None:
    fake.latency = 0.3
    limiter = ConcurrencyLimiter(global_limit=1, per_model_limit=1, queue_bound=10,
                                 queue_timeout=0.05)
    model = LimitedModel(claude, limiter)
    results = await asyncio.gather(
        *(model.decide(shop_request(test_flows, "private", text=f"q{i}")) for i in range(2)),
        return_exceptions=True)
    assert isinstance(results[1], ModelBusyError)


async def test_busy_is_not_retried_or_answered_by_the_fallback(
        test_flows: FlowSet, fake: FakeClaude, claude: ClaudeModel) -> None:
    fake.latency = 0.2
    model = build_model_stack(settings_for(model_concurrency=1, model_queue_bound=0), claude,
                              OfflineModel())
    results = await asyncio.gather(
        *(model.decide(shop_request(test_flows, "private", text=f"q{i}")) for i in range(2)),
        return_exceptions=True)
    assert isinstance(results[1], ModelBusyError)
    assert model.resilient.fallbacks == {} and model.breaker.state == "closed"


async def test_the_customer_gets_a_busy_notice_and_the_turn_is_retried(
        flows: FlowSet, fake: FakeClaude, brain: FaqBrain, claude: ClaudeModel) -> None:
    fake.latency = 0.15
    model = build_model_stack(settings_for(model_concurrency=1, model_queue_bound=0), claude,
                              OfflineModel())
    engine, store, sent = engine_for(flows, model)
    engine.busy_retry_delay = 0.1
    messages = [inbound(i, q) for i, q in enumerate(["is shipping free?", "包邮吗",
                                                     "do you ship abroad?"])]
    results = await asyncio.gather(*(engine.handle(m) for m in messages))
    busy = [r for r in results if r.busy]
    assert busy  # one slot, no queue: the others were put off
    notices = [o for o in sent if o.kind == "notice"]
    assert len(notices) == len(busy) and all(o.seq == 0 for o in notices)
    await engine.drain()
    # Every message answered exactly once, nothing stored twice, notices not stored.
    answers = Counter(o.key.thread for o in sent if o.kind not in ("disclosure", "notice"))
    assert answers == {m.key.thread: 1 for m in messages}
    for message in messages:
        conv = await store.load(message.key)
        assert conv is not None
        records = await store.messages(conv.id)
        assert sum(1 for r in records if r.direction == "in") == 1
        assert not any("busy" in r.text for r in records)
    assert engine.stats["busy"] >= len(busy)
    assert (await engine.handle(messages[0])).duplicate


async def test_the_last_busy_retry_is_answered_by_the_fallback(
        flows: FlowSet, fake: FakeClaude, brain: FaqBrain, claude: ClaudeModel) -> None:
    fake.latency = 0.5
    model = build_model_stack(settings_for(model_concurrency=1, model_queue_bound=0), claude,
                              OfflineModel())
    engine, _store, sent = engine_for(flows, model)
    engine.busy_retry_delay = 0.01
    engine.busy_retries = 2
    hog = asyncio.ensure_future(model.decide(shop_request_for(flows)))
    await asyncio.sleep(0.05)  # the only slot is taken for 0.5 s
    result = await engine.handle(inbound(1, "how long is the warranty?"))
    assert result.busy
    await engine.drain()
    answers = [o for o in sent if o.kind not in ("disclosure", "notice")]
    assert len(answers) == 1  # answered by the offline model on the last try
    assert engine.stats["fallbacks"] >= 1
    await hog


def shop_request_for(flows: FlowSet) -> DecisionRequest:
    return faq_request(flows, "a long question that holds the slot", conversation_id="hog")


@pytest.mark.parametrize("limit", [0, -1])
def test_limits_must_be_positive(limit: int) -> None:
    with pytest.raises(ValueError):
        ConcurrencyLimiter(global_limit=limit)
