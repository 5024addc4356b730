"""Per-turn cost of the engine against a hand-written floor, store work, memory, concurrency.

    python bench/turns.py [--quick] [--conversations N] [--profile memory|sqlite]

Everything runs in one invocation (``make bench``) and is written to
``bench/results/turns.json`` plus a markdown table in ``bench/results/turns.md``.

What a turn does
----------------
Each conversation walks the same realistic six-turn journey through the demo
flows (``flows/refund.yaml`` then ``flows/logistics.yaml``)::

    1. "Hi, I'd like a refund please"     route (2 flows) -> refund/ask_order, disclosure + ask
    2. "HL26110842"                       order_id -> lookup_order action -> ask_reason
    3. "it arrived damaged"               reason -> confirm (Jinja read-back with money filter)
    4. "yes"                              confirm trigger, guard on the cap -> issue_refund
                                          action -> refunded (end) + rating prompt
    5. rating 5 (a rating event)          journey restarted, thanks
    6. "thanks! and where is my parcel?"  route -> logistics/identify -> ask_order -> track
                                          (track_parcel action) -> delivered (end) + rating

The model and the actions are *recorded once* at start-up from the real
thing: the offline model and the real demo :class:`~engine.demo.shop.Shop`
(aiosqlite) play one conversation, and every routing decision, model
decision and action result is stored. The benchmark then replays them:

* ``ScriptedModel`` returns the recorded ``Decision``/``RouteDecision`` with a
  dict lookup on the turn's text (zero cost, so the figure is the engine's own);
* the replayed actions return the recorded ``ActionResult`` (``issue_refund``
  derives its refund id from the turn's idempotency key, as the shop does).
  The real shop costs milliseconds per action (see ``context`` in the JSON),
  which would drown the engine's cost.

Turns are interleaved: turn 1 of every conversation, then turn 2 of every
conversation, ... so every load really reads the store (no hot object is
reused). Every inbound carries a channel message id, so ``Engine.handle``
does its dedupe lookup too.

The floor does the same journey by hand: a dict state per conversation kept
as JSON text (in a dict, or in a SQLite row), per turn one ``json.loads``, the
same entity/result updates, one render of a precompiled Jinja template (same
sandboxed environment as the flows), one ``json.dumps``, the inbound message
and the reply appended to a log; on SQLite one SELECT, one UPDATE/INSERT, one
executemany INSERT of the two log rows and one commit (WAL,
``synchronous=NORMAL``, as the engine's SQLite store).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import hashlib
import io
import json
import os
import platform
import pstats
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.actions import ActionContext, ActionRegistry, ActionResult  # noqa: E402
from engine.core.types import Inbound  # noqa: E402
from engine.demo.actions import build_actions  # noqa: E402
from engine.demo.shop import ORDER_SMALL, Shop  # noqa: E402
from engine.errors import ActionError  # noqa: E402
from engine.flow.compiled import FlowSet  # noqa: E402
from engine.flow.loader import load_flows  # noqa: E402
from engine.flow.templates import make_environment  # noqa: E402
from engine.models.base import (  # noqa: E402
    Decision,
    DecisionRequest,
    Model,
    RouteDecision,
    RouteRequest,
    SummaryRequest,
)
from engine.models.offline import OfflineModel  # noqa: E402
from engine.runner import Engine  # noqa: E402
from engine.store.base import ConversationKey, Store  # noqa: E402
from engine.store.memory import MemoryStore  # noqa: E402

RESULTS = ROOT / "bench" / "results"

#: The journey: (kind, text). See the module docstring.
JOURNEY: tuple[tuple[str, str], ...] = (
    ("text", "Hi, I'd like a refund please"),
    ("text", ORDER_SMALL),
    ("text", "it arrived damaged"),
    ("text", "yes"),
    ("rating", "5"),
    ("text", "thanks! and where is my parcel?"),
)
TURNS = len(JOURNEY)
CUSTOMER = "demo:bench"

# Goals from the issue.
GOAL_RATIO = 2.0
GOAL_COMMITS = 1
GOAL_STATE_BYTES = 1536
GOAL_PEAK_MIB = 60.0
GOAL_CONCURRENT = 3000
CONCURRENCY_P99_MS = 250.0
MODEL_DELAY_S = 0.2


# --------------------------------------------------------------------------- the script


@dataclass
class Script:
    """What the offline model and the real shop answered for the journey, to replay."""

    routes: dict[str, RouteDecision] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    actions: dict[str, ActionResult] = field(default_factory=dict)
    action_ms: dict[str, float] = field(default_factory=dict)
    transcript: list[str] = field(default_factory=list)
    final: str = ""


class _Recording(Model):
    """Wraps the offline model and records each answer under the turn's text."""

    name = "offline"
    history_turns = 0

    def __init__(self, inner: Model, script: Script) -> None:
        self.inner = inner
        self.script = script

    async def decide(self, request: DecisionRequest) -> Decision:
        decision = await self.inner.decide(request)
        self.script.decisions[request.text] = replace(decision, model="scripted")
        return decision

    async def route(self, request: RouteRequest) -> RouteDecision:
        decision = await self.inner.route(request)
        self.script.routes[request.text] = decision
        return decision

    async def summarise(self, request: SummaryRequest) -> str:
        return await self.inner.summarise(request)


