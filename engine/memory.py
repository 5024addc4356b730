"""Conversation memory: token estimates, the verbatim window, and trimming.

The model sees, in order: the stable prompt (cached), the running summary and
the pinned entities (always from the store, never from the transcript), then
the latest turns verbatim. Older turns are folded into the summary off the
reply path (:mod:`engine.summaries`). When a request would still exceed the
flow's budget, whole exchanges are dropped oldest first; a ``tool_result`` is
never kept without the ``tool_use`` it answers (the Messages API rejects
orphaned results), and the current question is never dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "budget_tokens",
    "estimate_request_tokens",
    "estimate_tokens",
    "strip_orphaned_tool_results",
    "trim_messages",
]


_CJK = re.compile("[\u3000-\u9fff\uf900-\ufaff\uff00-\uffef]")


def estimate_tokens(text: str) -> int:
    """A conservative local token estimate for mixed Chinese and English text.

    Claude's tokenizer spends roughly one token per 3.5-4 Latin characters
    and 1-1.5 per CJK character; over-estimating keeps requests under the
    budget without a network round trip.
    """
    # A regex counts in C: a character loop in Python cost ~1 ms per request.
    cjk = len(_CJK.findall(text))
    other = len(text) - cjk
    return math.ceil(cjk * 1.3 + other / 3.5)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind == "tool_use":
            parts.append(json.dumps(block.get("input", {}), ensure_ascii=False))
        elif kind == "tool_result":
            parts.append(_content_text(block.get("content", "")))
    return "\n".join(parts)


def estimate_request_tokens(system: Sequence[dict[str, Any]] | str,
                            messages: Sequence[dict[str, Any]],
                            tools: Sequence[dict[str, Any]] = ()) -> int:
    system_text = system if isinstance(system, str) else "\n".join(
        b.get("text", "") for b in system)
    total = estimate_tokens(system_text)
    total += sum(estimate_tokens(_content_text(m["content"])) + 4 for m in messages)
    total += sum(estimate_tokens(json.dumps(t, ensure_ascii=False)) for t in tools)
    return total


def budget_tokens(max_context_tokens: int, safety_margin: float) -> int:
    """The usable budget: the flow's maximum minus the safety margin."""
    return int(max_context_tokens * (1.0 - safety_margin))


def _tool_use_ids(message: dict[str, Any]) -> set[str]:
    content = message["content"]
    if isinstance(content, str):
        return set()
    return {b["id"] for b in content if b.get("type") == "tool_use"}


def strip_orphaned_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Remove ``tool_result`` blocks whose ``tool_use`` is not in the preceding message."""
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message["content"]
        if message["role"] == "user" and not isinstance(content, str):
            allowed = _tool_use_ids(out[-1]) if out else set()
            kept = [b for b in content
                    if b.get("type") != "tool_result" or b.get("tool_use_id") in allowed]
            if not kept:
                kept = [{"type": "text", "text": "(continued)"}]
            message = {**message, "content": kept}
        out.append(message)
    return out


def trim_messages(messages: list[dict[str, Any]],
                  fits: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """Drop the oldest exchanges while ``fits(messages)`` is false.

    An exchange is a user message and the assistant message after it, so the
    result still starts with a user message and alternates; the last message
    (the current question) is always kept. Tool results left without their
    tool use are stripped.
    """
    trimmed = list(messages)
    while len(trimmed) > 1 and not fits(trimmed):
        # Drop the first user message and the assistant reply that follows it.
        drop = 2 if len(trimmed) > 2 and trimmed[1]["role"] == "assistant" else 1
        trimmed = trimmed[drop:]
        while trimmed and trimmed[0]["role"] != "user":
            trimmed = trimmed[1:]
        trimmed = strip_orphaned_tool_results(trimmed)
    return strip_orphaned_tool_results(trimmed)
