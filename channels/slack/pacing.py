"""Ordered, paced Web API calls per Slack channel, and ordered work per conversation.

Slack allows ``chat.postMessage`` "generally one message per second per
channel" (https://docs.slack.dev/apis/web-api/rate-limits) and answers 429
with ``Retry-After`` beyond it. :class:`ChannelPoster` keeps one FIFO queue
and one worker per channel with a token bucket in front: messages leave in
the order they were queued, at most ``rate`` per second per channel (the
bucket refills from the moment Slack answered the previous call, so network
jitter cannot squeeze two arrivals closer than ``1/rate``). A 429
is retried by the SDK's ``AsyncRateLimitErrorRetryHandler`` after
``Retry-After``; since the worker waits for that, later messages of the
channel cannot overtake the retried one.

:class:`SerialWorkers` runs jobs one at a time per key (a conversation), in
submission order, so two quick customer messages are answered in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

__all__ = ["ChannelPoster", "Job", "SerialWorkers", "TokenBucket"]

logger = logging.getLogger(__name__)

#: Channels the poster remembers before it forgets idle ones.
MAX_IDLE_LANES = 1000


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int = 1,
                 clock: Callable[[], float] | None = None) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated: float | None = None

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def delay(self) -> float:
        """Take a token; return how long to wait before using it (0 if one was saved)."""
        now = self._now()
        if self._updated is not None:
            self._tokens = min(float(self.burst),
                               self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def restart(self) -> None:
        """Count the refill from now (the moment the last call was answered)."""
        if self._updated is not None:
            self._tokens = min(self._tokens, 0.0)
            self._updated = self._now()

    def full(self) -> bool:
        """Whether waiting longer would not save up another token."""
        if self._updated is None:
            return True
        return self._tokens + (self._now() - self._updated) * self.rate >= self.burst

    async def acquire(self) -> None:
        wait = self.delay()
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass(slots=True)
class _Call:
    method: str
    args: dict[str, Any]
    future: asyncio.Future[dict[str, Any] | None]


@dataclass(slots=True)
class _Lane:
    bucket: TokenBucket
    queue: deque[_Call] = field(default_factory=deque)
    worker: asyncio.Task[None] | None = None


class ChannelPoster:
    """Web API calls that post into a channel, queued per channel; see the module docstring.

    :meth:`post` never blocks: it returns a future resolving to the API's
    answer (a dict), or None if the call failed (the error is logged; the
    message is in the conversation log either way).
    """

    def __init__(self, client: AsyncWebClient, *, rate: float = 1.0, burst: int = 1) -> None:
        self.client = client
        self.rate = rate
        self.burst = burst
        self._lanes: dict[str, _Lane] = {}
        self._closed = False
        self.failures = 0

    def post(self, args: dict[str, Any],
             method: str = "chat.postMessage") -> asyncio.Future[dict[str, Any] | None]:
        channel = str(args["channel"])
        future: asyncio.Future[dict[str, Any] | None] = \
            asyncio.get_running_loop().create_future()
        if self._closed:
            logger.warning("slack %s to %s after shutdown; dropped", method, channel)
            future.set_result(None)
            return future
        lane = self._lanes.get(channel)
        if lane is None:
            if len(self._lanes) >= MAX_IDLE_LANES:
                self._prune()
            lane = self._lanes[channel] = _Lane(TokenBucket(self.rate, self.burst))
        lane.queue.append(_Call(method, args, future))
        if lane.worker is None or lane.worker.done():
            lane.worker = asyncio.create_task(self._drain(channel, lane),
                                              name=f"slack-post-{channel}")
        return future

    def _prune(self) -> None:
        """Forget channels with nothing queued whose bucket has refilled."""
        for channel, lane in list(self._lanes.items()):
            if not lane.queue and (lane.worker is None or lane.worker.done()) \
                    and lane.bucket.full():
                del self._lanes[channel]

    async def _drain(self, channel: str, lane: _Lane) -> None:
        while lane.queue:
            call = lane.queue[0]
            try:
                await lane.bucket.acquire()
                result = await self._call(call)
                # Slack counts arrivals: refilling from the answer keeps arrivals
                # at least 1/rate apart whatever the network's latency did.
                lane.bucket.restart()
            except asyncio.CancelledError:
                for pending in lane.queue:
                    pending.future.cancel()
                lane.queue.clear()
                raise
            lane.queue.popleft()
            if not call.future.done():
                call.future.set_result(result)

    async def _call(self, call: _Call) -> dict[str, Any] | None:
        try:
            response = await self.client.api_call(call.method, json=call.args)
        except SlackApiError as exc:
            self.failures += 1
            logger.warning("slack %s to %s failed: %s", call.method, call.args.get("channel"),
                           exc.response.get("error") if exc.response is not None else exc)
            return None
        except Exception:  # a network error the SDK's retries did not fix
            self.failures += 1
            logger.exception("slack %s to %s failed", call.method, call.args.get("channel"))
            return None
        data = response.data
        return data if isinstance(data, dict) else None

    @property
    def pending(self) -> int:
        return sum(len(lane.queue) for lane in self._lanes.values())

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued call is done; False if ``timeout`` ran out first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            workers = [lane.worker for lane in self._lanes.values()
                       if lane.worker is not None and not lane.worker.done()]
            if not workers:
                return True
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            await asyncio.wait(workers, timeout=remaining)

    async def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (up to ``timeout``), then cancel the rest; refuse new calls."""
        self._closed = True
        await self.flush(timeout)
        for lane in self._lanes.values():
            if lane.worker is not None and not lane.worker.done():
                lane.worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.worker
        self._lanes.clear()


Job = Callable[[], Awaitable[None]]


class SerialWorkers:
    """Runs jobs one at a time per key, in submission order; keys run concurrently."""

    def __init__(self, name: str = "slack") -> None:
        self.name = name
        self._queues: dict[str, deque[Job]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, key: str, job: Job) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)
            return
        self._queues[key] = deque([job])
        task = asyncio.create_task(self._run(key), name=f"{self.name}-{key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: str) -> None:
        queue = self._queues[key]
        try:
            while queue:
                job = queue[0]
                try:
                    await job()
                except Exception:  # one failed job must not stop the conversation's others
                    logger.exception("%s job for %s failed", self.name, key)
                queue.popleft()
        finally:
            self._queues.pop(key, None)

    @property
    def busy(self) -> int:
        return len(self._tasks)

    async def join(self, timeout: float | None = None) -> bool:
        """Wait for every submitted job (also ones submitted meanwhile)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._tasks:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    async def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
