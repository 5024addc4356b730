"""Fixtures for external services and the store backends, shared by the whole suite.

Services: PostgreSQL (``postgres_url``) and Redis (``redis_url``). When one is
unreachable its tests are skipped, except under CI (``CI=true``), where they
fail with the command that starts the service: CI must run every test.

* PostgreSQL: ``HELPLINE_TEST_POSTGRES_URL`` or
  ``postgresql+asyncpg://postgres@127.0.0.1:5432/test``. Each test gets a fresh
  schema, dropped afterwards; the URL handed out carries it as
  ``?search_path=<schema>``, which :class:`engine.store.sql.SQLStore`
  understands (pass the URL to ``open_store``/``SQLStore`` as is).
* Redis: ``HELPLINE_TEST_REDIS_URL`` or ``redis://127.0.0.1:6379/0``; tests get
  the same server with database 15, flushed before and after each test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy.engine import make_url

from engine.store import Store, open_store

POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
POSTGRES_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_START = 'redis-server --daemonize yes --port 6379 --save "" --appendonly no'
REDIS_TEST_DB = 15

# Why a service was found unreachable, so later tests need not wait for it again.
_unreachable: dict[str, str] = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _unavailable(service: str, url: str, reason: str, start: str) -> NoReturn:
    """Skip the test, or fail it under CI, because ``service`` cannot be used."""
    message = f"{service} at {url} is unreachable ({reason}); start it with: {start}"
    if _in_ci():
        pytest.fail(f"{message}  (CI=true: tests needing {service} must run)", pytrace=False)
    pytest.skip(message)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A PostgreSQL URL (asyncpg driver) whose ``search_path`` is a fresh, private schema."""
    import asyncpg  # type: ignore[import-untyped,unused-ignore]

    base = os.environ.get("HELPLINE_TEST_POSTGRES_URL", POSTGRES_URL)
    parsed = make_url(base)
    shown = parsed.render_as_string(hide_password=True)
    if "postgres" in _unreachable:
        _unavailable("PostgreSQL", shown, _unreachable["postgres"], POSTGRES_START)
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = await asyncpg.connect(dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        _unreachable["postgres"] = f"{type(error).__name__}: {error}"
    if "postgres" in _unreachable:  # reported outside the except: no chained traceback
        _unavailable("PostgreSQL", shown, _unreachable["postgres"], POSTGRES_START)
    schema = f"t_{uuid.uuid4().hex}"
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        url = parsed.set(drivername="postgresql+asyncpg").update_query_dict(
            {"search_path": schema}
        )
        yield url.render_as_string(hide_password=False)
    finally:
        try:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await admin.close()


# --------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis URL on database 15, empty at the start of the test and flushed after it."""
    base = os.environ.get("HELPLINE_TEST_REDIS_URL", REDIS_URL)
    parsed = make_url(base).set(database=str(REDIS_TEST_DB))
    url = parsed.render_as_string(hide_password=False)
    shown = parsed.render_as_string(hide_password=True)
    if "redis" in _unreachable:
        _unavailable("Redis", shown, _unreachable["redis"], REDIS_START)
    try:
        import redis
    except ImportError as error:  # the dev extra is not installed
        _unreachable["redis"] = f"the redis package is missing ({error}); pip install -e .[dev]"
        _unavailable("Redis", shown, _unreachable["redis"], REDIS_START)
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.flushdb()
    except redis.RedisError as error:
        client.close()
        _unreachable["redis"] = f"{type(error).__name__}: {error}"
    if "redis" in _unreachable:  # reported outside the except: no chained traceback
        _unavailable("Redis", shown, _unreachable["redis"], REDIS_START)
    try:
        yield url
    finally:
        try:
            client.flushdb()
        finally:
            client.close()


# --------------------------------------------------------------------------- stores

STORE_BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=STORE_BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty store of each backend: memory, SQLite file, PostgreSQL schema."""
    backend: str = request.param
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'helpline.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An opened, empty :class:`Store` of each backend (ids: memory, sqlite, postgres)."""
    opened = open_store(store_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


# Property tests must not fail because a shared CI machine is slow: no
# per-example deadline (hypothesis' default is 200 ms).
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("helpline", deadline=None)
_hypothesis_settings.load_profile("helpline")


# -- the fake Claude Messages API, shared by the model, memory and conversation tests --

from collections.abc import AsyncIterator as _AsyncIterator  # noqa: E402

from engine.models.claude import ClaudeModel as _ClaudeModel  # noqa: E402
from tests.fakes.claude_api import FakeClaude as _FakeClaude  # noqa: E402


@pytest.fixture
async def fake() -> _AsyncIterator[_FakeClaude]:
    """A fake Claude Messages API on 127.0.0.1 (a real HTTP server)."""
    async with _FakeClaude() as server:
        yield server


@pytest.fixture
async def claude(fake: _FakeClaude) -> _AsyncIterator[_ClaudeModel]:
    """A ClaudeModel on the fake through the real SDK; no retries, a short timeout."""
    model = _ClaudeModel(client=fake.client(max_retries=0, timeout=5.0))
    try:
        yield model
    finally:
        await model.close()
