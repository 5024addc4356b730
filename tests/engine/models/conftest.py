"""Fixtures for the model tests: the fake Claude API, the demo flows, a ClaudeModel."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.demo.actions import build_actions
from engine.demo.shop import Shop
from engine.flow.compiled import FlowSet
from engine.flow.loader import load_flows

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def demo_flows() -> FlowSet:
    """The demo flows (refund, logistics), checked against the demo actions' names."""
    names = build_actions(Shop()).names()  # the shop is never opened: names only
    return load_flows(ROOT / "flows", ROOT / "prompts", names)


