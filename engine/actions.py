"""Actions: Python callables that flows name in ``actions:``, kept in an explicit registry.

An action is ``async def action(ctx: ActionContext) -> ActionResult``. Flows
refer to actions by name; names are resolved against the registry when a flow
is loaded, so a typo is a load-time error, never a runtime surprise.

Actions that change the world (refunds, address changes, claims) are
registered with ``side_effect=True``. They receive an ``idempotency_key`` that
is stable for the turn, so a retried turn cannot issue a refund twice, and
they must check their own policy limits in code, raising
:class:`~engine.errors.PolicyViolation` when a human has to approve instead.
The model never calls actions: only the engine does, on entering a state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ActionError

__all__ = ["ActionContext", "ActionFn", "ActionRegistry", "ActionResult", "RegisteredAction"]


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What an action may read. Identity comes from the session, never from the model."""

    conversation_id: str
    customer: str
    flow: str
    state: str
    entities: Mapping[str, Any]
    results: Mapping[str, Any]
    policy: Mapping[str, Any]
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class ActionResult:
    """An action's result: ``data`` is saved under the action's ``save_as`` name;
    ``entities`` are entity values the action establishes (source ``action``)."""

    data: Mapping[str, Any] = field(default_factory=dict)
    entities: Mapping[str, Any] = field(default_factory=dict)


ActionFn = Callable[[ActionContext], Awaitable[ActionResult]]


@dataclass(frozen=True, slots=True)
class RegisteredAction:
    name: str
    fn: ActionFn
    side_effect: bool
    description: str


class ActionRegistry:
    """Name -> action. Build one per application and pass it to the engine."""

    def __init__(self) -> None:
        self._actions: dict[str, RegisteredAction] = {}

    def register(
        self, name: str, *, side_effect: bool = False, description: str = ""
    ) -> Callable[[ActionFn], ActionFn]:
        """Decorator registering ``fn`` under ``name``."""
        if not name.isidentifier():
            raise ActionError(name, "action names must be identifiers, e.g. lookup_order")

        def decorate(fn: ActionFn) -> ActionFn:
            self.add(name, fn, side_effect=side_effect, description=description)
            return fn

        return decorate

    def add(
        self, name: str, fn: ActionFn, *, side_effect: bool = False, description: str = ""
    ) -> None:
        if name in self._actions:
            raise ActionError(name, "registered twice; pick another name")
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        self._actions[name] = RegisteredAction(name, fn, side_effect, doc)

    def get(self, name: str) -> RegisteredAction:
        try:
            return self._actions[name]
        except KeyError:
            known = ", ".join(sorted(self._actions)) or "none"
            raise ActionError(name, f"not registered (registered: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._actions

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._actions))

    def names(self) -> frozenset[str]:
        return frozenset(self._actions)
