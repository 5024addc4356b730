"""Every :class:`Store` backend behaves the same: run against memory, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import decimal
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.errors import ConfigError, DuplicateMessageError, StoreError, VersionConflictError
from engine.store import (
    ConversationKey,
    ConversationState,
    EntityChange,
    MemoryStore,
    MessageRecord,
    Store,
    TurnWrite,
    open_store,
)
from engine.store._codec import dumps
from engine.store.sql import SQLStore, database_url

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def key(thread: str = "t1", channel: str = "web") -> ConversationKey:
    return ConversationKey(channel=channel, account="acme", thread=thread)


def new_state(thread: str = "t1", *, cid: str | None = None, **changes: Any) -> ConversationState:
    state = ConversationState(
        id=cid or f"conv-{thread}",
        key=key(thread),
        created_at=T0,
        updated_at=T0,
        flow="returns",
        state="start",
    )
    return dataclasses.replace(state, **changes)


def inbound(
    cid: str, seq: int, text: str, channel_id: str | None, *, channel: str = "web"
) -> MessageRecord:
    return MessageRecord(
        conversation_id=cid,
        seq=seq,
        direction="in",
        kind="text",
        author="customer",
        text=text,
        created_at=at(seq),
        channel=channel,
        channel_message_id=channel_id,
    )


def outbound(cid: str, seq: int, text: str, **data: Any) -> MessageRecord:
    return MessageRecord(
        conversation_id=cid,
        seq=seq,
        direction="out",
        kind="text",
        author="bot",
        text=text,
        created_at=at(seq),
        data=data,
        channel="web",
    )


def change(cid: str, name: str, value: Any, previous: Any = None, turn: int = 1) -> EntityChange:
    return EntityChange(
        conversation_id=cid,
        name=name,
        value=value,
        previous=previous,
        turn=turn,
        source="customer",
        created_at=at(turn),
    )


async def create(store: Store, state: ConversationState, *messages: MessageRecord) -> None:
    await store.commit_turn(TurnWrite(state, expected_version=0, messages=messages))


def realistic_state() -> ConversationState:
    """A returns conversation after six turns: six entities, two action results."""

    def entity(value: Any, turn: int, source: str = "customer") -> dict[str, Any]:
        return {"v": value, "t": turn, "s": source}

    return new_state(
        "realistic",
        state="confirm_refund",
        entities={
            "order_id": entity("A-10023481", 2),
            "email": entity("li.wei@example.com", 2),
            "name": entity("李伟", 1, "model"),
            "issue": entity("damaged_item", 3, "model"),
            "delivery_date": entity("2024-04-28", 3),
            "refund_amount": entity("49.90", 5, "action"),
        },
        results={
            "order": {
                "id": "A-10023481",
                "status": "delivered",
                "total": "49.90",
                "currency": "EUR",
                "delivered_at": "2024-04-28T14:03:00Z",
                "items": [{"sku": "MUG-01", "name": "Ceramic mug", "qty": 2, "price": "24.95"}],
            },
            "refund": {"ok": True, "refund_id": "RF-88213", "amount": "49.90", "eta_days": 5},
        },
        counters={"turn": 6, "attempts.order_id": 1, "attempts.email": 0, "bot_streak": 2},
        language="zh",
        summary="Damaged mug in order A-10023481; refund RF-88213 of 49.90 EUR issued.",
        seq=14,
        waiting_since=None,
        updated_at=at(300),
    )


async def stored_row_bytes(store: Store, conversation_id: str) -> int:
    """Bytes the backend stores for one conversation row (payload, without index entries)."""
    if isinstance(store, MemoryStore):
        state = await store.load_by_id(conversation_id)
        assert state is not None
        texts = [
            state.id,
            *dataclasses.astuple(state.key),
            state.flow or "",
            state.state or "",
            dumps(state.entities),
            dumps(state.results),
            dumps(state.counters),
            state.language,
            state.owner,
            state.summary,
        ]
        return sum(len(t.encode()) for t in texts) + 4 * 8 + 3 * 8  # ints, datetimes
    assert isinstance(store, SQLStore)

    def measure(conn: sa.Connection) -> int:
        if conn.dialect.name == "postgresql":
            query = "SELECT pg_column_size(c.*) FROM conversation c WHERE id = :id"
        else:
            info = conn.exec_driver_sql("PRAGMA table_info(conversation)")
            sizes = [f"coalesce(length(CAST({name} AS BLOB)), 0)" for name in info.scalars(1)]
            query = f"SELECT {' + '.join(sizes)} FROM conversation WHERE id = :id"
        return int(conn.execute(sa.text(query), {"id": conversation_id}).scalar_one())

    return await store.run_sync(measure)


class TestStoreConformance:
    async def test_first_commit_creates_and_loads_by_key_and_id(self, store: Store) -> None:
        state = new_state(entities={"email": {"v": "a@b.c", "t": 1, "s": "customer"}})
        write = TurnWrite(state, expected_version=0)
        await store.commit_turn(write)
        assert state.version == 1

        by_key = await store.load(key())
        by_id = await store.load_by_id(state.id)
        assert by_key == state
        assert by_id == state
        assert await store.load(key("other")) is None
        assert await store.load_by_id("nope") is None

    async def test_open_is_idempotent(self, store: Store) -> None:
        await create(store, new_state())
        await store.open()
        assert await store.load(key()) is not None

    async def test_update_bumps_version_and_keeps_key_and_created_at(self, store: Store) -> None:
        await create(store, new_state())
        state = await store.load(key())
        assert state is not None
        state.state = "ask_order"
        state.entities["order_id"] = {"v": "A-1", "t": 2, "s": "customer"}
        state.results["lookup"] = {"found": True}
        state.counters["turn"] = 2
        state.owner = "pending_human"
        state.handoff_reason = "asked_for_human"
        state.waiting_since = at(60)
        state.summary = "wants a refund"
        state.seq = 4
        state.closed = True
        state.language = "de"
        state.owner_agent = "alice"
        state.updated_at = at(60)
        await store.commit_turn(TurnWrite(state, expected_version=1))
        assert state.version == 2

        loaded = await store.load(key())
        assert loaded == state
        assert loaded.version == 2
        assert loaded.created_at == T0
        assert loaded.key == key()

    async def test_stale_expected_version_conflicts(self, store: Store) -> None:
        await create(store, new_state())
        first = await store.load(key())
        stale = await store.load(key())
        assert first is not None and stale is not None
        first.state = "winner"
        await store.commit_turn(TurnWrite(first, expected_version=1))

        stale.state = "loser"
        with pytest.raises(VersionConflictError) as caught:
            await store.commit_turn(
                TurnWrite(stale, expected_version=1, messages=[outbound(stale.id, 1, "x")])
            )
        assert caught.value.conversation_id == stale.id
        assert caught.value.expected == 1
        assert stale.version == 1  # unchanged on failure
        loaded = await store.load(key())
        assert loaded is not None
        assert (loaded.state, loaded.version) == ("winner", 2)
        assert await store.messages(stale.id) == []

    async def test_expected_version_of_missing_conversation_conflicts(self, store: Store) -> None:
        with pytest.raises(VersionConflictError):
            await store.commit_turn(TurnWrite(new_state(), expected_version=3))
        assert await store.load(key()) is None

    async def test_creating_the_same_key_twice_conflicts(self, store: Store) -> None:
        await create(store, new_state(cid="first"))
        with pytest.raises(VersionConflictError):
            await create(store, new_state(cid="second"), inbound("second", 1, "hi", "m-1"))
        with pytest.raises(VersionConflictError):
            await create(store, new_state(cid="first"))
        loaded = await store.load(key())
        assert loaded is not None and loaded.id == "first"
        assert await store.load_by_id("second") is None
        assert not await store.seen("web", "m-1")

    async def test_same_id_under_another_key_conflicts(self, store: Store) -> None:
        await create(store, new_state("t1", cid="same"))
        with pytest.raises(VersionConflictError):
            await create(store, new_state("t2", cid="same"))
        assert await store.load(key("t2")) is None

    async def test_duplicate_inbound_message_writes_nothing(self, store: Store) -> None:
        state = new_state()
        cid = state.id
        await store.commit_turn(
            TurnWrite(
                state,
                expected_version=0,
                messages=[inbound(cid, 1, "hello", "m-1"), outbound(cid, 2, "hi!")],
                entity_changes=[change(cid, "name", "Ann")],
            )
        )
        before = await store.load(key())
        assert before is not None

        changed = dataclasses.replace(before, state="next", seq=4, summary="changed")
        with pytest.raises(DuplicateMessageError) as caught:
            await store.commit_turn(
                TurnWrite(
                    changed,
                    expected_version=1,
                    messages=[
                        inbound(cid, 3, "new one", "m-2"),
                        inbound(cid, 4, "hello again", "m-1"),
                    ],
                    entity_changes=[change(cid, "name", "Bob", "Ann", turn=2)],
                )
            )
        assert (caught.value.channel, caught.value.channel_message_id) == ("web", "m-1")
        assert isinstance(caught.value, StoreError)
        assert changed.version == 1

        assert await store.load(key()) == before
        assert [m.seq for m in await store.messages(cid)] == [1, 2]
        assert [c.value for c in await store.entity_history(cid)] == ["Ann"]
        assert not await store.seen("web", "m-2")

    async def test_duplicate_within_one_turn_writes_nothing(self, store: Store) -> None:
        state = new_state()
        with pytest.raises(DuplicateMessageError):
            await store.commit_turn(
                TurnWrite(
                    state,
                    expected_version=0,
                    messages=[inbound(state.id, 1, "a", "m-9"), inbound(state.id, 2, "a", "m-9")],
                )
            )
        assert await store.load(key()) is None
        assert not await store.seen("web", "m-9")

    async def test_duplicate_on_first_turn_of_another_conversation(self, store: Store) -> None:
        await create(store, new_state("t1"), inbound("conv-t1", 1, "hi", "m-1"))
        other = new_state("t2")
        with pytest.raises(DuplicateMessageError):
            await create(store, other, inbound(other.id, 1, "hi", "m-1"))
        assert await store.load(key("t2")) is None
        assert await store.load_by_id(other.id) is None

    async def test_seen(self, store: Store) -> None:
        state = new_state()
        assert not await store.seen("web", "m-1")
        await create(
            store,
            state,
            inbound(state.id, 1, "hi", "m-1"),
            outbound(state.id, 2, "hello"),
            outbound(state.id, 3, "anything else?"),  # many NULL channel ids are fine
        )
        assert await store.seen("web", "m-1")
        assert not await store.seen("web", "m-2")
        assert not await store.seen("telegram", "m-1")

    async def test_load_for_turn(self, store: Store) -> None:
        state = new_state()
        assert await store.load_for_turn(key(), "m-1") == (None, False)
        assert await store.load_for_turn(key(), None) == (None, False)
        await store.commit_turn(
            TurnWrite(
                state,
                expected_version=0,
                messages=[inbound(state.id, 1, "hi", "m-1"), outbound(state.id, 2, "hello")],
                entity_changes=[change(state.id, "name", "Ann")],
            )
        )

        conv, seen = await store.load_for_turn(key(), "m-1")
        assert seen is True
        assert conv == state and conv == await store.load(key())
        assert conv is not state and conv.version == 1
        assert await store.load_for_turn(key(), "m-2") == (state, False)
        assert await store.load_for_turn(key(), None) == (state, False)
        # Seen is per channel: the key's channel, whatever conversation stored the id.
        tg_key = key(channel="telegram")
        assert await store.load_for_turn(tg_key, "m-1") == (None, False)
        assert await store.load_for_turn(key("t2"), "m-1") == (None, True)
        assert await store.load_for_turn(key("t2"), "m-2") == (None, False)

    async def test_load_for_turn_after_later_turns_and_refused_ones(self, store: Store) -> None:
        state = new_state()
        cid = state.id
        await create(store, state, inbound(cid, 1, "hi", "m-1"))
        await store.commit_turn(
            TurnWrite(
                dataclasses.replace(state, state="second", seq=3),
                expected_version=1,
                messages=[inbound(cid, 2, "again", "m-2"), outbound(cid, 3, "ok")],
            )
        )
        conv, seen = await store.load_for_turn(key(), "m-2")
        assert seen and conv is not None
        assert (conv.state, conv.seq, conv.version) == ("second", 3, 2)
        with pytest.raises(VersionConflictError):
            await store.commit_turn(
                TurnWrite(state, expected_version=1, messages=[inbound(cid, 4, "x", "m-3")])
            )
        assert await store.load_for_turn(key(), "m-3") == (conv, False)

    async def test_reused_seq_is_refused_and_writes_nothing(self, store: Store) -> None:
        state = new_state()
        cid = state.id
        await create(store, state, inbound(cid, 1, "hi", "m-1"), outbound(cid, 2, "hello"))
        before = await store.load(key())
        assert before is not None
        with pytest.raises(StoreError) as caught:
            await store.commit_turn(
                TurnWrite(
                    dataclasses.replace(before, state="next"),
                    expected_version=1,
                    messages=[inbound(cid, 3, "new", "m-2"), outbound(cid, 2, "reused seq")],
                    entity_changes=[change(cid, "name", "Ann", turn=2)],
                )
            )
        assert type(caught.value) is StoreError
        assert await store.load(key()) == before
        assert [m.text for m in await store.messages(cid)] == ["hi", "hello"]
        assert await store.entity_history(cid) == []
        assert await store.load_for_turn(key(), "m-2") == (before, False)

    async def test_same_channel_message_id_on_another_channel_is_not_a_duplicate(
        self, store: Store
    ) -> None:
        await create(store, new_state("t1"), inbound("conv-t1", 1, "hi", "42"))
        tg = new_state("t2")
        await create(store, tg, inbound(tg.id, 1, "hi", "42", channel="telegram"))
        assert await store.seen("telegram", "42")
        assert await store.seen("web", "42")

    async def test_messages_after_seq_and_limit(self, store: Store) -> None:
        state = new_state()
        cid = state.id
        await create(store, state, inbound(cid, 1, "one", "m-1"), outbound(cid, 2, "two"))
        await store.commit_turn(
            TurnWrite(
                state,
                expected_version=1,
                messages=[inbound(cid, 3, "three", "m-3"), outbound(cid, 4, "four", n=4)],
            )
        )
        await create(store, new_state("t2"), inbound("conv-t2", 1, "elsewhere", "x-1"))

        every = await store.messages(cid)
        assert [m.seq for m in every] == [1, 2, 3, 4]
        assert [m.text for m in every] == ["one", "two", "three", "four"]
        assert every[0] == inbound(cid, 1, "one", "m-1")
        assert every[3] == outbound(cid, 4, "four", n=4)
        assert [m.seq for m in await store.messages(cid, after_seq=2)] == [3, 4]
        assert [m.seq for m in await store.messages(cid, limit=3)] == [1, 2, 3]
        assert [m.seq for m in await store.messages(cid, after_seq=1, limit=2)] == [2, 3]
        assert await store.messages(cid, after_seq=4) == []
        assert await store.messages(cid, limit=0) == []
        assert await store.messages("unknown") == []

    async def test_entity_history_order_and_filter(self, store: Store) -> None:
        state = new_state()
        cid = state.id
        await store.commit_turn(
            TurnWrite(
                state,
                expected_version=0,
                entity_changes=[change(cid, "email", "a@x.io"), change(cid, "name", "Ann")],
            )
        )
        await store.commit_turn(
            TurnWrite(
                state,
                expected_version=1,
                entity_changes=[
                    change(cid, "email", "b@x.io", "a@x.io", turn=2),
                    change(cid, "email", None, "b@x.io", turn=2),
                ],
            )
        )
        history = await store.entity_history(cid)
        assert [(c.name, c.value, c.previous, c.turn) for c in history] == [
            ("email", "a@x.io", None, 1),
            ("name", "Ann", None, 1),
            ("email", "b@x.io", "a@x.io", 2),
            ("email", None, "b@x.io", 2),
        ]
        assert history[0] == change(cid, "email", "a@x.io")
        emails = await store.entity_history(cid, "email")
        assert [c.value for c in emails] == ["a@x.io", "b@x.io", None]
        assert await store.entity_history(cid, "phone") == []
        assert await store.entity_history("unknown") == []

    async def test_json_round_trip(self, store: Store) -> None:
        nested: dict[str, Any] = {
            "地址": {"城市": "上海", "行": ["南京路 1 号", "3 楼"]},
            "emoji": "🙂",
            "n": [1, 2.5, -3, True, False, None, {"deep": [[{}], []]}],
            'quote"and\\slash': "line\nbreak\ttab",
        }
        state = new_state(
            entities={
                "name": {"v": "王小明", "t": 1, "s": "customer"},
                "address": {"v": nested, "t": 2, "s": "model"},
                "count": {"v": 42, "t": 2, "s": "customer"},
                "numeric_text": {"v": "42", "t": 2, "s": "customer"},
                "nothing": {"v": None, "t": 2, "s": "customer"},
            },
            results={"lookup": nested, "empty": {}, "list": [], "flag": False, "price": "12.50"},
            counters={"turn": 3, "attempts.address": 2},
            summary="客户想退货 — 已确认",
        )
        cid = state.id
        await store.commit_turn(
            TurnWrite(
                state,
                expected_version=0,
                messages=[
                    inbound(cid, 1, "你好，我想退货", "m-1"),
                    outbound(cid, 2, "好的 🙂", buttons=["是", "否"], meta=nested),
                ],
                entity_changes=[
                    change(cid, "address", nested),
                    change(cid, "count", 42, "41"),
                    change(cid, "numeric_text", "42", 1.5),
                    change(cid, "flag", False, True),
                ],
            )
        )
        loaded = await store.load(key())
        assert loaded == state
        assert loaded.entities["count"]["v"] == 42
        assert loaded.entities["numeric_text"]["v"] == "42"
        messages = await store.messages(cid)
        assert messages[0].text == "你好，我想退货"
        assert messages[1].data == {"buttons": ["是", "否"], "meta": nested}
        history = await store.entity_history(cid)
        assert [(c.value, c.previous) for c in history] == [
            (nested, None),
            (42, "41"),
            ("42", 1.5),
            (False, True),
        ]

    async def test_stored_data_cannot_be_changed_through_objects(self, store: Store) -> None:
        state = new_state(entities={"name": {"v": {"first": "Ann"}, "t": 1, "s": "customer"}})
        message = outbound(state.id, 1, "hi", options=["a"])
        await create(store, state, message)
        state.entities["name"]["v"]["first"] = "Mallory"
        message.data["options"].append("b")

        loaded = await store.load(key())
        assert loaded is not None
        assert loaded.entities["name"]["v"] == {"first": "Ann"}
        loaded.entities["name"]["v"]["first"] = "Eve"
        loaded.results["x"] = 1
        again = await store.load(key())
        assert again is not None
        assert again.entities["name"]["v"] == {"first": "Ann"}
        assert again.results == {}
        (stored,) = await store.messages(state.id)
        assert stored.data == {"options": ["a"]}
        stored.data["options"].append("c")
        assert (await store.messages(state.id))[0].data == {"options": ["a"]}

    async def test_aware_datetimes_round_trip_as_utc(self, store: Store) -> None:
        shanghai = timezone(timedelta(hours=8))
        local = datetime(2024, 5, 1, 20, 0, 0, 654321, tzinfo=shanghai)
        state = new_state(created_at=local, updated_at=local, waiting_since=local)
        message = dataclasses.replace(inbound(state.id, 1, "hi", "m-1"), created_at=local)
        entity = dataclasses.replace(change(state.id, "x", 1), created_at=local)
        await store.commit_turn(
            TurnWrite(state, expected_version=0, messages=[message], entity_changes=[entity])
        )
        loaded = await store.load(key())
        assert loaded is not None
        for value in (loaded.created_at, loaded.updated_at, loaded.waiting_since):
            assert value == local
            assert value is not None and value.utcoffset() == timedelta(0)
            assert value == datetime(2024, 5, 1, 12, 0, 0, 654321, tzinfo=UTC)
        (stored,) = await store.messages(state.id)
        assert stored.created_at == local and stored.created_at.utcoffset() == timedelta(0)
        (history,) = await store.entity_history(state.id)
        assert history.created_at == local and history.created_at.utcoffset() == timedelta(0)

    async def test_naive_datetime_is_refused(self, store: Store) -> None:
        state = new_state()
        message = dataclasses.replace(
            inbound(state.id, 1, "hi", "m-1"), created_at=datetime(2024, 5, 1, 12, 0)
        )
        with pytest.raises(StoreError, match=r"messages\[0\]\.created_at.*naive"):
            await create(store, state, message)
        assert await store.load(key()) is None
        assert not await store.seen("web", "m-1")

    @pytest.mark.parametrize(
        ("where", "bad", "field"),
        [
            ("results", decimal.Decimal("1.10"), r"conversation\.results\['refund'\]"),
            ("entities", {"v": {1, 2}, "t": 1}, r"conversation\.entities\['refund'\]"),
            ("message", object(), r"messages\[1\]\.data"),
            ("change", math.nan, r"entity_changes\[0\] \(refund\)\.value"),
        ],
    )
    async def test_non_json_values_are_refused_naming_the_field(
        self, store: Store, where: str, bad: Any, field: str
    ) -> None:
        state = new_state()
        await create(store, state)
        before = await store.load(key())
        messages = [inbound(state.id, 1, "hi", "m-1"), outbound(state.id, 2, "ok")]
        changes = [change(state.id, "refund", "1.10")]
        if where == "results":
            state.results["refund"] = bad
        elif where == "entities":
            state.entities["refund"] = bad
        elif where == "message":
            messages[1] = outbound(state.id, 2, "ok", payload=bad)
        else:
            changes[0] = change(state.id, "refund", bad)
        with pytest.raises(StoreError, match=field) as caught:
            await store.commit_turn(
                TurnWrite(state, expected_version=1, messages=messages, entity_changes=changes)
            )
        assert type(caught.value) is StoreError
        assert await store.load(key()) == before
        assert await store.messages(state.id) == []
        assert await store.entity_history(state.id) == []
        assert not await store.seen("web", "m-1")

    async def test_conversations_by_owner_oldest_waiting_first(self, store: Store) -> None:
        specs = [
            ("a", "pending_human", at(30), at(100)),
            ("b", "pending_human", at(10), at(200)),
            ("c", "pending_human", None, at(50)),
            ("d", "bot", None, at(5)),
            ("e", "pending_human", None, at(40)),
            ("f", "human", at(1), at(1)),
        ]
        for thread, owner, waiting, updated in specs:
            await create(
                store, new_state(thread, owner=owner, waiting_since=waiting, updated_at=updated)
            )
        pending = await store.conversations(owner="pending_human")
        assert [c.key.thread for c in pending] == ["b", "a", "e", "c"]
        assert all(isinstance(c, ConversationState) and c.version == 1 for c in pending)
        first_two = await store.conversations(owner="pending_human", limit=2)
        assert [c.key.thread for c in first_two] == ["b", "a"]
        everyone = await store.conversations()
        assert [c.key.thread for c in everyone] == ["f", "b", "a", "d", "e", "c"]
        assert await store.conversations(owner="resolved") == []

    async def test_concurrent_turns_on_same_version_one_wins(self, store: Store) -> None:
        await create(store, new_state())
        first = await store.load(key())
        second = await store.load(key())
        assert first is not None and second is not None
        first.state, second.state = "by-first", "by-second"

        async def turn(state: ConversationState, text: str) -> None:
            await store.commit_turn(
                TurnWrite(
                    state,
                    expected_version=1,
                    messages=[outbound(state.id, 1, text)],
                    entity_changes=[change(state.id, "who", text, turn=2)],
                )
            )

        outcomes = await asyncio.gather(
            turn(first, "first"), turn(second, "second"), return_exceptions=True
        )
        assert sorted(type(o).__name__ for o in outcomes) == ["NoneType", "VersionConflictError"]
        winner = first if outcomes[0] is None else second
        loaded = await store.load(key())
        assert loaded is not None
        assert (loaded.state, loaded.version) == (winner.state, 2)
        assert len(await store.messages(winner.id)) == 1
        assert len(await store.entity_history(winner.id)) == 1

    async def test_concurrent_creation_of_same_key_one_wins(self, store: Store) -> None:
        outcomes = await asyncio.gather(
            create(store, new_state(cid="x-1")),
            create(store, new_state(cid="x-2")),
            return_exceptions=True,
        )
        assert sorted(type(o).__name__ for o in outcomes) == ["NoneType", "VersionConflictError"]
        loaded = await store.load(key())
        assert loaded is not None
        assert loaded.id == ("x-1" if outcomes[0] is None else "x-2")

    async def test_realistic_state_row_is_under_1_5_kb(self, store: Store) -> None:
        state = realistic_state()
        await create(store, state)
        assert await store.load(state.key) == state
        size = await stored_row_bytes(store, state.id)
        assert size < 1536, f"a realistic conversation row takes {size} bytes"


class TestAiosqliteConformance(TestStoreConformance):
    """The same contract with SQLite on SQLAlchemy's async engine (``sqlite+aiosqlite://``)."""

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[Store]:
        opened = SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'helpline.db'}")
        await opened.open()
        try:
            yield opened
        finally:
            await opened.close()


