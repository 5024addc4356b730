"""SQL :class:`Store` on SQLAlchemy: SQLite (pysqlite on a worker thread) or PostgreSQL (asyncpg).

The tables are sqlmodel classes (:class:`ConversationRow`, :class:`MessageRow`,
:class:`EntityHistoryRow`) so they can be used with sqlmodel sessions for
reporting; the store itself runs SQLAlchemy Core statements on their tables,
built once, to keep the per-turn cost low:

* ``load``: one SELECT.
* ``load_for_turn``: the SELECT of ``load`` and that of ``seen`` in one store
  call (on PostgreSQL one statement, so one round trip).
* ``commit_turn``: one transaction, one commit: one UPDATE (or INSERT for a new
  conversation), one executemany INSERT of the messages, one of the entity
  changes.
* ``seen``: one SELECT on the partial unique index of channel message ids.

On SQLite with pysqlite (the default driver) the per-turn statements (``load``,
``load_by_id``, ``seen``, ``load_for_turn``, ``commit_turn``) skip SQLAlchemy
altogether: they are fixed SQL texts, generated once from the tables, run on a
sqlite3 cursor of a connection the store's worker thread keeps checked out of
the engine's pool, with parameters encoded exactly as the column types above
encode them. SQLAlchemy Core costs about 4x a raw cursor per statement, which
on SQLite is most of a turn's storage cost. Everything else (reads of the log
and history, the queue, :meth:`SQLStore.run_sync`) uses SQLAlchemy Core. This
fast path is invisible to SQLAlchemy's ``before_cursor_execute`` and ``commit``
events; use :meth:`sqlite3.Connection.set_trace_callback` to watch it.

Storage formats:

* JSON columns hold compact JSON text (``separators=(",", ":")``, UTF-8 kept).
  On PostgreSQL the column type is ``json`` (text kept verbatim, smaller than
  ``jsonb``); on SQLite it is ``TEXT`` (a column declared ``JSON`` would get
  NUMERIC affinity and turn the document ``42`` into an integer).
* Datetimes are ``timestamptz`` on PostgreSQL; on SQLite UTC text without an
  offset. Both come back as timezone-aware UTC datetimes.

URLs: ``sqlite:///path.db`` runs pysqlite on the store's worker thread (see
:class:`SQLStore` for why not aiosqlite; ``sqlite+aiosqlite:///`` still works);
``postgresql://...`` and ``postgres://`` are rewritten to ``postgresql+asyncpg``.
A PostgreSQL URL may carry ``?search_path=schema`` (not an asyncpg option: the
store sends it as a server setting), which is how tests give each test its own
schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from engine.errors import ConfigError, DuplicateMessageError, StoreError, VersionConflictError
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

__all__ = [
    "STORE_TABLES",
    "ConversationRow",
    "EntityHistoryRow",
    "JSONDocument",
    "MessageRow",
    "SQLStore",
    "UTCDateTime",
    "database_url",
]


# --------------------------------------------------------------------------- column types


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (naive values are refused)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = utc(value, "datetime column")
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        tz = value.tzinfo
        if tz is None:
            return value.replace(tzinfo=UTC)
        return value if tz is UTC else value.astimezone(UTC)


class JSONDocument(TypeDecorator[Any]):
    """Compact JSON text: ``json`` on PostgreSQL, ``TEXT`` on SQLite. ``None`` is JSON null."""

    impl = sa.JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.Text())
        return dialect.type_descriptor(sa.JSON(none_as_null=False))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        # On PostgreSQL the JSON impl serialises with the engine's json_serializer.
        return dumps(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if dialect.name == "sqlite" and value is not None:
            return loads(value)
        return value


# --------------------------------------------------------------------------- tables


class ConversationRow(SQLModel, table=True):
    """One conversation: its key on the channel, where it is in its flow, what it knows."""

    __tablename__ = "conversation"
    __table_args__ = (
        sa.UniqueConstraint("channel", "account", "thread", name="uq_conversation_key"),
        # The human-handoff queue: WHERE owner = ? ORDER BY waiting_since.
        sa.Index("ix_conversation_owner_waiting", "owner", "waiting_since"),
    )

    id: str = Field(primary_key=True)
    channel: str
    account: str
    thread: str
    flow: str | None = None
    state: str | None = None
    entities: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(JSONDocument(), nullable=False)
    )
    results: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(JSONDocument(), nullable=False)
    )
    counters: dict[str, int] = Field(
        default_factory=dict, sa_column=sa.Column(JSONDocument(), nullable=False)
    )
    language: str = "en"
    owner: str = "bot"
    owner_agent: str | None = None
    handoff_reason: str | None = None
    waiting_since: datetime | None = Field(
        default=None, sa_column=sa.Column(UTCDateTime(), nullable=True)
    )
    summary: str = ""
    seq: int = 0
    version: int = 0
    closed: bool = False
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


class MessageRow(SQLModel, table=True):
    """One entry of a conversation's append-only message and event log.

    ``UNIQUE(conversation_id, seq)`` is also the index for reading a
    conversation's log. ``(channel, channel_message_id)`` is unique through a
    partial index on rows that have a channel message id (outbound messages and
    events usually have none, so they cost no index entry).
    """

    __tablename__ = "message"
    __table_args__ = (
        sa.UniqueConstraint("conversation_id", "seq", name="uq_message_conversation_seq"),
        sa.Index(
            "uq_message_channel_message_id",
            "channel",
            "channel_message_id",
            unique=True,
            sqlite_where=sa.text("channel_message_id IS NOT NULL"),
            postgresql_where=sa.text("channel_message_id IS NOT NULL"),
        ),
    )

    id: int | None = Field(
        default=None,
        sa_column=sa.Column(
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
    )
    conversation_id: str = Field(foreign_key="conversation.id", ondelete="CASCADE")
    seq: int
    direction: str
    kind: str
    author: str
    text: str
    data: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(JSONDocument(), nullable=False)
    )
    channel: str = ""
    channel_message_id: str | None = None
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


class EntityHistoryRow(SQLModel, table=True):
    """One change of an entity value, with provenance; ``id`` orders the changes."""

    __tablename__ = "entity_history"
    __table_args__ = (sa.Index("ix_entity_history_conversation", "conversation_id", "id"),)

    id: int | None = Field(
        default=None,
        sa_column=sa.Column(
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
    )
    conversation_id: str = Field(foreign_key="conversation.id", ondelete="CASCADE")
    name: str
    value: Any = Field(default=None, sa_column=sa.Column(JSONDocument(), nullable=True))
    previous: Any = Field(default=None, sa_column=sa.Column(JSONDocument(), nullable=True))
    turn: int
    source: str
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


_conversation = SQLModel.metadata.tables["conversation"]
_message = SQLModel.metadata.tables["message"]
_entity_history = SQLModel.metadata.tables["entity_history"]

#: The tables :meth:`SQLStore.open` creates.
STORE_TABLES: tuple[sa.Table, ...] = (_conversation, _message, _entity_history)


# --------------------------------------------------------------------------- statements

_C = _conversation.c
_M = _message.c
_E = _entity_history.c

_CONVERSATION_COLUMNS = (
    _C.id,
    _C.channel,
    _C.account,
    _C.thread,
    _C.created_at,
    _C.updated_at,
    _C.flow,
    _C.state,
    _C.entities,
    _C.results,
    _C.counters,
    _C.language,
    _C.owner,
    _C.owner_agent,
    _C.handoff_reason,
    _C.waiting_since,
    _C.summary,
    _C.seq,
    _C.version,
    _C.closed,
)
_SELECT_CONVERSATION = sa.select(*_CONVERSATION_COLUMNS)
_LOAD = _SELECT_CONVERSATION.where(
    _C.channel == sa.bindparam("k_channel"),
    _C.account == sa.bindparam("k_account"),
    _C.thread == sa.bindparam("k_thread"),
)
_LOAD_BY_ID = _SELECT_CONVERSATION.where(_C.id == sa.bindparam("k_id"))
_QUEUE_ORDER = (_C.waiting_since.asc().nulls_last(), _C.updated_at.asc(), _C.id.asc())
_INSERT_CONVERSATION = sa.insert(_conversation)
# The SET clause comes from the parameter names (every column but the key and created_at).
_UPDATE_CONVERSATION = sa.update(_conversation).where(
    _C.id == sa.bindparam("w_id"), _C.version == sa.bindparam("w_version")
)

_MESSAGE_COLUMNS = (
    _M.conversation_id,
    _M.seq,
    _M.direction,
    _M.kind,
    _M.author,
    _M.text,
    _M.created_at,
    _M.data,
    _M.channel,
    _M.channel_message_id,
)
_INSERT_MESSAGE = sa.insert(_message)
_SEEN = (
    sa.select(_M.id)
    .where(
        _M.channel == sa.bindparam("k_channel"),
        _M.channel_message_id == sa.bindparam("k_channel_message_id"),
    )
    .limit(1)
)
_MESSAGES = (
    sa.select(*_MESSAGE_COLUMNS)
    .where(_M.conversation_id == sa.bindparam("k_id"), _M.seq > sa.bindparam("k_after"))
    .order_by(_M.seq)
)
_MESSAGES_LIMIT = _MESSAGES.limit(sa.bindparam("k_limit"))

_CHANGE_COLUMNS = (
    _E.conversation_id,
    _E.name,
    _E.value,
    _E.previous,
    _E.turn,
    _E.source,
    _E.created_at,
)
_INSERT_CHANGE = sa.insert(_entity_history)
_HISTORY = sa.select(*_CHANGE_COLUMNS).where(_E.conversation_id == sa.bindparam("k_id"))
_HISTORY_ALL = _HISTORY.order_by(_E.id)
_HISTORY_ONE = _HISTORY.where(_E.name == sa.bindparam("k_name")).order_by(_E.id)

# ``load`` and ``seen`` in one statement: one row whether or not the conversation
# exists (its columns NULL if not), the last column saying whether the message is stored.
_LOAD_FOR_TURN = sa.select(
    *_CONVERSATION_COLUMNS,
    sa.exists()
    .where(
        _M.channel == sa.bindparam("k_message_channel"),
        _M.channel_message_id == sa.bindparam("k_channel_message_id"),
    )
    .label("seen"),
).select_from(
    sa.select(sa.literal_column("1").label("one"))
    .subquery("one")
    .outerjoin(
        _conversation,
        sa.and_(
            _C.channel == sa.bindparam("k_channel"),
            _C.account == sa.bindparam("k_account"),
            _C.thread == sa.bindparam("k_thread"),
        ),
    )
)


# --------------------------------------------------------------------------- raw SQLite

# The SQLite fast path: plain SQL texts with positional parameters (sqlite3 keeps
# them prepared in its statement cache), generated from the tables so they cannot
# drift from them. Values are encoded as UTCDateTime and JSONDocument encode them
# on SQLite: datetimes as naive UTC text with microseconds, JSON as compact text
# (None as ``null``), booleans as 0/1.


def _names(columns: Sequence[sa.ColumnElement[Any]]) -> str:
    return ", ".join(cast(sa.Column[Any], c).name for c in columns)


def _insert_sql(table: sa.Table, columns: Sequence[sa.ColumnElement[Any]]) -> str:
    marks = ", ".join("?" * len(columns))
    return f"INSERT INTO {table.name} ({_names(columns)}) VALUES ({marks})"


_SQLITE_SELECT = f"SELECT {_names(_CONVERSATION_COLUMNS)} FROM conversation"
_SQLITE_LOAD = f"{_SQLITE_SELECT} WHERE channel = ? AND account = ? AND thread = ?"
_SQLITE_LOAD_BY_ID = f"{_SQLITE_SELECT} WHERE id = ?"
_SQLITE_SEEN = "SELECT id FROM message WHERE channel = ? AND channel_message_id = ? LIMIT 1"
_SQLITE_INSERT_CONVERSATION = _insert_sql(_conversation, _CONVERSATION_COLUMNS)
# An update sets every column but the key and created_at: the parameters of the
# INSERT from the sixth on, then the id and the expected version.
_UPDATED_COLUMNS = _CONVERSATION_COLUMNS[5:]
_KEY_AND_CREATED = ["id", "channel", "account", "thread", "created_at"]
assert [c.name for c in _CONVERSATION_COLUMNS[:5]] == _KEY_AND_CREATED
_SQLITE_UPDATE_CONVERSATION = (
    f"UPDATE conversation SET {', '.join(f'{c.name} = ?' for c in _UPDATED_COLUMNS)} "
    "WHERE id = ? AND version = ?"
)
_SQLITE_INSERT_MESSAGE = _insert_sql(_message, _MESSAGE_COLUMNS)
_SQLITE_INSERT_CHANGE = _insert_sql(_entity_history, _CHANGE_COLUMNS)


# --------------------------------------------------------------------------- URLs


_DRIVERS = {
    "sqlite": "sqlite+pysqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


def database_url(url: str | URL) -> tuple[URL, dict[str, Any]]:
    """``url`` with the driver :class:`SQLStore` uses for it, and the connect args it implies.

    ``sqlite://`` becomes ``sqlite+pysqlite://`` (run on the store's worker
    thread); ``postgresql://`` and ``postgres://`` become
    ``postgresql+asyncpg://``. Explicit drivers are kept. A PostgreSQL
    ``search_path`` query parameter becomes an asyncpg server setting.
    """
    parsed = make_url(url)
    driver = _DRIVERS.get(parsed.drivername, parsed.drivername)
    parsed = parsed.set(drivername=driver)
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql" and "search_path" in parsed.query:
        search_path = parsed.query["search_path"]
        if not isinstance(search_path, str):
            search_path = ",".join(search_path)
        connect_args["server_settings"] = {"search_path": search_path}
        parsed = parsed.difference_update_query(["search_path"])
    return parsed, connect_args


def _set_sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


# --------------------------------------------------------------------------- the store

_T = TypeVar("_T")
_P = ParamSpec("_P")


class _MessageConflict(Exception):
    """Internal: the message INSERT hit a unique index; the turn was rolled back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