async def record_script(flows_dir: Path, prompts_dir: Path) -> Script:
    """Play the journey once with the offline model and the real demo shop."""
    script = Script()
    async with Shop() as shop:
        real = build_actions(shop)
        recording = ActionRegistry()
        for name in real:
            recording.add(name, _recorder(real.get(name).fn, name, script),
                          side_effect=real.get(name).side_effect)
        flows = load_flows(flows_dir, prompts_dir, recording.names())
        store = MemoryStore()
        engine = Engine(flows, store, _Recording(OfflineModel(), script), recording)
        key = ConversationKey("bench", "record", "journey")
        for i in range(TURNS):
            result = await engine.handle(inbound(key, i, f"record-{i}"))
            kind, text = JOURNEY[i]
            script.transcript.append(f"you> {text}" if kind == "text" else f"you> [rating {text}]")
            script.transcript.extend(f"bot> {o.text}" for o in result.outbound)
        conv = await store.load(key)
    assert conv is not None
    script.final = f"{conv.flow}/{conv.state}"
    expected = {"lookup_order", "issue_refund", "track_parcel"}
    if script.final != "logistics/delivered" or set(script.actions) != expected:
        raise SystemExit(f"the recorded journey went wrong: ended {script.final}, actions "
                         f"{sorted(script.actions)}:\n" + "\n".join(script.transcript))
    return script


def _recorder(fn: Any, name: str, script: Script) -> Any:
    async def record(ctx: ActionContext) -> ActionResult:
        started = time.perf_counter()
        result = await fn(ctx)
        script.action_ms[name] = round((time.perf_counter() - started) * 1000, 2)
        script.actions[name] = result
        return result

    return record


class ScriptedModel(Model):
    """Zero-cost model: the recorded decision for the turn's text (a dict lookup)."""

    name = "scripted"
    history_turns = 0

    def __init__(self, script: Script) -> None:
        self._decisions = script.decisions
        self._routes = script.routes

    async def decide(self, request: DecisionRequest) -> Decision:
        return self._decisions[request.text]

    async def route(self, request: RouteRequest) -> RouteDecision:
        return self._routes[request.text]

    async def summarise(self, request: SummaryRequest) -> str:
        return request.previous


class SleepingModel(ScriptedModel):
    """The scripted model behind a remote-model latency of ``delay`` seconds per call."""

    name = "sleeping"

    def __init__(self, script: Script, delay: float) -> None:
        super().__init__(script)
        self.delay = delay

    async def decide(self, request: DecisionRequest) -> Decision:
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().decide(request)

    async def route(self, request: RouteRequest) -> RouteDecision:
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().route(request)


def replay_actions(script: Script) -> ActionRegistry:
    """The demo action names, each returning its recorded result."""
    registry = ActionRegistry()
    real_side_effects = {"issue_refund", "open_lost_claim", "change_address"}
    for name in ("lookup_order", "issue_refund", "track_parcel", "open_lost_claim",
                 "change_address"):
        registry.add(name, _replayer(name, script.actions.get(name)),
                     side_effect=name in real_side_effects)
    return registry


def _replayer(name: str, recorded: ActionResult | None) -> Any:
    if recorded is None:
        async def missing(ctx: ActionContext) -> ActionResult:
            raise ActionError(name, "not part of the benchmark journey")

        return missing
    if name == "issue_refund":
        data = dict(recorded.data)

        async def refund(ctx: ActionContext) -> ActionResult:
            # As the shop: the refund id is derived from the idempotency key.
            digest = hashlib.sha256(f"RF:{ctx.idempotency_key}".encode()).digest()
            refund_id = f"RF{int.from_bytes(digest[:8], 'big') % 10**10:010d}"
            return ActionResult(data={**data, "refund_id": refund_id})

        return refund

    async def replay(ctx: ActionContext) -> ActionResult:
        return recorded

    return replay


def inbound(key: ConversationKey, turn: int, message_id: str) -> Inbound:
    kind, text = JOURNEY[turn]
    if kind == "rating":
        return Inbound(key, text, CUSTOMER, datetime.now(UTC), kind="rating",
                       rating=int(text), channel_message_id=message_id)
    return Inbound(key, text, CUSTOMER, datetime.now(UTC), channel_message_id=message_id)


def conversation_key(run: str, i: int) -> ConversationKey:
    return ConversationKey("bench", run, f"c{i:05d}")


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Timing:
    """Per-turn samples (ns) by turn index, and the time spent in the turn loop."""

    samples: list[list[int]]
    loop_ns: int

    def summary(self) -> dict[str, Any]:
        flat = sorted(s for per_turn in self.samples for s in per_turn)
        turns = len(flat)
        mean = sum(flat) / turns / 1000
        return {
            "turns": turns,
            "turns_per_s": round(turns / (self.loop_ns / 1e9)),
            "mean_us": round(mean, 1),
            "p50_us": round(percentile(flat, 0.50) / 1000, 1),
            "p99_us": round(percentile(flat, 0.99) / 1000, 1),
            "max_us": round(flat[-1] / 1000, 1),
            "by_turn_mean_us": [round(sum(t) / len(t) / 1000, 1) for t in self.samples],
        }


