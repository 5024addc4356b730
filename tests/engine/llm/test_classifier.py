"""The optional Claude content classifier: a hit becomes a safe reply, not a decision."""

from __future__ import annotations

from engine.flow.compiled import FlowSet
from engine.llm.classifier import CLASSIFY_TOOL, ClaudeClassifier
from engine.llm.errors import policy_reply
from engine.llm.stack import build_model_stack
from engine.metrics import Metrics
from engine.models.claude import ClaudeModel
from engine.models.offline import OfflineModel
from tests.engine.llm.support import FaqBrain, settings_for
from tests.engine.llm.test_resilience import engine_for, inbound
from tests.fakes.claude_api import FakeClaude, MessageReply, RecordedRequest, forced_tool


def verdict(request: RecordedRequest) -> MessageReply:
    restricted = "hurt" in request.last_user_text
    return MessageReply.tool_use(CLASSIFY_TOOL, {"restricted": restricted,
                                                 "category": "violence" if restricted else None})


async def test_restricted_content_gets_the_safe_reply(flows: FlowSet, fake: FakeClaude,
                                                      brain: FaqBrain,
                                                      claude: ClaudeModel) -> None:
    fake.route(forced_tool(CLASSIFY_TOOL), verdict)
    fake._routes.insert(0, fake._routes.pop())
    metrics = Metrics(multiprocess_dir="")
    model = build_model_stack(settings_for(content_classifier=True), claude, OfflineModel(),
                              metrics)
    engine, _, _ = engine_for(flows, model)
    # Within a journey (the first message of a journey is answered by the start state's
    # own text, whatever the decision says: a turn-core rule).
    await engine.handle(inbound(1, "I want a refund"))
    message = inbound(1, "I will hurt the courier")
    result = await engine.handle(type(message)(message.key, message.text, message.customer,
                                               message.received_at, channel_message_id="m-1b"))
    replies = [o.text for o in result.outbound if o.kind != "disclosure"]
    assert replies == [policy_reply("en")]
    decisions = [r for r in fake.requests if r.forced_tool == "record_decision"]
    assert all("hurt" not in r.last_user_text for r in decisions)
    assert CLASSIFY_TOOL in [r.forced_tool for r in fake.requests]
    assert 'role="classify"' in metrics.render_latest()[0].decode()

    ok = await engine.handle(inbound(2, "is shipping free?"))
    assert [o.text for o in ok.outbound if o.kind != "disclosure"] != [policy_reply("en")]
    assert "record_decision" in [r.forced_tool for r in fake.requests]


async def test_verdicts_are_cached_and_an_outage_fails_open(fake: FakeClaude,
                                                            claude: ClaudeModel) -> None:
    fake.route(forced_tool(CLASSIFY_TOOL), verdict)
    classifier = ClaudeClassifier(claude)
    assert (await classifier.classify("I will hurt you")).category == "violence"
    assert (await classifier.classify("I  will HURT you")).restricted
    assert classifier.calls == 1
    fake.fail_when(None, 529, retry_after_ms=1)
    assert not (await classifier.classify("something new")).restricted