class _Worker:
    """One thread running the store's SQLite work, one job at a time, in order.

    A job costs one queue put and one ``call_soon_threadsafe`` back: about 60%
    of the CPU time of ``loop.run_in_executor`` on a ThreadPoolExecutor, which
    adds a concurrent future, its condition variable and the chaining of both
    futures. A daemon thread, so a store that is never closed does not keep the
    process alive; :meth:`stop` ends it after the jobs queued before.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        """Run ``fn()`` on the thread; the future (of the running loop) gets its outcome."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._jobs.put((loop, future, fn))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _main(self) -> None:
        get = self._jobs.get
        while (job := get()) is not None:
            loop, future, fn = job
            del job
            if future.cancelled():  # as an executor drops a job cancelled before it starts
                continue
            try:
                result = fn()
            except BaseException as error:  # handed to the waiting task
                _post(loop, future, None, error)
                del error
            else:
                _post(loop, future, result, None)
                del result
            del loop, future, fn


def _post(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None,
) -> None:
    # RuntimeError: the loop is closed, so nobody waits for the outcome any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_resolve, future, result, error)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class SQLStore(Store):
    """Conversations in SQLite or PostgreSQL.

    How statements run depends on the driver:

    * ``sqlite://`` (pysqlite, the default for SQLite): a synchronous engine
      whose work runs on one worker thread owned by the store, one thread hop
      per store call. This is about 3x cheaper per turn than aiosqlite, which
      hops to its thread for every cursor operation; SQLite takes one writer at
      a time anyway. The per-turn statements run on a raw sqlite3 cursor (see
      the module documentation), on a connection the worker thread keeps
      checked out of the pool until :meth:`close`.
    * async drivers (``postgresql+asyncpg://``, the default for PostgreSQL, or
      an explicit ``sqlite+aiosqlite://``): SQLAlchemy's async engine; each
      store call runs in one ``AsyncConnection.run_sync`` greenlet.

    Apart from that fast path the SQL is the same in both modes (SQLAlchemy
    Core on the sqlmodel tables).

    Args:
        url: database URL, e.g. ``sqlite:///var/helpline.db`` or
            ``postgresql://user@host/db``; see :func:`database_url`.
            ``sqlite://`` (no path) is a private in-memory database.
        connect_args: extra arguments for the driver's ``connect`` (merged over
            those the URL implies, e.g. ``{"server_settings": {...}}`` for asyncpg).
        echo: log SQL statements.
        engine_options: further keyword arguments for ``create_engine`` /
            ``create_async_engine`` (pool size...).
    """

    def __init__(
        self,
        url: str | URL,
        *,
        connect_args: Mapping[str, Any] | None = None,
        echo: bool = False,
        **engine_options: Any,
    ) -> None:
        parsed, implied = database_url(url)
        options: dict[str, Any] = {
            "connect_args": {**implied, **(connect_args or {})},
            "echo": echo,
            "json_serializer": dumps,
            "json_deserializer": loads,
            **engine_options,
        }
        self.url = parsed
        self._async_engine: AsyncEngine | None = None
        self._async_reader: AsyncEngine | None = None
        self._sync_engine: sa.Engine | None = None
        self._worker: _Worker | None = None
        self._closing = False
        # The fast path's connection and cursor; used on the worker thread only.
        self._raw_connection: sa.PoolProxiedConnection | None = None
        self._cursor: sqlite3.Cursor | None = None
        try:
            dialect = parsed.get_dialect()
        except SQLAlchemyError as error:
            raise ConfigError(f"{parsed.drivername}: unusable database URL: {error}") from error
        if dialect.is_async:
            self._async_engine = create_async_engine(parsed, **options)
            engine = self._async_engine.sync_engine
            # Reads need no transaction: skip BEGIN/ROLLBACK round trips on PostgreSQL.
            self._async_reader = (
                self._async_engine.execution_options(isolation_level="AUTOCOMMIT")
                if dialect.name == "postgresql"
                else self._async_engine
            )
        else:
            if dialect.name != "sqlite":
                raise ConfigError(
                    f"{parsed.drivername}: use an async driver for {dialect.name} "
                    "(e.g. postgresql+asyncpg://); only SQLite may use a synchronous one"
                )
            engine = self._sync_engine = sa.create_engine(parsed, **options)
        #: ``"sqlite"`` or ``"postgresql"``.
        self.dialect: str = dialect.name
        if self.dialect == "sqlite":
            event.listen(engine, "connect", _set_sqlite_pragmas)
        #: Whether the per-turn statements run on a raw sqlite3 cursor.
        self.raw_sqlite: bool = self._sync_engine is not None

    def __repr__(self) -> str:
        return f"SQLStore({self.url.render_as_string(hide_password=True)!r})"

    async def run_sync(
        self,
        fn: Callable[Concatenate[sa.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run ``fn(connection, *args, **kwargs)`` in one transaction, committed if it returns.

        ``fn`` is synchronous and gets a SQLAlchemy :class:`~sqlalchemy.Connection`;
        use it for reports or maintenance on the store's tables. It runs on the
        store's worker thread (SQLite) or in a greenlet (async drivers), so it
        must not block on anything but the database. With pysqlite the
        transaction only begins at the first write statement.
        """
        return await self._run(True, fn, *args, **kwargs)

    async def _run(
        self,
        write: bool,
        fn: Callable[Concatenate[sa.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        if self._async_engine is not None:
            if write:
                async with self._async_engine.begin() as conn:
                    return await conn.run_sync(fn, *args, **kwargs)
            assert self._async_reader is not None
            async with self._async_reader.connect() as conn:
                return await conn.run_sync(fn, *args, **kwargs)
        return await self._call(functools.partial(self._in_thread, fn, args, kwargs, write))

    def _call(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        """Run ``fn()`` on the worker thread (started on first use)."""
        if self._closing:
            # A second worker on the connection the first one is closing would
            # corrupt it (seen as crashes when a background summary outlived
            # shutdown). After close() returns, a call starts a fresh worker.
            raise StoreError(f"{self!r}: the store is closing")
        worker = self._worker
        if worker is None:
            worker = self._worker = _Worker("helpline-sqlite")
        return worker.submit(fn)

    async def _raw(
        self,
        fn: Callable[Concatenate[sqlite3.Cursor, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run ``fn(cursor, *args, **kwargs)`` on the fast path's cursor, on the worker thread.

        Outside a transaction, as sqlite3 opens one at the first write statement:
        ``fn`` commits what it writes, or rolls it back, before it returns.
        """
        return await self._call(functools.partial(self._raw_in_thread, fn, args, kwargs))

    def _raw_in_thread(
        self, fn: Callable[..., _T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> _T:
        cursor = self._cursor
        if cursor is None:
            assert self._sync_engine is not None
            # Checked out through the pool: same connect arguments and pragmas, and
            # with an in-memory database (one connection per thread) the same database.
            self._raw_connection = self._sync_engine.raw_connection()
            connection = cast(sqlite3.Connection, self._raw_connection.driver_connection)
            cursor = self._cursor = connection.cursor()
        try:
            return fn(cursor, *args, **kwargs)
        except BaseException:
            if cursor.connection.in_transaction:
                cursor.connection.rollback()
            raise

    def _close_in_thread(self) -> None:
        assert self._sync_engine is not None
        cursor, self._cursor = self._cursor, None
        raw, self._raw_connection = self._raw_connection, None
        try:
            if cursor is not None:
                cursor.close()
            if raw is not None:
                raw.close()  # back to the pool, which closes it now
        finally:
            self._sync_engine.dispose()

    def _in_thread(
        self,
        fn: Callable[..., _T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        write: bool,
    ) -> _T:
        assert self._sync_engine is not None
        with self._sync_engine.begin() if write else self._sync_engine.connect() as conn:
            return fn(conn, *args, **kwargs)

    async def open(self) -> None:
        try:
            await self._run(True, _create_tables)
        except SQLAlchemyError as error:
            raise StoreError(f"{self!r}: cannot create tables: {error}") from error

    async def close(self) -> None:
        if self._async_engine is not None:
            await self._async_engine.dispose()
            return
        worker, self._worker = self._worker, None
        if worker is not None:
            self._closing = True
            # SQLite connections must be closed on the thread that opened them.
            try:
                await worker.submit(self._close_in_thread)
            finally:
                worker.stop()
                self._closing = False

    # ----------------------------------------------------------------- reads

    async def load(self, key: ConversationKey) -> ConversationState | None:
        try:
            if self.raw_sqlite:
                return await self._raw(_raw_load, (key.channel, key.account, key.thread))
            params = {"k_channel": key.channel, "k_account": key.account, "k_thread": key.thread}
            row = await self._run(False, _first, _LOAD, params)
        except (SQLAlchemyError, sqlite3.Error) as error:
            raise StoreError(f"{self!r}: cannot load conversation {key}: {error}") from error
        return None if row is None else _state(row)

    async def load_for_turn(
        self, key: ConversationKey, channel_message_id: str | None
    ) -> tuple[ConversationState | None, bool]:
        if channel_message_id is None:
            return await self.load(key), False
        try:
            if self.raw_sqlite:
                return await self._raw(
                    _raw_load_for_turn,
                    (key.channel, key.account, key.thread),
                    (key.channel, channel_message_id),
                )
            params = {
                "k_channel": key.channel,
                "k_account": key.account,
                "k_thread": key.thread,
                "k_message_channel": key.channel,
                "k_channel_message_id": channel_message_id,
            }
            row = await self._run(False, _first, _LOAD_FOR_TURN, params)
        except (SQLAlchemyError, sqlite3.Error) as error:
            raise StoreError(f"{self!r}: cannot load conversation {key}: {error}") from error
        assert row is not None  # one row whether or not the conversation exists
        return (None if row[0] is None else _state(row)), bool(row[20])

    async def load_by_id(self, conversation_id: str) -> ConversationState | None:
        try:
            if self.raw_sqlite:
                return await self._raw(_raw_load_by_id, (conversation_id,))
            row = await self._run(False, _first, _LOAD_BY_ID, {"k_id": conversation_id})
        except (SQLAlchemyError, sqlite3.Error) as error:
            raise StoreError(
                f"{self!r}: cannot load conversation {conversation_id!r}: {error}"
            ) from error
        return None if row is None else _state(row)

    async def seen(self, channel: str, channel_message_id: str) -> bool:
        try:
            if self.raw_sqlite:
                return await self._raw(_raw_seen, (channel, channel_message_id))
            params = {"k_channel": channel, "k_channel_message_id": channel_message_id}
            row = await self._run(False, _first, _SEEN, params)
        except (SQLAlchemyError, sqlite3.Error) as error:
            raise StoreError(f"{self!r}: cannot look up message ids: {error}") from error
        return row is not None

    async def messages(
        self, conversation_id: str, *, after_seq: int = 0, limit: int | None = None
    ) -> list[MessageRecord]:
        params: dict[str, Any] = {"k_id": conversation_id, "k_after": after_seq}
        statement = _MESSAGES
        if limit is not None:
            if limit <= 0:
                return []
            statement = _MESSAGES_LIMIT
            params["k_limit"] = limit
        try:
            rows = await self._run(False, _all, statement, params)
        except SQLAlchemyError as error:
            raise StoreError(f"{self!r}: cannot read messages: {error}") from error
        return [
            MessageRecord(
                conversation_id=r[0],
                seq=r[1],
                direction=r[2],
                kind=r[3],
                author=r[4],
                text=r[5],
                created_at=r[6],
                data=r[7],
                channel=r[8],
                channel_message_id=r[9],
            )
            for r in rows
        ]

    async def entity_history(
        self, conversation_id: str, name: str | None = None
    ) -> list[EntityChange]:
        if name is None:
            statement, params = _HISTORY_ALL, {"k_id": conversation_id}
        else:
            statement, params = _HISTORY_ONE, {"k_id": conversation_id, "k_name": name}
        try:
            rows = await self._run(False, _all, statement, params)
        except SQLAlchemyError as error:
            raise StoreError(f"{self!r}: cannot read entity history: {error}") from error
        return [
            EntityChange(
                conversation_id=r[0],
                name=r[1],
                value=r[2],
                previous=r[3],
                turn=r[4],
                source=r[5],
                created_at=r[6],
            )
            for r in rows
        ]

    async def conversations(
        self, *, owner: Owner | None = None, limit: int = 100
    ) -> list[ConversationState]:
        if limit <= 0:
            return []
        statement = _SELECT_CONVERSATION
        params: dict[str, Any] = {"k_limit": limit}
        if owner is not None:
            statement = statement.where(_C.owner == sa.bindparam("k_owner"))
            params["k_owner"] = owner
        statement = statement.order_by(*_QUEUE_ORDER).limit(sa.bindparam("k_limit"))
        try:
            rows = await self._run(False, _all, statement, params)
        except SQLAlchemyError as error:
            raise StoreError(f"{self!r}: cannot list conversations: {error}") from error
        return [_state(row) for row in rows]

    # ----------------------------------------------------------------- the turn

    async def commit_turn(self, write: TurnWrite) -> None:
        if self.raw_sqlite:
            await self._raw_commit_turn(write)
            return
        conv = write.conversation
        expected = write.expected_version
        cid = conv.id
        row = _conversation_params(conv, expected + 1)
        messages = _message_params(cid, write.messages)
        changes = _change_params(cid, write.entity_changes)
        try:
            await self._run(True, _commit, cid, expected, row, messages, changes)
        except _MessageConflict as conflict:
            raise await self._message_conflict(write, conflict.error) from conflict.error
        except IntegrityError as error:
            raise StoreError(f"{self!r}: turn of conversation {cid!r} refused: {error}") from error
        except DBAPIError as error:
            raise StoreError(f"{self!r}: cannot commit turn of {cid!r}: {error}") from error
        except StatementError as error:
            # A value failed in a bind processor: JSON encoding or a naive datetime.
            if isinstance(error.orig, StoreError):
                raise error.orig from None
            problem = find_json_problem(write)
            if problem is not None:
                raise json_problem_error(*problem) from error
            raise StoreError(f"{self!r}: cannot commit turn of {cid!r}: {error}") from error
        except SQLAlchemyError as error:
            raise StoreError(f"{self!r}: cannot commit turn of {cid!r}: {error}") from error
        conv.version = expected + 1

    async def _raw_commit_turn(self, write: TurnWrite) -> None:
        """:meth:`commit_turn` on the SQLite fast path: encoded here, run in one hop."""
        conv = write.conversation
        expected = write.expected_version
        cid = conv.id
        try:
            row, messages, changes = _sqlite_turn(write)
        except (TypeError, ValueError) as error:
            problem = find_json_problem(write)
            if problem is not None:
                raise json_problem_error(*problem) from error
            raise StoreError(f"{self!r}: cannot commit turn of {cid!r}: {error}") from error
        try:
            await self._raw(_raw_commit, cid, expected, row, messages, changes)
        except _MessageConflict as conflict:
            raise self._seq_conflict(cid, conflict.error) from conflict.error
        except sqlite3.IntegrityError as error:
            raise StoreError(f"{self!r}: turn of conversation {cid!r} refused: {error}") from error
        except sqlite3.Error as error:
            raise StoreError(f"{self!r}: cannot commit turn of {cid!r}: {error}") from error
        conv.version = expected + 1

    async def _message_conflict(self, write: TurnWrite, error: Exception) -> StoreError:
        """Name the message that made the (rolled back) INSERT fail."""
        ids = [
            (m.channel, m.channel_message_id)
            for m in write.messages
            if m.channel_message_id is not None
        ]
        for channel, channel_message_id in ids:
            if await self.seen(channel, channel_message_id):
                return DuplicateMessageError(channel, channel_message_id)
        for i, ident in enumerate(ids):
            if ident in ids[:i]:
                return DuplicateMessageError(*ident)
        return self._seq_conflict(write.conversation.id, error)

    def _seq_conflict(self, conversation_id: str, error: Exception) -> StoreError:
        return StoreError(
            f"{self!r}: messages of the turn of conversation {conversation_id!r} "
            f"were refused (is a seq reused?): {error}"
        )


# --------------------------------------------------------------------------- statements run


def _create_tables(conn: sa.Connection) -> None:
    SQLModel.metadata.create_all(conn, tables=list(STORE_TABLES))


def _first(
    conn: sa.Connection, statement: sa.Executable, params: Mapping[str, Any]
) -> Sequence[Any] | None:
    return conn.execute(statement, params).first()


def _all(
    conn: sa.Connection, statement: sa.Executable, params: Mapping[str, Any]
) -> Sequence[Sequence[Any]]:
    return conn.execute(statement, params).all()


def _commit(
    conn: sa.Connection,
    cid: str,
    expected: int,
    row: dict[str, Any],
    messages: list[dict[str, Any]],
    changes: list[dict[str, Any]],
) -> None:
    """The statements of one turn; the caller's transaction commits or rolls back."""
    if expected == 0:
        try:
            conn.execute(_INSERT_CONVERSATION, row)
        except IntegrityError as error:
            # Another writer created this id or key first.
            raise VersionConflictError(cid, expected) from error
    else:
        del row["id"], row["channel"], row["account"], row["thread"], row["created_at"]
        row["w_id"] = cid
        row["w_version"] = expected
        if conn.execute(_UPDATE_CONVERSATION, row).rowcount != 1:
            raise VersionConflictError(cid, expected)
    if messages:
        try:
            conn.execute(_INSERT_MESSAGE, messages)
        except IntegrityError as error:
            raise _MessageConflict(error) from error
    if changes:
        conn.execute(_INSERT_CHANGE, changes)


# --------------------------------------------------------------------------- raw SQLite run
# On the worker thread, on the fast path's cursor (see SQLStore._raw).


def _raw_load(cursor: sqlite3.Cursor, key: tuple[str, str, str]) -> ConversationState | None:
    row = cursor.execute(_SQLITE_LOAD, key).fetchone()
    return None if row is None else _sqlite_state(row)


def _raw_load_by_id(cursor: sqlite3.Cursor, ident: tuple[str]) -> ConversationState | None:
    row = cursor.execute(_SQLITE_LOAD_BY_ID, ident).fetchone()
    return None if row is None else _sqlite_state(row)


def _raw_seen(cursor: sqlite3.Cursor, ident: tuple[str, str]) -> bool:
    return cursor.execute(_SQLITE_SEEN, ident).fetchone() is not None


def _raw_load_for_turn(
    cursor: sqlite3.Cursor, key: tuple[str, str, str], ident: tuple[str, str]
) -> tuple[ConversationState | None, bool]:
    row = cursor.execute(_SQLITE_LOAD, key).fetchone()
    seen = cursor.execute(_SQLITE_SEEN, ident).fetchone() is not None
    return (None if row is None else _sqlite_state(row)), seen


def _raw_commit(
    cursor: sqlite3.Cursor,
    cid: str,
    expected: int,
    row: tuple[Any, ...],
    messages: list[tuple[Any, ...]],
    changes: list[tuple[Any, ...]],
) -> None:
    """The statements of one turn and its commit; on any error nothing stays written."""
    if expected == 0:
        try:
            cursor.execute(_SQLITE_INSERT_CONVERSATION, row)
        except sqlite3.IntegrityError as error:
            # Another writer created this id or key first.
            raise VersionConflictError(cid, expected) from error
    else:
        cursor.execute(_SQLITE_UPDATE_CONVERSATION, (*row[5:], cid, expected))
        if cursor.rowcount != 1:
            raise VersionConflictError(cid, expected)
    if messages:
        try:
            cursor.executemany(_SQLITE_INSERT_MESSAGE, messages)
        except sqlite3.IntegrityError as error:
            cursor.connection.rollback()
            raise _raw_message_conflict(cursor, messages, error) from error
    if changes:
        cursor.executemany(_SQLITE_INSERT_CHANGE, changes)
    cursor.connection.commit()


def _raw_message_conflict(
    cursor: sqlite3.Cursor, messages: list[tuple[Any, ...]], error: sqlite3.IntegrityError
) -> Exception:
    """Name the message that made the (rolled back) INSERT fail, as SQLStore._message_conflict."""
    ids = [(m[8], m[9]) for m in messages if m[9] is not None]
    for ident in ids:
        if cursor.execute(_SQLITE_SEEN, ident).fetchone() is not None:
            return DuplicateMessageError(*ident)
    for i, ident in enumerate(ids):
        if ident in ids[:i]:
            return DuplicateMessageError(*ident)
    return _MessageConflict(error)


# --------------------------------------------------------------------------- mapping


def _state(row: Sequence[Any]) -> ConversationState:
    return ConversationState(
        id=row[0],
        key=ConversationKey(row[1], row[2], row[3]),
        created_at=row[4],
        updated_at=row[5],
        flow=row[6],
        state=row[7],
        entities=row[8],
        results=row[9],
        counters=row[10],
        language=row[11],
        owner=row[12],
        owner_agent=row[13],
        handoff_reason=row[14],
        waiting_since=row[15],
        summary=row[16],
        seq=row[17],
        version=row[18],
        closed=row[19],
    )


def _sqlite_state(row: Sequence[Any]) -> ConversationState:
    """A conversation from a raw SQLite row of ``_CONVERSATION_COLUMNS``."""
    waiting = row[15]
    return ConversationState(
        id=row[0],
        key=ConversationKey(row[1], row[2], row[3]),
        created_at=_sqlite_datetime(row[4]),
        updated_at=_sqlite_datetime(row[5]),
        flow=row[6],
        state=row[7],
        entities=loads(row[8]),
        results=loads(row[9]),
        counters=loads(row[10]),
        language=row[11],
        owner=row[12],
        owner_agent=row[13],
        handoff_reason=row[14],
        waiting_since=None if waiting is None else _sqlite_datetime(waiting),
        summary=row[16],
        seq=row[17],
        version=row[18],
        closed=bool(row[19]),
    )


def _sqlite_datetime(text: str) -> datetime:
    """A datetime column's text (naive UTC, as UTCDateTime stores it) as an aware UTC datetime."""
    return datetime.fromisoformat(text + "+00:00")


def _sqlite_text(value: datetime, field: str) -> str:
    """``value`` as UTCDateTime stores it on SQLite: naive UTC, always with microseconds."""
    return utc(value, field).isoformat(" ", "microseconds")[:-6]


def _sqlite_turn(
    write: TurnWrite,
) -> tuple[tuple[Any, ...], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The parameters of ``_raw_commit``, encoded for SQLite.

    The conversation row in ``_CONVERSATION_COLUMNS`` order (with the version
    it gets), the messages in ``_MESSAGE_COLUMNS`` order, the changes in
    ``_CHANGE_COLUMNS`` order. Checks what ``_conversation_params``,
    ``_message_params`` and ``_change_params`` check, with the same errors.

    Raises:
        StoreError: a naive datetime, or a record of another conversation.
        TypeError, ValueError: a value is not strict JSON.
    """
    conv = write.conversation
    cid = conv.id
    key = conv.key
    waiting = conv.waiting_since
    row = (
        cid,
        key.channel,
        key.account,
        key.thread,
        _sqlite_text(conv.created_at, "conversation.created_at"),
        _sqlite_text(conv.updated_at, "conversation.updated_at"),
        conv.flow,
        conv.state,
        dumps(conv.entities),
        dumps(conv.results),
        dumps(conv.counters),
        conv.language,
        conv.owner,
        conv.owner_agent,
        conv.handoff_reason,
        None if waiting is None else _sqlite_text(waiting, "conversation.waiting_since"),
        conv.summary,
        conv.seq,
        write.expected_version + 1,
        conv.closed,
    )
    # The records of a turn usually share one timestamp object: encode it once.
    last: datetime | None = None
    last_text = ""
    messages = []
    for i, m in enumerate(write.messages):
        if m.conversation_id != cid:
            raise StoreError(
                f"message seq {m.seq} belongs to conversation {m.conversation_id!r}, "
                f"not to {cid!r} whose turn is committed"
            )
        created = m.created_at
        if created is not last:
            last_text = _sqlite_text(created, f"messages[{i}].created_at")
            last = created
        data = m.data
        messages.append(
            (
                cid,
                m.seq,
                m.direction,
                m.kind,
                m.author,
                m.text,
                last_text,
                "{}" if type(data) is dict and not data else dumps(data),
                m.channel,
                m.channel_message_id,
            )
        )
    changes = []
    for i, c in enumerate(write.entity_changes):
        if c.conversation_id != cid:
            raise StoreError(
                f"entity change {c.name!r} belongs to conversation {c.conversation_id!r}, "
                f"not to {cid!r} whose turn is committed"
            )
        created = c.created_at
        if created is not last:
            last_text = _sqlite_text(created, f"entity_changes[{i}].created_at")
            last = created
        changes.append(
            (cid, c.name, dumps(c.value), dumps(c.previous), c.turn, c.source, last_text)
        )
    return row, messages, changes


def _conversation_params(conv: ConversationState, version: int) -> dict[str, Any]:
    key = conv.key
    waiting = conv.waiting_since
    return {
        "id": conv.id,
        "channel": key.channel,
        "account": key.account,
        "thread": key.thread,
        "created_at": utc(conv.created_at, "conversation.created_at"),
        "updated_at": utc(conv.updated_at, "conversation.updated_at"),
        "flow": conv.flow,
        "state": conv.state,
        "entities": conv.entities,
        "results": conv.results,
        "counters": conv.counters,
        "language": conv.language,
        "owner": conv.owner,
        "owner_agent": conv.owner_agent,
        "handoff_reason": conv.handoff_reason,
        "waiting_since": None if waiting is None else utc(waiting, "conversation.waiting_since"),
        "summary": conv.summary,
        "seq": conv.seq,
        "version": version,
        "closed": conv.closed,
    }


def _message_params(cid: str, messages: Sequence[MessageRecord]) -> list[dict[str, Any]]:
    params = []
    for i, m in enumerate(messages):
        if m.conversation_id != cid:
            raise StoreError(
                f"message seq {m.seq} belongs to conversation {m.conversation_id!r}, "
                f"not to {cid!r} whose turn is committed"
            )
        params.append(
            {
                "conversation_id": cid,
                "seq": m.seq,
                "direction": m.direction,
                "kind": m.kind,
                "author": m.author,
                "text": m.text,
                "created_at": utc(m.created_at, f"messages[{i}].created_at"),
                "data": m.data,
                "channel": m.channel,
                "channel_message_id": m.channel_message_id,
            }
        )
    return params


def _change_params(cid: str, changes: Sequence[EntityChange]) -> list[dict[str, Any]]:
    params = []
    for i, c in enumerate(changes):
        if c.conversation_id != cid:
            raise StoreError(
                f"entity change {c.name!r} belongs to conversation {c.conversation_id!r}, "
                f"not to {cid!r} whose turn is committed"
            )
        params.append(
            {
                "conversation_id": cid,
                "name": c.name,
                "value": c.value,
                "previous": c.previous,
                "turn": c.turn,
                "source": c.source,
                "created_at": utc(c.created_at, f"entity_changes[{i}].created_at"),
            }
        )
    return params