# --------------------------------------------------------------------------- the floor


FLOOR_TEMPLATE = (
    "To confirm: a refund of {{ order.amount | money(order.currency) }} for order "
    "{{ order_id }} ({{ reason }}). Shall I go ahead?"
)
#: (state after the turn, entity set by the turn, result saved by the turn)
FLOOR_STEPS: tuple[tuple[str, str | None, str | None], ...] = (
    ("ask_order", None, None),
    ("ask_reason", "order_id", "order"),
    ("confirm", "reason", None),
    ("refunded", None, "refund"),
    ("rated", None, None),
    ("delivered", None, "shipment"),
)
_FLOOR_RESULTS = {"order": "lookup_order", "refund": "issue_refund", "shipment": "track_parcel"}


class Floor:
    """The same journey by hand; ``sqlite_path`` None keeps everything in dicts."""

    def __init__(self, script: Script, sqlite_path: Path | None) -> None:
        env = make_environment(None)
        self.template = env.from_string(FLOOR_TEMPLATE)
        self.results = {k: dict(script.actions[v].data) for k, v in _FLOOR_RESULTS.items()}
        self.states: dict[str, str] = {}
        self.log: dict[str, list[tuple[int, str, str, str]]] = {}
        self.db: sqlite3.Connection | None = None
        if sqlite_path is not None:
            self.db = sqlite3.connect(sqlite_path, isolation_level="DEFERRED")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE conv (key TEXT PRIMARY KEY, state TEXT NOT NULL)")
            self.db.execute("CREATE TABLE msg (id INTEGER PRIMARY KEY, key TEXT NOT NULL, "
                            "seq INTEGER NOT NULL, direction TEXT NOT NULL, text TEXT NOT NULL, "
                            "UNIQUE (key, seq))")
            self.db.commit()

    def turn(self, key: str, turn: int, text: str) -> str:
        db = self.db
        if db is None:
            raw = self.states.get(key)
        else:
            row = db.execute("SELECT state FROM conv WHERE key = ?", (key,)).fetchone()
            raw = None if row is None else row[0]
        if raw is None:
            state: dict[str, Any] = {"id": key, "flow": "refund", "state": None,
                                     "entities": {}, "results": {}, "counters": {},
                                     "language": "en", "owner": "bot", "seq": 0, "version": 0}
        else:
            state = json.loads(raw)
        step, entity, result = FLOOR_STEPS[turn]
        state["state"] = step
        counters = state["counters"]
        counters["turn"] = counters.get("turn", 0) + 1
        if entity is not None:
            state["entities"][entity] = {"v": text if entity == "order_id" else "damaged",
                                         "t": counters["turn"], "s": "customer"}
        if result is not None:
            state["results"][result] = self.results[result]
        entities = state["entities"]
        reply = self.template.render(
            order=state["results"].get("order") or self.results["order"],
            order_id=entities.get("order_id", {}).get("v", ""),
            reason=entities.get("reason", {}).get("v", ""),
        )
        seq = state["seq"]
        state["seq"] = seq + 2
        state["version"] += 1
        encoded = json.dumps(state, separators=(",", ":"), ensure_ascii=False)
        rows = [(key, seq + 1, "in", text), (key, seq + 2, "out", reply)]
        if db is None:
            self.states[key] = encoded
            self.log.setdefault(key, []).extend(rows)
        else:
            if raw is None:
                db.execute("INSERT INTO conv (key, state) VALUES (?, ?)", (key, encoded))
            else:
                db.execute("UPDATE conv SET state = ? WHERE key = ?", (encoded, key))
            db.executemany("INSERT INTO msg (key, seq, direction, text) VALUES (?, ?, ?, ?)",
                           rows)
            db.commit()
        return reply

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def run_floor(script: Script, n: int, sqlite_path: Path | None) -> Timing:
    floor = Floor(script, sqlite_path)
    samples: list[list[int]] = []
    loop_ns = 0
    clock = time.perf_counter_ns
    try:
        for turn in range(TURNS):
            text = JOURNEY[turn][1]
            keys = [f"bench:floor:c{i:05d}" for i in range(n)]
            per_turn: list[int] = []
            started = clock()
            for key in keys:
                t0 = clock()
                floor.turn(key, turn, text)
                per_turn.append(clock() - t0)
            loop_ns += clock() - started
            samples.append(per_turn)
    finally:
        floor.close()
    return Timing(samples, loop_ns)


# --------------------------------------------------------------------------- the engine


def make_engine(flows: FlowSet, store: Store, model: Model, actions: ActionRegistry) -> Engine:
    return Engine(flows, store, model, actions)


async def run_engine(engine: Engine, run: str, n: int,
                     after_round: Callable[[int], Any] | None = None) -> Timing:
    """``n`` conversations x the journey, interleaved, one ``handle`` timed at a time."""
    samples: list[list[int]] = []
    loop_ns = 0
    clock = time.perf_counter_ns
    keys = [conversation_key(run, i) for i in range(n)]
    for turn in range(TURNS):
        inbounds = [inbound(key, turn, f"{run}-{i}-{turn}") for i, key in enumerate(keys)]
        per_turn: list[int] = []
        started = clock()
        for item in inbounds:
            t0 = clock()
            await engine.handle(item)
            per_turn.append(clock() - t0)
        loop_ns += clock() - started
        samples.append(per_turn)
        del inbounds
        if after_round is not None:
            await after_round(turn)
    return Timing(samples, loop_ns)


