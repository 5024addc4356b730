"""Web chat load: N concurrent WebSocket clients on one server process, fake Claude at 200 ms.

What it measures (the issue's target: at 1000 clients the engine's own overhead
p99 < 50 ms, no message lost or duplicated):

* **sustained messages/s**: customer messages sent in a steady window whose bot
  reply arrived, divided by the window length;
* **reply latency**: client send -> the bot's reply frame of that turn, p50/p99;
* **engine overhead**: reply latency minus the fake model's *measured* service time
  of that turn's model calls (each call is matched to its customer message by a
  marker word in the text), and minus the configured 200 ms per call (both reported);
* **lost** (no ack or no reply by the end of the drain) and **duplicated** (a seq
  received twice on one socket, an ack twice, two replies for one turn);
* server CPU (``/proc/<pid>/stat``), RSS, and a per-turn split of the latency
  (receive path, engine, SDK/HTTP, delivery) from timestamps taken in the server.

Processes (2 cores; the clients' and the fake's CPU must not count as the server's):

* the **fake Claude** (``tests/fakes/claude_api.py``, ``latency=0.2``) in its own
  process, with a responder that always routes to ``refund`` and answers every
  decision with a reply, no entity, no transition, ``satisfaction 4``,
  ``wants_human false``, ``off_topic true`` (small talk: each message is exactly one
  model decision and the conversation stays in ``refund/ask_order``);
* the **server**: ``create_app(settings, model="claude")`` under uvicorn
  (``ws="websockets-sansio"``, the default loop: uvloop when installed, as
  ``helpline serve``), a fresh process and SQLite file per level;
* the **clients**: this process, ``websockets.asyncio.client`` (browser-like:
  ``Origin`` = the server's own origin, permessage-deflate on, no client pings).

Run::

    python bench/ws_load.py                       # N = 100, 500, 1000: ~4 min on 2 cores
    python bench/ws_load.py --levels 100 --window 10 --no-write   # smoke run (~30 s)
    python bench/ws_load.py --profile-level 1000  # + the server under cProfile (+1 min)
    python bench/ws_load.py --compare-level 1000 --compare-experiment "a,b;c"
        # + N=1000 again with candidate fixes patched into the server (see apply_experiments)
    python bench/ws_load.py --report-only --notes notes.json   # re-render ws_load.md

The reference run (``bench/results/ws_load.md``) used
``--compare-level 1000 --compare-experiment "switch_interval_ms1;memory_store"
--profile-level 1000`` (6.5 min).

Results: ``bench/results/ws_load.json`` and ``bench/results/ws_load.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
MODEL_LATENCY = 0.2
SECRET = "ws-load-bench-secret"
API_KEY = "test-key"
#: Marker words (letters only: the PII redactor leaves them alone) tie every model
#: call and every server-side timestamp to the customer message that caused it.
MARK_RE = re.compile(r"\bqz([a-z]{4,})\b")
TEXTS = (
    "quick question while I look for my order number, ref qz{m}: do you sell gift cards?",
    "before that, ref qz{m}: are your shops open on Sundays?",
    "ok one moment please, ref qz{m}, I am searching my emails",
    "sorry ref qz{m}, does the refund go back to my card or as store credit?",
    "ref qz{m} just checking, how long do refunds usually take?",
)
REPLY = "Sure, happy to help with that. Whenever you have your order number, send it over."
DRAIN_MAX = 45.0  # after the window: wait at most this long for outstanding replies
STALL = 10.0  # ... and stop earlier when nothing arrives for this long: the rest is lost
LATE = 10.0  # replies slower than this are counted as late (not lost)
SHUTDOWN_MARK = "=== ws_load: SIGTERM, graceful shutdown ==="


def letters(n: int) -> str:
    out = []
    for _ in range(5):
        n, r = divmod(n, 26)
        out.append(chr(97 + r))
    return "".join(reversed(out))


def marker_of(text: str) -> str | None:
    """The last marker in ``text`` (a decision's last user turn may quote older ones)."""
    found = MARK_RE.findall(text or "")
    return found[-1] if found else None


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def dist(values: list[float], scale: float = 1000.0) -> dict[str, Any]:
    """p50/p90/p99/p99.9/max/mean in ms (``values`` in seconds)."""
    if not values:
        return {"n": 0}

    def r(v: float | None) -> float | None:
        return None if v is None else round(v * scale, 2)

    return {"n": len(values), "p50": r(pct(values, 50)), "p90": r(pct(values, 90)),
            "p99": r(pct(values, 99)), "p999": r(pct(values, 99.9)), "max": r(max(values)),
            "mean": r(sum(values) / len(values))}


def proc_cpu(pid: int) -> float:
    """user + system CPU seconds of a process (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process (the main thread is ``main``)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
        except OSError:
            continue
        name = "main" if tid == str(pid) else head.split("(", 1)[1]
        fields = rest.split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / tick, sum(values) / tick


def proc_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# =============================================================================
# The fake Claude (own process, or a thread in the server with --fake-in-server)
# =============================================================================


def make_fake(latency: float) -> Any:
    """A FakeClaude that times its handler per request and answers as described above."""
    from tests.fakes.claude_api import FakeClaude, MessageReply

    class TimedFake(FakeClaude):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.pending: dict[str, tuple[str | None, str]] = {}
            #: (marker, kind, t_start, t_end) in time.monotonic() (system-wide clock)
            self.timings: list[tuple[str | None, str, float, float]] = []

        async def _handle(self, request: Any) -> Any:
            t0 = time.monotonic()
            response = await super()._handle(request)
            t1 = time.monotonic()
            rid = response.headers.get("request-id") if response is not None else None
            marker, kind = self.pending.pop(rid, (None, "other")) if rid else (None, "other")
            self.timings.append((marker, kind, t0, t1))
            return response

    fake = TimedFake(api_key=API_KEY, latency=latency, max_lifetime=3600.0, max_log=500)

    def responder(req: Any) -> Any:
        forced = req.forced_tool
        if forced == "choose_flow":
            kind = "route"
            spec = MessageReply.tool_use("choose_flow", {"flow": "refund", "wants_human": False,
                                                         "satisfaction": 4})
        elif forced == "record_decision":
            kind = "decision"
            spec = MessageReply.tool_use("record_decision", {
                "reply": REPLY, "entities": {}, "transition": None, "satisfaction": 4,
                "wants_human": False, "off_topic": True, "language": "en",
                "pinned": {"order_id": None, "reason": None}})
        else:
            kind = "summary"
            spec = MessageReply.text("- The customer is looking for the order number.")
        marker = marker_of(req.last_user_text) if kind != "summary" else None
        fake.pending[req.request_id] = (marker, kind)
        return spec

    fake.responder = responder
    return fake


def run_fake(cfg: dict[str, Any]) -> None:
    """``--role fake``: serve until SIGTERM, then write the timings to cfg['out']."""
    from tests.fakes.claude_api import FakeClaudeThread

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    fake = make_fake(cfg["latency"])
    runner = FakeClaudeThread(fake)
    runner.start()
    print(f"READY {fake.url}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    runner.stop()
    Path(cfg["out"]).write_text(json.dumps({"timings": fake.timings,
                                            "handler_errors": len(fake.handler_errors),
                                            "max_in_flight": fake.max_in_flight}))


# =============================================================================
# The server (own process)
# =============================================================================


def instrument_server(stamps: dict[str, list[Any]]) -> None:
    """Measurement-only wrappers (this process only): per-turn and per-model-call stamps.

    ``turn``: marker, t_turn_start, t_handle_start, t_handle_end, t_turn_end;
    ``model``: marker, role, t_start, t_end (the SDK call as the engine sees it).
    """
    from channels.web.plugin import WebChannel
    from engine.models.claude import ClaudeModel
    from engine.runner import Engine

    turns: list[Any] = stamps.setdefault("turn", [])
    handles: dict[str, tuple[float, float]] = {}
    calls: list[Any] = stamps.setdefault("model", [])

    orig_turn = WebChannel._turn
    orig_handle = Engine.handle
    orig_create = ClaudeModel._create

    async def _turn(self: Any, conn: Any, frame: Any) -> None:
        t0 = time.monotonic()
        try:
            await orig_turn(self, conn, frame)
        finally:
            marker = marker_of(getattr(frame, "text", "") or "")
            h = handles.pop(marker, (0.0, 0.0)) if marker else (0.0, 0.0)
            turns.append((marker, t0, h[0], h[1], time.monotonic()))

    async def handle(self: Any, inbound: Any, *, deliver: bool = True) -> Any:
        t0 = time.monotonic()
        try:
            return await orig_handle(self, inbound, deliver=deliver)
        finally:
            marker = marker_of(inbound.text)
            if marker:
                handles[marker] = (t0, time.monotonic())

    async def _create(self: Any, role: str, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        try:
            return await orig_create(self, role, **kwargs)
        finally:
            marker = None
            if role != "summary":
                for message in reversed(kwargs.get("messages") or []):
                    if message.get("role") == "user":
                        content = message.get("content")
                        if isinstance(content, list):
                            content = " ".join(str(b.get("text", "")) for b in content
                                               if isinstance(b, dict))
                        marker = marker_of(str(content))
                        break
            calls.append((marker, role, t0, time.monotonic()))

    # The SQLite store's worker thread: per job, the time from submit to the waiting
    # task being resumable (queue + run + hand-back) and the time running on the thread.
    from engine.store import sql

    jobs: list[Any] = stamps.setdefault("store_job", [])
    named: list[bool] = []
    orig_submit = sql._Worker.submit

    def submit(self: Any, fn: Any) -> Any:
        t0 = time.monotonic()
        ran: list[float] = []

        def timed() -> Any:
            if not named:
                # Name the OS thread (prctl PR_SET_NAME) so /proc shows its CPU apart.
                named.append(True)
                with contextlib.suppress(Exception):
                    import ctypes

                    ctypes.CDLL(None).prctl(15, b"helpline-sqlite", 0, 0, 0)
            t1 = time.monotonic()
            try:
                return fn()
            finally:
                ran.append(t1)
                ran.append(time.monotonic())

        future = orig_submit(self, timed)
        future.add_done_callback(
            lambda _f: jobs.append((t0, ran[0] if ran else t0, ran[1] if ran else t0,
                                    time.monotonic())))
        return future

    sql._Worker.submit = submit  # type: ignore[method-assign]
    WebChannel._turn = _turn  # type: ignore[method-assign]
    Engine.handle = handle  # type: ignore[method-assign]
    ClaudeModel._create = _create  # type: ignore[method-assign]


def _exp_fast_tokens() -> None:
    """engine/memory.py estimate_tokens: the same result without a per-character loop."""
    import math

    import engine.memory as memory

    cjk_re = re.compile("[\u3000-\u9fff\uf900-\ufaff\uff00-\uffef]")

    def estimate_tokens(text: str) -> int:
        if text.isascii():
            return math.ceil(len(text) / 3.5)
        cjk = len(cjk_re.findall(text))
        return math.ceil(cjk * 1.3 + (len(text) - cjk) / 3.5)

    memory.estimate_tokens = estimate_tokens


def _exp_no_template_reload() -> None:
    """engine/flow/templates.py make_environment: ``auto_reload=False`` (no stat per render)."""
    import engine.flow.loader as loader
    import engine.flow.templates as templates

    orig_env = templates.make_environment

    def make_environment(prompts_dir: Any) -> Any:
        env = orig_env(prompts_dir)
        env.auto_reload = False
        return env

    templates.make_environment = make_environment
    loader.make_environment = make_environment  # type: ignore[attr-defined]


def _exp_sdk_shards(k: int) -> None:
    """engine/models/claude.py: k AsyncAnthropic clients (k connection pools), round robin.

    httpcore scans every pooled connection (and probes each idle one) whenever a
    request starts or ends; k pools make each scan k times shorter.
    """
    from itertools import cycle

    from anthropic import AsyncAnthropic

    from engine.models.claude import ClaudeModel

    orig_init = ClaudeModel.__init__
    orig_create = ClaudeModel._create

    def __init__(self: Any, **kw: Any) -> None:
        orig_init(self, **kw)
        c = self.client
        self._shards = cycle([c] + [AsyncAnthropic(
            api_key=c.api_key, base_url=c.base_url, timeout=c.timeout,
            max_retries=c.max_retries) for _ in range(k - 1)])

    async def _create(self: Any, role: str, **kwargs: Any) -> Any:
        self.client = next(self._shards)
        return await orig_create(self, role, **kwargs)

    ClaudeModel.__init__ = __init__  # type: ignore[method-assign]
    ClaudeModel._create = _create  # type: ignore[method-assign]


def _exp_sdk_aiohttp() -> None:
    """engine/models/claude.py: ``AsyncAnthropic(http_client=DefaultAioHttpClient(...))``,
    the SDK's aiohttp transport (needs aiohttp: ``anthropic[aiohttp]``)."""
    import anthropic

    from engine.models.claude import ClaudeModel

    orig_init = ClaudeModel.__init__

    def __init__(self: Any, **kw: Any) -> None:
        if kw.get("client") is None:
            timeout = kw.get("timeout", 30.0)
            kw["client"] = anthropic.AsyncAnthropic(
                api_key=kw.get("api_key") or os.environ.get("ANTHROPIC_API_KEY"),
                base_url=kw.get("base_url"), timeout=timeout,
                max_retries=kw.get("max_retries", 2),
                http_client=anthropic.DefaultAioHttpClient(timeout=timeout))
        orig_init(self, **kw)

    ClaudeModel.__init__ = __init__  # type: ignore[method-assign]


def apply_experiments(names: list[str]) -> dict[str, Any]:
    """Candidate fixes, patched into the server process only (``--experiment``).

    They measure what a change to engine/ would buy; the engine's files are untouched.
    ``sdk_aiohttp``, ``fast_tokens`` and ``no_template_reload`` landed in the engine in
    17c6e08 (re-applying them is a no-op there); they stay to measure older revisions.
    Returns uvicorn.Config overrides (``no_deflate``: permessage-deflate off).
    """
    overrides: dict[str, Any] = {}
    for name in names:
        if name == "fast_tokens":
            _exp_fast_tokens()
        elif name == "no_template_reload":
            _exp_no_template_reload()
        elif name.startswith("sdk_shards"):
            _exp_sdk_shards(int(name.removeprefix("sdk_shards") or 8))
        elif name == "sdk_aiohttp":
            _exp_sdk_aiohttp()
        elif name == "no_deflate":
            overrides["ws_per_message_deflate"] = False
        elif name.startswith("switch_interval_ms"):
            # The store's worker thread waits up to the switch interval (5 ms) for the GIL
            # each time it wants it back from a busy event loop.
            sys.setswitchinterval(float(name.removeprefix("switch_interval_ms") or 1) / 1000)
        elif name == "memory_store":
            overrides["_database_url"] = "memory://"
        else:
            raise SystemExit(f"unknown experiment {name!r}")
    return overrides


def run_server(cfg: dict[str, Any]) -> None:
    """``--role server``: uvicorn on cfg['port'] until SIGTERM; then dump stamps to cfg['out']."""
    import uvicorn

    from engine.config import Settings
    from engine.server.app import create_app

    os.environ["ANTHROPIC_API_KEY"] = API_KEY
    overrides = apply_experiments(cfg.get("experiments") or [])
    stamps: dict[str, list[Any]] = {}
    instrument_server(stamps)
    fake_thread = None
    base_url = cfg.get("fake_url")
    if cfg.get("fake_in_server"):
        from tests.fakes.claude_api import FakeClaudeThread

        fake = make_fake(cfg["latency"])
        fake_thread = FakeClaudeThread(fake)
        fake_thread.start()
        base_url = fake.url
    database_url = overrides.pop("_database_url", f"sqlite:///{cfg['db']}")
    settings = Settings(
        database_url=database_url, shop_database_path=None, secret_key=SECRET,
        model="claude", anthropic_base_url=base_url, host="127.0.0.1", port=cfg["port"],
        flows_dir=Path(cfg["flows_dir"]), channels=["web"], **cfg.get("settings", {}))
    info: dict[str, Any] = {}

    def on_ready(context: Any) -> None:
        channel = context.extras["web"]
        # All clients come from 127.0.0.1: lift the per-address token rate limit (60/min).
        channel.sessions_per_minute = 10**9
        info["context"] = context
        info["channel"] = channel

    app = create_app(settings, model="claude", on_ready=on_ready)
    config = uvicorn.Config(app, host="127.0.0.1", port=cfg["port"], ws="websockets-sansio",
                            ws_max_size=65536, lifespan="on", log_config=None,
                            log_level="warning", access_log=False, timeout_graceful_shutdown=10,
                            backlog=4096, **overrides)
    class _Server(uvicorn.Server):
        """SIGTERM -> graceful shutdown, without uvicorn re-raising the signal afterwards
        (that would kill the process before it writes its measurements)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    server = _Server(config)
    profile = None
    if cfg.get("cprofile"):
        import cProfile

        profile = cProfile.Profile()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        def shutdown() -> None:
            # A marker in the log: errors after it happened during the graceful shutdown.
            print(SHUTDOWN_MARK, file=sys.stderr, flush=True)
            server.should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, shutdown)
        if profile is not None:
            # The bench profiles the steady window only: SIGUSR1 starts, SIGUSR2 stops
            # and writes the stats at once (shutdown under load may be slow).
            def stop_profile() -> None:
                profile.disable()
                profile.dump_stats(cfg["cprofile"])

            loop.add_signal_handler(signal.SIGUSR1, profile.enable)
            loop.add_signal_handler(signal.SIGUSR2, stop_profile)
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
                return
            await asyncio.sleep(0.02)
        print(f"READY {cfg['port']} {type(asyncio.get_running_loop()).__module__}", flush=True)
        await task

    try:
        asyncio.run(main()) if config.loop == "asyncio" else run_with_uvicorn_loop(config, main)
    finally:
        if profile is not None:
            profile.disable()
            profile.dump_stats(cfg["cprofile"])
        context = info.get("context")
        stats = {}
        if context is not None:
            model = context.app.engine.model
            stats = {"engine": dict(context.app.engine.stats),
                     "model_stack": model.stats() if hasattr(model, "stats") else {}}
        out: dict[str, Any] = {"stamps": stamps, "stats": stats}
        if fake_thread is not None:
            fake_thread.stop()
            out["fake_timings"] = getattr(fake_thread.fake, "timings", [])
        Path(cfg["out"]).write_text(json.dumps(out, default=str))


def run_with_uvicorn_loop(config: Any, main: Any) -> None:
    """Run ``main()`` on the loop uvicorn would pick (``auto``: uvloop when installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main())
        return
    if config.loop in ("auto", "uvloop"):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        asyncio.run(main())


# =============================================================================
# The clients (this process)
# =============================================================================


@dataclass
class Sent:
    id: str
    marker: str
    t: float
    number: int  # 1 = the conversation's first message (route + decision)


@dataclass
class Client:
    idx: int
    sent: list[Sent] = field(default_factory=list)
    acks: dict[str, tuple[int, float]] = field(default_factory=dict)
    dup_acks: int = 0
    bot: list[tuple[int, float, str]] = field(default_factory=list)  # seq, t, kind
    seqs: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    notices: int = 0
    close_code: int | None = None
    closed_early: bool = False
    connected: bool = False
    send_failures: int = 0


class LoadLevel:
    def __init__(self, n: int, port: int, args: argparse.Namespace, counter: list[int]) -> None:
        self.n = n
        self.port = port
        self.args = args
        self.counter = counter  # global marker counter (unique across levels)
        self.clients = [Client(i) for i in range(n)]
        self.stop_sending = 0.0
        self.ws: list[Any] = [None] * n
        self.tasks: list[asyncio.Task[Any]] = []
        self.connect_errors: Counter[str] = Counter()
        self.loop_lag: list[float] = []

    async def lag_monitor(self, until: float) -> None:
        while time.monotonic() < until:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            self.loop_lag.append(time.monotonic() - t - 0.05)

    async def connect(self, client: Client, http: Any) -> None:
        from websockets.asyncio.client import connect
        from websockets.typing import Origin

        origin = f"http://127.0.0.1:{self.port}"
        resp = await http.post("/chat/session", json={"site": "bench"},
                               headers={"Origin": origin})
        resp.raise_for_status()
        token = resp.json()["token"]
        ws = await connect(f"ws://127.0.0.1:{self.port}/chat/ws", origin=Origin(origin),
                           open_timeout=15, close_timeout=3, ping_interval=None,
                           max_queue=None)
        await ws.send(json.dumps({"type": "auth", "token": token}))
        ready = json.loads(await asyncio.wait_for(ws.recv(), 15))
        if ready.get("type") != "ready":
            raise RuntimeError(f"expected ready, got {ready}")
        self.ws[client.idx] = ws
        client.connected = True

    async def reader(self, client: Client) -> None:
        from websockets.exceptions import ConnectionClosed

        ws = self.ws[client.idx]
        try:
            async for raw in ws:
                t = time.monotonic()
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "message":
                    client.seqs[frame["seq"]] += 1
                    if frame.get("author") == "bot":
                        client.bot.append((frame["seq"], t, frame.get("kind", "")))
                elif kind == "ack":
                    if frame["id"] in client.acks:
                        client.dup_acks += 1
                    else:
                        client.acks[frame["id"]] = (frame["seq"], t)
                elif kind == "error":
                    client.errors[frame.get("code", "?")] += 1
                elif kind == "notice":
                    client.notices += 1
                elif kind == "resync":
                    for m in frame.get("messages", []):
                        client.seqs[m["seq"]] += 1
        except ConnectionClosed:
            pass
        client.close_code = ws.close_code
        if time.monotonic() < self.stop_sending:
            client.closed_early = True

    async def sender(self, client: Client, rng: random.Random) -> None:
        ws = self.ws[client.idx]
        lo, hi = self.args.interval
        next_at = time.monotonic() + rng.uniform(0.3, hi)
        number = 0
        while True:
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= self.stop_sending or client.closed_early:
                return
            self.counter[0] += 1
            marker = letters(self.counter[0])
            number += 1
            msg_id = f"c{client.idx}m{number}"
            text = TEXTS[self.counter[0] % len(TEXTS)].format(m=marker)
            t = time.monotonic()
            try:
                await ws.send(json.dumps({"type": "message", "id": msg_id, "text": text}))
            except Exception:
                client.send_failures += 1
                return
            client.sent.append(Sent(msg_id, marker, t, number))
            next_at += rng.uniform(lo, hi)  # open loop: the schedule ignores the replies

    async def run(self) -> dict[str, Any]:
        import httpx

        args = self.args
        rng = random.Random(1234 + self.n)
        marks: dict[str, float] = {"start": time.monotonic()}
        ramp_s = self.n / args.connect_rate
        # Sending stops at the end of the steady window.
        self.stop_sending = marks["start"] + ramp_s + args.warmup + args.window + 30.0
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", limits=limits,
                                     timeout=15) as http:
            sem = asyncio.Semaphore(64)
            connects: list[asyncio.Task[None]] = []

            async def one(client: Client) -> None:
                async with sem:
                    try:
                        await self.connect(client, http)
                    except Exception as exc:
                        self.connect_errors[type(exc).__name__] += 1
                        return
                self.tasks.append(asyncio.create_task(self.reader(client)))
                self.tasks.append(asyncio.create_task(
                    self.sender(client, random.Random(rng.random()))))

            self.tasks.append(asyncio.create_task(self.lag_monitor(self.stop_sending)))
            # Bounded connect ramp: client i starts at start + i / rate.
            for client in self.clients:
                at = marks["start"] + client.idx / args.connect_rate
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                connects.append(asyncio.create_task(one(client)))
            await asyncio.wait(connects, timeout=60)
        marks["ramp_end"] = time.monotonic()
        marks["window_start"] = marks["ramp_end"] + args.warmup
        marks["window_end"] = marks["window_start"] + args.window
        self.stop_sending = marks["window_end"]
        return marks

    async def drain(self, marks: dict[str, float]) -> None:
        """Wait until every sent message has its ack and a reply: while replies keep
        coming, up to DRAIN_MAX s; stop after STALL s without progress."""
        hard = marks["window_end"] + DRAIN_MAX
        last_progress, seen = time.monotonic(), -1
        while time.monotonic() < hard:
            if all(self.complete(c) for c in self.clients):
                break
            count = sum(len(c.bot) + len(c.acks) for c in self.clients)
            if count != seen:
                seen, last_progress = count, time.monotonic()
            elif time.monotonic() - last_progress > STALL:
                break
            await asyncio.sleep(0.25)
        marks["drained"] = time.monotonic()

    @staticmethod
    def complete(client: Client) -> bool:
        if client.closed_early:
            return True
        if len(client.acks) < len(client.sent):
            return False
        last_ack = max((s for s, _ in client.acks.values()), default=0)
        return any(seq > last_ack for seq, _, _ in client.bot) or not client.sent

    async def close(self) -> None:
        closers = [asyncio.create_task(ws.close()) for ws in self.ws if ws is not None]
        if closers:
            await asyncio.wait(closers, timeout=20)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def analyse_client(client: Client) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Per sent message: ack seq, reply time; plus loss/duplicate counts of this socket."""
    acks = sorted((seq, mid) for mid, (seq, _) in client.acks.items())
    ack_seqs = [seq for seq, _ in acks]
    replies: dict[str, list[tuple[int, float, str]]] = {}
    orphan = 0
    for seq, t, kind in client.bot:
        i = bisect.bisect_left(ack_seqs, seq) - 1
        if i < 0:
            orphan += 1
            continue
        replies.setdefault(acks[i][1], []).append((seq, t, kind))
    rows = []
    dup_replies = 0
    for s in client.sent:
        ack = client.acks.get(s.id)
        got = replies.get(s.id, [])
        texts = [r for r in got if r[2] == "text"]
        if len(texts) > 1:
            dup_replies += 1
        first = min((r[1] for r in (texts or got)), default=None)
        rows.append({"marker": s.marker, "t_send": s.t, "number": s.number,
                     "t_ack": ack[1] if ack else None, "t_reply": first,
                     "n_bot": len(got)})
    counts = {"dup_seq": sum(c - 1 for c in client.seqs.values() if c > 1),
              "dup_ack": client.dup_acks, "dup_reply": dup_replies, "orphan_bot": orphan}
    return rows, counts


# =============================================================================
# Orchestration
# =============================================================================


def make_flows_dir(tmp: Path) -> Path:
    """A copy of flows/ with refund's max_failed_attempts 3 -> 20 (3x that off-topic turns).

    Every bench message is small talk (off_topic); the flow hands off after
    3 x max_failed_attempts digressions (9 by default), and a level sends up to ~20
    messages per conversation. 20 is the schema's maximum (60 digressions).
    """
    out = tmp / "flows"
    out.mkdir()
    for path in sorted((ROOT / "flows").glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        if path.name == "refund.yaml":
            new = text.replace("  max_failed_attempts: 3\n", "  max_failed_attempts: 20\n")
            assert new != text, "refund.yaml: max_failed_attempts not found"
            text = new
        (out / path.name).write_text(text, encoding="utf-8")
    return out


async def read_ready(proc: asyncio.subprocess.Process, timeout: float) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    text = line.decode().strip()
    if not text.startswith("READY"):
        raise RuntimeError(f"subprocess did not start: {text!r}")
    return text


async def spawn(role: str, cfg: dict[str, Any], tmp: Path, log_name: str,
                env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str, Any]:
    cfg_path = tmp / f"{log_name}.json"
    cfg_path.write_text(json.dumps(cfg))
    log = open(tmp / f"{log_name}.log", "wb")  # noqa: SIM115
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--role", role, "--config", str(cfg_path),
        stdout=asyncio.subprocess.PIPE, stderr=log, cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    try:
        ready = await read_ready(proc, 60)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        log.close()
        raise RuntimeError((tmp / f"{log_name}.log").read_text()[-3000:]) from None
    return proc, ready, log


async def stop_proc(proc: asyncio.subprocess.Process, timeout: float = 60) -> int | None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return proc.returncode


async def fetch_metrics(port: int) -> dict[str, float]:
    import httpx

    wanted = ("helpline_turns_total", "helpline_model_busy_rejections_total",
              "helpline_model_fallbacks_total", "helpline_summaries_total",
              "helpline_handoffs_total")
    out: dict[str, float] = {}
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    except Exception as exc:
        return {"error": type(exc).__name__}  # type: ignore[dict-item]
    for line in text.splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                if float(value):
                    out[name] = float(value)
    return out


def log_errors(log: str) -> dict[str, Any]:
    """Tracebacks in the server's log, before and after SIGTERM, with their last lines."""
    before, _, after = log.partition(SHUTDOWN_MARK)

    def count(part: str) -> dict[str, Any]:
        lines = part.splitlines()
        kinds: Counter[str] = Counter()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                j = i + 1
                while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                    j += 1
                if j < len(lines):
                    kinds[lines[j][:160]] += 1
        return {"tracebacks": sum(1 for line in lines if line.startswith("Traceback")),
                "first_error_lines": dict(kinds.most_common(6))}

    return {"during_load": count(before), "during_shutdown": count(after)}


