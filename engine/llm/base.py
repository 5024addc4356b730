"""A :class:`~engine.models.base.Model` that wraps another one (the decorators' base).

Every layer of the stack (:mod:`engine.llm.stack`) is a ``ModelDecorator``: it
implements the same interface and forwards what it does not change, so the
engine cannot tell a bare model from a fully decorated one. ``name`` and
``history_turns`` are the innermost model's, because the runner reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.models.base import (
    Decision,
    DecisionRequest,
    Model,
    RouteDecision,
    RouteRequest,
    SummaryRequest,
)

__all__ = ["FallbackRouteDecision", "ModelDecorator", "innermost", "shared_copy"]

#: Decision fields that belong to one conversation's model call (the tool call id
#: replayed into its transcript, the raw tool input, the memory echo): never shared.
_PER_CALL_FIELDS = ("tool_use_id", "raw", "pinned_echo")


@dataclasses.dataclass(frozen=True, slots=True)
class FallbackRouteDecision(RouteDecision):
    """A routing decision the fallback model made (marks it: never cached or shared)."""


def shared_copy(decision: Decision) -> Decision:
    """``decision`` without the fields tied to the model call that produced it."""
    names = {f.name for f in dataclasses.fields(decision)}
    changes: dict[str, Any] = {n: None for n in _PER_CALL_FIELDS if n in names}
    return dataclasses.replace(decision, **changes)


class ModelDecorator(Model):
    """Forwards every call to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Model) -> None:
        self.inner = inner
        self.name = inner.name

    @property
    def history_turns(self) -> int:
        value: Any = getattr(self.inner, "history_turns", 0)
        return value if isinstance(value, int) else 0

    def __getattr__(self, name: str) -> Any:
        # Anything else the runner reads from its model (tuning attributes added
        # later, e.g.) is the innermost model's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def decide(self, request: DecisionRequest) -> Decision:
        return await self.inner.decide(request)

    async def route(self, request: RouteRequest) -> RouteDecision:
        return await self.inner.route(request)

    async def summarise(self, request: SummaryRequest) -> str:
        return await self.inner.summarise(request)

    async def close(self) -> None:
        await self.inner.close()


def innermost(model: Model) -> Model:
    """The model at the bottom of a decorator chain."""
    while isinstance(model, ModelDecorator):
        model = model.inner
    return model
