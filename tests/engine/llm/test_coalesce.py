"""Coalescing: identical requests in flight make one upstream call, in and across processes."""

from __future__ import annotations

import asyncio

from engine.flow.compiled import FlowSet
from engine.llm.coalesce import CoalescingModel
from engine.llm.stack import build_model_stack
from engine.metrics import Metrics
from engine.models.claude import ClaudeModel
from engine.models.offline import OfflineModel
from tests.engine.llm.conftest import faq_request, route_request, shop_request
from tests.engine.llm.support import FaqBrain, settings_for
from tests.fakes.claude_api import FakeClaude

SONNET = "claude-sonnet-5"


async def test_concurrent_identical_requests_make_one_call(
        flows: FlowSet, fake: FakeClaude, brain: FaqBrain, claude: ClaudeModel) -> None:
    fake.latency = 0.2
    metrics = Metrics(multiprocess_dir="")
    model = build_model_stack(settings_for(), claude, OfflineModel(), metrics)
    requests = [faq_request(flows, "Can I get an invoice?", conversation_id=f"c{i}")
                for i in range(12)]
    decisions = await asyncio.gather(*(model.decide(r) for r in requests))
    assert fake.count() == 1
    assert {d.transition for d in decisions} == {"invoice"}
    assert sum(1 for d in decisions if d.tool_use_id) == 1  # followers get no call id
    assert model.coalescer.saved_local == 11  # type: ignore[attr-defined]
    text = metrics.render_latest()[0].decode()
    assert 'helpline_coalesced_calls_total{kind="inflight"} 11.0' in text


async def test_concurrent_identical_routes_make_one_call(
        flows: FlowSet, fake: FakeClaude, brain: FaqBrain, claude: ClaudeModel) -> None:
    fake.latency = 0.1
    model = build_model_stack(settings_for(), claude, OfflineModel())
    routes = await asyncio.gather(*(model.route(route_request(flows, "包邮吗"))
                                    for _ in range(5)))
    assert {r.flow for r in routes} == {"faq"}
    assert fake.count() == 1


async def test_personal_requests_are_not_coalesced(test_flows: FlowSet, fake: FakeClaude,
                                                   claude: ClaudeModel) -> None:
    fake.latency = 0.05
    model = CoalescingModel(claude, decision_model=SONNET, route_model="claude-haiku-4-5")
    requests = [shop_request(test_flows, "faq", entities={"order_id": f"HL0000000{i}"})
                for i in range(3)]
    await asyncio.gather(*(model.decide(r) for r in requests))
    assert fake.count() == 3


async def test_the_call_survives_its_first_caller_being_cancelled(
        flows: FlowSet, fake: FakeClaude, brain: FaqBrain, claude: ClaudeModel) -> None:
    fake.latency = 0.2
    model = CoalescingModel(claude, decision_model=SONNET, route_model="claude-haiku-4-5")
    first = asyncio.ensure_future(model.decide(faq_request(flows, "how long is the warranty")))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(model.decide(faq_request(flows, "how long is the warranty",
                                                            conversation_id="c2")))
    await asyncio.sleep(0.01)
    first.cancel()
    decision = await second
    assert decision.transition == "warranty"
    assert fake.count() == 1


async def test_identical_requests_share_one_call_across_processes(
        flows: FlowSet, fake: FakeClaude, brain: FaqBrain, claude: ClaudeModel,
        redis_url: str) -> None:
    from redis.asyncio import Redis

    fake.latency = 0.3
    clients = [Redis.from_url(redis_url) for _ in range(3)]
    try:
        # Three "server processes": separate layers and clients, one Redis between them.
        processes = [CoalescingModel(claude, decision_model=SONNET,
                                     route_model="claude-haiku-4-5", redis=c,
                                     wait_timeout=5.0) for c in clients]
        request = faq_request(flows, "What are your opening hours?")
        decisions = await asyncio.gather(*(p.decide(request) for p in processes for _ in
                                           range(3)))
        assert fake.count() == 1
        assert {d.transition for d in decisions} == {"store_hours"}
        assert sum(p.saved_remote for p in processes) == 2
        assert sum(p.saved_local for p in processes) == 6
        assert not await clients[0].keys("helpline:inflight:lock:*")  # released
    finally:
        for c in clients:
            await c.aclose()


async def test_followers_call_themselves_when_the_leader_fails(
        flows: FlowSet, fake: FakeClaude, brain: FaqBrain, claude: ClaudeModel,
        redis_url: str) -> None:
    from redis.asyncio import Redis

    fake.latency = 0.1
    fake.enqueue_error(400, message="bad request for the leader only")
    one, two = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        a = CoalescingModel(claude, decision_model=SONNET, route_model="claude-haiku-4-5",
                            redis=one)
        b = CoalescingModel(claude, decision_model=SONNET, route_model="claude-haiku-4-5",
                            redis=two)
        request = faq_request(flows, "can I pay with alipay?")
        results = await asyncio.gather(a.decide(request), b.decide(request),
                                       return_exceptions=True)
        answers = [r for r in results if not isinstance(r, BaseException)]
        assert len(answers) == 1 and answers[0].transition == "payment"
        assert fake.count() == 2
    finally:
        await one.aclose()
        await two.aclose()
