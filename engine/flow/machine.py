"""The flow's state machine, built once per flow on ``transitions``.

One :class:`transitions.Machine` is built per flow at load time and shared by
every conversation in that flow: conversations keep only their state name,
and a firing sets that name on a private cursor model, triggers, and reads
the destination back. This keeps per-conversation memory at one string and
the per-turn cost at one trigger, instead of one ``Machine`` (tens of
microseconds and kilobytes) per conversation.

Guards run as ``transitions`` conditions, so the order in which the flow
declares a trigger's transitions is the order in which they are tried, and
the first whose guard holds wins (transitions' documented semantics).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transitions import EventData, Machine, MachineError

from engine.flow.guards import Guard

__all__ = ["FlowMachine", "MachineTransition"]

# transitions logs every trigger at INFO; that is per turn noise in production.
logging.getLogger("transitions").setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True)
class MachineTransition:
    """One declared transition, as the engine sees it after the machine fires."""

    source: str
    trigger: str
    dest: str
    guard: Guard | None
    reason: str | None
    index: int


class _Cursor:
    """The single model object the machine moves; never shared across awaits."""

    state: str
    fired: MachineTransition | None = None


class FlowMachine:
    """Wraps the flow's ``transitions.Machine``; see the module docstring."""

    def __init__(self, states: Sequence[str], initial: str,
                 transitions: Sequence[MachineTransition]) -> None:
        self.transitions = tuple(transitions)
        self._machine = Machine(
            model=None,
            states=list(states),
            initial=initial,
            auto_transitions=False,
            send_event=True,
            ignore_invalid_triggers=False,
        )
        for t in self.transitions:
            conditions = [self._condition(t.guard)] if t.guard is not None else []
            self._machine.add_transition(
                t.trigger, t.source, t.dest, conditions=conditions, before=[self._recorder(t)]
            )
        self._cursor = _Cursor()
        self._machine.add_model(self._cursor, initial=initial)
        self._table = self._dispatch_table()

    def _dispatch_table(self) -> dict[tuple[str, str], tuple[MachineTransition, ...]]:
        """(state, trigger) -> transitions in the machine's own order.

        Read back from the ``transitions`` machine (its events and their
        per-source transition lists), so firing follows exactly the machine
        that validation and ``helpline graph`` use, without paying for
        EventData and callback dispatch on every turn (~11 us against ~1 us).
        """
        by_edge: dict[tuple[str, str, str], list[MachineTransition]] = {}
        for t in self.transitions:
            by_edge.setdefault((t.trigger, t.source, t.dest), []).append(t)
        table: dict[tuple[str, str], list[MachineTransition]] = {}
        for name, event in self._machine.events.items():
            for source, items in event.transitions.items():
                for item in items:
                    declared = by_edge[(name, source, str(item.dest))].pop(0)
                    table.setdefault((source, name), []).append(declared)
        return {k: tuple(v) for k, v in table.items()}

    @staticmethod
    def _condition(guard: Guard) -> Any:
        def check(event: EventData) -> bool:
            return guard.evaluate(event.kwargs["scope"])

        return check

    @staticmethod
    def _recorder(t: MachineTransition) -> Any:
        def record(event: EventData) -> None:
            cursor = event.model
            assert isinstance(cursor, _Cursor)
            cursor.fired = t

        return record

    def fire(self, state: str, trigger: str, scope: Mapping[str, Any]) -> MachineTransition | None:
        """Try ``trigger`` from ``state``; the transition taken, or None if no guard held.

        The caller checks that ``state`` declares ``trigger`` first; this is
        synchronous, so sharing the cursor between conversations is safe on
        one event loop.
        """
        candidates = self._table.get((state, trigger))
        if candidates is None:
            raise MachineError(f"can't trigger event {trigger} from state {state}")
        for t in candidates:
            if t.guard is None or t.guard.evaluate(scope):
                return t
        return None

    def fire_via_machine(self, state: str, trigger: str,
                         scope: Mapping[str, Any]) -> MachineTransition | None:
        """The same as :meth:`fire`, through ``transitions``' own trigger machinery.

        Kept for tests that prove the dispatch table and the machine agree.
        """
        cursor = self._cursor
        cursor.fired = None
        self._machine.set_state(state, model=cursor)
        # ``trigger`` is added to the model by transitions at add_model time.
        fire: Any = getattr(cursor, "trigger")  # noqa: B009
        if fire(trigger, scope=scope):
            return cursor.fired
        return None

    def mermaid(self, *, title: str = "", kinds: Mapping[str, str] | None = None) -> str:
        """A Mermaid ``stateDiagram-v2`` of the machine, read from the machine itself."""
        kinds = kinds or {}
        lines = ["stateDiagram-v2"]
        if title:
            lines.insert(0, f"---\ntitle: {title}\n---")
        lines.append(f"    [*] --> {self._machine.initial}")
        for name, event in self._machine.events.items():
            for source, items in event.transitions.items():
                for t in items:
                    label = name
                    fired = next((m for m in self.transitions if m.source == source
                                  and m.trigger == name and m.dest == t.dest), None)
                    if fired is not None and fired.guard is not None:
                        label += f" [{fired.guard.source}]"
                    label = label.replace(":", "#58;").replace('"', "#quot;")
                    lines.append(f"    {source} --> {t.dest} : {label}")
        for state in self._machine.states:
            kind = kinds.get(state)
            if kind == "end":
                lines.append(f"    {state} --> [*]")
            elif kind == "handoff":
                lines.append(f"    class {state} handoff")
        if any(k == "handoff" for k in kinds.values()):
            lines.append("    classDef handoff fill:#fde68a,stroke:#b45309")
        return "\n".join(lines) + "\n"
