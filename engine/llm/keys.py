"""What may be shared between customers, and under which key.

A model answer may be reused for another customer (response cache, in-flight
coalescing, FAQ batching) only when nothing personal went into it and nothing
personal can come out of it. :func:`decide_scope` decides that for a decision
request, conservatively, and builds the key; :func:`route_scope` does the same
for routing.

Never shared (policy ``never``), whatever the state declares:

* the state's ``cache`` is ``never`` (the default);
* the state collects or accepts entities or runs actions (its answers are about
  one customer's data by construction);
* the state's prompt template (or a template it extends/includes) reads
  ``results`` or names a specific entity (``entities.order_id``,
  ``pinned["x"]``, ``entities.get("x")``): its prompt renders customer values;
* the request carries entity values, action results, a summary, a memory note,
  a hand-back note, or asks for the memory echo;
* the (already redacted) text contains a PII placeholder, a run of 5+ digits
  (order, parcel or phone numbers the redactor does not mask), or is empty or
  longer than :data:`MAX_SHARED_CHARS`.

An answer may be *produced* for sharing (stored in the cache, computed once for
a group of identical or similar requests) only if, on top of that, the request
has no customer message in its history: the model saw nothing but the question.
A cached answer may still be *served* to a customer with a history.

The key is the SHA-256 of: the flow's name, version and a hash of its whole
definition, the state, a hash of the prompt template sources (the template and
every template it extends or includes), the model id, the reply language and
the normalised (``engine.textnorm.normalize``) redacted question. Only the key
and the answer's reply/transition ever reach the cache; entity values never.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.flow.compiled import Flow
from engine.models.base import DecisionRequest, HistoryItem, RouteRequest
from engine.textnorm import normalize

__all__ = [
    "MAX_SHARED_CHARS",
    "CachePolicy",
    "Scope",
    "TemplateInfo",
    "decide_scope",
    "route_scope",
    "template_info",
]

CachePolicy = Literal["never", "short", "faq"]

#: Longer messages are narratives about one customer's case, not FAQ questions.
MAX_SHARED_CHARS = 400
#: Bump to invalidate every stored key after a change of the key or value format.
KEY_VERSION = "v1"

_PLACEHOLDER = re.compile(r"\[(?:EMAIL|PHONE|CARD|CN_ID|IBAN)_\d+\]")
_LONG_NUMBER = re.compile(r"\d{5,}")
#: Names in the prompt context that carry customer data.
_CUSTOMER_ROOTS = frozenset({"entities", "pinned"})
_PERSONAL_ROOTS = frozenset({"results"})
_GENERIC_METHODS = frozenset({"items", "keys", "values"})


@dataclass(frozen=True, slots=True)
class Scope:
    """Whether and how a request may be shared.

    ``policy`` is the effective cache policy (``never`` when anything personal is
    involved); ``key`` is set when ``policy != "never"``; ``producible`` says the
    request may produce an answer for others (no customer history); ``reason``
    says why a request is not shareable (for logs and tests).
    """

    policy: CachePolicy
    key: str | None = None
    producible: bool = False
    reason: str = ""

    @property
    def shareable(self) -> bool:
        return self.policy != "never" and self.key is not None


@dataclass(frozen=True, slots=True)
class TemplateInfo:
    """A prompt template's fingerprint and whether it renders customer values."""

    digest: str
    personal: bool
    why: str = ""


_template_memo: dict[tuple[int, str], tuple[Flow, TemplateInfo]] = {}
_flow_memo: dict[int, tuple[Flow, str]] = {}


def _sha(parts: Iterable[Any]) -> str:
    data = json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def _flow_digest(flow: Flow) -> str:
    memo = _flow_memo.get(id(flow))
    if memo is not None and memo[0] is flow:
        return memo[1]
    digest = _sha([flow.spec.model_dump(mode="json")])[:16]
    if len(_flow_memo) > 512:
        _flow_memo.clear()
    _flow_memo[id(flow)] = (flow, digest)
    return digest


