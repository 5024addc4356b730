"""Channel-neutral envelopes (in and out) and the requests the turn core yields."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from engine.actions import ActionContext, ActionResult, RegisteredAction
from engine.errors import ActionError
from engine.models.base import DecisionRequest, RouteRequest
from engine.store.base import ConversationKey, ConversationState, EntityChange, MessageRecord

__all__ = [
    "ActionNeed",
    "ActionOutcome",
    "DecideNeed",
    "HandoffPacket",
    "Inbound",
    "Need",
    "Outbound",
    "QuickReply",
    "RouteNeed",
    "TurnOutcome",
]

InboundKind = Literal["text", "rating", "quick_reply"]


@dataclass(frozen=True, slots=True)
class Inbound:
    """One customer event from any channel.

    ``customer`` is the identity the channel session established (never
    something the customer typed). ``model_text`` is ``text`` after redaction;
    only it is ever shown to a model.
    """

    key: ConversationKey
    text: str
    customer: str
    received_at: datetime
    kind: InboundKind = "text"
    rating: int | None = None
    channel_message_id: str | None = None
    model_text: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QuickReply:
    label: str
    payload: str


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message for the customer's channel."""

    conversation_id: str
    key: ConversationKey
    seq: int
    text: str
    kind: str = "text"  # text | disclosure | handoff | agent | notice
    language: str = "en"
    quick_replies: tuple[QuickReply, ...] = ()
    author: str = "bot"


@dataclass(frozen=True, slots=True)
class HandoffPacket:
    """What a human agent receives when a conversation is handed over."""

    conversation_id: str
    key: ConversationKey
    reason: str
    priority: str  # "high" | "normal"
    flow: str | None
    state: str | None
    language: str
    summary: str
    entities: Mapping[str, Any]
    detail: str = ""
    transcript: Sequence[MessageRecord] = ()


@dataclass(slots=True)
class TurnOutcome:
    """Everything one turn changed. The runner persists it in one commit, then sends."""

    conversation: ConversationState
    expected_version: int
    records: list[MessageRecord] = field(default_factory=list)
    entity_changes: list[EntityChange] = field(default_factory=list)
    outbound: list[Outbound] = field(default_factory=list)
    handoff: HandoffPacket | None = None
    #: The message was stored for the human who owns the conversation; the bot stayed silent.
    muted: bool = False
    events: list[str] = field(default_factory=list)
    model: str = ""


@dataclass(frozen=True, slots=True)
class RouteNeed:
    request: RouteRequest


@dataclass(frozen=True, slots=True)
class DecideNeed:
    request: DecisionRequest


@dataclass(frozen=True, slots=True)
class ActionNeed:
    action: RegisteredAction
    context: ActionContext
    save_as: str


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    result: ActionResult | None = None
    error: ActionError | None = None


Need = RouteNeed | DecideNeed | ActionNeed
