"""Conversation storage: the :class:`Store` interface and its backends.

``open_store(url)`` picks the backend from a URL: ``memory://`` for
:class:`MemoryStore`; ``sqlite:///path.db`` or ``postgresql://...`` (with or
without an async driver name) for :class:`SQLStore`.
"""

from __future__ import annotations

from engine.errors import ConfigError
from engine.store.base import (
    ConversationKey,
    ConversationState,
    Direction,
    EntityChange,
    MessageRecord,
    Owner,
    Store,
    TurnWrite,
)
from engine.store.memory import MemoryStore

__all__ = [
    "ConversationKey",
    "ConversationState",
    "Direction",
    "EntityChange",
    "MemoryStore",
    "MessageRecord",
    "Owner",
    "Store",
    "TurnWrite",
    "open_store",
]

_SQL_SCHEMES = ("sqlite", "postgresql", "postgres")


def open_store(url: str) -> Store:
    """A store for ``url``, not opened yet: ``await store.open()`` before use.

    ``memory://`` gives a :class:`MemoryStore`. ``sqlite:///var/helpline.db``,
    ``sqlite+aiosqlite:///...``, ``postgresql://user@host/db`` (also
    ``postgres://`` and ``postgresql+asyncpg://``) give an
    :class:`~engine.store.sql.SQLStore`.

    Raises:
        ConfigError: the URL names no known backend.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory":
        return MemoryStore()
    if scheme.partition("+")[0] in _SQL_SCHEMES:
        from engine.store.sql import SQLStore  # imported lazily: SQLAlchemy is heavy

        return SQLStore(url)
    raise ConfigError(
        f"unknown store URL {url!r}: use memory://, sqlite:///path/to/helpline.db "
        "or postgresql://user@host:5432/dbname"
    )
