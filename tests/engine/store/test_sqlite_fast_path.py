"""The SQLite fast path (raw sqlite3 cursor on the worker thread) against SQLAlchemy Core.

``sqlite:///`` runs the per-turn statements on a raw cursor; ``sqlite+aiosqlite:///``
runs every statement through SQLAlchemy Core. Both must store the very same
rows, read each other's databases, and fail the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.errors import DuplicateMessageError, StoreError, VersionConflictError
from engine.store import (
    ConversationKey,
    ConversationState,
    MemoryStore,
    MessageRecord,
    Store,
    TurnWrite,
)
from engine.store.sql import SQLStore

from .test_conformance import change, inbound, key, new_state, outbound, realistic_state

TABLES = ("conversation", "message", "entity_history")


@pytest.fixture
async def raw_store(tmp_path: Path) -> AsyncIterator[SQLStore]:
    store = SQLStore(f"sqlite:///{tmp_path / 'raw.db'}")
    assert store.raw_sqlite
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def play(store: Store) -> None:
    """Turns touching every column and value shape the stores encode."""
    shanghai = timezone(timedelta(hours=8))
    state = realistic_state()
    cid = state.id
    first = datetime(2024, 5, 1, 20, 0, 0, 0, tzinfo=shanghai)  # no microseconds
    await store.commit_turn(
        TurnWrite(
            dataclasses.replace(state, created_at=first, updated_at=first),
            expected_version=0,
            messages=[
                dataclasses.replace(inbound(cid, 15, "你好 🙂", "m-1"), created_at=first),
                outbound(cid, 16, "hi", buttons=["是", "否"], n=None),
                dataclasses.replace(outbound(cid, 17, "list data"), data={"x": []}),
            ],
            entity_changes=[
                change(cid, "name", "李伟"),
                change(cid, "nothing", None, None),
                change(cid, "nested", {"a": [1, 2.5, True, None]}, "42"),
            ],
        )
    )
    loaded = await store.load(state.key)
    assert loaded is not None
    loaded.state = "handoff"
    loaded.owner = "pending_human"
    loaded.owner_agent = "alice"
    loaded.handoff_reason = "asked_for_human"
    loaded.waiting_since = datetime(2024, 5, 1, 13, 0, 0, 1, tzinfo=UTC)
    loaded.closed = True
    loaded.flow = None
    loaded.counters["turn"] = 7
    loaded.entities.pop("email")
    loaded.summary = ""
    loaded.updated_at = datetime(2024, 5, 2, 1, 2, 3, 999999, tzinfo=shanghai)
    await store.commit_turn(
        TurnWrite(
            loaded,
            expected_version=1,
            messages=[inbound(cid, 18, "", "m-2", channel="web"), outbound(cid, 19, "")],
            entity_changes=[change(cid, "name", None, "李伟", turn=7)],
        )
    )
    other = new_state("t2", owner="human")
    await store.commit_turn(TurnWrite(other, expected_version=0))


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the store's tables with each value's SQLite storage class."""
    db = sqlite3.connect(path)
    try:
        out = {}
        for table in TABLES:
            names = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
            typed = ", ".join(f"{n}, typeof({n})" for n in names)
            out[table] = db.execute(f"SELECT {typed} FROM {table} ORDER BY rowid").fetchall()
        return out
    finally:
        db.close()


async def test_fast_path_stores_the_same_rows_as_sqlalchemy_core(tmp_path: Path) -> None:
    stores = {
        "raw": SQLStore(f"sqlite:///{tmp_path / 'raw.db'}"),
        "core": SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'core.db'}"),
    }
    assert stores["raw"].raw_sqlite and not stores["core"].raw_sqlite
    for store in stores.values():
        await store.open()
        try:
            await play(store)
        finally:
            await store.close()
    raw, core = dump(tmp_path / "raw.db"), dump(tmp_path / "core.db")
    assert raw == core
    assert len(raw["message"]) == 5 and len(raw["entity_history"]) == 4


@pytest.mark.parametrize(("writer", "reader"), [("raw", "core"), ("core", "raw")])
async def test_each_path_reads_what_the_other_wrote(
    tmp_path: Path, writer: str, reader: str
) -> None:
    urls = {"raw": "sqlite:///", "core": "sqlite+aiosqlite:///"}
    path = tmp_path / "shared.db"
    memory = MemoryStore()
    await play(memory)
    first = SQLStore(urls[writer] + str(path))
    await first.open()
    await play(first)
    await first.close()

    second = SQLStore(urls[reader] + str(path))
    await second.open()
    try:
        realistic = realistic_state().key
        for k in (realistic, key("t2")):
            expected = await memory.load(k)
            assert await second.load(k) == expected
            assert await second.load_for_turn(k, "m-2") == (expected, True)
            assert await second.load_for_turn(k, "m-3") == (expected, False)
        conv = await memory.load(realistic)
        assert conv is not None
        assert await second.load_by_id(conv.id) == conv
        read = [await second.load(realistic), await second.load_by_id(conv.id)]
        read += [(await second.load_for_turn(realistic, "m-1"))[0], *await second.conversations()]
        for loaded in read:
            # Equal is not enough: 1 == True.
            assert loaded is not None and type(loaded.closed) is bool
            assert type(loaded.seq) is int and type(loaded.version) is int
            times = (loaded.created_at, loaded.updated_at, loaded.waiting_since)
            assert all(t is None or t.tzinfo is UTC for t in times)
        assert await second.messages(conv.id) == await memory.messages(conv.id)
        assert await second.entity_history(conv.id) == await memory.entity_history(conv.id)
        assert await second.conversations() == await memory.conversations()
        # ... and goes on writing it.
        conv.state = "after"
        await second.commit_turn(
            TurnWrite(conv, expected_version=2, messages=[inbound(conv.id, 20, "x", "m-3")])
        )
        assert await second.load_for_turn(realistic, "m-3") == (conv, True)
    finally:
        await second.close()


