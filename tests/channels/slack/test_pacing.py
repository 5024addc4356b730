"""Per-channel pacing and per-conversation ordering, against the fake Slack Web API."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from channels.slack.channel import make_client
from channels.slack.pacing import ChannelPoster, Job, SerialWorkers, TokenBucket
from tests.fakes.slack_api import BOT_TOKEN, FakeSlack


def test_the_bucket_spends_the_burst_then_paces() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert [bucket.delay(), bucket.delay()] == [0.0, 0.0]
    assert bucket.delay() == pytest.approx(0.5)
    assert bucket.delay() == pytest.approx(1.0)  # queued behind the previous one
    now[0] = 10.0
    assert bucket.full() and bucket.delay() == 0.0
    bucket.restart()  # the call was answered at 10.0: refill from there
    now[0] = 10.25
    assert bucket.delay() == pytest.approx(0.25)
    with pytest.raises(ValueError):
        TokenBucket(rate=0)


async def test_jobs_run_in_order_per_key_and_concurrently_across_keys() -> None:
    workers = SerialWorkers("test")
    log: list[str] = []
    gate = asyncio.Event()

    def job(name: str, *, wait: bool = False, fail: bool = False) -> Job:
        async def run() -> None:
            if wait:
                await gate.wait()
            if fail:
                raise RuntimeError("boom")
            log.append(name)
        return run

    workers.submit("a", job("a1", wait=True))
    workers.submit("a", job("a2", fail=True))
    workers.submit("a", job("a3"))
    workers.submit("b", job("b1"))
    await asyncio.sleep(0.01)
    assert log == ["b1"]  # "a" waits, "b" does not wait for it
    gate.set()
    assert await workers.join(1.0)
    assert log == ["b1", "a1", "a3"] and workers.busy == 0  # a failed job stops nothing


async def test_posts_leave_in_order_one_per_interval() -> None:
    async with FakeSlack() as fake:
        poster = ChannelPoster(make_client(BOT_TOKEN, fake.api_url), rate=10.0)
        futures = [poster.post({"channel": "C1", "text": f"m{n}"}) for n in range(4)]
        other = poster.post({"channel": "C2", "text": "elsewhere"})
        answers = await asyncio.gather(*futures, other)
        assert all(a is not None and a["ok"] for a in answers)
        assert [m["text"] for m in fake.posted("C1")] == ["m0", "m1", "m2", "m3"]
        at = [c.at for c in fake.calls_to("chat.postMessage") if c.params["channel"] == "C1"]
        assert all(b - a >= 0.1 for a, b in itertools.pairwise(at))
        c2 = next(c.at for c in fake.calls if c.params.get("channel") == "C2")
        assert c2 < at[1]  # another channel is not held up
        assert await poster.flush(1.0) and poster.pending == 0


async def test_a_failed_post_resolves_to_none_and_the_next_one_goes() -> None:
    async with FakeSlack() as fake:
        poster = ChannelPoster(make_client(BOT_TOKEN, fake.api_url), rate=100.0)
        fake.fail("chat.postMessage", "channel_not_found")
        failed = poster.post({"channel": "C1", "text": "lost"})
        sent = poster.post({"channel": "C1", "text": "kept"})
        assert await failed is None and (await sent or {}).get("ok")
        assert poster.failures == 1
        await poster.close()


async def test_close_cancels_what_could_not_be_sent_in_time() -> None:
    async with FakeSlack() as fake:
        poster = ChannelPoster(make_client(BOT_TOKEN, fake.api_url), rate=1.0)
        first = poster.post({"channel": "C1", "text": "now"})
        late = poster.post({"channel": "C1", "text": "in a second"})
        await first
        await poster.close(timeout=0.1)
        assert late.cancelled()
        assert [m["text"] for m in fake.posted("C1")] == ["now"]
