"""Per-turn cost of the engine against a hand-written floor, store work, memory, concurrency.

    python bench/turns.py [--quick] [--conversations N] [--profile memory|sqlite]

Everything runs in one invocation (``make bench`` runs it through
``bench/run_all.py``) and is written to ``bench/results/turns.json`` plus a
markdown section in ``bench/results/turns.md`` (with the README row
``bench/run_all.py`` collects). The figures of the results it replaces are kept
under ``previous`` and compared against in the notes.

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

Every engine is built as ``engine.app.build_app`` leaves it for serving: once
the engine exists, ``gc.collect()`` then ``gc.freeze()`` (``make_engine``), so
full collections skip everything built at start-up. A comparison row runs the
in-memory engine without the freeze, and one wires it as ``build_app`` does
(``Privacy`` redaction and ``Metrics``). On SQLite the store answers a turn with
two store calls (``load_for_turn``: dedupe lookup + load, then ``commit_turn``),
each one job on the store's own worker thread, running raw SQL on a sqlite3
cursor; the statements are counted with the connection's
``set_trace_callback`` (SQLAlchemy's events do not see that path).

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
import pickle
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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.actions import ActionContext, ActionRegistry, ActionResult  # noqa: E402
from engine.core.types import Inbound  # noqa: E402
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
    ("text", "HL26110842"),  # engine.demo.shop.ORDER_SMALL: delivered, 129.00, refundable
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
    # Imported here: the shop pulls in SQLAlchemy and sqlmodel, which the
    # memory measurement (a child process running the memory store) must not count.
    from engine.demo.actions import build_actions
    from engine.demo.shop import ORDER_SMALL, Shop

    assert JOURNEY[1][1] == ORDER_SMALL
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
        result: ActionResult = await fn(ctx)
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


class GcWatch:
    """Time spent in the garbage collector while active (gc.callbacks)."""

    def __init__(self) -> None:
        self.pauses: list[list[int]] = [[], [], []]
        self._started = 0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter_ns()
        else:
            self.pauses[info["generation"]].append(time.perf_counter_ns() - self._started)

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self, turns: int) -> dict[str, Any]:
        every = [p for gen in self.pauses for p in gen]
        return {
            "gc_us_per_turn": round(sum(every) / turns / 1000, 1),
            "gc_max_pause_ms": round(max(every, default=0) / 1e6, 1),
            "gc_collections_by_generation": [len(gen) for gen in self.pauses],
        }


@dataclass
class Timing:
    """Per-turn wall samples (ns) by turn index, loop wall and CPU time, GC time."""

    samples: list[list[int]]
    loop_ns: int
    cpu_ns: int
    gc: GcWatch

    def summary(self) -> dict[str, Any]:
        flat = sorted(s for per_turn in self.samples for s in per_turn)
        turns = len(flat)
        return {
            "turns": turns,
            "turns_per_s": round(turns / (self.loop_ns / 1e9)),
            "mean_us": round(sum(flat) / turns / 1000, 1),
            "p50_us": round(percentile(flat, 0.50) / 1000, 1),
            "p99_us": round(percentile(flat, 0.99) / 1000, 1),
            "max_us": round(flat[-1] / 1000, 1),
            # Process CPU time (all threads) per turn: robust against a busy machine.
            "cpu_us": round(self.cpu_ns / turns / 1000, 1),
            "by_turn_mean_us": [round(sum(t) / len(t) / 1000, 1) for t in self.samples],
            **self.gc.summary(turns),
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
        self.log: dict[str, list[tuple[str, int, str, str]]] = {}
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
    loop_ns = cpu_ns = 0
    clock, cpu = time.perf_counter_ns, time.process_time_ns
    try:
        with GcWatch() as watch:
            for turn in range(TURNS):
                text = JOURNEY[turn][1]
                keys = [f"bench:floor:c{i:05d}" for i in range(n)]
                per_turn: list[int] = []
                started, cpu_started = clock(), cpu()
                for key in keys:
                    t0 = clock()
                    floor.turn(key, turn, text)
                    per_turn.append(clock() - t0)
                loop_ns += clock() - started
                cpu_ns += cpu() - cpu_started
                samples.append(per_turn)
    finally:
        floor.close()
    return Timing(samples, loop_ns, cpu_ns, watch)


# --------------------------------------------------------------------------- the engine


def make_engine(flows: FlowSet, store: Store, model: Model, actions: ActionRegistry, *,
                freeze: bool = True, production: bool = False) -> Engine:
    """The engine, with the garbage collector as ``engine.app.build_app`` leaves it.

    ``build_app`` ends with ``gc.collect(); gc.freeze()``: everything alive at
    start-up moves to the permanent generation, which full collections skip.
    Done here too (``freeze=False`` for the comparison row); :func:`phase`
    unfreezes between variants, so each one starts from its own freeze.
    ``production`` wires the engine as ``build_app`` does: ``Privacy``
    (redaction of the model's text, reply filter) and ``Metrics``.
    """
    if production:
        from engine.metrics import Metrics
        from engine.safety.privacy import Privacy

        engine = Engine(flows, store, model, actions, privacy=Privacy(), metrics=Metrics())
    else:
        engine = Engine(flows, store, model, actions)
    if freeze:
        freeze_like_build_app()
    return engine


def freeze_like_build_app() -> None:
    """What ``engine.app.build_app`` does once the engine is built."""
    gc.collect()
    gc.freeze()


async def run_engine(engine: Engine, run: str, n: int,
                     after_round: Callable[[int], Awaitable[None]] | None = None) -> Timing:
    """``n`` conversations x the journey, interleaved, one ``handle`` timed at a time."""
    samples: list[list[int]] = []
    loop_ns = cpu_ns = 0
    clock, cpu = time.perf_counter_ns, time.process_time_ns
    keys = [conversation_key(run, i) for i in range(n)]
    with GcWatch() as watch:
        for turn in range(TURNS):
            inbounds = [inbound(key, turn, f"{run}-{i}-{turn}") for i, key in enumerate(keys)]
            per_turn: list[int] = []
            started, cpu_started = clock(), cpu()
            for item in inbounds:
                t0 = clock()
                await engine.handle(item)
                per_turn.append(clock() - t0)
            loop_ns += clock() - started
            cpu_ns += cpu() - cpu_started
            samples.append(per_turn)
            del inbounds
            if after_round is not None:
                # Outside the timed loop, and with the GC watch's numbers unaffected
                # in practice (a few queries).
                await after_round(turn)
    if engine.stats.get("duplicates") or engine.stats.get("conflicts"):
        raise SystemExit(f"{run}: unexpected duplicates/conflicts: {engine.stats}")
    return Timing(samples, loop_ns, cpu_ns, watch)


async def check_conversations(store: Store, run: str, n: int) -> None:
    """Conversations must have walked the whole journey (first, middle, last checked)."""
    for i in sorted({0, n // 2, n - 1}):
        conv = await store.load(conversation_key(run, i))
        assert conv is not None, f"conversation {i} of {run} missing"
        where = f"{conv.flow}/{conv.state}"
        if where != "logistics/delivered" or conv.owner != "bot":
            raise SystemExit(f"{run}: conversation {i} ended {where} ({conv.owner})")


class StoreWork:
    """Counts statements, rows written, commits and store calls of a SQLStore on SQLite.

    The per-turn statements run on the store's raw sqlite3 cursor (its fast
    path), which SQLAlchemy's events never see: they are counted with the
    connection's ``set_trace_callback`` (installed on the worker thread by
    :meth:`attach`). sqlite3 reports every execution, and ``executemany`` runs
    its statement once per row, so consecutive INSERTs into the same table are
    counted as one statement (one ``executemany``) and each as a row written.
    The implicit ``BEGIN`` and the ``COMMIT`` are counted apart. Statements
    that still go through SQLAlchemy (anything off the fast path) are counted
    with its ``before_cursor_execute``/``commit`` events and added in. Store
    calls are jobs handed to the store's worker thread (``SQLStore._call``,
    one thread hop each), whichever path they take.
    """

    def __init__(self, store: Any) -> None:
        from sqlalchemy import event

        self.store = store
        self.statements: dict[str, int] = {}
        self.executions: dict[str, int] = {}
        self.rows_written = 0
        self.commits = 0
        self.transactions = 0
        self.rollbacks = 0
        self.calls = 0
        self.via_sqlalchemy = 0
        self.enabled = False
        self._last_insert: str | None = None

        inner_call = store._call

        def counting_call(fn: Callable[[], Any]) -> Any:
            if self.enabled:
                self.calls += 1
            return inner_call(fn)

        store._call = counting_call
        sync_engine = store._sync_engine

        def on_execute(conn: Any, cursor: Any, statement: str, parameters: Any,
                       context: Any, executemany: bool) -> None:
            if not self.enabled:
                return
            verb = statement.lstrip().split(None, 1)[0].upper()
            self.via_sqlalchemy += 1
            self.statements[verb] = self.statements.get(verb, 0) + 1
            rows = len(parameters) if executemany else 1
            self.executions[verb] = self.executions.get(verb, 0) + rows
            if verb in ("INSERT", "UPDATE"):
                self.rows_written += rows

        def on_commit(conn: Any) -> None:
            if self.enabled:
                self.commits += 1

        event.listen(sync_engine, "before_cursor_execute", on_execute)
        event.listen(sync_engine, "commit", on_commit)

    def _trace(self, sql: str) -> None:
        if not self.enabled:
            return
        words = sql.split(None, 3)
        verb = words[0].upper() if words else ""
        if verb == "BEGIN":
            self.transactions += 1
        elif verb == "COMMIT":
            self.commits += 1
        elif verb == "ROLLBACK":
            self.rollbacks += 1
        else:
            self.executions[verb] = self.executions.get(verb, 0) + 1
            insert_into = words[2] if verb == "INSERT" and len(words) > 2 else None
            if insert_into is None or insert_into != self._last_insert:
                self.statements[verb] = self.statements.get(verb, 0) + 1
            if verb in ("INSERT", "UPDATE"):
                self.rows_written += 1
            self._last_insert = insert_into
            return
        self._last_insert = None

    async def attach(self) -> None:
        """Install the trace callback on the fast path's connection (worker thread)."""
        if not self.store.raw_sqlite:
            return
        trace = self._trace
        await self.store._raw(lambda cursor: cursor.connection.set_trace_callback(trace))

    async def detach(self) -> None:
        self.enabled = False
        if self.store.raw_sqlite:
            await self.store._raw(lambda cursor: cursor.connection.set_trace_callback(None))

    def per_turn(self, turns: int) -> dict[str, Any]:
        return {
            "statements": round(sum(self.statements.values()) / turns, 2),
            "by_verb": {k: round(v / turns, 2) for k, v in sorted(self.statements.items())},
            "executions": round(sum(self.executions.values()) / turns, 2),
            "rows_written": round(self.rows_written / turns, 2),
            "transactions": round(self.transactions / turns, 2),
            "commits": round(self.commits / turns, 2),
            "rollbacks": round(self.rollbacks / turns, 2),
            "store_calls": round(self.calls / turns, 2),
            "statements_via_sqlalchemy": round(self.via_sqlalchemy / turns, 2),
            "counted_with": "sqlite3 set_trace_callback on the store's fast-path connection "
                            "(+ SQLAlchemy events for anything else); store calls = jobs on "
                            "the store's worker thread (SQLStore._call)",
        }


