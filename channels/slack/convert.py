"""Pure conversions between Slack payloads and the engine's envelopes. No I/O.

In: a ``message`` event (inside its ``event_callback`` envelope) or a
``block_actions`` payload becomes an :class:`~engine.core.types.Inbound`.
Out: an :class:`~engine.core.types.Outbound` becomes ``chat.postMessage``
arguments, one per chunk of at most :data:`TEXT_LIMIT` characters.

Conversation key: ``ConversationKey("slack", team, f"{channel}:{thread}")``
where ``thread`` is the root message's ``ts`` (``thread_ts``, or the
message's own ``ts`` when it starts a thread); the bot always answers in that
thread. Slack's ``message_replied`` subtype is not reliable, so the root is
read from ``thread_ts`` directly
(https://docs.slack.dev/reference/events/message/message_replied/).

Text safety (https://api.slack.com/reference/surfaces/formatting): Slack
parses ``<...>`` as mentions (``<!channel>``, ``<@U123>``) and links
(``<https://x|label>``) and ``&`` as the start of an entity, so every piece
of text we did not write ourselves (the model's reply, the customer's words
in a template, an agent's message) is escaped (``&amp; &lt; &gt;``) and
renders literally. Only links we build, from Markdown ``[label](url)`` to an
allow-listed domain, become ``<url|label>``. Customer text arriving from
Slack is decoded to plain text first (:func:`from_slack`), so what the
engine stores and shows the model is what the customer saw.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from engine.core.types import Inbound, Outbound, QuickReply
from engine.store.base import ConversationKey

__all__ = [
    "ACTION_PREFIX",
    "CHANNEL",
    "QUICK_ACTION",
    "RATING_ACTION",
    "TEXT_LIMIT",
    "ButtonPress",
    "MessageEvent",
    "chosen_blocks",
    "conversation_key",
    "customer_id",
    "escape",
    "from_slack",
    "inbound_from_message",
    "inbound_from_press",
    "message_payloads",
    "parse_button_press",
    "parse_message_event",
    "quick_reply_blocks",
    "split_text",
    "thread_of",
    "to_mrkdwn",
]

CHANNEL = "slack"
#: A section block's text is capped at 3,000 characters; longer replies are split.
TEXT_LIMIT = 3000
#: Every action id we create starts with this; others are not ours.
ACTION_PREFIX = "hl_"
QUICK_ACTION = "hl_quick_"
RATING_ACTION = "hl_rate_"
#: Slack allows 25 elements in an actions block, 75 characters in a button label
#: and 2,000 in its value.
MAX_BUTTONS = 25
MAX_LABEL = 75
MAX_VALUE = 2000
#: Message subtypes that are a person writing; everything else (edits,
#: deletions, joins, bot messages) is not a customer turn.
HUMAN_SUBTYPES = frozenset({None, "thread_broadcast", "file_share"})


# --------------------------------------------------------------------------------------
# Keys and identities
# --------------------------------------------------------------------------------------


def conversation_key(team: str, channel: str, thread_ts: str) -> ConversationKey:
    """The conversation of a Slack thread."""
    return ConversationKey(CHANNEL, team, f"{channel}:{thread_ts}")


def thread_of(key: ConversationKey) -> tuple[str, str]:
    """``(channel, thread_ts)`` of a Slack conversation key."""
    channel, _, thread_ts = key.thread.partition(":")
    if key.channel != CHANNEL or not channel or not thread_ts:
        raise ValueError(f"not a Slack conversation key: {key}")
    return channel, thread_ts


def customer_id(team: str, user: str, *, demo: bool = False) -> str:
    """The engine's customer identity of a Slack user (from the event, never the text).

    ``demo`` deployments prefix ``demo:``, which the demo shop treats as allowed
    to see every demo order (like ``telegram_demo_customers``).
    """
    identity = f"{CHANNEL}:{team}:{user}"
    return f"demo:{identity}" if demo else identity


# --------------------------------------------------------------------------------------
# In: events and button presses
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """A person's message, read from an ``event_callback`` envelope."""

    event_id: str
    team: str
    channel: str
    user: str
    #: As Slack sent it (Slack markup); see :func:`from_slack`.
    text: str
    ts: str
    thread_ts: str | None
    channel_type: str = ""

    @property
    def root(self) -> str:
        """The thread the message belongs to (its own ``ts`` when it starts one)."""
        return self.thread_ts or self.ts

    @property
    def in_thread(self) -> bool:
        return self.thread_ts is not None and self.thread_ts != self.ts


