"""The model interface: what the engine asks a model, and what a model may answer.

A model *proposes*; the engine decides. A :class:`Decision` carries the reply
text, entity values, one proposed trigger from those the current state
declares, a satisfaction estimate and whether the customer asks for a human.
The engine validates every field before anything happens.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.flow.compiled import Flow

__all__ = [
    "Decision",
    "DecisionPayload",
    "DecisionRequest",
    "HistoryItem",
    "Model",
    "RouteCandidate",
    "RouteDecision",
    "RouteRequest",
    "SummaryRequest",
]


@dataclass(frozen=True, slots=True)
class HistoryItem:
    role: Literal["customer", "bot", "agent", "system"]
    text: str
    #: For a bot turn decided by a remote model: the model's tool call and the
    #: engine's verdict on it ``{"id", "input", "result"}``, replayed as a
    #: ``tool_use``/``tool_result`` pair so the model learns what was accepted.
    tool: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DecisionRequest:
    """Everything a model needs to decide one turn. Customer text is already redacted."""

    flow: Flow
    state: str
    text: str
    language: str
    entities: Mapping[str, Any]
    results: Mapping[str, Any]
    history: Sequence[HistoryItem] = ()
    summary: str = ""
    #: Entities the state still needs, in order.
    missing: Sequence[str] = ()
    #: A note the engine wants the model to read (e.g. a memory correction, a hand-back).
    memory_note: str = ""
    handback: str = ""
    #: Ask the model to echo the pinned entities this turn (memory check).
    check_memory: bool = False
    turn: int = 0
    conversation_id: str = ""
    #: The unredacted text, for in-process models only (never sent over the network).
    raw_text: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """A model's proposal for one turn (validated by the engine, never trusted)."""

    reply: str | None = None
    entities: Mapping[str, Any] = field(default_factory=dict)
    transition: str | None = None
    satisfaction: int | None = None
    wants_human: bool = False
    language: str | None = None
    #: The pinned entity values as the model understands them (memory check).
    pinned_echo: Mapping[str, Any] | None = None
    #: Where entity values came from: ``customer`` (read literally) or ``model``.
    source: str = "model"
    model: str = ""
    #: Small talk or a digression: not a failed attempt at what the state asks.
    off_topic: bool = False
    #: The remote model's tool call (id and input), kept for the transcript.
    tool_use_id: str | None = None
    raw: Mapping[str, Any] | None = None


class DecisionPayload(BaseModel):
    """The schema a remote model's decision must satisfy (validated with pydantic)."""

    model_config = ConfigDict(extra="ignore")

    reply: str = Field(default="", max_length=4000)
    entities: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    transition: str | None = Field(default=None, max_length=64)
    satisfaction: int | None = Field(default=None, ge=1, le=5)
    wants_human: bool = False
    language: Literal["en", "zh", "mixed"] | None = None
    pinned: dict[str, str | int | float | bool | None] | None = None
    off_topic: bool = False


@dataclass(frozen=True, slots=True)
class RouteCandidate:
    flow: str
    description: str
    examples: Sequence[str]


@dataclass(frozen=True, slots=True)
class RouteRequest:
    text: str
    language: str
    candidates: Sequence[RouteCandidate]
    conversation_id: str = ""
    #: The unredacted text, for in-process models only (never sent over the network).
    raw_text: str | None = None


@dataclass(frozen=True, slots=True)
class RouteDecision:
    flow: str | None
    wants_human: bool = False
    confidence: float = 0.0
    #: Satisfaction estimate 1-5 read from the message, if the model made one.
    satisfaction: int | None = None


@dataclass(frozen=True, slots=True)
class SummaryRequest:
    """Fold ``turns`` into ``previous`` (a running summary)."""

    flow: Flow | None
    previous: str
    turns: Sequence[HistoryItem]
    language: str
    pinned: Mapping[str, Any]
    conversation_id: str = ""


class Model(abc.ABC):
    """One async interface over Claude and the offline model."""

    #: Short identifier used in logs, events and metrics.
    name: str = "model"

    @abc.abstractmethod
    async def decide(self, request: DecisionRequest) -> Decision:
        """Propose a decision for one customer turn.

        Raises:
            ModelUnavailableError: the model could not answer in time.
            ModelOutputError: the answer broke the decision schema.
        """

    @abc.abstractmethod
    async def route(self, request: RouteRequest) -> RouteDecision:
        """Pick the flow for a conversation's first message (or none)."""

    @abc.abstractmethod
    async def summarise(self, request: SummaryRequest) -> str:
        """Return the new running summary."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release network resources."""
