"""The shipped Prometheus rules and Grafana dashboard stay valid and in sync with the code.

``promtool`` comes from the Debian package ``prometheus``. Without it the promtool
tests are skipped locally and fail under ``CI=true``. The checks that only parse
YAML/JSON run everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from engine.metrics import FAMILIES, LABEL_SETS, REGISTERED_LABELS, Metrics, series_names

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "helpline-dashboard.json"
DOCS = ROOT / "docs" / "metrics.md"

# Series written by Prometheus itself rather than by Helpline.
PROMETHEUS_SERIES = frozenset({"up"})
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
SEVERITIES = frozenset({"critical", "warning", "info"})

PROMQL_KEYWORDS = frozenset(
    {
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
        "group_right", "offset", "bool", "inf", "nan", "atan2", "start", "end",
    }
)  # fmt: skip


# --------------------------------------------------------------------------- helpers


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = (
            "promtool not found: install it with `apt-get install -y prometheus` "
            "(Debian package; only the promtool binary is needed)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=300, check=False
    )


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


def rules() -> list[dict[str, Any]]:
    doc = load_yaml(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (panel.get("title", "?"), target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if "expr" in target
    ]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


def metric_names_in(expr: str) -> set[str]:
    """Metric (and recording-rule) names an expression selects."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w:.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        token = match.group(0)
        if token in PROMQL_KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue  # keyword, function or aggregation
        names.add(token)
    return names


def family_of(series: str) -> str | None:
    for spec in FAMILIES:
        for suffix in ("", "_total", "_bucket", "_count", "_sum", "_created"):
            if series == spec.name + suffix:
                return spec.name
    return None


def matcher_problems(expr: str) -> list[str]:
    """Label names unknown to a family, or ``=`` values outside its closed set."""
    specs = {s.name: s for s in FAMILIES}
    problems = []
    for selector in _SELECTOR.finditer(expr):
        series, body = selector.group(1), selector.group(2)
        family = family_of(series)
        if family is None:
            continue
        allowed = set(specs[family].labels) | TARGET_LABELS
        if series.endswith("_bucket"):
            allowed.add("le")
        for label, op, value in _MATCHER.findall(body):
            if label not in allowed:
                problems.append(f"{series}: unknown label {label!r}")
            closed = LABEL_SETS.get((family, label))
            if op == "=" and closed is not None and value not in closed:
                problems.append(f"{series}: {label}={value!r} is outside {sorted(closed)}")
    return problems


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's template variables so promtool can parse the expression."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
    expr = expr.replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


# --------------------------------------------------------------------------- the helpers


def test_metric_name_parser() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (model, le) (rate(claude_api_latency_seconds_bucket"
        '{role!="batch", model=~"$model"}[5m]))) > 0.8 and on (model) '
        'sum(increase(x:y:z[1d] offset 1d)) > 1e3 unless up{job="helpline"}'
    )
    assert metric_names_in(expr) == {"claude_api_latency_seconds_bucket", "x:y:z", "up"}
    assert matcher_problems('helpline_turns_total{outcome="replyed"}')
    assert matcher_problems('helpline_turns_total{flavour="x"}')
    assert not matcher_problems('helpline_turns_total{outcome="replied",job="helpline"}')


# --------------------------------------------------------------------------- promtool


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_example_config() -> None:
    result = run_promtool("check", "config", str(PROM_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL (checked as recording rules by promtool)."""
    exprs = dashboard_exprs()
    doc = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}:check", "expr": grafana_to_promql(expr)}
                    for i, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(doc), encoding="utf-8")  # JSON is valid YAML
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- alerts file


def test_alert_rules_reference_only_defined_metrics() -> None:
    known = Metrics().series_names() | PROMETHEUS_SERIES
    recorded = recorded_names()
    for rule in rules():
        expr = rule["expr"]
        for name in metric_names_in(expr):
            if ":" in name:
                assert name in recorded, f"{name} is not a recording rule in alerts.yml"
            else:
                assert name in known, f"{rule.get('alert') or rule.get('record')}: {name}"
        assert not matcher_problems(expr), (rule.get("alert") or rule.get("record"), expr)


def test_alert_rules_are_complete() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    required = {
        "HelplineClaudeErrorRateHigh",
        "HelplineClaudeLatencyP99High",
        "HelplineTokenUsageSpike",
        "HelplineHandoffQueueWaitingTooLong",
        "HelplineHandoffQueueLarge",
        "HelplineModelFallbackActive",
        "HelplineCircuitBreakerOpen",
        "HelplinePromptCacheIneffective",
    }
    assert required <= set(names)
    for rule in alert_rules():
        name = rule["alert"]
        assert "for" in rule, name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        anchor = annotations["runbook_url"].rsplit("#", 1)[-1]
        assert anchor == name.lower(), name
        assert re.search(rf"^#+ {name}\s*$", docs, re.MULTILINE), f"docs lack a {name} section"


def test_every_alert_has_firing_and_silent_unit_tests() -> None:
    doc = load_yaml(ALERTS_TEST)
    assert doc["rule_files"] == ["alerts.yml"]
    fired: set[str] = set()
    silent: set[str] = set()
    for group in doc["tests"]:
        for case in group.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fired == set(), "alerts never shown to fire"
    assert names - silent == set(), "alerts never shown to stay silent"


# --------------------------------------------------------------------------- dashboard


def test_dashboard_is_a_grafana_dashboard() -> None:
    dash = dashboard()
    assert dash["title"] and dash["uid"]
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    for wanted in ("Traffic", "latency", "errors", "Tokens", "cache", "capacity", "Handoffs",
                   "Satisfaction"):  # fmt: skip
        assert any(wanted.lower() in row.lower() for row in rows), wanted
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_dashboard_references_only_defined_metrics() -> None:
    known = Metrics().series_names()
    used: set[str] = set()
    for title, expr in dashboard_exprs():
        names = metric_names_in(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - known
        assert not unknown, f"panel {title!r} uses undefined metrics {sorted(unknown)}"
        assert not matcher_problems(expr), (title, matcher_problems(expr))
        used |= names
    families = {family_of(name) for name in used}
    assert families == {spec.name for spec in FAMILIES}, "families missing from the dashboard"
    specs = {s.name: s for s in FAMILIES}
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            family = family_of(match.group(1))
            assert family is not None, variable["definition"]
            assert match.group(2) in specs[family].labels, variable["definition"]


def test_series_names_match_registry() -> None:
    assert Metrics().series_names() == series_names()
    for spec in FAMILIES:
        for label in spec.labels:
            assert (spec.name, label) in LABEL_SETS or label in REGISTERED_LABELS, (
                spec.name,
                label,
            )


def test_missing_promtool_fails_under_ci_and_skips_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y prometheus"):
        promtool()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y prometheus"):
        promtool()
