"""Smoke runs of the load-test tooling against real servers: ``loadtest/bench.py --quick``
writes well-formed JSON, markdown and PNG, and the locustfile drives a real server headless.

No timing is asserted (timing belongs to the benchmark itself); what is checked is that every
configuration ran, answered, and was reported.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.e2e.server import start_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _strict_json(text: str) -> Any:
    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=no_constants)


def _run(script: str, out: Path, *args: str, timeout: float = 240) -> Any:
    """Run ``loadtest/<script> --out OUT ARGS``; assert it succeeded; its strict-JSON report
    (``OUT/<script's stem>.json``)."""
    proc = subprocess.run(
        [sys.executable, f"loadtest/{script}", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _strict_json((out / f"{Path(script).stem}.json").read_text())


def test_bench_quick_writes_every_output(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    report = _run("bench.py", out, "--quick")
    expected = {
        "batching, 8 images/request",
        "no-batching, 8 images/request",
        "batching",
        "no-batching",
        "plain",
        "cache on, repeated images",
        "cache off, repeated images",
        "/predict, raw images",
        "v2 REST (binary)",
        "gRPC",
    }
    assert set(report["closed"]) == expected
    for key, run in report["closed"].items():
        assert run["ok"] > 0, key
        assert run["errors"] == 0, (key, run["status_codes"])
        assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"], key
        assert run["images_per_s"] > 0, key
    assert report["closed"]["no-batching"]["mean_batch"] == 1.0
    assert report["closed"]["no-batching, 8 images/request"]["mean_batch"] == 1.0
    assert report["closed"]["batching, 8 images/request"]["images_per_s"] == pytest.approx(
        8 * report["closed"]["batching, 8 images/request"]["throughput_rps"]
    )
    assert report["closed"]["batching"]["mean_batch"] >= 1.0
    # Repeated images with the cache on: after the first sighting every image is a hit.
    assert report["closed"]["cache on, repeated images"]["cache_hit_rate"] > 0.5
    assert report["closed"]["cache off, repeated images"]["cache_hit_rate"] == 0.0

    labels = [run["label"] for run in report["open"]]
    assert labels == ["open 0.5x", "open 2x"]
    for run in report["open"]:
        assert run["mode"] == "open"
        assert run["sent"] > 0
        assert run["target_rps"] > 0
    assert report["open"][1]["target_rps"] == pytest.approx(4 * report["open"][0]["target_rps"])

    assert [row["batch"] for row in report["in_process"]] == [1, 16]
    for row in report["in_process"]:
        assert row["fast_ips"] > 0 and row["reference_ips"] > 0 and row["plain_ips"] > 0

    assert set(report["ratios"]) == {
        "batching_over_no_batching",
        "nac_over_plain",
        "cache_on_over_off",
        "batching_over_no_batching_multi",
        "v2_rest_over_predict",
        "grpc_over_predict",
        "v2_rest_over_predict_raw",
        "grpc_over_predict_raw",
    }
    # The quick sweep: 1 and 8 clients, each configuration side by side.
    assert [row["clients"] for row in report["sweep_table"]] == [1, 8]
    for row in report["sweep_table"]:
        for config in ("batching", "no-batching", "fixed-wait"):
            assert row[config]["images_per_s"] > 0, (row["clients"], config)
            assert row[config]["errors"] == 0, (row["clients"], config)
        assert row["no-batching"]["mean_batch"] == 1.0
        assert row["throughput_ratio"] == pytest.approx(
            row["batching"]["images_per_s"] / row["no-batching"]["images_per_s"]
        )
    assert {(r["label"], r["concurrency"]) for r in report["sweep"]} == {
        (config, clients)
        for config in ("batching", "no-batching", "fixed-wait")
        for clients in (1, 8)
    }
    assert (
        len(report["targets"]) == 9
    )  # 5 + the 2 protocol bounds + the sweep's p50 and throughput bounds
    assert all(isinstance(t["met"], bool) for t in report["targets"])

    markdown = (out / "bench.md").read_text()
    assert "| comparison | configuration | images/s |" in markdown
    assert "| clients | batching p50 ms |" in markdown
    assert "| target | measured | bound | met |" in markdown
    for key in expected:
        assert f"| {key} |" in markdown
    tables: list[list[str]] = [[]]
    for line in markdown.splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    tables = [t for t in tables if t]
    assert len(tables) == 5
    for table in tables:
        assert len(table) >= 3  # header, separator, at least one row
        assert len({row.count("|") for row in table}) == 1, table

    with Image.open(out / "latency_throughput.png") as image:
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 200
        image.verify()


def test_bench_swap_part_reports_both_phases(tmp_path: Path) -> None:
    """``--parts swap``: steady and swapping side by side (loadtest/swap_bench.py's run),
    with the swaps it made, the RSS, and its no-failed-request bound."""
    out = tmp_path / "bench"
    report = _run("bench.py", out, "--quick", "--parts", "swap")
    assert report["closed"] == {} and report["open"] == []
    swap = report["swap"]
    steady, swapping = swap["phases"]["steady"], swap["phases"]["swap"]
    assert steady["swaps"] == 0 and swapping["swaps"] >= 1
    for phase in (steady, swapping):
        assert phase["requests_per_s"] > 0 and phase["p50_ms"] <= phase["p99_ms"]
        assert phase["peak_rss_mb"] > 0
    assert swap["ratios"]["throughput_swap_over_steady"] == pytest.approx(
        swapping["requests_per_s"] / steady["requests_per_s"]
    )
    assert swap["weight_loads"] >= 1
    assert [t["name"] for t in report["targets"]] == ["non-200 answers while swapping versions"]
    markdown = (out / "bench.md").read_text()
    assert "| phase | req/s | p50 ms | p99 ms | non-200 | swaps | peak RSS MB |" in markdown
    assert "| steady |" in markdown and "| swap |" in markdown


def test_refusal_bench_compares_two_trees_of_refusals(tmp_path: Path) -> None:
    """``loadtest/refusal_bench.py``: every measured request refused, on both trees."""
    report = _run("refusal_bench.py", tmp_path / "refusal", "--against", "HEAD", "--rounds", "1",
                  "--duration", "0.5", "--concurrency", "4")  # fmt: skip
    for r in report["results"].values():
        assert set(r["status_codes"]) == {"429"} and r["refusals_per_s"] > 0
        assert r["server_cpu_ms_per_refusal"] > 0
    this, older = report["results"]["this"], report["results"]["older"]
    ratio = this["server_cpu_ms_per_refusal"] / older["server_cpu_ms_per_refusal"]
    assert report["ratios"]["server_cpu_ms_per_refusal"] == pytest.approx(ratio)


def test_gil_probe_reports_both_parts(tmp_path: Path) -> None:
    """``loadtest/gil_probe.py``: in-process rates beside a Python thread, and per-thread CPU of
    both servers under wrk, every row filled in."""
    out = tmp_path / "gil"
    report = _run("gil_probe.py", out, "--rounds", "1", "--rate-s", "0.2", "--duration", "1",
                  "--concurrency", "4")  # fmt: skip
    assert [r["batch"] for r in report["in_process"]] == [1, 4, 16]
    for r in report["in_process"]:
        assert r["alone_ms"] > 0 and r["plain_alone_ms"] > 0 and r["beside_python_ms"] > 0
        assert r["slowdown"] == pytest.approx(r["beside_python_ms"] / r["alone_ms"])
    assert [(r["config"], r["clients"]) for r in report["server"]] == [
        ("batching", 4),
        ("no-batching", 4),
        ("plain", 4),
    ]
    for r in report["server"]:
        assert r["rps"] > 0 and r["mean_batch"] >= 1 and r["compute_ms_per_batch"] > 0
        assert r["process_cores"] >= r["loop_cores"] > 0
    assert "| server | clients | req/s |" in (out / "gil_probe.md").read_text()


def test_shadow_bench_writes_its_table(tmp_path: Path) -> None:
    """``loadtest/shadow_bench.py``: the three variants per batch size, ratios consistent."""
    out = tmp_path / "shadow"
    report = _run(
        "shadow_bench.py", out, "--rounds", "1", "--min-s", "0.02", "--batches", "1,4", timeout=120
    )
    assert [r["batch"] for r in report["rows"]] == [1, 4]
    for r in report["rows"]:
        assert r["primary_ips"] > 0 and r["shadow_shared_ips"] > 0 and r["shadow_separate_ips"] > 0
        assert r["shared_over_primary"] == pytest.approx(r["shadow_shared_ips"] / r["primary_ips"])
    assert "| batch | primary img/s |" in (out / "shadow_bench.md").read_text()


def test_locust_headless_against_a_real_server(tmp_path: Path) -> None:
    # find_spec, not importorskip: importing locust monkey-patches the whole process with
    # gevent, and pytest then never exits (its main thread ends up parked in gevent's hub).
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed")
    # The demo profile, as the benchmark serves it: no result cache, quiet logs.
    server = start_server(
        None, tmp_path / "server.log", cache_enabled=False, log_level="warning", torch_threads=0
    )
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                "loadtest/locustfile.py",
                "--headless",
                "-u",
                "4",
                "-r",
                "4",
                "-t",
                "5s",
                "--host",
                server.url,
                "--v2-share",
                "0.5",
                "--only-summary",
                "--csv",
                str(tmp_path / "locust"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        assert server.stop() == 0
    assert proc.returncode == 0, proc.stderr[-4000:]
    with (tmp_path / "locust_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    encodings = {name.split("[")[1].split()[0] for name in rows if name.startswith("/predict [")}
    assert encodings == {"raw", "multipart", "json"}
    assert int(rows["/v2/models/{model}/infer [binary x1]"]["Request Count"]) > 0
