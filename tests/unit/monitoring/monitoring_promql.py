"""Every PromQL expression nacguard ships, and a real Prometheus to evaluate them.

Shared by the monitoring tests here and meant for the end-to-end test that scrapes a real
``nacguard serve``. This directory has no ``__init__.py``, so from another test directory load
it by path::

    import importlib.util, pathlib
    path = pathlib.Path(__file__).parents[2] / "unit/monitoring/monitoring_promql.py"
    spec = importlib.util.spec_from_file_location("monitoring_promql", path)
    promql = importlib.util.module_from_spec(spec)
    sys.modules["monitoring_promql"] = promql  # dataclasses look their module up
    spec.loader.exec_module(promql)

    with promql.PrometheusServer(tmp_path, targets=[f"127.0.0.1:{port}"]) as prom:
        prom.wait_for("nacguard_images_scored_total > 0")
        for e in promql.all_expressions(model="fashion-mnist"):
            prom.query(e.expr)          # raises on a PromQL or evaluation error
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

__all__ = [
    "DASHBOARD_FILE",
    "PROMETHEUS_CONFIG",
    "REPO",
    "RULES_FILE",
    "RULE_TESTS",
    "PromQLExpr",
    "PrometheusServer",
    "all_expressions",
    "dashboard_expressions",
    "free_port",
    "metric_names",
    "recording_rule_names",
    "rule_expressions",
]

REPO = Path(__file__).resolve().parents[3]
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
RULES_FILE = REPO / "docker" / "prometheus" / "rules" / "nacguard.rules.yml"
RULE_TESTS = sorted((REPO / "docker" / "prometheus" / "tests").glob("*.yml"))
DASHBOARD_FILE = REPO / "docker" / "grafana" / "dashboards" / "nacguard.json"

# Metric and recording-rule names: nacguard_* series and nacguard:* recorded series.
_NAME = re.compile(r"(?<![A-Za-z0-9_:])(nacguard_[A-Za-z0-9_]+|nacguard:[A-Za-z0-9_:]+)")


@dataclass(frozen=True)
class PromQLExpr:
    """One expression and where it comes from.

    Attributes:
        source: ``rule:<record or alert name>`` or ``dashboard:<panel title>/<refId>``.
        expr: the expression, Grafana variables substituted: ready for Prometheus.
        kind: ``record``, ``alert`` or ``panel``.
    """

    source: str
    expr: str
    kind: str


def rule_expressions(path: Path = RULES_FILE) -> list[PromQLExpr]:
    """Every recording and alert rule's expression in a rules file."""
    doc = yaml.safe_load(path.read_text())
    out = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            kind = "record" if "record" in rule else "alert"
            out.append(PromQLExpr(f"rule:{rule[kind]}", rule["expr"].strip(), kind))
    return out


def recording_rule_names(path: Path = RULES_FILE) -> set[str]:
    """Names of the series the recording rules write."""
    return {e.source.removeprefix("rule:") for e in rule_expressions(path) if e.kind == "record"}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_expressions(
    path: Path = DASHBOARD_FILE,
    *,
    model: str = ".*",
    rate_interval: str = "1m",
    interval: str = "15s",
    range_: str = "1h",
) -> list[PromQLExpr]:
    """Every panel query of the dashboard, with Grafana's variables replaced.

    Args:
        path: dashboard JSON.
        model: value for ``$model`` (used inside ``=~`` matchers, so a regex).
        rate_interval: value for ``$__rate_interval``.
        interval: value for ``$__interval``.
        range_: value for ``$__range``.
    """
    dash = json.loads(path.read_text())
    subst = {
        "$__rate_interval": rate_interval,
        "$__interval": interval,
        "$__range": range_,
        "$model": model,
    }
    out = []
    for panel in _panels(dash["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in subst.items():  # longest names first: $__rate_interval
                expr = expr.replace(var, value)
            source = f"dashboard:{panel['title']}/{target['refId']}"
            out.append(PromQLExpr(source, expr, "panel"))
    return out


def all_expressions(
    *, model: str = ".*", rate_interval: str = "1m", interval: str = "15s", range_: str = "1h"
) -> list[PromQLExpr]:
    """Rules' and dashboard's expressions (the arguments fill the dashboard's variables)."""
    return rule_expressions() + dashboard_expressions(
        model=model, rate_interval=rate_interval, interval=interval, range_=range_
    )


def metric_names(expr: str) -> set[str]:
    """The nacguard metric and recording-rule names an expression refers to."""
    return set(_NAME.findall(expr))


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    """A real Prometheus on a loopback port scraping ``targets`` every second, with the
    nacguard rules loaded and evaluated every second. Use as a context manager."""

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        *,
        rules: Path = RULES_FILE,
        binary: str = "prometheus",
        scrape_interval: str = "1s",
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which(binary)
        if exe is None:
            raise FileNotFoundError(binary)
        self._exe = exe
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "nacguard", "static_configs": [{"targets": targets}]}],
        }
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = workdir / "prometheus.log"

    def __enter__(self) -> PrometheusServer:
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    self._exe,
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(timeout=30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self._log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)  # polling a starting process; nothing to wait on instead
        raise TimeoutError(f"prometheus not ready: {self._log.read_text()[-2000:]}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant query now; returns the result vector (raises on any error)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty result; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.2)  # next scrape/evaluation is at most a second away
        raise TimeoutError(f"no result for {expr!r} within {timeout} s")
