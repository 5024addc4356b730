"""The model layer's metrics are exported under the names docs/metrics.md documents."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from engine.flow.compiled import FlowSet
from engine.llm.stack import build_model_stack
from engine.metrics import Metrics
from engine.models.claude import ClaudeModel
from engine.models.offline import OfflineModel
from tests.engine.llm.conftest import faq_request, route_request
from tests.engine.llm.support import FaqBrain, settings_for
from tests.fakes.claude_api import FakeClaude

ROOT = Path(__file__).resolve().parents[3]

#: Families the model layer writes, as exposed (counters with _total).
LAYER_SERIES = {
    "claude_api_latency_seconds_bucket": 'role="decision"',
    "claude_tokens_used_total": 'kind="input"',
    "claude_api_errors_total": 'type="overloaded"',
    "context_length_tokens_bucket": 'role="route"',
    "helpline_cache_requests_total": 'result="hit"',
    "helpline_coalesced_calls_total": 'kind="inflight"',
    "helpline_model_queue_seconds_bucket": "le=",
    "helpline_model_inflight": "",
    "helpline_model_busy_rejections_total": "",
    "helpline_model_fallbacks_total": 'reason="unavailable"',
    "helpline_circuit_state": 'model="claude-sonnet-5"',
}


async def test_metrics_are_exported_with_the_documented_names(
        flows: FlowSet, fake: FakeClaude, brain: FaqBrain) -> None:
    metrics = Metrics(multiprocess_dir="")
    claude = ClaudeModel(client=fake.client(max_retries=0, timeout=5.0))
    model = build_model_stack(settings_for(batch_window_ms=20, model_attempts=1), claude,
                              OfflineModel(), metrics)
    fake.latency = 0.05
    await model.route(route_request(flows, "is shipping free?"))
    await asyncio.gather(*(model.decide(faq_request(flows, "is shipping free?",
                                                    conversation_id=f"c{i}"))
                           for i in range(3)))
    await model.decide(faq_request(flows, "is shipping free?"))  # a cache hit
    fake.fail_when(None, 529, retry_after_ms=1, times=1)
    await model.decide(faq_request(flows, "do you ship abroad?"))  # 529 -> offline fallback
    text = metrics.render_latest()[0].decode()
    docs = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    for series, label in LAYER_SERIES.items():
        lines = [line for line in text.splitlines() if line.startswith(series)]
        assert lines, f"{series} is not exported"
        assert any(label in line for line in lines), f"{series} has no {label} sample"
        family = re.sub(r"_(bucket)$", "", series)
        assert family in docs, f"{family} is not documented in docs/metrics.md"
    # Labels only from closed sets: no customer text, no conversation id.
    assert "shipping" not in text and "c1" not in text
    await model.close()
