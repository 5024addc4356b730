"""Conversation memory on 60-turn conversations: context size, pinned-entity retention, latency.

    python bench/memory.py [--latency 0.2] [--languages en zh]

The conversations are the English and Chinese 60-turn refund journeys of
``tests/engine/test_long_conversations.py`` (small talk, questions, one correction
of the order number at turn 30, the final "yes" at turn 60), played through the
real engine, the demo shop and :class:`~engine.models.claude.ClaudeModel` (real
SDK, real HTTP) against the fake Messages API with a fixed latency per call
(200 ms by default), answered by the same stand-in Claude as the tests (it
echoes a wrong order number once, at the first memory check after the
correction).

Configurations (each a copy of the demo flows; every one tolerates the long
digressions, see ``PATIENT`` in the tests):

* ``summaries``: the refund flow's defaults: summaries after 5 unsummarised
  turns keeping the last 4 verbatim, an 80,000-token budget with a 20% margin,
  and the engine's 12-item verbatim window;
* ``no_summaries``: ``after_turns: 200`` (never summarises), same window and
  budget: the latency baseline, differing from ``summaries`` only in the
  background summary calls;
* ``naive``: no summaries, no trimming (1,000,000 tokens) and no window: every
  request carries the full history (the token baseline).

Reported: (1) input tokens of the decision request at turns 5, 20 and 60 (the
fake's count of tools + system + messages; the prompt-cache split as the fake
reports it), (2) pinned-entity retention: for every decision request and every
pinned entity the store held at that moment, whether the request's "Known
facts" show that value (target 100%), and whether the injected wrong echo was
detected and corrected in the next prompt, (3) reply latency p50/p95 (wall
time of ``Engine.handle``) with summaries on versus off (target: p50 within 5%).

Results: ``bench/results/memory.json`` and ``bench/results/memory.md`` (the
README row).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.demo.actions import build_actions  # noqa: E402
from engine.demo.shop import Shop  # noqa: E402
from engine.metrics import Metrics  # noqa: E402
from engine.models.claude import ClaudeModel  # noqa: E402
from tests.engine.test_long_conversations import (  # noqa: E402
    NEW_ORDER,
    OLD_ORDER,
    SCRIPTS,
    StandInClaude,
    flow_copy,
    is_summary,
    known_facts,
    load_demo_flows,
    make_chat,
    request_tokens,
)
from tests.fakes.claude_api import (  # noqa: E402
    FakeClaude,
    FakeClaudeThread,
    count_request_tokens,
)

RESULTS = ROOT / "bench" / "results"
REPORT_TURNS = (5, 20, 60)

CONFIGS: dict[str, dict[str, Any]] = {
    "summaries": {"summary": {}, "window": None},
    "no_summaries": {"summary": {"after_turns": 200}, "window": None},
    "naive": {"summary": {"after_turns": 200, "max_context_tokens": 1_000_000},
              "window": 100_000},
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def run(language: str, config: str, latency: float, workdir: Path) -> dict[str, Any]:
    """One 60-turn conversation in one configuration; per-turn measurements."""
    # The fake runs on its own event loop (a thread): its request handling runs beside
    # the engine's work, as a remote API's would, instead of queueing behind it.
    with FakeClaudeThread(latency=latency) as fake:
        return await _run(fake, language, config, workdir)


async def _run(fake: FakeClaude, language: str, config: str, workdir: Path) -> dict[str, Any]:
    settings = CONFIGS[config]
    async with Shop() as shop:
        actions = build_actions(shop)
        flows = load_demo_flows(flow_copy(workdir / f"{config}-{language}",
                                          **settings["summary"]), actions)
        standin = StandInClaude(drift_to=NEW_ORDER, stale=OLD_ORDER).install(fake)
        claude = ClaudeModel(client=fake.client(max_retries=0, timeout=30.0))
        metrics = Metrics(multiprocess_dir="")
        try:
            chat = make_chat(flows, actions, claude, thread=f"{config}-{language}",
                             fake=fake, metrics=metrics)
            if settings["window"] is not None:
                # The full history: lift both the model's and the engine's window.
                claude.history_turns = settings["window"]
                chat.engine.history_turns = settings["window"]
            turns = await chat.talk(SCRIPTS[language])
            await chat.engine.drain()
            conv = await chat.conv()
            history = await chat.store.entity_history(conv.id)
            summaries = await chat.events("summary")
            mismatches = await chat.events("memory_mismatch")
            summary_tokens = sum(count_request_tokens(r.body) for r in fake.requests_to()
                                 if is_summary(r))
        finally:
            await claude.close()

    rows: list[dict[str, Any]] = []
    checked = retained = 0
    for turn in turns:
        [request] = turn.requests
        counted, estimated = request_tokens(request)
        usage = request.response_json["usage"]
        facts = known_facts(request.system_text)
        # What the store held when the request was made: changes of earlier turns.
        expected: dict[str, Any] = {}
        for change in history:
            if change.turn < turn.number:
                expected[change.name] = change.value
        for name, value in expected.items():
            if value is None:
                continue
            checked += 1
            retained += facts.get(name) == str(value)
        rows.append({
            "turn": turn.number, "seconds": round(turn.seconds, 4),
            "input_tokens_total": counted, "engine_estimate": estimated,
            "input_tokens_uncached": usage["input_tokens"],
            "cache_read_input_tokens": usage["cache_read_input_tokens"],
            "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
            "messages": len(request.messages),
            "summary_in_prompt": "Summary of the conversation so far" in request.system_text,
        })
    note = f"order_id is '{NEW_ORDER}', not '{OLD_ORDER}'"
    drift_turn = next((t.number for t in turns if t.requests[0] is standin.drifted), None)
    corrected_at = [t.number for t in turns if note in t.requests[0].system_text]
    seconds = [t.seconds for t in turns]
    return {
        "language": language, "config": config, "turns": rows,
        "final_state": conv.state,
        "final_entities": {k: v["v"] for k, v in conv.entities.items()},
        "summaries": len(summaries), "summary_calls": standin.summaries,
        "retention": {"checked": checked, "retained": retained,
                      "percent": round(100.0 * retained / checked, 2) if checked else None},
        "memory_check": {"wrong_echo_at_turn": drift_turn,
                         "mismatch_events": len(mismatches),
                         "metric": metrics.registry.get_sample_value(
                             "helpline_memory_mismatches_total") or 0.0,
                         "correction_in_prompt_at_turns": corrected_at},
        "latency_ms": {"p50": round(1000 * statistics.median(seconds), 1),
                       "p95": round(1000 * percentile(seconds, 0.95), 1),
                       "mean": round(1000 * statistics.fmean(seconds), 1)},
        "tokens": {"total_input": sum(r["input_tokens_total"] for r in rows),
                   "cache_read": sum(r["cache_read_input_tokens"] for r in rows),
                   "cache_creation": sum(r["cache_creation_input_tokens"] for r in rows),
                   "uncached": sum(r["input_tokens_uncached"] for r in rows),
                   "max_per_request": max(r["input_tokens_total"] for r in rows),
                   "summary_calls_input": summary_tokens},
    }


def at(run_: dict[str, Any], turn: int) -> int:
    value: int = run_["turns"][turn - 1]["input_tokens_total"]
    return value


def summarise(runs: list[dict[str, Any]], languages: list[str]) -> dict[str, Any]:
    by = {(r["language"], r["config"]): r for r in runs}
    out: dict[str, Any] = {}
    for language in languages:
        on, naive = by[(language, "summaries")], by[(language, "naive")]
        off = by[(language, "no_summaries")]
        out[language] = {
            "tokens_per_request": {
                config: {str(t): at(by[(language, config)], t) for t in REPORT_TURNS}
                for config in CONFIGS
            },
            "reduction_vs_naive_at_60": round(1 - at(on, 60) / at(naive, 60), 3),
            "total_input_tokens": {c: by[(language, c)]["tokens"]["total_input"]
                                   for c in CONFIGS},
            # Summaries are not free: their calls' input, over the whole conversation.
            "summary_calls_input_tokens": {c: by[(language, c)]["tokens"]["summary_calls_input"]
                                           for c in CONFIGS},
            "retention_percent": {c: by[(language, c)]["retention"]["percent"]
                                  for c in CONFIGS},
            "latency_p50_ms": {"summaries_on": on["latency_ms"]["p50"],
                               "summaries_off": off["latency_ms"]["p50"]},
            "latency_p50_delta": round(on["latency_ms"]["p50"] / off["latency_ms"]["p50"] - 1,
                                       4),
        }
    retention = [r["retention"]["percent"] for r in runs]
    deltas = [out[lang]["latency_p50_delta"] for lang in languages]
    out["goals"] = {
        "retention_100_percent": all(p == 100.0 for p in retention),
        "wrong_echo_detected_and_corrected": all(
            r["memory_check"]["mismatch_events"] == 1 and
            r["memory_check"]["correction_in_prompt_at_turns"] ==
            [r["memory_check"]["wrong_echo_at_turn"] + 1] for r in runs),
        "latency_p50_within_5_percent": all(abs(d) <= 0.05 for d in deltas),
        "corrected_order_refunded": all(
            r["final_state"] == "refunded" and r["final_entities"].get("order_id") == NEW_ORDER
            for r in runs),
    }
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    langs = result["languages"]
    labels = {"naive": "naive (full history, no summaries, no trimming)",
              "summaries": "summaries (flow defaults)",
              "no_summaries": "no summaries (latency baseline)"}
    lines = [
        f"Memory on the 60-turn conversations ({', '.join(langs)}), fake Claude at "
        f"{int(result['latency'] * 1000)} ms per call; `python bench/memory.py`, results in "
        "`bench/results/memory.json`.",
        "",
        "| 60-turn conversation | input tokens per request, turn 5 / 20 / 60 | "
        "all 60 requests (+ summary calls) | pinned retention | reply p50 ms | goal |",
        "|---|---|---|---:|---:|---|",
    ]
    for lang in langs:
        data = s[lang]
        delta = data["latency_p50_delta"]
        for config in ("naive", "summaries", "no_summaries"):
            t = data["tokens_per_request"][config]
            total = data["total_input_tokens"][config]
            extra = data["summary_calls_input_tokens"][config]
            tokens = f"{t['5']:,} / {t['20']:,} / {t['60']:,}"
            if config == "summaries":
                tokens += f" (-{100 * data['reduction_vs_naive_at_60']:.0f}% at 60)"
            retention = data["retention_percent"][config]
            p50, goal = "-", "-"
            if config == "summaries":
                p50 = f"{data['latency_p50_ms']['summaries_on']}"
                goal = "retention 100%: " + ("met" if retention == 100.0 else "**missed**")
            elif config == "no_summaries":
                p50 = f"{data['latency_p50_ms']['summaries_off']}"
                goal = (f"p50 on vs off {100 * delta:+.1f}%, within 5%: "
                        + ("met" if abs(delta) <= 0.05 else "**missed**"))
            lines.append(f"| {lang}, {labels[config]} | {tokens} | {total:,}"
                         + (f" (+{extra:,})" if extra else "")
                         + f" | {retention}% | {p50} | {goal} |")
    g = s["goals"]
    lines += [
        "",
        "A wrong pinned echo injected once per run was detected, logged and corrected in "
        f"the next prompt: {'yes' if g['wrong_echo_detected_and_corrected'] else '**no**'}; "
        "the corrected order was the one refunded in every run: "
        f"{'yes' if g['corrected_order_refunded'] else '**no**'}.",
    ]
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="helpline-bench-memory-") as tmp:
        for language in args.languages:
            for config in CONFIGS:
                t0 = time.perf_counter()
                result = await run(language, config, args.latency, Path(tmp))
                runs.append(result)
                tokens = [at(result, t) for t in REPORT_TURNS]
                print(f"{language} {config:13s} tokens@5/20/60 {tokens} "
                      f"retention {result['retention']['percent']}% "
                      f"p50 {result['latency_ms']['p50']} ms "
                      f"summaries {result['summaries']} "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return {
        "measured": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_average": list(os.getloadavg())},
        "latency": args.latency,
        "languages": args.languages,
        "configs": CONFIGS,
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summarise(runs, args.languages),
        "runs": runs,
    }


def dumps(result: dict[str, Any]) -> str:
    """Indented JSON with the per-turn rows one line each."""
    text = json.dumps(result, indent=2, ensure_ascii=False)
    return re.sub(r"\{\n\s+\"turn\": [^{}]*?\n\s+\}",
                  lambda m: re.sub(r"\s*\n\s*", " ", m.group(0)), text) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.2,
                        help="fake Claude latency per call, seconds (default 0.2)")
    parser.add_argument("--languages", nargs="+", default=["en", "zh"], choices=["en", "zh"])
    parser.add_argument("--output", type=Path, default=RESULTS / "memory.json")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(dumps(result), encoding="utf-8")
    table = markdown(result)
    args.output.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    print(json.dumps(result["summary"]["goals"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
