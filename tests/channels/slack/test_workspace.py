"""Slack as the agents' workspace: handoffs from any channel become threads agents work in."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from channels.slack.workspace import CLAIM, HAND_BACK, HANDOFF_EVENT, RESOLVE
from engine.store.base import ConversationKey, ConversationState
from tests.channels.slack.conftest import AGENTS, SUPPORT, SlackFactory, SlackHarness

ALICE, BOB = "U0ALICE", "U0BOB"
HUMAN = "I want to talk to a human"


async def web_conv(slack: SlackHarness, thread: str = "w1") -> ConversationState:
    conv = await slack.store.load(ConversationKey("test", "shop", thread))
    assert conv is not None
    return conv  # type: ignore[no-any-return]


async def hand_off(slack: SlackHarness, thread: str = "w1") -> dict[str, Any]:
    """A customer on another channel asks for a human; returns the thread root."""
    await slack.web_customer(HUMAN, thread)
    assert (await web_conv(slack, thread)).owner == "pending_human"
    conv = await web_conv(slack, thread)
    roots = [m for m in slack.fake.posted(AGENTS) if "thread_ts" not in m
             and m["metadata"]["event_payload"]["conversation_id"] == conv.id]
    assert len(roots) == 1
    return roots[0]


async def press(slack: SlackHarness, root: dict[str, Any], action_id: str, user: str) -> None:
    # A copy: the client shows the message as it was when the agent pressed.
    payload = slack.events.block_actions(user, copy.deepcopy(root), action_id, channel=AGENTS)
    response = await slack.events.send_action(payload)
    assert response.status_code == 200
    await slack.settle()


async def agent_says(slack: SlackHarness, root: dict[str, Any], text: str, user: str) -> None:
    await slack.say(text, user=user, channel=AGENTS, thread_ts=root["ts"])


def thread_texts(slack: SlackHarness, root: dict[str, Any]) -> list[str]:
    return [m["text"] for m in slack.fake.posted(AGENTS, thread_ts=root["ts"])]


def ephemeral_to(slack: SlackHarness, user: str) -> list[str]:
    return [str(e["text"]) for e in slack.fake.ephemeral if e["user"] == user]


def buttons(message: dict[str, Any]) -> list[str]:
    return [e["action_id"] for b in message.get("blocks", []) if b["type"] == "actions"
            for e in b["elements"]]


async def test_a_handoff_is_worked_end_to_end_from_slack(slack: SlackHarness) -> None:
    root = await hand_off(slack)
    conv = await web_conv(slack)
    # The root: what happened, the conversation's id in the metadata, three buttons.
    assert root["metadata"]["event_type"] == HANDOFF_EVENT
    head = root["blocks"][0]["text"]["text"]
    assert "*Reason:* request" in head and "*Customer on:* test" in head
    assert f"*Last message:*\n>{HUMAN}" in root["blocks"][1]["text"]["text"]
    assert buttons(root) == [CLAIM, HAND_BACK, RESOLVE]
    assert "Waiting for an agent" in str(root["blocks"])

    await press(slack, root, CLAIM, ALICE)
    conv = await web_conv(slack)
    assert (conv.owner, conv.owner_agent) == ("human", f"slack:{ALICE}")
    assert thread_texts(slack, root)[-1] == f":raised_hand: Claimed by <@{ALICE}>"
    assert f"Claimed by <@{ALICE}>" in str(slack.fake.find(AGENTS, root["ts"]))

    await agent_says(slack, root, "Hi, Alice here &amp; happy to help", ALICE)
    reply = slack.sent[-1]
    assert (reply.kind, reply.author, reply.text) == (
        "agent", f"agent:slack:{ALICE}", "Hi, Alice here & happy to help")

    await slack.web_customer("my parcel <b>never</b> came")  # muted: the agent sees it
    assert thread_texts(slack, root)[-1] == (
        ":bust_in_silhouette: *Customer:* my parcel &lt;b&gt;never&lt;/b&gt; came")
    assert slack.sent[-1] is reply  # the bot stayed silent

    await agent_says(slack, root, "// customer seems upset", ALICE)
    notes = [r for r in await slack.store.messages(conv.id) if r.kind == "note"]
    assert [n.text for n in notes] == ["customer seems upset"] and slack.sent[-1] is reply

    await press(slack, root, HAND_BACK, ALICE)
    assert (await web_conv(slack)).owner == "bot"
    assert slack.sent[-1].text.startswith("Thanks for your patience!")
    assert thread_texts(slack, root)[-1] == (
        f":robot_face: Handed back to the bot by <@{ALICE}>")
    shown = slack.fake.find(AGENTS, root["ts"])
    assert shown is not None and buttons(shown) == []  # nothing left to press
    before = len(thread_texts(slack, root))
    bot_replies = await slack.web_customer("thanks, bye")
    assert bot_replies and bot_replies[0].author == "bot"  # the bot answers again
    assert len(thread_texts(slack, root)) == before  # and nothing is mirrored


async def test_ownership_rules_are_the_consoles(slack: SlackHarness) -> None:
    root = await hand_off(slack)
    await agent_says(slack, root, "hello?", BOB)  # not claimed yet
    assert ephemeral_to(slack, BOB) == ["Not sent to the customer: claim the conversation "
                                        "first."]
    await asyncio.gather(press(slack, root, CLAIM, ALICE), press(slack, root, CLAIM, BOB))
    conv = await web_conv(slack)
    winner = conv.owner_agent
    assert winner in (f"slack:{ALICE}", f"slack:{BOB}")
    loser = BOB if winner == f"slack:{ALICE}" else ALICE
    assert ephemeral_to(slack, loser)[-1].startswith("You can't claim this conversation")
    sent = len(slack.sent)
    await agent_says(slack, root, "let me take over", loser)
    assert ephemeral_to(slack, loser)[-1] == (
        f"Not sent to the customer: it is owned by {winner}.")
    assert len(slack.sent) == sent
    await press(slack, root, HAND_BACK, loser)
    assert (await web_conv(slack)).owner == "human"
    await press(slack, root, RESOLVE, loser)
    assert ephemeral_to(slack, loser)[-1].startswith("You can't resolve")
    await press(slack, root, RESOLVE, winner.removeprefix("slack:"))
    conv = await web_conv(slack)
    assert (conv.owner, conv.closed) == ("resolved", True)
    assert thread_texts(slack, root)[-1].startswith(":white_check_mark: Resolved by <@")
    assert slack.sent[-1].text.startswith("Your conversation has been marked as resolved")


async def test_console_work_is_mirrored_into_the_thread(slack: SlackHarness) -> None:
    root = await hand_off(slack)
    conv = await web_conv(slack)
    desk = slack.live.context.desk
    await desk.claim(conv.id, "alice")
    await desk.reply(conv.id, "alice", "Checking <now> & then")
    await desk.note(conv.id, "alice", "VIP")
    await slack.settle()
    assert thread_texts(slack, root)[-3:] == [
        ":raised_hand: Claimed by *alice*",
        ":speech_balloon: *alice* (console): Checking &lt;now&gt; &amp; then",
        ":memo: Note by *alice*: VIP"]
    await desk.resolve(conv.id, "alice")
    await slack.settle()
    assert thread_texts(slack, root)[-1] == ":white_check_mark: Resolved by *alice*"


async def test_a_slack_customer_is_answered_in_their_own_thread(slack: SlackHarness) -> None:
    envelope = await slack.say(HUMAN)
    customer_root = envelope["event"]["ts"]
    [root] = await slack.fake.wait_posted(AGENTS, 1)
    assert "*Customer on:* slack" in root["blocks"][0]["text"]["text"]
    await press(slack, root, CLAIM, ALICE)
    await agent_says(slack, root, "Alice here", ALICE)
    assert slack.fake.posted(SUPPORT, thread_ts=customer_root)[-1]["text"] == "Alice here"
    await slack.say("great, thanks", thread_ts=customer_root)
    assert thread_texts(slack, root)[-1] == ":bust_in_silhouette: *Customer:* great, thanks"


async def test_threads_survive_a_restart(slack_factory: SlackFactory) -> None:
    first = await slack_factory()
    root = await hand_off(first)
    await press(first, root, CLAIM, ALICE)
    await first.live.stop()

    second = await slack_factory(database_url=first.live.settings.database_url)
    await second.settle()
    # Learned from Slack (the root's metadata); nothing was posted twice.
    roots = [m for m in second.fake.posted(AGENTS) if "thread_ts" not in m]
    assert roots == [root]
    await agent_says(second, root, "still here", ALICE)
    assert second.sent[-1].text == "still here"
    await second.web_customer("you are back!")
    assert thread_texts(second, root)[-1] == ":bust_in_silhouette: *Customer:* you are back!"


async def test_waiting_handoffs_without_a_thread_are_posted_at_start(
        slack_factory: SlackFactory) -> None:
    first = await slack_factory(slack_agents_channel=None)
    await first.web_customer(HUMAN)
    assert first.fake.posted(AGENTS) == []
    await first.live.stop()

    second = await slack_factory(database_url=first.live.settings.database_url)
    [root] = await second.fake.wait_posted(AGENTS, 1)
    conv = await web_conv(second)
    assert root["metadata"]["event_payload"]["conversation_id"] == conv.id
    await press(second, root, CLAIM, BOB)
    assert (await web_conv(second)).owner_agent == f"slack:{BOB}"


async def test_a_queue_timeout_closes_the_thread(slack: SlackHarness) -> None:
    root = await hand_off(slack)
    desk = slack.live.context.desk
    desk.queue_timeout = 0.001
    assert await desk.expire() == [(await web_conv(slack)).id]
    await slack.settle()
    assert thread_texts(slack, root)[-1].startswith(
        ":alarm_clock: No agent in time; back with the bot (callback ticket CB")
    shown = slack.fake.find(AGENTS, root["ts"])
    assert shown is not None and buttons(shown) == []
    assert "callback ticket" in slack.sent[-1].text
