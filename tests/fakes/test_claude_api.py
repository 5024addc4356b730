"""Drive :mod:`tests.fakes.claude_api` with the real ``anthropic`` SDK over 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import anthropic
import httpx
import pydantic
import pytest

from tests.fakes.claude_api import (
    Disconnect,
    ErrorReply,
    FakeClaude,
    FakeClaudeThread,
    MessageReply,
    RecordedRequest,
    count_request_tokens,
    estimate_tokens,
    forced_tool,
    minimal_instance,
    start_in_thread,
    system_contains,
    validate_messages_request,
)

MODEL = "claude-sonnet-4-6"
HELLO: list[Any] = [{"role": "user", "content": "Hello"}]
LOOKUP_TOOL: dict[str, Any] = {
    "name": "lookup_order",
    "description": "Look an order up by id.",
    "input_schema": {
        "type": "object",
        "properties": {"order_id": {"type": "string"}},
        "required": ["order_id"],
    },
}
TOOLS: list[Any] = [LOOKUP_TOOL]


@pytest.fixture
async def fake() -> AsyncIterator[FakeClaude]:
    async with FakeClaude() as server:
        yield server


@pytest.fixture
async def client(fake: FakeClaude) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with fake.client(max_retries=0, timeout=5.0) as sdk:
        yield sdk


# --- JSON replies ------------------------------------------------------------------------------


async def test_tool_use_round_trip(fake: FakeClaude, client: anthropic.AsyncAnthropic) -> None:
    fake.enqueue_tool_use("lookup_order", {"order_id": "A-17"}, text="Let me check.")

    raw = await client.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=256,
        tools=TOOLS,
        messages=[{"role": "user", "content": "Where is order A-17?"}],
    )
    message = await raw.parse()

    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "4000"
    assert message.id.startswith("msg_")
    assert message.model == MODEL
    assert message.stop_reason == "tool_use"
    text, call = message.content
    assert text.type == "text" and text.text == "Let me check."
    assert call.type == "tool_use" and call.name == "lookup_order"
    assert call.input == {"order_id": "A-17"}
    assert call.id.startswith("toolu_")
    assert message.usage.input_tokens == count_request_tokens(fake.last_request)
    assert message.usage.output_tokens > 0

    # Answer the tool call: the pairing is valid, so the fake accepts it.
    follow_up = await client.messages.create(
        model=MODEL,
        max_tokens=256,
        tools=TOOLS,
        messages=[
            {"role": "user", "content": "Where is order A-17?"},
            {"role": "assistant", "content": message.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "shipped"}],
            },
        ],
    )
    assert follow_up.content[0].type == "text"

    first = fake.requests[0]
    assert first.method == "POST" and first.path == "/v1/messages"
    assert first.retry_count == 0
    assert first.headers["authorization"] == "Bearer test-key"
    assert first.tool_names == ["lookup_order"]
    assert first["max_tokens"] == 256  # a record is also a mapping of its JSON body
    assert first.status == 200 and first.response_json["id"] == message.id
    assert fake.count() == 2 and fake.queued == 0


class Ticket(pydantic.BaseModel):
    class Priority(pydantic.BaseModel):
        level: int = pydantic.Field(ge=1, le=5)

    category: Literal["billing", "shipping"]
    summary: str = pydantic.Field(min_length=3)
    urgent: bool
    tags: list[str]
    priority: Priority
    note: str | None = None


async def test_default_responder_answers_forced_tool_with_schema_valid_input(
    fake: FakeClaude, client: anthropic.AsyncAnthropic
) -> None:
    tools: list[Any] = [{"name": "ticket", "input_schema": Ticket.model_json_schema()}]

    message = await client.messages.create(
        model=MODEL,
        max_tokens=256,
        tools=tools,
        tool_choice={"type": "tool", "name": "ticket"},
        messages=HELLO,
    )
    free = await client.messages.create(model=MODEL, max_tokens=256, messages=HELLO)

    block = message.content[0]
    assert block.type == "tool_use"
    ticket = Ticket.model_validate(block.input)
    assert ticket.category == "billing" and ticket.priority.level == 1
    assert ticket.summary == "xxx" and ticket.note is None
    assert free.content[0].type == "text" and free.content[0].text == fake.default_text
    assert free.stop_reason == "end_turn"


async def test_routes_and_failures_by_predicate(
    fake: FakeClaude, client: anthropic.AsyncAnthropic
) -> None:
    summary_failures = fake.fail_when(system_contains("summar"), status=529, times=1)
    route = fake.route(system_contains("summar"), "The customer wants a refund.")
    fake.route(forced_tool("lookup_order"), lambda req: None)  # falls through
    fake.responder = lambda body: MessageReply.text(f"echo: {body['messages'][-1]['content']}")

    with pytest.raises(anthropic.OverloadedError):
        await client.messages.create(
            model=MODEL, max_tokens=64, system="Summarize the chat.", messages=HELLO
        )
    summary = await client.messages.create(
        model=MODEL, max_tokens=64, system="Summarize the chat.", messages=HELLO
    )
    chat = await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)

    assert summary.content[0].type == "text"
    assert summary.content[0].text == "The customer wants a refund."
    assert chat.content[0].type == "text" and chat.content[0].text == "echo: Hello"
    assert summary_failures.hits == 1 and not summary_failures.active
    assert route.hits == 1
    assert [r.status for r in fake.requests] == [529, 200, 200]


async def test_max_tokens_truncates_text(
    fake: FakeClaude, client: anthropic.AsyncAnthropic
) -> None:
    fake.enqueue_text("word " * 100)

    message = await client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)

    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 10
    assert message.content[0].type == "text"
    assert estimate_tokens(message.content[0].text) <= 10


# --- Streaming -------------------------------------------------------------------------------


async def test_streaming_text(fake: FakeClaude, client: anthropic.AsyncAnthropic) -> None:
    fake.enqueue_text("Your parcel left the warehouse this morning.")

    pieces: list[str] = []
    async with client.messages.stream(model=MODEL, max_tokens=256, messages=HELLO) as stream:
        async for piece in stream.text_stream:
            pieces.append(piece)
        final = await stream.get_final_message()

    assert len(pieces) > 1
    assert "".join(pieces) == "Your parcel left the warehouse this morning."
    assert final.content[0].type == "text"
    assert final.content[0].text == "".join(pieces)
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == estimate_tokens("".join(pieces))
    assert fake.last_request.stream


async def test_streaming_tool_use(fake: FakeClaude, client: anthropic.AsyncAnthropic) -> None:
    arguments = {"order_id": "A-17", "reason": "late delivery", "items": [1, 2, 3]}
    fake.enqueue_tool_use("lookup_order", arguments)

    raw_events: list[str] = []
    async with client.messages.stream(
        model=MODEL,
        max_tokens=256,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "lookup_order"},
        messages=HELLO,
    ) as stream:
        async for event in stream:
            raw_events.append(event.type)
        final = await stream.get_final_message()

    assert final.stop_reason == "tool_use"
    block = final.content[0]
    assert block.type == "tool_use" and block.input == arguments
    assert raw_events.count("input_json") >= 3  # the JSON arrived in several chunks
    assert raw_events[0] == "message_start" and raw_events[-1] == "message_stop"


async def test_mid_stream_error_raises_status_error(
    fake: FakeClaude, client: anthropic.AsyncAnthropic
) -> None:
    fake.enqueue_stream_error(after_events=4)

    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(model=MODEL, max_tokens=256, messages=HELLO) as s:
            async for piece in s.text_stream:
                received.append(piece)

    assert received  # some text arrived before the error
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "overloaded_error"
    assert fake.count() == 1  # an error after HTTP 200 is not retried by the SDK


async def test_mid_stream_disconnect_surfaces_as_transport_error(
    fake: FakeClaude, client: anthropic.AsyncAnthropic
) -> None:
    fake.enqueue_stream_error(after_events=4, kind="disconnect")

    with pytest.raises(Exception) as caught:
        async with client.messages.stream(model=MODEL, max_tokens=256, messages=HELLO) as s:
            await s.get_final_message()

    # anthropic 2.11 lets the transport error through unwrapped (not an APIError).
    assert not isinstance(caught.value, anthropic.APIError)
    assert type(caught.value).__module__.startswith("httpx")
    assert fake.last_request.status == 200


# --- Errors and retries ----------------------------------------------------------------------


async def test_overloaded_then_success_is_retried(fake: FakeClaude) -> None:
    fake.enqueue_error(529).enqueue_text("recovered")

    async with fake.client(max_retries=2, timeout=5.0) as sdk:
        message = await sdk.messages.create(model=MODEL, max_tokens=64, messages=HELLO)

    assert message.content[0].type == "text" and message.content[0].text == "recovered"
    assert fake.count() == 2
    first, second = fake.requests
    assert first.status == 529
    assert first.response_json["error"]["type"] == "overloaded_error"
    assert second.headers["x-stainless-retry-count"] == "1"
    assert [r.retry_count for r in fake.requests] == [0, 1]


async def test_rate_limit_exhausts_retries(fake: FakeClaude) -> None:
    fake.fail_when(status=429)

    async with fake.client(max_retries=1, timeout=5.0) as sdk:
        with pytest.raises(anthropic.RateLimitError) as caught:
            await sdk.messages.create(model=MODEL, max_tokens=64, messages=HELLO)

    assert fake.count() == 2
    assert caught.value.request_id == fake.last_request.request_id
    assert caught.value.response.headers["retry-after-ms"] == "1"
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": ErrorReply(429).resolved_message},
        "request_id": fake.last_request.request_id,
    }


async def test_rate_limit_token_bucket(fake: FakeClaude) -> None:
    fake.rate_limit(20, burst=1)

    async with fake.client(max_retries=0, timeout=5.0) as sdk:
        await sdk.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
        with pytest.raises(anthropic.RateLimitError) as caught:
            await sdk.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    wait_ms = int(caught.value.response.headers["retry-after-ms"])
    assert 1 <= wait_ms <= 50

    async with fake.client(max_retries=3, timeout=5.0) as sdk:
        await sdk.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert fake.requests[-1].status == 200


async def test_timeout_raises_api_timeout_error() -> None:
    async with FakeClaude(latency=1.0) as slow:
        async with slow.client(max_retries=0, timeout=0.2) as sdk:
            started = time.monotonic()
            with pytest.raises(anthropic.APITimeoutError):
                await sdk.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
        assert time.monotonic() - started < 0.9
        assert slow.count() == 1


async def test_enqueued_delay_applies_to_next_reply(
    fake: FakeClaude, client: anthropic.AsyncAnthropic
) -> None:
    fake.enqueue_delay(0.3)

    started = time.monotonic()
    await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    slow = time.monotonic() - started
    started = time.monotonic()
    await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    fast = time.monotonic() - started

    assert slow >= 0.3 > fast


async def test_disconnect_is_a_connection_error_and_retried(fake: FakeClaude) -> None:
    fake.enqueue(Disconnect())

    async with fake.client(max_retries=0, timeout=5.0) as sdk:
        with pytest.raises(anthropic.APIConnectionError):
            await sdk.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    fake.enqueue_disconnect().enqueue_text("after reconnect")
    async with fake.client(max_retries=1, timeout=5.0) as sdk:
        message = await sdk.messages.create(model=MODEL, max_tokens=64, messages=HELLO)

    assert message.content[0].type == "text" and message.content[0].text == "after reconnect"
    assert [r.status for r in fake.requests] == [None, None, 200]


async def test_raw_replies(fake: FakeClaude, client: anthropic.AsyncAnthropic) -> None:
    fake.enqueue_raw(502, "<html>Bad gateway</html>", content_type="text/html")
    fake.enqueue_raw(200, "{not json", content_type="application/json")

    with pytest.raises(anthropic.InternalServerError) as caught:
        await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    with pytest.raises(ValueError):
        await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)

    assert caught.value.status_code == 502
    assert caught.value.body == "<html>Bad gateway</html>"


async def test_authentication(fake: FakeClaude) -> None:
    async with fake.client(api_key="wrong-key", max_retries=0) as sdk:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await sdk.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert caught.value.body["error"]["message"] == "invalid x-api-key"  # type: ignore[index]

    body = {"model": MODEL, "max_tokens": 64, "messages": HELLO}
    version = {"anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(base_url=fake.url) as http:
        by_x_api_key = await http.post(
            "/v1/messages", json=body, headers={"x-api-key": "test-key", **version}
        )
        missing = await http.post("/v1/messages", json=body, headers=version)

    assert by_x_api_key.status_code == 200
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert missing.headers["request-id"] == missing.json()["request_id"]


async def test_responder_bug_is_reported_not_retried(fake: FakeClaude) -> None:
    def broken(_request: RecordedRequest) -> str:
        raise KeyError("oops")

    fake.responder = broken

    async with fake.client(max_retries=2, timeout=5.0) as sdk:
        with pytest.raises(anthropic.InternalServerError, match="KeyError"):
            await sdk.messages.create(model=MODEL, max_tokens=64, messages=HELLO)

    assert fake.count() == 1
    assert isinstance(fake.handler_errors[0], KeyError)


# --- Validation ------------------------------------------------------------------------------


async def test_orphaned_tool_result_is_rejected(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(
            model=MODEL,
            max_tokens=64,
            messages=[
                {"role": "user", "content": "Where is my order?"},
                {"role": "assistant", "content": "Let me look."},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_gone"}],
                },
            ],
        )
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "unexpected `tool_use_id` found in `tool_result` blocks: toolu_gone" in str(
        caught.value
    )


async def test_unanswered_tool_use_is_rejected(client: anthropic.AsyncAnthropic) -> None:
    tool_use = {"type": "tool_use", "id": "toolu_1", "name": "lookup_order", "input": {}}
    messages: list[Any] = [
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": [tool_use]},
        {"role": "user", "content": "Hello?"},
    ]
    with pytest.raises(anthropic.BadRequestError, match="without `tool_result` blocks"):
        await client.messages.create(model=MODEL, max_tokens=64, messages=messages)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 5, "messages": HELLO}, "model: Field required"),
        ({"model": MODEL, "messages": HELLO}, "max_tokens: Field required"),
        ({"model": MODEL, "max_tokens": 5}, "messages: Field required"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": [{"role": "assistant", "content": "x"}]},
            'first message must use the "user" role',
        ),
        (
            {"model": MODEL, "max_tokens": 5, "messages": HELLO + HELLO},
            "roles must alternate",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": HELLO,
                "tools": [LOOKUP_TOOL],
                "tool_choice": {"type": "tool", "name": "nope"},
            },
            "Tool 'nope' not found",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "system": [
                    {"type": "text", "text": f"s{i}", "cache_control": {"type": "ephemeral"}}
                    for i in range(5)
                ],
                "messages": HELLO,
            },
            "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        ),
    ],
)
async def test_request_validation(fake: FakeClaude, body: dict[str, Any], message: str) -> None:
    headers = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(base_url=fake.url) as http:
        response = await http.post("/v1/messages", json=body, headers=headers)

    assert response.status_code == 400
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    assert message in payload["error"]["message"]
    assert payload["request_id"] == response.headers["request-id"]


def test_merged_roles_when_alternation_is_relaxed() -> None:
    tool_use = {"type": "tool_use", "id": "toolu_1", "name": "t", "input": {}}
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "thinking out loud"},
        {"role": "assistant", "content": [tool_use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]},
        {"role": "user", "content": "and another thing"},
    ]
    body = {"model": MODEL, "max_tokens": 5, "messages": messages}

    assert validate_messages_request(body, strict_alternation=False) is None
    assert "roles must alternate" in str(validate_messages_request(body))


# --- Tokens, caching, models -----------------------------------------------------------------


async def test_count_tokens(fake: FakeClaude, client: anthropic.AsyncAnthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": "こんにちは、注文はどこですか"}]

    counted = await client.messages.count_tokens(
        model=MODEL,
        system="You are a helpful support agent.",
        tools=TOOLS,
        messages=messages,
    )

    assert counted.input_tokens == count_request_tokens(fake.last_request)
    assert fake.last_request.path == "/v1/messages/count_tokens"
    assert estimate_tokens("こんにちは") == 5
    assert estimate_tokens("abcdefgh") == 2
    assert fake.count("/v1/messages/count_tokens") == 1 and fake.count() == 0


async def test_prompt_caching(fake: FakeClaude, client: anthropic.AsyncAnthropic) -> None:
    system: list[Any] = [
        {"type": "text", "text": "Policy handbook. " * 200, "cache_control": {"type": "ephemeral"}}
    ]

    async def call(question: str) -> anthropic.types.Usage:
        message = await client.messages.create(
            model=MODEL,
            max_tokens=64,
            system=system,
            messages=[{"role": "user", "content": question}],
        )
        return message.usage

    first = await call("Where is my order?")
    second = await call("Where is my order?")
    other_question = await call("Can I get a refund?")
    fake.advance_time(301)  # past the 5-minute TTL
    expired = await call("Where is my order?")

    prefix = estimate_tokens(system[0]["text"])
    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens) == (prefix, 0)
    assert (second.cache_creation_input_tokens, second.cache_read_input_tokens) == (0, prefix)
    assert second.input_tokens == first.input_tokens > 0
    assert first.input_tokens + prefix == count_request_tokens(fake.requests[0])
    assert other_question.cache_read_input_tokens == prefix
    assert expired.cache_creation_input_tokens == prefix
    assert expired.cache_read_input_tokens == 0


async def test_models(fake: FakeClaude, client: anthropic.AsyncAnthropic) -> None:
    ids = [model.id async for model in client.models.list(limit=2)]
    one = await client.models.retrieve(ids[1])

    assert ids == [row[0] for row in fake.models]
    assert fake.count("/v1/models") == 3  # three pages of two
    assert one.display_name == fake.models[1][1]
    assert one.type == "model"
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("claude-nonexistent")


def test_minimal_instance_respects_bounds() -> None:
    schema = {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": 3, "maximum": 9},
            "ratio": {"type": "number", "exclusiveMaximum": -1},
            "mode": {"enum": ["fast", "slow"]},
            "ids": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "when": {"type": "string", "format": "date"},
            "optional": {"type": "string"},
        },
        "required": ["count", "ratio", "mode", "ids", "when"],
    }

    assert minimal_instance(schema) == {
        "count": 3,
        "ratio": -1.5,
        "mode": "fast",
        "ids": ["", ""],
        "when": "1970-01-01",
    }


async def test_max_lifetime_stops_the_server() -> None:
    fake = FakeClaude(max_lifetime=0.05)
    await fake.start()
    await asyncio.sleep(0.3)

    assert not fake.running
    await fake.stop()  # idempotent


# --- Running in a thread ---------------------------------------------------------------------


def test_thread_mode_with_sync_client() -> None:
    with FakeClaudeThread(latency=0.05) as fake:
        fake.route(system_contains("summar"), "short summary")
        sdk = fake.sync_client(max_retries=0, timeout=5.0)
        try:
            summary = sdk.messages.create(
                model=MODEL, max_tokens=64, system="Summarise this.", messages=HELLO
            )
            chat = sdk.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
        finally:
            sdk.close()
        assert summary.content[0].type == "text" and summary.content[0].text == "short summary"
        assert chat.content[0].type == "text" and chat.content[0].text == fake.default_text
        assert isinstance(fake.last_request, RecordedRequest)
    assert not fake.running

    runner = start_in_thread(api_key=None)
    try:
        response = httpx.get(runner.url + "/v1/models", headers={"x-api-key": "any"})
        assert response.status_code == 200
    finally:
        runner.stop()
