"""A protocol-faithful fake of the Anthropic Messages API, served over real HTTP on 127.0.0.1.

The real ``anthropic`` SDK talks to it through ``base_url``; nothing in the SDK is patched.

Endpoints (wire formats as in the real API):

* ``POST /v1/messages``: JSON, or SSE when ``"stream": true`` (``message_start``,
  ``content_block_start``/``_delta``/``_stop`` with ``text_delta`` and chunked
  ``input_json_delta``, ``ping``, ``message_delta``, ``message_stop``; optionally a
  mid-stream ``event: error`` or a dropped connection).
* ``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``.
* ``GET /v1/models`` (paginated with ``limit``/``after_id``/``before_id``) and
  ``GET /v1/models/{model_id}``.

Every response carries ``request-id`` and ``anthropic-ratelimit-*`` headers; errors are
``{"type": "error", "error": {"type": ..., "message": ...}, "request_id": "req_..."}`` and
429/529 add ``retry-after-ms`` (default ``"1"``) and ``retry-after``. Auth is checked
(``x-api-key`` or ``Authorization: Bearer``; 401 ``authentication_error``), and requests are
validated like the real API (missing fields, role order, orphaned ``tool_result`` blocks,
unanswered ``tool_use`` blocks, more than 4 ``cache_control`` breakpoints, ...).

What a ``POST /v1/messages`` gets, in order:

1. 401 / 400 (auth, then validation), then 429 if :meth:`FakeClaude.rate_limit` is exceeded;
2. the first matching :meth:`FakeClaude.fail_when` rule (these apply to every endpoint);
3. the next scripted reply (``enqueue_*``; the script only applies to ``/v1/messages``);
4. the first :meth:`FakeClaude.route` whose predicate matches (a responder may return
   ``None`` to fall through);
5. :attr:`FakeClaude.responder`, by default :meth:`FakeClaude.default_response`: a forced
   tool (``tool_choice`` ``tool``/``any``) is answered with a ``tool_use`` block whose input is
   the smallest instance of the tool's ``input_schema`` (see :func:`minimal_instance`),
   anything else with :attr:`FakeClaude.default_text`.

Predicates and responders receive a :class:`RecordedRequest`, which is also a read-only
mapping of the JSON body, so ``lambda body: "summar" in str(body.get("system"))`` and
``lambda req: "summar" in req.system_text`` both work. A responder returns a
:class:`MessageReply`, :class:`ErrorReply`, :class:`RawReply`, :class:`Disconnect`, a plain
``str`` (a text reply) or ``None`` (fall through).

Usage is computed with a deterministic estimator (:func:`estimate_tokens`: about 4 ASCII
characters per token, one token per CJK character) over tools, system and messages
(:func:`count_request_tokens`). Prompt caching is simulated: the prefix up to each
``cache_control`` breakpoint (order tools → system → messages, keyed by model) is hashed;
the first request reports it as ``cache_creation_input_tokens``, an identical prefix within
its TTL (5 min, or 1 h for ``"ttl": "1h"``) as ``cache_read_input_tokens``, and
``input_tokens`` counts only the rest. Use :meth:`FakeClaude.advance_time` to expire entries.

Example (pytest-asyncio)::

    async def test_summary_retry() -> None:
        async with FakeClaude() as fake:
            fake.enqueue_error(529)                     # first call: overloaded
            fake.enqueue_tool_use("reply", {"text": "hi"})
            client = fake.client(max_retries=2)
            msg = await client.messages.create(model="claude-sonnet-4-6", max_tokens=64,
                                               messages=[{"role": "user", "content": "yo"}])
            assert msg.content[0].input == {"text": "hi"}
            assert [r.retry_count for r in fake.requests] == [0, 1]
            await client.close()

In a background thread (benchmarks, CLI demos, sync code)::

    with FakeClaudeThread(latency=0.2) as fake:        # yields the running FakeClaude
        fake.route(system_contains("summar"), "a short summary")
        client = anthropic.Anthropic(base_url=fake.url, api_key="test-key")

The server binds 127.0.0.1 on a free port, keeps at most ``max_log`` request records and
stops itself after ``max_lifetime`` seconds (default 600) so a leaked fake cannot outlive a
test run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import secrets
import socket
import string
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeAlias

from aiohttp import web

if TYPE_CHECKING:
    import anthropic

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_MODELS",
    "Disconnect",
    "ErrorReply",
    "FailureRule",
    "FakeClaude",
    "FakeClaudeThread",
    "MessageReply",
    "RawReply",
    "RecordedRequest",
    "ResponseSpec",
    "Route",
    "StreamFault",
    "count_request_tokens",
    "estimate_tokens",
    "forced_tool",
    "minimal_instance",
    "model_is",
    "path_is",
    "start_in_thread",
    "system_contains",
    "text_contains",
    "validate_messages_request",
]

log = logging.getLogger(__name__)

JSONObject: TypeAlias = dict[str, Any]

DEFAULT_API_KEY = "test-key"
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
MODELS_PATH = "/v1/models"
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_CACHE_BREAKPOINTS = 4

DEFAULT_MODELS: tuple[tuple[str, str, str], ...] = (
    # (id, display_name, created_at); ids the installed SDK knows and does not flag as deprecated
    ("claude-opus-5", "Claude Opus 5", "2026-09-01T00:00:00Z"),
    ("claude-sonnet-5", "Claude Sonnet 5", "2026-09-01T00:00:00Z"),
    ("claude-fable-5", "Claude Fable 5", "2026-09-01T00:00:00Z"),
    ("claude-opus-4-8", "Claude Opus 4.8", "2026-06-01T00:00:00Z"),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
)

STATUS_ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

ERROR_TYPE_STATUS: Mapping[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

DEFAULT_ERROR_MESSAGES: Mapping[str, str] = {
    "invalid_request_error": "Invalid request",
    "authentication_error": "invalid x-api-key",
    "billing_error": "Your credit balance is too low to access the Anthropic API.",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "Not found",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Number of requests has exceeded your rate limit.",
    "api_error": "Internal server error",
    "timeout_error": "Request timed out",
    "overloaded_error": "Overloaded",
}

_RETRY_AFTER_STATUSES = frozenset({429, 529})
_BASE62 = string.digits + string.ascii_letters
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


def _new_id(prefix: str) -> str:
    """Return an id shaped like the real ones, e.g. ``msg_01XFDUDYJgAACzvnptvVoYEL``."""
    return prefix + "01" + "".join(secrets.choice(_BASE62) for _ in range(22))


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Token estimation and prompt-cache segments
# ---------------------------------------------------------------------------------------------


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (
        0x3040 <= code <= 0x30FF  # kana
        or 0x3400 <= code <= 0x4DBF  # CJK ext A
        or 0x4E00 <= code <= 0x9FFF  # CJK unified
        or 0xAC00 <= code <= 0xD7AF  # Hangul
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility
        or 0xFF00 <= code <= 0xFFEF  # full-width forms
        or 0x20000 <= code <= 0x2FFFF  # CJK ext B+
    )


def estimate_tokens(text: str) -> int:
    """Deterministic token estimate: 4 ASCII chars, 2 other chars, or 1 CJK char per token.

    Any non-empty text counts at least one token.
    """
    if not text:
        return 0
    quarters = 0
    for char in text:
        if char.isascii():
            quarters += 1
        elif _is_cjk(char):
            quarters += 4
        else:
            quarters += 2
    return max(1, math.ceil(quarters / 4))


IMAGE_TOKENS = 1_000
MESSAGE_OVERHEAD_TOKENS = 3


def _block_text(block: Any) -> str:
    """Text used to estimate the tokens of one content block (or a bare string)."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return json.dumps(block, sort_keys=True, default=str)
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "tool_use":
        return str(block.get("name", "")) + json.dumps(block.get("input", {}), sort_keys=True)
    if kind == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            return "".join(_block_text(item) for item in content)
        return str(content)
    if kind == "thinking":
        return str(block.get("thinking", ""))
    if kind in ("image", "document"):
        return ""
    stripped = {k: v for k, v in block.items() if k != "cache_control"}
    return json.dumps(stripped, sort_keys=True, default=str)


