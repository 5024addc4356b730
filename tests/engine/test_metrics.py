"""engine.metrics: exposition, closed label sets, error classification, multi-process mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.errors import ConfigError, ModelOutputError, ModelUnavailableError
from engine.metrics import (
    FAMILIES,
    LABEL_SETS,
    MULTIPROC_ENV,
    OTHER,
    Metrics,
    classify_error,
    series_names,
)

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "metrics.md"
MODEL = "claude-sonnet-4-5"
CUSTOMER_TEXT = "My card 4111 1111 1111 1111 was charged twice, I'm Jane Doe"


def exposition(metrics: Metrics) -> str:
    payload, content_type = metrics.render_latest()
    assert content_type.startswith("text/plain")
    return payload.decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def label_values(text: str) -> set[str]:
    return {v for _, labels in samples(text) for _, v in labels}


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics(multiprocess_dir="")
    m.register_models([MODEL, "claude-haiku-4-5"])
    m.register_flows(["billing", "returns"])
    return m


# --------------------------------------------------------------------------- exposition


def test_exposition_has_every_documented_family_with_its_type(metrics: Metrics) -> None:
    text = exposition(metrics)
    docs = DOCS.read_text(encoding="utf-8")
    for spec in FAMILIES:
        exposed = spec.name + "_total" if spec.type == "counter" else spec.name
        assert f"# TYPE {exposed} {spec.type}\n" in text, exposed
        assert f"`{exposed}`" in docs, f"docs/metrics.md does not describe {exposed}"
    assert metrics.families() == {s.name: s.type for s in FAMILIES}
    assert metrics.series_names() == series_names()


def test_names_follow_prometheus_conventions() -> None:
    for spec in FAMILIES:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name), spec.name
        assert not spec.name.endswith("_total"), spec.name
        if spec.type == "histogram":
            assert spec.buckets == tuple(sorted(spec.buckets)), spec.name
        if spec.name.endswith("_seconds"):
            assert spec.type in ("histogram", "gauge"), spec.name


def test_claude_call_families(metrics: Metrics) -> None:
    metrics.observe_claude_call(MODEL, "decision", 0.3, ok=True)
    metrics.observe_claude_call(MODEL, "summary", 2.5, ok=False)
    metrics.count_error(MODEL, "overloaded")
    metrics.add_tokens(
        MODEL,
        {
            "input_tokens": 1200,
            "output_tokens": 80,
            "cache_read_input_tokens": 1000,
            "cache_creation_input_tokens": None,
            "service_tier": "standard",  # not a token count: ignored
        },
    )
    metrics.add_tokens(MODEL, SimpleNamespace(input_tokens=10, output_tokens=5))
    metrics.observe_context("decision", 3000)
    text = exposition(metrics)

    assert (
        value(text, "claude_api_latency_seconds_count", model=MODEL, role="decision", outcome="ok")
        == 1
    )
    assert value(
        text, "claude_api_latency_seconds_bucket", model=MODEL, role="summary", outcome="error",
        le="3.0",
    ) == 1  # fmt: skip
    assert value(text, "claude_api_errors_total", model=MODEL, type="overloaded") == 1
    assert value(text, "claude_api_errors_total", model=MODEL, type="timeout") == 0  # primed
    assert value(text, "claude_tokens_used_total", model=MODEL, kind="input") == 1210
    assert value(text, "claude_tokens_used_total", model=MODEL, kind="output") == 85
    assert value(text, "claude_tokens_used_total", model=MODEL, kind="cache_read") == 1000
    assert value(text, "claude_tokens_used_total", model=MODEL, kind="cache_creation") == 0
    assert value(text, "context_length_tokens_bucket", role="decision", le="4096.0") == 1
    assert value(text, "context_length_tokens_bucket", role="decision", le="2048.0") == 0
    assert value(text, "helpline_circuit_state", model=MODEL) == 0


def test_claude_call_context_manager_records_outcome_and_error_type(metrics: Metrics) -> None:
    with metrics.claude_call(MODEL, "route"):
        pass
    with pytest.raises(TimeoutError), metrics.claude_call(MODEL, "route"):
        raise TimeoutError
    text = exposition(metrics)
    assert (
        value(text, "claude_api_latency_seconds_count", model=MODEL, role="route", outcome="ok")
        == 1
    )
    assert (
        value(text, "claude_api_latency_seconds_count", model=MODEL, role="route", outcome="error")
        == 1
    )
    assert value(text, "claude_api_errors_total", model=MODEL, type="timeout") == 1


def test_turn_handoff_and_other_helpers(metrics: Metrics) -> None:
    metrics.count_turn("billing", "slack", "replied", seconds=1.2)
    metrics.count_turn(None, "web", "busy")
    metrics.count_handoff("policy")
    metrics.set_handoff_queue(4, 95.0)
    metrics.count_satisfaction(5)
    metrics.count_satisfaction("2")
    metrics.observe_satisfaction_estimate(7.5)  # clamped to 5
    metrics.count_cache(hit=True, policy="faq")
    metrics.count_coalesced("inflight", 3)
    metrics.observe_model_queue(0.02)
    metrics.count_busy_rejection()
    metrics.count_fallback("breaker_open")
    metrics.count_memory_mismatch()
    metrics.count_summary(ok=False)
    metrics.set_circuit_state(MODEL, "open")
    with metrics.model_slot(), metrics.model_slot():
        assert value(exposition(metrics), "helpline_model_inflight") == 2
    text = exposition(metrics)

    turns = "helpline_turns_total"
    assert value(text, turns, flow="billing", channel="slack", outcome="replied") == 1
    assert value(text, turns, flow="none", channel="web", outcome="busy") == 1
    assert value(text, "helpline_turn_duration_seconds_count", channel="slack") == 1
    assert value(text, "helpline_handoffs_total", reason="policy") == 1
    assert value(text, "helpline_handoffs_total", reason="timeout") == 0  # primed
    assert value(text, "helpline_handoff_queue_waiting") == 4
    assert value(text, "helpline_handoff_oldest_wait_seconds") == 95
    assert value(text, "helpline_satisfaction_ratings_total", rating="5") == 1
    assert value(text, "helpline_satisfaction_ratings_total", rating="2") == 1
    assert value(text, "helpline_satisfaction_estimate_sum") == 5
    assert value(text, "helpline_cache_requests_total", result="hit", policy="faq") == 1
    assert value(text, "helpline_coalesced_calls_total", kind="inflight") == 3
    assert value(text, "helpline_model_queue_seconds_count") == 1
    assert value(text, "helpline_model_inflight") == 0
    assert value(text, "helpline_model_busy_rejections_total") == 1
    assert value(text, "helpline_model_fallbacks_total", reason="breaker_open") == 1
    assert value(text, "helpline_memory_mismatches_total") == 1
    assert value(text, "helpline_summaries_total", outcome="error") == 1
    assert value(text, "helpline_circuit_state", model=MODEL) == 2

    metrics.set_handoff_queue(0, 400.0)  # empty queue: no oldest wait
    assert value(exposition(metrics), "helpline_handoff_oldest_wait_seconds") == 0
    with pytest.raises(ValueError, match="circuit state"):
        metrics.set_circuit_state(MODEL, "ajar")  # type: ignore[arg-type]


def test_bad_numbers_are_ignored(metrics: Metrics) -> None:
    metrics.observe_claude_call(MODEL, "decision", float("nan"), ok=True)
    metrics.observe_claude_call(MODEL, "decision", -1.0, ok=True)
    metrics.add_tokens(MODEL, {"input_tokens": -5, "output_tokens": True})
    metrics.add_tokens(MODEL, "not a usage object")
    metrics.observe_context("decision", float("inf"))  # type: ignore[arg-type]
    text = exposition(metrics)
    assert "claude_api_latency_seconds_count{" not in text
    assert value(text, "claude_tokens_used_total", model=MODEL, kind="input") == 0
    assert value(text, "claude_tokens_used_total", model=MODEL, kind="output") == 0
    assert "context_length_tokens_count{" not in text


def test_two_instances_do_not_collide() -> None:
    first, second = Metrics(multiprocess_dir=""), Metrics(multiprocess_dir="")
    first.count_busy_rejection()
    assert value(exposition(first), "helpline_model_busy_rejections_total") == 1
    assert value(exposition(second), "helpline_model_busy_rejections_total") == 0


def test_openmetrics_is_negotiated(metrics: Metrics) -> None:
    payload, content_type = metrics.render_latest("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert payload.decode().rstrip().endswith("# EOF")


# --------------------------------------------------------------------------- label hygiene


def test_unknown_label_values_become_other(metrics: Metrics) -> None:
    metrics.count_turn("unregistered-flow", "whatsapp", "exploded")
    metrics.observe_claude_call("gpt-9", "poetry", 0.1, ok=True)
    metrics.count_error("gpt-9", "meteor")
    metrics.add_tokens("gpt-9", {"input_tokens": 5})
    metrics.count_handoff("bored")
    metrics.count_satisfaction(11)
    metrics.count_cache(hit=False, policy="forever")
    metrics.count_coalesced("magic")
    metrics.count_fallback("whim")
    metrics.set_circuit_state("gpt-9", 1)
    text = exposition(metrics)

    assert value(text, "helpline_turns_total", flow=OTHER, channel=OTHER, outcome=OTHER) == 1
    assert (
        value(text, "claude_api_latency_seconds_count", model=OTHER, role=OTHER, outcome="ok") == 1
    )
    assert value(text, "claude_api_errors_total", model=OTHER, type=OTHER) == 1
    assert value(text, "claude_tokens_used_total", model=OTHER, kind="input") == 5
    assert value(text, "helpline_handoffs_total", reason=OTHER) == 1
    assert value(text, "helpline_satisfaction_ratings_total", rating=OTHER) == 1
    assert value(text, "helpline_cache_requests_total", result="miss", policy=OTHER) == 1
    assert value(text, "helpline_coalesced_calls_total", kind=OTHER) == 1
    assert value(text, "helpline_model_fallbacks_total", reason=OTHER) == 1
    assert value(text, "helpline_circuit_state", model=OTHER) == 1
    for bad in ("unregistered-flow", "whatsapp", "exploded", "gpt-9", "poetry", "meteor"):
        assert bad not in text


def test_customer_text_never_becomes_a_label(metrics: Metrics) -> None:
    metrics.register_flows([CUSTOMER_TEXT])  # refused: not an identifier
    metrics.register_models([CUSTOMER_TEXT, "x" * 200])
    assert CUSTOMER_TEXT not in metrics.flows and CUSTOMER_TEXT not in metrics.models
    metrics.count_turn(CUSTOMER_TEXT, CUSTOMER_TEXT, CUSTOMER_TEXT, seconds=1.0)
    metrics.observe_claude_call(CUSTOMER_TEXT, CUSTOMER_TEXT, 1.0, ok=False)
    metrics.count_error(CUSTOMER_TEXT, CUSTOMER_TEXT)
    metrics.add_tokens(CUSTOMER_TEXT, {CUSTOMER_TEXT: 3, "input_tokens": 3})
    metrics.observe_context(CUSTOMER_TEXT, 10)
    metrics.count_handoff(CUSTOMER_TEXT)
    metrics.count_satisfaction(CUSTOMER_TEXT)
    metrics.count_cache(hit=True, policy=CUSTOMER_TEXT)
    metrics.count_coalesced(CUSTOMER_TEXT)
    metrics.count_fallback(CUSTOMER_TEXT)
    metrics.observe_turn_duration(CUSTOMER_TEXT, 1.0)
    metrics.set_circuit_state(CUSTOMER_TEXT, "open")
    text = exposition(metrics)
    for fragment in ("4111", "Jane", "charged", "x" * 80):
        assert fragment not in text
    allowed = set().union(*LABEL_SETS.values()) | metrics.models | metrics.flows
    numeric = {v for v in label_values(text) if re.fullmatch(r"[0-9.e+]+|\+Inf", v)}
    assert label_values(text) - numeric <= allowed


def test_registration_is_bounded_and_idempotent() -> None:
    m = Metrics(multiprocess_dir="")
    m.register_models(f"model-{i}" for i in range(100))
    assert len(m.models - {OTHER}) == 32
    m.register_flows(["billing", "billing"])
    m.register_flows(["billing"])
    assert m.flows == {"billing", "none", OTHER}
    m.register_flows(f"flow-{i}" for i in range(1000))
    assert len(m.flows - {"none", OTHER}) == 256


# --------------------------------------------------------------------------- errors


class _SDKError(Exception):
    """Shaped like the Anthropic SDK's errors: classified by status code and class name."""

    def __init__(self, status_code: int | None = None) -> None:
        super().__init__("boom")
        if status_code is not None:
            self.status_code = status_code


