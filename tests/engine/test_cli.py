"""The ``helpline`` command line: validate, schema and graph (engine/cli.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from engine.cli import app
from engine.demo.actions import build_actions
from engine.demo.shop import Shop
from engine.flow.compiled import Flow
from engine.flow.loader import validate_paths
from engine.flow.machine import MachineTransition
from tests.engine.flow.test_loader import BROKEN, seeded_errors

ROOT = Path(__file__).resolve().parents[2]
FLOWS = ROOT / "flows"
PROMPTS = ROOT / "prompts"
DEMO_FLOWS = sorted(FLOWS.glob("*.yaml"))

runner = CliRunner()


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def demo() -> dict[str, Flow]:
    """The demo flows as the loader compiles them, by file name."""
    flows, problems = validate_paths([FLOWS], PROMPTS, build_actions(Shop()).names())
    assert not problems
    return {Path(f.file).name: f for f in flows}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    result = invoke("schema")
    assert result.exit_code == 0
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


# --------------------------------------------------------------------------- validate


def test_validate_demo_flows() -> None:
    result = invoke("validate", FLOWS)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "ok: 3 flow(s) valid (faq, logistics, refund)"
    assert result.stderr == ""


def test_validate_defaults_to_the_project_flows() -> None:
    result = invoke("validate")
    assert result.exit_code == 0, result.output
    assert "ok: 3 flow(s) valid" in result.stdout


def test_validate_as_a_subprocess() -> None:
    exe = Path(sys.executable).with_name("helpline")
    done = subprocess.run([str(exe), "validate", "flows/"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "ok: 3 flow(s) valid (faq, logistics, refund)" in done.stdout


def test_validate_broken_reports_every_seeded_error_at_its_line() -> None:
    result = invoke("validate", BROKEN)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    seeds = seeded_errors()
    assert len(seeds) >= 8
    for path, line, kind, fragment in seeds:
        prefix = f"{path}:{line}:"
        matching = [s for s in lines if s.startswith(prefix) and ": error: " in s]
        assert len(matching) == 1, f"{kind} at {prefix}\n{result.stderr}"
        assert fragment in matching[0], f"{kind}: {matching[0]}"
        assert "(fix: " in matching[0], f"{kind}: no hint: {matching[0]}"
    assert lines[-1] == f"{len(seeds)} error(s) in 1 path(s)"


def test_validate_relative_paths_are_reported_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = invoke("validate", "tests/engine/flow/broken/refund.yaml")
    assert result.exit_code == 1
    first = result.stderr.splitlines()[0]
    assert re.match(r"tests/engine/flow/broken/refund\.yaml:\d+:\d+: error: ", first), first


def test_validate_strict_fails_on_warnings(tmp_path: Path) -> None:
    text = (FLOWS / "refund.yaml").read_text(encoding="utf-8")
    text = text.replace("entities:\n", "entities:\n  note:\n    type: string\n    ask: Note?\n", 1)
    (tmp_path / "refund.yaml").write_text(text, encoding="utf-8")
    relaxed = invoke("validate", tmp_path)
    assert relaxed.exit_code == 0, relaxed.output
    assert "warning: entity 'note' is never collected" in relaxed.stderr
    strict = invoke("validate", "--strict", tmp_path)
    assert strict.exit_code == 1
    assert "1 error(s)" in strict.stderr


def test_validate_with_a_prompts_directory(tmp_path: Path) -> None:
    result = invoke("validate", "--prompts", tmp_path, FLOWS / "refund.yaml")
    assert result.exit_code == 1
    assert "prompt template 'refund.j2' not found" in result.stderr


def test_validate_missing_path() -> None:
    result = invoke("validate", ROOT / "no-such-flow.yaml")
    assert result.exit_code == 1
    assert "cannot read file" in result.stderr


def test_validate_prints_brackets_literally(tmp_path: Path) -> None:
    text = (FLOWS / "refund.yaml").read_text(encoding="utf-8")
    text = text.replace("when: not order.found", "when: order.status in [/x] and and")
    (tmp_path / "refund.yaml").write_text(text, encoding="utf-8")
    result = runner.invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 1
    assert "'order.status in [/x] and and'" in result.stderr


# --------------------------------------------------------------------------- schema


def test_schema_is_json_schema(schema: dict[str, Any]) -> None:
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["type"] == "object"
    assert {"flow", "start", "states"} <= set(schema["required"])
    assert "states" in schema["properties"]
    assert set(schema["properties"]) >= {"flow", "start", "states", "entities", "handoff"}
    defs = schema["$defs"]
    for ref in _refs(schema):  # every $ref resolves
        assert ref.startswith("#/$defs/") and ref.removeprefix("#/$defs/") in defs, ref
    entity = defs["EntitySpec"]
    options = {c["if"]["properties"]["type"]["const"]: c["then"]["properties"]
               for c in entity["allOf"]}
    assert set(options) == set(entity["properties"]["type"]["enum"])
    assert "pattern" in options["string"] and "values" in options["enum"]


def test_schema_to_file(tmp_path: Path, schema: dict[str, Any]) -> None:
    out = tmp_path / "flow.schema.json"
    result = invoke("schema", "-o", out)
    assert result.exit_code == 0
    assert f"wrote {out}" in result.stdout.replace("\n", "")
    assert json.loads(out.read_text(encoding="utf-8")) == schema


def test_schema_accepts_explicit_flows(schema: dict[str, Any], demo: dict[str, Flow]) -> None:
    """The demo flows written without the loader's shorthands validate against the schema."""
    for flow in demo.values():
        data = flow.spec.model_dump(mode="json", exclude_defaults=True)
        problems = _validate(data, schema, schema)
        assert problems == [], f"{flow.name}: {problems}"


