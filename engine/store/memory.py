"""In-process :class:`Store` for tests, demos and the in-memory benchmark.

Semantics match the SQL store: optimistic versions, duplicate detection on
``(channel, channel_message_id)``, all-or-nothing turns, strict JSON and UTC
datetimes. Stored data is kept as compact JSON text, so callers can never
mutate it through an object they passed in or got back, and a value the SQL
store would refuse is refused here too.

Not thread-safe: use it from one event loop. A turn is applied without
awaiting, so concurrent tasks on that loop see it whole or not at all.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.errors import DuplicateMessageError, StoreError, VersionConflictError
from engine.store._codec import dumps, find_json_problem, json_problem_error, loads, utc
from engine.store.base import (
    ConversationKey,
    ConversationState,
    EntityChange,
    MessageRecord,
    Owner,
    Store,
    TurnWrite,
)

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Conversation:
    """A stored conversation: scalars as given, nested values as JSON text."""

    id: str
    key: ConversationKey
    created_at: datetime
    updated_at: datetime
    flow: str | None
    state: str | None
    entities: str
    results: str
    counters: str
    language: str
    owner: Owner
    owner_agent: str | None
    handoff_reason: str | None
    waiting_since: datetime | None
    summary: str
    seq: int
    version: int
    closed: bool

    def to_state(self) -> ConversationState:
        return ConversationState(
            id=self.id,
            key=self.key,
            created_at=self.created_at,
            updated_at=self.updated_at,
            flow=self.flow,
            state=self.state,
            entities=loads(self.entities),
            results=loads(self.results),
            counters=loads(self.counters),
            language=self.language,
            owner=self.owner,
            owner_agent=self.owner_agent,
            handoff_reason=self.handoff_reason,
            waiting_since=self.waiting_since,
            summary=self.summary,
            seq=self.seq,
            version=self.version,
            closed=self.closed,
        )


@dataclass(slots=True)
class _Message:
    seq: int
    record: MessageRecord  # ``data`` replaced by {}; the real data is in ``data``
    data: str


@dataclass(slots=True)
class _Change:
    record: EntityChange  # ``value``/``previous`` are None; the real ones are below
    value: str
    previous: str


_EMPTY_DATA = "{}"


class MemoryStore(Store):
    """Keeps everything in dicts; lost when the process ends."""

    def __init__(self) -> None:
        self._by_id: dict[str, _Conversation] = {}
        self._by_key: dict[ConversationKey, str] = {}
        self._messages: dict[str, list[_Message]] = {}
        self._seqs: dict[str, set[int]] = {}
        self._seen: set[tuple[str, str]] = set()
        self._changes: dict[str, list[_Change]] = {}

    async def load(self, key: ConversationKey) -> ConversationState | None:
        conversation_id = self._by_key.get(key)
        if conversation_id is None:
            return None
        return self._by_id[conversation_id].to_state()

    async def load_by_id(self, conversation_id: str) -> ConversationState | None:
        stored = self._by_id.get(conversation_id)
        return None if stored is None else stored.to_state()

    async def seen(self, channel: str, channel_message_id: str) -> bool:
        return (channel, channel_message_id) in self._seen

    async def load_for_turn(
        self, key: ConversationKey, channel_message_id: str | None
    ) -> tuple[ConversationState | None, bool]:
        seen = channel_message_id is not None and (key.channel, channel_message_id) in self._seen
        conversation_id = self._by_key.get(key)
        if conversation_id is None:
            return None, seen
        return self._by_id[conversation_id].to_state(), seen

    async def commit_turn(self, write: TurnWrite) -> None:
        conv = write.conversation
        expected = write.expected_version
        cid = conv.id

        # 1. Every check first: nothing is written unless the whole turn fits.
        existing = self._by_id.get(cid)
        if expected == 0:
            if existing is not None or conv.key in self._by_key:
                raise VersionConflictError(cid, expected)
        elif existing is None or existing.version != expected:
            raise VersionConflictError(cid, expected)

        seqs = self._seqs.get(cid)
        turn_ids: set[tuple[str, str]] = set()
        turn_seqs: set[int] = set()
        for message in write.messages:
            if message.conversation_id != cid:
                raise StoreError(
                    f"message seq {message.seq} belongs to conversation "
                    f"{message.conversation_id!r}, not to {cid!r} whose turn is committed"
                )
            if message.channel_message_id is not None:
                ident = (message.channel, message.channel_message_id)
                if ident in self._seen or ident in turn_ids:
                    raise DuplicateMessageError(message.channel, message.channel_message_id)
                turn_ids.add(ident)
            if message.seq in turn_seqs or (seqs is not None and message.seq in seqs):
                raise StoreError(
                    f"conversation {cid!r}: message seq {message.seq} is already used"
                )
            turn_seqs.add(message.seq)
        for change in write.entity_changes:
            if change.conversation_id != cid:
                raise StoreError(
                    f"entity change {change.name!r} belongs to conversation "
                    f"{change.conversation_id!r}, not to {cid!r} whose turn is committed"
                )

        # 2. Encode (validates JSON and datetimes) before touching stored data.
        try:
            # As in SQL, an update never changes the key or created_at.
            stored = _Conversation(
                id=cid,
                key=conv.key if existing is None else existing.key,
                created_at=(
                    utc(conv.created_at, "conversation.created_at")
                    if existing is None
                    else existing.created_at
                ),
                updated_at=utc(conv.updated_at, "conversation.updated_at"),
                flow=conv.flow,
                state=conv.state,
                entities=dumps(conv.entities),
                results=dumps(conv.results),
                counters=dumps(conv.counters),
                language=conv.language,
                owner=conv.owner,
                owner_agent=conv.owner_agent,
                handoff_reason=conv.handoff_reason,
                waiting_since=(
                    None
                    if conv.waiting_since is None
                    else utc(conv.waiting_since, "conversation.waiting_since")
                ),
                summary=conv.summary,
                seq=conv.seq,
                version=expected + 1,
                closed=conv.closed,
            )
            messages = [
                _Message(
                    m.seq,
                    MessageRecord(
                        conversation_id=cid,
                        seq=m.seq,
                        direction=m.direction,
                        kind=m.kind,
                        author=m.author,
                        text=m.text,
                        created_at=utc(m.created_at, f"messages[{i}].created_at"),
                        channel=m.channel,
                        channel_message_id=m.channel_message_id,
                    ),
                    dumps(m.data) if m.data else _EMPTY_DATA,
                )
                for i, m in enumerate(write.messages)
            ]
            changes = [
                _Change(
                    EntityChange(
                        conversation_id=cid,
                        name=c.name,
                        value=None,
                        previous=None,
                        turn=c.turn,
                        source=c.source,
                        created_at=utc(c.created_at, f"entity_changes[{i}].created_at"),
                    ),
                    dumps(c.value),
                    dumps(c.previous),
                )
                for i, c in enumerate(write.entity_changes)
            ]
        except (TypeError, ValueError) as error:
            problem = find_json_problem(write)
            if problem is None:  # pragma: no cover - the encoder failed on something else
                raise StoreError(f"conversation {cid!r}: cannot encode turn: {error}") from error
            raise json_problem_error(*problem) from error

        # 3. Apply; no await in between, so the turn is atomic for other tasks.
        self._by_id[cid] = stored
        if existing is None:
            self._by_key[conv.key] = cid
        if messages:
            log = self._messages.setdefault(cid, [])
            for entry in messages:
                if log and entry.seq < log[-1].seq:
                    bisect.insort(log, entry, key=_seq_of)
                else:
                    log.append(entry)
            self._seqs.setdefault(cid, set()).update(turn_seqs)
            self._seen.update(turn_ids)
        if changes:
            self._changes.setdefault(cid, []).extend(changes)
        conv.version = expected + 1

    async def messages(
        self, conversation_id: str, *, after_seq: int = 0, limit: int | None = None
    ) -> list[MessageRecord]:
        log = self._messages.get(conversation_id, [])
        start = bisect.bisect_right(log, after_seq, key=_seq_of)
        stop = len(log) if limit is None else min(len(log), start + max(limit, 0))
        return [_message_record(log[i]) for i in range(start, stop)]

    async def entity_history(
        self, conversation_id: str, name: str | None = None
    ) -> list[EntityChange]:
        return [
            _change_record(change)
            for change in self._changes.get(conversation_id, [])
            if name is None or change.record.name == name
        ]

    async def conversations(
        self, *, owner: Owner | None = None, limit: int = 100
    ) -> list[ConversationState]:
        rows = [c for c in self._by_id.values() if owner is None or c.owner == owner]
        rows.sort(key=_queue_order)
        return [row.to_state() for row in rows[: max(limit, 0)]]


def _seq_of(message: _Message) -> int:
    return message.seq


def _queue_order(row: _Conversation) -> tuple[bool, datetime, datetime, str]:
    waiting = row.waiting_since
    return (waiting is None, waiting or row.updated_at, row.updated_at, row.id)


def _message_record(message: _Message) -> MessageRecord:
    record = message.record
    data: dict[str, Any] = {} if message.data is _EMPTY_DATA else loads(message.data)
    return MessageRecord(
        conversation_id=record.conversation_id,
        seq=record.seq,
        direction=record.direction,
        kind=record.kind,
        author=record.author,
        text=record.text,
        created_at=record.created_at,
        data=data,
        channel=record.channel,
        channel_message_id=record.channel_message_id,
    )


def _change_record(change: _Change) -> EntityChange:
    record = change.record
    return EntityChange(
        conversation_id=record.conversation_id,
        name=record.name,
        value=loads(change.value),
        previous=loads(change.previous),
        turn=record.turn,
        source=record.source,
        created_at=record.created_at,
    )