def parse_message_event(body: Mapping[str, Any], *,
                        bot_user_id: str | None = None) -> MessageEvent | None:
    """The person's message in an Events API envelope, or None if it is not one.

    None for other event types, edits/deletions/joins (subtypes), messages of
    bots (``bot_id``, or our own user id), and messages without text or user.
    """
    event = body.get("event")
    if not isinstance(event, Mapping) or event.get("type") != "message":
        return None
    if event.get("subtype") not in HUMAN_SUBTYPES or event.get("bot_id"):
        return None
    user, text, ts, channel = (event.get("user"), event.get("text"), event.get("ts"),
                               event.get("channel"))
    if not all(isinstance(v, str) and v for v in (user, ts, channel)):
        return None
    if not isinstance(text, str) or not text.strip() or user == bot_user_id:
        return None
    team = event.get("team") or body.get("team_id")
    event_id = body.get("event_id")
    if not isinstance(team, str) or not isinstance(event_id, str) or not event_id:
        return None
    thread_ts = event.get("thread_ts")
    return MessageEvent(event_id=event_id, team=team, channel=str(channel), user=str(user),
                        text=text, ts=str(ts),
                        thread_ts=thread_ts if isinstance(thread_ts, str) else None,
                        channel_type=str(event.get("channel_type") or ""))


def inbound_from_message(message: MessageEvent, now: datetime, *,
                         demo: bool = False) -> Inbound:
    """The engine envelope; the Slack ``event_id`` is the redelivery key."""
    return Inbound(key=conversation_key(message.team, message.channel, message.root),
                   text=from_slack(message.text),
                   customer=customer_id(message.team, message.user, demo=demo),
                   received_at=now,
                   channel_message_id=message.event_id,
                   data={"ts": message.ts, "user": message.user})


@dataclass(frozen=True, slots=True)
class ButtonPress:
    """One button of ours pressed, read from a ``block_actions`` payload."""

    team: str
    channel: str
    user: str
    #: The message carrying the button, and the thread it is in.
    message_ts: str
    thread_ts: str | None
    action_id: str
    value: str
    action_ts: str
    #: The message's blocks as Slack sent them (to replace the buttons after a press).
    blocks: tuple[Mapping[str, Any], ...] = ()
    #: The message's (fallback) text.
    text: str = ""

    @property
    def root(self) -> str:
        return self.thread_ts or self.message_ts


def parse_button_press(body: Mapping[str, Any]) -> ButtonPress | None:
    """The first of our buttons in a ``block_actions`` payload, or None."""
    if body.get("type") != "block_actions":
        return None
    actions = body.get("actions")
    action = next((a for a in actions if isinstance(a, Mapping)
                   and str(a.get("action_id", "")).startswith(ACTION_PREFIX)), None) \
        if isinstance(actions, list) else None
    user, team = body.get("user"), body.get("team")
    container = body.get("container")
    message = body.get("message")
    if (action is None or not isinstance(user, Mapping) or not isinstance(container, Mapping)):
        return None
    team_id = (team.get("id") if isinstance(team, Mapping) else None) or user.get("team_id")
    channel = container.get("channel_id")
    message_ts = container.get("message_ts")
    if not all(isinstance(v, str) and v for v in (team_id, channel, message_ts, user.get("id"))):
        return None
    message = message if isinstance(message, Mapping) else {}
    thread_ts = container.get("thread_ts") or message.get("thread_ts")
    blocks = message.get("blocks")
    return ButtonPress(
        team=str(team_id), channel=str(channel), user=str(user["id"]),
        message_ts=str(message_ts),
        thread_ts=thread_ts if isinstance(thread_ts, str) else None,
        action_id=str(action["action_id"]), value=str(action.get("value") or ""),
        action_ts=str(action.get("action_ts") or ""),
        blocks=tuple(b for b in blocks if isinstance(b, Mapping))
        if isinstance(blocks, list) else (),
        text=str(message.get("text") or ""))


def inbound_from_press(press: ButtonPress, now: datetime, *,
                       demo: bool = False) -> Inbound | None:
    """A quick reply or rating button as a customer turn (None for other buttons).

    One answer per prompt: the redelivery key is the prompt message, so a
    second press on the same buttons (or a double click) is dropped.
    """
    if not press.action_id.startswith((QUICK_ACTION, RATING_ACTION)):
        return None
    common: dict[str, Any] = {
        "key": conversation_key(press.team, press.channel, press.root),
        "customer": customer_id(press.team, press.user, demo=demo), "received_at": now,
        "channel_message_id": f"button:{press.channel}:{press.message_ts}",
    }
    payload = press.value
    if payload.startswith("rating:"):
        value = payload.removeprefix("rating:")
        if value.isdigit() and 1 <= int(value) <= 5:
            return Inbound(text=value, kind="rating", rating=int(value), **common)
        return None
    if not payload:
        return None
    return Inbound(text=payload, kind="quick_reply", data={"payload": payload}, **common)


