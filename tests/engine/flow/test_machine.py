"""The flow machine: the dispatch table agrees with the transitions machine."""

from __future__ import annotations

import itertools
from pathlib import Path

from engine.flow.loader import load_flows

ROOT = Path(__file__).resolve().parents[3]


def test_dispatch_table_matches_transitions_machine() -> None:
    flows = load_flows(ROOT / "flows", ROOT / "prompts", None)
    scopes = [
        {}, {"order": {"found": False}}, {"order": {"found": True, "refundable": False}},
        {"order": {"found": True, "refundable": True, "amount": "129.00"},
         "policy": {"refund_auto_approve_max": {"amount": "500.00"}}},
        {"order": {"found": True, "refundable": True, "amount": "2899.00"},
         "policy": {"refund_auto_approve_max": {"amount": "500.00"}}},
        {"shipment": {"found": True, "shipped": True, "stuck": True}},
        {"shipment": {"found": True, "shipped": True, "status": "delivered"}},
        {"tracking_no": "SF142087315630"}, {"claim": {"opened": True}},
        {"address": {"changed": False}},
    ]
    checked = 0
    for flow in flows:
        pairs = {(t.source, t.trigger) for t in flow.machine.transitions}
        for (state, trigger), scope in itertools.product(sorted(pairs), scopes):
            fast = flow.machine.fire(state, trigger, scope)
            slow = flow.machine.fire_via_machine(state, trigger, scope)
            assert fast == slow, (flow.name, state, trigger, scope)
            checked += 1
    assert checked > 100
