"""Handoff end to end in headless Chromium: the customer's widget and the agent console.

Playwright drives Debian's ``/usr/bin/chromium`` (never a downloaded browser)
against a live server (offline model, temporary SQLite, the demo agents).
Screenshots of both pages go to ``test-artifacts/``. Without chromium the
tests skip, except under ``CI=true`` where they fail: CI must run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine.demo.shop import ORDER_SMALL, ORDER_TRANSIT, TRACKING_TRANSIT
from tests.channels.web.conftest import LiveServer, live_settings, start_live_server
from tests.engine.server.conftest import AGENTS, PASSWORD

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 10_000

try:
    from playwright.async_api import Browser, Locator, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the dev extra is not installed
    HAVE_PLAYWRIGHT = False
else:
    HAVE_PLAYWRIGHT = True


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: browser tests must run; apt-get install chromium)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_PLAYWRIGHT:
        _unavailable("playwright is not installed (pip install -e .[dev])")
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                    args=LAUNCH_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, **overrides: Any) -> AsyncIterator[LiveServer]:
    """A live server with the demo agents (cheaply hashed) and ``overrides``."""
    server = await start_live_server(live_settings(tmp_path, agents=AGENTS, **overrides))
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[LiveServer]:
    async with serve(tmp_path) as server:
        yield server


class Shots:
    """Numbered screenshots of one test in test-artifacts/."""

    def __init__(self, prefix: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.prefix = prefix
        self.n = 0

    async def __call__(self, page: Page, name: str) -> None:
        self.n += 1
        await page.screenshot(path=str(ARTIFACTS / f"{self.prefix}-{self.n:02d}-{name}.png"),
                              animations="disabled")


#: Uncaught script errors per page; the tests check their pages had none.
PAGE_ERRORS: dict[int, list[str]] = {}


async def new_page(browser: Browser) -> Page:
    """A page in its own context (own cookies) that records uncaught script errors."""
    context = await browser.new_context(viewport={"width": 1366, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    errors: list[str] = []
    PAGE_ERRORS[id(page)] = errors
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page


def script_errors(*pages: Page) -> list[str]:
    return [e for page in pages for e in PAGE_ERRORS.get(id(page), [])]


# --------------------------------------------------------------------------- the customer


class Customer:
    """The demo shop page with the chat widget (elements in its open shadow root)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.messages = page.locator("[data-testid=helpline-message]")

    async def open(self, url: str) -> None:
        await self.page.goto(f"{url}/chat/")
        panel = self.page.locator("[data-testid=helpline-panel]")
        if not await panel.is_visible():
            await self.page.locator("[data-testid=helpline-launcher]").click()
        await expect(panel).to_be_visible()

    async def say(self, text: str) -> None:
        await self.page.locator("[data-testid=helpline-input]").fill(text)
        await self.page.locator("[data-testid=helpline-send]").click()

    def said(self, author: str, text: str | re.Pattern[str]) -> Locator:
        return self.page.locator(f"[data-testid=helpline-message][data-author={author}]",
                                 has_text=text)

    async def expect(self, author: str, text: str | re.Pattern[str]) -> None:
        await expect(self.said(author, text).last).to_be_visible()


async def refund_and_rate(customer: Customer, rating: int) -> None:
    await customer.say("I want a refund")
    await customer.expect("bot", "What is your order number?")
    await customer.say(ORDER_SMALL)
    await customer.expect("bot", "What's the reason for the refund")
    await customer.say("it arrived damaged")
    await customer.expect("bot", "Shall I go ahead?")
    await customer.say("yes")
    await customer.expect("bot", re.compile(r"Refund RF\d+ of ¥129\.00 is approved"))
    await customer.page.locator(f"[data-testid=helpline-rating-{rating}]").click()
    await customer.expect("bot", re.compile(r"(passing this to|connecting you with) a colleague"))


# --------------------------------------------------------------------------- the agent


