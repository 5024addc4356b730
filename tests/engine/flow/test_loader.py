"""Flow validation helps authors: every problem is reported, located, and has a hint.

Each test writes a small flow into ``tmp_path``: :data:`BASE` is a minimal valid
flow and :func:`flow` patches one part of it. :func:`at` finds the line (and
column) of a piece of the written text, so expected locations are read from the
YAML itself rather than counted by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.demo.actions import build_actions
from engine.demo.shop import Shop
from engine.errors import FlowDefinitionError, Problem
from engine.flow.compiled import Flow
from engine.flow.loader import load_flows, validate_paths
from engine.flow.yamlsource import MAX_FLOW_BYTES

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = ROOT / "prompts"
FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_PROMPTS = FIXTURES / "prompts"
ACTIONS = build_actions(Shop()).names()

#: A minimal valid flow; tests patch one part of it with :func:`flow`.
BASE = """\
flow: mini
start: ask_order
handoff:
  state: human
entities:
  order_id:
    type: string
    pattern: 'HL\\d{8}'
    ask: "What is your order number?"
states:
  ask_order:
    collect: [order_id]
    on:
      done: check
  check:
    actions: [{call: lookup_order, save_as: order}]
    on:
      done:
        - to: found
          when: order.found
        - to: human
          reason: failures
      error: human
  found:
    type: end
    say: "Order {{ order_id }} is {{ order.status }}."
  human:
    type: handoff
    say: "A colleague will take over."
"""


def flow(*edits: tuple[str, str], base: str = BASE) -> str:
    """``base`` with each ``(old, new)`` replaced; ``old`` must occur exactly once."""
    text = base
    for old, new in edits:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    return text


def at(text: str, needle: str) -> tuple[int, int]:
    """1-based (line, column) of ``needle``, which must occur on exactly one line."""
    hits = [(number, line.index(needle) + 1)
            for number, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {[n for n, _ in hits]}"
    return hits[0]


def line_of(text: str, needle: str) -> int:
    return at(text, needle)[0]


def check(tmp_path: Path, text: str, *, name: str = "mini.yaml", prompts: Path | None = PROMPTS,
          actions: frozenset[str] | None = ACTIONS) -> tuple[Flow | None, list[Problem]]:
    """Write ``text`` to ``tmp_path/name`` and validate it: the flow (if loaded), problems."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    flows, problems = validate_paths([path], prompts, actions)
    for p in problems:
        assert p.file == str(path)
    loaded = list(flows)
    return (loaded[0] if loaded else None), problems


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def the_error(problems: list[Problem], fragment: str) -> Problem:
    """The one error whose message contains ``fragment``; it must carry a hint."""
    found = [p for p in errors(problems) if fragment in p.message]
    shown = "\n".join(map(str, problems))
    assert len(found) == 1, f"{len(found)} errors match {fragment!r}:\n{shown}"
    assert found[0].hint.strip(), f"no hint: {found[0]}"
    return found[0]


def only_error(problems: list[Problem], fragment: str) -> Problem:
    """Like :func:`the_error`, and no other error was reported."""
    found = the_error(problems, fragment)
    assert errors(problems) == [found], "\n".join(map(str, problems))
    return found


def test_base_flow_is_clean(tmp_path: Path) -> None:
    loaded, problems = check(tmp_path, BASE)
    assert problems == []
    assert loaded is not None and loaded.name == "mini"
    assert set(loaded.states) == {"ask_order", "check", "found", "human"}


def test_demo_flows_validate_clean() -> None:
    flows, problems = validate_paths([ROOT / "flows"], PROMPTS, ACTIONS)
    assert errors(problems) == [], "\n".join(map(str, problems))
    assert {f.name for f in flows} >= {"refund", "logistics"}


# --------------------------------------------------------------------------- reading the file