def _block_tokens(block: Any) -> int:
    if isinstance(block, dict) and block.get("type") in ("image", "document"):
        return IMAGE_TOKENS
    if isinstance(block, dict) and block.get("type") == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            return max(1, sum(_block_tokens(item) for item in content))
    return estimate_tokens(_block_text(block))


@dataclass(frozen=True, slots=True)
class _Segment:
    """One cacheable unit of the prompt: a tool, a system block or a message content block."""

    canonical: str
    tokens: int
    cache_control: JSONObject | None


def _canonical(kind: str, block: Any) -> str:
    if isinstance(block, dict):
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return kind + ":" + json.dumps(block, sort_keys=True, default=str)


def _segments(body: Mapping[str, Any]) -> list[_Segment]:
    """Split a request into segments in prompt-cache order: tools, system, messages."""
    segments: list[_Segment] = []
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            text = (
                str(tool.get("name", ""))
                + str(tool.get("description", ""))
                + json.dumps(tool.get("input_schema", {}), sort_keys=True)
            )
            segments.append(_Segment(_canonical("tool", tool), estimate_tokens(text), _cc(tool)))
    system = body.get("system")
    if isinstance(system, str) and system:
        segments.append(_Segment(_canonical("system", system), estimate_tokens(system), None))
    elif isinstance(system, list):
        for block in system:
            segments.append(
                _Segment(_canonical("system", block), _block_tokens(block), _cc(block))
            )
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = str(message.get("role"))
            content = message.get("content")
            blocks: list[Any] = content if isinstance(content, list) else [content or ""]
            for position, block in enumerate(blocks):
                overhead = MESSAGE_OVERHEAD_TOKENS if position == 0 else 0
                segments.append(
                    _Segment(
                        _canonical(f"{role}:{position}", block),
                        _block_tokens(block) + overhead,
                        _cc(block),
                    )
                )
    return segments


def _cc(block: Any) -> JSONObject | None:
    if isinstance(block, dict):
        cache_control = block.get("cache_control")
        if isinstance(cache_control, dict):
            return cache_control
    return None


def count_request_tokens(body: Mapping[str, Any]) -> int:
    """Input tokens of a Messages request (tools + system + messages), as the fake counts them.

    ``count_tokens`` returns exactly this; for ``/v1/messages`` it equals
    ``input_tokens + cache_creation_input_tokens + cache_read_input_tokens``.
    """
    return sum(segment.tokens for segment in _segments(body))


def _ttl_seconds(cache_control: Mapping[str, Any]) -> float:
    return 3600.0 if cache_control.get("ttl") == "1h" else 300.0


@dataclass(frozen=True, slots=True)
class _Usage:
    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cache_creation_ttl: str

    def as_json(self, output_tokens: int) -> JSONObject:
        creation = self.cache_creation_input_tokens
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": creation,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": creation if self.cache_creation_ttl == "5m" else 0,
                "ephemeral_1h_input_tokens": creation if self.cache_creation_ttl == "1h" else 0,
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }


class _PromptCache:
    """Prefix-hash cache with per-entry TTL, refreshed on every hit (as the real one is)."""

    def __init__(self) -> None:
        self.entries: dict[str, float] = {}

    def usage(self, body: Mapping[str, Any], now: float, min_tokens: int) -> _Usage:
        segments = _segments(body)
        total = sum(segment.tokens for segment in segments)
        breakpoints = [i for i, seg in enumerate(segments) if seg.cache_control is not None]
        ttls = {i: _ttl_seconds(segments[i].cache_control or {}) for i in breakpoints}
        top_level = body.get("cache_control")
        if isinstance(top_level, dict) and segments:
            # Automatic caching: the breakpoint goes on the last block.
            last = len(segments) - 1
            if last not in ttls:
                breakpoints.append(last)
            ttls[last] = _ttl_seconds(top_level)
        if not breakpoints:
            return _Usage(total, 0, 0, "5m")
        model = str(body.get("model", ""))
        digest = hashlib.sha256(model.encode())
        cumulative: list[int] = []
        hashes: dict[int, str] = {}
        running = 0
        for index, segment in enumerate(segments):
            digest.update(b"\x00" + segment.canonical.encode())
            running += segment.tokens
            cumulative.append(running)
            if index in ttls:
                hashes[index] = digest.copy().hexdigest()
        cacheable = [bp for bp in breakpoints if cumulative[bp] >= min_tokens]
        read = 0
        for bp in sorted(cacheable, reverse=True):
            expires = self.entries.get(hashes[bp])
            if expires is not None and expires > now:
                read = cumulative[bp]
                break
        last_bp = max(cacheable) if cacheable else None
        creation = 0
        if last_bp is not None and cumulative[last_bp] > read:
            creation = cumulative[last_bp] - read
        for bp in cacheable:
            self.entries[hashes[bp]] = now + ttls[bp]
        ttl_name = "1h" if last_bp is not None and ttls[last_bp] >= 3600 else "5m"
        return _Usage(total - read - creation, creation, read, ttl_name)


# ---------------------------------------------------------------------------------------------
# Minimal JSON-Schema instances (for the default forced-tool answer)
# ---------------------------------------------------------------------------------------------

_FORMAT_EXAMPLES: Mapping[str, str] = {
    "date-time": "1970-01-01T00:00:00Z",
    "date": "1970-01-01",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com",
    "url": "https://example.com",
    "uuid": "00000000-0000-0000-0000-000000000000",
}


def _resolve_ref(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref.lstrip("#").strip("/").split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _number_in_range(schema: Mapping[str, Any], integer: bool) -> int | float:
    step: float = 1 if integer else 0.5
    low: float | None = schema.get("minimum")
    if isinstance(schema.get("exclusiveMinimum"), int | float):
        low = schema["exclusiveMinimum"] + step
    high: float | None = schema.get("maximum")
    if isinstance(schema.get("exclusiveMaximum"), int | float):
        high = schema["exclusiveMaximum"] - step
    value: float = 0
    if low is not None and value < low:
        value = low
    if high is not None and value > high:
        value = high
    if integer:
        return math.ceil(value) if low is not None and value == low else int(value)
    return value


def minimal_instance(schema: Any, *, _root: Any = None, _depth: int = 0) -> Any:
    """Smallest value satisfying the common parts of a JSON schema.

    Only required properties are filled: the first ``enum`` value (or ``const``), ``0`` for
    integers/numbers (moved inside ``minimum``/``maximum``), ``""`` for strings (padded to
    ``minLength``, or an example for a known ``format``), ``False``, ``[]`` (or ``minItems``
    minimal items), ``{}``. ``$ref`` into ``$defs``, ``anyOf``/``oneOf`` (first non-null
    option) and ``allOf`` are followed, so Pydantic ``model_json_schema()`` output works.
    """
    root = schema if _root is None else _root
    if not isinstance(schema, dict) or _depth > 32:
        return None

    def sub(node: Any) -> Any:
        return minimal_instance(node, _root=root, _depth=_depth + 1)

    if isinstance(schema.get("$ref"), str):
        target = _resolve_ref(root, schema["$ref"])
        if isinstance(target, dict):
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return sub({**target, **rest})
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "default" in schema and _depth > 0:
        return schema["default"]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            non_null = [
                o for o in options if not (isinstance(o, dict) and o.get("type") == "null")
            ]
            return sub(non_null[0]) if non_null else None
    if isinstance(schema.get("allOf"), list):
        merged: JSONObject = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            if isinstance(part, dict) and isinstance(part.get("$ref"), str):
                part = _resolve_ref(root, part["$ref"])
            if isinstance(part, dict):
                merged = {**part, **merged}
        return sub(merged)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        if "properties" in schema or "required" in schema:
            kind = "object"
        elif "items" in schema or "prefixItems" in schema:
            kind = "array"
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: sub(properties.get(name, {})) for name in schema.get("required") or []}
    if kind == "array":
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            return [sub(item) for item in prefix]
        count = int(schema.get("minItems") or 0)
        return [sub(schema.get("items", {})) for _ in range(count)]
    if kind == "string":
        example = _FORMAT_EXAMPLES.get(str(schema.get("format")), "")
        min_length = int(schema.get("minLength") or 0)
        return (
            example if len(example) >= min_length else example + "x" * (min_length - len(example))
        )
    if kind == "integer":
        return _number_in_range(schema, integer=True)
    if kind == "number":
        return _number_in_range(schema, integer=False)
    if kind == "boolean":
        return False
    return None