class RateLimitError(_SDKError): ...


class InternalServerError(_SDKError): ...


class OverloadedError(_SDKError): ...


class AuthenticationError(_SDKError): ...


class BadRequestError(_SDKError): ...


class APITimeoutError(_SDKError): ...


class APIConnectionError(_SDKError): ...


class _ResponseOnly(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__("boom")
        self.response = SimpleNamespace(status_code=status_code)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RateLimitError(429), "rate_limit"),
        (_ResponseOnly(429), "rate_limit"),
        (OverloadedError(), "overloaded"),
        (InternalServerError(529), "overloaded"),
        (InternalServerError(500), "server"),
        (InternalServerError(), "server"),
        (_ResponseOnly(503), "server"),
        (AuthenticationError(401), "auth"),
        (_SDKError(403), "auth"),
        (AuthenticationError(), "auth"),
        (BadRequestError(400), "bad_request"),
        (_SDKError(422), "bad_request"),
        (APITimeoutError(), "timeout"),
        (APIConnectionError(), "connection"),
        (TimeoutError(), "timeout"),
        (ConnectionResetError(), "connection"),
        (ModelOutputError("not in schema"), "output_schema"),
        (RuntimeError("?"), "other"),
    ],
)
def test_classify_error(exc: BaseException, expected: str) -> None:
    assert classify_error(exc) == expected


