"""Evaluate the demo flows on the scripted customers in shared/eval/customers.yaml.

Each script runs in its own conversation against a fresh demo shop, through
the real engine (memory store) with the chosen model. A script passes when
the conversation ends as expected (resolved by the bot or handed off, with
the expected reason), in the expected flow, with the expected entity values.

    python bench/eval_customers.py [--model offline] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.core.types import Inbound  # noqa: E402
from engine.demo.actions import build_actions  # noqa: E402
from engine.demo.shop import Shop, eval_placeholders  # noqa: E402
from engine.flow.loader import load_flows  # noqa: E402
from engine.models.base import Model  # noqa: E402
from engine.models.offline import OfflineModel  # noqa: E402
from engine.runner import Engine  # noqa: E402
from engine.store.base import ConversationKey  # noqa: E402
from engine.store.memory import MemoryStore  # noqa: E402

DEFAULT_SCRIPTS = ROOT.parent / "shared" / "eval" / "customers.yaml"


def fill(text: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    return text


async def run_script(script: dict[str, Any], model: Model, values: dict[str, str],
                     verbose: bool) -> dict[str, Any]:
    async with Shop() as shop:
        actions = build_actions(shop)
        flows = load_flows(ROOT / "flows", ROOT / "prompts", actions.names())
        store = MemoryStore()
        engine = Engine(flows, store, model, actions)
        key = ConversationKey("eval", "local", script["id"])
        transcript: list[str] = []
        routed: list[str] = []
        for i, turn in enumerate(script["turns"]):
            text = fill(turn, values)
            result = await engine.handle(Inbound(key, text, "demo:eval", datetime.now(UTC),
                                                 channel_message_id=f"{script['id']}-{i}"))
            transcript.append(f"  you> {text}")
            transcript.extend(f"  bot> {o.text}" for o in result.outbound)
            if result.outcome:
                routed.extend(r.data.get("flow") for r in result.outcome.records
                              if r.kind == "event" and r.text == "routed")
        conv = await store.load(key)
        assert conv is not None
    expect = script["expect"]
    failures = []
    ended = "handoff" if conv.owner == "pending_human" else (
        "resolved" if conv.flow and conv.state and
        flows[conv.flow].states[conv.state].kind == "end" else "open")
    if "end" in expect and expect["end"] != ended:
        failures.append(f"ended {ended}, expected {expect['end']}")
    if expect.get("handoff") and conv.handoff_reason != expect["handoff"]:
        failures.append(f"handoff reason {conv.handoff_reason}, expected {expect['handoff']}")
    if "flow" in expect and expect["flow"] not in routed:
        failures.append(f"flows {routed}, expected {expect['flow']}")
    for name, want in (expect.get("entities") or {}).items():
        got = conv.entities.get(name, {}).get("v")
        if got != fill(str(want), values):
            failures.append(f"{name}={got!r}, expected {fill(str(want), values)!r}")
    if verbose or failures:
        print(f"{'PASS' if not failures else 'FAIL'} {script['id']}: {'; '.join(failures)}")
        if verbose or failures:
            print("\n".join(transcript))
            print(f"  [state {conv.flow}/{conv.state} owner {conv.owner} "
                  f"entities { {k: v['v'] for k, v in conv.entities.items()} }]")
    return {"id": script["id"], "passed": not failures, "failures": failures}


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scripts", type=Path, default=DEFAULT_SCRIPTS)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "eval.json")
    args = parser.parse_args()
    scripts = YAML(typ="safe").load(args.scripts.read_text(encoding="utf-8"))
    values = eval_placeholders()
    model = OfflineModel()
    started = time.perf_counter()
    results = [await run_script(s, model, values, args.verbose) for s in scripts]
    passed = sum(r["passed"] for r in results)
    print(f"{passed}/{len(results)} scripted customers passed with the {model.name} model "
          f"({time.perf_counter() - started:.2f}s)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": model.name, "passed": passed,
                                       "total": len(results), "results": results},
                                      indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