_SCALAR_COLUMNS = ("id", "channel", "account", "thread", "flow", "state", "language", "owner",
                   "owner_agent", "handoff_reason", "waiting_since", "summary", "seq",
                   "version", "closed", "created_at", "updated_at")
_JSON_COLUMNS = ("entities", "results", "counters")
_MESSAGE_COLUMNS = ("conversation_id", "seq", "direction", "kind", "author", "text", "data",
                    "channel", "channel_message_id", "created_at")
_HISTORY_COLUMNS = ("conversation_id", "name", "value", "previous", "turn", "source",
                    "created_at")


def _bytes_expr(columns: tuple[str, ...]) -> str:
    # Values as SQLite holds them, measured as text (integers by their digits).
    return " + ".join(f"coalesce(length(CAST({c} AS BLOB)), 0)" for c in columns)


def state_bytes(db_path: Path, run: str) -> dict[str, Any]:
    """Bytes of the stored conversation rows, and of the message log, per conversation."""
    scalars = _bytes_expr(_SCALAR_COLUMNS)
    documents = _bytes_expr(_JSON_COLUMNS)
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        count, scal, ent, res, cnt, biggest = db.execute(
            f"SELECT count(*), avg({scalars}), avg(length(CAST(entities AS BLOB))), "
            f"avg(length(CAST(results AS BLOB))), avg(length(CAST(counters AS BLOB))), "
            f"max({scalars} + {documents}) FROM conversation WHERE account = ?",
            (run,)).fetchone()
        messages, msg_total = db.execute(
            f"SELECT count(*), sum({_bytes_expr(_MESSAGE_COLUMNS)}) FROM message "
            "WHERE conversation_id IN (SELECT id FROM conversation WHERE account = ?)",
            (run,)).fetchone()
        changes, hist_total = db.execute(
            f"SELECT count(*), sum({_bytes_expr(_HISTORY_COLUMNS)}) FROM entity_history "
            "WHERE conversation_id IN (SELECT id FROM conversation WHERE account = ?)",
            (run,)).fetchone()
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


# --------------------------------------------------------------------------- breakdown