# ---------------------------------------------------------------------------------------------
# Request validation (messages mirror the real API's)
# ---------------------------------------------------------------------------------------------


def _content_blocks(message: Mapping[str, Any]) -> list[Any]:
    content = message.get("content")
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if isinstance(content, str) else []


def _tool_use_ids(message: Mapping[str, Any]) -> list[str]:
    return [
        str(block.get("id"))
        for block in _content_blocks(message)
        if isinstance(block, dict) and block.get("type") in ("tool_use", "server_tool_use")
    ]


def _validate_tools(body: Mapping[str, Any]) -> str | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        return "tools: Input should be a valid list"
    names: set[str] = set()
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict):
            return f"tools.{k}: Input should be a valid dictionary"
        if tool.get("type") not in (None, "custom"):
            names.add(str(tool.get("name")))
            continue  # server tools (web_search_..., bash_..., ...) have their own shapes
        if "name" not in tool:
            return f"tools.{k}.custom.name: Field required"
        if not isinstance(tool["name"], str) or not _TOOL_NAME.match(tool["name"]):
            return f"tools.{k}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
        if "input_schema" not in tool:
            return f"tools.{k}.custom.input_schema: Field required"
        schema = tool["input_schema"]
        if not isinstance(schema, dict) or schema.get("type") != "object":
            return f"tools.{k}.custom.input_schema.type: Input should be 'object'"
        if tool["name"] in names:
            return "tools: Tool names must be unique."
        names.add(tool["name"])
    choice = body.get("tool_choice")
    if choice is None:
        return None
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        return (
            "tool_choice: Input tag does not match any of the expected tags: "
            "'auto', 'any', 'tool', 'none'"
        )
    if choice["type"] in ("any", "tool") and not tools:
        return "tool_choice may only be specified while providing tools."
    if choice["type"] == "tool":
        if "name" not in choice:
            return "tool_choice.tool.name: Field required"
        if choice["name"] not in names:
            return f"tool_choice: Tool '{choice['name']}' not found in `tools`"
    return None


def _validate_system(system: Any) -> str | None:
    if system is None or isinstance(system, str):
        return None
    if not isinstance(system, list):
        return "system: Input should be a valid list"
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            return f"system.{j}.type: Input should be 'text'"
        if not block.get("text"):
            return "system: text content blocks must be non-empty"
    return None