def test_classify_error_follows_the_cause() -> None:
    try:
        try:
            raise RateLimitError(429)
        except RateLimitError as exc:
            raise ModelUnavailableError("rate limited") from exc
    except ModelUnavailableError as wrapped:
        assert classify_error(wrapped) == "rate_limit"


# --------------------------------------------------------------------------- multi-process


def test_multiprocess_env_set_after_import_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="before prometheus_client is imported"):
        Metrics()
    with pytest.raises(ConfigError, match="not an existing directory"):
        Metrics(multiprocess_dir=str(tmp_path / "missing"))


WORKER = textwrap.dedent(
    """
    import os, sys
    from engine.metrics import Metrics
    n = int(sys.argv[1])
    m = Metrics()
    m.register_models(["claude-sonnet-4-5"])
    m.register_flows(["billing"])
    for _ in range(n):
        m.count_turn("billing", "web", "replied", seconds=0.5)
        m.observe_claude_call("claude-sonnet-4-5", "decision", 0.2, ok=True)
    m.add_tokens("claude-sonnet-4-5", {"input_tokens": 100 * n})
    m.set_model_inflight(n)
    m.set_handoff_queue(n, 10.0 * n)
    print(os.getpid())
    """
)

RENDER = textwrap.dedent(
    """
    import sys
    from engine.metrics import Metrics, mark_process_dead
    for pid in sys.argv[1:]:
        mark_process_dead(int(pid))
    payload, _ = Metrics().render_latest()
    sys.stdout.write(payload.decode())
    """
)