# --------------------------------------------------------------------------------------
# Text: Slack markup in, mrkdwn out
# --------------------------------------------------------------------------------------

_ANGLE = re.compile(r"<([^<>\n]*)>")


def escape(text: str) -> str:
    """Escape the three characters Slack treats as control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _decode_angle(match: re.Match[str]) -> str:
    inner = match.group(1)
    target, _, label = inner.partition("|")
    if target.startswith("@"):  # <@U123> or <@U123|name>
        return "@" + (label or target[1:])
    if target.startswith("#"):  # <#C123|general>
        return "#" + (label or target[1:])
    if target.startswith("!"):  # <!channel>, <!subteam^S1|@team>, <!date^...|fallback>
        if label:
            return label
        return "@" + target[1:].split("^", 1)[0]
    if target.startswith("mailto:"):
        return label or target.removeprefix("mailto:")
    if label and label != target:
        return f"{label} ({target})"
    return target


def from_slack(text: str) -> str:
    """Slack message markup as the plain text the person saw.

    ``<@U1>`` becomes ``@U1``, ``<!here>`` ``@here``, ``<https://x|site>``
    ``site (https://x)``, and ``&lt;`` ``<``; what a customer typed literally
    (``<!channel>`` arrives as ``&lt;!channel&gt;``) stays literal text.
    """
    return _unescape(_ANGLE.sub(_decode_angle, text))


_MD_LINK = re.compile(r"\[([^\[\]\n]{1,300})\]\((https?://[^\s()<>]{1,2000})\)")
_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)
# Spans are bounded (300 characters) so a line full of unmatched markers stays linear.
_INLINE = re.compile(
    r"\*\*(?=\S)(?P<b1>.{1,300}?)(?<=\S)\*\*"  # **bold**
    r"|__(?=\S)(?P<b2>.{1,300}?)(?<=\S)__"  # __bold__
    r"|~~(?=\S)(?P<s>.{1,300}?)(?<=\S)~~"  # ~~strike~~
    r"|(?<![*\w])\*(?=[^\s*])(?P<i>[^*\n]{1,300}?)(?<=\S)\*(?![*\w])"  # *italic*
)
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_BULLET = re.compile(r"^([ \t]*)[-*+][ \t]+", re.MULTILINE)


def _inline(text: str) -> str:
    """Markdown emphasis to mrkdwn, on already escaped text outside code."""
    def emphasis(match: re.Match[str]) -> str:
        if match.group("b1") is not None:
            return f"*{match.group('b1')}*"
        if match.group("b2") is not None:
            return f"*{match.group('b2')}*"
        if match.group("s") is not None:
            return f"~{match.group('s')}~"
        return f"_{match.group('i')}_"

    text = _BULLET.sub(lambda m: f"{m.group(1)}• ", text)
    text = _HEADING.sub(lambda m: f"**{m.group(1)}**", text)
    return _INLINE.sub(emphasis, text)


def _link_allowed(url: str, allowed_domains: Collection[str]) -> bool:
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return False
    if not host or "|" in url:
        return False
    return any(host == d or host.endswith("." + d) for d in (d.lower() for d in allowed_domains))


def to_mrkdwn(text: str, allowed_domains: Collection[str] = ()) -> str:
    """Light Markdown to Slack mrkdwn, with everything not ours escaped.

    ``**bold**`` → ``*bold*``, ``*italic*`` → ``_italic_``, ``~~x~~`` → ``~x~``,
    ``# Heading`` → bold, ``- item`` → ``• item``; code spans are kept as they
    are (escaped). ``[label](url)`` becomes a link only when the URL's host is
    one of ``allowed_domains`` (or a subdomain); otherwise only the label is
    shown, so neither the model nor a customer can make a link whose text
    hides where it goes.
    """
    out: list[str] = []
    pos = 0
    for link in _MD_LINK.finditer(text):
        out.append(_convert_plain(text[pos:link.start()]))
        label, url = link.group(1), link.group(2)
        label_md = _convert_plain(label).replace("|", "¦")
        if _link_allowed(url, allowed_domains):
            out.append(f"<{escape(url)}|{label_md}>")
        else:
            out.append(label_md)
        pos = link.end()
    out.append(_convert_plain(text[pos:]))
    return "".join(out)


def _convert_plain(text: str) -> str:
    out: list[str] = []
    pos = 0
    for code in _CODE.finditer(text):
        out.append(_inline(escape(text[pos:code.start()])))
        out.append(escape(code.group(0)))
        pos = code.end()
    out.append(_inline(escape(text[pos:])))
    return "".join(out)


_ENTITY_TAIL = re.compile(r"&[a-z]{0,4}$")


def split_text(text: str, limit: int = TEXT_LIMIT) -> list[str]:
    """Split converted text into chunks of at most ``limit`` characters.

    Cuts at the last paragraph break before the limit, else a line break, else
    a space, else hard, but never inside an ``&amp;``-style entity or a
    ``<url|label>`` link we made.
    """
    if limit < 16:
        raise ValueError("limit is too small")
    chunks: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[:limit + 1]
        cut = -1
        for sep in ("\n\n", "\n", " "):
            at = window.rfind(sep)
            if at >= limit // 3:
                cut = at
                break
        if cut < 0:
            cut = _safe_hard_cut(rest, limit)
        head, rest = rest[:cut].rstrip(), rest[cut:].strip()
        if head:
            chunks.append(head)
    if rest:
        chunks.append(rest)
    return chunks


def _safe_hard_cut(text: str, limit: int) -> int:
    cut = limit
    entity = _ENTITY_TAIL.search(text[:cut])
    if entity is not None:
        cut = entity.start()
    opened, closed = text.rfind("<", 0, cut), text.rfind(">", 0, cut)
    if opened > closed and opened > 0:
        cut = opened
    return cut


# --------------------------------------------------------------------------------------
# Out: chat.postMessage arguments
# --------------------------------------------------------------------------------------


def _button(action_id: str, label: str, value: str) -> dict[str, Any]:
    label = label.strip() or value
    if len(label) > MAX_LABEL:
        label = label[:MAX_LABEL - 1] + "…"
    return {"type": "button", "action_id": action_id,
            "text": {"type": "plain_text", "text": label, "emoji": True},
            "value": value[:MAX_VALUE]}


def quick_reply_blocks(text: str, quick_replies: Sequence[QuickReply], *,
                       block_id: str) -> list[dict[str, Any]]:
    """A section with ``text`` (mrkdwn) and an actions block with one button per reply.

    Rating payloads (``rating:N``) get ``hl_rate_N`` action ids, others
    ``hl_quick_<i>``; the payload travels in the button's ``value``.
    """
    elements = []
    for i, reply in enumerate(quick_replies[:MAX_BUTTONS]):
        if reply.payload.startswith("rating:"):
            action_id = RATING_ACTION + reply.payload.removeprefix("rating:")
        else:
            action_id = f"{QUICK_ACTION}{i}"
        elements.append(_button(action_id, reply.label, reply.payload))
    return [{"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "actions", "block_id": block_id, "elements": elements}]


def message_payloads(out: Outbound, *, allowed_domains: Collection[str] = (),
                     limit: int = TEXT_LIMIT,
                     convert: Callable[[str, Collection[str]], str] = to_mrkdwn,
                     ) -> list[dict[str, Any]]:
    """``chat.postMessage`` arguments for one outbound message, in sending order.

    Every chunk goes to the conversation's thread; quick replies ride on the
    last chunk as buttons. Unfurling and name linking are off: the bot never
    previews a link or pings anyone because of what someone else wrote.
    """
    channel, thread_ts = thread_of(out.key)
    chunks = split_text(convert(out.text, allowed_domains), limit) or ["…"]
    payloads: list[dict[str, Any]] = []
    for i, chunk in enumerate(chunks):
        payload: dict[str, Any] = {"channel": channel, "thread_ts": thread_ts, "text": chunk,
                                   "mrkdwn": True, "unfurl_links": False,
                                   "unfurl_media": False, "link_names": False}
        if i == len(chunks) - 1 and out.quick_replies:
            payload["blocks"] = quick_reply_blocks(chunk, out.quick_replies,
                                                   block_id=f"hl_choices:{out.seq}")
        payloads.append(payload)
    return payloads


def chosen_blocks(press: ButtonPress) -> list[dict[str, Any]]:
    """The pressed message's blocks with the buttons replaced by the label chosen."""
    chosen = press.value.removeprefix("rating:")
    for block in press.blocks:
        for element in block.get("elements") or ():
            if isinstance(element, Mapping) and element.get("action_id") == press.action_id:
                text = element.get("text")
                if isinstance(text, Mapping) and isinstance(text.get("text"), str):
                    chosen = text["text"]
    kept = [dict(b) for b in press.blocks if b.get("type") != "actions"]
    kept.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": f"You chose: *{escape(chosen)}*"}]})
    return kept