def _validate_message_shapes(messages: list[Any]) -> str | None:
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages.{i}: Input should be a valid dictionary"
        if message.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        content = message.get("content")
        if "content" not in message:
            return f"messages.{i}.content: Field required"
        if not isinstance(content, str | list):
            return f"messages.{i}.content: Input should be a valid list"
        final_assistant = i == last and message["role"] == "assistant"
        if not content and not final_assistant:
            return (
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        for j, block in enumerate(content if isinstance(content, list) else []):
            if not isinstance(block, dict):
                return f"messages.{i}.content.{j}: Input should be a valid dictionary"
            if "type" not in block:
                return f"messages.{i}.content.{j}.type: Field required"
            if block["type"] == "text" and not block.get("text"):
                return "messages: text content blocks must be non-empty"
            if block["type"] == "tool_result" and "tool_use_id" not in block:
                return f"messages.{i}.content.{j}.tool_result.tool_use_id: Field required"
            if block["type"] == "tool_use" and ("id" not in block or "name" not in block):
                return f"messages.{i}.content.{j}.tool_use.id: Field required"
        if final_assistant:
            blocks = _content_blocks(message)
            tail = blocks[-1] if blocks else None
            if (
                isinstance(tail, dict)
                and tail.get("type") == "text"
                and str(tail.get("text", "")) != str(tail.get("text", "")).rstrip()
            ):
                return "messages: final assistant content cannot end with trailing whitespace"
    return None


def _validate_roles_and_tools(messages: list[JSONObject], strict_alternation: bool) -> str | None:
    if messages[0]["role"] != "user":
        return 'messages: first message must use the "user" role'
    # Group consecutive same-role messages into turns (the real API merges them).
    turns: list[list[int]] = []
    for i, message in enumerate(messages):
        if turns and messages[turns[-1][-1]]["role"] == message["role"]:
            if strict_alternation:
                return (
                    'messages: roles must alternate between "user" and "assistant", but found '
                    f'multiple "{message["role"]}" roles in a row'
                )
            turns[-1].append(i)
        else:
            turns.append([i])
    for t, turn in enumerate(turns):
        role = messages[turn[0]]["role"]
        if role == "user":
            previous = turns[t - 1] if t > 0 else []
            offered = {tid for i in previous for tid in _tool_use_ids(messages[i])}
            for i in turn:
                for j, block in enumerate(_content_blocks(messages[i])):
                    if block.get("type") != "tool_result":
                        continue
                    if block.get("tool_use_id") not in offered:
                        return (
                            f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                            f"`tool_result` blocks: {block.get('tool_use_id')}. Each "
                            "`tool_result` block must have a corresponding `tool_use` block in "
                            "the previous message."
                        )
        elif t + 1 < len(turns):
            asked = [tid for i in turn for tid in _tool_use_ids(messages[i])]
            answered = {
                str(block.get("tool_use_id"))
                for i in turns[t + 1]
                for block in _content_blocks(messages[i])
                if block.get("type") == "tool_result"
            }
            missing = [tid for tid in asked if tid not in answered]
            if missing:
                return (
                    f"messages.{turn[0]}: `tool_use` ids were found without `tool_result` "
                    f"blocks immediately after: {', '.join(missing)}. Each `tool_use` block "
                    "must have a corresponding `tool_result` block in the next message."
                )
    return None


def _count_cache_breakpoints(body: Mapping[str, Any]) -> int:
    return sum(1 for segment in _segments(body) if segment.cache_control is not None)


def validate_messages_request(
    body: Any, *, require_max_tokens: bool = True, strict_alternation: bool = True
) -> str | None:
    """Return the real API's ``invalid_request_error`` message for ``body``, or ``None``.

    ``require_max_tokens=False`` validates a ``count_tokens`` body. With
    ``strict_alternation=False`` consecutive same-role messages are merged into one turn (as
    the current real API does) instead of being rejected.
    """
    if not isinstance(body, dict):
        return "body: Input should be a valid dictionary"
    if "model" not in body:
        return "model: Field required"
    if not isinstance(body["model"], str) or not body["model"]:
        return "model: Input should be a valid string"
    if require_max_tokens:
        if "max_tokens" not in body:
            return "max_tokens: Field required"
        max_tokens = body["max_tokens"]
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            return "max_tokens: Input should be a valid integer"
        if max_tokens < 1:
            return "max_tokens: Input should be greater than or equal to 1"
    if "messages" not in body:
        return "messages: Field required"
    messages = body["messages"]
    if not isinstance(messages, list):
        return "messages: Input should be a valid list"
    if not messages:
        return "messages: at least one message is required"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "stream: Input should be a valid boolean"
    temperature = body.get("temperature")
    if temperature is not None and not (
        isinstance(temperature, int | float) and 0 <= temperature <= 1
    ):
        return "temperature: Input should be less than or equal to 1"
    for check in (
        _validate_system(body.get("system")),
        _validate_message_shapes(messages),
        _validate_tools(body),
    ):
        if check:
            return check
    error = _validate_roles_and_tools(messages, strict_alternation)
    if error:
        return error
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
            return "Thinking may not be enabled when tool_choice forces tool use."
        budget = thinking.get("budget_tokens")
        if require_max_tokens and isinstance(budget, int) and budget >= body["max_tokens"]:
            return "`max_tokens` must be greater than `thinking.budget_tokens`."
    breakpoints = _count_cache_breakpoints(body)
    if breakpoints > MAX_CACHE_BREAKPOINTS:
        return (
            f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {breakpoints}."
        )
    return None


# ---------------------------------------------------------------------------------------------
# Recorded requests and predicates
# ---------------------------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
            elif isinstance(block, dict) and block.get("type") == "tool_result":
                parts.append(_text_of(block.get("content", "")))
        return "\n".join(parts)
    return ""


@dataclass(eq=False)
class RecordedRequest(Mapping[str, Any]):
    """One request the fake received; also a read-only mapping of its JSON body.

    ``headers`` are lower-cased. ``status`` and ``response_json`` are filled in when the
    response is chosen (``status`` stays ``None`` for a dropped connection).
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    raw_body: bytes
    timestamp: float
    monotonic: float
    request_id: str
    status: int | None = None
    response_json: Any = None

    # Mapping over the JSON body -------------------------------------------------------------
    @property
    def body(self) -> JSONObject:
        """The JSON body when it is an object, else ``{}``."""
        return self.json if isinstance(self.json, dict) else {}

    def __getitem__(self, key: str) -> Any:
        return self.body[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.body)

    def __len__(self) -> int:
        return len(self.body)

    def __bool__(self) -> bool:
        return True

    # Records compare by identity (not by body, as a Mapping would) and are hashable.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return (
            f"RecordedRequest({self.method} {self.path} status={self.status} "
            f"retry_count={self.retry_count} model={self.model!r})"
        )

    # Convenience ----------------------------------------------------------------------------
    def header(self, name: str, default: str | None = None) -> str | None:
        """A request header, case-insensitively."""
        return self.headers.get(name.lower(), default)

    @property
    def retry_count(self) -> int | None:
        """``x-stainless-retry-count`` as an int (0 on a first attempt), or ``None``."""
        value = self.headers.get("x-stainless-retry-count")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def messages(self) -> list[JSONObject]:
        messages = self.body.get("messages")
        return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []

    @property
    def system_text(self) -> str:
        """The system prompt as plain text (blocks joined with newlines)."""
        return _text_of(self.body.get("system"))

    @property
    def last_user_text(self) -> str:
        """Text of the last user message (including ``tool_result`` text)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return _text_of(message.get("content"))
        return ""

    @property
    def text(self) -> str:
        """System prompt plus the text of every message, newline-separated."""
        parts = [self.system_text] + [_text_of(m.get("content")) for m in self.messages]
        return "\n".join(part for part in parts if part)

    @property
    def tool_names(self) -> list[str]:
        tools = self.body.get("tools")
        if not isinstance(tools, list):
            return []
        return [str(t.get("name")) for t in tools if isinstance(t, dict)]

    @property
    def forced_tool(self) -> str | None:
        """Name of the tool a ``tool_choice`` of type ``tool`` (or ``any``) forces."""
        choice = self.body.get("tool_choice")
        if not isinstance(choice, dict):
            return None
        if choice.get("type") == "tool":
            return str(choice.get("name"))
        if choice.get("type") == "any":
            names = self.tool_names
            return names[0] if names else None
        return None

    def tool(self, name: str) -> JSONObject | None:
        """The tool definition called ``name``, if the request has one."""
        tools = self.body.get("tools")
        for tool in tools if isinstance(tools, list) else []:
            if isinstance(tool, dict) and tool.get("name") == name:
                return tool
        return None


Predicate: TypeAlias = Callable[[RecordedRequest], bool]


def system_contains(fragment: str, *, case_sensitive: bool = False) -> Predicate:
    """Predicate: the system prompt contains ``fragment`` (case-insensitive by default)."""
    needle = fragment if case_sensitive else fragment.lower()

    def predicate(request: RecordedRequest) -> bool:
        haystack = request.system_text if case_sensitive else request.system_text.lower()
        return needle in haystack

    return predicate


def text_contains(fragment: str, *, case_sensitive: bool = False) -> Predicate:
    """Predicate: system prompt or any message text contains ``fragment``."""
    needle = fragment if case_sensitive else fragment.lower()

    def predicate(request: RecordedRequest) -> bool:
        haystack = request.text if case_sensitive else request.text.lower()
        return needle in haystack

    return predicate


def forced_tool(name: str) -> Predicate:
    """Predicate: ``tool_choice`` forces the tool ``name``."""
    return lambda request: request.forced_tool == name


def model_is(*models: str) -> Predicate:
    """Predicate: the request's ``model`` is one of ``models``."""
    return lambda request: request.model in models


def path_is(path: str, method: str | None = None) -> Predicate:
    """Predicate: the request path (and, if given, method) matches exactly."""
    return lambda request: (
        request.path == path and (method is None or request.method == method.upper())
    )


# ---------------------------------------------------------------------------------------------
# Response specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamFault:
    """Break a streamed reply after ``after_events`` SSE events (``ping`` included).

    ``kind="error"`` sends ``event: error`` with ``error_type``/``message`` (the SDK raises
    ``APIStatusError``); ``kind="disconnect"`` drops the connection instead.
    """

    after_events: int = 3
    kind: Literal["error", "disconnect"] = "error"
    error_type: str = "overloaded_error"
    message: str = "Overloaded"


@dataclass(frozen=True)
class MessageReply:
    """A successful Messages reply; ids, model and usage are filled in per request.

    ``content`` holds wire-format blocks (``{"type": "text", "text": ...}``,
    ``{"type": "tool_use", "name": ..., "input": {...}}`` with ``id`` optional). When
    ``stop_reason`` is ``None`` it is ``"tool_use"`` if there is a tool_use block, else
    ``"end_turn"``, and text longer than the request's ``max_tokens`` is cut with
    ``"max_tokens"``. The same reply is sent as JSON or SSE, following the request.
    """

    content: tuple[JSONObject, ...]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    model: str | None = None
    output_tokens: int | None = None
    delay: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)
    stream_fault: StreamFault | None = None
    event_delay: float = 0.0
    text_chunk_chars: int = 12
    json_chunks: int = 3

    @classmethod
    def text(cls, text: str, **options: Any) -> MessageReply:
        """A reply with one text block."""
        return cls(content=({"type": "text", "text": text},), **options)

    @classmethod
    def tool_use(
        cls,
        name: str,
        input: Mapping[str, Any] | Any,
        *,
        id: str | None = None,
        text: str | None = None,
        **options: Any,
    ) -> MessageReply:
        """A reply calling ``name`` with ``input`` (sent as-is: it may break the schema).

        ``text`` puts a text block before the tool call, as Claude often does.
        """
        block: JSONObject = {"type": "tool_use", "name": name, "input": input}
        if id is not None:
            block["id"] = id
        blocks: tuple[JSONObject, ...] = (block,)
        if text is not None:
            blocks = ({"type": "text", "text": text}, block)
        return cls(content=blocks, **options)

    @classmethod
    def blocks(cls, *content: Mapping[str, Any], **options: Any) -> MessageReply:
        """A reply with arbitrary content blocks."""
        return cls(content=tuple(dict(block) for block in content), **options)