class Agent:
    """The agent console page."""

    def __init__(self, page: Page) -> None:
        self.page = page

    async def login(self, url: str, name: str) -> None:
        await self.page.goto(f"{url}/agent/")
        await self.page.get_by_test_id("login-name").fill(name)
        await self.page.get_by_test_id("login-password").fill(PASSWORD)
        await self.page.get_by_test_id("login-submit").click()
        await expect(self.page.get_by_test_id("connection")).to_have_text("Live")

    def item(self, reason: str | None = None) -> Locator:
        selector = "[data-testid=queue-item]" + (f"[data-reason={reason}]" if reason else "")
        return self.page.locator(selector)

    async def open_first(self, reason: str) -> None:
        await self.item(reason).first.click()
        await expect(self.page.get_by_test_id("owner-badge")).to_be_visible()

    async def write(self, text: str, *, note: bool = False) -> None:
        await self.page.get_by_test_id("mode-note" if note else "mode-reply").click()
        box = self.page.get_by_test_id("composer-input")
        await box.fill(text)
        await box.press("Control+Enter")
        await expect(box).to_have_value("")

    def transcript(self) -> Locator:
        return self.page.get_by_test_id("transcript")


# --------------------------------------------------------------------------- tests


async def test_rating_handoff_claim_reply_note_and_hand_back(browser: Browser,
                                                             live: LiveServer) -> None:
    shots = Shots("handoff")
    customer = Customer(await new_page(browser))
    agent = Agent(await new_page(browser))

    # The customer gets a refund, then rates the conversation 2: a handoff.
    await customer.open(live.url)
    await refund_and_rate(customer, 2)
    await shots(customer.page, "customer-rated-2")

    # It shows up in the console, live, as an unhappy customer.
    await agent.login(live.url, "alice")
    item = agent.item("satisfaction")
    await expect(item).to_have_count(1)
    await expect(item).to_contain_text("customer rated the conversation 2/5")
    await expect(item).to_contain_text("High")
    await shots(agent.page, "agent-queue")

    await agent.open_first("satisfaction")
    page = agent.page
    await expect(page.get_by_test_id("owner-badge")).to_have_text("Waiting for an agent")
    order = page.locator("[data-testid=entity][data-name=order_id]")
    await expect(order.get_by_test_id("entity-value")).to_have_text(ORDER_SMALL)
    await expect(order).to_contain_text("customer said")
    await expect(page.get_by_test_id("summary")).to_contain_text(ORDER_SMALL)
    await expect(page.get_by_test_id("transcript")).to_contain_text("it arrived damaged")

    # Claim and reply: the customer sees the agent's bubble.
    await page.get_by_test_id("claim-button").click()
    await expect(page.get_by_test_id("owner-badge")).to_have_text("With you")
    await agent.write("Hi, I'm Alice from the support team. I'm sorry the order disappointed you.")
    await expect(page.get_by_test_id("msg-agent")).to_contain_text("Hi, I'm Alice")
    await customer.expect("agent", "Hi, I'm Alice")
    await shots(customer.page, "customer-sees-agent")

    # The customer answers; the agent sees it live.
    await customer.say("the box was soaked, 盒子都湿了")
    await expect(page.get_by_test_id("transcript")).to_contain_text("盒子都湿了")

    # An internal note: agents see it, the customer never does.
    note = "Refund already issued; offer a voucher. 内部备注"
    await agent.write(note, note=True)
    await expect(page.get_by_test_id("note")).to_contain_text(note)
    await shots(agent.page, "agent-claimed-reply-note")

    # Hand back: the customer is told, and the bot answers the next message.
    await page.get_by_test_id("handback-button").click()
    await page.get_by_test_id("handback-note").fill("apologised for the packaging")
    await page.get_by_test_id("handback-confirm").click()
    await expect(page.get_by_test_id("owner-badge")).to_have_text("With the bot")
    await customer.expect("bot", "I'm the AI assistant again")
    await customer.say(f"where is my parcel {ORDER_TRANSIT}?")
    await customer.expect("bot", TRACKING_TRANSIT)
    # The console, still watching, sees the bot's turn arrive.
    await expect(page.get_by_test_id("transcript")).to_contain_text(TRACKING_TRANSIT)
    await expect(agent.item()).to_have_count(0)

    assert await customer.page.get_by_text(note).count() == 0
    assert "内部备注" not in await customer.page.locator(
        "[data-testid=helpline-messages]").inner_text()
    await shots(customer.page, "customer-bot-resumed")
    await shots(agent.page, "agent-handed-back")
    assert script_errors(customer.page, agent.page) == []


