"""Storage records and the :class:`Store` interface every backend implements.

A turn is persisted with exactly one :meth:`Store.commit_turn` call: the
conversation row (optimistic version check), the messages the turn produced
and the entity changes, in one transaction. A new conversation is inserted by
its first turn (``expected_version == 0``), so creating one costs no extra commit.
What a turn reads first, the conversation and whether its inbound message was
already stored, comes from one :meth:`Store.load_for_turn` call.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

__all__ = [
    "ConversationKey",
    "ConversationState",
    "Direction",
    "EntityChange",
    "MessageRecord",
    "Owner",
    "Store",
    "TurnWrite",
]

Owner = Literal["bot", "pending_human", "human", "resolved"]
Direction = Literal["in", "out", "event"]


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Identifies a conversation on its channel; identity comes from the channel session.

    ``account`` is the bot, workspace or site; ``thread`` the chat, thread or web session.
    """

    channel: str
    account: str
    thread: str

    def __str__(self) -> str:
        return f"{self.channel}:{self.account}:{self.thread}"


@dataclass(slots=True)
class ConversationState:
    """Everything the engine needs to process the next turn of one conversation.

    ``entities`` maps an entity name to ``{"v": value, "t": turn, "s": source}``
    where source is ``customer``, ``model``, ``action`` or ``agent``; values are
    JSON-compatible. ``results`` holds action results by their ``save_as`` name.
    ``counters`` holds small integers (turn, per-entity attempts, streaks).
    """

    id: str
    key: ConversationKey
    created_at: datetime
    updated_at: datetime
    flow: str | None = None
    state: str | None = None
    entities: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    language: str = "en"
    owner: Owner = "bot"
    owner_agent: str | None = None
    handoff_reason: str | None = None
    waiting_since: datetime | None = None
    summary: str = ""
    seq: int = 0
    version: int = 0
    closed: bool = False


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One entry of the append-only message and event log.

    ``seq`` is per conversation and strictly increasing. ``channel_message_id``
    is the channel's own id of an inbound message, unique per channel, used to
    drop redeliveries. ``author`` is ``customer``, ``bot``, ``system`` or
    ``agent:<name>``. ``kind`` is ``text``, ``event``, ``note`` (agent-only) or
    ``rating``.
    """

    conversation_id: str
    seq: int
    direction: Direction
    kind: str
    author: str
    text: str
    created_at: datetime
    data: dict[str, Any] = field(default_factory=dict)
    channel: str = ""
    channel_message_id: str | None = None


@dataclass(frozen=True, slots=True)
class EntityChange:
    """One change of an entity value, with provenance (turn and source)."""

    conversation_id: str
    name: str
    value: Any
    previous: Any
    turn: int
    source: str
    created_at: datetime


@dataclass(slots=True)
class TurnWrite:
    """What one turn persists, atomically."""

    conversation: ConversationState
    expected_version: int
    messages: Sequence[MessageRecord] = ()
    entity_changes: Sequence[EntityChange] = ()


class Store(abc.ABC):
    """Conversation storage. Implementations: memory, SQL (SQLite, PostgreSQL)."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Create tables or connections. Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def load(self, key: ConversationKey) -> ConversationState | None:
        """The conversation stored under ``key``, or None."""

    @abc.abstractmethod
    async def load_by_id(self, conversation_id: str) -> ConversationState | None:
        """The conversation with this id, or None."""

    @abc.abstractmethod
    async def seen(self, channel: str, channel_message_id: str) -> bool:
        """Whether an inbound message with this channel id was already stored."""

    async def load_for_turn(
        self, key: ConversationKey, channel_message_id: str | None
    ) -> tuple[ConversationState | None, bool]:
        """The conversation under ``key`` and whether the inbound message was already stored.

        What a turn needs before it runs, in one call: ``(load(key), seen(key.channel,
        channel_message_id))``, the second ``False`` when ``channel_message_id`` is None.
        Backends answer both in one go (one thread hop or round trip); this default
        calls :meth:`seen` then :meth:`load`.
        """
        seen = channel_message_id is not None and await self.seen(key.channel, channel_message_id)
        return await self.load(key), seen

    @abc.abstractmethod
    async def commit_turn(self, write: TurnWrite) -> None:
        """Persist one turn atomically.

        Sets ``write.conversation.version`` to ``expected_version + 1`` on success.

        Raises:
            VersionConflictError: the stored version is not ``expected_version``
                (``0`` means the conversation must not exist yet).
            DuplicateMessageError: a message's ``(channel, channel_message_id)``
                was already stored; nothing of the turn is written.
        """

    @abc.abstractmethod
    async def messages(
        self, conversation_id: str, *, after_seq: int = 0, limit: int | None = None
    ) -> list[MessageRecord]:
        """Messages with ``seq > after_seq``, oldest first."""

    @abc.abstractmethod
    async def entity_history(
        self, conversation_id: str, name: str | None = None
    ) -> list[EntityChange]:
        """Entity changes in the order they happened, optionally for one entity."""

    @abc.abstractmethod
    async def conversations(
        self, *, owner: Owner | None = None, limit: int = 100
    ) -> list[ConversationState]:
        """Conversations, optionally by owner, oldest ``waiting_since``/``updated_at`` first."""
