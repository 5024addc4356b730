"""Jinja templates: the prompt files in ``prompts/`` and the inline ``say`` texts.

Templates render in a sandbox with ``StrictUndefined``: a template that uses
a name the engine does not provide fails at load time (see
:func:`template_names`), never silently renders an empty string to a customer.
Customer text only ever enters a template as a variable's value.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["TemplateRefs", "make_environment", "money", "template_refs"]


def money(value: Any, currency: str | None = None) -> str:
    """Format ``{"amount": "129.00", "currency": "CNY"}`` or a number for customers."""
    if isinstance(value, Mapping):
        currency = currency or str(value.get("currency", ""))
        value = value.get("amount")
    try:
        amount = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return str(value)
    symbols = {"CNY": "¥", "USD": "$", "EUR": "€", "GBP": "£"}
    symbol = symbols.get(currency or "", "")
    text = f"{amount:,.2f}"
    return f"{symbol}{text}" if symbol else f"{text} {currency or ''}".strip()


def make_environment(prompts_dir: Path | None) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        loader=FileSystemLoader(str(prompts_dir)) if prompts_dir else None,
        # Prompts are validated at load time and fixed for the process's life;
        # checking file mtimes on every render was measurable per turn.
        auto_reload=False,
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["money"] = money
    return env


class TemplateRefs:
    """Names a template reads: top-level names and dotted paths rooted at them."""

    def __init__(self) -> None:
        self.roots: set[str] = set()
        self.paths: set[tuple[str, ...]] = set()


def _dotted(node: nodes.Node) -> tuple[str, ...] | None:
    parts: list[str] = []
    while isinstance(node, nodes.Getattr):
        parts.append(node.attr)
        node = node.node
    if isinstance(node, nodes.Name):
        parts.append(node.name)
        return tuple(reversed(parts))
    return None


def _walk(node: nodes.Node) -> Iterator[nodes.Node]:
    yield node
    for child in node.iter_child_nodes():
        yield from _walk(child)


def template_refs(env: ImmutableSandboxedEnvironment, source: str) -> TemplateRefs:
    """Parse ``source`` and return the undeclared names and dotted paths it reads.

    Raises:
        jinja2.TemplateSyntaxError: the template does not parse.
    """
    from jinja2 import meta

    ast = env.parse(source)
    refs = TemplateRefs()
    refs.roots = set(meta.find_undeclared_variables(ast))
    # ``entities.items()`` calls a method; it does not read an entity named ``items``.
    callees = {id(node.node) for node in _walk(ast) if isinstance(node, nodes.Call)}
    for node in _walk(ast):
        if isinstance(node, nodes.Getattr) and id(node) in callees:
            continue
        if isinstance(node, nodes.Getattr | nodes.Name):
            path = _dotted(node)
            if path and path[0] in refs.roots:
                refs.paths.add(path)
    return refs
