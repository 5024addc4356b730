"""A loaded, validated flow, ready for the engine: the runtime view of a flow file."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.flow.entities import EntityType
from engine.flow.machine import FlowMachine, MachineTransition
from engine.flow.schema import DONE, ERROR, ActionCall, FlowSpec, HandoffPolicy, LocalText
from engine.i18n import reply_language

__all__ = ["Entity", "Flow", "FlowSet", "LocalTemplate", "State", "Trigger"]


class LocalTemplate:
    """A customer-facing text, one compiled Jinja template per language."""

    __slots__ = ("_static", "_templates", "source")

    def __init__(self, env: ImmutableSandboxedEnvironment, text: LocalText) -> None:
        self.source = text
        variants = {"*": text} if isinstance(text, str) else dict(text)
        self._templates: dict[str, Template] = {}
        self._static: dict[str, str] = {}
        for lang, src in variants.items():
            # Most texts have no markup; skip Jinja for them (hot path).
            if "{" in src:
                self._templates[lang] = env.from_string(src)
            else:
                self._static[lang] = src

    def render(self, language: str, context: Mapping[str, Any]) -> str:
        key = reply_language(language)
        for candidate in (key, "mixed" if language == "mixed" else key, "*", "en"):
            if candidate in self._static:
                return self._static[candidate]
            if candidate in self._templates:
                return _tidy(self._templates[candidate].render(context))
        if self._static:
            return next(iter(self._static.values()))
        return _tidy(next(iter(self._templates.values())).render(context))


_SPACES = re.compile(r"[ \t]+")
_LINE_EDGES = re.compile(r"[ \t]*\n[ \t]*")
_BLANK_LINES = re.compile(r"\n{3,}")


def _tidy(text: str) -> str:
    """Whitespace left by template tags and folded YAML, removed."""
    text = _LINE_EDGES.sub("\n", _SPACES.sub(" ", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


@dataclass(frozen=True, slots=True)
class Entity:
    name: str
    type: EntityType
    description: str
    ask: LocalTemplate | None
    reprompts: tuple[LocalTemplate, ...]
    max_attempts: int
    pin: bool
    correctable: bool
    capture: str = "auto"


@dataclass(frozen=True, slots=True)
class Trigger:
    name: str
    description: str
    examples: tuple[str, ...]
    transitions: tuple[MachineTransition, ...]


@dataclass(frozen=True, slots=True)
class State:
    name: str
    kind: str  # "normal" | "handoff" | "end"
    description: str
    prompt: str
    say: LocalTemplate | None
    reprompt: LocalTemplate | None
    collect: tuple[str, ...]
    forget: tuple[str, ...]
    actions: tuple[ActionCall, ...]
    triggers: Mapping[str, Trigger]
    rating: bool
    quick_replies: tuple[LocalText, ...]
    cache: str

    @property
    def intents(self) -> tuple[Trigger, ...]:
        """Triggers the model may propose (everything but ``done`` and ``error``)."""
        return tuple(t for n, t in self.triggers.items() if n not in (DONE, ERROR))

    @property
    def has_done(self) -> bool:
        return DONE in self.triggers


@dataclass(slots=True)
class Flow:
    name: str
    version: str
    description: str
    file: str
    spec: FlowSpec
    entities: Mapping[str, Entity]
    states: Mapping[str, State]
    machine: FlowMachine
    handoff: HandoffPolicy
    disclosure: LocalTemplate
    policy: Mapping[str, Any]
    #: entity -> the first state (breadth-first from start) that collects it.
    collected_by: Mapping[str, str]
    env: ImmutableSandboxedEnvironment
    router_examples: tuple[str, ...] = ()
    router_description: str = ""
    _prompts: dict[str, Template] = field(default_factory=dict)

    @property
    def start(self) -> str:
        return self.spec.start

    @property
    def pinned(self) -> tuple[str, ...]:
        return tuple(n for n, e in self.entities.items() if e.pin)

    def prompt_template(self, state: str) -> Template:
        name = self.states[state].prompt
        template = self._prompts.get(name)
        if template is None:
            template = self.env.get_template(name)
            self._prompts[name] = template
        return template

    def render_prompt(self, state: str, context: Mapping[str, Any]) -> str:
        return self.prompt_template(state).render(context).strip()

    def say(self, text: LocalTemplate, language: str, context: Mapping[str, Any]) -> str | None:
        """Render customer text; a broken template yields None (logged by the caller)."""
        try:
            return text.render(language, context)
        except TemplateError:
            return None


@dataclass(slots=True)
class FlowSet:
    """All flows of an application, by name, plus the shared prompt environment."""

    flows: dict[str, Flow]
    disclosure_text: LocalTemplate
    prompts_dir: Path | None = None

    def __getitem__(self, name: str) -> Flow:
        return self.flows[name]

    def __contains__(self, name: object) -> bool:
        return name in self.flows

    def __iter__(self) -> Any:
        return iter(self.flows.values())

    def __len__(self) -> int:
        return len(self.flows)

    def disclosure(self, language: str, flow: str | None = None) -> str:
        """The AI disclosure: the flow's own words if it has them, else the application's."""
        text = self.flows[flow].disclosure if flow in self.flows else self.disclosure_text
        return text.render(language, {})