async def test_in_memory_database_is_shared_by_both_paths() -> None:
    store = SQLStore("sqlite://")
    assert store.raw_sqlite
    await store.open()
    try:
        state = new_state()
        await store.commit_turn(
            TurnWrite(state, expected_version=0, messages=[inbound(state.id, 1, "hi", "m-1")])
        )
        assert await store.load_for_turn(key(), "m-1") == (state, True)
        assert [m.text for m in await store.messages(state.id)] == ["hi"]

        def count(conn: sa.Connection) -> int:
            return int(conn.exec_driver_sql("SELECT count(*) FROM message").scalar_one())

        assert await store.run_sync(count) == 1
    finally:
        await store.close()


async def trace(store: SQLStore) -> list[str]:
    """Statements the fast path's connection runs from now on."""
    statements: list[str] = []

    def install(cursor: sqlite3.Cursor) -> None:
        cursor.connection.set_trace_callback(statements.append)

    await store._raw(install)
    return statements


async def test_one_hop_statements_per_turn(raw_store: SQLStore) -> None:
    await raw_store.load(key())  # opens the fast path's connection
    statements = await trace(raw_store)
    conv, seen = await raw_store.load_for_turn(key(), "m-1")
    assert (conv, seen) == (None, False)
    state = new_state()
    await raw_store.commit_turn(
        TurnWrite(
            state,
            expected_version=0,
            messages=[inbound(state.id, 1, "hi", "m-1"), outbound(state.id, 2, "hello")],
            entity_changes=[change(state.id, "name", "Ann")],
        )
    )
    conv, seen = await raw_store.load_for_turn(key(), "m-2")
    assert conv is not None and not seen
    conv.state = "next"
    await raw_store.commit_turn(
        TurnWrite(
            conv,
            expected_version=1,
            messages=[inbound(conv.id, 3, "again", "m-2"), outbound(conv.id, 4, "ok")],
            entity_changes=[change(conv.id, "name", "Bob", "Ann", turn=2)],
        )
    )
    verbs = [s.split(None, 1)[0].upper() for s in statements]
    # Two SELECTs per lookup; a turn: BEGIN, row, 2 messages, 1 change, COMMIT.
    turn = ["BEGIN", "INSERT", "INSERT", "INSERT", "INSERT", "COMMIT"]
    assert verbs == ["SELECT", "SELECT", *turn, "SELECT", "SELECT", "BEGIN", "UPDATE", *turn[2:]]


def assert_no_open_write(path: Path) -> None:
    """Nobody holds the database's write lock: a writer gets it at once."""
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
    finally:
        db.close()


async def test_refused_turns_leave_no_transaction_open(
    tmp_path: Path, raw_store: SQLStore
) -> None:
    path = tmp_path / "raw.db"
    state = new_state()
    cid = state.id
    await raw_store.commit_turn(
        TurnWrite(state, expected_version=0, messages=[inbound(cid, 1, "hi", "m-1")])
    )
    refused: list[tuple[type[Exception], TurnWrite]] = [
        (VersionConflictError, TurnWrite(state, expected_version=5)),
        (VersionConflictError, TurnWrite(new_state(cid="other"), expected_version=0)),
        (
            DuplicateMessageError,
            TurnWrite(state, expected_version=1, messages=[inbound(cid, 2, "x", "m-1")]),
        ),
        (StoreError, TurnWrite(state, expected_version=1, messages=[outbound(cid, 1, "x")])),
    ]
    for error, write in refused:
        with pytest.raises(error):
            await raw_store.commit_turn(write)
        assert_no_open_write(path)
    assert state.version == 1
    assert await raw_store.load(key()) == state