@pytest.mark.parametrize("path", DEMO_FLOWS, ids=[p.stem for p in DEMO_FLOWS])
def test_schema_validates_the_demo_flows(path: Path, schema: dict[str, Any]) -> None:
    data = json.loads(json.dumps(YAML(typ="safe").load(path.read_text(encoding="utf-8"))))
    assert _validate(data, schema, schema) == []


def test_schema_rejects_a_typo(schema: dict[str, Any], demo: dict[str, Flow]) -> None:
    data = demo["refund.yaml"].spec.model_dump(mode="json", exclude_defaults=True)
    data["states"]["ask_order"]["colect"] = data["states"]["ask_order"].pop("collect")
    data["entities"]["order_id"]["type"] = "strng"
    problems = _validate(data, schema, schema)
    assert any("colect" in p for p in problems), problems
    assert any("strng" in p for p in problems), problems


# A validator for the subset of JSON Schema that `helpline schema` uses (the
# jsonschema package is not a dependency). It refuses keywords it does not know,
# so it cannot pass a document by ignoring part of the schema.
_KNOWN = {"$schema", "$defs", "$ref", "title", "description", "default", "type", "properties",
          "additionalProperties", "patternProperties", "propertyNames", "required", "items",
          "anyOf", "allOf", "if", "then", "enum", "const", "pattern", "minLength", "maxLength",
          "minimum", "maximum"}
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
    "number": (int, float), "boolean": (bool,), "null": (type(None),),
}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for k, v in node.items() if k != "$ref" for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _validate(value: Any, schema: dict[str, Any], root: dict[str, Any],
              where: str = "$") -> list[str]:
    unknown = set(schema) - _KNOWN
    assert not unknown, f"the test validator does not support {unknown}"
    if "$ref" in schema:
        target = root["$defs"][schema["$ref"].removeprefix("#/$defs/")]
        return _validate(value, target, root, where)
    out: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (
            kind in ("integer", "number") and isinstance(value, bool))
        if not ok:
            return [f"{where}: {value!r} is not of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        out.append(f"{where}: {value!r} is not {schema['const']!r}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1e9):
            out.append(f"{where}: {value!r} has the wrong length")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and not schema.get("minimum", -1e308) <= value <= schema.get("maximum", 1e308):
        out.append(f"{where}: {value!r} is out of range")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += _validate(item, schema["items"], root, f"{where}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        out += [f"{where}: {r!r} is required" for r in schema.get("required", ())
                if r not in value]
        for key, item in value.items():
            if "propertyNames" in schema:
                out += _validate(key, schema["propertyNames"], root, f"{where} key {key!r}")
            matched = [s for p, s in patterns.items() if re.search(p, key)]
            if key in props:
                matched.append(props[key])
            for sub in matched:
                out += _validate(item, sub, root, f"{where}.{key}")
            extra = schema.get("additionalProperties", True)
            if not matched and extra is False:
                out.append(f"{where}: unknown property {key!r}")
            elif not matched and isinstance(extra, dict):
                out += _validate(item, extra, root, f"{where}.{key}")
    if "anyOf" in schema:
        results = [_validate(value, s, root, where) for s in schema["anyOf"]]
        if all(results):
            out.append(f"{where}: matches none of anyOf: {results}")
    for sub in schema.get("allOf", ()):
        if "if" in sub:
            if not _validate(value, sub["if"], root, where):
                out += _validate(value, sub.get("then", {}), root, where)
        else:
            out += _validate(value, sub, root, where)
    return out


# --------------------------------------------------------------------------- graph


def _expected_edge(t: MachineTransition) -> str:
    label = t.trigger + (f" [{t.guard.source}]" if t.guard is not None else "")
    label = label.replace(":", "#58;").replace('"', "#quot;")
    return f"{t.source} --> {t.dest} : {label}"


@pytest.mark.parametrize("path", DEMO_FLOWS, ids=[p.stem for p in DEMO_FLOWS])
def test_graph_draws_every_state_and_transition(path: Path, demo: dict[str, Flow]) -> None:
    result = invoke("graph", path)
    assert result.exit_code == 0, result.output
    flow = demo[path.name]
    lines = result.stdout.splitlines()
    assert lines[:4] == ["---", f"title: {flow.name} v{flow.version}", "---", "stateDiagram-v2"]
    assert lines[4] == f"    [*] --> {flow.spec.start}"
    edges = Counter(s.strip() for s in lines if " --> " in s and "[*]" not in s)
    assert edges == Counter(_expected_edge(t) for t in flow.machine.transitions)
    drawn = {name for s in lines for name in re.findall(r"\w+", s)}
    assert set(flow.states) <= drawn
    for name, state in flow.states.items():
        if state.kind == "end":
            assert f"    {name} --> [*]" in lines
        if state.kind == "handoff":
            assert f"    class {name} handoff" in lines


def test_graph_of_a_broken_flow_fails() -> None:
    result = invoke("graph", BROKEN / "refund.yaml")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "unknown state 'check_ordr'" in result.stderr


def test_graph_of_a_missing_file_fails(tmp_path: Path) -> None:
    result = invoke("graph", tmp_path / "nope.yaml")
    assert result.exit_code == 1
    assert "cannot read file" in result.stderr


def test_serve_keeps_one_local_secret_across_restarts(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import stat

    from engine import cli

    monkeypatch.setattr(cli, "ROOT", tmp_path)
    first = cli._local_secret()
    assert len(first) >= 40 and cli._local_secret() == first
    mode = (tmp_path / "var" / "secret.key").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
