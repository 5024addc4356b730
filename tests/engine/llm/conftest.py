"""Fixtures for the model-layer tests: flows, the fake Claude API, requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.demo.actions import build_actions
from engine.demo.shop import Shop
from engine.flow.compiled import FlowSet
from engine.flow.loader import load_flows
from engine.models.base import DecisionRequest, RouteCandidate, RouteRequest
from tests.engine.llm.support import FaqBrain
from tests.fakes.claude_api import FakeClaude

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def flows() -> FlowSet:
    """The application's flows (faq, refund, logistics)."""
    return load_flows(ROOT / "flows", ROOT / "prompts", build_actions(Shop()).names())


@pytest.fixture(scope="session")
def test_flows() -> FlowSet:
    """tests/engine/llm/flows/shop.yaml: one state per caching situation."""
    return load_flows(HERE / "flows", HERE / "prompts", frozenset())


@pytest.fixture
def brain(flows: FlowSet, fake: FakeClaude) -> FaqBrain:
    smart = FaqBrain(flows)
    smart.install(fake)
    return smart


def faq_request(flows: FlowSet, text: str, language: str = "en",
                **fields: Any) -> DecisionRequest:
    """A first FAQ question, as the turn core builds it."""
    values: dict[str, Any] = {"flow": flows["faq"], "state": "faq", "text": text,
                              "language": language, "entities": {}, "results": {},
                              "turn": 1, "conversation_id": "c1", "raw_text": text}
    values.update(fields)
    return DecisionRequest(**values)


def shop_request(flows: FlowSet, state: str, text: str = "when are you open?",
                 **fields: Any) -> DecisionRequest:
    values: dict[str, Any] = {"flow": flows["shop"], "state": state, "text": text,
                              "language": "en", "entities": {}, "results": {}, "turn": 1,
                              "conversation_id": "c1"}
    values.update(fields)
    return DecisionRequest(**values)


def route_request(flows: FlowSet, text: str) -> RouteRequest:
    return RouteRequest(text=text, language="en",
                        candidates=[RouteCandidate(f.name, f.router_description,
                                                   f.router_examples) for f in flows],
                        conversation_id="c1", raw_text=text)