def _template_sources(env: ImmutableSandboxedEnvironment, name: str) -> list[tuple[str, str]]:
    """``(name, source)`` of a template and every template it references, recursively."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if env.loader is None:
            raise LookupError(f"no template loader for {current!r}")
        source, _, _ = env.loader.get_source(env, current)
        out.append((current, source))
        for ref in meta.find_referenced_templates(env.parse(source)):
            if ref is not None:
                todo.append(ref)
    return sorted(out)


def _personal_use(ast: nodes.Template) -> str:
    """Why a template renders customer values, or ``""``."""
    undeclared = meta.find_undeclared_variables(ast)
    hit = undeclared & _PERSONAL_ROOTS
    if hit:
        return f"reads {sorted(hit)[0]}"
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        if not isinstance(node, nodes.Getattr | nodes.Getitem):
            continue
        base = node.node
        if not isinstance(base, nodes.Name) or base.name not in _CUSTOMER_ROOTS:
            continue
        if isinstance(node, nodes.Getattr) and node.attr in _GENERIC_METHODS:
            continue  # iterating over whatever is there: empty when the request has none
        return f"names a specific value of {base.name}"
    return ""


def template_info(flow: Flow, state: str) -> TemplateInfo:
    """Fingerprint of the state's prompt template sources (memoised per flow object)."""
    memo_key = (id(flow), state)
    memo = _template_memo.get(memo_key)
    if memo is not None and memo[0] is flow:
        return memo[1]
    name = flow.states[state].prompt
    try:
        sources = _template_sources(flow.env, name)
    except Exception as exc:  # no loader, missing file: never share what we cannot fingerprint
        info = TemplateInfo(digest="", personal=True, why=f"template not readable: {exc}")
    else:
        why = ""
        for _, source in sources:
            why = _personal_use(flow.env.parse(source))
            if why:
                break
        info = TemplateInfo(digest=_sha(sources)[:16], personal=bool(why), why=why)
    if len(_template_memo) > 2048:
        _template_memo.clear()
    _template_memo[memo_key] = (flow, info)
    return info


def shareable_text(text: str) -> tuple[str, str]:
    """``(normalised text, "")`` if ``text`` may be shared, else ``("", reason)``."""
    norm = normalize(text)
    if not norm:
        return "", "empty text"
    if len(norm) > MAX_SHARED_CHARS:
        return "", "long text"
    if _PLACEHOLDER.search(text):
        return "", "redacted personal data in the text"
    if _LONG_NUMBER.search(norm):
        return "", "a long number in the text"
    return norm, ""


def _public(results: Mapping[str, Any]) -> bool:
    """Results other than the engine's internal bookkeeping (keys starting with ``_``)."""
    return any(not str(k).startswith("_") for k in results)


def _has_customer_history(history: Iterable[HistoryItem]) -> bool:
    return any(item.role == "customer" for item in history)


def decide_scope(request: DecisionRequest, model_id: str) -> Scope:
    """The sharing scope of a decision request; see the module docstring."""
    flow = request.flow
    state = flow.states.get(request.state)
    if state is None:
        return Scope("never", reason="unknown state")
    if state.cache not in ("short", "faq"):
        return Scope("never", reason="the state's cache policy is never")
    policy: CachePolicy = "faq" if state.cache == "faq" else "short"
    spec = flow.spec.states.get(request.state)
    if state.collect or state.actions or (spec is not None and spec.accept):
        return Scope("never", reason="the state collects entities or runs actions")
    info = template_info(flow, request.state)
    if info.personal:
        return Scope("never", reason=f"the prompt template {info.why}")
    if request.entities:
        return Scope("never", reason="the request carries entity values")
    if _public(request.results):
        return Scope("never", reason="the request carries action results")
    if request.summary or request.memory_note or request.handback or \
            getattr(request, "check_memory", False):
        return Scope("never", reason="the request carries conversation context")
    norm, why = shareable_text(request.text)
    if why:
        return Scope("never", reason=why)
    key = _sha([KEY_VERSION, "decide", flow.name, flow.version, _flow_digest(flow),
                request.state, info.digest, model_id, request.language, norm])
    producible = not _has_customer_history(request.history)
    return Scope(policy, key, producible, "" if producible else "the request has a history")


def route_scope(request: RouteRequest, model_id: str, policy: CachePolicy) -> Scope:
    """The sharing scope of a routing request: a function of the text and the flows."""
    if policy == "never":
        return Scope("never", reason="route caching is off")
    norm, why = shareable_text(request.text)
    if why:
        return Scope("never", reason=why)
    candidates = [[c.flow, c.description, list(c.examples)] for c in request.candidates]
    key = _sha([KEY_VERSION, "route", model_id, _sha(candidates)[:16], norm])
    return Scope(policy, key, True)