class TestFileLevel:
    def test_bad_indentation(self, tmp_path: Path) -> None:
        text = flow(("    type: end\n    say: \"Order", "    type: end\n   say: \"Order"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "invalid YAML")
        assert (p.line, p.column) == at(text, 'say: "Order')

    def test_unclosed_quote_points_at_the_opening_quote(self, tmp_path: Path) -> None:
        text = flow(('say: "A colleague will take over."', 'say: "A colleague will take over.'))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "invalid YAML")
        assert "quoted scalar" in p.message
        assert (p.line, p.column) == at(text, '"A colleague')  # not the end of the file
        assert "quote" in p.hint

    def test_tab_indentation(self, tmp_path: Path) -> None:
        text = flow(("  ask_order:\n    collect:", "  ask_order:\n\tcollect:"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "invalid YAML")
        assert p.line == line_of(text, "\tcollect:")

    def test_duplicate_key(self, tmp_path: Path) -> None:
        text = flow(("  found:\n    type: end\n", "  found:\n    type: end\n    type: normal\n"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "duplicate key")
        assert (p.line, p.column) == at(text, "type: normal")
        assert "once" in p.hint

    def test_duplicate_state(self, tmp_path: Path) -> None:
        text = BASE + "  found:  # again\n    type: end\n    say: again\n"
        _, problems = check(tmp_path, text)
        p = only_error(problems, 'duplicate key "found"')
        assert (p.line, p.column) == at(text, "found:  # again")

    @pytest.mark.parametrize("text", ["- flow: mini\n- start: x\n", "just text\n", "", "# hi\n"])
    def test_top_level_not_a_mapping(self, tmp_path: Path, text: str) -> None:
        _, problems = check(tmp_path, text)
        p = only_error(problems, "must be a mapping at the top level")
        assert (p.line, p.column) == (1, 1)

    def test_non_utf8_bytes(self, tmp_path: Path) -> None:
        path = tmp_path / "latin1.yaml"
        path.write_bytes(BASE.replace("A colleague", "Un coll\xe8gue").encode("latin-1"))
        _, problems = validate_paths([path], PROMPTS, ACTIONS)
        p = only_error(problems, "not UTF-8")
        assert (p.line, p.column) == (at(BASE, "A colleague")[0], len('    say: "Un coll') + 1)

    def test_oversize_file(self, tmp_path: Path) -> None:
        text = BASE + "# padding\n" * (MAX_FLOW_BYTES // 10 + 1)
        _, problems = check(tmp_path, text)
        p = only_error(problems, f"the limit is {MAX_FLOW_BYTES}")
        assert p.line is None  # the whole file is the problem

    def test_missing_file(self, tmp_path: Path) -> None:
        _, problems = validate_paths([tmp_path / "nope.yaml"], PROMPTS, ACTIONS)
        p = only_error(problems, "cannot read file")
        assert p.line is None

    def test_no_flow_files(self, tmp_path: Path) -> None:
        (tmp_path / "notes.txt").write_text("not a flow")
        (tmp_path / "_draft.yaml").write_text("flow: draft")  # leading _ is skipped
        _, problems = validate_paths([tmp_path], PROMPTS, ACTIONS)
        p = only_error(problems, "no flow files found")
        assert p.line is None

    def test_yaml_1_1_words_stay_strings(self) -> None:
        flows = load_flows(FIXTURES / "yaml11.yaml", PROMPTS, frozenset())
        ask = flows["yaml_words"].states["ask"]
        assert set(ask.triggers) == {"confirm", "deny", "no"}  # `on:` is a key, `no:` too
        assert ask.triggers["confirm"].examples == ("yes", "Yes", "y", "on")
        assert ask.triggers["deny"].examples == ("no", "NO", "n", "off")
        assert ask.triggers["no"].transitions[0].dest == "human"

    def test_yaml_1_2_booleans_are_not_examples(self, tmp_path: Path) -> None:
        # `true` is a boolean in YAML 1.2 too: reported, not silently turned into "True".
        text = flow(("      done: check",
                     "      done: check\n      ok: {to: check, examples: [true]}"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "valid string")
        assert (p.line, p.column) == at(text, "true]")
        assert "quote" in p.hint


# --------------------------------------------------------------------------- schema


class TestSchema:
    def test_unknown_field_in_state(self, tmp_path: Path) -> None:
        text = flow(("    collect: [order_id]", "    colect: [order_id]"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "unknown field 'colect'")
        assert (p.line, p.column) == at(text, "colect")
        assert "helpline schema" in p.hint

    def test_unknown_top_level_field(self, tmp_path: Path) -> None:
        text = flow(("start: ask_order\n", "start: ask_order\nstrat: ask_order\n"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "unknown field 'strat'")
        assert (p.line, p.column) == at(text, "strat")

    def test_missing_required_start(self, tmp_path: Path) -> None:
        text = flow(("start: ask_order\n", ""))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "missing required field 'start'")
        assert (p.line, p.column) == (1, 1)
        assert "start:" in p.hint

    def test_missing_nested_required_field(self, tmp_path: Path) -> None:
        text = flow(("handoff:\n  state: human\n", "handoff:\n  on_request: true\n"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "missing required field 'state'")
        assert p.line == line_of(text, "on_request")  # the handoff mapping

    def test_wrong_literal(self, tmp_path: Path) -> None:
        text = flow(("    type: string", "    type: strng"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "entities.order_id.type")
        assert (p.line, p.column) == at(text, "strng")
        assert "'string'" in p.message  # the allowed values are listed

    def test_wrong_state_type(self, tmp_path: Path) -> None:
        text = flow(("    type: handoff", "    type: hand_off"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "states.human.type")
        assert (p.line, p.column) == at(text, "hand_off")

    def test_bad_identifier(self, tmp_path: Path) -> None:
        text = flow(("flow: mini", "flow: mini-flow"))
        _, problems = check(tmp_path, text)
        [p] = errors(problems)
        assert p.message.startswith("flow: String should match pattern")
        assert (p.line, p.column) == at(text, "mini-flow")
        assert p.hint

    def test_wrong_type_of_value(self, tmp_path: Path) -> None:
        text = flow(("    collect: [order_id]", "    collect: {order_id: yes}"))
        _, problems = check(tmp_path, text)
        [p] = errors(problems)
        assert "states.ask_order.collect" in p.message
        assert (p.line, p.column) == at(text, "{order_id")
        assert p.hint

    def test_no_states(self, tmp_path: Path) -> None:
        text = "flow: mini\nstart: a\nhandoff: {state: human}\nstates: {}\n"
        _, problems = check(tmp_path, text)
        p = only_error(problems, "at least one state")
        assert p.line == 1


# --------------------------------------------------------------------------- graph


class TestGraph:
    def test_unknown_target_state_did_you_mean(self, tmp_path: Path) -> None:
        text = flow(("      done: check", "      done: chek"))
        _, problems = check(tmp_path, text)
        # Only this error: the states behind the typo are not reported as unreachable.
        p = only_error(problems, "goes to unknown state 'chek'")
        assert (p.line, p.column) == at(text, "chek")
        assert p.hint == "did you mean 'check'?"

    def test_unknown_target_in_shorthand_mapping(self, tmp_path: Path) -> None:
        text = flow(("      done: check", "      done: {to: chek, description: next}"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "goes to unknown state 'chek'")
        assert (p.line, p.column) == at(text, "chek")  # not the `{`

    def test_unknown_target_in_list(self, tmp_path: Path) -> None:
        text = flow(("        - to: human\n", "        - to: humna\n"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "unknown state 'humna'")
        assert (p.line, p.column) == at(text, "humna")
        assert p.hint == "did you mean 'human'?"

    def test_unknown_target_without_near_match(self, tmp_path: Path) -> None:
        text = flow(("      done: check", "      done: zzzzzz"))
        _, problems = check(tmp_path, text)
        p = the_error(problems, "unknown state 'zzzzzz'")
        assert p.hint == "define that state"

    def test_unreachable_state(self, tmp_path: Path) -> None:
        text = BASE + "  orphan:\n    type: end\n    say: never shown\n"
        _, problems = check(tmp_path, text)
        p = only_error(problems, "state 'orphan' is unreachable")
        assert (p.line, p.column) == at(text, "orphan:")

    def test_dead_end(self, tmp_path: Path) -> None:
        text = flow(("      error: human", "      error: stuck"),
                    ("  found:\n", "  stuck:\n    say: Something went wrong.\n  found:\n"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "state 'stuck' is a dead end")
        assert (p.line, p.column) == at(text, "stuck:")
        assert "type: end" in p.hint

    def test_missing_start_state(self, tmp_path: Path) -> None:
        text = flow(("start: ask_order", "start: ask_ordr"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "start state 'ask_ordr' is not defined")  # no cascade
        assert (p.line, p.column) == at(text, "ask_ordr")
        assert "ask_order" in p.hint

    def test_missing_handoff_policy(self, tmp_path: Path) -> None:
        text = flow(("handoff:\n  state: human\n", ""))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "no handoff policy")
        assert p.line == 1
        assert "type: handoff" in p.hint

    def test_handoff_state_undefined(self, tmp_path: Path) -> None:
        text = flow(("  state: human", "  state: humane"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "handoff state 'humane' is not defined")
        assert (p.line, p.column) == at(text, "humane")
        assert "type: handoff" in p.hint

    def test_handoff_state_not_of_type_handoff(self, tmp_path: Path) -> None:
        text = flow(("  state: human", "  state: found"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "handoff state 'found' is not of `type: handoff`")
        line = line_of(text, "state: found")
        assert (p.line, p.column) == (line, len("  state: ") + 1)
        assert "type: handoff" in p.hint

    def test_handoff_state_cannot_collect(self, tmp_path: Path) -> None:
        text = flow(("    type: handoff\n",
                     "    type: handoff\n    collect: [order_id]  # here\n"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "handoff state 'human' cannot collect entities")
        assert (p.line, p.column) == at(text, "[order_id]  # here")


# --------------------------------------------------------------------------- guards


class TestGuards:
    def test_syntax_error_column_points_into_the_guard(self, tmp_path: Path) -> None:
        text = flow(("when: order.found", "when: order.found and and"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "found keyword 'and' at column 17 in guard")
        line, col = at(text, "order.found and and")
        assert (p.line, p.column) == (line, col + len("order.found and "))

    def test_syntax_error_in_quoted_guard(self, tmp_path: Path) -> None:
        text = flow(("when: order.found", 'when: "order.found and and"'))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "in guard")
        line, col = at(text, "order.found and and")  # after the opening quote
        assert (p.line, p.column) == (line, col + len("order.found and "))

    def test_syntax_error_in_block_guard(self, tmp_path: Path) -> None:
        text = flow(("when: order.found", "when: |\n            order.found and\n"
                     "            (order.status ==)"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "in guard")
        line, col = at(text, "(order.status ==)")  # the line inside the block
        assert (p.line, p.column) == (line, col + len("(order.status =="))

    def test_unfinished_block_guard(self, tmp_path: Path) -> None:
        text = flow(("when: order.found", "when: |\n            order.found\n"
                     "            and (order.status"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "in guard")
        assert p.line == line_of(text, "and (order.status")  # not the line after it

    def test_unknown_name_did_you_mean(self, tmp_path: Path) -> None:
        text = flow(("when: order.found", "when: ordr.found"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "guard uses unknown name 'ordr'")
        assert (p.line, p.column) == at(text, "ordr.found")
        assert p.hint == "did you mean 'order'?"

    def test_unknown_name_lists_known_names(self, tmp_path: Path) -> None:
        text = flow(("when: order.found", "when: zzz > 1"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "unknown name 'zzz'")
        assert "order_id" in p.hint and "policy" in p.hint

    def test_entity_no_state_collects(self, tmp_path: Path) -> None:
        text = flow(("entities:\n", "entities:\n  email:\n    type: email\n    ask: Email?\n"),
                    ("when: order.found", "when: email != null"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "guard uses entity 'email', which no state collects")
        assert (p.line, p.column) == at(text, "email != null")
        assert "collect" in p.hint

    def test_builtins_and_accepted_entities_are_known(self, tmp_path: Path) -> None:
        text = flow(("  check:\n", "  check:\n    accept: [order_id]\n"),
                    ("when: order.found", "when: order.found and policy.x and turn > 1 "
                     'and language == "en" and order_id != null'))
        _, problems = check(tmp_path, text)
        assert problems == []


# --------------------------------------------------------------------------- say texts


class TestSayTemplates:
    def test_syntax_error(self, tmp_path: Path) -> None:
        text = flow(('say: "Order {{ order_id }} is', 'say: "Order {{ order_id } is'))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "template syntax error")
        assert p.line == line_of(text, "{{ order_id } is")
        assert "{{" in p.hint

    def test_syntax_error_line_in_block_text(self, tmp_path: Path) -> None:
        text = flow(('    say: "Order {{ order_id }} is {{ order.status }}."',
                     "    say: |\n      Order {{ order_id }}\n      is {{ order.status | }}."))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "template syntax error")
        assert p.line == line_of(text, "order.status | }}")

    def test_syntax_error_in_one_language(self, tmp_path: Path) -> None:
        text = flow(('say: "A colleague will take over."',
                     'say:\n      en: "A colleague will take over."\n      zh: "{% if %}转人工"'))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "template syntax error")
        assert p.line == line_of(text, "转人工")

    def test_unknown_variable(self, tmp_path: Path) -> None:
        text = flow(("is {{ order.status }}", "is {{ ordr.status }}"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "template uses unknown name 'ordr'")
        assert p.line == line_of(text, "ordr.status")
        assert p.hint == "did you mean 'order'?"

    def test_unknown_variable_in_a_language_variant(self, tmp_path: Path) -> None:
        text = flow(('say: "A colleague will take over."',
                     'say:\n      en: "A colleague will take over."\n      zh: "{{ nmae }}"'))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "unknown name 'nmae'")
        assert (p.line, p.column) == at(text, '"{{ nmae }}"')

    def test_entity_never_collected(self, tmp_path: Path) -> None:
        text = flow(("entities:\n", "entities:\n  email:\n    type: email\n    ask: Email?\n"),
                    ('say: "A colleague will take over."', 'say: "We will write to {{ email }}."'))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "template uses entity 'email', which no state collects")
        assert p.line == line_of(text, "{{ email }}")

    def test_ask_text_unknown_name(self, tmp_path: Path) -> None:
        text = flow(('ask: "What is your order number?"', 'ask: "Your order, {{ nmae }}?"'))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "unknown name 'nmae'")
        assert p.line == line_of(text, "{{ nmae }}")

    def test_end_state_without_say(self, tmp_path: Path) -> None:
        text = flow(('    type: end\n    say: "Order {{ order_id }} is {{ order.status }}."\n',
                     "    type: end\n"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "end state 'found' has no `say:` text")
        assert (p.line, p.column) == at(text, "found:")

    def test_handoff_state_without_say(self, tmp_path: Path) -> None:
        text = flow(('    say: "A colleague will take over."\n', ""))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "handoff state 'human' has no `say:` text")
        assert (p.line, p.column) == at(text, "human:")


# --------------------------------------------------------------------------- prompt files


class TestPrompts:
    def test_default_prompt_is_clean(self, tmp_path: Path) -> None:
        # default.j2 loops over `entities.items()`: a method, not an entity called "items".
        _, problems = check(tmp_path, BASE)
        assert problems == []

    def test_good_fixture_prompt(self, tmp_path: Path) -> None:
        text = flow(("start: ask_order\n", "start: ask_order\nprompt: good.j2\n"))
        _, problems = check(tmp_path, text, prompts=FIXTURE_PROMPTS)
        assert problems == []

    def test_missing_prompt(self, tmp_path: Path) -> None:
        text = flow(("start: ask_order\n", "start: ask_order\nprompt: refnud.j2\n"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "prompt template 'refnud.j2' not found")
        assert (p.line, p.column) == at(text, "refnud.j2")  # reported once, not per state
        assert "refnud.j2" in p.hint

    def test_missing_state_prompt(self, tmp_path: Path) -> None:
        text = flow(("  check:\n", "  check:\n    prompt: nope.j2\n"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "prompt template 'nope.j2' not found")
        assert (p.line, p.column) == at(text, "nope.j2")

    def test_no_prompts_directory(self, tmp_path: Path) -> None:
        _, problems = check(tmp_path, BASE, prompts=None)
        p = only_error(problems, "no prompts directory")
        assert p.line == 1

    def test_undefined_variable(self, tmp_path: Path) -> None:
        text = flow(("start: ask_order\n", "start: ask_order\nprompt: undefined_variable.j2\n"))
        _, problems = check(tmp_path, text, prompts=FIXTURE_PROMPTS)
        p = only_error(problems, "uses undefined variable 'customer_name'")
        assert (p.line, p.column) == at(text, "undefined_variable.j2")
        assert "entities" in p.hint  # lists what the engine provides

    def test_syntax_error(self, tmp_path: Path) -> None:
        text = flow(("start: ask_order\n", "start: ask_order\nprompt: syntax_error.j2\n"))
        _, problems = check(tmp_path, text, prompts=FIXTURE_PROMPTS)
        p = only_error(problems, "prompt template 'syntax_error.j2' line")
        assert (p.line, p.column) == at(text, "syntax_error.j2")
        assert "syntax_error.j2" in p.hint

    def test_unknown_entity(self, tmp_path: Path) -> None:
        text = flow(("start: ask_order\n", "start: ask_order\nprompt: unknown_entity.j2\n"))
        _, problems = check(tmp_path, text, prompts=FIXTURE_PROMPTS)
        p = only_error(problems, "uses unknown name 'ordr_id'")
        assert (p.line, p.column) == at(text, "unknown_entity.j2")
        assert p.hint == "did you mean 'order_id'?"


# --------------------------------------------------------------------------- actions & entities


class TestActionsAndEntities:
    def test_unknown_action_did_you_mean(self, tmp_path: Path) -> None:
        text = flow(("{call: lookup_order,", "{call: lookup_ordr,"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "unknown action 'lookup_ordr'")
        assert (p.line, p.column) == at(text, "{call: lookup_ordr")
        assert p.hint == "did you mean 'lookup_order'?"

    def test_unknown_action_shorthand_lists_registered(self, tmp_path: Path) -> None:
        text = flow(("    actions: [{call: lookup_order, save_as: order}]",
                     "    actions: [{call: lookup_order, save_as: order}, send_fax]"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "unknown action 'send_fax'")
        assert (p.line, p.column) == at(text, "send_fax")
        assert "lookup_order" in p.hint and "issue_refund" in p.hint

    def test_actions_not_checked_without_registry(self, tmp_path: Path) -> None:
        text = flow(("{call: lookup_order, save_as: order}", "{call: anything, save_as: order}"))
        _, problems = check(tmp_path, text, actions=None)
        assert problems == []

    def test_collect_undeclared_entity(self, tmp_path: Path) -> None:
        text = flow(("    collect: [order_id]", "    collect: [order_id, emial]"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "collects undeclared entity 'emial'")
        assert (p.line, p.column) == at(text, "emial")
        assert "entities:" in p.hint

    def test_accept_and_forget_undeclared_entity(self, tmp_path: Path) -> None:
        text = flow(("  check:\n", "  check:\n    accept: [phone]\n    forget: [email]\n"))
        _, problems = check(tmp_path, text)
        p = the_error(problems, "accepts undeclared entity 'phone'")
        assert (p.line, p.column) == at(text, "phone]")
        p = the_error(problems, "forgets undeclared entity 'email'")
        assert (p.line, p.column) == at(text, "email]")
        assert len(errors(problems)) == 2

    def test_collected_entity_without_ask(self, tmp_path: Path) -> None:
        text = flow(('    ask: "What is your order number?"\n', ""))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "entity 'order_id' is collected in state 'ask_order' but has "
                                 "no `ask:` text")
        assert (p.line, p.column) == at(text, "order_id:")
        assert "ask:" in p.hint

    def test_intent_trigger_without_examples(self, tmp_path: Path) -> None:
        text = flow(("      done: check", "      done: check\n      cancel: human"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "intent 'cancel' has no examples")
        assert (p.line, p.column) == at(text, "cancel:")
        assert "examples" in p.hint

    def test_intent_examples_from_flow_intents(self, tmp_path: Path) -> None:
        text = flow(("      done: check", "      done: check\n      cancel: human"),
                    ("handoff:\n", "intents:\n  cancel: {examples: [stop]}\nhandoff:\n"))
        _, problems = check(tmp_path, text)
        assert problems == []

    def test_bad_regex_pattern(self, tmp_path: Path) -> None:
        text = flow(("pattern: 'HL\\d{8}'", "pattern: 'HL(\\d{8}'"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "entity 'order_id'")
        assert "pattern" in p.message and "does not compile" in p.message
        assert (p.line, p.column) == at(text, "'HL(")
        assert "string" in p.hint

    def test_pattern_matching_empty_text(self, tmp_path: Path) -> None:
        text = flow(("pattern: 'HL\\d{8}'", "pattern: '\\d*'"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "matches the empty string")
        assert p.line == line_of(text, "pattern:")

    def test_unknown_option_for_type(self, tmp_path: Path) -> None:
        text = flow(("pattern: 'HL\\d{8}'", "pattern: 'HL\\d{8}'\n    values: [a, b]"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "unknown option 'values'")
        assert (p.line, p.column) == at(text, "[a, b]")

    def test_misspelt_option_did_you_mean(self, tmp_path: Path) -> None:
        text = flow(("pattern: 'HL\\d{8}'", "patern: 'HL\\d{8}'"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "unknown option 'patern'")
        assert "did you mean 'pattern'" in p.message
        assert p.line == line_of(text, "patern:")

    def test_nested_enum_option(self, tmp_path: Path) -> None:
        text = flow(("    type: string\n    pattern: 'HL\\d{8}'\n",
                     "    type: enum\n    values:\n      ok: {synonyms: [fine]}\n"
                     "      bad: {synonyms: [fine]}\n"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "'fine' is used by both")
        assert p.line is not None
        assert line_of(text, "values:") <= p.line <= line_of(text, "bad:")

    def test_example_that_does_not_parse(self, tmp_path: Path) -> None:
        text = flow(("pattern: 'HL\\d{8}'",
                     "pattern: 'HL\\d{8}'\n    examples: [HL1, HL12345678]"))
        _, problems = check(tmp_path, text)
        p = only_error(problems, "example does not parse")
        assert (p.line, p.column) == at(text, "HL1,")


# --------------------------------------------------------------------------- several files


def test_two_files_with_the_same_flow_name(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(BASE)
    second = "# the same flow, copied\n" + BASE
    (tmp_path / "b.yaml").write_text(second)
    flows, problems = validate_paths([tmp_path], PROMPTS, ACTIONS)
    p = only_error(problems, "flow name 'mini' is also used by")
    assert p.file == str(tmp_path / "b.yaml")
    assert str(tmp_path / "a.yaml") in p.message
    assert (p.line, p.column) == at(second, "mini")
    assert [f.name for f in flows] == ["mini"]


# --------------------------------------------------------------------------- all problems


def test_every_problem_in_a_file_is_reported(tmp_path: Path) -> None:
    text = flow(("      done: check", "      done: chek"),
                ("{call: lookup_order, save_as: order}", "{call: lookup_ordr, save_as: order}"),
                ("when: order.found", "when: order.found and and"),
                ('say: "A colleague will take over."', 'say: "{{ nmae }}"'),
                ("    collect: [order_id]", "    collect: [order_id, emial]"))
    _, problems = check(tmp_path, text)
    expected = {
        "unknown state 'chek'": at(text, "chek"),
        "unknown action 'lookup_ordr'": at(text, "{call: lookup_ordr"),
        "in guard": (line_of(text, "and and"), None),
        "unknown name 'nmae'": at(text, '"{{ nmae }}"'),
        "undeclared entity 'emial'": at(text, "emial"),
    }
    assert len(errors(problems)) == len(expected), "\n".join(map(str, problems))
    for fragment, (line, column) in expected.items():
        p = the_error(problems, fragment)
        assert p.line == line
        if column is not None:
            assert p.column == column


def test_every_schema_problem_is_reported(tmp_path: Path) -> None:
    text = flow(("    collect: [order_id]", "    colect: [order_id]"),
                ("    type: string", "    type: strng"),
                ("    type: handoff", "    type: handof"))
    _, problems = check(tmp_path, text)
    assert len(errors(problems)) == 3, "\n".join(map(str, problems))
    assert the_error(problems, "unknown field 'colect'").line == line_of(text, "colect")
    assert the_error(problems, "entities.order_id.type").line == line_of(text, "strng")
    assert the_error(problems, "states.human.type").line == line_of(text, "type: handof")


def test_warnings_do_not_stop_loading(tmp_path: Path) -> None:
    text = flow(("entities:\n", "entities:\n  email:\n    type: email\n    ask: Email?\n"),
                ("      error: human", "      error: {to: found, reason: error}"),
                ('    say: "A colleague will take over."\n',
                 '    say: "A colleague will take over."\n    on: {done: found}\n'))
    loaded, problems = check(tmp_path, text)
    assert errors(problems) == [], "\n".join(map(str, problems))
    warnings = {p.message: p for p in problems}
    assert len(warnings) == 3
    never = warnings["entity 'email' is never collected by a state"]
    assert (never.line, never.column) == (line_of(text, "email:") + 1, 5)  # its first field
    reason = next(p for m, p in warnings.items() if m.startswith("`reason:`"))
    assert (reason.line, reason.column) == at(text, "error}")
    ignored = next(p for m, p in warnings.items() if "never taken" in m)
    assert ignored.line == line_of(text, "on: {done: found}")
    assert all(p.hint for p in problems)
    assert loaded is not None

    path = tmp_path / "mini.yaml"
    flows = load_flows(path, PROMPTS, ACTIONS)  # warnings do not raise
    assert "mini" in flows


def test_load_flows_raises_with_every_problem(tmp_path: Path) -> None:
    text = flow(("      done: check", "      done: chek"),
                ("{call: lookup_order, save_as: order}", "{call: lookup_ordr, save_as: order}"),
                ("entities:\n", "entities:\n  email:\n    type: email\n    ask: Email?\n"))
    path = tmp_path / "mini.yaml"
    path.write_text(text)
    with pytest.raises(FlowDefinitionError) as info:
        load_flows(path, PROMPTS, ACTIONS)
    problems = info.value.problems
    assert len(errors(list(problems))) == 2
    assert len(problems) == 3  # and the warning
    shown = str(info.value)
    assert shown.startswith("2 problem(s) in flow definition")
    for p in problems:
        assert str(p) in shown
    assert re.search(rf"mini\.yaml:{line_of(text, 'chek')}:\d+: error: .*'chek'", shown)
    assert "(fix: did you mean 'check'?)" in shown


def test_load_flows_accepts_a_directory(tmp_path: Path) -> None:
    (tmp_path / "mini.yaml").write_text(BASE)
    flows = load_flows([tmp_path], PROMPTS, ACTIONS)
    assert [f.name for f in flows] == ["mini"]


# --------------------------------------------------------------------------- the broken demo copy

BROKEN = Path(__file__).parent / "broken"
_SEED = re.compile(r"^[^#\n]+#\s*SEEDED (?P<kind>[a-z0-9-]+): (?P<fragment>.+?)\s*$")


def seeded_errors() -> list[tuple[Path, int, str, str]]:
    """``(file, line, kind, message fragment)`` of every ``# SEEDED`` comment in broken/."""
    seeds = []
    for path in sorted(BROKEN.glob("*.yaml")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if m := _SEED.match(line):
                seeds.append((path, number, m["kind"], m["fragment"]))
    return seeds


def test_broken_copy_seeds_enough_kinds_of_error() -> None:
    seeds = seeded_errors()
    assert {path.name for path, *_ in seeds} == {"refund.yaml", "logistics.yaml"}
    kinds = [kind for *_, kind, _ in seeds]
    assert len(set(kinds)) == len(kinds) >= 8


def test_broken_copy_reports_exactly_the_seeded_errors() -> None:
    _, problems = validate_paths([BROKEN], PROMPTS, ACTIONS)
    found = errors(problems)
    for path, line, kind, fragment in seeded_errors():
        here = [p for p in found if p.file == str(path) and p.line == line]
        assert len(here) == 1, f"{kind}: {path.name}:{line} has {[str(p) for p in here]}"
        assert fragment in here[0].message, f"{kind}: {here[0]}"
        assert here[0].hint, f"{kind}: no hint"
    assert len(found) == len(seeded_errors()), "\n".join(map(str, found))