async def test_reads_leave_no_snapshot_open(tmp_path: Path, raw_store: SQLStore) -> None:
    """A read whose statement stayed un-reset would pin its WAL snapshot until the next call."""
    state = new_state()
    cid = state.id
    await raw_store.commit_turn(
        TurnWrite(state, expected_version=0, messages=[inbound(cid, 1, "a", "m-1")])
    )
    other = sqlite3.connect(tmp_path / "raw.db", isolation_level=None, timeout=0)
    try:
        other.execute("CREATE TABLE scratch (x)")

        def checkpoint() -> tuple[int, int, int]:
            other.execute("INSERT INTO scratch VALUES (1)")
            return tuple(other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())

        reads = [
            raw_store.load_for_turn(key(), "m-1"),
            raw_store.load_for_turn(key("none"), "m-2"),
            raw_store.load(key()),
            raw_store.seen("web", "m-1"),
            raw_store.load_by_id(cid),
        ]
        for read in reads:
            other.execute("INSERT INTO scratch VALUES (0)")
            await read
            assert checkpoint() == (0, 0, 0)  # (busy, WAL frames, checkpointed)

        def pin(cursor: sqlite3.Cursor) -> None:  # the control: a half-read statement
            cursor.execute("SELECT seq FROM message UNION ALL SELECT 1").fetchone()

        await raw_store._raw(pin)
        assert checkpoint()[0] == 1
    finally:
        other.close()


async def test_database_errors_are_store_errors(raw_store: SQLStore) -> None:
    state = new_state()
    await raw_store.commit_turn(TurnWrite(state, expected_version=0))

    def drop(conn: sa.Connection) -> None:
        conn.exec_driver_sql("DROP TABLE message")

    await raw_store.run_sync(drop)
    with pytest.raises(StoreError, match="cannot look up message ids") as caught:
        await raw_store.seen("web", "m-1")
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    with pytest.raises(StoreError, match="cannot load conversation"):
        await raw_store.load_for_turn(key(), "m-1")
    assert await raw_store.load_for_turn(key(), None) == (state, False)
    with pytest.raises(StoreError, match="cannot commit turn") as caught:
        await raw_store.commit_turn(
            TurnWrite(state, expected_version=1, messages=[outbound(state.id, 1, "x")])
        )
    assert type(caught.value) is StoreError
    assert await raw_store.load(key()) == state  # the UPDATE before it was rolled back


async def test_cancelled_call_does_not_stop_the_worker(raw_store: SQLStore) -> None:
    await raw_store.commit_turn(TurnWrite(new_state(), expected_version=0))
    task = asyncio.ensure_future(raw_store.load(key()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await raw_store.load(key()) is not None


async def test_store_can_be_used_again_after_close(tmp_path: Path) -> None:
    store = SQLStore(f"sqlite:///{tmp_path / 'again.db'}")
    await store.open()
    state = new_state()
    await store.commit_turn(TurnWrite(state, expected_version=0))
    await store.close()
    await store.close()
    try:
        assert await store.load_for_turn(key(), None) == (state, False)
    finally:
        await store.close()


class _Minimal(Store):
    """Only the abstract methods, on a MemoryStore, counting the calls."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.calls: list[str] = []

    async def load(self, key: ConversationKey) -> ConversationState | None:
        self.calls.append("load")
        return await self.inner.load(key)

    async def load_by_id(self, conversation_id: str) -> ConversationState | None:
        return await self.inner.load_by_id(conversation_id)

    async def seen(self, channel: str, channel_message_id: str) -> bool:
        self.calls.append(f"seen {channel} {channel_message_id}")
        return await self.inner.seen(channel, channel_message_id)

    async def commit_turn(self, write: TurnWrite) -> None:
        await self.inner.commit_turn(write)

    async def messages(
        self, conversation_id: str, *, after_seq: int = 0, limit: int | None = None
    ) -> list[MessageRecord]:
        return await self.inner.messages(conversation_id, after_seq=after_seq, limit=limit)

    async def entity_history(self, conversation_id: str, name: str | None = None) -> list[Any]:
        return await self.inner.entity_history(conversation_id, name)

    async def conversations(self, *, owner: Any = None, limit: int = 100) -> list[Any]:
        return await self.inner.conversations(owner=owner, limit=limit)


async def test_default_load_for_turn_calls_seen_then_load() -> None:
    store = _Minimal()
    state = new_state()
    await store.commit_turn(
        TurnWrite(state, expected_version=0, messages=[inbound(state.id, 1, "hi", "m-1")])
    )
    assert await store.load_for_turn(key(), "m-1") == (state, True)
    assert store.calls == ["seen web m-1", "load"]
    store.calls.clear()
    assert await store.load_for_turn(key(channel="tg"), None) == (None, False)
    assert store.calls == ["load"]


async def test_calls_while_the_store_closes_are_refused_not_run_on_a_second_worker(
        tmp_path: Path) -> None:
    store = SQLStore(f"sqlite:///{tmp_path / 'closing.db'}")
    await store.open()
    await store.commit_turn(TurnWrite(new_state(), expected_version=0))
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)  # close() has started and handed the close job to the worker
    with pytest.raises(StoreError, match="closing"):
        await store.load_for_turn(key(), None)
    await closing
    assert (await store.load_for_turn(key(), None))[0] is not None  # usable again after
    await store.close()