async def run_level(n: int, args: argparse.Namespace, tmp: Path, fake_url: str | None,
                    counter: list[int], cprofile: str | None = None,
                    fake_pid: int | None = None, experiments: list[str] | None = None,
                    tag: str = "") -> dict[str, Any]:
    port = free_port()
    experiments = args.experiment if experiments is None else experiments
    level_dir = tmp / f"level-{n}{tag}"
    level_dir.mkdir()
    server_cfg = {
        "port": port, "db": str(level_dir / "helpline.db"), "flows_dir": str(args.flows_dir),
        "fake_url": fake_url, "fake_in_server": args.fake_in_server, "latency": MODEL_LATENCY,
        "out": str(level_dir / "server-out.json"), "cprofile": cprofile,
        "experiments": experiments,
        "settings": {} if args.default_limits else {
            # 1000 clients x 1 msg / 4 s x 0.2 s = 50 model calls in flight on average;
            # the defaults (16 in total, 8 per model id) cap a process at 40 decisions/s.
            "model_concurrency": 512, "model_concurrency_per_model": 512,
            "model_queue_bound": 10_000,
        },
    }
    proc, ready, log = await spawn("server", server_cfg, level_dir, "server")
    loop_kind = ready.split()[2] if len(ready.split()) > 2 else "?"
    load_before = os.getloadavg()
    level = LoadLevel(n, port, args, counter)
    marks = await level.run()
    # Steady window: CPU of the server and of this process.
    await asyncio.sleep(max(0.0, marks["window_start"] - time.monotonic()))
    if cprofile:
        proc.send_signal(signal.SIGUSR1)
    cpu0, self0 = proc_cpu(proc.pid), time.process_time()
    threads0 = thread_cpu(proc.pid)
    fake0 = proc_cpu(fake_pid) if fake_pid else 0.0
    busy0, total0 = machine_cpu()
    await asyncio.sleep(max(0.0, marks["window_end"] - time.monotonic()))
    cpu1, self1 = proc_cpu(proc.pid), time.process_time()
    threads1 = thread_cpu(proc.pid)
    fake1 = proc_cpu(fake_pid) if fake_pid else 0.0
    busy1, total1 = machine_cpu()
    if cprofile:
        proc.send_signal(signal.SIGUSR2)
    rss = proc_rss_mb(proc.pid)
    load_during = os.getloadavg()
    await level.drain(marks)
    metrics = await fetch_metrics(port)
    await level.close()
    rc = await stop_proc(proc)
    log.close()
    server_out = json.loads((level_dir / "server-out.json").read_text()) \
        if (level_dir / "server-out.json").exists() else {}
    server_log = (level_dir / "server.log").read_text(errors="replace")
    return {
        "n": n, "port": port, "marks": marks, "clients": level.clients,
        "connect_errors": dict(level.connect_errors), "server_cpu_s": cpu1 - cpu0,
        "client_cpu_s": self1 - self0, "server_rss_mb": rss,
        "server_threads_cpu_s": {k: v - threads0.get(k, 0.0) for k, v in threads1.items()
                                 if v - threads0.get(k, 0.0) > 0},
        "fake_cpu_s": fake1 - fake0 if fake_pid else None,
        "machine_busy_cores": (busy1 - busy0) / max(1e-9, total1 - total0)
        * (os.cpu_count() or 1), "loop": loop_kind,
        "load_before": load_before, "load_during": load_during, "metrics": metrics,
        "server_rc": rc, "server_out": server_out, "experiments": experiments,
        "server_log_errors": log_errors(server_log),
        "server_log_tail": server_log[-2000:],
        "client_loop_lag": level.loop_lag,
    }


