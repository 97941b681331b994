"""promtool checks of the Prometheus config, the rules and their unit tests, and of every
PromQL expression the Grafana dashboard uses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from tests.fixtures.promql import (
    PROMETHEUS_CONFIG,
    RULE_TESTS,
    RULES_FILE,
    dashboard_expressions,
    rule_expressions,
)

PROMTOOL = shutil.which("promtool")

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed"),
]


def promtool(*args: str | Path) -> str:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_config_is_valid_and_loads_the_rules() -> None:
    out = promtool("check", "config", PROMETHEUS_CONFIG)
    assert "1 rule files found" in out
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["nacguard"]["static_configs"][0]["targets"] == ["nacguard:8000"]


def test_rules_are_valid() -> None:
    out = promtool("check", "rules", RULES_FILE)
    assert f"{len(rule_expressions())} rules found" in out


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool rule tests found"
    out = promtool("test", "rules", *RULE_TESTS)
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test() -> None:
    tested = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            # An alert counts as tested only where a case expects it to fire.
            tested |= {
                t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")
            }
    alerts = {e.source.removeprefix("rule:") for e in rule_expressions() if e.kind == "alert"}
    assert alerts - tested == set()


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    exprs = dashboard_expressions(model="fashion-mnist")
    assert len(exprs) > 20
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e.expr} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    promtool("check", "rules", path)


def test_a_broken_expression_is_caught(tmp_path: Path) -> None:
    """The parse check above can fail: promtool rejects a malformed expression."""
    path = tmp_path / "broken.rules.yml"
    path.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(a[5m])"}]}]}
        )
    )
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, timeout=60, check=False
    )
    assert done.returncode != 0