async def check_conversations(store: Store, run: str, n: int) -> None:
    """Every conversation must have walked the whole journey."""
    for i in sorted({0, n // 2, n - 1}):
        conv = await store.load(conversation_key(run, i))
        assert conv is not None, f"conversation {i} of {run} missing"
        where = f"{conv.flow}/{conv.state}"
        if where != "logistics/delivered" or conv.owner != "bot":
            raise SystemExit(f"{run}: conversation {i} ended {where} ({conv.owner})")


class StoreWork:
    """Counts statements, commits and store calls on a SQLStore's engine."""

    def __init__(self, store: Any) -> None:
        from sqlalchemy import event

        sync_engine = store._sync_engine or store._async_engine.sync_engine
        self.statements: dict[str, int] = {}
        self.rows_written = 0
        self.commits = 0
        self.checkouts = 0
        self.enabled = True

        def on_execute(conn: Any, cursor: Any, statement: str, parameters: Any,
                       context: Any, executemany: bool) -> None:
            if not self.enabled:
                return
            verb = statement.lstrip().split(None, 1)[0].upper()
            self.statements[verb] = self.statements.get(verb, 0) + 1
            if verb in ("INSERT", "UPDATE"):
                self.rows_written += len(parameters) if executemany else 1

        def on_commit(conn: Any) -> None:
            if self.enabled:
                self.commits += 1

        def on_checkout(*args: Any) -> None:
            if self.enabled:
                self.checkouts += 1

        event.listen(sync_engine, "before_cursor_execute", on_execute)
        event.listen(sync_engine, "commit", on_commit)
        event.listen(sync_engine.pool, "checkout", on_checkout)

    def per_turn(self, turns: int) -> dict[str, Any]:
        return {
            "statements": round(sum(self.statements.values()) / turns, 2),
            "by_verb": {k: round(v / turns, 2) for k, v in sorted(self.statements.items())},
            "rows_written": round(self.rows_written / turns, 2),
            "commits": round(self.commits / turns, 2),
            "store_calls": round(self.checkouts / turns, 2),
        }


_STATE_BYTES_SQL = """
SELECT count(*),
       avg({scalars}),
       avg(length(CAST(entities AS BLOB))),
       avg(length(CAST(results AS BLOB))),
       avg(length(CAST(counters AS BLOB))),
       max({scalars} + length(CAST(entities AS BLOB)) + length(CAST(results AS BLOB))
           + length(CAST(counters AS BLOB)))
FROM conversation WHERE account = ?
"""
_SCALAR_COLUMNS = ("id", "channel", "account", "thread", "flow", "state", "language", "owner",
                   "owner_agent", "handoff_reason", "waiting_since", "summary", "seq",
                   "version", "closed", "created_at", "updated_at")


def state_bytes(db_path: Path, run: str) -> dict[str, Any]:
    """Bytes of the stored conversation rows (values as SQLite stores them as text)."""
    scalars = " + ".join(f"coalesce(length(CAST({c} AS BLOB)), 0)" for c in _SCALAR_COLUMNS)
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        count, scal, ent, res, cnt, biggest = db.execute(
            _STATE_BYTES_SQL.format(scalars=scalars), (run,)).fetchone()
        msg_cols = ("conversation_id", "seq", "direction", "kind", "author", "text",
                    "data", "channel", "channel_message_id", "created_at")
        msg_bytes = " + ".join(f"coalesce(length(CAST({c} AS BLOB)), 0)" for c in msg_cols)
        messages, msg_total = db.execute(
            f"SELECT count(*), sum({msg_bytes}) FROM message").fetchone()
        hist_cols = ("conversation_id", "name", "value", "previous", "turn", "source",
                     "created_at")
        hist_bytes = " + ".join(f"coalesce(length(CAST({c} AS BLOB)), 0)" for c in hist_cols)
        changes, hist_total = db.execute(
            f"SELECT count(*), sum({hist_bytes}) FROM entity_history").fetchone()
    return {
        "conversations": count,
        "state_bytes_mean": round(scal + ent + res + cnt),
        "state_bytes_max": biggest,
        "scalars": round(scal),
        "entities": round(ent),
        "results": round(res),
        "counters": round(cnt),
        "message_log_bytes_per_conversation": round((msg_total or 0) / count),
        "messages_per_conversation": round(messages / count, 1),
        "entity_history_bytes_per_conversation": round((hist_total or 0) / count),
        "entity_changes_per_conversation": round(changes / count, 1),
        "db_file_bytes_per_conversation": round(_db_size(db_path) / count),
    }


def _db_size(db_path: Path) -> int:
    return sum(p.stat().st_size for p in db_path.parent.glob(db_path.name + "*"))


# --------------------------------------------------------------------------- memory


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover


async def memory_phase(n: int, with_tracemalloc: bool) -> dict[str, Any]:
    """Run in a child process: the in-memory engine holding ``n`` conversations."""
    script = await record_script(ROOT / "flows", ROOT / "prompts")
    actions = replay_actions(script)
    flows = load_flows(ROOT / "flows", ROOT / "prompts", actions.names())
    store = MemoryStore()
    engine = make_engine(flows, store, ScriptedModel(script), actions)
    # Warm up code paths and caches on conversations that are not counted.
    await run_engine(engine, "warm", 5)
    store = MemoryStore()
    engine.store = store
    gc.collect()
    rss_before = _proc_status_kib("VmRSS")
    hwm_before = _proc_status_kib("VmHWM")
    if with_tracemalloc:
        tracemalloc.start()
    await run_engine(engine, "mem", n)
    out: dict[str, Any] = {}
    if with_tracemalloc:
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out.update(tracemalloc_peak_mib=round(peak / 2**20, 2),
                   tracemalloc_retained_mib=round(current / 2**20, 2))
    gc.collect()
    hwm_after = _proc_status_kib("VmHWM")
    out.update(
        rss_baseline_mib=round(rss_before / 1024, 1),
        rss_peak_mib=round(hwm_after / 1024, 1),
        rss_peak_delta_mib=round((hwm_after - max(rss_before, hwm_before)) / 1024, 1)
        if hwm_after > hwm_before else round((hwm_after - rss_before) / 1024, 1),
        ru_maxrss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    # Where the retained memory lives: the stored state and the message log.
    out["stored_state_json_bytes_mean"] = round(sum(
        len(c.entities) + len(c.results) + len(c.counters) for c in store._by_id.values()
    ) / n)
    out["messages_per_conversation"] = round(
        sum(len(v) for v in store._messages.values()) / n, 1)
    return out


def run_memory_child(n: int, with_tracemalloc: bool) -> dict[str, Any]:
    args = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(n)]
    if with_tracemalloc:
        args.append("--tracemalloc")
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory child failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- concurrency


async def concurrency_level(flows: FlowSet, script: Script, actions: ActionRegistry,
                            store: Store, n: int, turns: tuple[int, ...]) -> dict[str, Any]:
    """``n`` conversations at once, each taking ``turns`` back to back against a slow model.

    Turn 1 (routing: two model calls) is done beforehand with the model at zero
    latency; the timed turns each make exactly one model call. Conversations
    start at random offsets within one model delay so the load is spread out.
    """
    model = SleepingModel(script, 0.0)
    engine = make_engine(flows, store, model, actions)
    run = f"conc{n}"
    keys = [conversation_key(run, i) for i in range(n)]
    for i, key in enumerate(keys):
        await engine.handle(inbound(key, 0, f"{run}-{i}-0"))
    model.delay = MODEL_DELAY_S
    latencies: list[float] = []
    rng = random.Random(n)
    clock = time.perf_counter
    loop = asyncio.get_running_loop()
    lag: list[float] = []
    stop = asyncio.Event()

    async def watch_lag() -> None:
        while not stop.is_set():
            t = loop.time()
            await asyncio.sleep(0.01)
            lag.append(loop.time() - t - 0.01)

    async def customer(i: int, key: ConversationKey) -> None:
        await asyncio.sleep(rng.random() * MODEL_DELAY_S)
        for turn in turns:
            started = clock()
            await engine.handle(inbound(key, turn, f"{run}-{i}-{turn}"))
            latencies.append(clock() - started)

    watcher = asyncio.create_task(watch_lag())
    started = clock()
    await asyncio.wait_for(asyncio.gather(*(customer(i, k) for i, k in enumerate(keys))),
                           timeout=120)
    elapsed = clock() - started
    stop.set()
    await watcher
    latencies.sort()
    lag.sort()
    return {
        "conversations": n,
        "turns": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "turns_per_s": round(len(latencies) / elapsed),
        "loop_lag_p99_ms": round(percentile(lag, 0.99) * 1000, 1),
        "ok": percentile(latencies, 0.99) * 1000 < CONCURRENCY_P99_MS,
    }


async def concurrency_sweep(flows: FlowSet, script: Script, actions: ActionRegistry,
                            levels: list[int], make_store: Callable[[int], Any],
                            label: str) -> dict[str, Any]:
    rows = []
    best = 0
    for n in levels:
        store = await make_store(n)
        try:
            gc.collect()
            row = await concurrency_level(flows, script, actions, store, n, (1, 2, 3))
        finally:
            await store.close()
        rows.append(row)
        print(f"  {label:<7} {n:>5} concurrent: p50 {row['p50_ms']:>6.1f} ms  "
              f"p99 {row['p99_ms']:>7.1f} ms  {row['turns_per_s']:>6} turns/s  "
              f"loop lag p99 {row['loop_lag_p99_ms']:.1f} ms", flush=True)
        if not row["ok"]:
            break
        best = n
    return {"store": label, "max_concurrent_p99_under_250ms": best, "levels": rows}


# --------------------------------------------------------------------------- profile


async def profile(kind: str, n: int, top: int = 30) -> str:
    script = await record_script(ROOT / "flows", ROOT / "prompts")
    actions = replay_actions(script)
    flows = load_flows(ROOT / "flows", ROOT / "prompts", actions.names())
    with tempfile.TemporaryDirectory() as tmp:
        store: Store
        if kind == "sqlite":
            from engine.store.sql import SQLStore

            store = SQLStore(f"sqlite:///{Path(tmp) / 'engine.db'}")
        else:
            store = MemoryStore()
        await store.open()
        engine = make_engine(flows, store, ScriptedModel(script), actions)
        await run_engine(engine, "warm", 20)
        profiler = cProfile.Profile()
        profiler.enable()
        await run_engine(engine, "prof", n)
        profiler.disable()
        await store.close()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# --------------------------------------------------------------------------- main


def machine_info() -> dict[str, Any]:
    import jinja2
    import sqlalchemy

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "jinja2": jinja2.__version__,
    }


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    print(f"- {name} ...", flush=True)
    gc.collect()
    started = time.perf_counter()
    yield
    print(f"  ({time.perf_counter() - started:.1f} s)", flush=True)


def _fmt_timing(label: str, s: dict[str, Any], floor: dict[str, Any] | None) -> str:
    ratio = f"{s['mean_us'] / floor['mean_us']:5.1f}x" if floor else "     "
    return (f"  {label:<34} {s['turns_per_s']:>8} turns/s  mean {s['mean_us']:>7.1f} us  "
            f"p99 {s['p99_us']:>7.1f} us  {ratio}")


async def main_run(n: int, quick: bool) -> dict[str, Any]:
    from engine.store.sql import SQLStore

    t_start = time.perf_counter()
    print(f"Helpline turn benchmark: {n} conversations x {TURNS} turns, interleaved "
          f"({os.cpu_count()} CPUs, Python {platform.python_version()})", flush=True)
    with phase("recording the journey (offline model + real demo shop)"):
        script = await record_script(ROOT / "flows", ROOT / "prompts")
    for line in script.transcript:
        print("    " + line[:110])
    actions = replay_actions(script)
    flows = load_flows(ROOT / "flows", ROOT / "prompts", actions.names())
    timings: dict[str, Any] = {}
    store_work: dict[str, Any] = {}
    bytes_info: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="helpline-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # Warm-up: imports, lazily compiled templates, caches.
        warm_store = MemoryStore()
        await run_engine(make_engine(flows, warm_store, ScriptedModel(script), actions),
                         "warm", 20)
        run_floor(script, 20, None)

        with phase("floor, in memory"):
            timings["floor_memory"] = run_floor(script, n, None).summary()
        with phase("floor, SQLite"):
            timings["floor_sqlite"] = run_floor(script, n, tmp / "floor.db").summary()

        with phase("engine, scripted model, MemoryStore"):
            store = MemoryStore()
            engine = make_engine(flows, store, ScriptedModel(script), actions)
            timings["engine_memory"] = (await run_engine(engine, "mem", n)).summary()
            await check_conversations(store, "mem", n)
            del store, engine

        with phase("engine, scripted model, SQLStore (SQLite file)"):
            db_path = tmp / "engine.db"
            sql_store = SQLStore(f"sqlite:///{db_path}")
            await sql_store.open()
            work = StoreWork(sql_store)
            per_round: list[dict[str, Any]] = []

            async def after_round(turn: int) -> None:
                work.enabled = False
                per_round.append(state_bytes(db_path, "sql"))
                work.enabled = True

            engine = make_engine(flows, sql_store, ScriptedModel(script), actions)
            timings["engine_sqlite"] = (await run_engine(engine, "sql", n, after_round)).summary()
            work.enabled = False
            await check_conversations(sql_store, "sql", n)
            await sql_store.close()
            store_work = work.per_turn(n * TURNS)
            bytes_info = per_round[-1]
            bytes_info["state_bytes_mean_after_turn"] = [r["state_bytes_mean"]
                                                         for r in per_round]
            del engine, sql_store

        with phase("engine, offline model, MemoryStore"):
            store = MemoryStore()
            engine = make_engine(flows, store, OfflineModel(), actions)
            timings["engine_offline_memory"] = (await run_engine(engine, "off", n)).summary()
            await check_conversations(store, "off", n)
            del store, engine

    with phase(f"peak memory, {n} conversations in a fresh process"):
        memory = run_memory_child(n, with_tracemalloc=False)
        memory.update({k: v for k, v in run_memory_child(n, with_tracemalloc=True).items()
                       if k.startswith("tracemalloc")})

    levels = [100, 200, 400] if quick else [500, 1000, 2000, 3000, 4000, 5000, 6000]
    concurrency: dict[str, Any] = {}
    with phase(f"concurrency, model sleeping {MODEL_DELAY_S * 1000:.0f} ms per call"), \
            tempfile.TemporaryDirectory(prefix="helpline-bench-") as tmp_name:

        async def memory_store(n: int) -> Store:
            return MemoryStore()

        async def sqlite_store(n: int) -> Store:
            store = SQLStore(f"sqlite:///{Path(tmp_name) / f'conc{n}.db'}")
            await store.open()
            return store

        concurrency["memory"] = await concurrency_sweep(flows, script, actions, levels,
                                                        memory_store, "memory")
        concurrency["sqlite"] = await concurrency_sweep(flows, script, actions, levels,
                                                        sqlite_store, "sqlite")

    return {
        "machine": machine_info(),
        "config": {
            "conversations": n,
            "turns_per_conversation": TURNS,
            "interleaved": True,
            "journey": [f"{k}: {t}" for k, t in JOURNEY],
            "quick": quick,
            "concurrency_model_delay_ms": MODEL_DELAY_S * 1000,
            "concurrency_timed_turns": "turns 2-4 (one model call each)",
        },
        "transcript": script.transcript,
        "context": {"demo_shop_action_ms": script.action_ms},
        "timings": timings,
        "store_work_per_turn_sqlite": store_work,
        "state_bytes_sqlite": bytes_info,
        "memory": memory,
        "concurrency": concurrency,
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def evaluate(r: dict[str, Any]) -> dict[str, Any]:
    t = r["timings"]
    fm, fs = t["floor_memory"]["mean_us"], t["floor_sqlite"]["mean_us"]
    ratios = {
        "engine_memory": round(t["engine_memory"]["mean_us"] / fm, 2),
        "engine_sqlite": round(t["engine_sqlite"]["mean_us"] / fs, 2),
        "engine_offline_memory": round(t["engine_offline_memory"]["mean_us"] / fm, 2),
    }
    conc = r["concurrency"]["memory"]["max_concurrent_p99_under_250ms"]
    commits = r["store_work_per_turn_sqlite"]["commits"]
    state = r["state_bytes_sqlite"]["state_bytes_max"]
    peak = r["memory"]["rss_peak_delta_mib"]
    return {
        "ratio_vs_floor": ratios,
        "goals": {
            "engine_memory_at_most_2x_floor": ratios["engine_memory"] <= GOAL_RATIO,
            "engine_sqlite_at_most_2x_floor": ratios["engine_sqlite"] <= GOAL_RATIO,
            "one_commit_per_turn": commits <= GOAL_COMMITS,
            "state_under_1_5_kb": state < GOAL_STATE_BYTES,
            "peak_memory_under_60_mib": peak < GOAL_PEAK_MIB,
            "at_least_3000_concurrent": conc >= GOAL_CONCURRENT,
        },
    }


def markdown(r: dict[str, Any]) -> str:
    t = r["timings"]
    g = r["evaluation"]["goals"]
    ratio = r["evaluation"]["ratio_vs_floor"]
    w = r["store_work_per_turn_sqlite"]
    b = r["state_bytes_sqlite"]
    m = r["memory"]
    cm = r["concurrency"]["memory"]
    cs = r["concurrency"]["sqlite"]
    mi = r["machine"]
    n = r["config"]["conversations"]

    def ok(flag: bool) -> str:
        return "met" if flag else "**missed**"

    def row(label: str, key: str, ratio_key: str | None, goal: str) -> str:
        s = t[key]
        rat = f"{ratio[ratio_key]:.2f}x" if ratio_key else "-"
        return (f"| {label} | {s['turns_per_s']:,} | {s['mean_us']:.1f} | {s['p99_us']:.1f} | "
                f"{rat} | {goal} |")

    lines = [
        f"Measured {mi['date'][:10]} on {mi['cpu_count']} CPUs ({mi['cpu_model'] or 'unknown'}), "
        f"Python {mi['python']}, SQLite {mi['sqlite']}, SQLAlchemy {mi['sqlalchemy']}: "
        f"{n} conversations x {TURNS} turns, interleaved (turn 1 of all, then turn 2 of all...).",
        "",
        "| Per-turn cost | turns/s | mean us | p99 us | vs floor | goal |",
        "|---|---:|---:|---:|---:|---|",
        row("floor, in memory", "floor_memory", None, ""),
        row("floor, SQLite", "floor_sqlite", None, ""),
        row("engine, scripted model, memory store", "engine_memory", "engine_memory",
            f"<= 2x floor: {ok(g['engine_memory_at_most_2x_floor'])}"),
        row("engine, scripted model, SQLite store", "engine_sqlite", "engine_sqlite",
            f"<= 2x floor: {ok(g['engine_sqlite_at_most_2x_floor'])}"),
        row("engine, offline model, memory store", "engine_offline_memory",
            "engine_offline_memory", "(model cost included)"),
        "",
        "Mean per turn of the journey (us), turns 1-6: "
        f"floor memory {t['floor_memory']['by_turn_mean_us']}, "
        f"engine memory {t['engine_memory']['by_turn_mean_us']}, "
        f"engine SQLite {t['engine_sqlite']['by_turn_mean_us']}.",
        "",
        "| Resource | measured | goal |",
        "|---|---|---|",
        f"| store work per turn (SQLite) | {w['statements']} statements "
        f"({', '.join(f'{k} {v}' for k, v in w['by_verb'].items())}), "
        f"{w['commits']} commit, {w['store_calls']} store calls (thread hops) | "
        f"one commit: {ok(g['one_commit_per_turn'])} |",
        f"| conversation state stored (excl. message log) | mean {b['state_bytes_mean']} B, "
        f"max {b['state_bytes_max']} B (results {b['results']}, entities {b['entities']}, "
        f"counters {b['counters']}, scalars {b['scalars']}) | < 1.5 KB: "
        f"{ok(g['state_under_1_5_kb'])} |",
        f"| message log per conversation | {b['message_log_bytes_per_conversation']} B in "
        f"{b['messages_per_conversation']} rows; entity history "
        f"{b['entity_history_bytes_per_conversation']} B; SQLite file "
        f"{b['db_file_bytes_per_conversation']} B/conversation | - |",
        f"| peak memory, {n} conversations, memory store | RSS +{m['rss_peak_delta_mib']} MiB "
        f"(process peak {m['rss_peak_mib']} MiB, baseline {m['rss_baseline_mib']} MiB); "
        f"tracemalloc peak {m.get('tracemalloc_peak_mib')} MiB, retained "
        f"{m.get('tracemalloc_retained_mib')} MiB | < 60 MiB: "
        f"{ok(g['peak_memory_under_60_mib'])} |",
        f"| concurrent conversations, model 200 ms, p99 < 250 ms, memory store | "
        f"{cm['max_concurrent_p99_under_250ms']} | >= 3000: "
        f"{ok(g['at_least_3000_concurrent'])} |",
        f"| same, SQLite store | {cs['max_concurrent_p99_under_250ms']} | - |",
        "",
        "| Concurrent conversations | memory p50 / p99 ms | memory turns/s | "
        "SQLite p50 / p99 ms | SQLite turns/s |",
        "|---:|---|---:|---|---:|",
    ]
    by_n_sql = {x["conversations"]: x for x in cs["levels"]}
    for x in cm["levels"]:
        s = by_n_sql.get(x["conversations"])
        sql_cells = (f"{s['p50_ms']} / {s['p99_ms']} | {s['turns_per_s']:,}" if s
                     else "- | -")
        lines.append(f"| {x['conversations']} | {x['p50_ms']} / {x['p99_ms']} | "
                     f"{x['turns_per_s']:,} | {sql_cells} |")
    for n_sql, s in by_n_sql.items():
        if n_sql not in {x["conversations"] for x in cm["levels"]}:
            lines.append(f"| {n_sql} | - | - | {s['p50_ms']} / {s['p99_ms']} | "
                         f"{s['turns_per_s']:,} |")
    notes = r.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def print_summary(r: dict[str, Any]) -> None:
    t = r["timings"]
    print("\nPer-turn cost (mean is compared with the floor doing the same work):")
    print(_fmt_timing("floor, in memory", t["floor_memory"], None))
    print(_fmt_timing("floor, SQLite", t["floor_sqlite"], None))
    print(_fmt_timing("engine, scripted, memory store", t["engine_memory"], t["floor_memory"]))
    print(_fmt_timing("engine, scripted, SQLite store", t["engine_sqlite"], t["floor_sqlite"]))
    print(_fmt_timing("engine, offline model, memory", t["engine_offline_memory"],
                      t["floor_memory"]))
    w, b, m = r["store_work_per_turn_sqlite"], r["state_bytes_sqlite"], r["memory"]
    print(f"\nStore work per turn (SQLite): {w['statements']} statements {w['by_verb']}, "
          f"{w['commits']} commits, {w['store_calls']} store calls")
    print(f"State bytes per conversation: mean {b['state_bytes_mean']}, max "
          f"{b['state_bytes_max']} (after each turn: {b['state_bytes_mean_after_turn']}); "
          f"message log {b['message_log_bytes_per_conversation']} B")
    print(f"Memory: RSS +{m['rss_peak_delta_mib']} MiB (peak {m['rss_peak_mib']} MiB), "
          f"tracemalloc peak {m.get('tracemalloc_peak_mib')} MiB")
    for label in ("memory", "sqlite"):
        c = r["concurrency"][label]
        print(f"Concurrency ({label}): {c['max_concurrent_p99_under_250ms']} conversations "
              "with p99 < 250 ms")
    print("\nGoals:")
    for goal, met in r["evaluation"]["goals"].items():
        print(f"  {'ok    ' if met else 'MISSED'} {goal}")


#: Written by hand after profiling (see bench/README.md); kept in the JSON next to the numbers.
NOTES_FILE = RESULTS / "turns_notes.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (~10 s)")
    parser.add_argument("--conversations", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default bench/results/turns.json; a --quick run "
                        "writes nothing unless this is given)")
    parser.add_argument("--profile", choices=("memory", "sqlite"),
                        help="cProfile the engine's scripted run instead of benchmarking")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        result = asyncio.run(memory_phase(args.memory_child, args.tracemalloc))
        print(json.dumps(result))
        return 0
    n = args.conversations or (200 if args.quick else 2000)
    if args.profile:
        print(asyncio.run(profile(args.profile, n)))
        return 0

    result = asyncio.run(main_run(n, args.quick))
    result["evaluation"] = evaluate(result)
    if NOTES_FILE.exists():
        result["notes"] = json.loads(NOTES_FILE.read_text(encoding="utf-8"))
    print_summary(result)
    output = args.output
    if output is None:
        if args.quick:
            return 0
        output = RESULTS / "turns.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    output.with_suffix(".md").write_text(md, encoding="utf-8")
    print(f"\nwrote {output} and {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
