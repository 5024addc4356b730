"""The pure Slack conversions: events and buttons in, mrkdwn and Block Kit out."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channels.slack.convert import (
    TEXT_LIMIT,
    ButtonPress,
    chosen_blocks,
    conversation_key,
    customer_id,
    escape,
    from_slack,
    inbound_from_message,
    inbound_from_press,
    message_payloads,
    parse_button_press,
    parse_message_event,
    split_text,
    thread_of,
    to_mrkdwn,
)
from engine.core.types import Outbound, QuickReply
from engine.store.base import ConversationKey

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def envelope(**event: Any) -> dict[str, Any]:
    base = {"type": "message", "channel": "C1", "user": "U1", "text": "hi",
            "ts": "1700000000.000100", "team": "T1"}
    base.update(event)
    return {"type": "event_callback", "team_id": "T1", "event_id": "Ev1",
            "event": {k: v for k, v in base.items() if v is not None}}


# -- in: message events ---------------------------------------------------------------------


def test_a_top_level_message_starts_its_own_thread() -> None:
    message = parse_message_event(envelope())
    assert message is not None and not message.in_thread
    inbound = inbound_from_message(message, NOW)
    assert inbound.key == ConversationKey("slack", "T1", "C1:1700000000.000100")
    assert inbound.customer == "slack:T1:U1" and inbound.channel_message_id == "Ev1"
    assert inbound.text == "hi" and inbound.received_at == NOW


def test_a_reply_belongs_to_its_threads_conversation() -> None:
    message = parse_message_event(envelope(ts="1700000000.000200",
                                           thread_ts="1700000000.000100"))
    assert message is not None and message.in_thread
    assert inbound_from_message(message, NOW).key.thread == "C1:1700000000.000100"


@pytest.mark.parametrize("event", [
    {"subtype": "message_changed"},
    {"subtype": "message_deleted"},
    {"subtype": "channel_join"},
    {"subtype": "bot_message", "bot_id": "B1"},
    {"bot_id": "B1"},
    {"user": "U0BOT"},
    {"user": None},
    {"text": "   "},
    {"type": "reaction_added"},
])
def test_what_is_not_a_person_writing_is_ignored(event: dict[str, Any]) -> None:
    assert parse_message_event(envelope(**event), bot_user_id="U0BOT") is None


def test_thread_broadcasts_and_file_shares_are_messages() -> None:
    for subtype in ("thread_broadcast", "file_share"):
        assert parse_message_event(envelope(subtype=subtype)) is not None


def test_keys_round_trip() -> None:
    key = conversation_key("T1", "C1", "1.2")
    assert thread_of(key) == ("C1", "1.2")
    assert customer_id("T1", "U1") == "slack:T1:U1"
    with pytest.raises(ValueError):
        thread_of(ConversationKey("web", "site", "C1:1.2"))


# -- in: Slack markup -----------------------------------------------------------------------


@pytest.mark.parametrize(("slack", "plain"), [
    ("<@U123>", "@U123"),
    ("<@U123|ann>", "@ann"),
    ("<#C1|general>", "#general"),
    ("<!channel> <!here>", "@channel @here"),
    ("<!subteam^S1|@ops>", "@ops"),
    ("<https://a.example/x|the site>", "the site (https://a.example/x)"),
    ("<https://a.example/x>", "https://a.example/x"),
    ("<mailto:a@b.example|a@b.example>", "a@b.example"),
    ("&lt;!channel&gt; &amp; &lt;@U1&gt;", "<!channel> & <@U1>"),
])
def test_slack_markup_is_read_as_the_plain_text_people_saw(slack: str, plain: str) -> None:
    assert from_slack(slack) == plain


# -- in: buttons ----------------------------------------------------------------------------


def press_body(action_id: str, value: str, **message: Any) -> dict[str, Any]:
    return {"type": "block_actions", "user": {"id": "U1", "team_id": "T1"},
            "team": {"id": "T1"},
            "container": {"type": "message", "channel_id": "C1", "message_ts": "1.3",
                          "thread_ts": "1.1"},
            "message": {"ts": "1.3", "thread_ts": "1.1", **message},
            "actions": [{"action_id": "someone_elses", "value": "x"},
                        {"action_id": action_id, "value": value, "action_ts": "9.9"}]}


def test_a_rating_button_is_a_rating_turn_once_per_prompt() -> None:
    press = parse_button_press(press_body("hl_rate_2", "rating:2"))
    assert press is not None and press.root == "1.1"
    inbound = inbound_from_press(press, NOW)
    assert inbound is not None
    assert (inbound.kind, inbound.rating, inbound.text) == ("rating", 2, "2")
    assert inbound.key == ConversationKey("slack", "T1", "C1:1.1")
    assert inbound.channel_message_id == "button:C1:1.3"


def test_a_quick_reply_button_sends_its_payload() -> None:
    press = parse_button_press(press_body("hl_quick_0", "Track my order"))
    assert press is not None
    inbound = inbound_from_press(press, NOW)
    assert inbound is not None and inbound.kind == "quick_reply"
    assert inbound.text == "Track my order" and inbound.data == {"payload": "Track my order"}


@pytest.mark.parametrize(("action_id", "value"), [
    ("hl_rate_9", "rating:9"), ("hl_rate_x", "rating:x"), ("hl_quick_0", ""),
    ("hl_desk_claim", "conv-1"),
])
def test_other_or_broken_buttons_are_not_turns(action_id: str, value: str) -> None:
    press = parse_button_press(press_body(action_id, value))
    assert press is not None and inbound_from_press(press, NOW) is None


def test_payloads_without_our_buttons_are_ignored() -> None:
    body = press_body("hl_quick_0", "x")
    body["actions"] = [{"action_id": "other", "value": "x"}]
    assert parse_button_press(body) is None
    assert parse_button_press({"type": "view_submission"}) is None


def test_the_choice_replaces_the_buttons() -> None:
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": "Rate us"}},
        {"type": "actions", "elements": [
            {"type": "button", "action_id": "hl_rate_4", "value": "rating:4",
             "text": {"type": "plain_text", "text": "4 <stars>"}}]}]
    press = ButtonPress("T1", "C1", "U1", "1.3", "1.1", "hl_rate_4", "rating:4", "9.9",
                        tuple(blocks))
    shown = chosen_blocks(press)
    assert [b["type"] for b in shown] == ["section", "context"]
    assert shown[1]["elements"][0]["text"] == "You chose: *4 &lt;stars&gt;*"


# -- out: mrkdwn ----------------------------------------------------------------------------


def test_escaping_neutralises_mentions_links_and_entities() -> None:
    text = "<!channel> <@U123> <https://evil.example|bank> & &amp;"
    assert escape(text) == ("&lt;!channel&gt; &lt;@U123&gt; "
                            "&lt;https://evil.example|bank&gt; &amp; &amp;amp;")
    converted = to_mrkdwn(text)
    assert "<" not in converted and ">" not in converted
    assert from_slack(converted) == text  # exactly what was written is shown


@pytest.mark.parametrize(("markdown", "mrkdwn"), [
    ("**bold** and __strong__", "*bold* and *strong*"),
    ("an *aside* here", "an _aside_ here"),
    ("~~gone~~", "~gone~"),
    ("## Refunds", "*Refunds*"),
    ("- one\n* two\n+ three", "• one\n• two\n• three"),
    ("`a <b> **c**`", "`a &lt;b&gt; **c**`"),
    ("```\nx < 1 **y**\n```", "```\nx &lt; 1 **y**\n```"),
    ("2 * 3 * 4", "2 * 3 * 4"),
])
def test_light_markdown_becomes_mrkdwn(markdown: str, mrkdwn: str) -> None:
    assert to_mrkdwn(markdown) == mrkdwn


def test_only_allow_listed_links_become_links() -> None:
    text = ("see [our policy](https://shop.example/returns?a=1&b=2) or "
            "[your bank](https://evil.example/login) or [x](https://sub.shop.example/p)")
    assert to_mrkdwn(text, {"shop.example"}) == (
        "see <https://shop.example/returns?a=1&amp;b=2|our policy> or your bank or "
        "<https://sub.shop.example/p|x>")
    assert to_mrkdwn("[a|b](https://shop.example/)", {"shop.example"}) == \
        "<https://shop.example/|a¦b>"
    assert to_mrkdwn("[x](https://shop.example.evil.example/)", {"shop.example"}) == "x"


# -- out: splitting -------------------------------------------------------------------------


def test_long_text_splits_at_paragraphs_then_lines() -> None:
    paragraphs = [f"Paragraph {n}: " + "word " * 150 for n in range(12)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    chunks = split_text(text)
    assert len(chunks) > 1 and all(len(c) <= TEXT_LIMIT for c in chunks)
    assert all(c.startswith("Paragraph") for c in chunks)  # cut between paragraphs
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())


def test_a_hard_cut_never_breaks_an_entity_or_a_link() -> None:
    text = "x" * 2996 + "&amp;" + "y" * 10
    chunks = split_text(text)
    assert chunks[0] == "x" * 2996 and chunks[1].startswith("&amp;")
    linked = "z" * 2990 + "<https://a.example|a>" + "w"
    assert split_text(linked)[1].startswith("<https://a.example|a>")


@settings(deadline=None)  # pure and fast, but CI machines stall
@given(st.text(alphabet=st.sampled_from("ab &<>\n*_"), max_size=400),
       st.integers(min_value=16, max_value=60))
def test_split_chunks_fit_and_keep_every_word(text: str, limit: int) -> None:
    converted = to_mrkdwn(text)
    chunks = split_text(converted, limit)
    assert all(0 < len(c) <= limit for c in chunks)
    assert "".join("".join(chunks).split()) == "".join(converted.split())


# -- out: chat.postMessage arguments ---------------------------------------------------------


def outbound(text: str, quick: tuple[QuickReply, ...] = ()) -> Outbound:
    return Outbound(conversation_id="c1", key=conversation_key("T1", "C1", "1.1"), seq=7,
                    text=text, quick_replies=quick)


def test_replies_go_to_the_thread_without_unfurls_or_pings() -> None:
    [payload] = message_payloads(outbound("Hi <!here>"))
    assert payload == {"channel": "C1", "thread_ts": "1.1", "text": "Hi &lt;!here&gt;",
                       "mrkdwn": True, "unfurl_links": False, "unfurl_media": False,
                       "link_names": False}


def test_quick_replies_and_ratings_become_buttons_on_the_last_chunk() -> None:
    quick = (QuickReply("Yes, refund it", "yes"), QuickReply("1", "rating:1"),
             QuickReply("x" * 100, "long"))
    payloads = message_payloads(outbound("word " * 1000, quick))
    assert len(payloads) == 2 and "blocks" not in payloads[0]
    section, actions = payloads[1]["blocks"]
    assert section["text"] == {"type": "mrkdwn", "text": payloads[1]["text"]}
    assert [(e["action_id"], e["value"]) for e in actions["elements"]] == [
        ("hl_quick_0", "yes"), ("hl_rate_1", "rating:1"), ("hl_quick_2", "long")]
    assert len(actions["elements"][2]["text"]["text"]) == 75


def test_conversion_stays_fast_on_hostile_text() -> None:
    started = time.perf_counter()
    for hostile in ("**a" * 20_000, "*a " * 20_000, "[x](" * 10_000, "`" + "a`" * 20_000,
                    "<" * 40_000, "~~" + "a" * 40_000):
        split_text(to_mrkdwn(hostile))
    assert time.perf_counter() - started < 5.0


def test_demo_deployments_prefix_the_customer_identity() -> None:
    from channels.slack.convert import customer_id

    assert customer_id("T1", "U2") == "slack:T1:U2"
    assert customer_id("T1", "U2", demo=True) == "demo:slack:T1:U2"