async def test_two_agents_claim_at_once_exactly_one_wins(browser: Browser,
                                                         live: LiveServer) -> None:
    shots = Shots("claim-race")
    customer = Customer(await new_page(browser))
    await customer.open(live.url)
    await customer.say("I want to talk to a human agent")
    await customer.expect("bot", re.compile(r"(passing this to|connecting you with) a colleague"))

    alice, bob = Agent(await new_page(browser)), Agent(await new_page(browser))
    await asyncio.gather(alice.login(live.url, "alice"), bob.login(live.url, "bob"))
    for agent in (alice, bob):
        await agent.open_first("request")
        await expect(agent.page.get_by_test_id("claim-button")).to_be_visible()
    claims: list[int] = []
    for agent in (alice, bob):
        agent.page.on("response", lambda r: claims.append(r.status)
                      if r.url.endswith("/claim") else None)
    # Both click at once. dispatch_event skips Playwright's actionability
    # waits: a live update may already have hidden one button, and that page
    # must then not claim at all.
    await asyncio.gather(alice.page.get_by_test_id("claim-button").dispatch_event("click"),
                         bob.page.get_by_test_id("claim-button").dispatch_event("click"))

    badges = [a.page.get_by_test_id("owner-badge") for a in (alice, bob)]
    for badge in badges:
        await expect(badge).to_have_text(re.compile(r"With (you|Alice|Bob)"))
    texts = [await badge.inner_text() for badge in badges]
    assert sorted(texts) in (["With Alice", "With you"], ["With Bob", "With you"]), texts
    # Normally both requests race on the server: one 200, one 409 (conflict).
    assert sorted(claims) in ([200, 409], [200]), claims
    loser = (alice, bob)[texts.index("With you") ^ 1]
    await expect(loser.page.get_by_test_id("composer-blocked")).to_contain_text(
        "is handling this conversation")
    conv = (await live.context.desk.queue())[0]
    assert conv.owner == "human" and conv.owner_agent in ("alice", "bob")
    await shots(alice.page, "alice")
    await shots(bob.page, "bob")
    assert script_errors(customer.page, alice.page, bob.page) == []


async def test_queue_timeout_hands_back_with_an_apology(browser: Browser,
                                                        tmp_path: Path) -> None:
    shots = Shots("queue-timeout")
    async with serve(tmp_path, handoff_queue_timeout=1) as live:
        customer = Customer(await new_page(browser))
        agent = Agent(await new_page(browser))
        await agent.login(live.url, "bob")
        await customer.open(live.url)
        await customer.say("我要找人工客服")
        await customer.expect("bot", "转接人工客服")
        await expect(agent.item("request")).to_have_count(1)

        await asyncio.sleep(1.1)
        await live.context.desk.expire()  # unless the server's own expiry loop was first
        await customer.expect("bot", re.compile(r"非常抱歉.*CB[0-9A-F]{8}"))
        await expect(agent.item()).to_have_count(0)
        await expect(agent.page.get_by_test_id("queue-empty")).to_be_visible()
        await shots(customer.page, "customer-apology")
        await shots(agent.page, "agent-queue-empty")
        assert script_errors(customer.page, agent.page) == []
