"""Every error Helpline raises on purpose derives from :class:`HelplineError`.

The tree::

    HelplineError
    ├── ConfigError                 bad settings or environment
    ├── FlowDefinitionError         a flow file is wrong (carries every Problem found)
    ├── GuardError                  a ``when:`` expression
    │   ├── GuardSyntaxError        cannot be parsed
    │   └── GuardEvaluationError    cannot be evaluated (type mismatch, limits)
    ├── EntityValueError            a value does not fit its entity type
    ├── TransitionError             a transition the flow does not declare
    ├── ActionError                 a registered action failed or is unknown
    │   └── PolicyViolation         a side effect refused by policy in code
    ├── ModelError                  the model layer failed
    │   ├── ModelUnavailableError   network, timeout, overload, circuit open
    │   └── ModelOutputError        the model answered outside the decision schema
    ├── StoreError                  persistence failed
    │   ├── DuplicateMessageError   a channel message id was already stored
    │   └── VersionConflictError    a concurrent writer changed the conversation
    └── ChannelError                a channel adapter failed

Messages name the file, line, state or field involved and say how to fix it.
Errors keep structured fields; ``__str__`` is built from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ActionError",
    "ChannelError",
    "ConfigError",
    "DuplicateMessageError",
    "EntityValueError",
    "FlowDefinitionError",
    "GuardError",
    "GuardEvaluationError",
    "GuardSyntaxError",
    "HelplineError",
    "ModelError",
    "ModelOutputError",
    "ModelUnavailableError",
    "PolicyViolation",
    "Problem",
    "StoreError",
    "TransitionError",
    "VersionConflictError",
]


class HelplineError(Exception):
    """Root of every error raised by Helpline on purpose."""


class ConfigError(HelplineError):
    """Settings or environment are invalid."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem in a flow definition, located in its source file."""

    file: str
    line: int | None
    column: int | None
    message: str
    hint: str = ""
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: {self.severity}: {self.message}"
        if self.hint:
            text += f" (fix: {self.hint})"
        return text


class FlowDefinitionError(HelplineError):
    """A flow file failed validation. ``problems`` lists every error found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        errors = [p for p in self.problems if p.severity == "error"]
        head = f"{len(errors)} problem(s) in flow definition"
        return head + "".join(f"\n  {p}" for p in self.problems)


class GuardError(HelplineError):
    """A guard expression is invalid."""

    def __init__(self, message: str, *, source: str, position: int | None = None) -> None:
        self.message = message
        self.source = source
        self.position = position
        super().__init__(str(self))

    def __str__(self) -> str:
        at = f" at column {self.position + 1}" if self.position is not None else ""
        return f"{self.message}{at} in guard {self.source!r}"


class GuardSyntaxError(GuardError):
    """A guard expression cannot be parsed."""


class GuardEvaluationError(GuardError):
    """A guard expression cannot be evaluated against the given values."""


class EntityValueError(HelplineError):
    """A value does not fit its entity's type."""

    def __init__(self, entity: str, value: object, reason: str) -> None:
        self.entity = entity
        self.value = value
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        shown = repr(self.value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return f"entity {self.entity!r}: {shown} rejected: {self.reason}"


class TransitionError(HelplineError):
    """A transition was requested that the current state does not declare."""

    def __init__(self, flow: str, state: str, trigger: str, reason: str) -> None:
        self.flow = flow
        self.state = state
        self.trigger = trigger
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"flow {self.flow!r} state {self.state!r}: trigger {self.trigger!r}: {self.reason}"


class ActionError(HelplineError):
    """A registered action failed, or an unknown action was named."""

    def __init__(self, action: str, reason: str) -> None:
        self.action = action
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"action {self.action!r}: {self.reason}"


class PolicyViolation(ActionError):
    """A side-effect action refused by a policy checked in code.

    The engine turns this into a handoff with reason ``policy``; it is never
    shown to the customer as an error.
    """


class ModelError(HelplineError):
    """The model layer failed."""


class ModelUnavailableError(ModelError):
    """The model could not be reached in time (network, 429/529, timeout, breaker)."""


class ModelOutputError(ModelError):
    """The model answered, but outside the decision schema."""


class StoreError(HelplineError):
    """Persistence failed."""


class DuplicateMessageError(StoreError):
    """A channel message id was stored before: the message is a redelivery."""

    def __init__(self, channel: str, channel_message_id: str) -> None:
        self.channel = channel
        self.channel_message_id = channel_message_id
        super().__init__(str(self))

    def __str__(self) -> str:
        return (f"message {self.channel_message_id!r} on channel {self.channel!r} "
                "was already stored")


class VersionConflictError(StoreError):
    """The conversation changed since it was loaded (another writer won)."""

    def __init__(self, conversation_id: str, expected: int) -> None:
        self.conversation_id = conversation_id
        self.expected = expected
        super().__init__(str(self))

    def __str__(self) -> str:
        return (
            f"conversation {self.conversation_id!r} is no longer at version {self.expected}; "
            "reload it and retry the turn"
        )


class ChannelError(HelplineError):
    """A channel adapter failed."""