class _CpuMeter:
    """Wraps callables on an instance and adds up the thread CPU time they take."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def wrap_async(self, obj: Any, name: str, label: str, clock: Callable[[], int]) -> None:
        inner = getattr(obj, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return await inner(*args, **kwargs)
            finally:
                self.ns[label] = self.ns.get(label, 0) + clock() - started
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(obj, name, timed)

    def wrap_sync(self, obj: Any, name: str, label: str, clock: Callable[[], int]) -> None:
        inner = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                self.ns[label] = self.ns.get(label, 0) + clock() - started
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(obj, name, timed)

    def overhead_ns(self, clock: Callable[[], int], calls: int = 20000) -> float:
        """What wrapping adds to one call (the clock reads, mostly), measured on a no-op."""

        class _Probe:
            def noop(self) -> None:
                return None

        plain, wrapped = _Probe(), _Probe()
        probe = _CpuMeter()
        probe.wrap_sync(wrapped, "noop", "probe", clock)
        best = float("inf")
        for _ in range(3):
            started = clock()
            for _ in range(calls):
                wrapped.noop()
            middle = clock()
            for _ in range(calls):
                plain.noop()
            best = min(best, ((middle - started) - (clock() - middle)) / calls)
        return max(best, 0.0)

    def per_turn(self, turns: int) -> dict[str, dict[str, float]]:
        return {label: {"us_per_turn": round(ns / turns / 1000, 1),
                        "calls_per_turn": round(self.calls[label] / turns, 2),
                        "us_per_call": round(ns / self.calls[label] / 1000, 1)}
                for label, ns in sorted(self.ns.items(), key=lambda kv: -kv[1])}


def _wrap_templates(flows: FlowSet, meter: _CpuMeter, clock: Callable[[], int]) -> None:
    """Time every compiled Jinja template of the flows (inline say/ask texts)."""
    for flow in flows:
        texts: list[Any] = []
        for state in flow.states.values():
            texts += [state.say, state.reprompt]
        for entity in flow.entities.values():
            texts += [entity.ask, *entity.reprompts]
        for text in texts:
            for template in getattr(text, "_templates", {}).values():
                meter.wrap_sync(template, "render", "jinja render (say/ask texts)", clock)


def _capture_fires(machine: Any, fired: list[tuple[Any, str, str, Any]]) -> None:
    """Record (machine, state, trigger, scope) of the first calls to ``machine.fire``."""
    inner = machine.fire

    def capture(state: str, trigger: str, scope: Any) -> Any:
        if len(fired) < 5000:
            fired.append((machine, state, trigger, scope))
        return inner(state, trigger, scope)

    machine.fire = capture


def _fire_check(calls: list[tuple[Any, str, str, Any]]) -> dict[str, Any]:
    """``FlowMachine.fire`` (the dispatch table) against ``fire_via_machine``
    (transitions' own trigger machinery) on the run's real calls: cost per
    call, and how many calls the two answer differently (must be 0)."""
    if not calls:
        return {}
    mismatches = 0
    for machine, state, trigger, scope in calls:
        if type(machine).fire(machine, state, trigger, scope) is not \
                machine.fire_via_machine(state, trigger, scope):
            mismatches += 1
    timings = {}
    for label in ("transitions", "table"):
        best = float("inf")
        for _ in range(3):
            started = time.thread_time_ns()
            for machine, state, trigger, scope in calls:
                if label == "table":
                    type(machine).fire(machine, state, trigger, scope)
                else:
                    machine.fire_via_machine(state, trigger, scope)
            best = min(best, (time.thread_time_ns() - started) / len(calls) / 1000)
        timings[label] = round(best, 2)
    return {**timings, "calls_compared": len(calls), "different_results": mismatches}


class _WorkerMeter:
    """Wraps ``SQLStore._call``: the worker thread's CPU and wall time per job, by job.

    A job is ``functools.partial(store._raw_in_thread, raw_fn, ...)`` on the
    fast path (labelled by ``raw_fn``) or ``partial(store._in_thread, fn, ...)``
    through SQLAlchemy.
    """

    def __init__(self, store: Any) -> None:
        self.cpu_ns: dict[str, int] = {}
        self.wall_ns: dict[str, int] = {}
        self.jobs: dict[str, int] = {}
        inner_call = store._call

        def timed_call(fn: Callable[[], Any]) -> Any:
            args = getattr(fn, "args", ())
            target = args[0] if args else fn
            label = getattr(target, "__name__", type(target).__name__)

            def job() -> Any:
                wall0, cpu0 = time.perf_counter_ns(), time.thread_time_ns()
                try:
                    return fn()
                finally:
                    self.cpu_ns[label] = (self.cpu_ns.get(label, 0)
                                          + time.thread_time_ns() - cpu0)
                    self.wall_ns[label] = (self.wall_ns.get(label, 0)
                                           + time.perf_counter_ns() - wall0)
                    self.jobs[label] = self.jobs.get(label, 0) + 1

            return inner_call(job)

        store._call = timed_call

    def clear(self) -> None:
        self.cpu_ns.clear()
        self.wall_ns.clear()
        self.jobs.clear()

    def per_turn(self, turns: int) -> dict[str, dict[str, float]]:
        return {label: {"cpu_us_per_turn": round(self.cpu_ns[label] / turns / 1000, 1),
                        "wall_us_per_turn": round(self.wall_ns[label] / turns / 1000, 1),
                        "jobs_per_turn": round(self.jobs[label] / turns, 2)}
                for label in sorted(self.jobs, key=lambda k: -self.wall_ns[k])}


_REST = "everything else"
_GC = "garbage collector (wall, inside the parts)"
_OVERHEAD = "instrumentation overhead (estimated)"
_FIRE = "state machine fire (dispatch table)"
_STORE_METHODS = (("seen", "store.seen"), ("load", "store.load"),
                  ("load_for_turn", "store.load_for_turn"),
                  ("commit_turn", "store.commit_turn"))


async def breakdown(flows_dir: Path, prompts_dir: Path, script: Script, n: int,
                    tmp: Path) -> dict[str, Any]:
    """Where a turn's time goes: the store calls, the machine, Jinja, GC, the rest.

    Fresh flows (the instrumentation wraps their machines and templates), a
    memory run timed in thread CPU time, and a SQLite run timed in wall time as
    the event loop sees each store call (thread hop included), with the worker
    thread's own time per job next to it.
    """
    from sqlalchemy import bindparam, select

    from engine.core import turn as turn_module
    from engine.store.sql import STORE_TABLES, SQLStore

    out: dict[str, Any] = {}
    actions = replay_actions(script)
    # In memory: thread CPU time of each part.
    flows = load_flows(flows_dir, prompts_dir, actions.names())
    cpu = time.thread_time_ns
    meter = _CpuMeter()
    store = MemoryStore()
    for name, label in _STORE_METHODS:
        meter.wrap_async(store, name, label, cpu)
    fired: list[tuple[Any, str, str, Any]] = []
    for flow in flows:
        _capture_fires(flow.machine, fired)
        meter.wrap_sync(flow.machine, "fire", _FIRE, cpu)
    _wrap_templates(flows, meter, cpu)
    # A few parts of the turn core, patched on the class/module for this run only
    # (skipped if the core no longer has them).
    core_parts = (
        (turn_module.TurnCore, "record", "message/event records (TurnCore.record)"),
        (turn_module.TurnCore, "template_context",
         "template contexts (TurnCore.template_context)"),
        (turn_module, "detect_language", "language detection (detect_language)"),
        (turn_module, "_has_words", "language detection (_has_words)"),
    )
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in core_parts
             if hasattr(obj, name)]
    try:
        for obj, name, label in core_parts:
            if hasattr(obj, name):
                meter.wrap_sync(obj, name, label, cpu)
        engine = make_engine(flows, store, ScriptedModel(script), actions)
        await run_engine(engine, "bdwarm", 20)
        meter.ns.clear()
        meter.calls.clear()
        started = cpu()
        timing = await run_engine(engine, "bd", n)
        total = cpu() - started
    finally:
        for obj, name, original in saved:
            setattr(obj, name, original)
        gc.unfreeze()
    turns = n * TURNS
    parts = meter.per_turn(turns)
    gc_us = timing.gc.summary(turns)["gc_us_per_turn"]
    accounted = sum(v["us_per_turn"] for v in parts.values())
    overhead = meter.overhead_ns(cpu) * sum(meter.calls.values()) / turns / 1000
    out["memory_cpu_us_per_turn"] = {
        "total": round(total / turns / 1000, 1),
        **{k: v for k, v in parts.items()},
        _GC: gc_us,
        _OVERHEAD: round(overhead, 1),
        _REST: round(total / turns / 1000 - accounted - overhead, 1),
    }

    out["machine_fire_us_per_call"] = _fire_check(fired[:5000])

    # SQLite: wall time of each store call as the event loop awaits it, and the
    # worker thread's own CPU/wall time per job (the rest of the wall time is the
    # hop there and back, and waiting for the event loop).
    wall = time.perf_counter_ns
    meter = _CpuMeter()
    db_path = tmp / "breakdown.db"
    sql_store = SQLStore(f"sqlite:///{db_path}")
    await sql_store.open()
    for name, label in _STORE_METHODS:
        meter.wrap_async(sql_store, name, label, wall)
    worker = _WorkerMeter(sql_store)
    engine = make_engine(flows, sql_store, ScriptedModel(script), actions)
    await run_engine(engine, "bdwarm", 20)
    meter.ns.clear()
    meter.calls.clear()
    worker.clear()
    cpu_started = time.process_time_ns()
    timing = await run_engine(engine, "bd", n)
    process_cpu = time.process_time_ns() - cpu_started
    gc.unfreeze()
    out["sqlite_wall_us_per_turn"] = {
        "total": timing.summary()["mean_us"],
        "process_cpu": round(process_cpu / turns / 1000, 1),
        **{k: v for k, v in meter.per_turn(turns).items() if k.startswith("store.")},
    }
    out["sqlite_worker_us_per_turn"] = worker.per_turn(turns)

    # The price of one thread hop: a no-op job on the store's own worker thread
    # (SQLStore._call, what every store call pays), and for reference the
    # loop.run_in_executor hop the store used before.
    from concurrent.futures import ThreadPoolExecutor

    hops = 2000

    async def hop_cost(hop: Callable[[], Awaitable[Any]]) -> dict[str, float]:
        await hop()
        best: dict[str, float] = {}
        for _ in range(3):
            started, cpu_started = wall(), time.process_time_ns()
            for _ in range(hops):
                await hop()
            run = {"wall": round((wall() - started) / hops / 1000, 1),
                   "cpu": round((time.process_time_ns() - cpu_started) / hops / 1000, 1)}
            if not best or run["cpu"] < best["cpu"]:
                best = run
        return best

    worker.clear()
    out["thread_hop_us"] = await hop_cost(lambda: sql_store._call(int))
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as executor:
        out["executor_hop_us"] = await hop_cost(lambda: loop.run_in_executor(executor, int))

    out["sqlite_hops_in_situ"] = await _hops_in_situ(flows_dir, prompts_dir, script, n, tmp)

    conversation = STORE_TABLES[0]
    keys = [conversation_key("bd", i) for i in range(min(n, 500))]

    def select_cost(conn: Any) -> dict[str, float]:
        c = conversation.c
        # Built once with bind parameters, as the store builds its Core statements.
        statement = select(*conversation.columns).where(
            c.channel == bindparam("k_channel"), c.account == bindparam("k_account"),
            c.thread == bindparam("k_thread"))
        sql = ("SELECT " + ", ".join(col.name for col in conversation.columns)
               + " FROM conversation WHERE channel = ? AND account = ? AND thread = ?")
        raw = conn.connection.driver_connection
        costs = {}
        for label in ("core", "raw"):
            best = float("inf")
            for _ in range(3):
                started = time.thread_time_ns()
                for key in keys:
                    if label == "core":
                        conn.execute(statement, {"k_channel": key.channel,
                                                 "k_account": key.account,
                                                 "k_thread": key.thread}).first()
                    else:
                        raw.execute(sql, (key.channel, key.account, key.thread)).fetchone()
                best = min(best, (time.thread_time_ns() - started) / len(keys) / 1000)
            costs[label] = round(best, 1)
        return costs

    out["select_by_key_us"] = await sql_store.run_sync(select_cost)
    await sql_store.close()
    return out


async def _hops_in_situ(flows_dir: Path, prompts_dir: Path, script: Script, n: int,
                        tmp: Path) -> dict[str, Any]:
    """What the two thread hops cost a real SQLite turn (no-op hops understate it).

    The same uninstrumented SQLite run twice over, once as the store runs
    (jobs on its worker thread) and once with the jobs run inline on the event
    loop's thread (``_inline_call``); alternated, best CPU of two each.
    """
    from engine.store.sql import SQLStore

    actions = replay_actions(script)
    flows = load_flows(flows_dir, prompts_dir, actions.names())
    loop = asyncio.get_running_loop()
    best: dict[str, dict[str, float]] = {}
    for attempt, mode in enumerate(("worker", "inline", "worker", "inline")):
        db_path = tmp / f"hops{attempt}.db"
        store = SQLStore(f"sqlite:///{db_path}")
        if mode == "inline":
            patched: Any = store
            patched._call = _inline_call(loop)
        await store.open()
        engine = make_engine(flows, store, ScriptedModel(script), actions)
        try:
            await run_engine(engine, f"hopwarm{attempt}", 20)
            summary = (await run_engine(engine, f"hop{attempt}", n)).summary()
        finally:
            gc.unfreeze()
            if mode == "inline":
                store._close_in_thread()  # no worker thread was started
            else:
                await store.close()
        for f in tmp.glob(db_path.name + "*"):
            f.unlink()
        if mode not in best or summary["cpu_us"] < best[mode]["cpu_us"]:
            best[mode] = {"cpu_us": summary["cpu_us"], "mean_us": summary["mean_us"]}
    return {**best, "hops_cpu_us_per_turn":
            round(best["worker"]["cpu_us"] - best["inline"]["cpu_us"], 1)}


async def wal_pages_per_turn(flows: FlowSet, script: Script, actions: ActionRegistry, n: int,
                             tmp: Path) -> dict[str, Any]:
    """Pages each turn appends to SQLite's WAL, the engine's store against the floor.

    Automatic checkpoints off on the writing connection, the WAL truncated
    before the run; the growth of the -wal file in frames (page + 24-byte
    header) divided by the turns. Untimed, on ``n`` conversations.
    """
    from engine.store.sql import SQLStore

    def frames(db_path: Path, page_size: int) -> float:
        wal = Path(f"{db_path}-wal")
        return (wal.stat().st_size - 32) / (page_size + 24) if wal.exists() else 0.0

    setup = ("PRAGMA wal_autocheckpoint=0", "PRAGMA wal_checkpoint(TRUNCATE)")
    db_path = tmp / "wal-engine.db"
    store = SQLStore(f"sqlite:///{db_path}")
    await store.open()

    def prepare(cursor: sqlite3.Cursor) -> int:
        for pragma in setup:
            cursor.execute(pragma).fetchall()
        return int(cursor.execute("PRAGMA page_size").fetchone()[0])

    page_size = await store._raw(prepare)
    engine = make_engine(flows, store, ScriptedModel(script), actions)
    try:
        await run_engine(engine, "wal", n)
        engine_pages = frames(db_path, page_size)
    finally:
        gc.unfreeze()
        await store.close()
    floor_path = tmp / "wal-floor.db"
    floor = Floor(script, floor_path)
    assert floor.db is not None
    for pragma in setup:
        floor.db.execute(pragma).fetchall()
    try:
        for turn in range(TURNS):
            for i in range(n):
                floor.turn(f"bench:wal:c{i:05d}", turn, JOURNEY[turn][1])
        floor_pages = frames(floor_path, page_size)
    finally:
        floor.close()
    for f in [*tmp.glob(db_path.name + "*"), *tmp.glob(floor_path.name + "*")]:
        f.unlink()
    turns = n * TURNS
    return {"page_size": page_size, "conversations": n,
            "engine": round(engine_pages / turns, 2), "floor": round(floor_pages / turns, 2)}


# --------------------------------------------------------------------------- memory


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover


async def memory_phase(n: int, script_file: Path, with_tracemalloc: bool) -> dict[str, Any]:
    """Run in a child process: the in-memory engine holding ``n`` conversations.

    The child imports what a memory-store deployment imports (no SQLAlchemy,
    no demo shop); the recorded script comes from the parent.
    """
    script: Script = pickle.loads(script_file.read_bytes())
    actions = replay_actions(script)
    flows = load_flows(ROOT / "flows", ROOT / "prompts", actions.names())
    store = MemoryStore()
    engine = make_engine(flows, store, ScriptedModel(script), actions)
    await run_engine(engine, "warm", 5)  # code paths and caches; not counted
    store = MemoryStore()
    engine.store = store
    gc.collect()
    rss_before = _proc_status_kib("VmRSS")
    if with_tracemalloc:
        tracemalloc.start()
    await run_engine(engine, "mem", n)
    out: dict[str, Any] = {"heavy_modules_loaded": sorted(
        m for m in ("sqlalchemy", "sqlmodel", "aiosqlite") if m in sys.modules)}
    if with_tracemalloc:
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out.update(tracemalloc_peak_mib=round(peak / 2**20, 1),
                   tracemalloc_retained_mib=round(current / 2**20, 1))
        return out
    gc.collect()
    peak = _proc_status_kib("VmHWM")
    out.update(
        rss_baseline_mib=round(rss_before / 1024, 1),
        rss_peak_mib=round(peak / 1024, 1),
        rss_peak_delta_mib=round((peak - rss_before) / 1024, 1),
        rss_retained_delta_mib=round((_proc_status_kib("VmRSS") - rss_before) / 1024, 1),
        stored_state_json_bytes_mean=round(sum(
            len(c.entities) + len(c.results) + len(c.counters) for c in store._by_id.values()
        ) / n),
        messages_per_conversation=round(sum(len(v) for v in store._messages.values()) / n, 1),
    )
    return out


def run_memory_child(n: int, script: Script, with_tracemalloc: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="helpline-bench-") as tmp:
        script_file = Path(tmp) / "script.pickle"
        script_file.write_bytes(pickle.dumps(script))
        args = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(n),
                "--script", str(script_file)]
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
    latency; each timed turn makes exactly one model call. Conversations start
    at random offsets within one model delay, so the load is spread out: the
    process must sustain about ``n / 0.2 s`` turns per second.
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
            result = await engine.handle(inbound(key, turn, f"{run}-{i}-{turn}"))
            latencies.append(clock() - started)
            if result.duplicate:
                raise SystemExit(f"{run}: turn {turn} of conversation {i} was a duplicate")

    watcher = asyncio.create_task(watch_lag())
    started, cpu_started = clock(), time.process_time()
    with GcWatch() as watch:
        await asyncio.wait_for(asyncio.gather(*(customer(i, k) for i, k in enumerate(keys))),
                               timeout=120)
    elapsed, cpu_used = clock() - started, time.process_time() - cpu_started
    stop.set()
    await watcher
    latencies.sort()
    lag.sort()
    p99 = percentile(latencies, 0.99) * 1000
    return {
        "conversations": n,
        "turns": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "turns_per_s": round(len(latencies) / elapsed),
        "loop_lag_p99_ms": round(percentile(lag, 0.99) * 1000, 1),
        # How much of a CPU the process got, and what a turn cost it (asyncio included).
        "cpu_share": round(cpu_used / elapsed, 2),
        "cpu_us_per_turn": round(cpu_used / len(latencies) * 1e6, 1),
        "gc_max_pause_ms": watch.summary(1)["gc_max_pause_ms"],
        "ok": p99 < CONCURRENCY_P99_MS,
    }


async def concurrency_sweep(flows: FlowSet, script: Script, actions: ActionRegistry,
                            levels: list[int], make_store: Callable[[int], Awaitable[Store]],
                            label: str, deadline: float) -> dict[str, Any]:
    """Raise the number of concurrent conversations until p99 reaches 250 ms.

    A level that misses is tried once more (a single full GC pause or a burst
    of other work on a shared machine can spoil one attempt); the sweep stops
    at the first level that misses twice.
    """
    rows = []
    best = 0
    for n in levels:
        if time.perf_counter() > deadline:
            print(f"  {label}: time budget used up, stopping at {best}")
            break
        attempts = []
        for attempt in range(2):
            store = await make_store(n * 10 + attempt)  # a fresh store for every attempt
            try:
                gc.collect()
                row = await concurrency_level(flows, script, actions, store, n, (1, 2, 3))
            finally:
                await store.close()
            attempts.append(row)
            print(f"  {label:<7} {n:>5} concurrent: p50 {row['p50_ms']:>6.1f} ms  "
                  f"p99 {row['p99_ms']:>7.1f} ms  {row['turns_per_s']:>6} turns/s  "
                  f"loop lag p99 {row['loop_lag_p99_ms']:>6.1f} ms  CPU share "
                  f"{row['cpu_share']:.2f}, {row['cpu_us_per_turn']:.0f} us CPU/turn", flush=True)
            if row["ok"]:
                break
        chosen = dict(min(attempts, key=lambda r: r["p99_ms"]))
        chosen["attempts"] = len(attempts)
        rows.append(chosen)
        if not chosen["ok"]:
            break
        best = n
    # The most a dedicated core could hold: every conversation asks for a turn per
    # model delay, so the loop saturates at delay / CPU per turn (an upper bound:
    # p99 grows well before full saturation).
    cpu_per_turn = min((r["cpu_us_per_turn"] for r in rows), default=0.0)
    ceiling = round(MODEL_DELAY_S * 1e6 / cpu_per_turn) if cpu_per_turn else 0
    return {"store": label, "max_concurrent_p99_under_250ms": best,
            "saturation_ceiling_one_free_core": ceiling, "levels": rows}


# --------------------------------------------------------------------------- profile


def _inline_call(loop: asyncio.AbstractEventLoop) -> Callable[[Callable[[], Any]], Any]:
    """A stand-in for ``SQLStore._call`` that runs the job at once on the calling
    thread and returns an already resolved future (no worker thread, no hop)."""

    def inline(fn: Callable[[], Any]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = loop.create_future()
        try:
            future.set_result(fn())
        except BaseException as error:  # handed to the awaiting task
            future.set_exception(error)
        return future

    return inline


async def profile(kind: str, n: int, top: int = 30) -> str:
    """cProfile of the scripted in-memory or SQLite run.

    cProfile sees only the thread it runs on, so ``--profile sqlite`` runs the
    store's jobs inline: ``SQLStore._call`` (which every store call, fast path
    or SQLAlchemy, goes through) is replaced by one that runs the job at once
    and returns an already resolved future. The thread hops are then missing
    from the profile (see ``thread_hop_us`` in the results).
    """
    script = await record_script(ROOT / "flows", ROOT / "prompts")
    actions = replay_actions(script)
    flows = load_flows(ROOT / "flows", ROOT / "prompts", actions.names())
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        store: Store
        sql_store: Any = None
        if kind == "sqlite":
            from engine.store.sql import SQLStore

            sql_store = SQLStore(f"sqlite:///{Path(tmp) / 'engine.db'}")

            sql_store._call = _inline_call(loop)
            store = sql_store
        else:
            store = MemoryStore()
        await store.open()
        engine = make_engine(flows, store, ScriptedModel(script), actions)
        await run_engine(engine, "warm", 20)
        profiler = cProfile.Profile()
        profiler.enable()
        await run_engine(engine, "prof", n)
        profiler.disable()
        if sql_store is not None:
            # No worker thread was started: close the fast path's connection here.
            sql_store._close_in_thread()
        else:
            await store.close()
        gc.unfreeze()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# --------------------------------------------------------------------------- main


def machine_info() -> dict[str, Any]:
    import jinja2

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import sqlalchemy

        sa_version = sqlalchemy.__version__
    except ImportError:  # pragma: no cover
        sa_version = ""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sa_version,
        "jinja2": jinja2.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "gc_tracked_objects_at_start": len(gc.get_objects()),
    }


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """One part of the run; the previous part's gc.freeze() is undone before it."""
    print(f"- {name} ...", flush=True)
    gc.unfreeze()
    gc.collect()
    started = time.perf_counter()
    try:
        yield
    finally:
        gc.unfreeze()
    print(f"  ({time.perf_counter() - started:.1f} s)", flush=True)


