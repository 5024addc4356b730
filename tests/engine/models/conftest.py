"""Fixtures for the model tests: the fake Claude API, the demo flows, a ClaudeModel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.demo.actions import build_actions
from engine.demo.shop import Shop
from engine.flow.compiled import FlowSet
from engine.flow.loader import load_flows
from engine.models.claude import ClaudeModel
from tests.fakes.claude_api import FakeClaude

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def demo_flows() -> FlowSet:
    """The demo flows (refund, logistics), checked against the demo actions' names."""
    names = build_actions(Shop()).names()  # the shop is never opened: names only
    return load_flows(ROOT / "flows", ROOT / "prompts", names)


@pytest.fixture
async def fake() -> AsyncIterator[FakeClaude]:
    async with FakeClaude() as server:
        yield server


@pytest.fixture
async def claude(fake: FakeClaude) -> AsyncIterator[ClaudeModel]:
    """A ClaudeModel on the fake through the real SDK; no retries, a short timeout."""
    model = ClaudeModel(client=fake.client(max_retries=0, timeout=5.0))
    try:
        yield model
    finally:
        await model.close()