def _run(code: str, directory: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    env[MULTIPROC_ENV] = str(directory)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_multiprocess_mode_aggregates_workers(tmp_path: Path) -> None:
    first = _run(WORKER, tmp_path, "2").strip()
    second = _run(WORKER, tmp_path, "3").strip()
    assert first != second
    assert list(tmp_path.glob("counter_*.db"))

    text = _run(RENDER, tmp_path)
    model = "claude-sonnet-4-5"
    turns = {"flow": "billing", "channel": "web", "outcome": "replied"}
    assert value(text, "helpline_turns_total", **turns) == 5
    assert value(text, "helpline_turn_duration_seconds_count", channel="web") == 5
    assert value(text, "helpline_turn_duration_seconds_sum", channel="web") == 2.5
    assert (
        value(text, "claude_api_latency_seconds_count", model=model, role="decision", outcome="ok")
        == 5
    )
    assert value(text, "claude_tokens_used_total", model=model, kind="input") == 500
    assert value(text, "helpline_model_inflight") == 5  # livesum
    assert value(text, "helpline_handoff_queue_waiting") == 3  # livemax
    assert value(text, "helpline_handoff_oldest_wait_seconds") == 30
    assert "# TYPE helpline_turns_total counter" in text

    # The first worker exited: its live gauges go, its counters stay.
    text = _run(RENDER, tmp_path, first)
    assert value(text, "helpline_model_inflight") == 3
    assert value(text, "helpline_handoff_queue_waiting") == 3
    assert value(text, "helpline_turns_total", **turns) == 5