@dataclass(frozen=True)
class ErrorReply:
    """An API error: ``status`` plus the standard error JSON.

    ``error_type`` defaults from the status (529 → ``overloaded_error``...), ``message`` from
    the type. ``retry_after_ms="auto"`` sends ``retry-after-ms: 1`` (and ``retry-after: 1``)
    on 429/529 only; an int sends it on any status; ``None`` sends none. ``should_retry`` sets
    ``x-should-retry``.
    """

    status: int = 529
    error_type: str | None = None
    message: str | None = None
    retry_after_ms: int | Literal["auto"] | None = "auto"
    should_retry: bool | None = None
    delay: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def resolved_type(self) -> str:
        return self.error_type or STATUS_ERROR_TYPES.get(
            self.status, "api_error" if self.status >= 500 else "invalid_request_error"
        )

    @property
    def resolved_message(self) -> str:
        return self.message or DEFAULT_ERROR_MESSAGES.get(self.resolved_type, "Error")


@dataclass(frozen=True)
class RawReply:
    """Exactly this status, body and headers (for malformed or unusual responses).

    A ``dict``/``list`` body is JSON-encoded; ``content_type`` defaults to
    ``application/json`` for those and bytes/str that parse as JSON, else ``text/plain``.
    """

    status: int = 200
    body: bytes | str | JSONObject | list[Any] = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class Disconnect:
    """Close the connection without sending a response (the SDK sees a connection error)."""

    delay: float = 0.0


@dataclass(frozen=True)
class _Delay:
    seconds: float


ResponseSpec: TypeAlias = MessageReply | ErrorReply | RawReply | Disconnect
ResponderResult: TypeAlias = ResponseSpec | str | None
Responder: TypeAlias = Callable[[RecordedRequest], ResponderResult]


def _as_spec(value: ResponderResult) -> ResponseSpec | None:
    if isinstance(value, str):
        return MessageReply.text(value)
    return value


@dataclass(eq=False)
class Route:
    """A registered ``route``; ``hits`` counts answered requests, ``times`` bounds them."""

    predicate: Predicate
    responder: Responder
    times: int | None = None
    hits: int = 0
    removed: bool = False

    @property
    def active(self) -> bool:
        return not self.removed and (self.times is None or self.hits < self.times)

    def remove(self) -> None:
        self.removed = True


@dataclass(eq=False)
class FailureRule:
    """A registered ``fail_when``; ``hits`` counts failed requests, ``times`` bounds them."""

    predicate: Predicate
    reply: ErrorReply | Disconnect | RawReply
    times: int | None = None
    hits: int = 0
    removed: bool = False

    @property
    def active(self) -> bool:
        return not self.removed and (self.times is None or self.hits < self.times)

    def remove(self) -> None:
        self.removed = True


class _TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.updated: float | None = None

    def take(self, now: float) -> float:
        """Take a token; return 0 on success, else seconds until one is available."""
        if self.updated is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