def summarise(raw: dict[str, Any], fake_timings: list[Any]) -> dict[str, Any]:
    n, marks = raw["n"], raw["marks"]
    w0, w1 = marks["window_start"], marks["window_end"]
    window = w1 - w0
    by_marker: dict[str, list[tuple[str, float, float]]] = {}
    for marker, kind, t0, t1 in fake_timings:
        if marker:
            by_marker.setdefault(marker, []).append((kind, t0, t1))
    stamps = raw["server_out"].get("stamps", {})
    turn_st = {m: (a, b, c, d) for m, a, b, c, d in stamps.get("turn", []) if m}
    model_st: dict[str, list[tuple[str, float, float]]] = {}
    for marker, role, t0, t1 in stamps.get("model", []):
        if marker:
            model_st.setdefault(marker, []).append((role, t0, t1))

    rows: list[dict[str, Any]] = []
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    close_codes: Counter[str] = Counter()
    for client in raw["clients"]:
        client_rows, counts = analyse_client(client)
        rows.extend(client_rows)
        totals.update(counts)
        errors.update(client.errors)
        totals["notices"] += client.notices
        totals["send_failures"] += client.send_failures
        totals["closed_early"] += int(client.closed_early)
        totals["connected"] += int(client.connected)
        if client.connected:
            close_codes[str(client.close_code)] += 1

    sent_all = len(rows)
    no_ack = sum(1 for r in rows if r["t_ack"] is None)
    no_reply = sum(1 for r in rows if r["t_reply"] is None)
    lost = sum(1 for r in rows if r["t_ack"] is None or r["t_reply"] is None)
    late = sum(1 for r in rows if r["t_reply"] is not None and r["t_reply"] - r["t_send"] > LATE)
    in_window = [r for r in rows if w0 <= r["t_send"] < w1]
    replied_in_window = sum(1 for r in rows if r["t_reply"] is not None
                            and w0 <= r["t_reply"] < w1)
    lat, over_fake, over_conf, first_lat = [], [], [], []
    split: dict[str, list[float]] = {k: [] for k in (
        "client_to_turn", "turn_to_handle", "handle_non_model", "sdk_http", "fake_service",
        "handle_end_to_client", "model_client")}
    calls_per_msg: Counter[int] = Counter()
    for r in in_window:
        if r["t_reply"] is None:
            continue
        latency = r["t_reply"] - r["t_send"]
        calls = [c for c in by_marker.get(r["marker"], []) if c[0] != "summary"]
        calls_per_msg[len(calls)] += 1
        service = sum(t1 - t0 for _, t0, t1 in calls)
        lat.append(latency)
        over_fake.append(latency - service)
        over_conf.append(latency - MODEL_LATENCY * max(1, len(calls)))
        if r["number"] == 1:
            first_lat.append(latency)
        ts = turn_st.get(r["marker"])
        mc = model_st.get(r["marker"], [])
        client_model = sum(t1 - t0 for _, t0, t1 in mc)
        if ts and ts[1]:
            turn_start, h0, h1, _ = ts
            split["client_to_turn"].append(turn_start - r["t_send"])
            split["turn_to_handle"].append(h0 - turn_start)
            split["handle_non_model"].append((h1 - h0) - client_model)
            split["sdk_http"].append(client_model - service)
            split["fake_service"].append(service)
            split["model_client"].append(client_model)
            split["handle_end_to_client"].append(r["t_reply"] - h1)

    store_jobs = [j for j in stamps.get("store_job", []) if w0 <= j[0] < w1]
    store = {
        "jobs_per_s": round(len(store_jobs) / window, 1),
        "jobs_per_message": round(len(store_jobs) / max(1, replied_in_window), 2),
        "wait_for_thread_ms": dist([b - a for a, b, _, _ in store_jobs]),
        "run_on_thread_ms": dist([c - b for _, b, c, _ in store_jobs]),
        "hand_back_ms": dist([d - c for _, _, c, d in store_jobs]),
        "total_ms": dist([d - a for a, _, _, d in store_jobs]),
    }
    server_cpu = raw["server_cpu_s"]
    replied_msgs = max(1, replied_in_window)
    lag = raw["client_loop_lag"]
    result = {
        "clients": n,
        "experiments": raw.get("experiments") or [],
        "connected": totals["connected"],
        "connect_errors": raw["connect_errors"],
        "loop": raw["loop"],
        "ramp_s": round(marks["ramp_end"] - marks["start"], 1),
        "window_s": round(window, 1),
        "offered_msgs_per_s": round(len(in_window) / window, 1),
        "sustained_msgs_per_s": round(replied_in_window / window, 1),
        "messages_sent": sent_all,
        "messages_in_window": len(in_window),
        "lost": lost,
        "lost_detail": {"no_ack": no_ack, "no_reply": no_reply},
        f"late_over_{LATE:g}s": late,
        "duplicated": totals["dup_seq"] + totals["dup_ack"] + totals["dup_reply"],
        "duplicate_detail": {"seq_twice": totals["dup_seq"], "ack_twice": totals["dup_ack"],
                             "two_replies_one_turn": totals["dup_reply"],
                             "bot_frame_before_any_ack": totals["orphan_bot"]},
        "errors": dict(errors),
        "busy_notices": totals["notices"],
        "send_failures": totals["send_failures"],
        "sockets_closed_early": totals["closed_early"],
        "close_codes": dict(close_codes),
        "reply_latency_ms": dist(lat),
        "first_message_latency_ms": dist(first_lat),
        "overhead_vs_fake_service_ms": dist(over_fake),
        "overhead_vs_configured_200ms_ms": dist(over_conf),
        "model_calls_per_message": {str(k): v for k, v in sorted(calls_per_msg.items())},
        "latency_split_ms": {k: dist(v) for k, v in split.items()},
        "sqlite_store_jobs": store,
        "server_cpu": {"cores": round(server_cpu / window, 3),
                       "cores_by_thread": {k: round(v / window, 3) for k, v in
                                           raw.get("server_threads_cpu_s", {}).items()},
                       "ms_per_message": round(server_cpu / replied_msgs * 1000, 2),
                       "rss_mb": raw["server_rss_mb"]},
        "client_process_cpu_cores": round(raw["client_cpu_s"] / window, 3),
        "fake_process_cpu_cores": round(raw["fake_cpu_s"] / window, 3)
        if raw.get("fake_cpu_s") is not None else None,
        "machine_busy_cores": round(raw["machine_busy_cores"], 2),
        "other_processes_cores": round(raw["machine_busy_cores"] - server_cpu / window
                                       - raw["client_cpu_s"] / window
                                       - (raw.get("fake_cpu_s") or 0) / window, 2),
        "client_loop_lag_ms": {"p99": round((pct(lag, 99) or 0) * 1000, 1),
                               "max": round(max(lag, default=0) * 1000, 1)},
        "load_avg_before": [round(x, 2) for x in raw["load_before"]],
        "load_avg_window_end": [round(x, 2) for x in raw["load_during"]],
        "server_metrics": raw["metrics"],
        "server_stats": raw["server_out"].get("stats", {}),
        "server_log_errors": raw["server_log_errors"],
        "server_exit_code": raw["server_rc"],
    }
    p99 = result["overhead_vs_fake_service_ms"].get("p99")
    result["target"] = {
        "overhead_p99_under_50ms": p99 is not None and p99 < 50,
        "no_loss": lost == 0,
        "no_duplicates": result["duplicated"] == 0,
    }
    return result


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for pkg in ("uvicorn", "websockets", "starlette", "anthropic", "httpx", "aiohttp",
                "uvloop", "SQLAlchemy"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    import sqlite3
    import subprocess

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    return {"git_head": git("rev-parse", "--short", "HEAD"),
            "engine_uncommitted_changes": bool(git("status", "--porcelain", "--", "engine",
                                                   "channels")),
            "cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "packages": versions,
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


_PROFILE_GROUPS = (
    ("anthropic SDK", ("/anthropic/",)),
    ("httpx2/httpcore2/anyio/h11 (SDK transport)",
     ("/httpx2/", "/httpcore2/", "/anyio/", "/h11/", "/sniffio/")),
    ("aiohttp (SDK transport, sdk_aiohttp)", ("/aiohttp/", "/multidict/", "/yarl/",
                                              "/aiohappyeyeballs/")),
    ("engine/", ("/engine/",)),
    ("channels/web", ("/channels/",)),
    ("uvicorn + websockets", ("/uvicorn/", "/websockets/")),
    ("starlette", ("/starlette/",)),
    ("pydantic", ("/pydantic/", "pydantic_core")),
    ("jinja2", ("/jinja2/", ".j2")),
    ("sqlalchemy", ("/sqlalchemy/",)),
    ("prometheus_client", ("/prometheus_client/",)),
    ("asyncio", ("/asyncio/",)),
    ("json", ("/json/",)),
)


def _profile_group(func: tuple[str, int, str]) -> str:
    path, _, name = func
    if path == "~":
        if "poll" in name:
            return "select.poll (httpcore idle-connection probe)"
        if "SimpleQueue" in name:
            return "SimpleQueue.put (store worker hand-off)"
        if "zlib" in name or "compress" in name or "flush" in name:
            return "zlib (permessage-deflate)"
        if "urandom" in name:
            return "os.urandom (uuid4: SDK idempotency keys)"
        if "stat" in name:
            return "os.stat (jinja2 auto_reload)"
        return "other C builtins"
    for label, keys in _PROFILE_GROUPS:
        if any(k in path for k in keys):
            return label
    return "other Python"


def profile_summary(path: str, top: int = 30) -> dict[str, Any]:
    """Top functions, and the main thread's profiled time by package (share in %)."""
    import io
    import pstats

    out: dict[str, Any] = {}
    stats = pstats.Stats(path)
    groups: Counter[str] = Counter()
    for func, (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        groups[_profile_group(func)] += tottime
    total = sum(groups.values()) or 1.0
    out["by_package_percent"] = {k: round(100 * v / total, 1) for k, v in groups.most_common()}
    out["profiled_seconds"] = round(total, 1)
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(path, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
        out[f"top_{key}"] = buf.getvalue().splitlines()
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ws_load_"))
    args.flows_dir = make_flows_dir(tmp)
    started = time.monotonic()
    info = machine_info()
    fake_proc = fake_log = None
    fake_url = None
    fake_cpu0 = 0.0
    if not args.fake_in_server:
        fake_out = tmp / "fake-out.json"
        fake_proc, ready, fake_log = await spawn(
            "fake", {"latency": MODEL_LATENCY, "out": str(fake_out)}, tmp, "fake")
        fake_url = ready.split()[1]
        fake_cpu0 = proc_cpu(fake_proc.pid)
    counter = [0]
    raws = []
    try:
        for n in args.levels:
            print(f"level N={n} ...", flush=True)
            raws.append(await run_level(n, args, tmp, fake_url, counter,
                                        fake_pid=fake_proc.pid if fake_proc else None))
        compares = []
        for i, experiments in enumerate(args.compare_experiment if args.compare_level else []):
            print(f"level N={args.compare_level} with {experiments} ...", flush=True)
            compares.append(await run_level(
                args.compare_level, args, tmp, fake_url, counter,
                fake_pid=fake_proc.pid if fake_proc else None, experiments=experiments,
                tag=f"-compare{i}"))
        profile: dict[str, Any] | None = None
        if args.profile_level:
            print(f"profile run N={args.profile_level} (cProfile in the server) ...", flush=True)
            ppath = str(tmp / "server.prof")
            save_window = args.window
            args.window = args.profile_window
            praw = await run_level(args.profile_level, args, tmp, fake_url, counter,
                                   cprofile=ppath, fake_pid=fake_proc.pid if fake_proc else None,
                                   tag="-profile")
            args.window = save_window
            profile = {"raw": praw, "path": ppath}
    finally:
        fake_cpu = proc_cpu(fake_proc.pid) - fake_cpu0 if fake_proc else None
        if fake_proc is not None:
            await stop_proc(fake_proc)
        if fake_log is not None:
            fake_log.close()
    timings: list[Any] = []
    if fake_proc is not None:
        fake_data = json.loads((tmp / "fake-out.json").read_text())
        timings = fake_data["timings"]
    levels = []
    for raw in raws:
        t = timings or raw["server_out"].get("fake_timings", [])
        levels.append(summarise(raw, t))
    result: dict[str, Any] = {
        "benchmark": "bench/ws_load.py",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": info,
        "config": {
            "levels": args.levels, "interval_s": args.interval, "warmup_s": args.warmup,
            "window_s": args.window, "connect_rate_per_s": args.connect_rate,
            "model_latency_s": MODEL_LATENCY,
            "fake": "in the server process (thread)" if args.fake_in_server
            else "own process (FakeClaudeThread)",
            "model_limits": "defaults (16/8)" if args.default_limits
            else "model_concurrency=512, model_concurrency_per_model=512, "
                 "model_queue_bound=10000",
            "store": "SQLite file (temp dir), fresh per level",
            "flows": "copy of flows/ with refund.handoff.max_failed_attempts 3 -> 20",
            "drain": f"after the window, wait for outstanding replies while they keep coming "
                     f"(at most {DRAIN_MAX:g} s; stop after {STALL:g} s without any); a message "
                     "without ack or reply then is lost",
            "experiments": args.experiment,
        },
        "levels": levels,
        "fake_process_cpu_s": round(fake_cpu, 2) if fake_cpu is not None else None,
        "total_run_s": round(time.monotonic() - started, 1),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    if compares:
        result["compare_runs"] = [
            summarise(c, timings or c["server_out"].get("fake_timings", [])) for c in compares]
    if args.profile_level and profile is not None:
        t = timings or profile["raw"]["server_out"].get("fake_timings", [])
        try:
            summary = profile_summary(profile["path"])
        except OSError as exc:
            summary = {"error": f"no profile written: {exc}", "by_package_percent": {}}
        result["profile"] = {"level": summarise(profile["raw"], t), **summary}
        if args.keep_profile:
            shutil.copy(profile["path"], args.keep_profile)
    if not args.keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        result["tmp_dir"] = str(tmp)
    return result


def fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def _label(lv: dict[str, Any]) -> str:
    exps = lv.get("experiments") or []
    return f"{lv['clients']:,}" + (f" + {'+'.join(exps)}" if exps else "")


def render_md(result: dict[str, Any]) -> str:
    m = result["machine"]
    c = result["config"]
    lines = [
        f"Measured {result['measured_at']} at {m.get('git_head', '?')}"
        f"{' (engine/channels modified)' if m.get('engine_uncommitted_changes') else ''} "
        f"on {m['cpus']} shared CPUs ({m['cpu']}, load "
        f"average at start {m['load_avg_at_start']}), Python {m['python']}, uvicorn "
        f"{m['packages'].get('uvicorn')} (ws=websockets-sansio, "
        f"{result['levels'][0]['loop'] if result['levels'] else '?'} loop), websockets "
        f"{m['packages'].get('websockets')}, SQLite {m['sqlite']}. Fake Claude at "
        f"{int(c['model_latency_s'] * 1000)} ms ({c['fake']}); each client sends a message "
        f"every {c['interval_s'][0]:g}-{c['interval_s'][1]:g} s (open loop); steady window "
        f"{c['window_s']:g} s after the connect ramp ({c['connect_rate_per_s']:g}/s) and "
        f"{c['warmup_s']:g} s warm-up. `python bench/ws_load.py` reproduces it; results in "
        "`bench/results/ws_load.json`.",
        "",
        "| clients | msgs/s offered | msgs/s sustained | reply p50 ms | reply p99 ms "
        "| overhead p50 ms | overhead p99 ms | overhead p99 vs 200 ms | lost | duplicated "
        "| server CPU (cores) | CPU ms/msg | target |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = list(result["levels"]) + list(result.get("compare_runs") or [])
    for lv in rows:
        t = lv["target"]
        ok = all(t.values())
        missed = [k for k, v in t.items() if not v]
        label = _label(lv)
        lines.append(
            f"| {label} | {fmt(lv['offered_msgs_per_s'])} "
            f"| {fmt(lv['sustained_msgs_per_s'])} "
            f"| {fmt(lv['reply_latency_ms'].get('p50'))} "
            f"| {fmt(lv['reply_latency_ms'].get('p99'))} "
            f"| {fmt(lv['overhead_vs_fake_service_ms'].get('p50'))} "
            f"| {fmt(lv['overhead_vs_fake_service_ms'].get('p99'))} "
            f"| {fmt(lv['overhead_vs_configured_200ms_ms'].get('p99'))} "
            f"| {lv['lost']} | {lv['duplicated']} | {lv['server_cpu']['cores']:.2f} "
            f"| {lv['server_cpu']['ms_per_message']:.2f} "
            f"| {'met' if ok else '**missed** (' + ', '.join(missed) + ')'} |")
    lines += [
        "",
        "Overhead = reply latency minus the fake's measured service time of that turn's "
        "model calls (matched per message); \"vs 200 ms\" subtracts the configured latency "
        "instead. Target (at 1000 clients): overhead p99 < 50 ms, nothing lost or duplicated.",
    ]
    split_rows = []
    for lv in rows:
        s = lv["latency_split_ms"]
        label = _label(lv)
        split_rows.append(
            f"| {label} | " + " | ".join(
                f"{fmt(s[k].get('p50'))} / {fmt(s[k].get('p99'))}" for k in (
                    "client_to_turn", "turn_to_handle", "handle_non_model", "sdk_http",
                    "handle_end_to_client")) + " |")
    lines += [
        "",
        "Where a turn's time goes (p50 / p99 ms, server-side timestamps):",
        "",
        "| clients | send -> turn starts | turn -> engine.handle | engine (no model) "
        "| SDK + HTTP to the fake | handle end -> reply received |",
        "|---:|---|---|---|---|---|",
        *split_rows,
    ]
    cpu_rows = []
    for lv in rows:
        by_thread = lv["server_cpu"].get("cores_by_thread", {})
        store_ms = lv["sqlite_store_jobs"]["total_ms"]
        cpu_rows.append(
            f"| {_label(lv)} "
            f"| {lv['server_cpu']['cores']:.2f} | {fmt(by_thread.get('main'), 2)} "
            f"| {fmt(by_thread.get('helpline-sqlite'), 2)} "
            f"| {fmt(store_ms.get('p50'))} / {fmt(store_ms.get('p99'))} "
            f"| {fmt(lv.get('fake_process_cpu_cores'), 2)} "
            f"| {lv['client_process_cpu_cores']:.2f} | {fmt(lv.get('other_processes_cores'), 2)} "
            f"| {fmt(lv.get('machine_busy_cores'), 2)} | {lv['client_loop_lag_ms']['p99']} |")
    lines += [
        "",
        "CPU during the steady window (cores; the machine has 2, shared with other jobs):",
        "",
        "| clients | server | its event loop thread | its SQLite thread "
        "| store call p50 / p99 ms | fake Claude | clients (this process) | other processes "
        "| machine busy | client loop lag p99 ms |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        *cpu_rows,
    ]
    err_rows = []
    for lv in rows:
        e = lv.get("server_log_errors") or {}
        if not isinstance(e, dict):
            continue
        load, stop = e.get("during_load", {}), e.get("during_shutdown", {})
        if load.get("tracebacks") or stop.get("tracebacks"):
            kinds = "; ".join(f"{k} (x{v})" for k, v in {
                **load.get("first_error_lines", {}),
                **stop.get("first_error_lines", {})}.items())
            err_rows.append(f"- {_label(lv)}"
                            f": {load.get('tracebacks', 0)} tracebacks during the load, "
                            f"{stop.get('tracebacks', 0)} after SIGTERM: {kinds}")
    if err_rows:
        lines += ["", "Server log:", "", *err_rows]
    prof = result.get("profile")
    if prof and prof.get("by_package_percent"):
        shares = ", ".join(f"{k} {v}%" for k, v in list(prof["by_package_percent"].items())[:9])
        lines += ["", f"cProfile of the server's main thread during the steady window at "
                      f"{prof['level']['clients']:,} clients (share of profiled time; the "
                      f"SQLite worker thread is not profiled): {shares}."]
    notes = result.get("notes")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["bench", "server", "fake"], default="bench",
                   help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[100, 500, 1000], help="client counts (default 100,500,1000)")
    p.add_argument("--window", type=float, default=40.0, help="steady window per level, s")
    p.add_argument("--warmup", type=float, default=6.0, help="after the connect ramp, s")
    p.add_argument("--interval", type=lambda s: tuple(float(x) for x in s.split(",")),
                   default=(3.0, 5.0), help="seconds between a client's messages (lo,hi)")
    p.add_argument("--connect-rate", type=float, default=200.0, help="new clients per second")
    p.add_argument("--fake-in-server", action="store_true",
                   help="run the fake as a thread in the server process (shares its GIL)")
    p.add_argument("--default-limits", action="store_true",
                   help="keep the model layer's default concurrency limits (16/8)")
    p.add_argument("--profile-level", type=int, default=0,
                   help="after the levels, run this N again with cProfile in the server")
    p.add_argument("--profile-window", type=float, default=15.0)
    p.add_argument("--compare-level", type=int, default=0,
                   help="after the levels, run this N again with --compare-experiment")
    p.add_argument("--compare-experiment",
                   type=lambda s: [[x for x in part.split(",") if x] for part in s.split(";")],
                   default=[], help="experiment sets for --compare-level runs: "
                                    "'a,b;c' runs a+b, then c")
    p.add_argument("--keep-profile", help="copy the server's .prof file here")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, dumps)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--experiment", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="candidate engine fixes patched into the server (measurement only): "
                        "fast_tokens, no_template_reload, sdk_shards<k>, sdk_aiohttp, no_deflate, "
                        "switch_interval_ms<n>, memory_store")
    p.add_argument("--notes", help="a JSON file with a list of notes for the results")
    p.add_argument("--report-only", action="store_true",
                   help="re-render ws_load.md from ws_load.json (with --notes: set the notes)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role != "bench":
        cfg = json.loads(Path(args.config).read_text())
        (run_server if args.role == "server" else run_fake)(cfg)
        return
    if args.report_only:
        result = json.loads((RESULTS / "ws_load.json").read_text())
    else:
        try:
            import uvloop
        except ImportError:
            result = asyncio.run(main_async(args))
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                result = runner.run(main_async(args))
    if args.notes:
        result["notes"] = json.loads(Path(args.notes).read_text())
    md = render_md(result)
    print(md)
    for lv in result["levels"]:
        print(json.dumps({k: lv[k] for k in ("clients", "lost", "lost_detail", "duplicated",
                                              "duplicate_detail", "errors", "busy_notices",
                                              "close_codes", "model_calls_per_message",
                                              "first_message_latency_ms",
                                              "client_loop_lag_ms", "server_metrics",
                                              "server_cpu", "client_process_cpu_cores",
                                              "fake_process_cpu_cores", "machine_busy_cores",
                                              "other_processes_cores",
                                              "server_log_errors")}, default=str))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "ws_load.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (RESULTS / "ws_load.md").write_text(md)


if __name__ == "__main__":
    main()
