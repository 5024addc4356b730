"""What the production model layer saves on an FAQ-heavy trace, against the fake Claude.

    python bench/llm_layer.py [--events N] [--seed S] [--concurrency C] [--quick]

A replayed trace of first messages from new customers (every event is a new
conversation, as on a shop's help widget):

* questions drawn from a Zipf distribution (s = 1.1) over ~45 question forms in
  English and Chinese: the canonical FAQ questions, paraphrases, filler words,
  typos and polite forms; plus a long tail of unique questions ("do you ship to
  Norway?") and ~8% non-FAQ messages (refunds, parcels) whose decisions are
  personal and never shared;
* arrivals in bursts: every second a burst of 10-60 messages within 50 ms, on
  top of a steady trickle.

Each configuration runs the whole trace through the real :class:`Engine`
(memory store, privacy step, offline fallback) and the real ``anthropic`` SDK,
against :class:`tests.fakes.claude_api.FakeClaude` in a background thread with
200 ms latency per request, at the same concurrency limit (8 calls in flight):

* ``none``: Claude behind the concurrency limit only;
* ``cache``: + the response cache (routes and FAQ decisions);
* ``cache+coalesce``: + in-flight coalescing;
* ``full``: + the 100 ms FAQ batching window (near-duplicates and XML batches).

Per configuration: upstream calls and tokens (from the API's usage), turn latency
percentiles and throughput, once replaying the trace in real time and once
with every message at once (throughput at the fixed concurrency limit). Then the
reply latency of cache hits (warm cache, in-process and, if Redis is running,
Redis). Results: ``bench/results/llm_layer.json`` and ``llm_layer.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import Settings  # noqa: E402
from engine.core.types import Inbound  # noqa: E402
from engine.demo.actions import build_actions  # noqa: E402
from engine.demo.shop import Shop  # noqa: E402
from engine.flow.compiled import FlowSet  # noqa: E402
from engine.flow.loader import load_flows  # noqa: E402
from engine.llm.batching import BatchingModel, ClaudeBatchCaller  # noqa: E402
from engine.llm.cache import CachingModel, MemoryCache, RedisCache  # noqa: E402
from engine.llm.coalesce import CoalescingModel  # noqa: E402
from engine.llm.limits import ConcurrencyLimiter, LimitedModel  # noqa: E402
from engine.llm.resilience import ResilientModel  # noqa: E402
from engine.llm.stack import model_ids  # noqa: E402
from engine.models.base import DecisionRequest, Model  # noqa: E402
from engine.models.claude import ClaudeModel  # noqa: E402
from engine.models.offline import OfflineModel  # noqa: E402
from engine.runner import Engine  # noqa: E402
from engine.safety.privacy import Privacy  # noqa: E402
from engine.store.base import ConversationKey  # noqa: E402
from engine.store.memory import MemoryStore  # noqa: E402
from tests.engine.llm.support import FaqBrain  # noqa: E402
from tests.fakes.claude_api import FakeClaudeThread  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LATENCY = 0.2
CONCURRENCY = 8

#: Question forms, most frequent first (the Zipf rank follows a seeded shuffle of
#: topics, so popular topics mix languages and phrasings).
FORMS: list[str] = [
    "How long does shipping take?", "how long does shipping take",
    "hi, how long does shipping take?", "how long does shiping take",
    "How many days does shipping take?",
    "Is shipping free?", "is shipping free", "How much is shipping?",
    "Do you ship internationally?", "do you ship abroad?",
    "What is your return policy?", "what's your return policy",
    "can you tell me your return policy please",
    "What payment methods do you accept?", "Do you accept PayPal?", "can I pay with alipay",
    "Can I get an invoice?", "How do I get a fapiao?", "can i get an invoice please",
    "How long is the warranty?", "how long is the warranty please",
    "What are your opening hours?", "when is customer service available?",
    "Can I cancel an order before it ships?",
    "发货要多久？", "请问发货要多久", "发货要多久啊", "包邮吗？", "请问包邮吗", "运费多少钱",
    "退货政策是什么？", "请问退货政策是什么呢", "支持哪些支付方式？", "可以用支付宝吗",
    "可以开发票吗？", "请问可以开发票吗", "保修多久？", "请问保修多久", "营业时间是几点？",
    "能寄到国外吗？", "客服几点上班",
]
NON_FAQ = ["I want a refund", "where is my parcel?", "我要退款", "我的快递到哪了",
           "my package is late", "I'd like to return this and get my money back"]
COUNTRIES = ["Norway", "Chile", "Kenya", "Peru", "Iceland", "Vietnam", "Poland", "Egypt",
             "Ghana", "Nepal", "Qatar", "Fiji", "Malta", "Oman", "Cuba", "Laos"]
ITEMS = ["headphones", "a phone case", "a kettle", "socks", "a lamp", "a jacket",
         "sunglasses", "a backpack", "a keyboard", "a watch strap"]


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    text: str
    kind: str  # faq | tail | other


def make_trace(events: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    forms = FORMS[:]
    rng.shuffle(forms)
    weights = [1 / (k ** 1.1) for k in range(1, len(forms) + 1)]
    texts: list[tuple[str, str]] = []
    for _ in range(events):
        roll = rng.random()
        if roll < 0.08:
            texts.append((rng.choice(NON_FAQ), "other"))
        elif roll < 0.16:
            if rng.random() < 0.5:
                texts.append((f"do you ship to {rng.choice(COUNTRIES)}?", "tail"))
            else:
                texts.append((f"can I return {rng.choice(ITEMS)} after "
                              f"{rng.randint(2, 60)} days?", "tail"))
        else:
            texts.append((rng.choices(forms, weights)[0], "faq"))
    # Arrivals: a burst every second (10-60 messages within 50 ms) + a trickle.
    times: list[float] = []
    t = 0.0
    while len(times) < events:
        burst = rng.randint(10, 60)
        times.extend(t + rng.random() * 0.05 for _ in range(burst))
        times.extend(t + rng.random() for _ in range(rng.randint(2, 6)))
        t += 1.0
    times = sorted(times[:events])
    return [Event(at, text, kind) for at, (text, kind) in zip(times, texts, strict=True)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def settings() -> Settings:
    return Settings(model_concurrency=CONCURRENCY, model_concurrency_per_model=CONCURRENCY,
                    model_queue_bound=100_000, model_queue_timeout=600,
                    turn_budget_seconds=600)


def build(config: str, claude: ClaudeModel) -> tuple[Model, dict[str, Any]]:
    """The layers of ``config`` around ``claude`` (all share one limiter)."""
    ids = model_ids(claude)
    limiter = ConcurrencyLimiter(global_limit=CONCURRENCY, per_model_limit=CONCURRENCY,
                                 queue_bound=100_000, queue_timeout=600)
    model: Model = LimitedModel(claude, limiter, ids)
    layers: dict[str, Any] = {"limiter": limiter}
    if config == "full":
        model = layers["batcher"] = BatchingModel(
            model, decision_model=ids["decision"], caller=ClaudeBatchCaller(claude),
            limiter=limiter, window=0.1)
    model = ResilientModel(model, OfflineModel(), budget=600)
    if config in ("cache+coalesce", "full"):
        model = layers["coalescer"] = CoalescingModel(
            model, decision_model=ids["decision"], route_model=ids["route"])
    if config != "none":
        model = layers["cache"] = CachingModel(
            model, MemoryCache(), decision_model=ids["decision"], route_model=ids["route"])
    return model, layers


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    wall: float = 0.0
    answered: int = 0


async def replay(engine: Engine, trace: list[Event], timed: bool, tag: str) -> Run:
    run = Run()
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(i: int, event: Event) -> None:
        if timed:
            await asyncio.sleep(max(0.0, start + event.at - loop.time()))
        inbound = Inbound(ConversationKey("bench", "shop", f"{tag}-{i}"), event.text,
                          f"bench:{i}", datetime.now(UTC), channel_message_id=f"{tag}-{i}")
        began = time.perf_counter()
        result = await engine.handle(inbound)
        run.latencies.append(time.perf_counter() - began)
        run.kinds.append(event.kind)
        if result.outcome is not None and result.outbound:
            run.answered += 1

    began = time.perf_counter()
    await asyncio.gather(*(one(i, e) for i, e in enumerate(trace)))
    run.wall = time.perf_counter() - began
    return run


async def run_config(config: str, trace: list[Event], flows: FlowSet, fake: Any,
                     timed: bool) -> dict[str, Any]:
    fake.clear_log()
    fake.clear_prompt_cache()
    claude = ClaudeModel(client=fake.client(max_retries=2, timeout=30.0))
    model, layers = build(config, claude)
    engine = Engine(flows, MemoryStore(), model, build_actions(Shop()),
                    fallback=OfflineModel(), privacy=Privacy())
    run = await replay(engine, trace, timed, f"{config}-{'t' if timed else 's'}")
    await engine.drain()
    usage = claude.usage
    out: dict[str, Any] = {
        "config": config,
        "mode": "replay" if timed else "saturate",
        "turns": len(trace),
        "answered": run.answered,
        "calls": fake.count(),
        "tokens": {"input": usage.input_tokens, "output": usage.output_tokens,
                   "cache_read": usage.cache_read_input_tokens,
                   "cache_creation": usage.cache_creation_input_tokens},
        "tokens_total": usage.input_tokens + usage.output_tokens
        + usage.cache_read_input_tokens + usage.cache_creation_input_tokens,
        "wall_seconds": round(run.wall, 2),
        "turns_per_second": round(len(trace) / run.wall, 1),
        "latency_ms": {p: round(percentile(run.latencies, q) * 1000, 1)
                       for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "max_in_flight": layers["limiter"].max_in_flight,
        "fallbacks": engine.stats["fallbacks"],
    }
    cache = layers.get("cache")
    if cache is not None:
        out["cache_hits"] = cache.hits
        out["cache_misses"] = cache.misses
    coalescer = layers.get("coalescer")
    if coalescer is not None:
        out["coalesced"] = coalescer.saved_local
    batcher = layers.get("batcher")
    if batcher is not None:
        out["batch"] = {"requests": batcher.requests, "calls": batcher.calls,
                        "batched_calls": batcher.batched_calls}
    await claude.close()
    return out


async def hit_latency(flows: FlowSet, fake: Any, samples: int) -> dict[str, Any]:
    """Reply latency of cache hits: the model layer alone, and whole engine turns."""
    claude = ClaudeModel(client=fake.client(max_retries=0, timeout=30.0))
    model, _ = build("full", claude)
    engine = Engine(flows, MemoryStore(), model, build_actions(Shop()),
                    fallback=OfflineModel(), privacy=Privacy())
    faq: list[str] = []
    for i, text in enumerate(FORMS):  # warm: one customer per question form
        result = await engine.handle(Inbound(ConversationKey("bench", "shop", f"warm-{i}"),
                                             text, "bench:w", datetime.now(UTC)))
        if result.outcome is not None and result.outcome.conversation.flow == "faq":
            faq.append(text)  # (a few were routed elsewhere: not FAQ answers)
    calls = fake.count()
    layer: list[float] = []
    turns: list[float] = []
    for i in range(samples):
        text = faq[i % len(faq)]
        request = DecisionRequest(flow=flows["faq"], state="faq", text=text,
                                  language="zh" if any("\u4e00" <= c <= "\u9fff" for c in text)
                                  else "en", entities={}, results={}, raw_text=text)
        began = time.perf_counter()
        await model.decide(request)
        layer.append(time.perf_counter() - began)
        began = time.perf_counter()
        await engine.handle(Inbound(ConversationKey("bench", "shop", f"hit-{i}"), text,
                                    "bench:h", datetime.now(UTC)))
        turns.append(time.perf_counter() - began)
    if fake.count() != calls:
        leaked = [(r.forced_tool, r.last_user_text) for r in fake.requests[calls:]]
        raise AssertionError(f"cache-hit samples reached the model: {leaked[:5]}")
    out: dict[str, Any] = {
        "samples": samples,
        "question_forms": len(faq),
        "layer_ms": {p: round(percentile(layer, q) * 1000, 3)
                     for p, q in (("p50", 50), ("p99", 99))},
        "turn_ms": {p: round(percentile(turns, q) * 1000, 3)
                    for p, q in (("p50", 50), ("p99", 99))},
    }
    redis = await _redis()
    if redis is not None:
        try:
            ids = model_ids(claude)
            cached = CachingModel(claude, RedisCache(redis, prefix="helpline:bench:"),
                                  decision_model=ids["decision"], route_model=ids["route"])
            for text in faq:
                await cached.decide(DecisionRequest(flow=flows["faq"], state="faq",
                                                    text=text, language="en", entities={},
                                                    results={}))
            before = fake.count()
            timings = []
            for i in range(samples):
                request = DecisionRequest(flow=flows["faq"], state="faq",
                                          text=faq[i % len(faq)], language="en",
                                          entities={}, results={})
                began = time.perf_counter()
                await cached.decide(request)
                timings.append(time.perf_counter() - began)
            assert fake.count() == before
            out["redis_layer_ms"] = {p: round(percentile(timings, q) * 1000, 3)
                                     for p, q in (("p50", 50), ("p99", 99))}
            keys = await redis.keys("helpline:bench:*")
            if keys:
                await redis.delete(*keys)
        finally:
            await redis.aclose()
    await claude.close()
    return out


async def _redis() -> Any:
    try:
        from redis.asyncio import Redis

        client = Redis.from_url("redis://127.0.0.1:6379/14", socket_connect_timeout=1)
        await client.ping()
        return client
    except Exception:
        return None


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    flows = load_flows(ROOT / "flows", ROOT / "prompts", build_actions(Shop()).names())
    trace = make_trace(args.events, args.seed)
    configs = ["none", "cache", "cache+coalesce", "full"]
    results: list[dict[str, Any]] = []
    # Cache-hit latency first, in a fresh fake: the trace runs leave a large heap
    # (request logs, stores) whose garbage collection would be measured instead.
    with FakeClaudeThread(latency=LATENCY, max_lifetime=600) as fake:
        FaqBrain(flows).install(fake)
        hits = await hit_latency(flows, fake, args.hit_samples)
    with FakeClaudeThread(latency=LATENCY, max_lifetime=1800) as fake:
        FaqBrain(flows).install(fake)
        for timed in (True, False):
            for config in configs:
                result = await run_config(config, trace, flows, fake, timed)
                results.append(result)
                print(f"{result['mode']:8s} {config:15s} calls {result['calls']:5d}  "
                      f"tokens {result['tokens_total']:7d}  {result['turns_per_second']:6.1f} "
                      f"turns/s  p50 {result['latency_ms']['p50']:7.1f} ms  "
                      f"p99 {result['latency_ms']['p99']:7.1f} ms", flush=True)
    print("cache hits:", json.dumps(hits))
    by = {(r["mode"], r["config"]): r for r in results}

    def saving(mode: str, config: str, key: str) -> float:
        base = by[(mode, "none")][key]
        return round(100 * (1 - by[(mode, config)][key] / base), 1) if base else 0.0

    kinds = {k: sum(1 for e in trace if e.kind == k) for k in ("faq", "tail", "other")}
    return {
        "benchmark": "llm_layer",
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "setup": {"events": len(trace), "seed": args.seed, "mix": kinds,
                  "distinct_texts": len({e.text for e in trace}),
                  "trace_seconds": round(trace[-1].at, 1), "fake_latency_s": LATENCY,
                  "concurrency_limit": CONCURRENCY, "batch_window_ms": 100,
                  "calls_per_turn_without_layer": "1 route + 1 decision"},
        "runs": results,
        "savings_percent": {
            mode: {config: {"calls": saving(mode, config, "calls"),
                            "tokens": saving(mode, config, "tokens_total")}
                   for config in configs[1:]}
            for mode in ("replay", "saturate")},
        "throughput_gain": {
            config: round(by[("saturate", config)]["turns_per_second"]
                          / by[("saturate", "none")]["turns_per_second"], 2)
            for config in configs[1:]},
        "cache_hit_latency": hits,
        "targets": {
            "calls_saved_percent>=50": saving("replay", "full", "calls") >= 50,
            "cache_hit_layer_p99_ms<5": hits["layer_ms"]["p99"] < 5,
            "cache_hit_turn_p99_ms<5": hits["turn_ms"]["p99"] < 5,
        },
    }


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Model layer on an FAQ-heavy trace",
        "",
        f"{data['setup']['events']} first messages (mix {data['setup']['mix']}, "
        f"{data['setup']['distinct_texts']} distinct texts, Zipf s=1.1, en+zh, bursts) over "
        f"{data['setup']['trace_seconds']} s; fake Claude with "
        f"{int(data['setup']['fake_latency_s'] * 1000)} ms latency; "
        f"{data['setup']['concurrency_limit']} calls in flight at most; "
        f"{data['machine']['cpus']} CPUs, load average "
        f"{data['machine']['load_average_1m_at_end']} at the end (shared machine). "
        "Generated by `python bench/llm_layer.py`.",
        "",
        "| mode | layers | model calls | saved | tokens | saved | turns/s | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in data["runs"]:
        saved = data["savings_percent"][run["mode"]].get(run["config"], {"calls": 0.0,
                                                                          "tokens": 0.0})
        lines.append(
            f"| {run['mode']} | {run['config']} | {run['calls']} | {saved['calls']}% | "
            f"{run['tokens_total']} | {saved['tokens']}% | {run['turns_per_second']} | "
            f"{run['latency_ms']['p50']} | {run['latency_ms']['p99']} |")
    hits = data["cache_hit_latency"]
    lines += [
        "",
        f"Cache-hit reply latency ({hits['samples']} samples): model layer p50 "
        f"{hits['layer_ms']['p50']} ms / p99 {hits['layer_ms']['p99']} ms; whole engine turn "
        f"(route + decision both cached, memory store) p50 {hits['turn_ms']['p50']} ms / "
        f"p99 {hits['turn_ms']['p99']} ms"
        + (f"; Redis cache layer p50 {hits['redis_layer_ms']['p50']} ms / p99 "
           f"{hits['redis_layer_ms']['p99']} ms" if "redis_layer_ms" in hits else "") + ".",
        "",
        "README row: | model layer (FAQ trace) | "
        f"{data['savings_percent']['replay']['full']['calls']}% fewer model calls, "
        f"{data['savings_percent']['replay']['full']['tokens']}% fewer tokens, "
        f"{data['throughput_gain']['full']}x throughput at {data['setup']['concurrency_limit']} "
        f"in flight, cache-hit turn p99 {hits['turn_ms']['p99']} ms |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--hit-samples", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="120 events (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.events, args.hit_samples = 120, 100
    data = asyncio.run(main_async(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        (RESULTS / "llm_layer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2)
                                                + "\n", encoding="utf-8")
        (RESULTS / "llm_layer.md").write_text(markdown(data), encoding="utf-8")
    print(markdown(data))


if __name__ == "__main__":
    main()
