"""The flow file schema: what a developer may write in ``flows/*.yaml``.

These pydantic models only describe shape; cross-references (targets,
entities, actions, templates, guards) are checked by :mod:`engine.flow.loader`
which reports every problem with its file, line and column.

A minimal flow::

    flow: refund
    version: "1.0"
    start: ask_order
    entities:
      order_id: {type: string, pattern: 'HL\\d{8}', ask: "What is your order number?"}
    states:
      ask_order:
        collect: [order_id]
        on:
          done: resolved
      resolved:
        type: end
        say: "Done!"
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ActionCall",
    "EntitySpec",
    "FlowSpec",
    "HandoffPolicy",
    "IntentSpec",
    "LocalText",
    "RouterSpec",
    "StateSpec",
    "SummarySpec",
    "TransitionSpec",
]

#: Text shown to customers: one string, or one per language code (``en``, ``zh``).
LocalText = str | dict[str, str]

#: The reserved trigger fired by the engine when a state's work is complete.
DONE = "done"
#: The reserved trigger fired by the engine when an action of the state fails.
ERROR = "error"
RESERVED_TRIGGERS = frozenset({DONE, ERROR})

HandoffReason = Literal["request", "satisfaction", "failures", "policy", "timeout", "error"]

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EntitySpec(_Strict):
    """An entity the flow collects. Type-specific options live beside the common ones."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Literal["string", "integer", "money", "date", "enum", "email", "phone"]
    description: str = ""
    ask: LocalText | None = None
    reprompt: list[LocalText] = Field(default_factory=list)
    max_attempts: int | None = Field(default=None, ge=1, le=20)
    pin: bool = False
    #: Whether the customer may correct the value after it was collected.
    correctable: bool = True
    #: ``auto``: pick the value up from any message (one-shot requests);
    #: ``when_asked``: only while a state is collecting it (free text such as addresses).
    capture: Literal["auto", "when_asked"] = "auto"

    def type_options(self) -> dict[str, Any]:
        """The options the entity type itself interprets (pattern, values, min, ...)."""
        return dict(self.model_extra or {})


class TransitionSpec(_Strict):
    to: Identifier
    when: str | None = None
    #: Phrases that express the trigger; merged with the flow-level intent's examples.
    examples: list[str] = Field(default_factory=list)
    description: str = ""
    #: Why a transition into a handoff state hands off (shown to the agent).
    reason: HandoffReason | None = None


class ActionCall(_Strict):
    call: Identifier
    #: Name under which the result is visible to guards and templates.
    save_as: Identifier | None = None

    @property
    def result_name(self) -> str:
        return self.save_as or self.call


class StateSpec(_Strict):
    type: Literal["normal", "handoff", "end"] = "normal"
    description: str = ""
    prompt: str | None = None
    say: LocalText | None = None
    reprompt: LocalText | None = None
    collect: list[Identifier] = Field(default_factory=list)
    #: Entities the state takes if the customer offers them, without asking.
    accept: list[Identifier] = Field(default_factory=list)
    #: Entities cleared on entering the state (e.g. an order number that was not found).
    forget: list[Identifier] = Field(default_factory=list)
    actions: list[ActionCall] = Field(default_factory=list)
    on: dict[Identifier, list[TransitionSpec]] = Field(default_factory=dict)
    #: Offer the 1-5 satisfaction rating as quick replies after this state's reply.
    rating: bool = False
    quick_replies: list[LocalText] = Field(default_factory=list)
    #: Response cache policy for model replies in this state (see the model layer).
    cache: Literal["never", "short", "faq"] = "never"

    @field_validator("actions", mode="before")
    @classmethod
    def _action_shorthand(cls, value: Any) -> Any:
        # ``actions: [lookup_order]`` is the common case; expand it.
        if isinstance(value, list):
            return [{"call": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("on", mode="before")
    @classmethod
    def _transition_shorthand(cls, value: Any) -> Any:
        # ``done: next_state``, ``done: {to: x}`` and ``done: [{to: x}, ...]`` are all allowed.
        if not isinstance(value, dict):
            return value
        out: dict[Any, Any] = {}
        for trigger, spec in value.items():
            items = spec if isinstance(spec, list) else [spec]
            out[trigger] = [{"to": s} if isinstance(s, str) else s for s in items]
        return out


class IntentSpec(_Strict):
    description: str = ""
    examples: list[str] = Field(default_factory=list)


class HandoffPolicy(_Strict):
    #: The state (``type: handoff``) that every automatic handoff goes to.
    state: Identifier
    #: A customer rating (1-5) below this hands off.
    satisfaction_below: int = Field(default=3, ge=1, le=6)
    #: The model's satisfaction estimate below this ...
    estimate_below: int = Field(default=3, ge=1, le=6)
    #: ... for this many consecutive turns hands off.
    estimate_turns: int = Field(default=2, ge=1, le=20)
    #: Default failed attempts per entity (an entity's own ``max_attempts`` wins).
    max_failed_attempts: int = Field(default=3, ge=1, le=20)
    #: Hand off when the customer asks for a human.
    on_request: bool = True


class RouterSpec(_Strict):
    """How the router recognises that a first message belongs to this flow."""

    description: str = ""
    examples: list[str] = Field(default_factory=list)


class SummarySpec(_Strict):
    after_turns: int = Field(default=5, ge=2, le=200)
    keep_turns: int = Field(default=4, ge=1, le=100)
    max_context_tokens: int = Field(default=80_000, ge=1_000, le=1_000_000)
    safety_margin: float = Field(default=0.2, ge=0.0, le=0.9)
    check_every: int = Field(default=3, ge=1, le=100)


class FlowSpec(_Strict):
    flow: Identifier
    version: str = "1"
    description: str = ""
    languages: list[Literal["en", "zh"]] = Field(
        default_factory=lambda: list[Literal["en", "zh"]](["en", "zh"]))
    start: Identifier
    prompt: str = "default.j2"
    disclosure: LocalText | None = None
    router: RouterSpec = Field(default_factory=RouterSpec)
    policies: dict[Identifier, Any] = Field(default_factory=dict)
    handoff: HandoffPolicy | None = None
    summary: SummarySpec = Field(default_factory=SummarySpec)
    intents: dict[Identifier, IntentSpec] = Field(default_factory=dict)
    entities: dict[Identifier, EntitySpec] = Field(default_factory=dict)
    states: dict[Identifier, StateSpec]

    @model_validator(mode="after")
    def _has_states(self) -> FlowSpec:
        if not self.states:
            raise ValueError("a flow needs at least one state")
        return self