async def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    for url in (f"sqlite:///{tmp_path / 'a.db'}", "postgresql://u@h/db", "postgres://u@h/db"):
        store = open_store(url)
        assert isinstance(store, SQLStore)
        await store.close()
    with pytest.raises(ConfigError, match="unknown store URL"):
        open_store("mysql://u@h/db")
    with pytest.raises(ConfigError):
        open_store("helpline.db")


def test_database_url_rewrites_drivers_and_search_path() -> None:
    url, args = database_url("sqlite:///var/helpline.db")
    assert (url.drivername, args) == ("sqlite+pysqlite", {})
    url, args = database_url("sqlite+aiosqlite:///var/helpline.db")
    assert url.drivername == "sqlite+aiosqlite"
    url, args = database_url("postgres://bob:secret@db:5433/helpline?search_path=t_1")
    assert url.drivername == "postgresql+asyncpg"
    assert (url.host, url.port, url.database, url.password) == ("db", 5433, "helpline", "secret")
    assert dict(url.query) == {}
    assert args == {"server_settings": {"search_path": "t_1"}}


async def test_sqlite_file_uses_wal(tmp_path: Path) -> None:
    store = SQLStore(f"sqlite:///{tmp_path / 'wal.db'}")
    await store.open()
    try:

        def pragmas(conn: sa.Connection) -> tuple[Any, ...]:
            return tuple(
                conn.exec_driver_sql(f"PRAGMA {name}").scalar_one()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            )

        assert await store.run_sync(pragmas) == ("wal", 1, 5000, 1)
    finally:
        await store.close()