VARIANTS = ("floor_memory", "engine_memory", "engine_memory_unfrozen",
            "engine_memory_production", "floor_sqlite", "engine_sqlite",
            "engine_offline_memory")
FLOOR_OF = {"engine_memory": "floor_memory", "engine_memory_unfrozen": "floor_memory",
            "engine_memory_production": "floor_memory", "engine_sqlite": "floor_sqlite",
            "engine_offline_memory": "floor_memory"}
VARIANT_LABELS = {
    "floor_memory": "floor, in memory",
    "floor_sqlite": "floor, SQLite",
    "engine_memory": "engine, scripted model, memory store",
    "engine_memory_unfrozen": "same, without gc.freeze()",
    "engine_memory_production": "same, wired as build_app (Privacy, Metrics)",
    "engine_sqlite": "engine, scripted model, SQLite store",
    "engine_offline_memory": "engine, offline model, memory store",
}


def _bytes_after_round(work: StoreWork, per_round: list[dict[str, Any]],
                       db_path: Path) -> Callable[[int], Awaitable[None]]:
    """Measure the stored bytes after each round, without counting its statements."""

    async def after_round(turn: int) -> None:
        work.enabled = False
        per_round.append(state_bytes(db_path, "sql"))
        work.enabled = True

    return after_round


