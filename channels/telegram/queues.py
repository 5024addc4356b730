"""Ordered work per key: one FIFO and at most one worker task per chat.

The Telegram channel runs a chat's turns one after another (in the order its
updates arrived) and sends a chat's messages one after another (in the order
the engine produced them), while different chats proceed independently. A
worker exists only while its chat has work, so idle chats cost nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["KeyedWorkers"]

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class KeyedWorkers(Generic[K, T]):
    """``submit(key, item)`` runs ``handle(key, item)`` in submission order per key."""

    def __init__(self, handle: Callable[[K, T], Awaitable[None]], *, name: str) -> None:
        self._handle = handle
        self._name = name
        self._queues: dict[K, deque[T]] = {}
        self._tasks: dict[K, asyncio.Task[None]] = {}

    def submit(self, key: K, item: T) -> None:
        self._queues.setdefault(key, deque()).append(item)
        if key not in self._tasks:
            self._tasks[key] = asyncio.create_task(self._run(key), name=f"{self._name}-{key}")

    def discard(self, key: K) -> int:
        """Drop the items of ``key`` not started yet; returns how many."""
        queue = self._queues.get(key)
        if not queue:
            return 0
        dropped = len(queue)
        queue.clear()
        return dropped

    def pending(self, key: K) -> int:
        return len(self._queues.get(key, ()))

    def __len__(self) -> int:
        """Keys with work (queued or running)."""
        return len(self._tasks)

    async def _run(self, key: K) -> None:
        queue = self._queues[key]
        try:
            while queue:
                item = queue.popleft()
                try:
                    await self._handle(key, item)
                except Exception:  # one failed item must not stop the chat's queue
                    logger.exception("%s: handling an item for %s failed", self._name, key)
        finally:
            # No await between the last check and here: a submit cannot slip in between.
            del self._tasks[key]
            if not queue:
                del self._queues[key]

    async def join(self, timeout: float) -> bool:
        """Wait until every key's work is done (also work submitted meanwhile)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait(list(self._tasks.values()), timeout=remaining)
        return True

    async def cancel(self) -> None:
        """Drop everything queued and cancel the running items."""
        for queue in self._queues.values():
            queue.clear()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
