"""A FakeClaude that answers like a competent model on the FAQ flow, and stack helpers.

Shared by the model-layer tests and ``bench/llm_layer.py``. The "brain" picks
transitions and flows with the offline model's matcher (so the fake proposes
what a real model would), and every reply quotes the question it answers, so a
test can check that each customer got the answer to *their* question.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

from engine.flow.compiled import Flow, FlowSet
from engine.models.offline import OfflineModel
from engine.textnorm import normalize
from tests.fakes.claude_api import FakeClaude, MessageReply, RecordedRequest, forced_tool

QUESTION = re.compile(r'<question id="(\d+)">(.*?)</question>', re.DOTALL)


class FaqBrain:
    """Routes to flows and picks FAQ topics the way a good model would."""

    def __init__(self, flows: FlowSet, faq: str = "faq") -> None:
        self.flows = flows
        self.faq: Flow = flows[faq]
        self.offline = OfflineModel()
        self.decisions = 0
        self.batches = 0
        self.batch_sizes: list[int] = []

    def topic(self, text: str) -> str | None:
        state = self.faq.states[self.faq.start]
        return self.offline.intent(normalize(text),
                                   [(t.name, t.examples) for t in state.intents])

    def flow_for(self, text: str, names: Sequence[str]) -> str | None:
        flows = [f for f in self.flows if f.name in names]
        return self.offline.intent(normalize(text),
                                   [(f.name, f.router_examples) for f in flows])

    @staticmethod
    def answer(text: str, topic: str | None) -> str:
        return f"[{topic or 'general'}] answer to: {text}"

    def route_reply(self, request: RecordedRequest) -> MessageReply:
        tool = request.tool("choose_flow") or {}
        names = [n for n in tool.get("input_schema", {}).get("properties", {})
                 .get("flow", {}).get("enum", []) if n]
        return MessageReply.tool_use("choose_flow", {
            "flow": self.flow_for(request.last_user_text, names), "wants_human": False,
            "satisfaction": 4})

    def decision_reply(self, request: RecordedRequest) -> MessageReply:
        self.decisions += 1
        text = request.last_user_text
        topic = self.topic(text)
        return MessageReply.tool_use("record_decision", {
            "reply": self.answer(text, topic), "entities": {}, "transition": topic,
            "satisfaction": 4, "wants_human": False})

    def batch_reply(self, request: RecordedRequest) -> MessageReply:
        self.batches += 1
        questions = QUESTION.findall(request.last_user_text)
        self.batch_sizes.append(len(questions))
        parts = []
        for qid, escaped in questions:
            text = html.unescape(escaped)
            topic = self.topic(text)
            parts.append(f'<answer id="{qid}" transition="{topic or "none"}">'
                         f"{html.escape(self.answer(text, topic), quote=False)}</answer>")
        return MessageReply.text("\n".join(parts))

    def install(self, fake: FakeClaude) -> None:
        fake.route(forced_tool("choose_flow"), self.route_reply)
        fake.route(forced_tool("record_decision"), self.decision_reply)
        fake.route(lambda r: "<question id=" in r.last_user_text, self.batch_reply)


def upstream(fake: FakeClaude) -> int:
    """Messages API calls the fake received."""
    return fake.count()


def settings_for(**overrides: Any) -> Any:
    """Settings for a test stack: fast retries and a short batching window."""
    from engine.config import Settings

    values: dict[str, Any] = {
        "model_concurrency": 16, "model_concurrency_per_model": 16, "model_queue_bound": 64,
        "model_queue_timeout": 5.0, "turn_budget_seconds": 10.0, "model_attempts": 2,
        "retry_wait_initial": 0.01, "retry_wait_max": 0.05, "breaker_failures": 3,
        "breaker_reset_seconds": 30.0, "batch_window_ms": 0,
    }
    values.update(overrides)
    return Settings(**values)