async def count_store_work(flows: FlowSet, script: Script, actions: ActionRegistry, n: int,
                           db_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Statements, commits and store calls per turn, and the stored bytes after each round.

    A separate run, not timed: the trace callback (a Python call with the
    statement's expanded SQL per execution) would weigh on the timed runs.
    """
    from engine.store.sql import SQLStore

    sql_store = SQLStore(f"sqlite:///{db_path}")
    await sql_store.open()
    work = StoreWork(sql_store)
    await work.attach()
    per_round: list[dict[str, Any]] = []
    engine = make_engine(flows, sql_store, ScriptedModel(script), actions)
    work.enabled = True
    await run_engine(engine, "sql", n, _bytes_after_round(work, per_round, db_path))
    await work.detach()
    store_work = work.per_turn(n * TURNS)
    await check_conversations(sql_store, "sql", n)
    await sql_store.close()
    bytes_info = per_round[-1]
    bytes_info["state_bytes_mean_after_turn"] = [r["state_bytes_mean"] for r in per_round]
    bytes_info["state_bytes_max_after_turn"] = [r["state_bytes_max"] for r in per_round]
    return store_work, bytes_info


def _best(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetition with the lowest mean, plus every repetition's mean and CPU."""
    best = dict(min(reps, key=lambda r: r["mean_us"]))
    best["repetitions_mean_us"] = [r["mean_us"] for r in reps]
    best["repetitions_cpu_us"] = [r["cpu_us"] for r in reps]
    best["cpu_us_min"] = min(r["cpu_us"] for r in reps)
    return best


async def main_run(n: int, quick: bool, repeat: int) -> dict[str, Any]:
    from engine.store.sql import SQLStore

    t_start = time.perf_counter()
    info = machine_info()
    print(f"Helpline turn benchmark: {n} conversations x {TURNS} turns, interleaved, "
          f"best of {repeat} ({os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {info['load_average_at_start']})", flush=True)
    with phase("recording the journey (offline model + real demo shop)"):
        script = await record_script(ROOT / "flows", ROOT / "prompts")
    for line in script.transcript:
        print("    " + line[:110])
    actions = replay_actions(script)
    flows = load_flows(ROOT / "flows", ROOT / "prompts", actions.names())
    reps: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    store_work: dict[str, Any] = {}
    bytes_info: dict[str, Any] = {}
    breakdown_info: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="helpline-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # Warm-up: lazily compiled templates, caches, first-use imports.
        await run_engine(make_engine(flows, MemoryStore(), ScriptedModel(script), actions),
                         "warm", 20)
        run_floor(script, 20, None)

        for rep in range(repeat):
            print(f"- repetition {rep + 1}/{repeat}", flush=True)
            with phase("floor, in memory"):
                reps["floor_memory"].append(run_floor(script, n, None).summary())
            with phase("engine, scripted model, MemoryStore (gc.freeze() as build_app)"):
                store = MemoryStore()
                engine = make_engine(flows, store, ScriptedModel(script), actions)
                info["gc_frozen_objects"] = gc.get_freeze_count()
                reps["engine_memory"].append((await run_engine(engine, "mem", n)).summary())
                await check_conversations(store, "mem", n)
                # What full collections still walk (gc.get_objects() skips frozen objects).
                info["gc_tracked_objects_after_memory_run"] = len(gc.get_objects())
                del store, engine
            with phase("engine, scripted model, MemoryStore, no gc.freeze() (before build_app "
                       "froze)"):
                store = MemoryStore()
                engine = make_engine(flows, store, ScriptedModel(script), actions,
                                     freeze=False)
                info["gc_tracked_objects_unfrozen_at_first_turn"] = len(gc.get_objects())
                reps["engine_memory_unfrozen"].append(
                    (await run_engine(engine, "unf", n)).summary())
                await check_conversations(store, "unf", n)
                del store, engine
            with phase("engine, scripted model, MemoryStore, wired as build_app (Privacy, "
                       "Metrics)"):
                store = MemoryStore()
                engine = make_engine(flows, store, ScriptedModel(script), actions,
                                     production=True)
                reps["engine_memory_production"].append(
                    (await run_engine(engine, "prod", n)).summary())
                await check_conversations(store, "prod", n)
                del store, engine
            with phase("floor, SQLite"):
                floor_db = tmp / f"floor{rep}.db"
                reps["floor_sqlite"].append(run_floor(script, n, floor_db).summary())
                for f in tmp.glob(floor_db.name + "*"):
                    f.unlink()
            with phase("engine, scripted model, SQLStore (SQLite file)"):
                db_path = tmp / f"engine{rep}.db"
                sql_store = SQLStore(f"sqlite:///{db_path}")
                await sql_store.open()
                engine = make_engine(flows, sql_store, ScriptedModel(script), actions)
                reps["engine_sqlite"].append((await run_engine(engine, "sql", n)).summary())
                await check_conversations(sql_store, "sql", n)
                await sql_store.close()
                for f in tmp.glob(db_path.name + "*"):
                    f.unlink()
                del engine, sql_store
            with phase("engine, offline model, MemoryStore"):
                store = MemoryStore()
                engine = make_engine(flows, store, OfflineModel(), actions)
                reps["engine_offline_memory"].append(
                    (await run_engine(engine, "off", n)).summary())
                await check_conversations(store, "off", n)
                del store, engine

        with phase("store work per turn and stored bytes (SQLite, counted run, untimed)"):
            store_work, bytes_info = await count_store_work(flows, script, actions, n,
                                                            tmp / "counted.db")
            store_work["wal_pages_per_turn"] = await wal_pages_per_turn(
                flows, script, actions, min(n, 300), tmp)

        with phase("breakdown of a turn (instrumented run)"):
            breakdown_info = await breakdown(ROOT / "flows", ROOT / "prompts", script,
                                             max(n // 4, 50), tmp)

    with phase(f"peak memory, {n} conversations in a fresh process (memory store)"):
        memory = run_memory_child(n, script, with_tracemalloc=False)
        if not quick:  # tracemalloc's own view needs a second child (its overhead skews RSS)
            memory.update({k: v for k, v in run_memory_child(n, script, True).items()
                           if k.startswith("tracemalloc")})

    levels = ([100, 250] if quick else
              [100, 250, 500, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 6000])
    concurrency: dict[str, Any] = {}
    deadline = time.perf_counter() + (30 if quick else 150)
    with phase(f"concurrency, model sleeping {MODEL_DELAY_S * 1000:.0f} ms per call"), \
            tempfile.TemporaryDirectory(prefix="helpline-bench-") as conc_tmp:

        async def memory_store(tag: int) -> Store:
            return MemoryStore()

        async def sqlite_store(tag: int) -> Store:
            store = SQLStore(f"sqlite:///{Path(conc_tmp) / f'conc{tag}.db'}")
            await store.open()
            return store

        concurrency["memory"] = await concurrency_sweep(flows, script, actions, levels,
                                                        memory_store, "memory", deadline)
        concurrency["sqlite"] = await concurrency_sweep(
            flows, script, actions, sorted({100, *levels}), sqlite_store, "sqlite",
            deadline + 30)

    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "machine": info,
        "config": {
            "conversations": n,
            "turns_per_conversation": TURNS,
            "interleaved": True,
            "repetitions": repeat,
            "reported": "the repetition with the lowest mean wall time per variant",
            "journey": [f"{k}: {t}" for k, t in JOURNEY],
            "quick": quick,
            "concurrency_model_delay_ms": MODEL_DELAY_S * 1000,
            "concurrency_timed_turns": "turns 2-4 (one model call each), started at random "
                                       "offsets within 200 ms; turn 1 done beforehand",
        },
        "transcript": script.transcript,
        "context": {"demo_shop_action_ms_first_call": script.action_ms},
        "timings": {v: _best(reps[v]) for v in VARIANTS},
        "store_work_per_turn_sqlite": store_work,
        "state_bytes_sqlite": bytes_info,
        "memory": memory,
        "breakdown": breakdown_info,
        "concurrency": concurrency,
        "seconds": round(time.perf_counter() - t_start, 1),
    }


# --------------------------------------------------------------------------- report


def _state_max(r: dict[str, Any]) -> int:
    """The largest stored conversation state at any point of the journey."""
    b = r["state_bytes_sqlite"]
    return int(max(b.get("state_bytes_max_after_turn") or [b["state_bytes_max"]]))


def evaluate(r: dict[str, Any]) -> dict[str, Any]:
    t = r["timings"]
    ratios = {v: round(t[v]["mean_us"] / t[f]["mean_us"], 2) for v, f in FLOOR_OF.items()}
    cpu_ratios = {v: round(t[v]["cpu_us_min"] / t[f]["cpu_us_min"], 2)
                  for v, f in FLOOR_OF.items()}
    conc = r["concurrency"]["memory"]["max_concurrent_p99_under_250ms"]
    return {
        "ratio_vs_floor": ratios,
        "cpu_ratio_vs_floor": cpu_ratios,
        "goals": {
            "engine_memory_at_most_2x_floor": ratios["engine_memory"] <= GOAL_RATIO,
            "engine_sqlite_at_most_2x_floor": ratios["engine_sqlite"] <= GOAL_RATIO,
            "one_commit_per_turn":
                r["store_work_per_turn_sqlite"]["commits"] <= GOAL_COMMITS,
            "state_under_1_5_kb": _state_max(r) < GOAL_STATE_BYTES,
            "peak_memory_under_60_mib": r["memory"]["rss_peak_delta_mib"] < GOAL_PEAK_MIB,
            "at_least_3000_concurrent": conc >= GOAL_CONCURRENT,
        },
    }


#: A previous run's row for a variant this run has under another name.
_PREVIOUS_NAMES = {"engine_memory_unfrozen": ("engine_memory_unfrozen", "engine_memory")}
_SUMMARY_FIELDS = ("turns_per_s", "mean_us", "p50_us", "p99_us", "cpu_us_min",
                   "gc_us_per_turn", "gc_max_pause_ms")


def previous_summary(old: dict[str, Any]) -> dict[str, Any]:
    """The key figures of an earlier results JSON, kept in the new one for comparison."""
    if "timings" not in old:
        return {}
    ev = old.get("evaluation", {})
    bd = old.get("breakdown", {})
    work = old.get("store_work_per_turn_sqlite", {})
    conc = old.get("concurrency", {})
    return {
        "date": old.get("machine", {}).get("date"),
        "load_average_at_start": old.get("machine", {}).get("load_average_at_start"),
        "conversations": old.get("config", {}).get("conversations"),
        "quick": old.get("config", {}).get("quick"),
        "timings": {k: {f: v.get(f) for f in _SUMMARY_FIELDS}
                    for k, v in old["timings"].items()},
        "ratio_vs_floor": ev.get("ratio_vs_floor", {}),
        "cpu_ratio_vs_floor": ev.get("cpu_ratio_vs_floor", {}),
        "store_work_per_turn_sqlite": {k: work.get(k) for k in (
            "statements", "by_verb", "executions", "rows_written", "commits", "store_calls")
            if k in work},
        "state_bytes_max": _state_max(old) if "state_bytes_sqlite" in old else None,
        "memory_rss_peak_delta_mib": old.get("memory", {}).get("rss_peak_delta_mib"),
        "concurrency": {label: {"max_concurrent_p99_under_250ms":
                                c.get("max_concurrent_p99_under_250ms"),
                                "saturation_ceiling_one_free_core":
                                c.get("saturation_ceiling_one_free_core")}
                        for label, c in conc.items()},
        "thread_hop_us": bd.get("thread_hop_us"),
        "sqlite_wall_us_per_turn": {k: (v["us_per_turn"] if isinstance(v, dict) else v)
                                    for k, v in bd.get("sqlite_wall_us_per_turn", {}).items()},
        "memory_cpu_us_per_turn_total": bd.get("memory_cpu_us_per_turn", {}).get("total"),
    }


def _previous_row(prev: dict[str, Any], key: str) -> dict[str, Any] | None:
    rows = prev.get("timings", {})
    for name in _PREVIOUS_NAMES.get(key, (key,)):
        if name in rows:
            return dict(rows[name])
    return None


def _mpc(s: dict[str, Any] | None) -> str:
    """mean / p99 / CPU us of a timing row."""
    if not s:
        return "-"
    return f"{s['mean_us']:.0f} / {s['p99_us']:.0f} / {s['cpu_us_min']:.0f}"


def _part(table: dict[str, Any], key: str, field_name: str = "us_per_turn") -> float:
    value = table.get(key, {})
    return float(value.get(field_name, 0.0)) if isinstance(value, dict) else float(value or 0)


def build_notes(r: dict[str, Any]) -> list[str]:
    """Why the goals that are missed are missed, and what would close them.

    The hotspots come from cProfile runs (``--profile memory``, ``--profile
    sqlite``) and from this run's instrumented breakdown; every number quoted
    is this run's, or the previous run's where it says so.
    """
    t, e, mi = r["timings"], r["evaluation"], r["machine"]
    bd = r.get("breakdown", {})
    mem = bd.get("memory_cpu_us_per_turn", {})
    sql = bd.get("sqlite_wall_us_per_turn", {})
    jobs = bd.get("sqlite_worker_us_per_turn", {})
    hop = bd.get("thread_hop_us", {})
    ex_hop = bd.get("executor_hop_us", {})
    sel = bd.get("select_by_key_us", {})
    fire_check = bd.get("machine_fire_us_per_call", {})
    w = r["store_work_per_turn_sqlite"]
    prev = r.get("previous") or {}
    fm, fs = t["floor_memory"], t["floor_sqlite"]
    em, es = t["engine_memory"], t["engine_sqlite"]
    unfrozen = t.get("engine_memory_unfrozen")
    production = t.get("engine_memory_production")
    offline = t.get("engine_offline_memory")

    notes = [
        f"Machine: {mi['cpu_count']} CPUs shared with other work running at the same time "
        f"(load average {mi['load_average_at_start']} at start, "
        f"{mi.get('load_average_at_end')} at end), so wall-clock means and p99 include "
        "preemption; CPU time per turn (process time, all threads) is given next to them and "
        "the CPU-time ratio is the steadier figure. The floor measured "
        f"{fm['cpu_us_min']} us CPU per turn in memory and {fs['cpu_us_min']} us on SQLite "
        "(the issue expects about 30 and 50).",
    ]

    # ------------------------------------------------------------ before / after
    if prev.get("timings"):
        pt = prev["timings"]
        pairs = []
        for key, label in VARIANT_LABELS.items():
            before = _previous_row(prev, key)
            if key in t and before:
                pairs.append(f"{label} {_mpc(before)} -> {_mpc(t[key])}")
        old_frozen = pt.get("engine_memory_gc_frozen")
        text = (
            f"Against the previous run ({str(prev.get('date'))[:10]}, load average "
            f"{prev.get('load_average_at_start')}; {prev.get('conversations')} conversations"
            f"{', quick' if prev.get('quick') else ''}"
            + (f"; this run {r['config']['conversations']}"
               if prev.get("conversations") != r["config"]["conversations"] else "")
            + "), mean / p99 / CPU us per turn, before "
            f"-> now: {'; '.join(pairs)}.")
        if old_frozen:
            text += (" The previous run's 'gc.freeze() (proposed fix)' row, the configuration "
                     f"build_app now serves, measured {_mpc(old_frozen)}.")
        ratios = []
        for key in ("engine_memory", "engine_sqlite"):
            before_cpu = prev.get("cpu_ratio_vs_floor", {}).get(key)
            if before_cpu is not None:
                ratios.append(f"{VARIANT_LABELS[key].split(', ')[-1]} {before_cpu}x -> "
                              f"{e['cpu_ratio_vs_floor'][key]}x")
        if ratios:
            text += " CPU ratio to the floor: " + ", ".join(ratios) + "."
        pw = prev.get("store_work_per_turn_sqlite", {})
        if pw:
            text += (f" SQLite store work per turn: {pw.get('statements')} -> "
                     f"{w['statements']} statements, {pw.get('commits')} -> {w['commits']} "
                     f"commit, {pw.get('store_calls')} -> {w['store_calls']} store calls "
                     "(thread hops).")
        pc = prev.get("concurrency", {})
        cc = r["concurrency"]
        if pc:
            text += (" Concurrent conversations at p99 < 250 ms: memory "
                     f"{pc.get('memory', {}).get('max_concurrent_p99_under_250ms')} -> "
                     f"{cc['memory']['max_concurrent_p99_under_250ms']}, SQLite "
                     f"{pc.get('sqlite', {}).get('max_concurrent_p99_under_250ms')} -> "
                     f"{cc['sqlite']['max_concurrent_p99_under_250ms']}.")
        if prev.get("memory_rss_peak_delta_mib") is not None:
            text += (f" Peak memory of the conversations {prev['memory_rss_peak_delta_mib']} "
                     f"-> {r['memory']['rss_peak_delta_mib']} MiB; largest stored state "
                     f"{prev.get('state_bytes_max')} -> {_state_max(r)} B.")
        notes.append(text)

    # ------------------------------------------------------------ in memory
    parts_text = ", ".join(
        f"{k} {v['us_per_turn']}" + (f" ({v['us_per_call']} us per call)"
                                     if v["calls_per_turn"] != 1 else "")
        for k, v in mem.items() if isinstance(v, dict))
    parts_text += (f", everything else (the turn core's own logic, the runner, locks, "
                   f"dataclasses) {mem.get(_REST, '?')}; the instrumentation itself about "
                   f"{mem.get(_OVERHEAD, '?')}")
    commit = _part(mem, "store.commit_turn")
    load = _part(mem, "store.load_for_turn") + _part(mem, "store.load") + _part(mem, "store.seen")
    records = _part(mem, "message/event records (TurnCore.record)")
    contexts = _part(mem, "template contexts (TurnCore.template_context)")
    language = (_part(mem, "language detection (detect_language)")
                + _part(mem, "language detection (_has_words)"))
    jinja = _part(mem, "jinja render (say/ask texts)")
    fire = _part(mem, _FIRE)
    ratio_m, cpu_m = e["ratio_vs_floor"]["engine_memory"], e["cpu_ratio_vs_floor"]["engine_memory"]
    gc_text = (
        f"The garbage collector: with gc.freeze() after start-up (as engine/app.py build_app "
        f"does: {mi.get('gc_frozen_objects', 0):,} objects frozen before the first turn, which "
        f"collections no longer walk) it takes {em['gc_us_per_turn']} us per turn, longest "
        f"pause {em['gc_max_pause_ms']} ms")
    if unfrozen:
        gc_text += (
            f"; without it (row 'without gc.freeze()': "
            f"{mi.get('gc_tracked_objects_unfrozen_at_first_turn', 0):,} tracked objects at the "
            f"first turn, modules, SQLAlchemy, pydantic and Jinja internals that every full "
            f"collection re-walks) {unfrozen['gc_us_per_turn']} us per turn, longest pause "
            f"{unfrozen['gc_max_pause_ms']} ms, p99 {unfrozen['p99_us']:.0f} against "
            f"{em['p99_us']:.0f} us")
    gc_text += (f". What full collections still walk is the conversations' own objects: "
                f"{mi.get('gc_tracked_objects_after_memory_run', 0):,} tracked objects by the "
                "end of the memory run, the memory store's message log kept as Python objects "
                f"(on SQLite the engine's GC time is {es['gc_us_per_turn']} us per turn, longest "
                f"pause {es['gc_max_pause_ms']} ms).")
    if not e["goals"]["engine_memory_at_most_2x_floor"]:
        target = GOAL_RATIO * fm["cpu_us_min"]
        notes.append(
            f"Engine in memory: {ratio_m}x the floor in wall time, {cpu_m}x in CPU time; goal "
            f"2x, missed by {cpu_m / GOAL_RATIO:.1f}x (CPU): a turn must drop from "
            f"{em['cpu_us_min']} to about {target:.0f} us of CPU. Where it goes (CPU us per "
            f"turn, instrumented run of {mem.get('total', '?')} us): {parts_text}. "
            + gc_text)
        if fire_check:
            notes.append(
                f"Done since the previous run and measured here: FlowMachine.fire now looks the "
                f"transition up in a (state, trigger) table read from the transitions machine: "
                f"{fire_check.get('table')} us per call against {fire_check.get('transitions')} "
                f"us through transitions' trigger machinery (fire_via_machine) on "
                f"{fire_check.get('calls_compared')} real calls, "
                f"{fire_check.get('different_results')} different results; the machine is "
                f"{fire:.1f} us of a turn now. gc.freeze() is in build_app and in this "
                "benchmark's engines (see the GC figures above).")
        rest = float(mem.get(_REST, 0) or 0)
        after = max(0.0, em["cpu_us_min"] - commit / 2 - load / 2 - records / 2 - contexts / 2
                    - language / 2)
        notes.append(
            "What is left, biggest first (CPU us per turn): (1) the turn core's own work, "
            f"'everything else' {rest:.0f} us: the runner and TurnCore build many small dicts "
            "and frozen dataclasses per turn (scope, labels, DecisionRequest, ActionContext, "
            "TurnOutcome, TurnWrite) where the floor updates one dict. (2) "
            f"MemoryStore.commit_turn {commit:.0f} us and load_for_turn {load:.0f} us: "
            "it re-checks and rebuilds every MessageRecord and EntityChange, re-validates "
            "every datetime and JSON-encodes the three state documents on each commit, and "
            "decodes them on each load, to behave like a SQL store (the memory store is for "
            "tests, demos and this benchmark; a deployment runs SQLite or PostgreSQL). Keeping "
            "the caller's frozen records and encoding only what changed would save about "
            f"half, ~{(commit + load) / 2:.0f} us. (3) TurnCore.record "
            f"{records:.0f} us (~5 records per turn: state/routed events are logged as "
            f"messages), template contexts {contexts:.0f} us (rebuilt for every say/ask even "
            f"when the text is static), language detection {language:.0f} us (every "
            f"message), Jinja {jinja:.0f} us: building the context once per turn and events "
            "as plain tuples turned into records at commit would save about half of these. "
            f"(2)+(3) bring the turn to roughly {after:.0f} us CPU "
            f"({after / fm['cpu_us_min']:.1f}x the floor); 2x needs (1) cut by more than half.")
    if production:
        extra = production["cpu_us_min"] - em["cpu_us_min"]
        notes.append(
            f"Wired as build_app wires it (Privacy: PII redaction of the text the model sees "
            f"and the reply filter; Metrics: Prometheus counters per turn) the in-memory turn "
            f"costs {production['cpu_us_min']} us CPU, {extra:+.1f} us against the bare engine "
            f"({e['cpu_ratio_vs_floor']['engine_memory_production']}x the floor); the goal rows "
            "use the bare engine, as the floor has neither.")
    if offline:
        text = (f"The offline model (intent matching, routing) costs "
                f"{offline['cpu_us_min'] - em['cpu_us_min']:.0f} us CPU per turn on top of the "
                f"scripted one ({offline['cpu_us_min']} against {em['cpu_us_min']} us)")
        before_off = _previous_row(prev, "engine_offline_memory")
        before_em = _previous_row(prev, "engine_memory")
        if before_off and before_em:
            model_cpu = before_off["cpu_us_min"] - before_em["cpu_us_min"]
            text += (f"; in the previous run {model_cpu:.0f} us ({before_off['cpu_us_min']} "
                     f"against {before_em['cpu_us_min']} us)")
        notes.append(text + ".")

    # ------------------------------------------------------------ SQLite
    if not e["goals"]["engine_sqlite_at_most_2x_floor"]:
        ratio_s = e["ratio_vs_floor"]["engine_sqlite"]
        cpu_s = e["cpu_ratio_vs_floor"]["engine_sqlite"]
        calls = w.get("store_calls", 2)
        job_cpu = sum(_part(jobs, k, "cpu_us_per_turn") for k in jobs)
        job_text = ", ".join(
            f"{k} {v['cpu_us_per_turn']} CPU / {v['wall_us_per_turn']} wall" for k, v in
            jobs.items())
        store_wall = ", ".join(f"{k.removeprefix('store.')} {_part(sql, k)}"
                               for k in sql if k.startswith("store."))
        hops_cpu = calls * float(hop.get("cpu") or 0)
        floor_sql = fs["cpu_us_min"] - fm["cpu_us_min"]
        engine_sql = es["cpu_us_min"] - (em["cpu_us_min"] - commit - load)
        by_verb = ", ".join(f"{v} {k}" for k, v in w.get("by_verb", {}).items())
        notes.append(
            f"Engine on SQLite: {ratio_s}x the floor in wall time, {cpu_s}x in CPU time; goal "
            f"2x, missed by {cpu_s / GOAL_RATIO:.1f}x (CPU). A turn is {calls} store calls "
            "(load_for_turn: the dedupe lookup and the load; commit_turn), each one job on the "
            "store's worker thread running fixed SQL on a raw sqlite3 cursor, with "
            f"{w.get('commits')} commit per turn. A no-op job costs {hop.get('wall')} us wall "
            f"/ {hop.get('cpu')} us CPU there and back (loop.run_in_executor, used before: "
            f"{ex_hop.get('wall')} / {ex_hop.get('cpu')}). The jobs themselves, per turn "
            f"(us): {job_text}. As the event loop awaits them (wall us per turn): "
            f"{store_wall}, of {sql.get('total')} (instrumented run, {sql.get('process_cpu')} us "
            "of process CPU per turn); commit_turn's wall time also covers encoding the row, "
            "messages and changes on the loop's thread, the hop, and waiting for the loop to "
            "resume the task.")
        wal = w.get("wal_pages_per_turn", {})
        situ = bd.get("sqlite_hops_in_situ", {})
        hops_situ = situ.get("hops_cpu_us_per_turn")
        hop_text = (f"{calls} x {hop.get('cpu')} us = ~{hops_cpu:.0f} us CPU for no-op jobs; in "
                    "situ (the same run with the jobs inline on the loop's thread: "
                    f"{situ['inline']['cpu_us']} against {situ['worker']['cpu_us']} us CPU per "
                    f"turn) {hops_situ} us, as each hop also wakes a sleeping thread and moves "
                    "the work's data between cores" if hops_situ is not None
                    else f"{calls} x {hop.get('cpu')} us = ~{hops_cpu:.0f} us CPU")
        wal_text = (f" Each commit appends {wal.get('engine')} pages to the WAL against the "
                    f"floor's {wal.get('floor')} ({wal.get('page_size')} B pages)."
                    if wal else "")
        notes.append(
            "What is left on SQLite, in CPU us per turn: the store's share of a turn is about "
            f"{engine_sql:.0f} us (engine on SQLite minus the in-memory turn without the memory "
            f"store) against the floor's {floor_sql:.0f} us (floor on SQLite minus floor in "
            f"memory). (1) The thread hops: {hop_text}. Running all the fast path inline on the "
            "event loop's thread would save that, at the price of blocking the loop for every "
            "commit (and WAL checkpoints), which hurts latency under load; a middle way is "
            "load_for_turn on a second, read-only connection on the loop's thread (WAL "
            "readers never wait for the writer, and a commit has returned before the next turn "
            "of its conversation loads), which keeps one hop per turn, for the commit. (2) "
            f"The work in the worker: {job_cpu:.0f} us. The engine writes "
            f"{w.get('rows_written')} rows per turn ({by_verb} statements, "
            f"{w.get('executions')} executions) where the floor writes 3: ~{b_rows(r)} "
            "message rows per turn (the inbound, the replies, and state/routed events logged as "
            "messages) through the message table's two unique indexes, plus the entity "
            "history; the conversation row is ~1 KB with two secondary indexes." + wal_text +
            " Logging a turn's events in one row instead of a row each would cut the "
            "executions, index updates and pages. (3) Encoding and decoding on the loop's "
            "thread (_sqlite_turn: compact JSON of the three documents and each message's data, "
            "datetimes as text; _sqlite_state on load). (4) Everything listed for the in-memory "
            "turn except the memory store. SQLAlchemy Core is no longer on the hot path (a "
            f"SELECT by key costs {sel.get('core')} us through Core against {sel.get('raw')} us "
            "on the raw cursor).")

    # ------------------------------------------------------------ concurrency
    if not e["goals"]["at_least_3000_concurrent"]:
        c = r["concurrency"]["memory"]
        cs = r["concurrency"]["sqlite"]
        best = c["max_concurrent_p99_under_250ms"]
        need = GOAL_CONCURRENT / MODEL_DELAY_S
        last = c["levels"][-1] if c["levels"] else {}
        pause = float(last.get("gc_max_pause_ms") or 0)
        needed = (float(last.get("conversations") or 0) / MODEL_DELAY_S
                  * float(last.get("cpu_us_per_turn") or 0) / 1e6)
        gc_part = (f"Full collections paused the loop up to {pause} ms at that level (the "
                   "conversations' objects are created after the freeze, and the memory store "
                   "keeps them all), which lands in p99 too." if pause >= 20 else
                   f"The longest GC pause at that level was {pause} ms, so p99 there is "
                   "queueing behind a busy loop, not the collector.")
        notes.append(
            f"Concurrency: {best} concurrent conversations in memory with p99 < 250 ms "
            f"({cs['max_concurrent_p99_under_250ms']} on SQLite; goal {GOAL_CONCURRENT}). With "
            f"a 200 ms model each conversation asks for a turn about every 200 ms, so "
            f"{GOAL_CONCURRENT} conversations need ~{need:,.0f} turns/s from one event loop, at "
            f"most {1e6 / need:.0f} us of CPU per turn including asyncio's tasks and timers. "
            f"Under this load a turn cost {last.get('cpu_us_per_turn')} us of CPU (more than "
            "the sequential run's: a task, a timer and a lock per turn, and turns interleaved "
            f"across conversations); at the last level tried ({last.get('conversations')}"
            f"{', which missed' if not last.get('ok', True) else ''}) that is {needed:.2f} of "
            f"a CPU, and the process got {last.get('cpu_share')} of one on this shared "
            "machine, so the loop fell behind. A dedicated core would saturate at about "
            f"{c.get('saturation_ceiling_one_free_core')} conversations in memory and "
            f"{cs.get('saturation_ceiling_one_free_core')} on SQLite (200 ms / CPU per turn, "
            f"an upper bound). {gc_part} Closing it needs a turn of ~{1e6 / need:.0f} us CPU "
            "under load (the per-turn work above, about "
            f"{float(last.get('cpu_us_per_turn') or 0) / (1e6 / need):.0f}x less) or several "
            "worker processes sharded by conversation key (the per-conversation lock is "
            "in-process, so shard by key): "
            f"{GOAL_CONCURRENT} at the measured cost needs about "
            f"{GOAL_CONCURRENT / max(c.get('saturation_ceiling_one_free_core') or 1, 1):.1f} "
            "dedicated cores.")
    if not e["goals"]["peak_memory_under_60_mib"]:
        notes.append("Peak memory for the conversations is above 60 MiB: see memory in the JSON.")
    m = r["memory"]
    notes.append(
        f"Memory: {r['config']['conversations']} conversations in the memory store add "
        f"{m['rss_peak_delta_mib']} MiB of RSS at peak (tracemalloc peak "
        f"{m.get('tracemalloc_peak_mib')} MiB), mostly the message log kept as Python objects "
        f"({m['messages_per_conversation']} records per conversation); the stored state itself "
        f"is ~{m.get('stored_state_json_bytes_mean')} B of JSON per conversation. The process "
        f"(Python, pydantic, Jinja, transitions, the flows; no SQLAlchemy) is "
        f"{m['rss_baseline_mib']} MiB before the first turn and {m['rss_peak_mib']} MiB at "
        "peak; the goal is judged on the conversations' share. A SQL-store process imports "
        "SQLAlchemy too (about 20 MiB more) and keeps the log in the database instead.")
    return notes


def b_rows(r: dict[str, Any]) -> float:
    """Message rows written per turn (the log's share of the rows written)."""
    b = r.get("state_bytes_sqlite", {})
    return round(float(b.get("messages_per_conversation", 0)) / TURNS, 1)


def readme_row(r: dict[str, Any]) -> str:
    """One line for the README's performance table (bench/run_all.py collects it)."""
    t, e = r["timings"], r["evaluation"]
    cm, cs = r["concurrency"]["memory"], r["concurrency"]["sqlite"]
    return (
        "README row: | per-turn cost (`bench/turns.py`) | engine "
        f"{t['engine_memory']['cpu_us_min']:.0f} us CPU per turn in memory "
        f"({e['cpu_ratio_vs_floor']['engine_memory']}x the floor, goal 2x), "
        f"{t['engine_sqlite']['cpu_us_min']:.0f} us on SQLite "
        f"({e['cpu_ratio_vs_floor']['engine_sqlite']}x); "
        f"{r['store_work_per_turn_sqlite']['commits']:g} commit and "
        f"{r['store_work_per_turn_sqlite']['store_calls']:g} store calls per turn; state "
        f"{_state_max(r)} B (< 1.5 KB); +{r['memory']['rss_peak_delta_mib']} MiB for "
        f"{r['config']['conversations']} conversations (< 60 MiB); "
        f"{cm['max_concurrent_p99_under_250ms']} concurrent in memory / "
        f"{cs['max_concurrent_p99_under_250ms']} on SQLite at p99 < 250 ms (goal "
        f"{GOAL_CONCURRENT}) |")


def markdown(r: dict[str, Any]) -> str:
    t = r["timings"]
    ev = r["evaluation"]
    g = ev["goals"]
    w = r["store_work_per_turn_sqlite"]
    b = r["state_bytes_sqlite"]
    m = r["memory"]
    cm = r["concurrency"]["memory"]
    cs = r["concurrency"]["sqlite"]
    mi = r["machine"]
    n = r["config"]["conversations"]
    prev = r.get("previous") or {}

    def ok(flag: bool) -> str:
        return "met" if flag else "**missed**"

    goals = {
        "engine_memory": f"<= 2x floor: {ok(g['engine_memory_at_most_2x_floor'])}",
        "engine_sqlite": f"<= 2x floor: {ok(g['engine_sqlite_at_most_2x_floor'])}",
        "engine_offline_memory": "model cost included",
        "engine_memory_unfrozen": "-",
        "engine_memory_production": "-",
    }

    def row(key: str) -> str:
        s = t[key]
        floor = FLOOR_OF.get(key)
        rat = (f"{ev['ratio_vs_floor'][key]:.1f}x / {ev['cpu_ratio_vs_floor'][key]:.1f}x"
               if floor else "-")
        return (f"| {VARIANT_LABELS[key]} | {s['turns_per_s']:,} | {s['mean_us']:.0f} | "
                f"{s['p50_us']:.0f} | {s['p99_us']:.0f} | {s['cpu_us_min']:.0f} | "
                f"{s['gc_us_per_turn']:.0f} ({s['gc_max_pause_ms']:.0f} ms) | {rat} | "
                f"{goals.get(key, '')} |")

    lines = [
        f"Measured {mi['date'][:10]} on {mi['cpu_count']} shared CPUs "
        f"({mi['cpu_model'] or 'unknown CPU'}, load average {mi['load_average_at_start']}), "
        f"Python {mi['python']}, SQLite {mi['sqlite']}, SQLAlchemy {mi['sqlalchemy']}; "
        f"{n} conversations x {TURNS} turns, interleaved (turn 1 of every conversation, then "
        f"turn 2, ...), best of {r['config']['repetitions']} runs; engines built as "
        "`build_app` leaves them (gc.freeze() after start-up). `python bench/turns.py` "
        "(`make bench`) reproduces it; results in `bench/results/turns.json`.",
        "",
        "| Per turn | turns/s | mean us | p50 us | p99 us | CPU us | GC us (longest pause) "
        "| vs floor (wall / CPU) | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
        *(row(key) for key in VARIANT_LABELS if key in t),
        "",
        "Mean wall time by turn of the journey (us, turns 1-6): floor "
        f"{t['floor_memory']['by_turn_mean_us']}, engine in memory "
        f"{t['engine_memory']['by_turn_mean_us']}, engine on SQLite "
        f"{t['engine_sqlite']['by_turn_mean_us']}.",
    ]
    if prev.get("timings"):
        lines += [
            "",
            f"Against the previous run ({str(prev.get('date'))[:10]}, load average "
            f"{prev.get('load_average_at_start')}), mean / p99 / CPU us per turn:",
            "",
            "| Per turn | previous | now | CPU vs floor, previous -> now |",
            "|---|---|---|---|",
        ]
        for key, label in VARIANT_LABELS.items():
            if key not in t:
                continue
            before = _previous_row(prev, key)
            names = _PREVIOUS_NAMES.get(key, (key,))
            old_key = next((k for k in names if k in prev.get("timings", {})), key)
            old_ratio = prev.get("cpu_ratio_vs_floor", {}).get(old_key)
            now_ratio = ev["cpu_ratio_vs_floor"].get(key)
            ratio = (f"{old_ratio:.1f}x -> {now_ratio:.1f}x"
                     if old_ratio is not None and now_ratio is not None else "-")
            lines.append(f"| {label} | {_mpc(before)} | {_mpc(t[key])} | {ratio} |")
        old_frozen = prev["timings"].get("engine_memory_gc_frozen")
        if old_frozen:
            lines.append(f"| previous 'gc.freeze() (proposed fix)' row | {_mpc(old_frozen)} | "
                         "- | - |")
    lines += [
        "",
        "| Resource | measured | goal |",
        "|---|---|---|",
        f"| store work per turn (SQLite) | {w['statements']} statements "
        f"({', '.join(f'{v} {k}' for k, v in w['by_verb'].items())}; "
        f"{w.get('executions')} executions, an executemany counting once per row), "
        f"{w['rows_written']} rows written, {w['commits']} commit, {w['store_calls']} store "
        f"calls (thread hops) | one commit: {ok(g['one_commit_per_turn'])} |",
        f"| conversation state stored, excluding the message log | {b['state_bytes_mean']} B "
        f"after the journey (results {b['results']}, entities {b['entities']}, counters "
        f"{b['counters']}, other columns {b['scalars']}); largest at any turn {_state_max(r)} B "
        f"(mean after each turn {b.get('state_bytes_mean_after_turn')}) | "
        f"< 1.5 KB: {ok(g['state_under_1_5_kb'])} |",
        f"| message log per conversation | {b['message_log_bytes_per_conversation']} B in "
        f"{b['messages_per_conversation']} rows; entity history "
        f"{b['entity_history_bytes_per_conversation']} B; SQLite file with indexes "
        f"{b['db_file_bytes_per_conversation']} B | - |",
        f"| peak memory, {n} conversations, memory store | +{m['rss_peak_delta_mib']} MiB RSS "
        f"(tracemalloc peak {m.get('tracemalloc_peak_mib')} MiB); process {m['rss_baseline_mib']}"
        f" MiB before, {m['rss_peak_mib']} MiB at peak | < 60 MiB: "
        f"{ok(g['peak_memory_under_60_mib'])} |",
        f"| concurrent conversations, model 200 ms, p99 < 250 ms, memory store | "
        f"{cm['max_concurrent_p99_under_250ms']} | >= 3000: "
        f"{ok(g['at_least_3000_concurrent'])} |",
        f"| same, SQLite store | {cs['max_concurrent_p99_under_250ms']} | - |",
        f"| saturation ceiling on one free core (200 ms / CPU per turn under load) | memory "
        f"{cm.get('saturation_ceiling_one_free_core')}, SQLite "
        f"{cs.get('saturation_ceiling_one_free_core')} | - |",
        "",
        "| Concurrent conversations | memory p50 / p99 ms | turns/s | CPU share | CPU us/turn "
        "| SQLite p50 / p99 ms | turns/s | CPU share | CPU us/turn |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    mem_rows = {x["conversations"]: x for x in cm["levels"]}
    sql_rows = {x["conversations"]: x for x in cs["levels"]}

    def conc_cells(x: dict[str, Any] | None) -> str:
        if x is None:
            return "- | - | - | -"
        return (f"{x['p50_ms']} / {x['p99_ms']} | {x['turns_per_s']:,} | "
                f"{x.get('cpu_share', '-')} | {x.get('cpu_us_per_turn', '-')}")

    for level in sorted(set(mem_rows) | set(sql_rows)):
        lines.append(f"| {level} | {conc_cells(mem_rows.get(level))} | "
                     f"{conc_cells(sql_rows.get(level))} |")
    breakdown_info = r.get("breakdown", {})
    bd = breakdown_info.get("memory_cpu_us_per_turn", {})
    if bd:
        lines += ["", "Where an in-memory turn's CPU time goes (instrumented run, us per turn): "
                  + "; ".join(f"{k} {v['us_per_turn'] if isinstance(v, dict) else v}"
                              for k, v in bd.items()) + "."]
    sq = breakdown_info.get("sqlite_wall_us_per_turn", {})
    jobs = breakdown_info.get("sqlite_worker_us_per_turn", {})
    hop = breakdown_info.get("thread_hop_us", {})
    if sq:
        lines += ["", "Store calls on SQLite (instrumented run, us per turn): as the event loop "
                  "awaits them (wall) "
                  + "; ".join(f"{k} {v['us_per_turn']}" for k, v in sq.items()
                              if isinstance(v, dict))
                  + f", of {sq.get('total')} wall and {sq.get('process_cpu')} CPU per turn; on "
                  "the store's worker thread "
                  + "; ".join(f"{k} {v['cpu_us_per_turn']} CPU / {v['wall_us_per_turn']} wall"
                              for k, v in jobs.items())
                  + f"; a no-op job there and back {hop.get('wall')} us wall / "
                  f"{hop.get('cpu')} us CPU."]
    check = breakdown_info.get("machine_fire_us_per_call")
    if check:
        lines += ["", f"State machine: FlowMachine.fire (dispatch table) {check['table']} us "
                  f"per call, through transitions' trigger machinery {check['transitions']} us "
                  f"({check['calls_compared']} real calls, {check['different_results']} "
                  "different results)."]
    notes = r.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    lines += ["", readme_row(r)]
    return "\n".join(lines) + "\n"


def _fmt_timing(label: str, s: dict[str, Any], floor: dict[str, Any] | None) -> str:
    ratio = ""
    if floor:
        ratio = (f"{s['mean_us'] / floor['mean_us']:5.1f}x wall "
                 f"{s['cpu_us_min'] / floor['cpu_us_min']:5.1f}x cpu")
    return (f"  {label:<44} {s['turns_per_s']:>7} turns/s  mean {s['mean_us']:>7.1f} us  "
            f"p99 {s['p99_us']:>8.1f} us  cpu {s['cpu_us_min']:>6.1f} us  {ratio}")


def print_summary(r: dict[str, Any]) -> None:
    t = r["timings"]
    print("\nPer-turn cost (best repetition; ratios against the floor doing the same work):")
    for key, label in VARIANT_LABELS.items():
        if key in t:
            floor = FLOOR_OF.get(key)
            print(_fmt_timing(label, t[key], t[floor] if floor else None))
    w, b, m = r["store_work_per_turn_sqlite"], r["state_bytes_sqlite"], r["memory"]
    print(f"\nStore work per turn (SQLite): {w['statements']} statements {w['by_verb']} "
          f"({w['executions']} executions, {w['rows_written']} rows written), "
          f"{w['commits']} commits, {w['store_calls']} store calls")
    print(f"State bytes per conversation: mean {b['state_bytes_mean']}, max "
          f"{b['state_bytes_max']} (mean after each turn: {b['state_bytes_mean_after_turn']}); "
          f"message log {b['message_log_bytes_per_conversation']} B")
    print(f"Memory: +{m['rss_peak_delta_mib']} MiB RSS for the conversations (process peak "
          f"{m['rss_peak_mib']} MiB), tracemalloc peak {m.get('tracemalloc_peak_mib')} MiB")
    for label in ("memory", "sqlite"):
        c = r["concurrency"][label]
        print(f"Concurrency ({label}): {c['max_concurrent_p99_under_250ms']} conversations "
              "with p99 < 250 ms")
    print("\nBreakdown:")
    for section, values in r["breakdown"].items():
        print(f"  {section}: {json.dumps(values)}")
    print("\nGoals:")
    for goal, met in r["evaluation"]["goals"].items():
        print(f"  {'ok    ' if met else 'MISSED'} {goal}")
    print("\nNotes:")
    for note in r["notes"]:
        print(f"  - {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 200 conversations, one repetition, short sweep (~20 s)")
    parser.add_argument("--conversations", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions of the timed runs (default 3, 1 with --quick)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default bench/results/turns.json, and turns.md next "
                        "to it; a --quick run writes nothing unless this is given)")
    parser.add_argument("--profile", choices=("memory", "sqlite"),
                        help="print a cProfile of the engine's scripted run and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="re-derive evaluation, notes and the markdown from an existing "
                        "results JSON (--output, default bench/results/turns.json)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--script", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        result = asyncio.run(memory_phase(args.memory_child, args.script, args.tracemalloc))
        print(json.dumps(result))
        return 0
    n = args.conversations or (200 if args.quick else 2000)
    if args.profile:
        print(asyncio.run(profile(args.profile, n)))
        return 0

    if args.report_only:
        output = args.output or RESULTS / "turns.json"
        result = json.loads(output.read_text(encoding="utf-8"))
        result["evaluation"] = evaluate(result)
        result["notes"] = build_notes(result)
        output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                          encoding="utf-8")
        output.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
        print(f"rewrote {output} and {output.with_suffix('.md')}")
        return 0
    repeat = args.repeat or (1 if args.quick else 3)
    # The results this run replaces, kept in it for the before/after notes.
    previous: dict[str, Any] = {}
    earlier = args.output or RESULTS / "turns.json"
    if earlier.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            previous = previous_summary(json.loads(earlier.read_text(encoding="utf-8")))
    result = asyncio.run(main_run(n, args.quick, repeat))
    result["previous"] = previous
    result["evaluation"] = evaluate(result)
    result["notes"] = build_notes(result)
    print_summary(result)
    output = args.output
    if output is None:
        if args.quick:
            return 0
        output = RESULTS / "turns.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                      encoding="utf-8")
    output.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(f"\nwrote {output} and {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
