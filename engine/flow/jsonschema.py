"""The JSON Schema of flow files, for editor completion (``helpline schema``).

Generated from the same pydantic models the loader validates with, plus each
entity type's own options, so it cannot drift from what the loader accepts.
"""

from __future__ import annotations

from typing import Any

from engine.flow.entities import ENTITY_TYPES
from engine.flow.schema import FlowSpec

__all__ = ["flow_json_schema"]


def flow_json_schema() -> dict[str, Any]:
    schema = FlowSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Helpline flow"
    defs = schema.setdefault("$defs", {})
    _allow_shorthands(defs)
    entity = defs.get("EntitySpec")
    if entity is not None:
        variants = []
        for name, etype in ENTITY_TYPES.items():
            options = etype.Options.model_json_schema()
            props = dict(options.get("properties", {}))
            for nested_name, nested in options.get("$defs", {}).items():
                defs.setdefault(nested_name, nested)
            variants.append({
                "if": {"properties": {"type": {"const": name}}},
                "then": {"properties": props},
            })
        entity["allOf"] = variants
        entity["additionalProperties"] = True
    return schema


def _allow_shorthands(defs: dict[str, Any]) -> None:
    """Describe the short forms the loader expands (``done: state``, ``actions: [name]``)."""
    state = defs.get("StateSpec", {}).get("properties", {})
    transition = {"$ref": "#/$defs/TransitionSpec"}
    target = {"type": "string", "description": "the target state"}
    one = {"anyOf": [target, transition]}
    on = state.get("on")
    if on is not None:
        for pattern in on.get("patternProperties", {}):
            on["patternProperties"][pattern] = {"anyOf": [target, transition,
                                                          {"type": "array", "items": one}]}
    actions = state.get("actions")
    if actions is not None:
        actions["items"] = {"anyOf": [{"type": "string", "description": "an action name"},
                                      {"$ref": "#/$defs/ActionCall"}]}