class FakeClaude:
    """The fake Anthropic API server. See the module docstring for the full picture.

    Args:
        api_key: key the client must send (``x-api-key`` or ``Authorization: Bearer``);
            ``None`` accepts any non-empty key.
        latency: seconds added before every response.
        models: ``(id, display_name, created_at)`` rows for ``/v1/models``.
        reject_unknown_models: answer 404 ``not_found_error`` for a model not in ``models``.
        strict_alternation: reject consecutive same-role messages (else merge them).
        cache_min_tokens: prefixes shorter than this are silently not cached (the real API's
            minimum is 1024-4096 depending on the model; 0 keeps tests small).
        default_text: what the default responder says when no tool is forced.
        max_lifetime: stop by itself after this many seconds (``None``: never).
        max_log: keep at most this many request records (oldest dropped).
        port: port to bind on 127.0.0.1; 0 picks a free one.
    """

    def __init__(
        self,
        *,
        api_key: str | None = DEFAULT_API_KEY,
        latency: float = 0.0,
        models: Sequence[tuple[str, str, str]] = DEFAULT_MODELS,
        reject_unknown_models: bool = False,
        strict_alternation: bool = True,
        cache_min_tokens: int = 0,
        default_text: str = "Hello from FakeClaude.",
        max_lifetime: float | None = 600.0,
        max_log: int = 10_000,
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.latency = latency
        self.models: list[tuple[str, str, str]] = list(models)
        self.reject_unknown_models = reject_unknown_models
        self.strict_alternation = strict_alternation
        self.cache_min_tokens = cache_min_tokens
        self.default_text = default_text
        self.max_lifetime = max_lifetime
        self.max_log = max_log
        self.responder: Responder = self.default_response
        self.requests: list[RecordedRequest] = []
        self.handler_errors: list[BaseException] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._port = port
        self._lock = threading.RLock()
        self._script: deque[ResponseSpec | _Delay] = deque()
        self._routes: list[Route] = []
        self._failures: list[FailureRule] = []
        self._cache = _PromptCache()
        self._clock_offset = 0.0
        self._bucket: _TokenBucket | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._lifetime_timer: asyncio.TimerHandle | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # Lifecycle --------------------------------------------------------------------------------
    async def start(self) -> Self:
        """Bind 127.0.0.1 and start serving; returns ``self``."""
        if self._runner is not None:
            return self
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=0.5,
            access_log=None,
        )
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self._port))
            site = web.SockSite(runner, sock)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        self._url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._loop = asyncio.get_running_loop()
        if self.max_lifetime is not None:
            self._lifetime_timer = self._loop.call_later(self.max_lifetime, self._expire)
        return self

    def _expire(self) -> None:
        log.warning("FakeClaude at %s reached max_lifetime; stopping", self._url)
        self._stop_task = asyncio.ensure_future(self.stop())

    async def stop(self) -> None:
        """Stop serving (idempotent). In-flight requests are cancelled."""
        if self._lifetime_timer is not None:
            self._lifetime_timer.cancel()
            self._lifetime_timer = None
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """Base URL for the SDK, e.g. ``http://127.0.0.1:54321``."""
        if self._url is None:
            raise RuntimeError("FakeClaude is not started; use `async with FakeClaude()`")
        return self._url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def client(self, **options: Any) -> anthropic.AsyncAnthropic:
        """An ``AsyncAnthropic`` pointed at this fake (``max_retries``/``timeout``... pass)."""
        import anthropic

        options.setdefault("api_key", self.api_key or DEFAULT_API_KEY)
        return anthropic.AsyncAnthropic(base_url=self.url, **options)

    def sync_client(self, **options: Any) -> anthropic.Anthropic:
        """A sync ``Anthropic`` client (for use with :class:`FakeClaudeThread`)."""
        import anthropic

        options.setdefault("api_key", self.api_key or DEFAULT_API_KEY)
        return anthropic.Anthropic(base_url=self.url, **options)

    # Script -----------------------------------------------------------------------------------
    def enqueue(self, *replies: ResponseSpec | str) -> Self:
        """Append replies for the next ``/v1/messages`` requests (a str is a text reply)."""
        with self._lock:
            for reply in replies:
                spec = _as_spec(reply)
                if spec is not None:
                    self._script.append(spec)
        return self

    def enqueue_text(self, text: str, **options: Any) -> Self:
        """Next reply: one text block. ``options`` go to :class:`MessageReply`."""
        return self.enqueue(MessageReply.text(text, **options))

    def enqueue_tool_use(self, name: str, input: Mapping[str, Any] | Any, **options: Any) -> Self:
        """Next reply: a ``tool_use`` of ``name`` with ``input`` (not checked against schema)."""
        return self.enqueue(MessageReply.tool_use(name, input, **options))

    def enqueue_error(
        self,
        status: int = 529,
        error_type: str | None = None,
        message: str | None = None,
        retry_after_ms: int | Literal["auto"] | None = "auto",
        **options: Any,
    ) -> Self:
        """Next reply: an API error (see :class:`ErrorReply`)."""
        return self.enqueue(
            ErrorReply(status, error_type, message, retry_after_ms=retry_after_ms, **options)
        )

    def enqueue_stream_error(
        self,
        after_events: int = 3,
        *,
        text: str = "This reply will be interrupted part way through.",
        error_type: str = "overloaded_error",
        message: str = "Overloaded",
        kind: Literal["error", "disconnect"] = "error",
    ) -> Self:
        """Next reply: a text stream broken after ``after_events`` events.

        A non-streaming request consuming it gets the equivalent HTTP error instead.
        """
        fault = StreamFault(after_events, kind, error_type, message)
        return self.enqueue(MessageReply.text(text, stream_fault=fault))

    def enqueue_raw(
        self,
        status: int = 200,
        body: bytes | str | JSONObject | list[Any] = b"",
        headers: Mapping[str, str] | None = None,
        *,
        content_type: str | None = None,
    ) -> Self:
        """Next reply: exactly this status/body/headers (see :class:`RawReply`)."""
        return self.enqueue(RawReply(status, body, dict(headers or {}), content_type))

    def enqueue_disconnect(self) -> Self:
        """Next reply: the connection is closed without a response."""
        return self.enqueue(Disconnect())

    def enqueue_delay(self, seconds: float) -> Self:
        """Delay the next ``/v1/messages`` reply (scripted or not) by ``seconds``."""
        with self._lock:
            self._script.append(_Delay(seconds))
        return self

    @property
    def queued(self) -> int:
        """Number of scripted replies not yet consumed (delays excluded)."""
        with self._lock:
            return sum(1 for item in self._script if not isinstance(item, _Delay))

    def clear_queue(self) -> None:
        with self._lock:
            self._script.clear()

    # Routing and failure injection ------------------------------------------------------------
    def route(
        self,
        predicate: Predicate,
        responder: Responder | ResponseSpec | str,
        *,
        times: int | None = None,
    ) -> Route:
        """Answer matching ``/v1/messages`` requests with ``responder`` (first match wins).

        ``responder`` may be a fixed reply or a callable; a callable returning ``None`` falls
        through to later routes and the default responder.
        """
        if callable(responder):
            function: Responder = responder
        else:
            fixed = _as_spec(responder)

            def function(_request: RecordedRequest) -> ResponderResult:
                return fixed

        route = Route(predicate, function, times)
        with self._lock:
            self._routes.append(route)
        return route

    def fail_when(
        self,
        predicate: Predicate | None = None,
        status: int = 529,
        *,
        times: int | None = None,
        error_type: str | None = None,
        message: str | None = None,
        retry_after_ms: int | Literal["auto"] | None = "auto",
        reply: ErrorReply | Disconnect | RawReply | None = None,
    ) -> FailureRule:
        """Fail matching requests (any endpoint; ``None`` matches all) ``times`` times.

        By default with an :class:`ErrorReply` built from the arguments; pass ``reply`` for a
        :class:`Disconnect` or :class:`RawReply` instead.
        """
        failure = reply or ErrorReply(status, error_type, message, retry_after_ms)
        rule = FailureRule(predicate or (lambda _request: True), failure, times)
        with self._lock:
            self._failures.append(rule)
        return rule

    def rate_limit(self, requests_per_second: float | None, *, burst: int | None = None) -> None:
        """Limit ``/v1/messages`` to a token bucket (``None`` removes the limit).

        Excess requests get a real 429 ``rate_limit_error`` with ``retry-after-ms`` set to the
        time until the next token. ``burst`` defaults to ``ceil(requests_per_second)``.
        """
        with self._lock:
            if requests_per_second is None:
                self._bucket = None
                return
            if requests_per_second <= 0:
                raise ValueError("requests_per_second must be positive")
            self._bucket = _TokenBucket(
                requests_per_second, burst or max(1, math.ceil(requests_per_second))
            )

    # Prompt cache and clock -------------------------------------------------------------------
    def advance_time(self, seconds: float) -> None:
        """Move the fake's clock forward (expires prompt-cache entries, refills rate limit)."""
        with self._lock:
            self._clock_offset += seconds

    def clear_prompt_cache(self) -> None:
        with self._lock:
            self._cache.entries.clear()

    def _now(self) -> float:
        return time.monotonic() + self._clock_offset

    # Request log ------------------------------------------------------------------------------
    def count(self, path: str | None = MESSAGES_PATH, *, method: str | None = None) -> int:
        """Requests seen on ``path`` (``None``: all paths), optionally only ``method``."""
        return len(self.requests_to(path, method=method))

    def requests_to(
        self, path: str | None = MESSAGES_PATH, *, method: str | None = None
    ) -> list[RecordedRequest]:
        with self._lock:
            return [
                r
                for r in self.requests
                if (path is None or r.path == path)
                and (method is None or r.method == method.upper())
            ]

    @property
    def last_request(self) -> RecordedRequest:
        with self._lock:
            if not self.requests:
                raise LookupError("FakeClaude has received no requests")
            return self.requests[-1]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.handler_errors.clear()
            self.max_in_flight = self.in_flight

    def reset(self) -> None:
        """Forget requests, script, routes, failure rules, rate limit, cache and clock offset."""
        with self._lock:
            self.clear_log()
            self._script.clear()
            self._routes.clear()
            self._failures.clear()
            self._bucket = None
            self._cache.entries.clear()
            self._clock_offset = 0.0
            self.responder = self.default_response

    # Default responder ------------------------------------------------------------------------
    def default_response(self, request: RecordedRequest) -> ResponseSpec:
        """Forced tool → minimal valid ``tool_use``; otherwise :attr:`default_text`."""
        name = request.forced_tool
        tool = request.tool(name) if name else None
        if name and tool is not None:
            return MessageReply.tool_use(name, minimal_instance(tool.get("input_schema", {})))
        return MessageReply.text(self.default_text)

    # HTTP handling ----------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._dispatch(request)
        finally:
            self.in_flight -= 1

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={},
            json=None,
            raw_body=b"",
            timestamp=time.time(),
            monotonic=time.monotonic(),
            request_id=_new_id("req_"),
        )
        for key in request.headers:
            lower = key.lower()
            if lower not in record.headers:
                record.headers[lower] = ", ".join(request.headers.getall(key))
        with self._lock:
            self.requests.append(record)
            if len(self.requests) > self.max_log:
                del self.requests[: len(self.requests) - self.max_log]
        try:
            try:
                record.raw_body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                spec: ResponseSpec = ErrorReply(413)
                return await self._send(request, record, spec, self.latency)
            if record.raw_body:
                with contextlib.suppress(ValueError):
                    record.json = json.loads(record.raw_body)
            spec, delay = self._decide(record)
            return await self._send(request, record, spec, self.latency + delay)
        except Exception as exc:  # a bug in the fake or in a test's responder: don't retry it
            log.exception("FakeClaude failed handling %s %s", record.method, record.path)
            self.handler_errors.append(exc)
            message = f"FakeClaude internal error: {exc!r}"
            return self._error(record, ErrorReply(500, "api_error", message, should_retry=False))

    def _auth_error(self, record: RecordedRequest) -> ErrorReply | None:
        key = record.headers.get("x-api-key")
        authorization = record.headers.get("authorization", "")
        if key is None and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        if not key:
            return ErrorReply(401, "authentication_error", "x-api-key header is required")
        if self.api_key is not None and key != self.api_key:
            return ErrorReply(401, "authentication_error", "invalid x-api-key")
        return None

    def _decide(self, record: RecordedRequest) -> tuple[ResponseSpec, float]:
        """Choose the reply for ``record`` (synchronously, under the lock)."""
        with self._lock:
            auth = self._auth_error(record)
            if auth is not None:
                return auth, 0.0
            known = {
                (MESSAGES_PATH, "POST"),
                (COUNT_TOKENS_PATH, "POST"),
                (MODELS_PATH, "GET"),
            }
            is_model = record.path.startswith(MODELS_PATH + "/") and record.method == "GET"
            if (record.path, record.method) not in known and not is_model:
                paths = {p for p, _ in known}
                if record.path in paths:
                    return ErrorReply(405, "invalid_request_error", "Method Not Allowed"), 0.0
                return ErrorReply(404, "not_found_error", "Not Found"), 0.0
            if record.method == "POST":
                if "anthropic-version" not in record.headers:
                    message = "anthropic-version: header is required"
                    return ErrorReply(400, "invalid_request_error", message), 0.0
                if record.json is None:
                    message = "There was an error parsing the body of your request"
                    return ErrorReply(400, "invalid_request_error", message), 0.0
                error = validate_messages_request(
                    record.json,
                    require_max_tokens=record.path == MESSAGES_PATH,
                    strict_alternation=self.strict_alternation,
                )
                if error:
                    return ErrorReply(400, "invalid_request_error", error), 0.0
                if self.reject_unknown_models and record.model not in self._model_ids():
                    return ErrorReply(404, "not_found_error", f"model: {record.model}"), 0.0
            if record.path == MESSAGES_PATH and self._bucket is not None:
                wait = self._bucket.take(self._now())
                if wait > 0:
                    rpm = round(self._bucket.rate * 60)
                    message = (
                        "This request would exceed the rate limit for your organization of "
                        f"{rpm} requests per minute. For details, refer to: "
                        "https://docs.claude.com/en/api/rate-limits."
                    )
                    retry_ms = max(1, math.ceil(wait * 1000))
                    return ErrorReply(429, "rate_limit_error", message, retry_ms), 0.0
            for rule in self._failures:
                if rule.active and rule.predicate(record):
                    rule.hits += 1
                    return rule.reply, 0.0
            if record.path != MESSAGES_PATH:
                return MessageReply(content=()), 0.0  # rendered per endpoint in _send
            delay = 0.0
            while self._script:
                item = self._script.popleft()
                if isinstance(item, _Delay):
                    delay += item.seconds
                    continue
                return item, delay
            for route in self._routes:
                if route.active and route.predicate(record):
                    spec = _as_spec(route.responder(record))
                    if spec is not None:
                        route.hits += 1
                        return spec, delay
            spec = _as_spec(self.responder(record))
            return spec or MessageReply.text(self.default_text), delay

    # Rendering --------------------------------------------------------------------------------
    def _common_headers(self, record: RecordedRequest) -> dict[str, str]:
        reset = _rfc3339(datetime.now(UTC) + timedelta(seconds=60))
        bucket = self._bucket
        if bucket is not None:
            limit = str(round(bucket.rate * 60))
            remaining = str(max(0, math.floor(bucket.rate * 60 * bucket.tokens / bucket.capacity)))
        else:
            limit, remaining = "4000", "3999"
        return {
            "request-id": record.request_id,
            "anthropic-organization-id": "00000000-0000-4000-8000-000000000000",
            "anthropic-ratelimit-requests-limit": limit,
            "anthropic-ratelimit-requests-remaining": remaining,
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-tokens-limit": "400000",
            "anthropic-ratelimit-tokens-remaining": "400000",
            "anthropic-ratelimit-tokens-reset": reset,
        }

    def _json(
        self,
        record: RecordedRequest,
        status: int,
        payload: Any,
        extra_headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        record.status = status
        record.response_json = payload
        headers = self._common_headers(record)
        headers["Content-Type"] = "application/json"
        headers.update(extra_headers or {})
        return web.Response(status=status, body=json.dumps(payload).encode(), headers=headers)

    async def _send(
        self,
        request: web.Request,
        record: RecordedRequest,
        spec: ResponseSpec,
        delay: float,
    ) -> web.StreamResponse:
        delay += spec.delay
        if delay > 0:
            await asyncio.sleep(delay)
        if isinstance(spec, Disconnect):
            return self._disconnect(request)
        if isinstance(spec, ErrorReply):
            return self._error(record, spec)
        if isinstance(spec, RawReply):
            return self._raw(record, spec)
        if record.path == COUNT_TOKENS_PATH:
            return self._json(record, 200, {"input_tokens": count_request_tokens(record)})
        if record.path.startswith(MODELS_PATH):
            return self._models(record)
        fault = spec.stream_fault
        if fault is not None and not record.stream:
            if fault.kind == "disconnect":
                return self._disconnect(request)
            status = ERROR_TYPE_STATUS.get(fault.error_type, 500)
            return self._error(record, ErrorReply(status, fault.error_type, fault.message))
        message = self._render_message(record, spec)
        if record.stream:
            return await self._stream(request, record, spec, message)
        return self._json(record, 200, message, spec.headers)

    def _disconnect(self, request: web.Request) -> web.StreamResponse:
        """Close the connection; aiohttp then quietly drops the returned response."""
        transport = request.transport
        if transport is not None:
            transport.close()
        return web.Response()

    def _error(self, record: RecordedRequest, spec: ErrorReply) -> web.Response:
        payload = {
            "type": "error",
            "error": {"type": spec.resolved_type, "message": spec.resolved_message},
            "request_id": record.request_id,
        }
        headers: dict[str, str] = {}
        retry_ms: int | None
        if spec.retry_after_ms == "auto":
            retry_ms = 1 if spec.status in _RETRY_AFTER_STATUSES else None
        else:
            retry_ms = spec.retry_after_ms
        if retry_ms is not None:
            headers["retry-after-ms"] = str(retry_ms)
            headers["retry-after"] = str(max(1, math.ceil(retry_ms / 1000)))
        if spec.should_retry is not None:
            headers["x-should-retry"] = "true" if spec.should_retry else "false"
        headers.update(spec.headers)
        return self._json(record, spec.status, payload, headers)

    def _raw(self, record: RecordedRequest, spec: RawReply) -> web.Response:
        body = spec.body
        content_type = spec.content_type
        if isinstance(body, dict | list):
            record.response_json = body
            body = json.dumps(body)
            content_type = content_type or "application/json"
        data = body.encode() if isinstance(body, str) else body
        if content_type is None:
            try:
                record.response_json = json.loads(data) if data else None
                content_type = "application/json" if data else "text/plain"
            except ValueError:
                content_type = "text/plain"
        record.status = spec.status
        headers = self._common_headers(record)
        headers["Content-Type"] = content_type
        headers.update(spec.headers)
        return web.Response(status=spec.status, body=data, headers=headers)

    def _model_ids(self) -> list[str]:
        return [model_id for model_id, _, _ in self.models]

    def _model_json(self, row: tuple[str, str, str]) -> JSONObject:
        model_id, display_name, created_at = row
        return {
            "type": "model",
            "id": model_id,
            "display_name": display_name,
            "created_at": created_at,
            "lifecycle": "active",
            "max_input_tokens": 200_000,
            "max_tokens": 64_000,
        }

    def _models(self, record: RecordedRequest) -> web.Response:
        if record.path != MODELS_PATH:
            model_id = record.path[len(MODELS_PATH) + 1 :]
            for row in self.models:
                if row[0] == model_id:
                    return self._json(record, 200, self._model_json(row))
            return self._error(record, ErrorReply(404, "not_found_error", f"model: {model_id}"))
        try:
            limit = int(record.query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            message = "limit: Input should be between 1 and 1000"
            return self._error(record, ErrorReply(400, "invalid_request_error", message))
        ids = self._model_ids()
        rows = list(self.models)
        after, before = record.query.get("after_id"), record.query.get("before_id")
        if before is not None:
            end = ids.index(before) if before in ids else len(rows)
            page = rows[max(0, end - limit) : end]
            has_more = end - limit > 0
        else:
            start = ids.index(after) + 1 if after in ids else 0
            page = rows[start : start + limit]
            has_more = start + limit < len(rows)
        payload = {
            "data": [self._model_json(row) for row in page],
            "has_more": has_more,
            "first_id": page[0][0] if page else None,
            "last_id": page[-1][0] if page else None,
        }
        return self._json(record, 200, payload)

    def _render_message(self, record: RecordedRequest, spec: MessageReply) -> JSONObject:
        body = record.body
        content: list[JSONObject] = []
        for block in spec.content:
            block = dict(block)
            if block.get("type") == "tool_use" and "id" not in block:
                block["id"] = _new_id("toolu_")
            content.append(block)
        stop_reason = spec.stop_reason
        output_tokens = sum(_block_tokens(block) for block in content)
        if stop_reason is None:
            max_tokens = body.get("max_tokens")
            if isinstance(max_tokens, int) and output_tokens > max_tokens:
                content, output_tokens = _truncate(content, max_tokens)
                stop_reason = "max_tokens"
            elif any(block.get("type") == "tool_use" for block in content):
                stop_reason = "tool_use"
            else:
                stop_reason = "end_turn"
        with self._lock:
            usage = self._cache.usage(body, self._now(), self.cache_min_tokens)
        return {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": spec.model or record.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": spec.stop_sequence,
            "usage": usage.as_json(
                spec.output_tokens if spec.output_tokens is not None else max(1, output_tokens)
            ),
        }

    async def _stream(
        self,
        request: web.Request,
        record: RecordedRequest,
        spec: MessageReply,
        message: JSONObject,
    ) -> web.StreamResponse:
        record.status = 200
        record.response_json = message
        headers = self._common_headers(record)
        headers.update(
            {
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        headers.update(spec.headers)
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        fault = spec.stream_fault
        for sent, (event, data) in enumerate(_sse_events(message, spec)):
            if fault is not None and sent >= fault.after_events:
                if fault.kind == "disconnect":
                    transport = request.transport
                    if transport is not None:
                        transport.close()
                    return response
                error = {
                    "type": "error",
                    "error": {"type": fault.error_type, "message": fault.message},
                }
                await response.write(_sse(("error", error)))
                break
            await response.write(_sse((event, data)))
            if spec.event_delay > 0:
                await asyncio.sleep(spec.event_delay)
        await response.write_eof()
        return response


def _truncate(content: list[JSONObject], max_tokens: int) -> tuple[list[JSONObject], int]:
    """Cut text blocks so the reply fits ``max_tokens`` (tool_use blocks are kept whole)."""
    budget = max_tokens
    kept: list[JSONObject] = []
    for block in content:
        if block.get("type") != "text":
            kept.append(block)
            budget -= _block_tokens(block)
            continue
        text = str(block.get("text", ""))
        if estimate_tokens(text) <= budget:
            kept.append(block)
            budget -= estimate_tokens(text)
            continue
        low, high = 0, len(text)
        while low < high:
            middle = (low + high + 1) // 2
            if estimate_tokens(text[:middle]) <= budget:
                low = middle
            else:
                high = middle - 1
        if low:
            kept.append({**block, "text": text[:low]})
        break
    return kept, max_tokens


def _chunks(text: str, size: int) -> list[str]:
    size = max(1, size)
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _split_in(text: str, parts: int) -> list[str]:
    parts = max(1, min(parts, len(text) or 1))
    size = math.ceil(len(text) / parts) if text else 1
    return _chunks(text, size)


def _sse_events(message: JSONObject, spec: MessageReply) -> Iterator[tuple[str, JSONObject]]:
    """The SSE event sequence the real API sends for ``message``."""
    usage = dict(message["usage"])
    start_usage = {
        "input_tokens": usage["input_tokens"],
        "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
        "cache_read_input_tokens": usage["cache_read_input_tokens"],
        "cache_creation": usage["cache_creation"],
        "output_tokens": 1,
        "service_tier": usage["service_tier"],
    }
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    yield "message_start", {"type": "message_start", "message": start}
    for index, block in enumerate(message["content"]):
        kind = block.get("type")
        if kind == "text":
            opening: JSONObject = {"type": "text", "text": ""}
        elif kind == "tool_use":
            opening = {**block, "input": {}}
        else:
            opening = block
        yield (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": opening,
            },
        )
        if index == 0:
            yield "ping", {"type": "ping"}
        if kind == "text":
            for piece in _chunks(str(block.get("text", "")), spec.text_chunk_chars):
                yield (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
        elif kind == "tool_use":
            pieces = ["", *_split_in(json.dumps(block.get("input", {})), spec.json_chunks)]
            for piece in pieces:
                yield (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": piece},
                    },
                )
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    if not message["content"]:
        yield "ping", {"type": "ping"}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {
                "stop_reason": message["stop_reason"],
                "stop_sequence": message["stop_sequence"],
            },
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield "message_stop", {"type": "message_stop"}


def _sse(event: tuple[str, JSONObject]) -> bytes:
    name, data = event
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


# ---------------------------------------------------------------------------------------------
# Running in a background thread
# ---------------------------------------------------------------------------------------------


class FakeClaudeThread:
    """Runs a :class:`FakeClaude` on its own event loop in a daemon thread.

    ``with FakeClaudeThread(latency=0.2) as fake:`` yields the running :class:`FakeClaude`
    (configure it from the calling thread: its methods take a lock). Keyword arguments are
    passed to :class:`FakeClaude`, or pass an existing instance as ``fake``.
    """

    def __init__(self, fake: FakeClaude | None = None, **options: Any) -> None:
        if fake is not None and options:
            raise TypeError("pass either an existing FakeClaude or options, not both")
        self.fake = fake or FakeClaude(**options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self.fake.url

    def start(self, timeout: float = 10.0) -> FakeClaude:
        """Start the thread and wait until the server accepts connections."""
        if self._thread is not None:
            return self.fake
        self._thread = threading.Thread(target=self._run, name="FakeClaude", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("FakeClaude thread did not start in time")
        if self._error is not None:
            raise RuntimeError("FakeClaude failed to start") from self._error
        return self.fake

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.fake.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.fake.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and join the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None
        self._loop = None
        self._ready.clear()

    def __enter__(self) -> FakeClaude:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(**options: Any) -> FakeClaudeThread:
    """Start a :class:`FakeClaudeThread` (call ``.stop()`` when done; ``.fake`` to configure)."""
    runner = FakeClaudeThread(**options)
    runner.start()
    return runner
