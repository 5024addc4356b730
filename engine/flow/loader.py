"""Loading flow files: schema, graph, guards, templates and actions, checked together.

Every problem is collected (not just the first) and located by file, line
and column with a hint on how to fix it, so ``helpline validate flows/``
shows an author everything at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

from jinja2 import TemplateError, TemplateNotFound, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import ValidationError

from engine.errors import FlowDefinitionError, GuardSyntaxError, Problem
from engine.flow.compiled import Entity, Flow, FlowSet, LocalTemplate, State, Trigger
from engine.flow.entities import ENTITY_TYPES, EntityOptionError, EntityType
from engine.flow.guards import Guard, parse_guard
from engine.flow.machine import FlowMachine, MachineTransition
from engine.flow.schema import DONE, ERROR, FlowSpec, LocalText
from engine.flow.templates import make_environment, template_refs
from engine.flow.yamlsource import Located, load_located
from engine.i18n import DEFAULT_DISCLOSURE

__all__ = [
    "GUARD_BUILTINS",
    "PROMPT_VARIABLES",
    "SAY_BUILTINS",
    "load_flow",
    "load_flows",
    "validate_paths",
]

#: Names every guard may use besides entities and action results.
GUARD_BUILTINS = frozenset({"policy", "turn", "language"})
#: Names every ``say``/``ask`` text may use besides entities and action results.
SAY_BUILTINS = frozenset({"policy", "language", "flow", "state", "entities", "results",
                          "labels"})
#: The context the engine renders a state's prompt file with.
PROMPT_VARIABLES = frozenset({
    "flow", "state", "language", "entities", "pinned", "missing", "triggers", "policy",
    "results", "summary", "memory_note", "handback", "cache_break",
})


def _flow_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir()
                                if p.suffix in (".yaml", ".yml") and not p.name.startswith("_")))
        else:
            files.append(path)
    return files


class _Checker:
    """Validates one located flow document and compiles it when it is clean."""

    def __init__(self, src: Located, env: ImmutableSandboxedEnvironment,
                 actions: frozenset[str] | None) -> None:
        self.src = src
        self.env = env
        self.actions = actions
        self.problems: list[Problem] = []

    def error(self, path: tuple[str | int, ...], message: str, hint: str = "", *,
              key: bool = False) -> None:
        self.problems.append(self.src.problem(path, message, hint, key=key))

    def warn(self, path: tuple[str | int, ...], message: str, hint: str = "") -> None:
        self.problems.append(self.src.problem(path, message, hint, severity="warning"))

    # -- schema ------------------------------------------------------------

    def parse_spec(self) -> FlowSpec | None:
        try:
            return FlowSpec.model_validate(self.src.data)
        except ValidationError as exc:
            for err in exc.errors():
                path = tuple(err["loc"])
                message = err["msg"]
                hint = ""
                if err["type"] == "extra_forbidden":
                    message = f"unknown field {path[-1]!r}"
                    hint = "check the spelling; `helpline schema` lists every field"
                    self.error(path, message, hint, key=True)
                    continue
                if err["type"] == "missing":
                    message = f"missing required field {path[-1]!r}"
                    self.error(path[:-1], message, f"add `{path[-1]}:`")
                    continue
                if err["type"] == "literal_error":
                    hint = "use one of the allowed values listed"
                elif err["type"] == "string_type" and isinstance(err.get("input"), bool | int):
                    hint = "quote it to make it text: YAML reads true/false and numbers as such"
                else:
                    hint = "`helpline schema` describes every field and its allowed values"
                self.error(path, f"{'.'.join(map(str, path))}: {message}", hint)
            return None

    # -- compile -----------------------------------------------------------

    def compile(self, spec: FlowSpec) -> Flow | None:
        entities = self.compile_entities(spec)
        result_names = {a.result_name for s in spec.states.values() for a in s.actions}
        collected = {e for s in spec.states.values() for e in (*s.collect, *s.accept)}
        self.check_graph(spec)
        self.check_actions(spec)
        transitions = self.compile_transitions(spec, entities, result_names, collected)
        states = self.compile_states(spec, entities, result_names, collected, transitions)
        for name in spec.entities:
            if name not in collected:
                self.warn(("entities", name), f"entity {name!r} is never collected by a state",
                          "add it to a state's `collect:` or remove it")
        if self.problems and any(p.severity == "error" for p in self.problems):
            return None
        assert spec.handoff is not None  # checked in check_graph
        machine = FlowMachine(list(spec.states), spec.start,
                              [t for ts in transitions.values() for t in ts])
        disclosure = LocalTemplate(self.env, spec.disclosure or dict(DEFAULT_DISCLOSURE))
        return Flow(
            name=spec.flow, version=spec.version, description=spec.description,
            file=self.src.file, spec=spec, entities=entities, states=states, machine=machine,
            handoff=spec.handoff, disclosure=disclosure, policy=dict(spec.policies),
            collected_by=self.collected_by(spec), env=self.env,
            router_examples=tuple(spec.router.examples),
            router_description=spec.router.description or spec.description,
        )

    def compile_entities(self, spec: FlowSpec) -> dict[str, Entity]:
        out: dict[str, Entity] = {}
        default_attempts = spec.handoff.max_failed_attempts if spec.handoff else 3
        for name, e in spec.entities.items():
            path = ("entities", name)
            etype: EntityType
            try:
                etype = ENTITY_TYPES[e.type].from_options(name, e.type_options())
            except (ValueError, TypeError) as exc:
                where: tuple[str | int, ...] = path
                message = f"entity {name!r}: {exc}"
                if isinstance(exc, EntityOptionError):  # names the entity and the bad option
                    message = str(exc)
                    if exc.option:  # "pattern", "values.damaged.label.zh", "examples.0"
                        where = (*path, *(int(p) if p.isdigit() else p
                                          for p in exc.option.split(".")))
                self.error(where, message,
                           f"see the options of type {e.type!r} in docs/flows.md")
                continue
            ask = self.text(e.ask, (*path, "ask"), set(), spec) if e.ask is not None else None
            reprompts = tuple(
                t for i, r in enumerate(e.reprompt)
                if (t := self.text(r, (*path, "reprompt", i), set(), spec)) is not None
            )
            out[name] = Entity(name, etype, e.description or etype.describe(), ask, reprompts,
                               e.max_attempts or default_attempts, e.pin, e.correctable,
                               e.capture)
        return out

    def check_graph(self, spec: FlowSpec) -> None:
        states = spec.states
        if spec.start not in states:
            self.error(("start",), f"start state {spec.start!r} is not defined",
                       f"define it under `states:` or use one of: {', '.join(states)}")
        if spec.handoff is None:
            self.error(("flow",), "the flow has no handoff policy",
                       "add `handoff: {state: human}` and a state `human` with `type: handoff`;"
                       " customers must always be able to reach a person")
        elif spec.handoff.state not in states:
            self.error(("handoff", "state"),
                       f"handoff state {spec.handoff.state!r} is not defined",
                       "add a state of `type: handoff` with that name")
        elif states[spec.handoff.state].type != "handoff":
            self.error(("handoff", "state"),
                       f"handoff state {spec.handoff.state!r} is not of `type: handoff`",
                       "set `type: handoff` on that state")
        unknown_target = False
        for sname, state in states.items():
            for trigger, items in state.on.items():
                for i, t in enumerate(items):
                    if t.to not in states:
                        unknown_target = True
                        near = _closest(t.to, states)
                        self.error(("states", sname, "on", trigger, i, "to"),
                                   f"state {sname!r}: transition {trigger!r} goes to unknown "
                                   f"state {t.to!r}",
                                   f"did you mean {near!r}?" if near else "define that state")
                    elif t.reason and states[t.to].type != "handoff":
                        self.warn(("states", sname, "on", trigger, i, "reason"),
                                  "`reason:` only matters on transitions into a handoff state",
                                  "remove `reason:` or point the transition at the handoff state")
            if state.type == "normal" and not state.on:
                self.error(("states", sname), f"state {sname!r} is a dead end: it is not "
                           "terminal and has no transitions",
                           "add `on:` transitions, or mark it `type: end`", key=True)
            if state.type != "normal" and state.on:
                self.warn(("states", sname, "on"), f"{state.type} state {sname!r} declares "
                          "transitions; they are never taken", "remove `on:`")
            if state.type == "handoff" and state.collect:
                self.error(("states", sname, "collect"),
                           f"handoff state {sname!r} cannot collect entities",
                           "collect them in a state before the handoff, or remove `collect:`")
        if spec.start not in states or unknown_target:
            return  # reachability is unknown until those are fixed; don't advise removing states
        reachable = self.reachable(spec)
        for sname in states:
            if sname not in reachable:
                self.error(("states", sname), f"state {sname!r} is unreachable from start "
                           f"state {spec.start!r}",
                           "add a transition into it or remove it", key=True)

    @staticmethod
    def reachable(spec: FlowSpec) -> set[str]:
        seen: set[str] = set()
        queue = deque([spec.start])
        if spec.handoff is not None:
            queue.append(spec.handoff.state)  # reachable from anywhere, by policy
        while queue:
            name = queue.popleft()
            if name in seen or name not in spec.states:
                continue
            seen.add(name)
            for items in spec.states[name].on.values():
                queue.extend(t.to for t in items)
        return seen

    @staticmethod
    def collected_by(spec: FlowSpec) -> dict[str, str]:
        order: list[str] = []
        seen: set[str] = set()
        queue = deque([spec.start])
        while queue:
            name = queue.popleft()
            if name in seen or name not in spec.states:
                continue
            seen.add(name)
            order.append(name)
            for items in spec.states[name].on.values():
                queue.extend(t.to for t in items)
        out: dict[str, str] = {}
        for name in order:
            for entity in spec.states[name].collect:
                out.setdefault(entity, name)
        return out

    def check_actions(self, spec: FlowSpec) -> None:
        for sname, state in spec.states.items():
            for i, a in enumerate(state.actions):
                if self.actions is not None and a.call not in self.actions:
                    near = _closest(a.call, self.actions)
                    known = ", ".join(sorted(self.actions)) or "none"
                    self.error(("states", sname, "actions", i), f"state {sname!r}: unknown "
                               f"action {a.call!r}",
                               f"did you mean {near!r}?" if near else
                               f"register it in the action registry (registered: {known})")
            for a_i, a_name in enumerate(state.accept):
                if a_name not in spec.entities:
                    self.error(("states", sname, "accept", a_i), f"state {sname!r} accepts "
                               f"undeclared entity {a_name!r}", "declare it under `entities:`")
            for f_i, f in enumerate(state.forget):
                if f not in spec.entities:
                    self.error(("states", sname, "forget", f_i), f"state {sname!r} forgets "
                               f"undeclared entity {f!r}", "declare it under `entities:`")
            for e_i, e in enumerate(state.collect):
                if e not in spec.entities:
                    self.error(("states", sname, "collect", e_i), f"state {sname!r} collects "
                               f"undeclared entity {e!r}", "declare it under `entities:`")
                elif spec.entities[e].ask is None:
                    self.error(("entities", e), f"entity {e!r} is collected in state {sname!r}"
                               " but has no `ask:` text", "add `ask:` with the question to ask",
                               key=True)

    def compile_transitions(
        self, spec: FlowSpec, entities: Mapping[str, Entity], results: set[str],
        collected: set[str],
    ) -> dict[tuple[str, str], list[MachineTransition]]:
        out: dict[tuple[str, str], list[MachineTransition]] = {}
        for sname, state in spec.states.items():
            for trigger, items in state.on.items():
                examples = [x for t in items for x in t.examples]
                if trigger not in (DONE, ERROR):
                    intent = spec.intents.get(trigger)
                    if intent is not None:
                        examples.extend(intent.examples)
                    if not examples:
                        self.error(("states", sname, "on", trigger),
                                   f"state {sname!r}: intent {trigger!r} has no examples",
                                   f"add `examples:` to the transition or declare "
                                   f"`intents: {{{trigger}: {{examples: [...]}}}}`; the offline "
                                   "model recognises intents from them", key=True)
                for i, t in enumerate(items):
                    guard: Guard | None = None
                    if t.when is not None:
                        guard = self.guard(t.when, ("states", sname, "on", trigger, i, "when"),
                                           spec, results, collected)
                    out.setdefault((sname, trigger), []).append(
                        MachineTransition(sname, trigger, t.to, guard, t.reason, i))
        return out

    def guard(self, source: str, path: tuple[str | int, ...], spec: FlowSpec,
              results: set[str], collected: set[str]) -> Guard | None:
        try:
            guard = parse_guard(source)
        except GuardSyntaxError as exc:
            line, col = self.src.scalar_start(path)
            if line is not None and col is not None and exc.position is not None:
                before = source[:min(exc.position, len(source.rstrip()))]
                line += before.count("\n")  # a multi-line `|` guard
                col += len(before.rsplit("\n", 1)[-1])
            self.problems.append(Problem(self.src.file, line, col, str(exc),
                                         "see the guard language in docs/flows.md"))
            return None
        for name_path in sorted(guard.names):
            self.check_reference(name_path[0], path, spec, results, collected, "guard",
                                 GUARD_BUILTINS)
        return guard

    def check_reference(self, root: str, path: tuple[str | int, ...], spec: FlowSpec,
                        results: set[str], collected: set[str], what: str,
                        builtins: frozenset[str]) -> None:
        if root in builtins or root in results:
            return
        if root in spec.entities:
            if root not in collected:
                self.error(path, f"{what} uses entity {root!r}, which no state collects",
                           f"add {root!r} to a state's `collect:`")
            return
        known = sorted({*spec.entities, *results, *builtins})
        near = _closest(root, known)
        self.error(path, f"{what} uses unknown name {root!r}",
                   f"did you mean {near!r}?" if near else
                   f"use an entity, an action result (save_as) or one of {', '.join(known)}")

    def text(self, text: LocalText, path: tuple[str | int, ...], results: set[str],
             spec: FlowSpec, collected: set[str] | None = None) -> LocalTemplate | None:
        variants = {"*": text} if isinstance(text, str) else text
        ok = True
        for lang, src in variants.items():
            vpath = path if lang == "*" else (*path, lang)
            try:
                refs = template_refs(self.env, src)
            except TemplateSyntaxError as exc:
                line, _ = self.src.scalar_start(vpath)
                self.problems.append(Problem(self.src.file, (line or 1) + max(exc.lineno - 1, 0),
                                             None, f"template syntax error: {exc.message}",
                                             "check the {{ }} and {% %} markup"))
                ok = False
                continue
            for root in sorted(refs.roots):
                self.check_reference(root, vpath, spec, results,
                                     collected if collected is not None else set(spec.entities),
                                     "template", SAY_BUILTINS)
        if not ok:
            return None
        return LocalTemplate(self.env, text)

    def compile_states(
        self, spec: FlowSpec, entities: Mapping[str, Entity], results: set[str],
        collected: set[str], transitions: Mapping[tuple[str, str], list[MachineTransition]],
    ) -> dict[str, State]:
        out: dict[str, State] = {}
        flow_prompt_checked = False  # the flow-level prompt is reported once, not per state
        for sname, s in spec.states.items():
            path = ("states", sname)
            prompt = s.prompt or spec.prompt
            if s.prompt:
                self.check_prompt(prompt, (*path, "prompt"), spec, results, collected)
            elif not flow_prompt_checked:
                self.check_prompt(prompt, ("prompt",), spec, results, collected)
                flow_prompt_checked = True
            say = self.text(s.say, (*path, "say"), results, spec, collected) if s.say else None
            reprompt = (self.text(s.reprompt, (*path, "reprompt"), results, spec, collected)
                        if s.reprompt else None)
            if s.type in ("end", "handoff") and s.say is None:
                self.error(path, f"{s.type} state {sname!r} has no `say:` text",
                           "add what the customer is told here", key=True)
            triggers: dict[str, Trigger] = {}
            for trigger, items in s.on.items():
                examples = [x for t in items for x in t.examples]
                intent = spec.intents.get(trigger)
                if intent is not None:
                    examples.extend(intent.examples)
                description = next((t.description for t in items if t.description),
                                   intent.description if intent else "")
                triggers[trigger] = Trigger(trigger, description, tuple(dict.fromkeys(examples)),
                                            tuple(transitions.get((sname, trigger), ())))
            out[sname] = State(
                name=sname, kind=s.type, description=s.description, prompt=prompt, say=say,
                reprompt=reprompt, collect=tuple(s.collect), forget=tuple(s.forget),
                actions=tuple(s.actions),
                triggers=triggers, rating=s.rating, quick_replies=tuple(s.quick_replies),
                cache=s.cache,
            )
        return out

    def check_prompt(self, name: str, path: tuple[str | int, ...], spec: FlowSpec,
                     results: set[str], collected: set[str]) -> None:
        loader = self.env.loader
        if loader is None:
            self.error(path, f"prompt {name!r} cannot be loaded: no prompts directory",
                       "pass --prompts or create prompts/")
            return
        try:
            source, _, _ = loader.get_source(self.env, name)
        except TemplateNotFound:
            self.error(path, f"prompt template {name!r} not found in the prompts directory",
                       f"create prompts/{name} or fix the name")
            return
        try:
            refs = template_refs(self.env, source)
        except TemplateSyntaxError as exc:
            self.error(path, f"prompt template {name!r} line {exc.lineno}: {exc.message}",
                       f"fix the markup in prompts/{name}")
            return
        except TemplateError as exc:  # pragma: no cover - other loader errors
            self.error(path, f"prompt template {name!r}: {exc}")
            return
        for root in sorted(refs.roots - PROMPT_VARIABLES):
            self.error(path, f"prompt template {name!r} uses undefined variable {root!r}",
                       f"the engine provides: {', '.join(sorted(PROMPT_VARIABLES))}")
        for name_path in refs.paths:
            if name_path[0] == "entities" and len(name_path) > 1:
                self.check_reference(name_path[1], path, spec, results, collected,
                                     f"prompt {name!r}", frozenset())


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def load_flow(path: Path, env: ImmutableSandboxedEnvironment,
              actions: frozenset[str] | None) -> tuple[Flow | None, list[Problem]]:
    """Load one flow file; returns the flow (None on errors) and every problem found."""
    flow, problems, _ = _load_flow(path, env, actions)
    return flow, problems


def _load_flow(path: Path, env: ImmutableSandboxedEnvironment, actions: frozenset[str] | None,
               ) -> tuple[Flow | None, list[Problem], Located | None]:
    src, problems = load_located(path)
    if src is None:
        return None, problems, None
    checker = _Checker(src, env, actions)
    spec = checker.parse_spec()
    flow = checker.compile(spec) if spec is not None else None
    return flow, checker.problems, src


def validate_paths(paths: Iterable[Path], prompts_dir: Path | None,
                   actions: frozenset[str] | None) -> tuple[FlowSet, list[Problem]]:
    """Load every flow under ``paths``; returns what loaded and all problems."""
    env = make_environment(prompts_dir)
    flows: dict[str, Flow] = {}
    problems: list[Problem] = []
    files = _flow_files(paths)
    if not files:
        problems.append(Problem(", ".join(str(p) for p in paths), None, None,
                                "no flow files found", "add flows/<name>.yaml"))
    for file in files:
        flow, found, src = _load_flow(file, env, actions)
        problems.extend(found)
        if flow is None or src is None:
            continue
        if flow.name in flows:
            problems.append(src.problem(("flow",), f"flow name {flow.name!r} is also used by "
                                        f"{flows[flow.name].file}",
                                        "give every flow its own name"))
            continue
        flows[flow.name] = flow
    return FlowSet(flows, LocalTemplate(env, dict(DEFAULT_DISCLOSURE)), prompts_dir), problems


def load_flows(paths: Iterable[Path] | Path, prompts_dir: Path | None,
               actions: frozenset[str] | None, *,
               disclosure: LocalText | None = None) -> FlowSet:
    """Load flows for the engine.

    Raises:
        FlowDefinitionError: any flow has an error (warnings do not stop loading).
    """
    if isinstance(paths, Path):
        paths = [paths]
    flows, problems = validate_paths(paths, prompts_dir, actions)
    if any(p.severity == "error" for p in problems):
        raise FlowDefinitionError(problems)
    if disclosure is not None:
        env = make_environment(prompts_dir)
        flows.disclosure_text = LocalTemplate(env, disclosure)
    return flows

